"""Load or recompute: on the same cached history, the time to first token when its blocks are
read from the disk tier and when they are recomputed, side by side, and what the cost model
picks, from the page cache, from the disk, and from a deliberately slow disk.

    python -m tools.bench_tier_cost [--quick] [--lengths 256,512,1024,2048] [--repeats 3]
                                    [--throttle-mbps 10,3] [--threads N] [--out DIR] [--update-docs]
                                    [--model PATH]

For each history length, one history of random tokens is prefilled once and its blocks are
written to each source's folder (the engine closes, keeping its cached blocks on disk). Then,
per source and repeat, three fresh engines run the same returning turn (the history and 16 new
tokens, one output token) with an empty device pool:
- recompute: no disk tier; the history is prefilled;
- load: the disk tier, the cost model overruled to always load;
- auto: the disk tier and the cost model's own choice.

Sources: `page cache` (a folder on the machine's disk, its files just written: reads come from
memory), `disk` (the same folder, its pages dropped from the page cache before each read:
posix_fadvise DONTNEED), `throttled disk, N MB/s` (a folder on an ext4 file system in a file,
mounted through a loop device whose reads a blkio cgroup caps at each of --throttle-mbps, pages
dropped likewise; root only, tools/throttled_dir.py; left out without root or with
--throttle-mbps 0).

The cost model (pagedkv/preemption/policy.py) estimates a load as the blocks' bytes over the
tier's read bandwidth and a recompute as the tokens over the prefill rate, both learned as the
engine runs (moving averages of wall-clock measurements). Each source has one cost model that
lives across its engines (each engine starts from the estimates the one before it left), as
one engine running this sequence would have; it starts from the prefill rate that the
prefills writing the histories left. Times are wall-clock (a read waits for the disk,
which CPU time does not count), on one torch thread by default.

Writes results.json into --out, or a fresh folder; with --update-docs, a section of
docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from pagedkv import EngineConfig, LLMEngine, LoadedModel, SamplingParams, load_model
from pagedkv.ablation.report import add_output_arguments, markdown_table, output_folder, publish
from pagedkv.ablation.workload import FIRST_PLAIN_TOKEN
from pagedkv.preemption.policy import CostModel
from tools.bench_multiturn import drop_page_cache, load_average

TITLE = "KV tiers: load or recompute"
NEW_TOKENS = 16
PAGE_CACHE, DISK = "page cache", "disk"


def throttled_name(mbps: float) -> str:
    return f"throttled disk, {mbps:g} MB/s"


def carry(dst: CostModel, src: CostModel) -> None:
    """`dst` continues from `src`'s estimates, as one engine running the whole sequence would."""
    for f in fields(CostModel):
        setattr(dst, f.name, copy.copy(getattr(src, f.name)))


@dataclass
class Measurement:
    source: str
    length: int
    repeat: int
    mode: str              # recompute, load or auto
    ttft: float            # wall seconds from the request's arrival to its first token
    loaded_blocks: int     # blocks the disk tier gave
    predicted_load: float = 0.0       # the cost model's estimates when the request was admitted
    predicted_recompute: float = 0.0


@dataclass
class Source:
    name: str
    folder: Path
    cold: bool  # drop the folder's pages from the page cache before each read
    read_mbps: float = 0.0  # the throttle to set first (0: none)
    cost: CostModel = field(default_factory=CostModel)


def one_turn(engine: LLMEngine, prompt: list[int]) -> float:
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    engine.add_request(f"turn-{random.random()}", prompt, params)
    started = time.perf_counter()
    first = None
    while engine.has_unfinished():
        for output in engine.step():
            if first is None and (output.finished or output.outputs[0].token_ids):
                first = time.perf_counter() - started
        if first is None and not engine.has_unfinished():
            raise RuntimeError("the turn finished without a token")
    return first


