"""The ZeroMQ server end to end: a real `pagedkv serve` process, real sockets."""
import json
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


@pytest.fixture(scope="module")
def model_path(tiny_model):
    return tiny_model()


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    with running_server(model_path, "--num-device-blocks", "128", "--block-size", "4",
                        "--max-message-mib", "8", log_path=str(log)) as proc:
        yield proc


@pytest.fixture(scope="module")
def offline(model_path):
    return LLM(model=model_path, num_device_blocks=512, block_size=4)


@pytest.fixture
def client(server):
    with Client(server.address, timeout=60) as c:
        yield c


def _reference(offline, params: SamplingParams, prompt=PROMPT):
    return [(c.token_ids, c.finish_reason) for c in offline.generate([prompt], params, use_tqdm=False)[0].outputs]


def _outputs(final):
    return [(o["token_ids"], o["finish_reason"]) for o in final["outputs"]]


def _blocks_in_use(client):
    blocks = client.stats()["blocks"]
    return blocks["device"]["used"], blocks["cpu"]["used"]


@pytest.mark.parametrize("params", [
    dict(max_tokens=12),
    dict(max_tokens=10, temperature=0.8, top_p=0.9, seed=3, n=3),
    dict(max_tokens=8, beam_width=3, n=2, length_penalty=0.7),
], ids=["greedy", "n3-seeded", "beam3"])
def test_generate_equals_offline_api(client, offline, params):
    params = {"temperature": 0.0, **params}
    final = client.generate(prompt_ids=PROMPT, **params)
    expected = _reference(offline, SamplingParams(**params))
    assert final["type"] == "final" and final["prompt_tokens"] == len(PROMPT)
    assert _outputs(final) == expected


def test_stream_deltas_add_up_to_the_final_output(client):
    replies = list(client.stream("hello world, this is", max_tokens=20, temperature=0.0, ignore_eos=True))
    final = replies[-1]
    assert final["type"] == "final" and all(r["type"] == "token" for r in replies[:-1])
    assert len(replies) > 3  # the tokens came one step at a time
    ids = [t for r in replies[:-1] for o in r["outputs"] for t in o["token_ids"]]
    text = "".join(o["text"] for r in replies[:-1] for o in r["outputs"])
    assert ids == final["outputs"][0]["token_ids"] and len(ids) == 20
    assert text == final["outputs"][0]["text"]


def test_prompt_logprobs_come_with_the_final_and_the_first_streamed_reply(client, offline):
    params = dict(max_tokens=4, temperature=0.0, prompt_logprobs=2)
    ref = offline.generate([PROMPT], SamplingParams(**params), use_tqdm=False)[0].prompt_logprobs
    expected = [None] + [[[t, lp, rank] for t, (lp, rank) in entry.items()] for entry in ref[1:]]
    final = client.generate(prompt_ids=PROMPT, **params)
    assert final["prompt_token_ids"] == PROMPT and final["prompt_logprobs"][0] is None
    for got, want in zip(final["prompt_logprobs"][1:], expected[1:], strict=True):
        assert [(t, rank) for t, _, rank in got] == [(t, rank) for t, _, rank in want]
        assert [lp for _, lp, _ in got] == pytest.approx([lp for _, lp, _ in want], abs=1e-5)
    texts = final["prompt_token_texts"]
    assert set(texts) == {PROMPT[0], *(t for entry in final["prompt_logprobs"][1:] for t, _, _ in entry)}
    assert texts[PROMPT[1]] == offline.tokenizer.decode([PROMPT[1]])
    replies = list(client.stream(prompt_ids=PROMPT, **params))
    carrying = [r for r in replies if "prompt_logprobs" in r]
    assert [r["type"] for r in carrying] == ["token", "final"] and carrying[0] is replies[0]
    assert carrying[0]["prompt_logprobs"] == carrying[1]["prompt_logprobs"] and carrying[0]["prompt_token_texts"] == texts
    assert "prompt_logprobs" not in client.generate(prompt_ids=PROMPT, max_tokens=2)


