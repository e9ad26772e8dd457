"""The OpenAI API features people call, end to end through a real `pagedkv serve --http-port`
and the `openai` package: structured outputs (response_format, structured_outputs, guided_*),
tool calls for each chat family pagedkv parses, penalties and logit_bias, min_tokens, echo,
include_stop_str_in_output, /tokenize and /detokenize, and a 400 naming every field that is
not known. The tiny models have random weights: outputs under a grammar may run to max_tokens,
so 'length' is accepted where the grammar permits partial output and validity is asserted for
every 'stop'."""
from __future__ import annotations

import json
import os
import random
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest
from chat_templates import HERMES, LLAMA3
from server_process import running_http_server

from pagedkv.runtime.engine.sampling_params import SamplingParams
from pagedkv.runtime.serving.client import Client

pytestmark = pytest.mark.timeout(600)
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
        "additionalProperties": False}}}]


def _with_template(path: str, template: str) -> str:
    config_file = os.path.join(path, "tokenizer_config.json")
    with open(config_file) as f:
        config = json.load(f)
    config["chat_template"] = template
    with open(config_file, "w") as f:
        json.dump(config, f)
    return path


@pytest.fixture(scope="module")
def model_path(tiny_model, tmp_path_factory):
    # A pool small enough that concurrent requests preempt one another.
    path = tiny_model(max_position_embeddings=1024, seed=3)
    target = tmp_path_factory.mktemp("hermes") / "hermes-tiny"
    import shutil

    shutil.copytree(path, target)
    return _with_template(str(target), HERMES)


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    log = tmp_path_factory.mktemp("http") / "server.log"
    with running_http_server(model_path, "--num-device-blocks", "200", "--block-size", "4",
                             log_path=str(log)) as (proc, url):
        yield proc, url


@pytest.fixture(scope="module")
def url(server):
    return server[1]


def post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=120)


# -- structured outputs -----------------------------------------------------------------------------
def random_schema(rng: random.Random, depth: int = 0) -> dict:
    """Nested objects, arrays, enums, required fields, patterns, bounded integers and booleans."""
    kinds = ["integer", "boolean", "enum", "pattern"] + (["object", "array"] if depth < 2 else [])
    kind = rng.choice(kinds)
    if kind == "integer":
        low = rng.randint(-50, 50)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 200)}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "blue", "a b", "x\"y", 3, None, True], rng.randint(1, 4))}
    if kind == "pattern":
        return {"type": "string", "pattern": rng.choice(["^[a-z]{1,4}$", "^[0-9]{2}-[A-Z]$", "^(yes|no)$"])}
    if kind == "array":
        return {"type": "array", "items": random_schema(rng, depth + 1), "minItems": rng.randint(0, 1),
                "maxItems": rng.randint(1, 3)}
    props = {f"k{i}": random_schema(rng, depth + 1) for i in range(rng.randint(1, 3))}
    return {"type": "object", "properties": props, "additionalProperties": False,
            "required": sorted(rng.sample(sorted(props), rng.randint(0, len(props))))}


def _check_json(text: str, finish: str, schema: dict | None) -> bool:
    """A finished ('stop') output parses and validates; a cut one ('length') may be partial."""
    assert finish in ("stop", "length"), finish
    if finish != "stop":
        return False
    value = json.loads(text)
    if schema is None:
        assert isinstance(value, dict)
    else:
        jsonschema.validate(value, schema)
    return True


@pytest.fixture(scope="module")
def small(model_path, tmp_path_factory):
    """A server whose pool is small enough that concurrent requests preempt one another."""
    log = tmp_path_factory.mktemp("small") / "server.log"
    with running_http_server(model_path, "--num-device-blocks", "40", "--block-size", "4",
                             log_path=str(log)) as (proc, url):
        with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120) as client:
            yield proc, client