class Bench:
    def __init__(self, loaded: LoadedModel, engine_args: dict, block_size: int = 16) -> None:
        self.loaded, self.engine_args, self.block_size = loaded, engine_args, block_size
        self.cost = CostModel()  # what the prefills writing the histories taught

    def engine(self, blocks: int, folder: Path | None) -> LLMEngine:
        return LLMEngine(EngineConfig(**self.engine_args, block_size=self.block_size, num_device_blocks=blocks,
                                      swap_space_gib=0.01, kv_disk_cache_dir=str(folder) if folder else None,
                                      kv_disk_cache_gb=4.0), self.loaded)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size) + 4

    def write(self, history: list[int], folders: list[Path]) -> None:
        """The history's blocks into each folder: prefilled once, stored by an engine that closes."""
        for folder in folders:
            engine = self.engine(self.blocks_for(len(history) + 1), folder)
            carry(engine.cost, self.cost)
            one_turn(engine, history)
            carry(self.cost, engine.cost)
            engine.close()

    def measure(self, source: Source, history: list[int], repeat: int, mode: str) -> Measurement:
        prompt = history + [FIRST_PLAIN_TOKEN + i for i in range(NEW_TOKENS)]
        engine = self.engine(self.blocks_for(len(prompt)), None if mode == "recompute" else source.folder)
        cost = engine.cost
        carry(cost, source.cost)
        bm = engine.block_manager
        if mode == "load":
            bm.tiers.should_load = lambda tier, num_blocks: True
        full = (len(prompt) - 1) // self.block_size  # the blocks a turn can find cached
        history_blocks = min(full, len(history) // self.block_size)
        nbytes = history_blocks * engine.cache.spec.bytes_per_block
        predicted_load = cost.load_seconds("disk", nbytes)
        predicted_recompute = cost.recompute_seconds(history_blocks * self.block_size)
        if source.cold and mode != "recompute":
            drop_page_cache(source.folder)
        try:
            ttft = one_turn(engine, prompt)
            tiers = engine.stats()["kv_tiers"]
        finally:
            engine.close()
        carry(source.cost, cost)
        loaded = tiers.get("disk", {}).get("hit_blocks", 0)
        return Measurement(source.name, len(history), repeat, mode, ttft, loaded, predicted_load, predicted_recompute)


def summarize(measurements: list[Measurement]) -> tuple[list[list], list[list]]:
    """One row per source and length: the medians of load and recompute, what auto chose each
    time and what that took; and whether a choice was ever slower than the other way by more
    than 10% (by the medians of the two forced ways)."""
    by: dict[tuple[str, int], dict[str, list[Measurement]]] = {}
    for m in measurements:
        by.setdefault((m.source, m.length), {}).setdefault(m.mode, []).append(m)
    rows, worst = [], []
    for (source, length), modes in by.items():
        load = statistics.median(m.ttft for m in modes["load"])
        recompute = statistics.median(m.ttft for m in modes["recompute"])
        autos = modes.get("auto", [])
        choices = ["load" if m.loaded_blocks else "recompute" for m in autos]
        faster = "load" if load <= recompute else "recompute"
        penalties = [(load if c == "load" else recompute) / min(load, recompute) - 1 for c in choices]
        worst.append(max(penalties, default=0.0))
        predicted = ", ".join(f"{m.predicted_load:.3g} / {m.predicted_recompute:.3g}" for m in autos)
        rows.append([source, length, f"{load:.2f}", f"{recompute:.2f}", faster,
                     ", ".join(f"{choices.count(c)}x {c}" for c in ("load", "recompute") if c in choices),
                     f"{statistics.median(m.ttft for m in autos):.2f}" if autos else "", predicted,
                     f"{100 * max(penalties, default=0.0):.0f}%"])
    worst_penalty = max(worst, default=0.0)
    targets = [["the cost model's choice, slower than the other way by (worst row, medians of the forced runs)",
                f"{100 * worst_penalty:.0f}%", "<= 10%", "yes" if worst_penalty <= 0.10 else "no"]]
    return rows, targets


HEADER = ["source", "history tokens", "load s", "recompute s", "faster", "auto chose", "auto s",
          "model's estimate at each auto run, load / recompute s", "auto slower than the faster by"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="Hugging Face folder or .gguf file (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--device", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="short histories, one repeat")
    parser.add_argument("--lengths", help="history lengths in tokens (default 256,512,1024,2048)")
    parser.add_argument("--repeats", type=int, help="runs of each way per source and length (default 3)")
    parser.add_argument("--throttle-mbps", default="10,3",
                        help="read bandwidths of the throttled disk, MB/s, comma-separated (0: leave it out; "
                             "root only)")
    parser.add_argument("--throttle-where", type=Path, default=Path("/var/tmp"),
                        help="where the throttled disk's image file goes")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--notes", default="", help="a paragraph to put under the tables")
    add_output_arguments(parser)
    args = parser.parse_args(argv)

    import os

    import torch

    torch.set_num_threads(args.threads)
    lengths = [int(x) for x in (args.lengths or ("64,128" if args.quick else "256,512,1024,2048")).split(",")]
    repeats = args.repeats or (1 if args.quick else 3)
    loaded = load_model(args.model)
    bench = Bench(loaded, {"model": args.model, "device": args.device})
    out = output_folder(args, "bench_tier_cost")
    load_before = load_average()
    work = Path(tempfile.mkdtemp(prefix="pagedkv-tier-cost-"))
    rng = random.Random(args.seed)
    histories = {n: [rng.randrange(FIRST_PLAIN_TOKEN, loaded.config.vocab_size) for _ in range(n)] for n in lengths}
    rates = [float(x) for x in args.throttle_mbps.split(",") if float(x) > 0]
    throttle = None
    if rates and os.geteuid() == 0:
        from tools.throttled_dir import throttled

        throttle = throttled(rates[0], 2 + 2 * sum(lengths) * 50_000 / (1 << 30), args.throttle_where)
    measurements: list[Measurement] = []
    try:
        slow = throttle.__enter__() if throttle else None
        sources = [Source(PAGE_CACHE, work / "fast", False), Source(DISK, work / "fast", True)]
        if slow:
            sources += [Source(throttled_name(r), Path(slow.mount) / "kv", True, r) for r in rates]
        warm = bench.engine(64, None)
        one_turn(warm, histories[lengths[0]][:32])  # the first model calls, paid here
        bytes_per_token = warm.cache.spec.bytes_per_block // bench.block_size
        on_cuda = warm.cache.device.type == "cuda"
        warm.close()
        for n in lengths:
            bench.write(histories[n], sorted({s.folder for s in sources}))
        for source in sources:
            carry(source.cost, bench.cost)
            if source.read_mbps:
                slow.set_rate(source.read_mbps)
            for n in lengths:
                for repeat in range(repeats):
                    for mode in ("recompute", "load", "auto"):
                        measurements.append(bench.measure(source, histories[n], repeat, mode))
                        m = measurements[-1]
                        print(f"{source.name}, {n} tokens, {mode}: {m.ttft:.2f} s ({m.loaded_blocks} blocks loaded)",
                              flush=True)
    finally:
        if throttle:
            throttle.__exit__(None, None, None)
        shutil.rmtree(work, ignore_errors=True)
    rows, targets = summarize(measurements)
    description = (f"Model: {Path(loaded.source).name}, {args.threads} torch thread(s), wall clock; KV bytes per token "
                   f"{bytes_per_token}. Returning turn: the history and {NEW_TOKENS} new tokens, one output token, a "
                   f"fresh engine with an empty device pool each time; medians of {repeats} run(s). Sources: page "
                   "cache (files just written), disk (pages dropped first), "
                   + (f"throttled disk ({' and '.join(f'{r:g}' for r in rates)} MB/s reads, pages dropped first)"
                      if throttle else "no throttled disk (it needs root)") + ". "
                   "Auto: the cost model's choice, with the estimates one engine running this sequence would hold.")
    load = f"Load average (1 / 5 / 15 min) at the start: {load_before}; at the end: {load_average()}."
    text = "\n\n".join(p for p in [description, markdown_table(HEADER, rows),
                                   markdown_table(["target", "measured", "goal", "met"], targets), load, args.notes]
                         if p)
    print(text)
    (out / "results.json").write_text(json.dumps([asdict(m) for m in measurements], indent=2))
    publish(TITLE + (" (CUDA)" if on_cuda else " (CPU)"), text, out, args.update_docs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