def test_stream_with_stop_string_never_sends_the_stop_string(client, offline):
    full = offline.generate(["hello world"], SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True),
                            use_tqdm=False)[0].outputs[0].text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assume_ok = stop.strip() and full.find(stop) == len(full) // 2
    if not assume_ok:
        pytest.skip("the reference text has no clean stop string")
    replies = list(client.stream("hello world", max_tokens=16, temperature=0.0, ignore_eos=True, stop=[stop]))
    streamed = "".join(o["text"] for r in replies[:-1] for o in r["outputs"])
    assert streamed == replies[-1]["outputs"][0]["text"] == full[: len(full) // 2]
    assert stop not in streamed


def test_chat_messages_use_the_chat_template(client, offline):
    messages = [{"role": "user", "content": "Say something."}]
    final = client.generate(messages=messages, max_tokens=6, temperature=0.0)
    expected = offline.chat(messages, SamplingParams(max_tokens=6, temperature=0.0))
    assert final["outputs"][0]["token_ids"] == expected.outputs[0].token_ids
    assert final["prompt_tokens"] == len(expected.prompt_token_ids)


def test_abort_mid_stream_frees_its_blocks(client):
    stream = client.stream(prompt_ids=PROMPT, max_tokens=400, temperature=0.0, ignore_eos=True)
    first = next(stream)
    assert first["type"] == "token"
    client.abort(first["id"])
    with pytest.raises(ServerError) as error:
        for reply in stream:
            assert reply["type"] == "token"  # what was on its way before the abort
    assert error.value.code == "aborted" and error.value.request_id == first["id"]
    assert _blocks_in_use(client) == (0, 0)


def test_stats_and_health(client):
    health = client.health()
    assert health["status"] == "ok" and health["in_flight"] == 0
    stats = client.stats()
    assert stats["blocks"]["device"]["total"] == 128 and stats["blocks"]["block_size"] == 4
    assert set(stats["queues"]) == {"waiting", "running", "swapped"}
    assert set(stats["preemptions"]) == {"swap", "recompute"}
    assert stats["server"]["messages"] >= 2


def test_stats_count_prefix_cache_hits(client):
    prompt = [411, 412, 413, 414, 415, 416, 417, 418, 419]  # 2 full blocks of 4 and a token; unused elsewhere
    before = client.stats()["prefix_cache"]
    for _ in range(2):
        client.generate(prompt_ids=prompt, max_tokens=2)
    after = client.stats()["prefix_cache"]
    assert after["enabled"]
    assert after["queried_tokens"] - before["queried_tokens"] == 18
    assert after["hit_tokens"] - before["hit_tokens"] == 8  # the second request's 2 full blocks
    assert after["hit_rate"] == pytest.approx(after["hit_tokens"] / after["queried_tokens"])


# -- bad input: every case gets an error reply (where an id can be read) and the server goes on --
def _raw(server):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server.address)
    return sock


def _reply(sock, timeout=30):
    assert sock.poll(timeout * 1000), "no reply"
    return msgpack.unpackb(sock.recv(), raw=False, strict_map_key=False)


def _pack(message):
    return msgpack.packb(message, use_bin_type=True)


