"""Prefix-aware routing against round-robin, and the shared Redis tier, on a multi-turn chat
workload over several engines on this machine (tools/serve_engines.py starts each cluster anew:
empty caches).

    python -m tools.bench_router [--engines 3] [--conversations 12] [--clients 4] [--turns 4] [--json OUT]

Runs, in one invocation: round-robin; prefix-aware; round-robin with the engines sharing a Redis
remote tier. Per run: prefill tokens the engines computed (their stats), generated tokens per
second (wall clock), time to first token of first and of returning turns (streamed, p50), and
the remote tier's hits. Then an engine of the prefix-aware cluster is killed under load and the
time until the gateway stops sending it requests is measured (its /health, polled every 10 ms).

Workload: tools/multiturn_workloads.py's, the one the KV tiers are measured on (shaped like vLLM's
benchmarks/multi_turn), through the chat API: one system prompt for every conversation, each
conversation's first message a long context of its own, then turns of log-normal lengths; each
client goes round robin over its conversations, one turn at a time, so a conversation's turns
are far apart. Lengths are drawn in tokens and written as that many common words (about a token
each); each answer (its drawn length, greedy, EOS ignored) is part of the next turn's history,
as a chat client sends it back.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import threading
import time

import httpx

from pagedkv import Client
from pagedkv.runtime.serving.http.router import LOAD_SLACK
from tools.multiturn_workloads import MultiTurn, multi_turn
from tools.serve_engines import running_cluster

WORDS = ("river mountain cloud engine paper lamp garden window stone harbor violin meadow rocket pencil "
         "castle forest ocean silver bridge candle market winter desert island copper thunder orchard "
         "lantern compass falcon glacier prairie quartz saddle tunnel velvet walnut yellow zephyr").split()


def as_words(tokens: list[int]) -> str:
    return " ".join(WORDS[t % len(WORDS)] for t in tokens)


def around(mean: int) -> tuple[int, int]:
    return max(4, mean // 4), mean * 4


def make_workload(args) -> MultiTurn:
    """tools/multiturn_workloads.py's workload at this benchmark's sizes (ranges around each mean)."""
    return multi_turn(args.conversations, args.turns, vocab_size=1 << 15, clients=args.clients,
                      system_tokens=args.system_tokens, context_mean=args.context_mean,
                      context_range=(args.context_mean // 2, args.context_mean * 3),
                      message_mean=args.message_mean, message_range=around(args.message_mean),
                      answer_mean=args.answer_mean, answer_range=around(args.answer_mean))


async def chat_turn(client: httpx.AsyncClient, url: str, messages: list[dict],
                    max_tokens: int) -> tuple[float, str, int]:
    """One streamed turn: (seconds to its first token, the answer's text, its tokens)."""
    started = time.perf_counter()
    first, text, tokens = None, [], 0
    async with client.stream("POST", f"{url}/v1/chat/completions",
                             json={"messages": messages, "max_tokens": max_tokens, "temperature": 0,
                                   "ignore_eos": True, "stream": True,
                                   "stream_options": {"include_usage": True}}) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            for choice in event.get("choices", []):
                piece = choice.get("delta", {}).get("content")
                if piece:
                    first = first or time.perf_counter()
                    text.append(piece)
    return (first or time.perf_counter()) - started, "".join(text), tokens


async def run_client(client: httpx.AsyncClient, url: str, wl: MultiTurn, k: int, records: list) -> None:
    """Client k's conversations, round robin, one turn at a time."""
    histories: dict[int, list[dict]] = {}
    for c, turn in wl.schedule(k, range(wl.turns)):
        conv = wl.conversations[c]
        messages = histories.setdefault(c, [{"role": "system", "content": as_words(wl.system)}])
        messages.append({"role": "user", "content": as_words(conv.messages[turn])})
        ttft, text, tokens = await chat_turn(client, url, messages, conv.answer_lens[turn])
        records.append({"turn": turn, "ttft": ttft, "tokens": tokens})
        messages.append({"role": "assistant", "content": text})


def engine_totals(addresses: list[str]) -> dict:
    totals = {"prefill_tokens_computed": 0, "remote_hit_blocks": 0, "prefix_hit_tokens": 0}
    for address in addresses:
        with Client(address, 30) as client:
            s = client.stats()
        totals["prefill_tokens_computed"] += s["prefix_cache"]["prefill_tokens_computed"]
        totals["prefix_hit_tokens"] += s["prefix_cache"]["hit_tokens"]
        totals["remote_hit_blocks"] += (s.get("kv_tiers") or {}).get("remote", {}).get("hit_blocks", 0)
    return totals


async def workload(url: str, wl: MultiTurn, tolerant: bool = False) -> tuple[list, float]:
    """Every client at once; `tolerant`: clients that fail (an engine killed) end quietly."""
    records: list = []
    async with httpx.AsyncClient(timeout=600) as client:
        started = time.perf_counter()
        await asyncio.gather(*(run_client(client, url, wl, k, records) for k in range(wl.clients)),
                             return_exceptions=tolerant)
        return records, time.perf_counter() - started


def one_run(name: str, args, routing: str, redis: bool, wl: MultiTurn, kill: bool = False) -> dict:
    engine_args = ["--model", args.model] if args.model else []
    engine_args += args.engine_args
    with running_cluster(args.engines, engine_args, routing, redis,
                         gateway_args=["--load-slack", str(args.load_slack)]) as cluster:
        wait_healthy(cluster.url, args.engines)
        records, wall = asyncio.run(workload(cluster.url, wl))
        totals = engine_totals(cluster.addresses)
        returning = [r["ttft"] for r in records if r["turn"] > 0]
        firsts = [r["ttft"] for r in records if r["turn"] == 0]
        result = {"run": name, "routing": routing, "redis": redis, "wall_s": wall,
                  "generated_tokens": sum(r["tokens"] for r in records),
                  "tokens_per_s": sum(r["tokens"] for r in records) / wall,
                  "ttft_p50_first_s": statistics.median(firsts), "ttft_p50_returning_s": statistics.median(returning),
                  **totals}
        if kill:
            result["kill_to_out_s"] = kill_one(cluster, wl)
        print(json.dumps(result), flush=True)
        return result


def wait_healthy(url: str, engines: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{url}/health", timeout=5)
            if r.status_code == 200 and sum(e["healthy"] for e in r.json()["engines"]) == engines:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError("the engines did not come into service")


def kill_one(cluster, wl: MultiTurn) -> float:
    """Kills the last engine while the workload runs again; seconds until /health shows it out."""
    load = threading.Thread(target=lambda: asyncio.run(workload(cluster.url, wl, tolerant=True)), daemon=True)
    load.start()
    time.sleep(2.0)
    victim = cluster.engines[-1]
    victim.kill()
    killed = time.monotonic()
    while time.monotonic() - killed < 30:
        engines = httpx.get(f"{cluster.url}/health", timeout=5).json()["engines"]
        if not engines[-1]["healthy"]:
            out = time.monotonic() - killed
            break
        time.sleep(0.01)
    else:
        out = float("inf")
    routed = httpx.get(f"{cluster.url}/health", timeout=5).json()["engines"][-1]["routed"]
    load.join(300)
    after = httpx.get(f"{cluster.url}/health", timeout=5).json()["engines"][-1]["routed"]
    if after != routed:
        print(f"requests were routed to the dead engine after it was taken out: {after - routed}", file=sys.stderr)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", type=int, default=3)
    parser.add_argument("--conversations", type=int, default=12)
    parser.add_argument("--clients", type=int, default=4, help="each plays its conversations round robin")
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--system-tokens", type=int, default=128, help="the system prompt every conversation shares")
    parser.add_argument("--context-mean", type=int, default=384, help="each conversation's own context (tokens)")
    parser.add_argument("--message-mean", type=int, default=48, help="a user message (tokens)")
    parser.add_argument("--answer-mean", type=int, default=24, help="an answer (tokens)")
    parser.add_argument("--model", help="default: the engines' default model")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--load-slack", type=int, default=LOAD_SLACK, help="the gateway's --load-slack")
    parser.add_argument("--runs", default="round-robin,prefix,round-robin+redis")
    parser.add_argument("engine_args", nargs=argparse.REMAINDER, help="flags for every engine, after --")
    args = parser.parse_args()
    args.engine_args = args.engine_args[1:] if args.engine_args[:1] == ["--"] else args.engine_args
    wl = make_workload(args)
    results = {}
    for name in args.runs.split(","):
        routing = "prefix" if name.startswith("prefix") else "round-robin"
        results[name] = one_run(name, args, routing, name.endswith("+redis"), wl, kill=name == "prefix")
    rr, pa, rd = results.get("round-robin"), results.get("prefix"), results.get("round-robin+redis")
    lines = []
    if rr and pa:
        lines += [f"prefill tokens computed, prefix / round-robin: {pa['prefill_tokens_computed']} / "
                  f"{rr['prefill_tokens_computed']} = {pa['prefill_tokens_computed'] / rr['prefill_tokens_computed']:.2f} "
                  "(target <= 0.33)",
                  f"tokens/s, prefix / round-robin: {pa['tokens_per_s']:.1f} / {rr['tokens_per_s']:.1f} = "
                  f"{pa['tokens_per_s'] / rr['tokens_per_s']:.2f}x (target >= 1.5)",
                  f"TTFT p50 of returning turns, round-robin / prefix: {rr['ttft_p50_returning_s'] * 1e3:.0f} / "
                  f"{pa['ttft_p50_returning_s'] * 1e3:.0f} ms = "
                  f"{rr['ttft_p50_returning_s'] / pa['ttft_p50_returning_s']:.2f}x (target >= 2)"]
    if rr and rd:
        lines.append(f"prefill tokens computed, round-robin+redis / round-robin: {rd['prefill_tokens_computed']} / "
                     f"{rr['prefill_tokens_computed']} = {rd['prefill_tokens_computed'] / rr['prefill_tokens_computed']:.2f} "
                     f"(target <= 0.5; {rd['remote_hit_blocks']} remote hits)")
    if pa and "kill_to_out_s" in pa:
        lines.append(f"engine killed: out of the gateway's rotation after {pa['kill_to_out_s'] * 1e3:.0f} ms (target < 2 s)")
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results, "summary": lines}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