def test_random_json_schemas_n_streaming_and_preemption(small, model):
    proc, api = small

    def engine_stats() -> dict:
        with Client(proc.address, timeout=60) as c:
            return c.stats()

    before = engine_stats()["preemptions"]
    rng = random.Random(7)
    schemas = [{"type": "object", "properties": {"root": random_schema(rng)}, "required": ["root"],
                "additionalProperties": False} for _ in range(10)]

    def run(k: int) -> list[tuple[str, str]]:
        fmt = {"type": "json_schema", "json_schema": {"name": f"s{k}", "schema": schemas[k], "strict": True}}
        if k % 2:  # streamed, with two choices
            chunks = api.chat.completions.create(model=model, messages=MESSAGES, max_tokens=48, n=2, seed=k,
                                                 response_format=fmt, stream=True)
            texts, reasons = ["", ""], [None, None]
            for chunk in chunks:
                for c in chunk.choices:
                    texts[c.index] += c.delta.content or ""
                    reasons[c.index] = c.finish_reason or reasons[c.index]
            return list(zip(texts, reasons))
        out = api.chat.completions.create(model=model, messages=MESSAGES, max_tokens=48, n=3, temperature=0.8,
                                          seed=k, response_format=fmt)
        return [(c.message.content, c.finish_reason) for c in out.choices]

    with ThreadPoolExecutor(10) as pool:  # concurrently: the small pool preempts
        results = list(pool.map(run, range(len(schemas))))
    finished = sum(_check_json(text, reason, schemas[k]) for k, outs in enumerate(results) for text, reason in outs)
    assert finished >= 10, results
    after = engine_stats()["preemptions"]
    assert after["swap"] + after["recompute"] > before["swap"] + before["recompute"]


def test_json_object_and_the_legacy_guided_json(api, model):
    out = api.completions.create(model=model, prompt="{", max_tokens=40, n=2, seed=1,  # vLLM takes it here too
                                 extra_body={"response_format": {"type": "json_object"}})
    for c in out.choices:
        _check_json(c.text, c.finish_reason, None)
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    out = api.completions.create(model=model, prompt="x", max_tokens=20, temperature=0,
                                 extra_body={"guided_json": schema})
    assert _check_json(out.choices[0].text, out.choices[0].finish_reason, schema)


@pytest.mark.parametrize("field, spec, check", [
    ("structured_outputs", {"regex": r"[a-c]{2,4}-[0-9]{3}"}, lambda t: re.fullmatch(r"[a-c]{2,4}-[0-9]{3}", t)),
    ("guided_regex", r"(cat|dog)s?", lambda t: re.fullmatch(r"(cat|dog)s?", t)),
    ("structured_outputs", {"choice": ["left", "right", "up \"down\""]}, lambda t: t in ("left", "right", 'up "down"')),
    ("guided_choice", ["yes", "no"], lambda t: t in ("yes", "no")),
    ("structured_outputs", {"grammar": 'start: "(" num ("," num)* ")"\nnum: /[0-9]{1,2}/'},
     lambda t: re.fullmatch(r"\([0-9]{1,2}(,[0-9]{1,2})*\)", t)),
    ("guided_grammar", 'root ::= "a" | "b" "c"', lambda t: t in ("a", "bc")),  # GBNF
])
def test_regex_choice_and_grammars_match(api, model, field, spec, check):
    for stream in (False, True):
        kwargs = dict(model=model, prompt="pick:", max_tokens=30, n=3, seed=4, extra_body={field: spec})
        if stream:
            texts = ["", "", ""]
            for chunk in api.completions.create(stream=True, **kwargs):
                for c in chunk.choices:
                    texts[c.index] += c.text
            outs = [(t, "stop") for t in texts]
        else:
            outs = [(c.text, c.finish_reason) for c in api.completions.create(**kwargs).choices]
        for text, reason in outs:
            if reason == "stop" and not stream:
                assert check(text), (field, text)
        if not stream:
            assert any(r == "stop" for _, r in outs)