GOOD = {"type": "generate", "id": "good", "prompt_ids": PROMPT, "params": {"max_tokens": 3, "temperature": 0.0}}
BAD_MESSAGES = {
    "not msgpack": (b"\xc1\xff\x00garbage", None, "bad_request"),
    "empty message": (b"", None, "bad_request"),
    "not a map": (_pack([1, 2, 3]), None, "bad_request"),
    "no id": (_pack({"type": "generate", "prompt": "hi"}), None, "bad_request"),
    "id of a wrong type": (_pack({"type": "health", "id": [1]}), None, "bad_request"),
    "no type": (_pack({"id": "a"}), "a", "bad_request"),
    "unknown type": (_pack({"type": "explode", "id": "b"}), "b", "bad_request"),
    "unknown field": (_pack({**GOOD, "id": "c", "colour": "red"}), "c", "bad_request"),
    "no prompt": (_pack({"type": "generate", "id": "d"}), "d", "bad_request"),
    "two prompts": (_pack({**GOOD, "id": "e", "prompt": "x"}), "e", "bad_request"),
    "prompt not text": (_pack({"type": "generate", "id": "f", "prompt": 12}), "f", "bad_request"),
    "ids not ints": (_pack({"type": "generate", "id": "g", "prompt_ids": ["a", 1]}), "g", "bad_request"),
    "stream not bool": (_pack({**GOOD, "id": "h", "stream": "yes"}), "h", "bad_request"),
    "params not a map": (_pack({**GOOD, "id": "i", "params": [1]}), "i", "bad_request"),
    "empty prompt": (_pack({"type": "generate", "id": "j", "prompt": ""}), "j", "bad_request"),
    "empty prompt ids": (_pack({"type": "generate", "id": "k", "prompt_ids": []}), "k", "bad_request"),
    "ids outside vocab": (_pack({**GOOD, "id": "l", "prompt_ids": [1, 10**6]}), "l", "bad_request"),
    "negative id in prompt": (_pack({**GOOD, "id": "m", "prompt_ids": [1, -4]}), "m", "bad_request"),
    "bad temperature": (_pack({**GOOD, "id": "n", "params": {"temperature": -1}}), "n", "bad_request"),
    "unknown param": (_pack({**GOOD, "id": "o", "params": {"beams": 3}}), "o", "bad_request"),
    "bad messages": (_pack({"type": "generate", "id": "p", "messages": [{"role": "user"}]}), "p", "bad_request"),
    "too many tokens": (_pack({**GOOD, "id": "q", "prompt_ids": [5] * 5000}), "q", "too_long"),
    "several MiB": (_pack({"type": "generate", "id": "r", "prompt": "word " * 1_000_000}), "r", "too_long"),
    "n beyond cache": (_pack({**GOOD, "id": "s", "params": {"n": 200}}), "s", "too_long"),
}


@pytest.mark.parametrize("case", list(BAD_MESSAGES))
def test_bad_input_gets_an_error_and_the_server_goes_on(server, case):
    payload, request_id, code = BAD_MESSAGES[case]
    sock = _raw(server)
    try:
        sock.send(payload)
        reply = _reply(sock)
        assert reply["type"] == "error" and reply["id"] == request_id and reply["code"] == code, reply
        assert isinstance(reply["message"], str) and reply["message"]
        sock.send(_pack(GOOD))
        reply = _reply(sock)
        assert reply["type"] == "final" and len(reply["outputs"][0]["token_ids"]) == 3
    finally:
        sock.close()
    assert f"{code}" in server.log()


def test_duplicate_request_id_in_flight_is_refused(server):
    sock = _raw(server)
    try:
        long = {"type": "generate", "id": 7, "prompt_ids": PROMPT,
                "params": {"max_tokens": 200, "ignore_eos": True, "temperature": 0.0}}
        sock.send(_pack(long))
        sock.send(_pack(long))
        first = _reply(sock)
        assert first["type"] == "error" and first["id"] == 7 and "already in flight" in first["message"]
        final = _reply(sock, timeout=120)
        assert final["type"] == "final" and len(final["outputs"][0]["token_ids"]) == 200
    finally:
        sock.close()


def test_message_over_the_size_limit_drops_only_that_connection(server):
    sock = _raw(server)
    try:
        sock.send(b"\x00" * (9 * 2**20))  # over --max-message-mib 8: ZeroMQ drops the connection
        assert not sock.poll(1000)
        sock.send(_pack(GOOD))  # the DEALER reconnects by itself
        assert _reply(sock)["type"] == "final"
    finally:
        sock.close()


