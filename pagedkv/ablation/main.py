"""Swap vs recompute: when does swapping to pinned CPU RAM beat recomputation on this model
and machine, and does the automatic policy choose well? (The vLLM paper's Fig. 19.)

    pagedkv ablate --quick          # about 2 minutes on a 2-core CPU
    pagedkv ablate                  # every block size 1..256, contexts 256..4096
    pagedkv ablate --device cuda    # on a GPU: pinned host memory over PCIe

On a CPU, times are the process's CPU time by default (`--clock`), on one torch thread, so
that other work on the machine does not distort them; on CUDA they are wall-clock times.

Three parts: micro (swap out + in vs recompute per block size and context), end to end (one
workload at several request rates in swap, recompute and auto modes, with a verdict per
rate), and memory (KV waste and memory saved by sharing for parallel sampling and beam
search). Writes micro.csv, e2e.csv, memory.csv, results.json, micro.png, e2e.png,
memory.png and summary.md into --out (a fresh folder unless named), and with --update-docs into
docs/ablation/ and a section of docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

from pagedkv import EngineConfig
from pagedkv.runtime.engine.config import DTYPES
from pagedkv.ablation.report import BENCHMARKS, add_output_arguments, machine_description, output_folder, write_section

SECTION = "Swap vs recompute ablation"
FULL = dict(block_sizes=[1, 2, 4, 8, 16, 32, 64, 128, 256], contexts=[256, 512, 1024, 2048, 4096],
            rates=[0.5, 1.0, 2.0, 4.0], num_requests=32, e2e_repeats=2, prompt_mean=96, output_mean=64,
            max_prompt=512, max_output=192, repeats=3, memory_requests=12,
            memory_scale=0.5)
QUICK = dict(block_sizes=[1, 16, 256], contexts=[256, 1024], rates=[0.5, 2.0], num_requests=12, e2e_repeats=2,
             prompt_mean=48, output_mean=24, max_prompt=192, max_output=64, repeats=2,
             memory_requests=6, memory_scale=0.25)
PARTS = ("micro", "e2e", "memory")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
    return [math.inf if x.strip() in ("inf", "all") else float(x) for x in text.split(",") if x.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--model", help="Hugging Face folder or .gguf file (default: SmolLM2-135M-Instruct)")
    add("--device", choices=["cuda", "cpu"])
    add("--dtype", choices=list(DTYPES))
    add("--quick", action="store_true", help="fewer block sizes, contexts, rates and requests (minutes on a CPU)")
    add("--block-sizes", type=_ints, help="micro: block sizes, e.g. 1,2,4,...,256")
    add("--contexts", type=_ints, help="micro: context lengths in tokens, e.g. 256,1024,4096")
    add("--repeats", type=int, help="micro: swaps (and prefills up to 1024 tokens) per point; the median counts")
    add("--rates", type=_floats, help="end to end: request rates in req/s ('inf': all at once)")
    add("--num-requests", type=int, help="end to end: requests in the workload")
    add("--memory-requests", type=int, help="memory: requests, each run at widths 2, 4, 6")
    add("--memory-scale", type=float, help="memory: mean lengths as a fraction of ShareGPT's (161 prompt, "
        "338 output tokens); the ratio of the two is what sets the sharing")
    add("--prompt-mean", type=float, help="mean prompt length (long-tailed)")
    add("--output-mean", type=float, help="mean output length (long-tailed)")
    add("--max-prompt", type=int)
    add("--max-output", type=int)
    add("--e2e-block-size", type=int, default=16, help="end to end: block size (default 16)")
    add("--e2e-repeats", type=int,
        help="end to end: replays per point, each with other arrival times; latencies pool over them")
    add("--e2e-blocks", type=int, help="end to end: device KV blocks (default: the largest request alone fits)")
    add("--skip", action="append", choices=PARTS, default=[], help="leave a part out (repeatable)")
    add("--clock", choices=["auto", "wall", "cpu"], default="auto",
        help="wall: real time. cpu: this process's CPU time, with the end-to-end replays on a virtual clock "
             "driven by it (idle gaps skipped): figures that other work on the machine does not distort; "
             "CPU devices only. auto (default): cpu on a CPU device, wall on CUDA")
    add("--threads", type=int, help="torch CPU threads (default: 1 with the cpu clock, where more threads "
        "would count their spin-waits as work; torch's choice otherwise)")
    add("--seed", type=int, default=0)
    add_output_arguments(parser, "ablation")
    add("--no-progress", action="store_true", help="no progress bars")


def _settings(args: argparse.Namespace) -> dict:
    s = dict(QUICK if args.quick else FULL)
    for key in ("block_sizes", "contexts", "rates", "num_requests", "prompt_mean", "output_mean", "max_prompt",
                "max_output", "repeats", "memory_requests", "memory_scale", "e2e_repeats"):
        if getattr(args, key, None) is not None:
            s[key] = getattr(args, key)
    return s


def _memory(loaded, engine_args, requests, progress):
    """Rows from pagedkv.ablation.sharing when it is there; (None, why) otherwise."""
    try:
        from pagedkv.ablation.sharing import measure_sharing
    except ImportError:
        return None, "Not measured: pagedkv.ablation.sharing is not available in this checkout."
    return measure_sharing(loaded, requests, widths=(2, 4, 6), engine_args=engine_args, progress=progress), None


def run(args: argparse.Namespace) -> int:
    import torch

    before = torch.get_num_threads()
    args = argparse.Namespace(**{**vars(args), "clock": resolve_clock(args.clock, args.device)})
    threads = args.threads or (1 if args.clock == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(before)


def resolve_clock(clock: str, device: str | None) -> str:
    import torch

    on_cuda = device == "cuda" or (device is None and torch.cuda.is_available())
    if clock == "auto":
        return "wall" if on_cuda else "cpu"
    if clock == "cpu" and on_cuda:
        raise SystemExit("--clock cpu counts CPU time only, and GPU work is not CPU time: use --clock wall")
    return clock


def _run(args: argparse.Namespace) -> int:
    import torch

    from pagedkv import load_model
    from pagedkv.ablation import plots
    from pagedkv.ablation import summary
    from pagedkv.ablation.e2e import WorkloadSpec, build_workload, cache_blocks, measure_e2e, params_for
    from pagedkv.ablation.micro import measure_micro
    from pagedkv.ablation.workload import describe, make_workload

    started = time.monotonic()
    s = _settings(args)
    progress = not args.no_progress
    out = output_folder(args, "ablate", "ablation")
    engine_args = {k: getattr(args, k) for k in ("model", "device", "dtype") if getattr(args, k, None)}
    base = EngineConfig(**engine_args)
    device, dtype = base.torch_device(), base.torch_dtype()
    timer = time.process_time if args.clock == "cpu" else time.perf_counter
    loaded = load_model(args.model)
    name = os.path.basename(loaded.source.rstrip("/"))
    if device.type == "cuda":
        transfer = f"pinned host memory over PCIe, {torch.cuda.get_device_name(device)}"
    else:
        transfer = "a copy within host RAM: on the CPU, the device pool is host memory too"
    spec = WorkloadSpec(num_requests=s["num_requests"], prompt_mean=s["prompt_mean"], output_mean=s["output_mean"],
                        max_prompt=s["max_prompt"], max_output=s["max_output"])
    warnings: list[str] = []

    timings: dict[str, float] = {}

    def timed(name: str, fn):
        start = time.monotonic()
        result = fn()
        timings[name] = time.monotonic() - start
        print(f"{name}: {timings[name]:.0f} s", file=sys.stderr, flush=True)
        return result

    workload = build_workload(spec, loaded.config.vocab_size, math.inf, args.seed)
    micro = []
    if "micro" not in args.skip:
        micro = timed("micro", lambda: measure_micro(loaded, engine_args, s["block_sizes"], s["contexts"],
                                                     repeats=s["repeats"], seed=args.seed, progress=progress,
                                                     timer=timer))
    e2e, cache_note = [], ""
    if "e2e" not in args.skip:
        e2e, found = timed("end to end", lambda: measure_e2e(
            loaded, engine_args, spec, s["rates"], block_size=args.e2e_block_size, num_blocks=args.e2e_blocks,
            seed=args.seed, progress=progress, clock=args.clock, repeats=s["e2e_repeats"]))
        warnings += found
        bs = args.e2e_block_size
        blocks = args.e2e_blocks or cache_blocks(workload, params_for(spec, args.seed), bs)
        cache_note = f"{blocks} blocks of {bs} tokens ({blocks * bs} tokens), room for the largest request alone"
    memory, memory_note = None, None
    if "memory" not in args.skip:
        k = s["memory_scale"]
        sharegpt = make_workload(s["memory_requests"], loaded.config.vocab_size, seed=args.seed,
                                 prompt_mean=161 * k, output_mean=338 * k, max_prompt=max(int(1024 * k), 16),
                                 max_output=max(int(1024 * k), 16))
        memory_desc = f"ShareGPT's mean lengths scaled by {k:g} ({describe(sharegpt)})"
        memory, memory_note = timed("memory", lambda: _memory(loaded, engine_args, sharegpt, progress))
    verdict_rows = summary.verdicts(e2e)

    images = {}
    if micro:
        plots.plot_micro(micro, out / "micro.png", device.type)
        summary.write_csv(out / "micro.csv", micro)
        images["micro"] = "micro.png"
    if e2e:
        plots.plot_e2e(e2e, out / "e2e.png", device.type)
        summary.write_csv(out / "e2e.csv", e2e)
        images["e2e"] = "e2e.png"
    if memory:
        plots.plot_memory(memory, out / "memory.png")
        summary.write_csv(out / "memory.csv", memory)
        images["memory"] = "memory.png"
    meta = {"device": device.type, "dtype": str(dtype).removeprefix("torch."), "model": name,
            "machine": machine_description(), "quick": args.quick, "threads": torch.get_num_threads(),
            "clock": args.clock, "transfer": transfer,
            "repeats": s["repeats"], "settings": {k: v for k, v in s.items() if k != "rates"},
            "rates": [summary._rate(r) for r in s["rates"]], "seed": args.seed,
            "workload": (f"{spec.num_requests} requests, prompts long-tailed around {spec.prompt_mean:g} tokens "
                         f"(at most {spec.max_prompt}), outputs around {spec.output_mean:g} (at most "
                         f"{spec.max_output}); every {spec.sample_every}th samples n = {spec.sample_n}, every "
                         f"{spec.beam_every}th is a beam search of width {spec.beam_width}, the rest greedy"
                         + (f"; {s['e2e_repeats']} replays per point with other arrival times, pooled"
                            if s["e2e_repeats"] > 1 else "")),
            "e2e_cache": cache_note, "memory_note": memory_note,
            "memory_workload": memory_desc if "memory" not in args.skip else "",
            "phase_seconds": timings, "elapsed_s": time.monotonic() - started}
    summary.write_json(out / "results.json", meta, micro, e2e, verdict_rows, memory, warnings)
    text = summary.summary(meta, micro, e2e, verdict_rows, memory, warnings, images)
    (out / "summary.md").write_text(f"# {SECTION}\n\nMachine: {meta['machine']}\n\n{text}\n")
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    if verdict_rows:
        print(summary.verdict_table(verdict_rows))
    print(f"wrote {out}/ (summary.md, results.json, CSV, PNG) in {meta['elapsed_s'] / 60:.1f} min")
    if args.update_docs:
        rel = os.path.relpath(out.resolve(), BENCHMARKS.parent)
        linked = {k: f"{rel}/{v}" for k, v in images.items()}
        body = summary.summary(meta, micro, e2e, verdict_rows, memory, warnings, linked)
        write_section(SECTION, body + f"\n\nCSV, JSON and the summary: `{rel}/`.")
    return 0


def register(subparsers) -> None:
    """`pagedkv ablate`, a subcommand of the `pagedkv` command."""
    ablate = subparsers.add_parser("ablate", help="swap vs recompute: when each wins, and whether auto chooses well")
    add_arguments(ablate)
    ablate.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pagedkv ablate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
