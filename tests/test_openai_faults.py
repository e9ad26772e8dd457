"""What fuzzing the HTTP gateway found, each reproduced against a real `pagedkv serve --http-port`
process: bad input gets OpenAI's JSON error shape with a 4xx status (never a 500, a crash or a
hang), is refused before any work is done, and hurts no other request."""
from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from urllib.parse import urlparse

import httpx
import pytest
from server_process import running_gateway, running_http_server

from pagedkv.runtime.serving.client import Client

pytestmark = pytest.mark.timeout(300)
PROMPT = "hello world, this is"
MESSAGES = [{"role": "user", "content": "Say something."}]
CONTEXT = 2048


@pytest.fixture(scope="module")
def model_path(tiny_model):
    return tiny_model(max_position_embeddings=CONTEXT)


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    log = tmp_path_factory.mktemp("http-faults") / "server.log"
    with running_http_server(model_path, "--num-device-blocks", "1200", "--block-size", "4",
                             log_path=str(log)) as (proc, url):
        yield proc, url


@pytest.fixture(scope="module")
def url(server):
    return server[1]


@pytest.fixture(scope="module")
def engine(server):
    with Client(server[0].address, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def model(url):
    return httpx.get(f"{url}/v1/models", timeout=60).json()["data"][0]["id"]


def error_of(response: httpx.Response) -> dict:
    assert response.headers["content-type"].startswith("application/json"), response.text[:200]
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return body["error"]


def post(url: str, path: str, body, **kwargs) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=60, **kwargs)


def raw_exchange(url: str, request: bytes, timeout: float = 30) -> bytes:
    """Sends bytes as they are and reads until the server closes (or `timeout`)."""
    parsed = urlparse(url)
    with socket.create_connection((parsed.hostname, parsed.port), timeout=timeout) as sock:
        sock.sendall(request)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except socket.timeout:
            pass
    return b"".join(chunks)


def served_requests(engine) -> int:
    """Messages the engine has received, less the stats requests that ask."""
    return engine.stats()["server"]["messages"]


# -- 5: only JSON bodies; CORS stays closed ------------------------------------------------------
@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", None])
def test_a_body_that_is_not_declared_json_is_refused_with_415(url, model, engine, content_type):
    """A text/plain POST needs no CORS preflight: any web page could start generations on a
    loopback server with no key. It was served."""
    body = json.dumps({"model": model, "prompt": PROMPT, "max_tokens": 2}).encode()
    headers = {} if content_type is None else {"content-type": content_type}
    before = served_requests(engine)
    response = httpx.post(f"{url}/v1/completions", content=body, headers=headers, timeout=60)
    assert response.status_code == 415
    assert error_of(response)["code"] == "unsupported_media_type"
    assert served_requests(engine) == before + 1  # only the stats request above: nothing was sent


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8",
                                          "Application/JSON;charset=UTF-8"])
def test_json_with_or_without_a_charset_is_accepted(url, model, content_type):
    body = json.dumps({"model": model, "messages": MESSAGES, "max_tokens": 2}).encode()
    response = httpx.post(f"{url}/v1/chat/completions", content=body, headers={"content-type": content_type},
                          timeout=60)
    assert response.status_code == 200, response.text


def test_cors_is_closed(url, model):
    preflight = httpx.options(f"{url}/v1/completions", timeout=60,
                              headers={"origin": "https://example.com", "access-control-request-method": "POST",
                                       "access-control-request-headers": "content-type"})
    assert "access-control-allow-origin" not in preflight.headers
    simple = httpx.post(f"{url}/v1/completions", content=b'{"prompt": "x"}', timeout=60,
                        headers={"origin": "https://example.com", "content-type": "text/plain"})
    assert simple.status_code == 415 and "access-control-allow-origin" not in simple.headers


