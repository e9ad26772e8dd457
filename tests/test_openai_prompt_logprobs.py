"""Prompt logprobs through the gateway, with the real `openai` client against a real `pagedkv
serve --http-port`: vLLM's `prompt_logprobs` (an extra parameter; in each completions choice,
at the top of a chat response) and completions' `echo` with `logprobs` (OpenAI's legacy
shape: the prompt's tokens first, the first one's logprob null), streamed and not. The
numbers must be the offline engine's."""
from __future__ import annotations

import httpx
import pytest
from server_process import running_http_server

from pagedkv.runtime.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.timeout(600)
MESSAGES = [{"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def model_path(tiny_model):
    return tiny_model(max_position_embeddings=1024, seed=5)


@pytest.fixture(scope="module")
def url(model_path, tmp_path_factory):
    log = tmp_path_factory.mktemp("http") / "server.log"
    with running_http_server(model_path, "--num-device-blocks", "200", "--block-size", "4",
                             log_path=str(log)) as (_, url):
        yield url


def offline_run(offline, prompt, **params):
    ids = offline.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
    return ids, offline.generate([ids], SamplingParams(**params), use_tqdm=False)[0]


def text_of(offline, token_id: int) -> str:
    return offline.tokenizer.decode([token_id], skip_special_tokens=False)


def vllm_shape(offline, prompt_logprobs, k: int) -> list:
    """What vLLM returns as `prompt_logprobs`, from the offline engine's."""
    out = [None]
    for entry in prompt_logprobs[1:]:
        items = list(entry.items())  # the prompt token first, then the others of the engine's top
        listed = items[:1] + [(t, v) for t, v in items[1:] if v[1] <= k]
        out.append({str(t): {"logprob": lp, "rank": rank, "decoded_token": text_of(offline, t)}
                    for t, (lp, rank) in listed})
    return out


def same(got, expected, tolerance: float = 1e-5) -> bool:
    """Equal, floats within `tolerance`: requests batched together may round their float32
    products differently from the offline run of one."""
    if isinstance(got, float) and isinstance(expected, float):
        return abs(got - expected) <= tolerance
    if isinstance(got, dict) and isinstance(expected, dict):
        return list(got) == list(expected) and all(same(got[k], expected[k], tolerance) for k in got)
    if isinstance(got, list) and isinstance(expected, list):
        return len(got) == len(expected) and all(same(a, b, tolerance) for a, b in zip(got, expected))
    return got == expected


def test_completions_report_vllm_prompt_logprobs_in_each_choice(api, model, offline):
    response = api.completions.create(model=model, prompt=["hello world", "the fox"], max_tokens=3, temperature=0,
                                      n=2, extra_body={"prompt_logprobs": 2})
    assert len(response.choices) == 4
    for p, prompt in enumerate(["hello world", "the fox"]):
        ids, ref = offline_run(offline, prompt, max_tokens=3, temperature=0, prompt_logprobs=2)
        expected = vllm_shape(offline, ref.prompt_logprobs, 2)
        for choice in response.choices[2 * p:2 * p + 2]:
            assert same(choice.prompt_logprobs, expected)
            assert choice.text == ref.outputs[0].text
            assert choice.logprobs is None  # not asked
    assert response.usage.prompt_tokens == sum(len(offline.tokenizer.encode(p)) for p in ["hello world", "the fox"])


def test_chat_reports_them_at_the_top_as_vllm(api, model, offline):
    response = api.chat.completions.create(model=model, messages=MESSAGES, max_tokens=3, temperature=0,
                                           extra_body={"prompt_logprobs": 0})
    text = offline.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    ids, ref = offline_run(offline, offline.tokenizer.encode(text, add_special_tokens=False), max_tokens=3,
                           temperature=0, prompt_logprobs=0)
    assert same(response.prompt_logprobs, vllm_shape(offline, ref.prompt_logprobs, 0))
    assert all(len(entry) == 1 for entry in response.prompt_logprobs[1:])  # the prompt token alone
    assert response.choices[0].message.content == ref.outputs[0].text
    plain = api.chat.completions.create(model=model, messages=MESSAGES, max_tokens=3, temperature=0)
    assert plain.choices[0].message.content == response.choices[0].message.content
    assert "prompt_logprobs" not in plain.model_dump(exclude_unset=True)


def test_echo_with_logprobs_lists_the_prompt_first(api, model, offline):
    prompt = "the quick brown fox"
    response = api.completions.create(model=model, prompt=prompt, max_tokens=4, temperature=0, echo=True, logprobs=3)
    ids, ref = offline_run(offline, prompt, max_tokens=4, temperature=0, logprobs=3, prompt_logprobs=3)
    choice, out = response.choices[0], ref.outputs[0]
    assert choice.text == prompt + out.text
    lp = choice.logprobs
    every = ids + out.token_ids
    assert lp.tokens == [text_of(offline, t) for t in every]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert same(lp.token_logprobs[1:len(ids)], [ref.prompt_logprobs[i][t][0] for i, t in enumerate(ids) if i])
    assert same(lp.token_logprobs[len(ids):], [out.logprobs[j][t] for j, t in enumerate(out.token_ids)])
    for i, t in enumerate(ids[1:], 1):
        top = lp.top_logprobs[i]
        assert 3 <= len(top) <= 4 and same(top[text_of(offline, t)], ref.prompt_logprobs[i][t][0])
        assert list(top.values()) == sorted(top.values(), reverse=True)
    assert lp.text_offset[0] == 0
    assert all(b - a == len(token) for a, b, token in zip(lp.text_offset, lp.text_offset[1:], lp.tokens))
    # vLLM reports them as prompt_logprobs as well, with `logprobs` alternatives.
    assert same(choice.prompt_logprobs, vllm_shape(offline, ref.prompt_logprobs, 3))


def test_echo_takes_as_many_alternatives_as_logprobs_and_prompt_logprobs_its_own(api, model, offline):
    """The engine computes the larger count; each field lists its own."""
    prompt = [9, 8, 7, 6, 5, 4, 3]
    response = api.completions.create(model=model, prompt=prompt, max_tokens=2, temperature=0, echo=True,
                                      logprobs=1, extra_body={"prompt_logprobs": 4})
    ids, ref = offline_run(offline, prompt, max_tokens=2, temperature=0, prompt_logprobs=4)
    choice = response.choices[0]
    assert same(choice.prompt_logprobs, vllm_shape(offline, ref.prompt_logprobs, 4))
    for i, t in enumerate(ids[1:], 1):
        ranked = sorted(ref.prompt_logprobs[i].items(), key=lambda item: item[1][1])
        expected = {text_of(offline, u): lp for u, (lp, rank) in ranked if u == t or rank <= 1}
        assert same(choice.logprobs.top_logprobs[i], expected) and len(expected) in (1, 2)
    fewer = api.completions.create(model=model, prompt=prompt, max_tokens=2, temperature=0, echo=True,
                                   logprobs=3, extra_body={"prompt_logprobs": 1})
    assert same(fewer.choices[0].prompt_logprobs, vllm_shape(offline, ref.prompt_logprobs, 1))
    assert all(len(top) == 4 for top in fewer.choices[0].logprobs.top_logprobs[1:len(prompt)])  # texts all differ


def test_echo_with_logprobs_streamed_adds_up_to_the_whole(api, model):
    params = dict(model=model, prompt=[5, 6, 7, 8], max_tokens=5, temperature=0, echo=True, logprobs=2, n=2)
    whole = api.completions.create(**params)
    chunks = [c.choices[0] for c in api.completions.create(**params, stream=True) if c.choices]
    for choice in whole.choices:
        mine = [c for c in chunks if c.index == choice.index]
        assert "".join(c.text for c in mine) == choice.text
        logprobs = [c.logprobs for c in mine if c.logprobs is not None]
        for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            assert [v for lp in logprobs for v in getattr(lp, name)] == getattr(choice.logprobs, name), name
        assert mine[0].logprobs.token_logprobs[0] is None  # the prompt came first, in the first chunk


def test_asking_changes_no_output(api, model):
    params = dict(model=model, prompt="a b c", max_tokens=8, temperature=0.8, seed=4, logprobs=1)
    plain = api.completions.create(**params)
    asked = api.completions.create(**params, extra_body={"prompt_logprobs": 5})
    assert [c.text for c in asked.choices] == [c.text for c in plain.choices]
    assert [c.logprobs.token_logprobs for c in asked.choices] == [c.logprobs.token_logprobs for c in plain.choices]


@pytest.mark.parametrize("path, extra", [
    ("/v1/completions", {"prompt_logprobs": 21}),
    ("/v1/completions", {"prompt_logprobs": -1}),
    ("/v1/completions", {"prompt_logprobs": "2"}),
    ("/v1/completions", {"prompt_logprobs": 1, "stream": True}),
    ("/v1/chat/completions", {"prompt_logprobs": 1, "stream": True}),
    ("/v1/chat/completions", {"prompt_logprobs": True}),
])
def test_bad_prompt_logprobs_are_a_400_naming_them(url, model, path, extra):
    source = {"prompt": "hello"} if path == "/v1/completions" else {"messages": MESSAGES}
    response = httpx.post(f"{url}{path}", json={"model": model, **source, "max_tokens": 2, **extra}, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "prompt_logprobs"


def test_json_shape(url, model):
    body = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": [5, 6, 7], "max_tokens": 1,
                                                     "prompt_logprobs": 1}, timeout=60).json()
    entries = body["choices"][0]["prompt_logprobs"]
    assert entries[0] is None and len(entries) == 3
    assert list(entries[1])[0] == "6" and list(entries[2])[0] == "7"  # the prompt token first
    for entry in entries[1:]:
        assert 1 <= len(entry) <= 2 and all(set(v) == {"logprob", "rank", "decoded_token"} for v in entry.values())
        assert sorted(v["rank"] for v in entry.values())[0] == 1