def test_a_new_client_on_a_reused_connection_is_not_taken_for_the_one_that_left(server):
    """The OS hands a closed descriptor to the next connection at once; the server must not
    abort the newcomer's requests when the old client's disconnect event arrives late."""
    busy = _raw(server)
    try:
        for trial in range(8):
            old = _raw(server)
            old.send(_pack({"type": "health", "id": "old"}))
            assert _reply(old)["type"] == "final"
            for i in range(800):  # keeps the server inside long drains of its socket
                busy.send(_pack({"type": "health", "id": i}))
            old.close()
            new = _raw(server)
            new.send(_pack({**GOOD, "id": f"new{trial}"}))
            assert _reply(new)["type"] == "final", f"trial {trial}: the newcomer was aborted"
            new.close()
            for _ in range(800):
                _reply(busy)
    finally:
        busy.close()


# -- a small server: admission control, disconnects, shutdown -------------------------------------
@pytest.fixture(scope="module")
def small_server(model_path, tmp_path_factory):
    """On an ipc:// address, so that transport is covered too."""
    folder = tmp_path_factory.mktemp("small")
    with running_server(model_path, "--num-device-blocks", "64", "--block-size", "4", "--max-num-seqs", "1",
                        "--max-queued", "1", log_path=str(folder / "server.log"),
                        bind=f"ipc://{folder}/pagedkv.sock") as proc:
        assert proc.address.startswith("ipc://")
        yield proc


def _long(request_id, max_tokens=300, stream=False):
    return _pack({"type": "generate", "id": request_id, "prompt_ids": PROMPT, "stream": stream,
                  "params": {"max_tokens": max_tokens, "ignore_eos": True, "temperature": 0.0}})