# -- 6: a client that leaves while uploading -------------------------------------------------------
def test_a_client_that_disconnects_mid_upload_costs_one_log_line(server, url, model):
    proc, _ = server
    parsed = urlparse(url)
    before = len(proc.log())
    body = json.dumps({"model": model, "prompt": PROMPT}).encode()
    for _ in range(3):
        with socket.create_connection((parsed.hostname, parsed.port)) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body) + 1000, body))
            time.sleep(0.2)  # the gateway is reading the body
    assert httpx.get(f"{url}/health", timeout=60).status_code == 200
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and proc.log()[before:].count("disconnected") < 3:
        time.sleep(0.1)
    log = proc.log()[before:]
    assert "Traceback" not in log and "internal error" not in log, log
    assert log.count("disconnected while sending its request") == 3, log


# -- 9: broken HTTP framing ------------------------------------------------------------------------
@pytest.mark.parametrize("request_bytes", [
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: twelve\r\n\r\n{}",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
    b"GARBAGE\r\n\r\n",
], ids=["length-not-a-number", "two-lengths", "no-request-line"])
def test_broken_http_framing_gets_a_json_error(url, request_bytes):
    raw = raw_exchange(url, request_bytes)
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (h.split(":", 1) for h in header_lines)}
    assert status_line.startswith("HTTP/1.1 400"), raw[:300]
    assert headers["content-type"].startswith("application/json")
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"


# -- 4: integers beyond 64 bits, lone surrogates, deep nesting -------------------------------------
def post_raw_json(url: str, path: str, text: str) -> httpx.Response:
    """JSON text as written (json.dumps escapes a lone surrogate as \\ud800, which httpx's own
    encoder cannot send)."""
    return httpx.post(f"{url}{path}", content=text.encode(), headers={"content-type": "application/json"},
                      timeout=60)


@pytest.mark.parametrize("value", [2**64, -2**63 - 1, 2**63], ids=["2**64", "-2**63-1", "2**63"])
@pytest.mark.parametrize("field", ["max_tokens", "seed", "top_k", "n", "best_of", "beam_width"])
def test_integers_beyond_64_bits_are_a_400_that_names_them(url, model, engine, field, value):
    before = served_requests(engine)
    response = post(url, "/v1/completions", {"model": model, "prompt": PROMPT, field: value})
    assert response.status_code == 400, response.text
    assert error_of(response)["param"] == field
    assert served_requests(engine) == before + 1  # refused before anything reached the engine


@pytest.mark.parametrize("body, param", [
    ({"prompt": [5, 2**64]}, "prompt"),
    ({"prompt": [[5], [-2**63 - 1]]}, "prompt"),
    ({"prompt": PROMPT, "stop_token_ids": [2**64]}, "stop_token_ids"),
    ({"prompt": PROMPT, "max_tokens": 2, "logprobs": 2**64}, "logprobs"),
], ids=["prompt ids", "prompt id lists", "stop_token_ids", "logprobs"])
def test_huge_integers_in_lists_and_elsewhere_are_a_400(url, model, body, param):
    response = post(url, "/v1/completions", {"model": model, **body})
    assert response.status_code == 400, response.text
    assert error_of(response)["param"] == param


def test_a_valid_number_sent_as_a_huge_integer_is_served(url, model):
    """A temperature of 10**30 is valid (the sampler takes it as a float); the integer itself
    cannot travel to the engine."""
    response = post(url, "/v1/completions", {"model": model, "prompt": PROMPT, "max_tokens": 2,
                                             "temperature": 10**30})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": "a\ud800b"}, "prompt"),
    ("/v1/completions", {"prompt": ["ok", "\udfff"]}, "prompt"),
    ("/v1/completions", {"prompt": PROMPT, "stop": ["\ud800"]}, "stop"),
    ("/v1/completions", {"prompt": PROMPT, "model": "m\ud800"}, "model"),
    ("/v1/completions", {"prompt": PROMPT, "user": "\ud800"}, "user"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\ud800"}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]},
     "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "us\ud800er", "content": "hi"}]}, "messages"),
], ids=["prompt", "prompt list", "stop", "model", "ignored field", "content", "content part", "role"])
def test_lone_surrogates_are_a_400(url, model, path, body, param):
    response = post_raw_json(url, path, json.dumps({"model": model, **body}))
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["param"] == param and "surrogate" in error["message"]