@pytest.mark.parametrize("field, spec, words", [
    ("structured_outputs", {"regex": "(("}, "unclosed group"),
    ("guided_grammar", "start: nothing_here", "nothing_here"),
    ("response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"},
                                                                 "strict": True}}, "nonsense"),
    ("response_format", {"type": "yaml"}, "yaml"),
    ("structured_outputs", {"regex": "a", "choice": ["b"]}, "exactly one"),
])
def test_a_grammar_that_does_not_compile_is_a_400_naming_the_error(url, model, field, spec, words):
    response = post(url, "/v1/completions", {"model": model, "prompt": "x", field: spec})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field and words in error["message"]


def test_beam_search_with_a_grammar_is_refused(url, model):
    response = post(url, "/v1/completions", {"model": model, "prompt": "x", "max_tokens": 4, "use_beam_search": True,
                                             "best_of": 2, "guided_regex": "a+"})
    assert response.status_code == 400 and "beam search" in response.json()["error"]["message"]


def test_structured_outputs_equal_the_offline_engine(api, model, offline):
    spec = {"choice": ["one", "two", "three"]}
    out = api.completions.create(model=model, prompt="hello", max_tokens=10, temperature=0.9, seed=12, n=2,
                                 extra_body={"structured_outputs": spec})
    ref = offline.generate(["hello"], SamplingParams(max_tokens=10, temperature=0.9, seed=12, n=2,
                                                     structured_outputs=spec), use_tqdm=False)[0]
    assert [c.text for c in out.choices] == [c.text for c in ref.outputs]


# -- tool calls -------------------------------------------------------------------------------------
HERMES_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 3}}\n</tool_call>'


def _forced(text: str) -> dict:
    """A regex that only `text` matches: the random model writes exactly that."""
    return {"structured_outputs": {"regex": re.escape(text).replace("\\\n", "\n")}}


def test_hermes_tool_calls_parse_into_the_clients_objects(api, model):
    text = "Let me check." + HERMES_CALL
    out = api.chat.completions.create(model=model, messages=MESSAGES, tools=TOOLS, max_tokens=200, temperature=0,
                                      extra_body=_forced(text))
    [choice] = out.choices
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check."
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Oslo", "days": 3}
    # Streamed: content deltas, then the call in delta.tool_calls.
    content, calls, reason = "", {}, None
    for chunk in api.chat.completions.create(model=model, messages=MESSAGES, tools=TOOLS, max_tokens=200,
                                             temperature=0, stream=True, extra_body=_forced(text)):
        for c in chunk.choices:
            content += c.delta.content or ""
            for tc in c.delta.tool_calls or []:
                entry = calls.setdefault(tc.index, {"name": "", "arguments": ""})
                entry["name"] += tc.function.name or ""
                entry["arguments"] += tc.function.arguments or ""
            reason = c.finish_reason or reason
    assert content == "Let me check." and reason == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [("get_weather", {"city": "Oslo",
                                                                                                    "days": 3})]


def test_tools_reach_the_template_and_tool_messages_round_trip(url, model):
    history = [*MESSAGES,
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 1}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
    response = post(url, "/tokenize", {"model": model, "messages": history, "tools": TOOLS})
    assert response.status_code == 200, response.text
    text = post(url, "/detokenize", {"model": model, "tokens": response.json()["tokens"]}).json()["prompt"]
    assert '"name": "get_weather"' in text and "<tool_response>\nsunny, 21 C" in text
    assert '{"name": "get_weather", "arguments": {"city": "Paris", "days": 1}}' in text
    response = post(url, "/v1/chat/completions", {"model": model, "messages": history, "tools": TOOLS,
                                                  "max_tokens": 3})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("stream", [False, True])
