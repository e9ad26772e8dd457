"""What fuzzing the server found, each reproduced against a real `pagedkv serve` process: bad
input gets a short `error` reply with the request's id, and hurts no other request."""
import json
import shutil
import threading
import time

import msgpack
import pytest
import zmq
from server_process import running_server

from pagedkv.runtime.cli.main import main
from pagedkv.runtime.engine.llm import LLM
from pagedkv.runtime.engine.sampling_params import SamplingParams
from pagedkv.runtime.serving.client import Client, ServerError

pytestmark = pytest.mark.timeout(300)
PROMPT = [5, 17, 42, 99, 7, 300, 12]
LONG = {"max_tokens": 150, "temperature": 0.0, "ignore_eos": True}


SHIPPED = {"temperature": 0.7, "top_k": 5}  # the model's own sampling settings


@pytest.fixture(scope="module")
def model_path(tiny_model, tmp_path_factory):
    """The tiny model with a generation_config.json that asks for sampling."""
    folder = tmp_path_factory.mktemp("shipped") / "model"
    shutil.copytree(tiny_model(), folder)
    (folder / "generation_config.json").write_text(json.dumps({"do_sample": True, **SHIPPED}))
    return str(folder)


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    log = tmp_path_factory.mktemp("faults") / "server.log"
    with running_server(model_path, "--num-device-blocks", "256", "--block-size", "4",
                        "--max-message-mib", "8", log_path=str(log)) as proc:
        yield proc


@pytest.fixture(scope="module")
def offline(model_path):
    return LLM(model=model_path, num_device_blocks=512, block_size=4)


def _raw(server):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server.address)
    return sock


def _pack(message):
    return msgpack.packb(message, use_bin_type=True)


def _reply(sock, timeout=60):
    assert sock.poll(timeout * 1000), "no reply"
    frames = sock.recv_multipart()
    assert len(frames) == 1, frames
    return msgpack.unpackb(frames[0], raw=False, strict_map_key=False)


def _terminal(sock, request_id, timeout=120):
    """Skips token replies up to the request's final or error reply."""
    while True:
        reply = _reply(sock, timeout)
        if reply["id"] == request_id and reply["type"] != "token":
            return reply