@pytest.mark.parametrize("raw", [
    b'{"prompt": "a\xed\xa0\x80b"}',                           # the UTF-8 bytes of U+D800
    '{"prompt": "a\ud800b"}'.encode("utf-16-le", "surrogatepass"),  # UTF-16, surrogate and all
    b'{"prompt": "caf\xe9"}',                                    # Latin-1
], ids=["surrogate bytes", "utf-16", "latin-1"])
def test_a_body_that_is_not_utf8_is_a_400(url, raw):
    response = httpx.post(f"{url}/v1/completions", content=raw, headers={"content-type": "application/json"},
                          timeout=60)
    assert response.status_code == 400 and "UTF-8" in error_of(response)["message"]


def test_emoji_written_as_surrogate_pairs_are_text(url, model):
    response = post_raw_json(url, "/v1/completions", json.dumps({"model": model, "prompt": "hi 🙂",
                                                                 "max_tokens": 2, "stop": ["🙂"]}))
    assert response.status_code == 200, response.text


def test_a_lone_surrogate_in_a_field_name_is_a_400(url, model):
    response = post_raw_json(url, "/v1/completions", json.dumps({"model": model, "prompt": PROMPT, "\ud800": 1}))
    assert response.status_code == 400 and "surrogate" in error_of(response)["message"]


@pytest.mark.parametrize("depth", [100, 10_000])
@pytest.mark.parametrize("where", ["prompt", "stop", "messages", "user"])
def test_deeply_nested_json_is_a_400(url, model, where, depth):
    deep = "[" * depth + "]" * depth
    path = "/v1/chat/completions" if where == "messages" else "/v1/completions"
    source = "" if where in ("prompt", "messages") else ', "prompt": "x"'
    response = post_raw_json(url, path, f'{{"model": {json.dumps(model)}{source}, "{where}": {deep}}}')
    if where == "user" and depth == 100:  # an ignored field: nothing reads it, as in vLLM
        assert response.status_code == 200, response.text
        return
    assert response.status_code == 400, response.text
    assert error_of(response)["type"] == "invalid_request_error"


# -- 8: chat roles ---------------------------------------------------------------------------------
@pytest.mark.parametrize("role", ["<|im_end|>", "root", "User", "", "system\n"])
def test_a_role_the_api_does_not_define_is_a_400_naming_it(url, model, engine, role):
    """Roles were rendered into the chat template verbatim, control tokens included."""
    before = served_requests(engine)
    response = post(url, "/v1/chat/completions", {"model": model, "max_tokens": 2,
                                                  "messages": [{"role": role, "content": "hi"}]})
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["param"] == "messages" and repr(role) in error["message"]
    assert served_requests(engine) == before + 1


@pytest.mark.parametrize("role", ["system", "developer", "user", "assistant", "tool", "function"])
def test_the_roles_the_api_defines_are_served(url, model, role):
    messages = [{"role": role, "content": "hi"}, {"role": "user", "content": "Say something."}]
    response = post(url, "/v1/chat/completions", {"model": model, "messages": messages, "max_tokens": 2})
    assert response.status_code == 200, response.text


# -- 1: fan-out ------------------------------------------------------------------------------------
def test_a_prompt_list_of_20000_is_refused_at_once_and_sends_nothing(url, model, engine):
    """It held up every other client for about 20 s (20,000 engine requests, most refused as
    overloaded) and grew the gateway from 39 to 240 MiB."""
    before = served_requests(engine)
    response = post(url, "/v1/completions", {"model": model, "prompt": ["hello"] * 20_000, "max_tokens": 1})
    assert response.status_code == 400 and error_of(response)["param"] == "prompt"
    assert "256" in error_of(response)["message"]
    assert served_requests(engine) == before + 1  # nothing reached the engine but this count's own question


