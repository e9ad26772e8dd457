"""The OpenAI-compatible HTTP API end to end: a real `pagedkv serve --http-port` process (engine
and gateway), driven through the real `openai` package, httpx and raw sockets. Outputs must
equal the offline API's for the same parameters; the engine's stats prove that dropped
connections free their blocks."""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from urllib.parse import urlparse

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_process import ROOT, running_gateway, running_http_server

from pagedkv.runtime.engine.sampling_params import SamplingParams
from pagedkv.runtime.serving.client import Client

pytestmark = pytest.mark.timeout(300)
PROMPT = "hello world, this is"
MESSAGES = [{"role": "user", "content": "Say something."}]


CONTEXT = 8192  # the tiny model's context: room for requests that outlast a dropped connection


@pytest.fixture(scope="module")
def model_path(tiny_model):
    return tiny_model(max_position_embeddings=CONTEXT)


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    log = tmp_path_factory.mktemp("http") / "server.log"
    with running_http_server(model_path, "--num-device-blocks", "2100", "--block-size", "4",
                             log_path=str(log)) as (proc, url):
        yield proc, url


@pytest.fixture(scope="module")
def url(server):
    return server[1]


@pytest.fixture(scope="module")
def engine(server):
    with Client(server[0].address, timeout=60) as c:
        yield c


def reference(offline, prompt, **params):
    return offline.generate([prompt], SamplingParams(**params), use_tqdm=False)[0]


def chat_reference(offline, messages, **params):
    return offline.chat(messages, SamplingParams(**params))


def token_text(offline, token_id: int) -> str:
    return offline.tokenizer.decode([token_id], skip_special_tokens=False)


def wait_until(predicate, timeout: float = 30.0):
    """Polls until predicate() is truthy; returns its last value (the caller asserts on it)."""
    deadline = time.monotonic() + timeout
    value = predicate()
    while not value and time.monotonic() < deadline:
        time.sleep(0.05)
        value = predicate()
    return value


def idle(engine) -> dict:
    stats = engine.stats()
    return {"device_used": stats["blocks"]["device"]["used"], "cpu_used": stats["blocks"]["cpu"]["used"],
            "in_flight": stats["server"]["in_flight"]}


IDLE = {"device_used": 0, "cpu_used": 0, "in_flight": 0}


# -- models, completions, chat --------------------------------------------------------------------
def test_models_lists_the_served_model(api, model_path):
    models = api.models.list()
    assert [m.id for m in models.data] == [os.path.basename(model_path)]
    card = models.data[0]
    assert card.object == "model" and card.owned_by == "pagedkv" and isinstance(card.created, int)
    assert api.models.retrieve(card.id).id == card.id


def test_completion_equals_offline(api, model, offline):
    out = api.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0)
    ref = reference(offline, PROMPT, max_tokens=12, temperature=0.0)
    assert out.object == "text_completion" and out.id.startswith("cmpl-") and out.model == model
    assert abs(out.created - time.time()) < 3600
    [choice] = out.choices
    assert choice.index == 0 and choice.text == ref.outputs[0].text
    assert choice.finish_reason == ref.outputs[0].finish_reason and choice.logprobs is None
    assert out.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert out.usage.completion_tokens == len(ref.outputs[0].token_ids)
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_completion_defaults_to_16_tokens_at_temperature_1(api, model, offline):
    out = api.completions.create(model=model, prompt=PROMPT, seed=5, extra_body={"ignore_eos": True})
    ref = reference(offline, PROMPT, seed=5, ignore_eos=True)  # SamplingParams' defaults are OpenAI's
    assert out.usage.completion_tokens == 16 and out.choices[0].text == ref.outputs[0].text


def test_chat_equals_offline_with_the_chat_template(api, model, offline):
    out = api.chat.completions.create(model=model, messages=MESSAGES, max_tokens=8, temperature=0)
    ref = chat_reference(offline, MESSAGES, max_tokens=8, temperature=0.0)
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    [choice] = out.choices
    assert choice.message.role == "assistant" and choice.message.content == ref.outputs[0].text
    assert choice.finish_reason == ref.outputs[0].finish_reason
    assert out.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert out.usage.completion_tokens == len(ref.outputs[0].token_ids)