def _wait_until_idle(client, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = client.stats()
        if stats["server"]["in_flight"] == 0 and stats["blocks"]["device"]["used"] == 0:
            return stats
        time.sleep(0.05)
    raise AssertionError(f"still busy: {stats}")


def test_overloaded_beyond_max_queued(small_server):
    sock = _raw(small_server)
    try:
        sock.send(_long(0, max_tokens=60, stream=True))
        assert _reply(sock)["type"] == "token"  # running: max-num-seqs 1 keeps the next one waiting
        sock.send(_long(1, max_tokens=10))  # waits (max-queued 1)
        sock.send(_long(2, max_tokens=10))  # refused
        ends = {}
        while len(ends) < 3:
            reply = _reply(sock, timeout=120)
            if reply["type"] != "token":
                ends[reply["id"]] = reply
        assert ends[0]["type"] == ends[1]["type"] == "final"
        assert ends[2]["type"] == "error" and ends[2]["code"] == "overloaded"
    finally:
        sock.close()


def test_client_that_disconnects_leaves_no_blocks_held(small_server):
    sock = _raw(small_server)
    sock.send(_long("gone", max_tokens=2000, stream=True))
    assert _reply(sock)["type"] == "token"  # it is generating
    with Client(small_server.address, timeout=30) as observer:
        assert observer.stats()["blocks"]["device"]["used"] > 0
        sock.close()  # vanishes mid-generation
        stats = _wait_until_idle(observer)
        assert stats["blocks"]["cpu"]["used"] == 0
        assert stats["generated_tokens"] < 2000
    assert "disconnected" in small_server.log()


def test_sigterm_answers_in_flight_requests_and_exits_0(small_server):
    sock = _raw(small_server)
    try:
        sock.send(_long("t0", max_tokens=5000, stream=True))
        assert _reply(sock)["type"] == "token"  # running
        sock.send(_long("t1", max_tokens=5000, stream=True))  # waiting behind it
        with Client(small_server.address, timeout=30) as observer:
            while observer.stats()["queues"]["waiting"] != 1:
                time.sleep(0.01)
        assert small_server.terminate() == 0
        ends = {}
        while sock.poll(5000):
            reply = msgpack.unpackb(sock.recv(), raw=False)
            if reply["type"] != "token":
                ends[reply["id"]] = reply
        assert set(ends) == {"t0", "t1"}, (ends, small_server.log())
        assert all(r["type"] == "error" and r["code"] == "aborted" for r in ends.values())
    finally:
        sock.close()


# -- security -------------------------------------------------------------------------------------
def test_non_loopback_bind_refuses_without_keys_or_insecure(model_path, capsys):
    assert main(["serve", "--model", model_path, "--bind", "tcp://0.0.0.0:5599"]) == 2
    assert "--insecure" in capsys.readouterr().err


def test_curve_admits_only_listed_clients(model_path, tmp_path):
    keys = tmp_path / "keys"
    assert main(["keys", str(keys), "--client", "alice"]) == 0
    other = tmp_path / "other"
    main(["keys", str(other), "--client", "mallory"])  # a key pair the server does not list
    (other / "server.key").write_bytes((keys / "server.key").read_bytes())
    with running_server(model_path, "--curve-keys", str(keys), "--num-device-blocks", "32",
                        log_path=str(tmp_path / "server.log")) as server:
        with Client(server.address, timeout=60, curve_keys=str(keys), client_name="alice") as alice:
            assert alice.generate(prompt_ids=PROMPT, max_tokens=3)["type"] == "final"
        with Client(server.address, timeout=2) as plain, pytest.raises(TimeoutError):
            plain.health()
        with Client(server.address, timeout=2, curve_keys=str(other), client_name="mallory") as mallory:
            with pytest.raises(TimeoutError):
                mallory.health()
        assert server.terminate() == 0


def test_client_errors_raise_server_error(client):
    with pytest.raises(ServerError) as e:
        client.generate(prompt_ids=[], max_tokens=3)
    assert e.value.code == "bad_request" and "empty" in e.value.message


# -- the command line against the server ----------------------------------------------------------
def test_cli_client_generate_stream_and_json(server, offline, capsys):
    expected = offline.generate(["hello there"], SamplingParams(max_tokens=8, temperature=0.0),
                                use_tqdm=False)[0].outputs[0]
    assert main(["client", "generate", "--address", server.address, "--prompt", "hello there",
                 "--max-tokens", "8", "--stream"]) == 0
    assert capsys.readouterr().out == expected.text + "\n"
    assert main(["client", "generate", "--address", server.address, "--prompt", "hello there",
                 "--max-tokens", "8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["outputs"][0]["token_ids"] == expected.token_ids


def test_cli_reports_server_errors(server, capsys):
    assert main(["client", "generate", "--address", server.address, "--prompt-ids", "1,2,100000"]) == 1
    assert "bad_request" in capsys.readouterr().err


def test_cli_stats_table(server, capsys):
    assert main(["stats", "--address", server.address]) == 0
    table = capsys.readouterr().out
    for row in ("device pool", "cpu swap pool", "KV waste", "sharing saves", "preemptions", "prefix cache",
                "hit rate", "runtime overhead"):
        assert row in table
    assert "/ 128" in table  # the device pool's size


def test_cli_chat_streams_answers_and_keeps_the_conversation(server, offline, monkeypatch, capsys):
    lines = iter(["Hi there.", "And then?", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", "--address", server.address, "--max-tokens", "5", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    first = offline.chat([{"role": "user", "content": "Hi there."}], SamplingParams(max_tokens=5, temperature=0.0))
    second = offline.chat([{"role": "user", "content": "Hi there."},
                           {"role": "assistant", "content": first.outputs[0].text},
                           {"role": "user", "content": "And then?"}], SamplingParams(max_tokens=5, temperature=0.0))
    assert out == f"model> {first.outputs[0].text}\nmodel> {second.outputs[0].text}\n"


def test_cli_chat_samples_by_default_when_the_model_ships_no_settings(server, offline, monkeypatch, capsys):
    """Greedy chat loops with a small model; without settings of the model's own, chat samples
    with CHAT_SAMPLING (the tiny model has no generation_config.json)."""
    from pagedkv.runtime.cli.args import CHAT_SAMPLING

    lines = iter(["Hi there.", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", "--address", server.address, "--max-tokens", "6", "--seed", "4"]) == 0
    expected = offline.chat([{"role": "user", "content": "Hi there."}],
                            SamplingParams(max_tokens=6, seed=4, **CHAT_SAMPLING))
    assert capsys.readouterr().out == f"model> {expected.outputs[0].text}\n"