@pytest.mark.parametrize("body, param", [
    ({"prompt": ["hello"] * 257}, "prompt"),
    ({"prompt": [[5, 6]] * 257}, "prompt"),
    ({"prompt": ["a", "b"], "n": 129}, "n"),
    ({"prompt": PROMPT, "n": 2, "best_of": 257}, "best_of"),
    ({"prompt": ["a"] * 16, "n": 17}, "n"),
    ({"prompt": PROMPT, "beam_width": 300, "max_tokens": 4}, "beam_width"),
    ({"prompt": PROMPT, "n": 2**62}, "n"),
], ids=["257 prompts", "257 token prompts", "2 x n 129", "best_of 257", "16 x n 17", "beam 300", "n 2**62"])
def test_more_than_256_sequences_per_request_are_refused_before_anything_is_sent(url, model, engine, body, param):
    before = served_requests(engine)
    response = post(url, "/v1/completions", {"model": model, "max_tokens": 1, **body})
    assert response.status_code == 400, response.text
    assert error_of(response)["param"] == param
    assert served_requests(engine) == before + 1


def test_256_sequences_are_served(url, model):
    response = post(url, "/v1/completions", {"model": model, "prompt": ["hello"] * 64, "n": 4, "max_tokens": 1})
    assert response.status_code == 200, response.text
    assert len(response.json()["choices"]) == 256


def test_a_chat_of_more_messages_than_the_context_holds_is_refused_before_they_are_read(url, model, engine):
    before = served_requests(engine)
    messages = [{"role": "user", "content": ""}] * (CONTEXT + 1)
    response = post(url, "/v1/chat/completions", {"model": model, "messages": messages, "max_tokens": 1})
    assert response.status_code == 413 and error_of(response)["code"] == "context_length_exceeded"
    assert served_requests(engine) == before + 1


def test_a_token_prompt_longer_than_the_context_is_refused_before_its_ids_are_read(url, model, engine):
    before = served_requests(engine)
    for prompt in ([5] * (CONTEXT + 1), [[5] * (CONTEXT + 1)], [[5], [5] * CONTEXT]):
        response = post(url, "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": 1})
        assert response.status_code == 413 and error_of(response)["code"] == "context_length_exceeded"
        assert str(CONTEXT) in error_of(response)["message"]
    assert served_requests(engine) == before + 1


# -- 2: stop lists ---------------------------------------------------------------------------------
@pytest.mark.parametrize("body, words", [
    ({"stop": [f"s{i}" for i in range(300_000)]}, "at most 64"),
    ({"prompt": ["a", "b", "c", "d"], "stop": [f"stop string {i}" for i in range(30_000)]}, "at most 64"),
    ({"stop": ["x" * 257]}, "at most 256 characters"),
    ({"stop_token_ids": list(range(1025))}, "at most 1024"),
], ids=["300k strings", "30k strings over a prompt list", "a 257-character string", "1025 token ids"])
def test_stop_lists_are_bounded(url, model, engine, body, words):
    """300,000 stop strings slowed every other request 13-fold (each token searched the text for
    each of them), and a megabyte of them over a prompt list took 1.3 GiB of the engine."""
    before = served_requests(engine)
    response = post(url, "/v1/completions", {"model": model, "prompt": PROMPT, "max_tokens": 2, **body})
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["param"] == ("stop_token_ids" if "stop_token_ids" in body else "stop") and words in error["message"]
    assert served_requests(engine) == before + 1


def test_the_most_stop_strings_allowed_are_served(url, model):
    stops = [f"{i:03d}" + "q" * 250 for i in range(64)]
    response = post(url, "/v1/completions", {"model": model, "prompt": PROMPT, "max_tokens": 4, "stop": stops,
                                             "stop_token_ids": list(range(1024))})
    assert response.status_code == 200, response.text