def test_chat_text_parts_and_max_completion_tokens(api, model, offline):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Say "}, {"type": "text", "text": "something."}]}]
    out = api.chat.completions.create(model=model, messages=parts, max_completion_tokens=5, temperature=0,
                                      extra_body={"ignore_eos": True})
    ref = chat_reference(offline, MESSAGES, max_tokens=5, temperature=0.0, ignore_eos=True)
    assert out.choices[0].message.content == ref.outputs[0].text
    assert out.usage.completion_tokens == 5 and out.choices[0].finish_reason == "length"


def test_n_samples_with_a_seed_equal_offline_and_repeat(api, model, offline):
    params = dict(max_tokens=10, temperature=0.9, top_p=0.95, seed=11, n=3)
    first = api.completions.create(model=model, prompt=PROMPT, **params)
    again = api.completions.create(model=model, prompt=PROMPT, **params)
    ref = reference(offline, PROMPT, **params)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in again.choices] == [c.text for c in ref.outputs]
    other = api.completions.create(model=model, prompt=PROMPT, **{**params, "seed": 12})
    assert [c.text for c in other.choices] != [c.text for c in first.choices]


def test_top_k_min_p_and_ignore_eos_through_extra_body(api, model, offline):
    extra = {"top_k": 5, "min_p": 0.05, "ignore_eos": True}
    out = api.chat.completions.create(model=model, messages=MESSAGES, max_tokens=9, temperature=1.0, seed=3,
                                      extra_body=extra)
    ref = chat_reference(offline, MESSAGES, max_tokens=9, temperature=1.0, seed=3, **extra)
    assert out.choices[0].message.content == ref.outputs[0].text and out.usage.completion_tokens == 9


def test_several_prompts_in_one_completion_request(api, model, offline):
    prompts = [PROMPT, "The quick brown fox"]
    out = api.completions.create(model=model, prompt=prompts, max_tokens=6, temperature=0.7, seed=2, n=2)
    expected = [c.text for p in prompts for c in reference(offline, p, max_tokens=6, temperature=0.7, seed=2,
                                                           n=2).outputs]
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert [c.text for c in out.choices] == expected


def test_token_id_prompts(api, model, offline):
    ids = offline.tokenizer.encode(PROMPT)
    out = api.completions.create(model=model, prompt=ids, max_tokens=6, temperature=0)
    assert out.choices[0].text == reference(offline, PROMPT, max_tokens=6, temperature=0.0).outputs[0].text


def test_stop_string(api, model, offline):
    full = reference(offline, PROMPT, max_tokens=16, temperature=0.0, ignore_eos=True).outputs[0].text
    cut = len(full) // 2
    stop = full[cut:cut + 3]
    if not stop.strip() or full.find(stop) != cut:
        pytest.skip("the reference text has no clean stop string")
    for stream in (False, True):
        kwargs = dict(model=model, prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop],
                      extra_body={"ignore_eos": True})
        if stream:
            chunks = list(api.completions.create(stream=True, **kwargs))
            text = "".join(c.choices[0].text for c in chunks)
            reason = chunks[-1].choices[0].finish_reason
        else:
            choice = api.completions.create(**kwargs).choices[0]
            text, reason = choice.text, choice.finish_reason
        assert text == full[:cut] and reason == "stop"


def test_beam_search_through_vllm_extra_parameters(api, model, offline):
    ref = reference(offline, PROMPT, max_tokens=8, beam_width=3, n=2)
    out = api.completions.create(model=model, prompt=PROMPT, max_tokens=8, n=2,
                                 extra_body={"use_beam_search": True, "best_of": 3})
    assert [c.text for c in out.choices] == [c.text for c in ref.outputs]
    direct = api.completions.create(model=model, prompt=PROMPT, max_tokens=8, n=2, extra_body={"beam_width": 3})
    assert [c.text for c in direct.choices] == [c.text for c in ref.outputs]