def test_tool_choice_required_and_named(api, model, stream):
    def run(choice):
        kwargs = dict(model=model, messages=MESSAGES, tools=TOOLS, tool_choice=choice, max_tokens=60, n=2,
                      temperature=0.7, seed=3)
        if not stream:
            out = api.chat.completions.create(**kwargs)
            return [(c.message.tool_calls or [], c.finish_reason) for c in out.choices]
        calls, reasons = {0: {}, 1: {}}, {}
        for chunk in api.chat.completions.create(stream=True, **kwargs):
            for c in chunk.choices:
                for tc in c.delta.tool_calls or []:
                    entry = calls[c.index].setdefault(tc.index, {"name": "", "arguments": ""})
                    entry["name"] += (tc.function.name or "") if tc.function else ""
                    entry["arguments"] += (tc.function.arguments or "") if tc.function else ""
                reasons[c.index] = c.finish_reason or reasons.get(c.index)
        return [([openai.types.chat.ChatCompletionMessageToolCall(
            id="x", type="function", function={"name": e["name"], "arguments": e["arguments"]})
            for e in calls[i].values()], reasons[i]) for i in (0, 1)]

    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    done = 0
    for choice in ("required", {"type": "function", "function": {"name": "get_time"}}):
        for calls, reason in run(choice):
            if reason == "length":
                continue
            done += 1
            assert reason == ("tool_calls" if choice == "required" else "stop") and calls
            for call in calls:
                if choice != "required":
                    assert call.function.name == "get_time"
                jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
    assert done >= 1


def test_tool_choice_auto_needs_a_known_format_and_none_ignores_tools(tiny_model, tmp_path):
    with running_http_server(tiny_model(max_position_embeddings=1024), "--num-device-blocks", "64",
                             log_path=str(tmp_path / "log")) as (_, url):
        body = {"messages": MESSAGES, "tools": TOOLS, "max_tokens": 2}
        response = post(url, "/v1/chat/completions", body)
        assert response.status_code == 400 and response.json()["error"]["param"] == "tool_choice"
        assert post(url, "/v1/chat/completions", {**body, "tool_choice": "none"}).status_code == 200
        assert post(url, "/v1/chat/completions", {**body, "tool_choice": "required"}).status_code == 200


@pytest.fixture(scope="module")
def llama3_url(tiny_model, tmp_path_factory):
    import shutil

    target = tmp_path_factory.mktemp("llama3") / "llama3-tiny"
    shutil.copytree(tiny_model(max_position_embeddings=1024, seed=5), target)
    _with_template(str(target), LLAMA3)
    with running_http_server(str(target), "--num-device-blocks", "300", "--block-size", "4",
                             log_path=str(tmp_path_factory.mktemp("l3") / "log")) as (_, url):
        yield url


def test_llama3_json_tool_calls(llama3_url):
    with openai.OpenAI(base_url=f"{llama3_url}/v1", api_key="unused", max_retries=0, timeout=120) as api:
        model = api.models.list().data[0].id
        text = '{"name": "get_time", "parameters": {"zone": "CET"}}'
        out = api.chat.completions.create(model=model, messages=MESSAGES, tools=TOOLS, max_tokens=60,
                                          temperature=0, extra_body=_forced(text))
        [call] = out.choices[0].message.tool_calls
        assert out.choices[0].finish_reason == "tool_calls" and out.choices[0].message.content is None
        assert call.function.name == "get_time" and json.loads(call.function.arguments) == {"zone": "CET"}
        calls = []
        for chunk in api.chat.completions.create(model=model, messages=MESSAGES, tools=TOOLS, max_tokens=60,
                                                 temperature=0, stream=True, extra_body=_forced(text)):
            for c in chunk.choices:
                assert not c.delta.content
                calls += c.delta.tool_calls or []
        assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [("get_time", {"zone": "CET"})]
        # Plain text stays content.
        out = api.chat.completions.create(model=model, messages=MESSAGES, tools=TOOLS, max_tokens=20,
                                          temperature=0, extra_body=_forced("no call"))
        assert out.choices[0].message.content == "no call" and not out.choices[0].message.tool_calls


