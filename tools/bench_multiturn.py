"""KV tiers below the device pool, side by side in one run, on a multi-turn chat workload whose
live history is several times larger than the device pool: time to first token of returning
turns, prefill tokens computed, the hit ratio of each tier, and throughput.

    python -m tools.bench_multiturn [--quick] [--update-docs] [--out DIR] [--configs a,b,...]
                                    [--parts chat,no-reuse] [--repeats 3] [--clock auto|wall|cpu]
                                    [--threads N] [--disk-dir DIR] [--warm-restart] [--seed 0]
                                    [--trace-out PATH] [--model PATH]

Workload (tools.multiturn_workloads, shaped like vLLM's benchmarks/multi_turn): 8 conversations
of 4 turns behind one 512-token system prompt; each opens with a context of its own (log-normal,
mean 1536 tokens, 1280-2560), user messages log-normal (mean 64, 16-256), answers log-normal
(mean 32, 8-96). Two clients, each going round robin over its 4 conversations: a
conversation's next turn comes after every other conversation's turn, by which time its
history (about 2.3k tokens) has left a device pool of 384 blocks of 16 tokens (6144 tokens,
about a third of the live history). The workload runs in two halves, turns 0-1 then 2-3, so
that a restart can sit between them.

Settings, each a fresh engine (block size 16; 0.25 GiB of swap space):
- no prefix caching;
- device only: prefix caching in the device pool;
- device + host: a host tier of 4x the device pool (on a CPU the device pool is host memory
  already: the host tier then keeps a second copy in the same RAM, which is only worth it on a
  GPU; it is measured here anyway);
- device + disk: a disk tier of 10x the device pool (in a fresh folder under --disk-dir);
- device + host + disk: 2x and 8x;
- device + disk, restart: as device + disk, but the second half is served by a fresh engine
  on the same folder (the first one closes, keeping its cached blocks on disk); the folder's
  pages are dropped from the page cache first (posix_fadvise), so that the restarted engine
  reads from the disk itself (--warm-restart: leave them);
- unbounded device pool: every block of the workload fits; the reference hit ratio.

No reuse (`--parts no-reuse`): 100 random prompts (mean 128 tokens, 32 output tokens) that share
nothing, all at t = 0, in a device pool of 256 blocks that they overflow 4 times: with the tiers
on every evicted block is demoted or written and every lookup misses, which is what the tiers
cost. Off, disk (10x) and host + disk (2x, 8x) alternate, `--repeats` times each.

Times are this process's CPU time on one torch thread on a CPU (`--clock auto`; steady while
other work shares the machine, but a read that waits for the disk costs nothing on it), wall
time on CUDA; the wall-clock TTFT p50 is reported beside it. TTFT counts from the turn's
arrival (the previous answer of its client). The greedy outputs of every setting are compared
token for token.

Writes results.json (and BENCHMARKS-section.md) into --out, or a fresh folder; with
--update-docs, the section of docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pagedkv import EngineConfig, LLMEngine, LoadedModel, SamplingParams, load_model
from pagedkv.ablation.main import resolve_clock
from pagedkv.ablation.replay import CpuClock, WallClock, percentile, replay
from pagedkv.ablation.report import add_output_arguments, markdown_table, output_folder, publish
from pagedkv.ablation.workload import WorkloadRequest
from pagedkv.kvcache.cache_engine import GIB
from tools.multiturn_workloads import ChatClients, MultiTurn, multi_turn, to_trace
from tools.prefix_workloads import no_shared_prefix

TITLE = "KV tiers: multi-turn chat"
NONE, DEVICE, HOST, DISK, HOST_DISK, RESTART, UNBOUNDED = (
    "no prefix caching", "device only", "device + host", "device + disk", "device + host + disk",
    "device + disk, restart", "unbounded device pool")
CONFIGS = {"none": NONE, "device": DEVICE, "host": HOST, "disk": DISK, "host+disk": HOST_DISK, "restart": RESTART,
           "unbounded": UNBOUNDED}
TIERS = ("device", "host", "disk")


@dataclass
class Sizes:
    """The workload and the pools, in tokens and blocks."""

    conversations: int = 8
    turns: int = 4
    clients: int = 2
    system_tokens: int = 512
    context_mean: float = 1536
    context_range: tuple[int, int] = (1280, 2560)
    message_mean: float = 64
    message_range: tuple[int, int] = (16, 256)
    answer_mean: float = 32
    answer_range: tuple[int, int] = (8, 96)
    block_size: int = 16
    device_blocks: int = 384
    host_x: float = 4          # device + host
    disk_x: float = 10         # device + disk, and the restart
    mixed_x: tuple[float, float] = (2, 8)  # device + host + disk
    swap_space_gib: float = 0.25
    no_reuse_requests: int = 100
    no_reuse_prompt_mean: float = 128
    no_reuse_output: int = 32
    no_reuse_device_blocks: int = 256
    long_history: int = 2048   # tokens: the returning turns that the TTFT target is about


QUICK = Sizes(conversations=8, turns=4, clients=2, system_tokens=32, context_mean=64, context_range=(48, 96),
              message_mean=12, message_range=(4, 24), answer_mean=5, answer_range=(2, 8), device_blocks=40,
              no_reuse_requests=12, no_reuse_prompt_mean=40, no_reuse_output=8, no_reuse_device_blocks=24,
              swap_space_gib=0.01, long_history=128)


@dataclass
class Turn:
    request_id: str
    turn: int
    prompt_tokens: int
    history_tokens: int           # the conversation so far: the prompt without its new message
    hits: dict[str, int]          # tokens found at admission, per tier
    ttft: float                   # on the run's clock
    ttft_wall: float
    output: list[int] = field(default_factory=list)

    @property
    def returning(self) -> bool:
        return self.turn > 0


@dataclass
class Run:
    config: str
    clock: str
    turns: list[Turn]
    prefill_tokens: int           # prompt (and recomputed) tokens that went through the model
    generated_tokens: int
    seconds: float                # on the run's clock
    wall_seconds: float
    cpu_seconds: float
    tier_stats: list[dict]        # engine.stats()["kv_tiers"] of each engine (two for the restart)
    preemptions: dict
    restart_after_turn: int | None = None

    @property
    def prompt_tokens(self) -> int:
        return sum(t.prompt_tokens for t in self.turns)

    def hit_tokens(self, tier: str | None = None) -> int:
        return sum(t.hits.get(tier, 0) if tier else sum(t.hits.values()) for t in self.turns)

    def hit_ratio(self, tier: str | None = None) -> float:
        return self.hit_tokens(tier) / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def throughput(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds else 0.0


class Clocks:
    """The replay's clock (CPU time or wall time), noting the wall time at each reading so that a
    time on the one can be turned into the other."""

    def __init__(self, kind: str) -> None:
        self.inner = CpuClock() if kind == "cpu" else WallClock()
        self.origin = self.inner.origin
        self.started = time.monotonic()
        self.wall = {0.0: 0.0}

    def now(self) -> float:
        value = self.inner.now()
        self.wall[value] = time.monotonic() - self.started
        return value

    def wait_until(self, t: float) -> None:
        self.inner.wait_until(t)


def greedy(request: WorkloadRequest) -> SamplingParams:
    return SamplingParams(max_tokens=request.output_len, temperature=0.0, ignore_eos=True)


def record_admissions(engine: LLMEngine, record: dict[str, dict[str, int]]) -> None:
    """Notes, for each request's first admission, the prompt tokens each tier held: the device's
    cached prefix, and the blocks the host tier and the disk tier give after it (the disk's
    are read after admission; a read that fails is recomputed and counted in the tier's errors)."""
    bm = engine.block_manager
    allocate = bm.allocate

    def tier_hits() -> dict[str, int]:
        stats = bm.tiers.stats()
        return {tier: stats.get(tier, {}).get("hit_blocks", 0) for tier in ("host", "disk")}

    def recording(group, *args, **kwargs):
        before = tier_hits()
        alloc = allocate(group, *args, **kwargs)
        if group.request_id not in record and not group.recomputing:
            after = tier_hits()
            lower = {tier: (after[tier] - before[tier]) * bm.block_size for tier in after}
            record[group.request_id] = {"device": alloc.computed_tokens[0] - lower["host"], **lower}
        return alloc

    bm.allocate = recording


def drop_page_cache(folder: Path) -> None:
    """Asks the kernel to forget the folder's files' pages, so that the next reads go to the disk."""
    os.sync()
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


class Bench:
    def __init__(self, loaded: LoadedModel, engine_args: dict, sizes: Sizes, clock: str, disk_dir: Path,
                 cold_restart: bool = True, seed: int = 0) -> None:
        self.loaded, self.engine_args, self.sizes, self.clock = loaded, engine_args, sizes, clock
        self.disk_dir, self.cold_restart = disk_dir, cold_restart
        # A short run first, so that no setting pays for the first model calls.
        warm = multi_turn(2, 2, loaded.config.vocab_size, 1, 16, 32, (16, 48), 8, (4, 16), 4, (2, 8), seed=seed + 1)
        engine = LLMEngine(EngineConfig(**engine_args, block_size=sizes.block_size, num_device_blocks=64,
                                        swap_space_gib=0.0), loaded)
        replay(engine, ChatClients(warm, range(2)).first_requests(), greedy)
        self.block_bytes = engine.cache.spec.bytes_per_block
        engine.close()

    def gib(self, blocks: float) -> float:
        return blocks * self.block_bytes / GIB

    def config(self, name: str, device_blocks: int, folder: Path | None) -> EngineConfig:
        s = self.sizes
        host_x, disk_x = {HOST: (s.host_x, 0), DISK: (0, s.disk_x), RESTART: (0, s.disk_x),
                          HOST_DISK: s.mixed_x}.get(name, (0, 0))
        return EngineConfig(**self.engine_args, block_size=s.block_size, num_device_blocks=device_blocks,
                            swap_space_gib=s.swap_space_gib, enable_prefix_caching=name != NONE,
                            kv_host_cache_gb=self.gib(host_x * device_blocks) if host_x else None,
                            kv_disk_cache_dir=str(folder) if disk_x else None,
                            kv_disk_cache_gb=self.gib(disk_x * device_blocks) if disk_x else 10.0)

    def unbounded_blocks(self, workload: MultiTurn) -> int:
        """A device pool that holds every block of the workload, with room to run."""
        tokens = len(workload.system) + sum(len(m) + a + 1 for c in workload.conversations
                                            for m, a in zip(c.messages, c.answer_lens))
        return tokens // self.sizes.block_size + 2 * len(workload.conversations) + 64

    def chat(self, name: str, workload: MultiTurn) -> Run:
        half = workload.turns // 2
        device_blocks = self.unbounded_blocks(workload) if name == UNBOUNDED else self.sizes.device_blocks
        folder = Path(tempfile.mkdtemp(prefix="kv-", dir=self.disk_dir))
        record: dict[str, dict[str, int]] = {}
        history: dict[int, list[int]] = {}
        engines, results, clocks, news = [], [], [], {}
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            engine = None
            for part, turns in enumerate((range(half), range(half, workload.turns))):
                if engine is None or (name == RESTART and part == 1):
                    if engine is not None:
                        engine.close()  # its cached blocks go to the disk
                        if self.cold_restart:
                            drop_page_cache(folder)
                    engine = LLMEngine(self.config(name, device_blocks, folder), self.loaded)
                    record_admissions(engine, record)
                    engines.append(engine)
                clients = ChatClients(workload, turns, history)
                clock = Clocks(self.clock)
                result = replay(engine, clients.first_requests(), greedy, clock=clock, follow_up=clients.follow_up,
                                desc=f"{name}, turns {turns.start}-{turns.stop - 1}")
                if len(result.outputs) != len(result.timings) or any(o.error for o in result.outputs.values()):
                    raise RuntimeError(f"{name}: a request failed or did not finish")
                results.append(result)
                clocks.append(clock)
                news.update(clients.new_tokens)
            stats = [e.stats() for e in engines]
        finally:
            for e in engines:
                e.close()
            shutil.rmtree(folder, ignore_errors=True)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        turns = []
        for result, clock in zip(results, clocks):
            for rid, timing in result.timings.items():
                out = result.outputs[rid]
                prompt = len(out.prompt_token_ids)
                wall_ttft = clock.wall[timing.first_token] - clock.wall[timing.arrival]
                turns.append(Turn(rid, int(rid.rsplit("/", 1)[1]), prompt, prompt - news[rid], record[rid],
                                  timing.time_to_first_token, wall_ttft, out.outputs[0].token_ids))
        return Run(name, self.clock, turns, sum(s["prefix_cache"]["prefill_tokens_computed"] for s in stats),
                   sum(r.generated_tokens for r in results), sum(r.elapsed for r in results), wall, cpu,
                   [s["kv_tiers"] for s in stats],
                   {k: sum(s["preemptions"][k] for s in stats) for k in ("swap", "recompute")},
                   half - 1 if name == RESTART else None)

    def no_reuse(self, name: str, requests: list[WorkloadRequest]) -> Run:
        s = self.sizes
        folder = Path(tempfile.mkdtemp(prefix="kv-", dir=self.disk_dir))
        mixed = {"tiers off": DEVICE, "disk": DISK, "host + disk": HOST_DISK}[name]
        engine = LLMEngine(self.config(mixed, s.no_reuse_device_blocks, folder), self.loaded)
        record: dict[str, dict[str, int]] = {}
        record_admissions(engine, record)
        wall, cpu = time.perf_counter(), time.process_time()
        clock = Clocks(self.clock)
        try:
            result = replay(engine, requests, greedy, clock=clock, desc=f"no reuse, {name}")
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            stats = engine.stats()
        finally:
            engine.close()
            shutil.rmtree(folder, ignore_errors=True)
        turns = [Turn(rid, 0, len(o.prompt_token_ids), 0, record[rid], result.timings[rid].time_to_first_token,
                      0.0, o.outputs[0].token_ids) for rid, o in result.outputs.items()]
        return Run(name, self.clock, turns, stats["prefix_cache"]["prefill_tokens_computed"], result.generated_tokens,
                   result.elapsed, wall, cpu, [stats["kv_tiers"]], dict(stats["preemptions"]))


# -- summaries ------------------------------------------------------------------------------------
def left_the_device(runs: dict[str, Run]) -> set[str]:
    """Returning turns whose history had left the device pool: in the device-only run, the
    device held less than half of it at admission (each run judges itself where that run is
    missing)."""
    reference = runs.get(DEVICE)
    out = set()
    for run in ([reference] if reference else runs.values()):
        out |= {t.request_id for t in run.turns if t.returning and t.hits.get("device", 0) < t.history_tokens / 2}
    return out


def _p(values: list[float], q: float) -> str:
    return f"{percentile(values, q):.2f}" if values else ""


def restart_share(run: Run) -> dict[str, float]:
    """For the first turn of each conversation after the restart: the share of its history that
    the disk served, and the share served without computing (disk, or device blocks that an
    earlier turn of the restarted engine had loaded, such as the shared system prompt)."""
    first = [t for t in run.turns if t.turn == run.restart_after_turn + 1]
    history = sum(t.history_tokens for t in first)
    disk = sum(t.hits["disk"] for t in first)
    cached = sum(sum(t.hits.values()) for t in first)
    return {"turns": len(first), "history_tokens": history, "disk": disk / history if history else 0.0,
            "cached": cached / history if history else 0.0}


CHAT_HEADER = ["setting", "requests", "prompt tokens", "prefill tokens computed", "hit ratio", "device", "host", "disk",
               "TTFT p50 s, returning", "TTFT p95 s, returning", "TTFT p50 s, history left the device",
               "wall TTFT p50 s, same turns", "tokens/s", "seconds", "same outputs"]


def chat_rows(runs: dict[str, Run], long_history: int) -> tuple[list[list], set[str]]:
    left = left_the_device(runs)
    reference = runs.get(NONE) or next(iter(runs.values()))
    outputs = {t.request_id: t.output for t in reference.turns}
    rows = []
    for run in runs.values():
        returning = [t.ttft for t in run.turns if t.returning]
        long_left = [t for t in run.turns if t.request_id in left and t.history_tokens >= long_history]
        same = all(outputs.get(t.request_id) == t.output for t in run.turns)
        rows.append([run.config, len(run.turns), run.prompt_tokens, run.prefill_tokens, f"{100 * run.hit_ratio():.1f}%",
                     *(f"{100 * run.hit_ratio(tier):.1f}%" for tier in TIERS), _p(returning, 50), _p(returning, 95),
                     f"{_p([t.ttft for t in long_left], 50)} ({len(long_left)})",
                     _p([t.ttft_wall for t in long_left], 50), f"{run.throughput:.1f}", f"{run.seconds:.1f}",
                     "yes" if same else "NO"])
    return rows, left


def chat_targets(runs: dict[str, Run], long_history: int) -> list[list]:
    left = left_the_device(runs)
    targets = []

    def p50(run: Run) -> float:
        return percentile([t.ttft for t in run.turns if t.request_id in left and t.history_tokens >= long_history], 50)

    if DEVICE in runs and DISK in runs:
        label = (f"returning turns whose history (>= {long_history} tokens) left the device: TTFT p50, device only / "
                 "device + disk")
        if any(t.request_id in left and t.history_tokens >= long_history for t in runs[DISK].turns):
            ratio = p50(runs[DEVICE]) / p50(runs[DISK])
            targets.append([label, f"{ratio:.1f}x", ">= 5x", "yes" if ratio >= 5 else "no"])
        else:
            targets.append([label, "no such turns", ">= 5x", ""])
    if RESTART in runs:
        share = restart_share(runs[RESTART])
        targets.append([f"after the restart, first turn of each conversation ({share['turns']}): history read from "
                        "disk by the turn itself; in brackets, with the blocks an earlier turn of the restarted engine "
                        "had read from disk (the shared system prompt)",
                        f"{100 * share['disk']:.1f}% ({100 * share['cached']:.1f}%)", ">= 95%",
                        "yes" if share["disk"] >= 0.95 else f"no ({'yes' if share['cached'] >= 0.95 else 'no'})"])
    if HOST_DISK in runs and UNBOUNDED in runs:
        ratio = runs[HOST_DISK].hit_ratio() / runs[UNBOUNDED].hit_ratio()
        targets.append(["hit ratio, device + host + disk (10x the device pool below it) / unbounded",
                        f"{ratio:.3f}", ">= 0.95", "yes" if ratio >= 0.95 else "no"])
    return targets


NO_REUSE_HEADER = ["tiers", "runs", "prefill tokens computed", "hit ratio", "stores (blocks)", "tokens/s (clock)",
                   "tokens/s (wall)", "tokens/s (CPU)", "on / off (clock), median and each pair"]


def no_reuse_rows(runs: list[Run]) -> tuple[list[list], list[list]]:
    by: dict[str, list[Run]] = {}
    for run in runs:
        by.setdefault(run.config, []).append(run)
    off = by.get("tiers off", [])
    rows, targets = [], []
    for name, group in by.items():
        stores = statistics.median(sum(t.get("stored_blocks", 0) for t in r.tier_stats[0].values()) for r in group)
        ratios = [on.throughput / o.throughput for on, o in zip(group, off)] if name != "tiers off" else []
        rows.append([name, len(group), group[0].prefill_tokens, f"{100 * group[0].hit_ratio():.1f}%", f"{stores:.0f}",
                     f"{statistics.median(r.throughput for r in group):.1f}",
                     f"{statistics.median(r.generated_tokens / r.wall_seconds for r in group):.1f}",
                     f"{statistics.median(r.generated_tokens / r.cpu_seconds for r in group):.1f}",
                     (f"{statistics.median(ratios):.3f} ({', '.join(f'{x:.3f}' for x in ratios)})" if ratios else "")])
        if ratios:
            cost = 1 - statistics.median(ratios)
            targets.append([f"no reuse: throughput cost of {name}", f"{100 * cost:.1f}%", "<= 5%",
                            "yes" if cost <= 0.05 else "no"])
    return rows, targets


def describe(sizes: Sizes, workload: MultiTurn, bench: Bench, clock: str, threads: int, cold: bool) -> str:
    histories = [len(workload.system) + sum(len(m) + a for m, a in zip(c.messages[:-1], c.answer_lens[:-1]))
                 for c in workload.conversations]
    device_tokens = sizes.device_blocks * sizes.block_size
    return (f"Model: {Path(bench.loaded.source).name}, {torch_threads(threads)}; "
            f"{'CPU-time' if clock == 'cpu' else 'wall'} clock. Workload: {sizes.conversations} conversations of "
            f"{sizes.turns} turns, {sizes.clients} clients going round robin over their conversations, a "
            f"{sizes.system_tokens}-token system prompt; histories before the last turn {min(histories)}-"
            f"{max(histories)} tokens, {sum(histories)} in all, against a device pool of "
            f"{sizes.device_blocks} blocks of {sizes.block_size} ({device_tokens} tokens, "
            f"{bench.gib(sizes.device_blocks):.2f} GiB). Tiers: host {sizes.host_x:g}x the device pool, disk "
            f"{sizes.disk_x:g}x, host + disk {sizes.mixed_x[0]:g}x + {sizes.mixed_x[1]:g}x. Halves: turns 0-"
            f"{sizes.turns // 2 - 1}, then {sizes.turns // 2}-{sizes.turns - 1}; the restart's second engine reads the "
            f"folder {'after its pages were dropped from the page cache' if cold else 'from the page cache'}. "
            "Hit ratio: "
            "prompt tokens found at a request's first admission over all prompt tokens, per tier. Returning turns: "
            f"turns after the first; 'history left the device': returning turns with a history of at least "
            f"{sizes.long_history} tokens "
            "whose device held less than half of it in the device-only run (their count in brackets). Tokens/s: "
            "generated tokens per second.")


def load_average() -> str:
    """The machine's load averages over 1, 5 and 15 minutes."""
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


def torch_threads(threads: int) -> str:
    return f"{threads} torch thread{'s' if threads != 1 else ''}"


# -- main -----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="Hugging Face folder or .gguf file (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--device", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="a tiny workload (seconds on a tiny model)")
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help=f"settings of the chat part, from {', '.join(CONFIGS)} (default: all)")
    parser.add_argument("--parts", default="chat,no-reuse", help="chat, no-reuse, or both (default)")
    parser.add_argument("--repeats", type=int, help="runs of each no-reuse setting (default 3, 1 with --quick)")
    parser.add_argument("--clock", choices=["auto", "wall", "cpu"], default="auto")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: 1 with the cpu clock)")
    parser.add_argument("--disk-dir", type=Path, help="where the disk tiers' folders go (default: the temporary "
                        "directory)")
    parser.add_argument("--warm-restart", action="store_true",
                        help="the restarted engine reads the disk folder from the page cache")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trace-out", type=Path, help="also write the chat workload as a Mooncake-format trace "
                        "(blocks of the block size, answers of random tokens) for tools.replay_trace")
    parser.add_argument("--notes", default="", help="a paragraph to put under the tables")
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    configs = [CONFIGS[c.strip()] for c in args.configs.split(",") if c.strip()]
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if not parts <= {"chat", "no-reuse"}:
        parser.error(f"--parts: chat and no-reuse, not {', '.join(parts - {'chat', 'no-reuse'})}")

    import torch

    clock = resolve_clock(args.clock, args.device)
    threads = args.threads or (1 if clock == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    sizes = QUICK if args.quick else Sizes()
    loaded = load_model(args.model)
    vocab = loaded.config.vocab_size
    workload = multi_turn(sizes.conversations, sizes.turns, vocab, sizes.clients, sizes.system_tokens,
                          sizes.context_mean, sizes.context_range, sizes.message_mean, sizes.message_range,
                          sizes.answer_mean, sizes.answer_range, seed=args.seed)
    if args.trace_out:
        args.trace_out.write_text("".join(json.dumps(r) + "\n" for r in to_trace(workload, sizes.block_size)))
        print(f"wrote {args.trace_out}", file=sys.stderr)
    out = output_folder(args, "bench_multiturn")
    disk_dir = args.disk_dir or Path(tempfile.gettempdir())
    disk_dir.mkdir(parents=True, exist_ok=True)
    load_before = load_average()
    bench = Bench(loaded, {"model": args.model, "device": args.device}, sizes, clock, disk_dir,
                  cold_restart=not args.warm_restart, seed=args.seed)

    sections, results = [], {"sizes": asdict(sizes)}
    targets: list[list] = []
    if "chat" in parts:
        runs = {name: bench.chat(name, workload) for name in configs}
        rows, _ = chat_rows(runs, sizes.long_history)
        targets += chat_targets(runs, sizes.long_history)
        sections += [describe(sizes, workload, bench, clock, torch.get_num_threads(), not args.warm_restart),
                     markdown_table(CHAT_HEADER, rows)]
        results["chat"] = [asdict(r) for r in runs.values()]
        if RESTART in runs:
            results["restart_share"] = restart_share(runs[RESTART])
    if "no-reuse" in parts:
        requests = no_shared_prefix(sizes.no_reuse_requests, vocab, sizes.no_reuse_prompt_mean, sizes.no_reuse_output,
                                    args.seed)
        repeats = args.repeats or (1 if args.quick else 3)
        runs_nr = [bench.no_reuse(name, requests) for _ in range(repeats)
                   for name in ("tiers off", "disk", "host + disk")]
        rows, nr_targets = no_reuse_rows(runs_nr)
        targets += nr_targets
        total = sum(len(r.prompt_ids) + r.output_len for r in requests)
        sections += [f"No reuse: {len(requests)} random prompts ({total} tokens with their outputs) at once, in "
                     f"{sizes.no_reuse_device_blocks} device blocks ({sizes.no_reuse_device_blocks * sizes.block_size} "
                     f"tokens); disk 10x, host + disk 2x + 8x the device pool; {repeats} run(s) of each, alternating.",
                     markdown_table(NO_REUSE_HEADER, rows)]
        results["no_reuse"] = [asdict(r) for r in runs_nr]
    if targets:
        sections.append(markdown_table(["target", "measured", "goal", "met"], targets))
    sections.append(f"Load average (1 / 5 / 15 min) at the start: {load_before}; at the end: {load_average()} "
                    f"({os.cpu_count()} cores).")
    if args.notes:
        sections.append(args.notes)
    text = "\n\n".join(sections)
    print(text)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    device = EngineConfig(device=args.device).torch_device()
    publish(f"{TITLE} ({'CUDA' if device.type == 'cuda' else 'CPU'})", text, out, args.update_docs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