def test_best_of_returns_the_likeliest_samples(api, model, offline):
    ref = reference(offline, PROMPT, max_tokens=8, temperature=1.0, seed=4, n=4)
    ranked = sorted(ref.outputs, key=lambda c: -c.cumulative_logprob)
    out = api.completions.create(model=model, prompt=PROMPT, max_tokens=8, seed=4, n=2, best_of=4)
    assert [c.text for c in out.choices] == [c.text for c in ranked[:2]]
    assert [c.index for c in out.choices] == [0, 1]


# -- logprobs -------------------------------------------------------------------------------------
def test_completion_logprobs_as_openai_defines_them(api, model, offline):
    out = api.completions.create(model=model, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3)
    ref = reference(offline, PROMPT, max_tokens=6, temperature=0.0, logprobs=3).outputs[0]
    lp = out.choices[0].logprobs
    assert lp.tokens == [token_text(offline, t) for t in ref.token_ids]
    assert lp.token_logprobs == pytest.approx([d[t] for d, t in zip(ref.logprobs, ref.token_ids)], rel=1e-5)
    for top, expected in zip(lp.top_logprobs, ref.logprobs):
        best = sorted(expected.items(), key=lambda kv: -kv[1])[:3]
        by_text: dict[str, float] = {}  # keyed by text, as OpenAI's format is: the likeliest of equal texts
        for t, logprob in best:          # (greedy: the sampled token is the first, so no fourth entry)
            by_text.setdefault(token_text(offline, t), logprob)
        assert list(top) == list(by_text) and top == pytest.approx(by_text, rel=1e-5)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]


def test_chat_logprobs_as_openai_defines_them(api, model, offline):
    out = api.chat.completions.create(model=model, messages=MESSAGES, max_tokens=5, temperature=0,
                                      logprobs=True, top_logprobs=2)
    ref = chat_reference(offline, MESSAGES, max_tokens=5, temperature=0.0, logprobs=2).outputs[0]
    content = out.choices[0].logprobs.content
    assert [c.token for c in content] == [token_text(offline, t) for t in ref.token_ids]
    assert [c.logprob for c in content] == pytest.approx([d[t] for d, t in zip(ref.logprobs, ref.token_ids)],
                                                         rel=1e-5)
    for item in content:
        assert item.bytes == list(item.token.encode())
        assert len(item.top_logprobs) == 2
        assert item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob
    plain = api.chat.completions.create(model=model, messages=MESSAGES, max_tokens=5, temperature=0)
    assert plain.choices[0].logprobs is None


def test_streamed_logprobs_add_up_to_the_whole(api, model):
    kwargs = dict(model=model, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=2,
                  extra_body={"ignore_eos": True})
    whole = api.completions.create(**kwargs).choices[0].logprobs
    chunks = [c for c in api.completions.create(stream=True, **kwargs) if c.choices and c.choices[0].logprobs]
    assert [t for c in chunks for t in c.choices[0].logprobs.tokens] == whole.tokens
    assert [x for c in chunks for x in c.choices[0].logprobs.token_logprobs] == whole.token_logprobs
    assert [x for c in chunks for x in c.choices[0].logprobs.text_offset] == whole.text_offset


# -- streaming ------------------------------------------------------------------------------------
def test_streamed_completion_with_usage(api, model, offline):
    ref = reference(offline, PROMPT, max_tokens=12, temperature=0.0, ignore_eos=True)
    chunks = list(api.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
                                         stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    *body, last = chunks
    assert len(body) > 3 and all(c.object == "text_completion" and c.usage is None for c in body)
    assert len({c.id for c in chunks}) == 1
    assert "".join(c.choices[0].text for c in body) == ref.outputs[0].text
    assert body[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in body[:-1])
    assert last.choices == [] and last.usage.completion_tokens == 12
    assert last.usage.prompt_tokens == len(ref.prompt_token_ids)


def test_streamed_chat_n2(api, model, offline):
    ref = chat_reference(offline, MESSAGES, max_tokens=8, temperature=0.8, seed=9, n=2)
    chunks = list(api.chat.completions.create(model=model, messages=MESSAGES, max_tokens=8, temperature=0.8,
                                              seed=9, n=2, stream=True))
    assert all(c.object == "chat.completion.chunk" and len(c.choices) == 1 for c in chunks)
    for index in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices[0].index == index]
        assert mine[0].delta.role == "assistant" and mine[0].delta.content == ""
        assert "".join(c.delta.content or "" for c in mine) == ref.outputs[index].text
        assert mine[-1].finish_reason == ref.outputs[index].finish_reason
        assert all(c.finish_reason is None for c in mine[:-1])


