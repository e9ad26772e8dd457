"""Load on a real `pagedkv serve` process: 16 concurrent clients send 400 requests with
Poisson arrivals and mixed sampling parameters, some streamed, some aborted, into a KV
cache small enough that the scheduler must preempt (by swap, and by recompute once the
small CPU pool is full).

Every request must get exactly one terminal reply (`final` or `error`) and nothing after
it; every completed request must equal what the offline API gives for it with a cache
large enough never to preempt (seeded sampling and beam search are reproducible whatever
else shares the batch, and preemption is invisible by design); afterwards every block is
free and the server exits 0 on SIGTERM.
"""
from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from dataclasses import dataclass, field

import msgpack
import pytest
import torch
from server_process import running_server

from pagedkv.runtime.engine.llm import LLM
from pagedkv.runtime.engine.sampling_params import SamplingParams
from pagedkv.runtime.serving.client import AsyncClient, Client, ServerError

NUM_REQUESTS = 400
NUM_CLIENTS = 16
RATE = 150.0            # requests per second, all clients together (Poisson): they pile up
SEED = 1234
FIRST_TOKEN = 3         # ids 0-2 are the tiny tokenizer's special tokens
BLOCK_SIZE = 4
# 40 blocks of 4 tokens: a few requests' worth, so that running groups get preempted. The
# swap pool (about 10 blocks of this model) fills up, so auto mode recomputes too.
SERVER_ARGS = ["--num-device-blocks", "40", "--block-size", str(BLOCK_SIZE), "--swap-space-gib", "0.00002",
               "--max-num-seqs", "32", "--preemption-mode", "auto"]
REQUEST_TIMEOUT = 60.0  # seconds a client waits for the next reply of a request
RUN_TIMEOUT = 120.0     # the whole load, sent and answered


@dataclass
class LoadRequest:
    id: str
    client: int
    arrival: float               # seconds after the start
    prompt_ids: list[int]
    params: dict
    stream: bool
    abort: str | None = None     # None, "first_token" (streams) or "delay"
    abort_delay: float = 0.0


@dataclass
class Result:
    terminal: dict | None = None                     # the final reply, or {"type": "error", "code": ...}
    streamed: dict[int, list[int]] = field(default_factory=lambda: defaultdict(list))
    streamed_text: dict[int, str] = field(default_factory=lambda: defaultdict(str))
    failure: str | None = None                       # a timeout or anything unexpected


def make_requests(vocab_size: int) -> list[LoadRequest]:
    rng = random.Random(SEED)
    t, requests = 0.0, []
    for i in range(NUM_REQUESTS):
        t += rng.expovariate(RATE)
        prompt = [rng.randrange(FIRST_TOKEN, vocab_size) for _ in range(rng.randint(1, 40))]
        max_tokens = rng.randint(1, 20)
        kind = rng.random()
        if kind < 0.25:
            params = dict(temperature=0.0)
        elif kind < 0.45:
            params = dict(temperature=rng.choice([0.7, 1.0, 1.3]), top_p=rng.choice([0.8, 0.95, 1.0]),
                          top_k=rng.choice([0, 20, 50]), seed=rng.randrange(2**31))
        elif kind < 0.65:
            params = dict(temperature=1.0, n=rng.choice([2, 3]), top_p=0.9, seed=rng.randrange(2**31))
        elif kind < 0.80:
            width = rng.choice([2, 3])
            params = dict(beam_width=width, n=rng.randint(1, width))
        elif kind < 0.92:  # stop tokens: about one chance in 25 per sampled token to stop on one
            params = dict(temperature=0.9, seed=rng.randrange(2**31),
                          stop_token_ids=rng.sample(range(FIRST_TOKEN, vocab_size), 20))
        else:
            params = dict(temperature=0.0, stop_token_ids=rng.sample(range(FIRST_TOKEN, vocab_size), 40))
        params["max_tokens"] = max_tokens
        if rng.random() < 0.15:
            params["ignore_eos"] = True
        stream = rng.random() < 0.2
        abort = None
        if rng.random() < 0.1:
            abort = "first_token" if stream else "delay"
        requests.append(LoadRequest(f"r{i}", rng.randrange(NUM_CLIENTS), t, prompt, params, stream, abort,
                                    rng.uniform(0.0, 0.05)))
    return requests


