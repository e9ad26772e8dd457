"""Prefix caching on and off, side by side in one run: prefill tokens computed, time to first
token and throughput (CPU, or the GPU when there is one).

    python -m tools.bench_prefix [--quick] [--update-docs] [--out out/bench_prefix] [--repeats 3]
                                 [--threads N] [--clock auto|wall|cpu] [--seed 0] [--model PATH]

Workloads (tools.prefix_workloads; random token ids, greedy, every request generates exactly
its output length):
- shared system prompt: 200 requests, one 512-token system prompt and a user turn of 8-64
  tokens each, 32 output tokens; all arrive at t = 0;
- multi-turn chat: 16 conversations of 6 turns; a turn's prompt is the conversation so far
  (every earlier message and answer) plus a new message of 16-64 tokens, 32-token answers;
  a conversation's next turn arrives when its previous answer is complete;
- no shared prefix: 100 random prompts (long-tailed lengths, mean 128), 32 output tokens: what
  caching costs when nothing hits. Runs alternate off and on, `--repeats` times each.

Every run uses a fresh engine with the default settings (block size 16, 1 GiB of KV cache on
a CPU) but for prefix caching. Times are this process's CPU time on one torch thread on a CPU
(`--clock auto`; steady while other work shares the machine), wall time on CUDA. Throughput is
generated tokens per second; time to first token counts from a request's arrival. The greedy
outputs of the two settings are compared token for token.

Writes results.json into --out; with --update-docs, a section of docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from pagedkv import EngineConfig, LLMEngine, LoadedModel, RequestOutput, SamplingParams, load_model
from pagedkv.ablation.main import resolve_clock
from tools.prefix_workloads import Chats, multi_turn_chats, no_shared_prefix, shared_system_prompt
from pagedkv.ablation.replay import CpuClock, WallClock, percentile, replay
from pagedkv.ablation.report import markdown_table, write_section
from pagedkv.ablation.workload import WorkloadRequest

TITLE = "Prefix caching"
SHARED, CHAT, NONE = "shared system prompt", "multi-turn chat", "no shared prefix"


@dataclass
class Run:
    workload: str
    caching: bool
    requests: int
    prompt_tokens: int
    prefill_tokens: int      # prompt (and recomputed) tokens that went through the model
    hit_rate: float
    ttft_p50: float
    ttft_p99: float
    throughput: float        # generated tokens per second
    seconds: float
    outputs: dict[str, list[int]]


@dataclass
class Workload:
    name: str
    requests: list[WorkloadRequest]
    follow_up: Callable[[WorkloadRequest, RequestOutput], WorkloadRequest | None] | None = None


def greedy(request: WorkloadRequest) -> SamplingParams:
    return SamplingParams(max_tokens=request.output_len, temperature=0.0, ignore_eos=True)


def run_once(loaded: LoadedModel, engine_args: dict, workload: Workload, caching: bool, clock: str) -> Run:
    engine = LLMEngine(EngineConfig(**{**engine_args, "enable_prefix_caching": caching}), loaded)
    result = replay(engine, workload.requests, greedy, clock=CpuClock() if clock == "cpu" else WallClock(),
                    follow_up=workload.follow_up, desc=f"{workload.name}, caching {'on' if caching else 'off'}")
    if len(result.outputs) != len(result.timings) or any(o.error for o in result.outputs.values()):
        raise RuntimeError(f"{workload.name}: a request failed or did not finish")
    ttft = [t.time_to_first_token for t in result.timings.values()]
    cache = result.stats["prefix_cache"]
    prompt_tokens = sum(len(o.prompt_token_ids) for o in result.outputs.values())
    return Run(workload.name, caching, len(result.outputs), prompt_tokens, cache["prefill_tokens_computed"],
               cache["hit_rate"], percentile(ttft, 50), percentile(ttft, 99), result.throughput, result.elapsed,
               {rid: o.outputs[0].token_ids for rid, o in result.outputs.items()})


def warm_up(loaded: LoadedModel, engine_args: dict, vocab_size: int) -> None:
    """A short run first, so that neither setting pays for the first model calls."""
    run_once(loaded, engine_args, Workload("warm-up", shared_system_prompt(4, vocab_size, 32, (4, 8), 4)), True, "wall")


def measure(loaded: LoadedModel, engine_args: dict, workloads: list[Workload], overhead: Workload,
            repeats: int, clock: str) -> list[Run]:
    warm_up(loaded, engine_args, loaded.config.vocab_size)
    runs = [run_once(loaded, engine_args, w, caching, clock) for w in workloads for caching in (False, True)]
    for _ in range(repeats):
        runs += [run_once(loaded, engine_args, overhead, caching, clock) for caching in (False, True)]
    return runs


def _median_run(runs: list[Run]) -> Run:
    return sorted(runs, key=lambda r: r.throughput)[(len(runs) - 1) // 2]


def summarize(runs: list[Run]) -> tuple[list[list], list[list]]:
    """Table rows (one per workload and setting; the median throughput run where repeated)
    and target rows."""
    pairs: dict[str, dict[bool, list[Run]]] = {}
    for run in runs:
        pairs.setdefault(run.workload, {False: [], True: []})[run.caching].append(run)
    rows, targets = [], []
    for name, by in pairs.items():
        off, on = _median_run(by[False]), _median_run(by[True])
        same = all(a.outputs == b.outputs for a in by[False] for b in by[True])
        for run in (off, on):
            extra = f" (median of {len(by[run.caching])})" if len(by[run.caching]) > 1 else ""
            rows.append([name, "on" if run.caching else "off", run.requests, run.prompt_tokens, run.prefill_tokens,
                         f"{100 * run.hit_rate:.1f}%", f"{run.ttft_p50:.2f}", f"{run.ttft_p99:.2f}",
                         f"{run.throughput:.1f}{extra}", f"{run.seconds:.1f}", "yes" if same else "NO"])
        if name == NONE:
            ratio = on.throughput / off.throughput
            all_ratios = ", ".join(f"{b.throughput / a.throughput:.3f}" for a, b in zip(by[False], by[True]))
            targets.append([f"{name}: throughput on / off", f"{ratio:.3f} (pairs: {all_ratios})", ">= 0.98",
                            "yes" if ratio >= 0.98 else "no"])
            continue
        checks = [("prefill tokens computed, off / on", off.prefill_tokens / max(on.prefill_tokens, 1), 5.0),
                  ("throughput, on / off", on.throughput / off.throughput, 2.0),
                  ("time to first token p50, off / on", off.ttft_p50 / on.ttft_p50, 2.0)]
        for label, value, goal in checks:
            targets.append([f"{name}: {label}", f"{value:.2f}x", f">= {goal:g}x" if name == SHARED else "",
                            ("yes" if value >= goal else "no") if name == SHARED else ""])
    return rows, targets


HEADER = ["workload", "prefix caching", "requests", "prompt tokens", "prefill tokens computed", "hit rate",
          "TTFT p50 s", "TTFT p99 s", "tokens/s", "seconds", "same outputs"]


def report(runs: list[Run], description: str) -> str:
    rows, targets = summarize(runs)
    return "\n\n".join([description, markdown_table(HEADER, rows),
                        markdown_table(["target", "measured", "goal", "met"], targets)])


def workloads_for(vocab_size: int, quick: bool, seed: int) -> tuple[list[Workload], Workload]:
    if quick:  # seconds, for tests and a first look
        shared = shared_system_prompt(12, vocab_size, 64, (4, 12), 8, seed)
        chats: Chats = multi_turn_chats(3, 3, vocab_size, (4, 12), 8, seed)
        return ([Workload(SHARED, shared), Workload(CHAT, chats.first_turns, chats.follow_up)],
                Workload(NONE, no_shared_prefix(8, vocab_size, 24, 8, seed)))
    chats = multi_turn_chats(16, 6, vocab_size, seed=seed)
    return ([Workload(SHARED, shared_system_prompt(200, vocab_size, seed=seed)),
             Workload(CHAT, chats.first_turns, chats.follow_up)],
            Workload(NONE, no_shared_prefix(100, vocab_size, seed=seed)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="Hugging Face folder or .gguf file (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--device", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="tiny workloads (seconds)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int,
                        help="off/on pairs of the no-shared-prefix run (default 3, 1 with --quick)")
    parser.add_argument("--clock", choices=["auto", "wall", "cpu"], default="auto")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: 1 with the cpu clock)")
    parser.add_argument("--out", type=Path, default=Path("out/bench_prefix"), help="folder for results.json")
    parser.add_argument("--update-docs", action="store_true", help="write the section of docs/BENCHMARKS.md")
    args = parser.parse_args(argv)

    import torch

    clock = resolve_clock(args.clock, args.device)
    threads = args.threads or (1 if clock == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    loaded = load_model(args.model)
    engine_args = {"model": args.model, "device": args.device}
    workloads, overhead = workloads_for(loaded.config.vocab_size, args.quick, args.seed)
    repeats = args.repeats or (1 if args.quick else 3)
    runs = measure(loaded, engine_args, workloads, overhead, repeats, clock)
    device = EngineConfig(device=args.device).torch_device()
    description = (f"Model: {Path(loaded.source).name}, on {device.type}, {torch.get_num_threads()} torch thread(s); "
                   f"{'CPU-time' if clock == 'cpu' else 'wall'} clock. Workloads as in `tools/bench_prefix.py`: "
                   f"{', '.join(w.name for w in workloads)} and {overhead.name} ({repeats} pairs). "
                   "Prefill tokens computed: prompt tokens that went through the model; hit rate: prompt tokens "
                   "found in the cache on a request's first admission.")
    text = report(runs, description)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps([{k: v for k, v in asdict(r).items() if k != "outputs"}
                                                       for r in runs], indent=2))
    if args.update_docs:
        write_section(f"{TITLE} ({'CUDA' if device.type == 'cuda' else 'CPU'})", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