def test_sse_wire_format(url, model):
    body = {"model": model, "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: {") for e in events[:-2])
    assert all(json.loads(e[len("data: "):])["object"] == "text_completion" for e in events[:-2])


def test_32_concurrent_streams(url, model, offline, engine):
    prompts = [f"Numbers: {i} {i * 7} and" for i in range(32)]
    refs = offline.generate(prompts, SamplingParams(max_tokens=10, temperature=0.0), use_tqdm=False)

    async def one(client: openai.AsyncOpenAI, prompt: str) -> str:
        stream = await client.completions.create(model=model, prompt=prompt, max_tokens=10, temperature=0,
                                                 stream=True)
        return "".join([c.choices[0].text async for c in stream])

    async def all_of_them() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120) as client:
            return await asyncio.gather(*(one(client, p) for p in prompts))

    texts = asyncio.run(all_of_them())
    assert texts == [r.outputs[0].text for r in refs]
    assert wait_until(lambda: idle(engine) == IDLE) and idle(engine) == IDLE


# -- dropped connections ------------------------------------------------------------------------------
# Tokens: a request that runs (about 5 s on a 2-core CPU) until it is aborted, far longer than a
# dropped connection takes to reach the engine; 2100 blocks of 4 hold it.
LONG = 6000


def test_a_dropped_stream_aborts_its_request_and_frees_its_blocks(url, model, engine):
    body = {"model": model, "prompt": PROMPT, "max_tokens": LONG, "temperature": 0, "stream": True,
            "ignore_eos": True}
    before = engine.stats()
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
        # The status line comes with the engine's first reply: the request is running.
        assert response.status_code == 200
        busy = engine.stats()
        assert busy["blocks"]["device"]["used"] > 0 and busy["server"]["in_flight"] == 1
    assert wait_until(lambda: idle(engine) == IDLE) and idle(engine) == IDLE
    after = engine.stats()
    assert after["server"]["errors"] == before["server"]["errors"] + 1  # the `aborted` reply
    assert after["generated_tokens"] - before["generated_tokens"] < LONG


def test_streams_dropped_one_after_another_are_each_aborted(url, model, engine):
    # Not only the first: a cancellation lost as a reply arrived once let later ones run to the end.
    body = {"model": model, "prompt": PROMPT, "max_tokens": LONG, "temperature": 0, "stream": True,
            "ignore_eos": True}
    for attempt in range(3):
        before = engine.stats()
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
            assert response.status_code == 200
        assert wait_until(lambda: idle(engine) == IDLE) and idle(engine) == IDLE, attempt
        after = engine.stats()
        assert after["server"]["errors"] == before["server"]["errors"] + 1, attempt
        assert after["generated_tokens"] - before["generated_tokens"] < LONG, attempt


def test_a_dropped_plain_request_is_aborted_too(url, model, engine):
    before = engine.stats()
    with post_without_reading(url, {"model": model, "prompt": PROMPT, "max_tokens": LONG, "temperature": 0,
                                    "ignore_eos": True}):
        assert wait_until(lambda: engine.stats()["server"]["in_flight"] == 1)
    assert wait_until(lambda: idle(engine) == IDLE) and idle(engine) == IDLE
    after = engine.stats()
    assert after["server"]["errors"] == before["server"]["errors"] + 1
    assert after["generated_tokens"] - before["generated_tokens"] < LONG


@contextlib.contextmanager
def post_without_reading(url: str, body: dict, path: str = "/v1/completions"):
    """Sends a request on a raw socket and never reads the answer; leaving closes the connection."""
    payload = json.dumps(body).encode()
    parsed = urlparse(url)
    with socket.create_connection((parsed.hostname, parsed.port)) as sock:
        sock.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (path.encode(), len(payload), payload))
        yield sock