class RecordingClient(AsyncClient):
    """An AsyncClient that also keeps every reply it receives, by request id, so that
    replies after a request's terminal one (which AsyncClient drops) are seen."""

    def __init__(self, address: str) -> None:
        super().__init__(address, timeout=REQUEST_TIMEOUT)
        self.received: dict[object, list[dict]] = defaultdict(list)

    async def _read(self) -> None:
        while True:
            reply = msgpack.unpackb(await self.socket.recv(), raw=False, strict_map_key=False)
            self.received[reply.get("id")].append(reply)
            queue = self._queues.get(reply.get("id"))
            if queue is not None:
                queue.put_nowait(reply)


async def send_one(client: RecordingClient, request: LoadRequest, start: float) -> Result:
    loop = asyncio.get_running_loop()
    await asyncio.sleep(max(0.0, start + request.arrival - loop.time()))
    result = Result()
    message = {"type": "generate", "id": request.id, "prompt_ids": request.prompt_ids,
               "params": request.params, "stream": request.stream}

    async def abort_later() -> None:
        await asyncio.sleep(request.abort_delay)
        await client.abort(request.id)

    aborter = loop.create_task(abort_later()) if request.abort == "delay" else None
    aborted = False
    try:
        async for reply in client.replies(message):
            if reply["type"] == "token":
                for out in reply["outputs"]:
                    result.streamed[out["index"]] += out["token_ids"]
                    result.streamed_text[out["index"]] += out["text"]
                if request.abort == "first_token" and not aborted:
                    aborted = True
                    await client.abort(request.id)
            else:
                result.terminal = reply
    except ServerError as e:
        result.terminal = {"type": "error", "code": e.code, "message": e.message}
    except TimeoutError as e:
        result.failure = f"timeout: {e}"
    finally:
        if aborter is not None:
            await aborter
    return result


async def run_load(address: str, requests: list[LoadRequest]) -> tuple[list[Result], list[RecordingClient]]:
    clients = [RecordingClient(address) for _ in range(NUM_CLIENTS)]
    try:
        for c in clients:  # every socket connected and the server answering before the clock starts
            await c.health(timeout=30)
        start = asyncio.get_running_loop().time()
        results = await asyncio.gather(*(send_one(clients[r.client], r, start) for r in requests))
        # A barrier: a server answers one client's messages in order, so once a client's
        # stats reply is in, every reply the server sent that client before it is in too.
        for c in clients:
            await c.stats(timeout=30)
        return list(results), clients
    finally:
        for c in clients:
            await c.close()


