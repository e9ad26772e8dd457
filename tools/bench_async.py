"""Async scheduling on the CPU: the engine with and without `--async-scheduling`, side by side.

    python -m tools.bench_async [--setups 1/1,1/2,2/2] [--repeats 3] [--new-tokens 400]
                                [--requests 64] [--model PATH] [--out DIR] [--update-docs]

Each setup is torch threads / cores: every run is a fresh child process confined to that many
cores (taskset), the two modes alternating, `--repeats` times; medians. Workload A: one
128-token prompt, `--new-tokens` greedy tokens (decode ms per token). Workload B: `--requests`
requests all at once, the long-tailed lengths of tools.bench_cpu_peers (tokens per second).
Every run's tokens are checked equal between the modes.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from pagedkv.ablation.report import add_output_arguments, markdown_table, output_folder, publish

TITLE = "Async scheduling on the CPU"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child(spec: dict) -> dict:
    import torch

    from pagedkv import EngineConfig, LLMEngine, SamplingParams
    from tools.bench_cpu_peers import workload_b

    torch.set_num_threads(spec["threads"])
    engine = LLMEngine(EngineConfig(model=spec["model"], device="cpu", swap_space_gib=0.0,
                                    async_scheduling=spec["async"]))
    vocab = engine.model_config.vocab_size

    def run(prompts: list[list[int]], lengths: list[int]) -> tuple[float, list]:
        for i, (prompt, n) in enumerate(zip(prompts, lengths)):
            engine.add_request(str(i), prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True),
                               stream=False)
        started, done = time.perf_counter(), {}
        while engine.has_unfinished():
            done.update({o.request_id: o.outputs[0].token_ids for o in engine.step()})
        return time.perf_counter() - started, [done[str(i)] for i in range(len(prompts))]

    run([[100, 101, 102, 103]], [8])  # warm-up
    prompt = torch.randint(16, vocab, (128,), generator=torch.Generator().manual_seed(1)).tolist()
    seconds_a, tokens_a = run([prompt], [spec["new_tokens"]])
    prompts, lengths = workload_b(spec["requests"], vocab)
    seconds_b, tokens_b = run(prompts, lengths) if prompts else (0.0, [])
    return {"a_ms": 1e3 * seconds_a / spec["new_tokens"], "b_tok_s": sum(lengths) / seconds_b if prompts else None,
            "tokens": tokens_a + tokens_b}


def measure(spec: dict, cores: int) -> dict:
    cmd = ["taskset", "-c", f"0-{cores - 1}", sys.executable, "-m", "tools.bench_async", "--child", json.dumps(spec)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"bench_async: a run failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setups", default="1/1,1/2,2/2", help="torch threads / cores, comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=400, help="workload A's generated tokens")
    parser.add_argument("--requests", type=int, default=64, help="workload B's requests (0: none)")
    parser.add_argument("--model", help="(default: SmolLM2-135M-Instruct, its GGUF file's 4-bit matrices kept)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    if args.repeats < 1 or args.new_tokens < 2 or args.requests < 0:
        parser.error("--repeats >= 1, --new-tokens >= 2 and --requests >= 0, please")
    setups = [tuple(int(x) for x in s.split("/")) for s in args.setups.split(",")]
    if any(t < 1 or c < 1 or c > os.cpu_count() for t, c in setups):
        parser.error(f"--setups takes threads/cores with 1 <= cores <= {os.cpu_count()}, got {args.setups}")
    out = output_folder(args, "bench_async")
    rows = []
    for threads, cores in setups:
        runs: dict[bool, list[dict]] = {False: [], True: []}
        for repeat in range(args.repeats):
            for mode in (False, True):
                spec = {"threads": threads, "async": mode, "model": args.model, "new_tokens": args.new_tokens,
                        "requests": args.requests}
                runs[mode].append(measure(spec, cores))
                print(f"bench_async: {threads} threads on {cores} cores, async {mode}, run {repeat + 1}: "
                      f"A {runs[mode][-1]['a_ms']:.2f} ms/token, B {runs[mode][-1]['b_tok_s'] or 0:.1f} tok/s",
                      file=sys.stderr, flush=True)
        if any(r["tokens"] != runs[False][0]["tokens"] for r in runs[True] + runs[False]):
            raise SystemExit("bench_async: the modes' tokens differ")
        a = {m: statistics.median(r["a_ms"] for r in runs[m]) for m in runs}
        row = [f"{threads} / {cores}", f"{a[False]:.2f}", f"{a[True]:.2f}", f"{a[False] / a[True]:.2f}x"]
        if args.requests:
            b = {m: statistics.median(r["b_tok_s"] for r in runs[m]) for m in runs}
            row += [f"{b[False]:.1f}", f"{b[True]:.1f}", f"{b[True] / b[False]:.2f}x"]
        rows.append(row)
    header = ["threads / cores", "A ms/token, off", "A, on", "A speed-up"]
    if args.requests:
        header += ["B tok/s, off", "B, on", "B speed-up"]
    load = os.getloadavg()
    body = (f"Medians of {args.repeats} runs per mode, alternating, each a fresh process on its cores; "
            f"A: {args.new_tokens} greedy tokens after a 128-token prompt; B: {args.requests} requests "
            f"at once. Tokens equal in every run. Speed-up above 1: faster with async scheduling. "
            f"Load average at the end: {load[0]:.2f}.\n\n"
            + markdown_table(header, rows))
    print(body)
    publish(TITLE, body, out, args.update_docs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