# -- errors ---------------------------------------------------------------------------------------
def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return body["error"]


@pytest.mark.parametrize("body, param", [
    ({"prompt": PROMPT, "temperature": -1}, "temperature"),
    ({"prompt": PROMPT, "top_p": 0}, "top_p"),
    ({"prompt": PROMPT, "max_tokens": 0}, "max_tokens"),
    ({"prompt": PROMPT, "n": 0}, "n"),
    ({"prompt": PROMPT, "logprobs": 21}, "logprobs"),
    ({"prompt": PROMPT, "max_tokens": "ten"}, "max_tokens"),
    ({"prompt": []}, "prompt"),
    ({"prompt": PROMPT, "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": PROMPT, "prompt_logprobs": 21}, "prompt_logprobs"),
    ({"prompt": PROMPT, "presence_penalty": 2.5}, "presence_penalty"),
    ({"prompt": PROMPT, "temprature": 0.5}, "temprature"),
    ({"prompt": PROMPT, "n": 3, "best_of": 2}, "best_of"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_400_names_the_bad_parameter(url, model, body, param):
    response = httpx.post(f"{url}/v1/completions", json={"model": model, **body}, timeout=60)
    assert response.status_code == 400
    error = error_of(response)
    assert error["type"] == "invalid_request_error" and error["param"] == param


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
    ({"messages": MESSAGES, "top_logprobs": 2}, "top_logprobs"),
    # The tiny model's template teaches no tool-call format: "auto" (the default) cannot be read.
    ({"messages": MESSAGES, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tool_choice"),
])
def test_400_for_chat(url, model, body, param):
    response = httpx.post(f"{url}/v1/chat/completions", json={"model": model, **body}, timeout=60)
    assert response.status_code == 400 and error_of(response)["param"] == param


def test_400_for_bad_json_and_for_the_engines_own_checks(url, model, offline):
    response = httpx.post(f"{url}/v1/completions", content=b"{not json", timeout=60,
                          headers={"content-type": "application/json"})
    assert response.status_code == 400 and "JSON" in error_of(response)["message"]
    vocab = offline.engine.model_config.vocab_size  # checked by the engine, not by the gateway
    response = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": [vocab + 5]}, timeout=60)
    assert response.status_code == 400 and str(vocab) in error_of(response)["message"]


def test_the_openai_client_raises_its_errors(api, model):
    with pytest.raises(openai.BadRequestError):
        api.completions.create(model=model, prompt=PROMPT, temperature=-1)
    with pytest.raises(openai.NotFoundError) as error:
        api.completions.create(model="no-such-model", prompt=PROMPT)
    assert error.value.status_code == 404 and error.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        api.chat.completions.create(model="no-such-model", messages=MESSAGES)


def test_404_for_unknown_paths_in_openai_shape(url):
    response = httpx.get(f"{url}/v1/nothing", timeout=60)
    assert response.status_code == 404 and error_of(response)["type"] == "invalid_request_error"


def test_413_for_a_prompt_longer_than_the_context_and_for_a_large_body(url, model):
    response = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": [5] * (CONTEXT + 100)},
                          timeout=60)
    assert response.status_code == 413 and error_of(response)["code"] == "context_length_exceeded"
    big = json.dumps({"model": model, "prompt": "x" * (5 * 2**20)})
    response = httpx.post(f"{url}/v1/completions", content=big, timeout=60,
                          headers={"content-type": "application/json"})
    assert response.status_code == 413 and error_of(response)["code"] == "request_too_large"


def test_health(url):
    response = httpx.get(f"{url}/health", timeout=60)
    assert response.status_code == 200 and response.json()["status"] == "ok"


# -- metrics --------------------------------------------------------------------------------------
def scrape(url: str) -> dict[str, dict[tuple, float]]:
    text = httpx.get(f"{url}/metrics", timeout=60).text
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return samples


def total(samples: dict, name: str) -> float:
    return sum(samples.get(name, {}).values())


def test_metrics_parse_and_counters_move(url, api, model):
    before = scrape(url)
    for name in ("pagedkv:num_requests_running", "pagedkv:num_requests_waiting", "pagedkv:num_requests_swapped",
                 "pagedkv:kv_cache_usage_perc", "pagedkv:cpu_cache_usage_perc"):
        assert before[name] == {(("model_name", model),): 0.0}, name
    assert {dict(k)["mode"] for k in before["pagedkv:num_preemptions_total"]} == {"swap", "recompute"}
    out = api.completions.create(model=model, prompt=PROMPT, max_tokens=7, temperature=0,
                                 extra_body={"ignore_eos": True})
    streamed = list(api.completions.create(model=model, prompt=PROMPT, max_tokens=5, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True}))
    after = scrape(url)
    assert total(after, "pagedkv:prompt_tokens_total") - total(before, "pagedkv:prompt_tokens_total") == \
        2 * out.usage.prompt_tokens
    assert total(after, "pagedkv:generation_tokens_total") - total(before, "pagedkv:generation_tokens_total") == 12
    key = (("finished_reason", "length"), ("model_name", model))
    assert after["pagedkv:request_success_total"][key] - \
        before.get("pagedkv:request_success_total", {}).get(key, 0) == 2
    for name, grew in (("e2e_request_latency_seconds", 2), ("request_queue_time_seconds", 2),
                       ("time_to_first_token_seconds", 1), ("inter_token_latency_seconds", 4)):
        count = f"pagedkv:{name}_count"
        assert total(after, count) - total(before, count) == grew, name
    assert len(streamed) >= 5


# -- the gateway alone ----------------------------------------------------------------------------
def test_several_gateways_share_one_engine_and_the_api_key_is_required(server, model, tmp_path):
    proc, _ = server
    with running_gateway(proc.address, "--api-key", "sesame", log_path=str(tmp_path / "gw.log")) as (_, url):
        response = httpx.get(f"{url}/v1/models", timeout=60)
        assert response.status_code == 401 and error_of(response)["code"] == "invalid_api_key"
        wrong = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer nope"}, timeout=60)
        assert wrong.status_code == 401
        assert httpx.get(f"{url}/health", timeout=60).status_code == 200  # probes need no key
        with openai.OpenAI(base_url=f"{url}/v1", api_key="sesame", max_retries=0, timeout=60) as client:
            out = client.completions.create(model=model, prompt=PROMPT, max_tokens=3, temperature=0)
        assert out.usage.completion_tokens == 3


def test_503_when_the_engine_does_not_answer(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nobody listens there once this closes
    address = f"tcp://127.0.0.1:{port}"
    with running_gateway(address, "--timeout", "1", "--health-timeout", "1",
                         log_path=str(tmp_path / "gw.log")) as (_, url):
        for method, path, body in (("GET", "/health", None), ("GET", "/v1/models", None),
                                   ("POST", "/v1/completions", {"model": "m", "prompt": "x"}),
                                   ("POST", "/v1/chat/completions", {"model": "m", "messages": MESSAGES})):
            response = httpx.request(method, f"{url}{path}", json=body, timeout=60)
            assert response.status_code == 503, path
            assert error_of(response)["code"] == "engine_unavailable"
        metrics = httpx.get(f"{url}/metrics", timeout=60)
        assert metrics.status_code == 200 and "pagedkv:num_requests_running" not in metrics.text
        with openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60) as client:
            with pytest.raises(openai.InternalServerError) as error:
                client.completions.create(model="m", prompt="x")
        assert error.value.status_code == 503


def test_a_non_loopback_host_needs_a_key(tmp_path):
    command = [sys.executable, "-m", "pagedkv", "api", "--host", "0.0.0.0", "--port", "0"]
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--api-key" in out.stderr and "--insecure" in out.stderr
    out = subprocess.run([sys.executable, "-m", "pagedkv", "serve", "--http-port", "0",
                          "--http-host", "0.0.0.0", "--model", "/nonexistent"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "--api-key" in out.stderr  # refused before the model loads


def test_429_when_the_engine_is_overloaded(model_path, tmp_path):
    with running_http_server(model_path, "--num-device-blocks", "2100", "--block-size", "4", "--max-num-seqs", "1",
                             "--max-queued", "1", log_path=str(tmp_path / "server.log")) as (proc, url), \
            Client(proc.address, timeout=60) as engine:
        long = {"prompt": PROMPT, "max_tokens": LONG, "ignore_eos": True, "temperature": 0}
        with httpx.stream("POST", f"{url}/v1/completions", json={**long, "stream": True}, timeout=60) as running:
            assert running.status_code == 200  # it runs; with --max-num-seqs 1 the next one waits
            with post_without_reading(url, long):
                assert wait_until(lambda: engine.stats()["queues"]["waiting"] == 1)
                refused = httpx.post(f"{url}/v1/completions", json=long, timeout=60)
                assert refused.status_code == 429
                assert error_of(refused)["type"] == "rate_limit_error"
                with openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60) as client:
                    with pytest.raises(openai.RateLimitError):
                        client.completions.create(model=os.path.basename(model_path), prompt=PROMPT, max_tokens=4)
        assert wait_until(lambda: idle(engine) == IDLE) and idle(engine) == IDLE


# -- the README's examples ---------------------------------------------------------------------------
README_URL, README_MODEL = "http://127.0.0.1:8000", "SmolLM2-135M-Instruct.Q4_1.gguf"


def readme_curl_commands() -> list[list[str]]:
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text.split("## Serve it over HTTP", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.startswith("curl "):
                commands.append(shlex.split(line, comments=True))
    return commands


def run_curl(argv: list[str]) -> str:
    """With curl when it is installed, else the same request through urllib."""
    if shutil.which("curl"):
        out = subprocess.run([*argv, "--silent", "--show-error", "--fail"], capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, (argv, out.stderr)
        return out.stdout
    url, headers, data, args = None, {}, None, iter(argv[1:])
    for arg in args:
        if arg == "-H":
            name, _, value = next(args).partition(":")
            headers[name.strip()] = value.strip()
        elif arg == "-d":
            data = next(args).encode()
        elif not arg.startswith("-"):
            url = arg
    request = urllib.request.Request(url, data=data, headers=headers)
    with urllib.request.urlopen(request, timeout=120) as response:
        return response.read().decode()


def test_readme_curl_examples_work(url, model):
    commands = readme_curl_commands()
    assert len(commands) == 5
    for argv in commands:
        argv = [a.replace(README_URL, url).replace(README_MODEL, model) for a in argv]
        out = run_curl(argv)
        if '"stream": true' in " ".join(argv):
            assert out.rstrip().endswith("data: [DONE]") and '"chat.completion.chunk"' in out
        elif argv[1].endswith("/metrics"):
            assert "pagedkv:num_requests_running" in out
        else:
            body = json.loads(out)
            assert "error" not in body and (body.get("choices") or body.get("data") or body["status"] == "ok")


def test_readme_openai_block_works(url, offline):
    from test_readme import python_blocks, run_block

    printed = run_block(python_blocks()[2].replace(README_URL, url))
    chat = chat_reference(offline, [{"role": "user", "content": "Name three rivers."}], max_tokens=32,
                          temperature=0.0)
    completion = reference(offline, "The capital of France is", max_tokens=8, temperature=0.0)
    assert printed == f"{chat.outputs[0].text}\n{completion.outputs[0].text}\n"


def test_the_gateway_does_not_import_torch():
    code = "import sys, pagedkv.runtime.serving.http.app, pagedkv.runtime.cli.api; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")  # exited, perhaps not yet reaped
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_the_gateway_leaves_with_its_engine_process(model_path, tmp_path, how):
    with running_http_server(model_path, "--num-device-blocks", "64", log_path=str(tmp_path / "server.log")) \
            as (proc, url):
        pid = proc.process.pid
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            [gateway] = [int(c) for c in f.read().split()]
        assert httpx.get(f"{url}/health", timeout=60).status_code == 200
        if how == "sigterm":
            assert proc.terminate() == 0
        else:
            proc.process.kill()
            proc.process.wait(30)
        assert wait_until(lambda: _gone(gateway)), f"the gateway {gateway} outlived its engine process"