def reference_outputs(model_path: str, requests: list[LoadRequest]) -> list:
    """The offline API with a cache that never preempts."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        llm = LLM(model=model_path, block_size=BLOCK_SIZE, num_device_blocks=4096, swap_space_gib=0.01)
        return llm.generate([r.prompt_ids for r in requests],
                            [SamplingParams(**r.params) for r in requests], use_tqdm=False)
    finally:
        torch.set_num_threads(before)


def outputs_of(final: dict) -> list[tuple[list[int], str, str]]:
    ordered = sorted(final["outputs"], key=lambda o: o["index"])
    return [(o["token_ids"], o["finish_reason"], o["text"]) for o in ordered]


@pytest.mark.timeout(240)
def test_load_with_preemption_and_aborts(tiny_model, tmp_path):
    path = tiny_model()
    requests = make_requests(vocab_size=512)
    log_path = str(tmp_path / "server.log")
    with running_server(path, *SERVER_ARGS, log_path=log_path) as server:
        results, clients = asyncio.run(asyncio.wait_for(run_load(server.address, requests), RUN_TIMEOUT))
        with Client(server.address, timeout=30) as c:
            stats = c.stats()
        exit_code = server.terminate()
    log = server.log()
    reference = reference_outputs(path, requests)

    problems: list[str] = []
    outcomes: dict[str, int] = defaultdict(int)
    for request, result, expected in zip(requests, results, reference):
        where = f"{request.id} ({request.params}, stream={request.stream}, abort={request.abort})"
        if result.failure:
            problems.append(f"{where}: {result.failure}")
            continue
        replies = clients[request.client].received[request.id]
        terminal = [i for i, r in enumerate(replies) if r["type"] in ("final", "error")]
        if len(terminal) != 1 or terminal[0] != len(replies) - 1:
            problems.append(f"{where}: replies {[r['type'] for r in replies]}: want exactly one final or "
                            "error reply, and last")
            continue
        if any(r["type"] not in ("token", "final", "error") for r in replies):
            problems.append(f"{where}: unknown reply types {[r['type'] for r in replies]}")
        if not request.stream and any(r["type"] == "token" for r in replies):
            problems.append(f"{where}: token replies to a request that did not ask to stream")
        final = result.terminal
        if final["type"] == "error":
            if final["code"] == "aborted" and request.abort:
                outcomes["aborted"] += 1
            else:
                problems.append(f"{where}: error {final['code']}: {final.get('message')}")
            want = {c.index: c.token_ids for c in expected.outputs}
            for index, ids in result.streamed.items():  # what streamed before the abort: a prefix
                if want.get(index, [])[:len(ids)] != ids:
                    problems.append(f"{where}: output {index} streamed {ids} before the abort, "
                                    f"not a prefix of the offline {want.get(index)}")
            continue
        outcomes["final"] += 1
        got = outputs_of(final)
        want = [(c.token_ids, c.finish_reason, c.text) for c in expected.outputs]
        if [g[:2] for g in got] != [w[:2] for w in want]:
            problems.append(f"{where}: outputs (token ids, finish reason) {[g[:2] for g in got]} != offline "
                            f"{[w[:2] for w in want]}")
        elif [g[2] for g in got] != [w[2] for w in want]:
            problems.append(f"{where}: texts {[g[2] for g in got]!r} != offline {[w[2] for w in want]!r}")
        if final["prompt_tokens"] != len(request.prompt_ids):
            problems.append(f"{where}: prompt_tokens {final['prompt_tokens']} != {len(request.prompt_ids)}")
        if request.stream:
            streamed = [(result.streamed.get(i, []), result.streamed_text.get(i, "")) for i in range(len(got))]
            if streamed != [(g[0], g[2]) for g in got]:
                problems.append(f"{where}: streamed deltas {streamed} do not add up to the final outputs "
                                f"{[(g[0], g[2]) for g in got]}")
    assert not problems, f"{len(problems)} of {NUM_REQUESTS} requests went wrong:\n" + "\n".join(problems[:20])
    assert sum(outcomes.values()) == NUM_REQUESTS
    assert outcomes["final"] >= 0.85 * NUM_REQUESTS and outcomes["aborted"] > 0, outcomes

    # Preemption happened, and left nothing behind.
    assert stats["preemptions"]["swap"] > 0 and stats["preemptions"]["recompute"] > 0, stats["preemptions"]
    assert stats["blocks"]["device"]["used"] == 0, stats["blocks"]
    assert stats["blocks"]["cpu"]["used"] == 0, stats["blocks"]
    assert stats["queues"] == {"waiting": 0, "running": 0, "swapped": 0}, stats["queues"]
    assert stats["server"]["in_flight"] == 0
    assert exit_code == 0, log[-4000:]
    assert "Traceback" not in log and "internal error" not in log, log[-4000:]