def _idle(client, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = client.stats()
        if stats["server"]["in_flight"] == 0 and stats["blocks"]["device"]["used"] == 0:
            return stats
        time.sleep(0.05)
    raise AssertionError(f"still busy: {stats}")


POISON = {
    "top_p 0 in float32 (1)": {"top_p": 1e-46},
    "length_penalty 300 (2)": {"beam_width": 2, "length_penalty": 300, "max_tokens": 40},
    "length_penalty 1e308 (2)": {"beam_width": 2, "length_penalty": 1e308, "max_tokens": 40},
    "never with 400 (2)": {"beam_width": 2, "length_penalty": 400, "early_stopping": "never", "max_tokens": 40},
}


@pytest.mark.parametrize("case", list(POISON))
def test_poisoned_parameters_are_refused_and_hurt_no_request_in_flight(server, offline, case):
    """Failures 1 and 2: these made the step raise, and every request in flight, from every
    client, got an `internal` error."""
    other, sock = _raw(server), _raw(server)
    try:
        other.send(_pack({"type": "generate", "id": "bystander", "prompt_ids": PROMPT, "params": LONG,
                          "stream": True}))
        assert _reply(other)["type"] == "token"  # it is running
        sock.send(_pack({"type": "generate", "id": 5, "prompt_ids": [5], "params": POISON[case]}))
        reply = _reply(sock)
        assert (reply["type"], reply["id"], reply["code"]) == ("error", 5, "bad_request"), reply
        name = "top_p" if "top_p" in POISON[case] else "length_penalty"
        assert name in reply["message"]
        final = _terminal(other, "bystander")
        expected = offline.generate([PROMPT], SamplingParams(**LONG), use_tqdm=False)[0].outputs[0]
        assert final["type"] == "final" and final["outputs"][0]["token_ids"] == expected.token_ids
    finally:
        other.close()
        sock.close()


OUT_OF_RANGE = {
    "top_k 2**64 - 1": ({"top_k": 2**64 - 1}, "top_k"),
    "seed 2**64 - 1": ({"seed": 2**64 - 1}, "seed"),
    "max_tokens 2**63": ({"max_tokens": 2**63}, "max_tokens"),
    "n 2**63": ({"n": 2**63}, "n"),
    "stop_token_ids [2**64 - 1]": ({"stop_token_ids": [2**64 - 1]}, "stop_token_ids"),
}


@pytest.mark.parametrize("case", list(OUT_OF_RANGE))
def test_integers_beyond_int64_are_refused_and_hurt_no_request_in_flight(server, offline, case):
    """msgpack carries integers up to 2**64 - 1; the parameters are signed 64-bit (as in vLLM),
    and the largest ones failed in the sampler's tensors or in the gateway's encoder."""
    params, name = OUT_OF_RANGE[case]
    other, sock = _raw(server), _raw(server)
    try:
        other.send(_pack({"type": "generate", "id": "bystander", "prompt_ids": PROMPT, "params": LONG,
                          "stream": True}))
        assert _reply(other)["type"] == "token"
        sock.send(_pack({"type": "generate", "id": 6, "prompt_ids": [5, 6], "params": params}))
        reply = _reply(sock)
        assert (reply["type"], reply["id"], reply["code"]) == ("error", 6, "bad_request"), reply
        assert name in reply["message"]
        sock.send(_pack({"type": "generate", "id": 7, "prompt_ids": [5, 2**64 - 1]}))
        reply = _reply(sock)
        assert (reply["type"], reply["id"], reply["code"]) == ("error", 7, "bad_request"), reply
        final = _terminal(other, "bystander")
        expected = offline.generate([PROMPT], SamplingParams(**LONG), use_tqdm=False)[0].outputs[0]
        assert final["type"] == "final" and final["outputs"][0]["token_ids"] == expected.token_ids
    finally:
        other.close()
        sock.close()


def test_a_string_that_is_not_utf8_is_refused(server):
    """A lone surrogate's bytes (ED A0 80) in the prompt: msgpack cannot decode the message."""
    sock = _raw(server)
    try:
        placeholder = "\x00PLACEHOLDER\x00"
        payload = _pack({"type": "generate", "id": 9, "prompt": placeholder}).replace(
            _pack(placeholder), b"\xa5a\xed\xa0\x80b")
        sock.send(payload)
        reply = _reply(sock)
        assert (reply["type"], reply["code"]) == ("error", "bad_request"), reply
        with Client(server.address, timeout=60) as client:
            assert len(client.generate(prompt_ids=PROMPT, max_tokens=3)["outputs"][0]["token_ids"]) == 3
    finally:
        sock.close()


@pytest.mark.parametrize("params, words", [
    ({"stop": [f"s{i}" for i in range(300_000)]}, "at most 64"),
    ({"stop": ["x" * 100_000]}, "at most 256 characters"),
    ({"stop_token_ids": list(range(100_000))}, "at most 1024"),
], ids=["300k stop strings", "a long stop string", "100k stop token ids"])
def test_stop_lists_are_bounded(server, params, words):
    """Each token searched the text for each stop string: 300,000 of them slowed every request."""
    sock = _raw(server)
    try:
        sock.send(_pack({"type": "generate", "id": "stops", "prompt_ids": PROMPT, "params": params}))
        reply = _reply(sock)
        assert (reply["type"], reply["id"], reply["code"]) == ("error", "stops", "bad_request"), reply
        assert words in reply["message"] and len(reply["message"]) < 500
    finally:
        sock.close()


def test_max_tokens_beyond_the_context_is_refused_when_asked(server):
    """`clamp_max_tokens: false`, which the HTTP gateway sends, as OpenAI's API refuses what the
    context cannot hold; without it generation ends at the context."""
    with Client(server.address, timeout=60) as client:
        context = client.health()["max_model_len"]
        sock = _raw(server)
        try:
            sock.send(_pack({"type": "generate", "id": "m", "prompt_ids": PROMPT, "clamp_max_tokens": False,
                             "params": {"max_tokens": context - len(PROMPT) + 1}}))
            reply = _reply(sock)
            assert (reply["type"], reply["code"], reply["param"]) == ("error", "bad_request", "max_tokens"), reply
            assert f"{context - len(PROMPT) + 1} > {context} - {len(PROMPT)}" in reply["message"]
            sock.send(_pack({"type": "generate", "id": "c", "prompt_ids": PROMPT, "stream": True,
                             "params": {"max_tokens": context - len(PROMPT) + 1}}))
            assert _reply(sock)["type"] == "token"  # accepted: it would end at the context
            sock.send(_pack({"type": "abort", "id": "c"}))
            assert _terminal(sock, "c")["code"] == "aborted"
        finally:
            sock.close()


def test_health_says_which_requests_are_in_flight_on_the_connection(server):
    """What a client that waits long for a reply asks (AsyncClient's probe)."""
    sock, other = _raw(server), _raw(server)
    try:
        sock.send(_pack({"type": "generate", "id": "g", "prompt_ids": PROMPT, "params": LONG, "stream": True}))
        assert _reply(sock)["type"] == "token"
        sock.send(_pack({"type": "health", "id": "h", "requests": ["g", "nothing", 5]}))
        assert _terminal(sock, "h")["health"]["requests"] == ["g"]
        other.send(_pack({"type": "health", "id": "h", "requests": ["g"]}))  # another connection's "g"
        assert _terminal(other, "h")["health"]["requests"] == []
        sock.send(_pack({"type": "abort", "id": "g"}))
        assert _terminal(sock, "g")["code"] == "aborted"
        sock.send(_pack({"type": "health", "id": "h2", "requests": ["g"]}))
        assert _terminal(sock, "h2")["health"]["requests"] == []
    finally:
        sock.close()
        other.close()


def test_negative_length_penalty_gets_outputs(server):
    """Failure 4: a `final` reply with `outputs: []`."""
    with Client(server.address, timeout=60) as client:
        final = client.generate(prompt_ids=[5, 6, 7], beam_width=2, n=2, length_penalty=-5, max_tokens=32)
    assert len(final["outputs"]) == 2 and all(o["token_ids"] for o in final["outputs"])


@pytest.mark.parametrize("where", ["type", "stream", "temperature", "stop"])
def test_deep_nesting_is_a_bad_request_with_the_request_id(server, where):
    """Failure 3: RecursionError while building the error message gave `internal`, id null."""
    deep: list = []
    for _ in range(1000):
        deep = [deep]
    message = {"type": "generate", "id": "deep", "prompt_ids": PROMPT, "params": {}}
    if where in ("type", "stream"):
        message[where] = deep
    else:
        message["params"][where] = deep
    sock = _raw(server)
    try:
        sock.send(_pack(message))
        reply = _reply(sock)
        assert (reply["type"], reply["id"], reply["code"]) == ("error", "deep", "bad_request"), reply
    finally:
        sock.close()


def test_error_replies_and_log_lines_quote_a_huge_value_briefly(server):
    """Failure 6: a 15 MiB string as temperature gave a 15.7 MB reply and as much log."""
    sock = _raw(server)
    log_before = len(server.log())
    try:
        sock.send(_pack({"type": "generate", "id": "big", "prompt_ids": PROMPT,
                         "params": {"temperature": "9" * (5 * 2**20)}}))
        assert sock.poll(60_000)
        raw = sock.recv()
        reply = msgpack.unpackb(raw, raw=False)
        assert (reply["id"], reply["code"]) == ("big", "bad_request") and "temperature" in reply["message"]
        assert len(raw) < 2000
    finally:
        sock.close()
    with Client(server.address, timeout=30) as client:
        client.health()  # the server has written its log line by now
    assert len(server.log()) - log_before < 5000


@pytest.mark.parametrize("chat", ["a 6 MiB role", "200,000 empty messages"])
def test_huge_chats_are_refused_before_the_template_runs(server, chat):
    """Failure 5: the size check counted only `content`; rendering and tokenizing stalled the
    loop for every client. Refused by counting what was sent, the reply says so."""
    if chat == "a 6 MiB role":
        messages = [{"role": "r" * (6 * 2**20), "content": "hi"}]
    else:
        messages = [{"role": "", "content": ""}] * 200_000
    sock = _raw(server)
    try:
        sock.send(_pack({"type": "generate", "id": "chat", "messages": messages}))
        reply = _reply(sock)
        assert (reply["type"], reply["id"], reply["code"]) == ("error", "chat", "too_long"), reply
        assert ("characters" if "role" in chat else "messages") in reply["message"]
    finally:
        sock.close()


def test_a_client_that_sends_and_closes_at_once_is_aborted(server):
    """Failure 7: 34 of 40 such requests ran to completion."""
    clients, max_tokens = 12, 1500
    with Client(server.address, timeout=60) as observer:
        stats = _idle(observer)
        before, seen = stats["generated_tokens"], stats["server"]["messages"]
        for i in range(clients):
            sock = zmq.Context.instance().socket(zmq.DEALER)
            sock.connect(server.address)
            sock.send(_pack({"type": "generate", "id": i, "prompt_ids": PROMPT,
                             "params": {"max_tokens": max_tokens, "ignore_eos": True, "temperature": 0.0}}))
            sock.close(linger=2000)  # sends what is queued, then closes: no delay in between
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # until the server has received all of them
            stats = observer.stats()
            seen += 1  # this stats request itself
            if stats["server"]["messages"] - seen >= clients:
                break
            time.sleep(0.05)
        assert stats["server"]["messages"] - seen == clients
        stats = _idle(observer, timeout=240)
    generated = stats["generated_tokens"] - before
    assert generated < clients * max_tokens / 4, f"{generated} tokens generated for clients that had gone"


def test_ids_are_unique_among_a_connections_messages_in_flight_whatever_their_type(server):
    """Failure 8: a `stats` or `health` reusing the id of an in-flight `generate` was answered,
    giving that id several terminal replies."""
    sock = _raw(server)
    try:
        sock.send(_pack({"type": "generate", "id": 7, "prompt_ids": PROMPT, "params": LONG, "stream": True}))
        assert _reply(sock)["type"] == "token"
        for kind in ("stats", "health"):
            sock.send(_pack({"type": kind, "id": 7}))
            while (reply := _reply(sock))["type"] == "token":
                pass
            assert (reply["type"], reply["id"], reply["code"]) == ("error", 7, "bad_request"), reply
            assert "already in flight" in reply["message"] and kind not in reply
        sock.send(_pack({"type": "abort", "id": 7}))
        assert _terminal(sock, 7)["code"] == "aborted"
        sock.send(_pack({"type": "stats", "id": 7}))  # no longer in flight: fine again
        assert _terminal(sock, 7)["type"] == "final"
    finally:
        sock.close()


def test_a_message_of_several_frames_is_refused(server):
    """Failure 9: the leading frames were echoed back as routing."""
    sock = _raw(server)
    try:
        good = {"type": "generate", "id": "f", "prompt_ids": PROMPT, "params": {"max_tokens": 2}}
        sock.send_multipart([b"junk", _pack(good)])
        reply = _reply(sock)  # one frame, not [b"junk", reply]
        assert (reply["type"], reply["code"]) == ("error", "bad_request") and "frame" in reply["message"]
        sock.send(_pack(good))
        assert _reply(sock)["type"] == "final"
    finally:
        sock.close()


def test_a_failed_model_step_aborts_the_batch_says_why_and_the_next_requests_are_served(model_path, caplog):
    """In-process: the model step raises once; the requests in flight get `internal` errors,
    the log names the cause, and the server goes on serving."""
    from pagedkv.runtime.engine.config import EngineConfig
    from pagedkv.runtime.engine.llm_engine import LLMEngine
    from pagedkv.runtime.serving.server import Server, ServerConfig

    engine = LLMEngine(EngineConfig(model=model_path, num_device_blocks=64, block_size=4))
    server = Server(engine, ServerConfig("tcp://127.0.0.1:*"))
    execute, calls = engine.executor.execute, []

    def flaky(out):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected device fault")
        return execute(out)

    engine.executor.execute = flaky
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    with caplog.at_level("ERROR", logger="pagedkv.server"):
        thread.start()
        try:
            with Client(server.endpoint, timeout=60) as client:
                with pytest.raises(ServerError) as e:
                    client.generate(prompt_ids=PROMPT, max_tokens=20, temperature=0.0)
                assert e.value.code == "internal" and "injected device fault" in e.value.message
                final = client.generate(prompt_ids=PROMPT, max_tokens=5, temperature=0.0)
                assert len(final["outputs"][0]["token_ids"]) == 5
                assert client.stats()["blocks"]["device"]["used"] == 0
        finally:
            server.stop()
            thread.join(30)
    assert "injected device fault" in caplog.text


def test_chat_samples_with_the_models_own_settings(server, offline, monkeypatch, capsys):
    """`chat` leaves greedy decoding to those who ask: unset flags take the settings the model
    ships (generation_config.json here), which the server reports in `health`."""
    with Client(server.address, timeout=30) as client:
        assert client.health()["sampling_defaults"] == SHIPPED
    lines = iter(["Hi there.", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", "--address", server.address, "--max-tokens", "6", "--seed", "2"]) == 0
    expected = offline.chat([{"role": "user", "content": "Hi there."}], SamplingParams(max_tokens=6, seed=2, **SHIPPED))
    assert capsys.readouterr().out == f"model> {expected.outputs[0].text}\n"


def test_async_client_refuses_an_id_already_in_flight_without_sending_it(server):
    import asyncio

    from pagedkv.runtime.serving.client import AsyncClient

    async def scenario():
        async with AsyncClient(server.address, timeout=60) as client:
            first = asyncio.ensure_future(client.generate(prompt_ids=PROMPT, request_id="same", **LONG))
            while "same" not in client._queues:  # sent, and its replies not all in yet
                await asyncio.sleep(0)
            with pytest.raises(ValueError, match="already in flight"):
                await client.generate(prompt_ids=PROMPT, request_id="same", max_tokens=2)
            return await first

    final = asyncio.run(scenario())
    assert final["type"] == "final" and len(final["outputs"][0]["token_ids"]) == LONG["max_tokens"]



def test_a_reply_wait_cancelled_as_its_reply_arrives_is_cancelled():
    # asyncio.wait_for before Python 3.12 returns the reply and drops the cancellation when both
    # come in one loop turn (CPython gh-86296): the HTTP gateway's stream of a client that had
    # left then ran on to its end, unaborted. Here both come together, every time.
    import asyncio

    from pagedkv.runtime.serving.client import AsyncClient

    async def scenario():
        async with AsyncClient("tcp://127.0.0.1:9", timeout=5) as client:  # nothing is sent
            queue: asyncio.Queue = asyncio.Queue()
            waiting = asyncio.ensure_future(client._next(queue, 5))
            await asyncio.sleep(0.05)  # waiting for a reply
            queue.put_nowait({"type": "token"})
            waiting.cancel()
            return (await asyncio.gather(waiting, return_exceptions=True))[0]

    assert isinstance(asyncio.run(scenario()), asyncio.CancelledError)


class FakeEngine:
    """A ROUTER that answers `health` (holding the request for `holds` probes, then not) and
    answers a generate request only after `final_after` probes (never when None)."""

    def __init__(self, holds: int, final_after: int | None) -> None:
        self.socket = zmq.Context.instance().socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.address = f"tcp://127.0.0.1:{self.socket.bind_to_random_port('tcp://127.0.0.1')}"
        self.holds, self.final_after, self.received = holds, final_after, []
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        probes, generate = 0, None
        while self.socket.poll(2000):
            identity, payload = self.socket.recv_multipart()
            message = msgpack.unpackb(payload, raw=False)
            self.received.append(message)
            if message["type"] == "generate":
                generate = message["id"]
            elif message["type"] == "health":
                probes += 1
                held = message["requests"] if probes <= self.holds else []
                self.socket.send_multipart([identity, _pack({"type": "final", "id": message["id"],
                                                             "health": {"status": "ok", "requests": held}})])
                if self.final_after is not None and probes == self.final_after:
                    self.socket.send_multipart([identity, _pack({"type": "final", "id": generate, "prompt_tokens": 1,
                                                                 "queue_s": 0.0, "outputs": []})])
            elif message["type"] == "abort":
                return

    def close(self) -> None:
        self.thread.join(10)
        self.socket.close()


@pytest.mark.parametrize("holds, final_after, outcome", [
    (3, 3, "final"),            # silent for three timeouts, and the engine holds it all along
    (2, None, "no longer holds"),  # the engine lost it (restarted, say) after two probes
])
def test_a_silent_request_waits_while_the_engine_holds_it(holds, final_after, outcome):
    import asyncio

    from pagedkv.runtime.serving.client import AsyncClient

    engine = FakeEngine(holds, final_after)

    async def scenario():
        async with AsyncClient(engine.address, timeout=0.1) as client:
            message = {"type": "generate", "id": "long", "prompt_ids": [1], "params": {}, "stream": False}
            try:
                return [reply async for reply in client.replies(message, probe=True)]
            except TimeoutError as e:
                return str(e)

    result = asyncio.run(scenario())
    engine.close()
    if outcome == "final":
        assert [r["type"] for r in result] == ["final"]
        assert not any(m["type"] == "abort" for m in engine.received)
    else:
        assert outcome in result
        assert engine.received[-1] == {"type": "abort", "id": "long"}  # in case it is still there after all
    probes = [m for m in engine.received if m["type"] == "health"]
    assert len(probes) == (holds if outcome == "final" else holds + 1) and probes[0]["requests"] == ["long"]
