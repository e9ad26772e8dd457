"""The gateway over several engines (`pagedkv api --address A --address B`), with real engine
processes on loopback: a returning chat goes to the engine that holds its prefix (by the KV
events), /metrics says where requests went and what they hit, and an engine killed under load
is taken out within 2 s: no request hangs, those in flight on it end with a 503, the others and
every later one succeed, and a restarted engine is taken back."""
import concurrent.futures
import signal
import time

import httpx
import pytest
from redis_server import free_port
from server_process import running_gateway, running_server
from test_openai_api import scrape

pytestmark = pytest.mark.timeout(600)
ENGINE_ARGS = ["--block-size", "4", "--num-device-blocks", "256", "--kv-events-endpoint", "tcp://127.0.0.1:*"]


def wait_engines(url: str, healthy: int, timeout: float = 60) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = httpx.get(f"{url}/health", timeout=10)
        if r.status_code == 200 and sum(e["healthy"] for e in r.json()["engines"]) == healthy:
            return r.json()["engines"]
        time.sleep(0.05)
    raise AssertionError(f"{healthy} engines never in service: {r.text}")


def chat(url: str, messages: list[dict], max_tokens: int = 8, timeout: float = 60) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", timeout=timeout,
                      json={"model": "m", "messages": messages, "max_tokens": max_tokens, "temperature": 0})


def routed(url: str) -> dict[str, int]:
    return {e["address"]: e["routed"] for e in httpx.get(f"{url}/health", timeout=10).json()["engines"]}


def in_flight(url: str, address: str) -> int:
    engines = httpx.get(f"{url}/health", timeout=10).json()["engines"]
    return next(e["in_flight"] for e in engines if e["address"] == address)


def test_a_returning_chat_goes_to_the_engine_that_holds_it(model_path, tmp_path):
    with running_server(model_path, *ENGINE_ARGS, log_path=str(tmp_path / "a.log")) as a, \
            running_server(model_path, *ENGINE_ARGS, log_path=str(tmp_path / "b.log")) as b, \
            running_gateway(a.address, "--address", b.address, "--served-model-name", "m",
                            log_path=str(tmp_path / "gw.log")) as (_, url):
        wait_engines(url, 2)
        names = ["Alpha", "Bravo", "Charlie", "Delta", "Echo", "Foxtrot"]  # from the first block on, their own
        chats = [[{"role": "system", "content": f"{name} is your name."},
                  {"role": "user", "content": f"Tell me about the number {i * 7} and the lazy dog, please."}]
                 for i, name in enumerate(names)]
        home = {}
        for i, messages in enumerate(chats):
            before = routed(url)
            reply = chat(url, messages)
            assert reply.status_code == 200, reply.text
            after = routed(url)
            home[i] = next(addr for addr in after if after[addr] > before[addr])
            messages.append({"role": "assistant", "content": reply.json()["choices"][0]["message"]["content"]})
            messages.append({"role": "user", "content": "And once more?"})
        assert len(set(home.values())) == 2  # new chats, no load: round-robin
        time.sleep(0.3)  # the engines' events reach the router
        for i, messages in enumerate(chats):
            before = routed(url)
            assert chat(url, messages).status_code == 200
            after = routed(url)
            assert after[home[i]] == before[home[i]] + 1, (i, home[i], before, after)
        metrics = scrape(url)
        hits = metrics["pagedkv:router_prefix_hit_blocks_total"]
        assert sum(hits.values()) >= 6 * 8  # each returning chat's first turn, in 4-token blocks
        engine_hits = metrics["pagedkv:router_engine_prefix_cache_hits_total"]
        assert set(dict(k)["engine"] for k in engine_hits) == {a.address, b.address}
        assert sum(engine_hits.values()) >= 4 * sum(hits.values()) * 0.9


def test_an_engine_killed_under_load(model_path, tmp_path):
    port_b = free_port()
    bind_b = f"tcp://127.0.0.1:{port_b}"
    with running_server(model_path, *ENGINE_ARGS, log_path=str(tmp_path / "a.log")) as a, \
            running_server(model_path, *ENGINE_ARGS, log_path=str(tmp_path / "b.log"), bind=bind_b) as b, \
            running_gateway(a.address, "--address", b.address, "--served-model-name", "m",
                            log_path=str(tmp_path / "gw.log")) as (_, url):
        wait_engines(url, 2)

        def one(i: int) -> tuple[int, str]:
            r = httpx.post(f"{url}/v1/completions", timeout=120,
                           json={"model": "m", "prompt": f"Request {i}: the quick brown fox", "max_tokens": 200,
                                 "temperature": 0, "ignore_eos": True})
            return r.status_code, r.text

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            first = [pool.submit(one, i) for i in range(16)]
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and min(routed(url).values()) < 4:
                time.sleep(0.02)
            # Frozen while it holds requests, so that some are surely in flight when it dies (a fast
            # machine finishes 200 tokens of the tiny model in well under a second).
            while True:
                assert time.monotonic() < deadline, "engine B never held a request"
                if in_flight(url, b.address) >= 1:
                    b.process.send_signal(signal.SIGSTOP)
                    if in_flight(url, b.address) >= 1:
                        break
                    b.process.send_signal(signal.SIGCONT)
                time.sleep(0.005)
            b.process.kill()  # how fast it is taken out is a benchmark's figure (tools/bench_router)
            engines = wait_engines(url, 1, timeout=30)
            dead = next(e for e in engines if e["address"] == b.address)
            later = [pool.submit(one, 100 + i) for i in range(8)]
            results = [f.result(timeout=120) for f in first + later]  # none hangs
        statuses = [s for s, _ in results]
        failed = [(s, t) for s, t in results if s != 200]
        assert all(s == 503 and "engine_unavailable" in t for s, t in failed), failed
        assert len(failed) == dead["failed_requests"] >= 1  # exactly those in flight on the dead engine
        assert all(s == 200 for s in statuses[16:])  # later ones went to the live engine
        assert statuses.count(200) == 24 - len(failed)
        # The engine comes back at its address: taken back into service.
        with running_server(model_path, *ENGINE_ARGS, log_path=str(tmp_path / "b2.log"), bind=bind_b):
            wait_engines(url, 2, timeout=30)
            before = routed(url)
            for i in range(4):
                assert one(200 + i)[0] == 200
            assert routed(url)[b.address] > before[b.address]