# -- sampling controls --------------------------------------------------------------------------------
CONTROLS = {"presence_penalty": 1.2, "frequency_penalty": 0.6, "logit_bias": {"17": 5, "40": -100},
            "extra_body": {"repetition_penalty": 1.4, "min_tokens": 6}}


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_penalties_logit_bias_and_min_tokens_equal_offline(api, model, offline, temperature):
    extra = CONTROLS["extra_body"]
    out = api.completions.create(model=model, prompt="hello world", max_tokens=14, temperature=temperature,
                                 seed=9, n=2, presence_penalty=CONTROLS["presence_penalty"],
                                 frequency_penalty=CONTROLS["frequency_penalty"], logit_bias=CONTROLS["logit_bias"],
                                 extra_body=extra)
    params = SamplingParams(max_tokens=14, temperature=temperature, seed=9, n=2, presence_penalty=1.2,
                            frequency_penalty=0.6, logit_bias={17: 5, 40: -100}, **extra)
    ref = offline.generate(["hello world"], params, use_tqdm=False)[0]
    assert [c.text for c in out.choices] == [c.text for c in ref.outputs]
    plain = offline.generate(["hello world"], SamplingParams(max_tokens=14, temperature=temperature, seed=9, n=2),
                             use_tqdm=False)[0]
    assert [c.token_ids for c in ref.outputs] != [c.token_ids for c in plain.outputs]  # they do something
    assert all(40 not in c.token_ids for c in ref.outputs)


def test_include_stop_str_in_output_and_echo(api, model, offline):
    plain = offline.generate(["a b"], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
                             use_tqdm=False)[0].outputs[0].text
    stop = plain[3:5]
    kept = api.completions.create(model=model, prompt="a b", max_tokens=12, temperature=0, stop=[stop],
                                  extra_body={"include_stop_str_in_output": True, "ignore_eos": True})
    cut = api.completions.create(model=model, prompt="a b", max_tokens=12, temperature=0, stop=[stop],
                                 extra_body={"ignore_eos": True})
    assert kept.choices[0].text == cut.choices[0].text + stop and kept.choices[0].text.endswith(stop)
    echoed = api.completions.create(model=model, prompt="a b", max_tokens=5, temperature=0, echo=True)
    assert echoed.choices[0].text == "a b" + plain[:len(echoed.choices[0].text) - 3]
    streamed = "".join(c.choices[0].text for c in api.completions.create(
        model=model, prompt=[5, 6, 7], max_tokens=5, temperature=0, echo=True, stream=True) if c.choices)
    assert streamed.startswith(offline.tokenizer.decode([5, 6, 7]))


def test_tokenize_and_detokenize(url, model, offline):
    response = post(url, "/tokenize", {"model": model, "prompt": "hello world", "return_token_strs": True})
    body = response.json()
    assert body["tokens"] == offline.tokenizer.encode("hello world") and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == 1024 and len(body["token_strs"]) == body["count"]
    assert post(url, "/detokenize", {"model": model, "tokens": body["tokens"]}).json() == {"prompt": "hello world"}
    chat = post(url, "/tokenize", {"model": model, "messages": MESSAGES}).json()
    text = offline.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert chat["tokens"] == offline.tokenizer.encode(text, add_special_tokens=False)
    cont = post(url, "/tokenize", {"model": model, "continue_final_message": True, "add_generation_prompt": False,
                                   "messages": [*MESSAGES, {"role": "assistant", "content": "It is"}]}).json()
    assert offline.tokenizer.decode(cont["tokens"]).endswith("It is")
    for path, body, param in [("/tokenize", {"prompt": "x", "extra": 1}, "extra"),
                              ("/detokenize", {"tokens": ["a"]}, "tokens"),
                              ("/detokenize", {"tokens": [10**6]}, None)]:
        response = post(url, path, body)
        assert response.status_code == 400 and response.json()["error"]["param"] == param


def test_continue_final_message(api, model, offline):
    messages = [*MESSAGES, {"role": "assistant", "content": "The weather"}]
    out = api.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0,
                                      extra_body={"continue_final_message": True, "add_generation_prompt": False})
    text = offline.tokenizer.apply_chat_template(messages, add_generation_prompt=False, continue_final_message=True)
    ref = offline.generate([offline.tokenizer.encode(text, add_special_tokens=False)],
                           SamplingParams(max_tokens=6, temperature=0), use_tqdm=False)[0]
    assert text.endswith("The weather") and out.choices[0].message.content == ref.outputs[0].text