# -- 7: max_tokens beyond the context ------------------------------------------------------------
@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": [5] * 10, "max_tokens": CONTEXT - 9}, "max_tokens"),
    ("/v1/completions", {"prompt": [5] * (CONTEXT - 5)}, "max_tokens"),  # completions' default, 16
    ("/v1/completions", {"prompt": [[5], [5] * 10], "max_tokens": CONTEXT - 9}, "max_tokens"),
    ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": CONTEXT}, "max_tokens"),
    ("/v1/chat/completions", {"messages": MESSAGES, "max_completion_tokens": CONTEXT}, "max_completion_tokens"),
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": 2**63 - 1}, "max_tokens"),
], ids=["token prompt", "the default", "one of two prompts", "chat", "max_completion_tokens", "2**63 - 1"])
def test_max_tokens_beyond_the_context_left_is_a_400_naming_the_numbers(url, model, path, body, param):
    """It was silently clamped; OpenAI and vLLM refuse it."""
    response = post(url, path, {"model": model, **body})
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["param"] == param and str(CONTEXT) in error["message"]
    if path == "/v1/completions" and isinstance(body["prompt"][0], int):
        wanted = body.get("max_tokens", 16)
        assert f"{wanted} > {CONTEXT} - {len(body['prompt'])}" in error["message"]


def test_max_tokens_that_fill_the_context_exactly_are_served(url, model):
    response = post(url, "/v1/completions", {"model": model, "prompt": [5] * (CONTEXT - 3), "max_tokens": 3,
                                             "ignore_eos": True})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 3


# -- 3: long requests and the gateway's --timeout --------------------------------------------------
@pytest.fixture(scope="module")
def impatient(server, tmp_path_factory):
    """A second gateway in front of the same engine, with a timeout far shorter than a long request."""
    log = tmp_path_factory.mktemp("impatient") / "gateway.log"
    with running_gateway(server[0].address, "--timeout", str(TIMEOUT), log_path=str(log)) as (_, gateway_url):
        yield gateway_url


TIMEOUT = 0.2
LONG = {"prompt": [5, 6, 7], "max_tokens": 2000, "ignore_eos": True, "temperature": 0}  # a second or more


def test_a_request_the_engine_works_on_outlives_the_timeout(impatient, model, engine):
    """It got a 503 "the engine did not answer" after --timeout, and its work was thrown away."""
    started = time.monotonic()
    response = post(impatient, "/v1/completions", {"model": model, **LONG})
    took = time.monotonic() - started
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == LONG["max_tokens"]
    assert took > 3 * TIMEOUT, f"{took:.2f} s: too short to show anything"


def test_a_silent_stream_outlives_the_timeout(impatient, model):
    """Beam search streams its tokens only when it ends."""
    body = {"model": model, **LONG, "max_tokens": 1800, "beam_width": 2, "stream": True}  # 600 took 0.59 s
    started = time.monotonic()
    with httpx.stream("POST", f"{impatient}/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        text = response.read().decode()
    assert text.rstrip().endswith("data: [DONE]") and '"error"' not in text, text[-300:]
    assert time.monotonic() - started > 3 * TIMEOUT


def test_an_engine_that_stops_answering_gets_a_503_and_the_request_is_aborted(server, impatient, model, engine):
    proc, _ = server
    result: dict = {}

    def ask():
        result["response"] = post(impatient, "/v1/completions", {"model": model, **LONG})

    thread = threading.Thread(target=ask)
    before = engine.stats()["generated_tokens"]
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while engine.stats()["server"]["in_flight"] == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(proc.process.pid, signal.SIGSTOP)  # the engine hangs with the request in flight
        thread.join(30)
    finally:
        os.kill(proc.process.pid, signal.SIGCONT)
    response = result["response"]
    assert response.status_code == 503 and error_of(response)["code"] == "engine_unavailable"
    assert "did not answer" in error_of(response)["message"]
    deadline = time.monotonic() + 30  # back: the abort the gateway sent ends the request
    while (stats := engine.stats())["server"]["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stats["server"]["in_flight"] == 0 and stats["blocks"]["device"]["used"] == 0
    assert stats["generated_tokens"] - before < LONG["max_tokens"]