# -- every field: works, or a 400 that names it -----------------------------------------------------
@pytest.mark.parametrize("path, extra, status", [
    ("/v1/completions", {"frobnicate": 1}, "frobnicate"),
    ("/v1/completions", {"guided_json": {"type": "object"}}, 200),
    ("/v1/completions", {"guided_regex": "a"}, 200),
    ("/v1/completions", {"guided_choice": ["a"]}, 200),
    ("/v1/completions", {"guided_grammar": 'start: "a"'}, 200),
    ("/v1/completions", {"structured_outputs": {"json": {"type": "object"}}}, 200),
    ("/v1/completions", {"include_stop_str_in_output": True}, 200),
    ("/v1/completions", {"prompt_logprobs": 1}, 200),
    ("/v1/completions", {"prompt_logprobs": 21}, "prompt_logprobs"),
    ("/v1/completions", {"truncate_prompt_tokens": 2}, 200),
    ("/v1/completions", {"echo": True}, 200),
    ("/v1/completions", {"echo": True, "logprobs": 1}, 200),
    ("/v1/completions", {"suffix": "x"}, "suffix"),
    ("/v1/completions", {"presence_penalty": 3}, "presence_penalty"),
    ("/v1/completions", {"repetition_penalty": 1.1, "frequency_penalty": -0.5}, 200),
    ("/v1/completions", {"logit_bias": {"5": 200}}, "logit_bias"),
    ("/v1/completions", {"logit_bias": {"9999999": 1}}, None),  # the engine knows the vocabulary
    ("/v1/completions", {"min_tokens": 2}, 200),
    ("/v1/completions", {"skip_special_tokens": False}, "skip_special_tokens"),
    ("/v1/completions", {"user": "u", "metadata": {"a": "b"}, "store": False}, 200),
    ("/v1/chat/completions", {"response_format": {"type": "json_object"}}, 200),
    ("/v1/chat/completions", {"continue_final_message": True}, "continue_final_message"),
    ("/v1/chat/completions", {"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ("/v1/chat/completions", {"tool_choice": "required"}, "tool_choice"),
    ("/v1/chat/completions", {"tools": [{"type": "function"}]}, "tools"),
    ("/v1/chat/completions", {"tools": TOOLS, "tool_choice": "required", "guided_regex": "a"}, "guided_regex"),
    ("/v1/chat/completions", {"functions": [{"name": "f"}]}, "functions"),
    ("/v1/chat/completions", {"chat_template_kwargs": {"x": 1}}, "chat_template_kwargs"),
    ("/v1/chat/completions", {"parallel_tool_calls": False}, 200),
    ("/v1/chat/completions", {"prompt_logprobs": 2}, 200),
    ("/v1/chat/completions", {"echo": True}, "echo"),
])
def test_every_field_works_or_is_a_400_naming_it(url, model, path, extra, status):
    source = {"prompt": "hello"} if path == "/v1/completions" else {"messages": MESSAGES}
    response = post(url, path, {"model": model, **source, "max_tokens": 4, **extra})
    if status == 200:
        assert response.status_code == 200, response.text
        return
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == status


def test_chat_messages_with_unknown_fields_are_a_400(url, model):
    response = post(url, "/v1/chat/completions", {"model": model, "messages": [
        {"role": "user", "content": "hi", "mood": "good"}], "max_tokens": 2})
    assert response.status_code == 400 and "mood" in response.json()["error"]["message"]
    # What a reply's message carries comes back null in the next turn: taken.
    response = post(url, "/v1/chat/completions", {"model": model, "max_tokens": 2, "messages": [
        *MESSAGES, {"role": "assistant", "content": "ok", "refusal": None, "tool_calls": None, "audio": None}]})
    assert response.status_code == 200, response.text
