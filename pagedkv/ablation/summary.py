"""The ablation's verdict and its written outputs: CSV, JSON, markdown tables and summary."""
from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from pagedkv.ablation.micro import MicroRow, policy_gap
from pagedkv.ablation.report import markdown_table

TARGET_GAP = 0.10  # auto within 10% of the best fixed mode
PAPER_MEMORY = ("vLLM paper (Fig. 15, OPT-13B): parallel sampling saves 6.1-9.8% of the blocks on Alpaca and "
                "16.2-30.5% on ShareGPT; beam search 37.6-55.2% on Alpaca and 44.3-66.3% on ShareGPT; "
                "KV waste under 4% (Fig. 2).")


@dataclass
class Verdict:
    rate: float
    fastest: str          # the mode with the lowest mean normalized latency (auto included)
    best_fixed: str       # the better of swap and recompute
    swap_latency: float   # mean normalized latency, s/token
    recompute_latency: float
    auto_latency: float
    auto_swaps: int       # what auto chose at its preemptions
    auto_recomputes: int
    gap: float            # auto / best fixed - 1 (negative: auto beat both)
    met: bool
    same_choices: bool    # auto chose the best fixed mode's way every time: its gap is run-to-run variation

    @property
    def auto_chose(self) -> str:
        if not self.auto_swaps and not self.auto_recomputes:
            return "no preemption"
        text = f"swap {self.auto_swaps}, recompute {self.auto_recomputes}"
        return text + (f" (as {self.best_fixed} mode)" if self.same_choices else "")


def verdicts(e2e_rows, target: float = TARGET_GAP) -> list[Verdict]:
    """Per rate: which mode was fastest by mean normalized latency, what auto chose, its gap."""
    by_rate: dict[float, dict[str, object]] = {}
    for row in e2e_rows:
        by_rate.setdefault(row.rate, {})[row.mode] = row
    out = []
    for rate in sorted(by_rate):
        modes = by_rate[rate]
        if not {"swap", "recompute", "auto"} <= modes.keys():
            continue
        lat = {m: modes[m].mean_norm_latency for m in ("swap", "recompute", "auto")}
        best_fixed = min(("swap", "recompute"), key=lambda m: lat[m])
        gap = lat["auto"] / lat[best_fixed] - 1 if lat[best_fixed] > 0 else 0.0
        auto = modes["auto"]
        # Auto ran the best mode's policy outright when it chose that way at every preemption.
        same = auto.preempt_recompute == 0 if best_fixed == "swap" else auto.preempt_swap == 0
        out.append(Verdict(rate, min(lat, key=lat.get), best_fixed, lat["swap"], lat["recompute"], lat["auto"],
                           auto.preempt_swap, auto.preempt_recompute, gap, gap <= target, same))
    return out


def _rate(rate: float) -> str:
    return "all at once" if math.isinf(rate) else f"{rate:g}"


def verdict_table(rows: list[Verdict]) -> str:
    return markdown_table(
        ["rate (req/s)", "swap ms/tok", "recompute ms/tok", "auto ms/tok", "fastest", "auto chose",
         "auto vs best fixed", "within 10%"],
        [[_rate(v.rate), f"{v.swap_latency * 1e3:.1f}", f"{v.recompute_latency * 1e3:.1f}",
          f"{v.auto_latency * 1e3:.1f}", v.fastest, v.auto_chose, f"{v.gap * 100:+.1f}%",
          _met(v)] for v in rows])


def _met(v: Verdict) -> str:
    if v.met:
        return "yes"
    # Auto made the best mode's choices: the gap is not the policy's doing.
    return f"no, variation (same choices as {v.best_fixed})" if v.same_choices else "**no**"


def micro_table(rows: list[MicroRow]) -> str:
    return markdown_table(
        ["block size", "context", "blocks", "MiB", "swap out+in ms", "recompute ms", "recompute/swap",
         "faster", "auto policy"],
        [[r.block_size, r.context, r.num_blocks, f"{r.bytes_moved / 2**20:.1f}", f"{r.swap_s * 1e3:.2f}",
          f"{r.recompute_s * 1e3:.1f}", f"{r.ratio:.0f}x" if r.ratio >= 10 else f"{r.ratio:.2f}x", r.faster,
          r.policy if r.policy == r.faster else f"**{r.policy}** (+{policy_gap(r) * 100:.0f}%)"]
         for r in rows])


def micro_grid(rows: list[MicroRow]) -> str:
    """Compact: recompute/swap ratio per block size (rows) and context (columns)."""
    contexts = sorted({r.context for r in rows})
    sizes = sorted({r.block_size for r in rows})
    cell = {(r.block_size, r.context): r for r in rows}
    body = []
    for bs in sizes:
        line: list[object] = [bs]
        for c in contexts:
            r = cell.get((bs, c))
            line.append("" if r is None else f"{r.swap_s * 1e3:.1f} / {r.recompute_s * 1e3:.0f}")
        body.append(line)
    return markdown_table(["block size"] + [f"{c} tokens: swap / recompute ms" for c in contexts], body)


def micro_finding(rows: list[MicroRow]) -> str:
    ratios = [r.ratio for r in rows]
    lo, hi = min(ratios), max(ratios)

    def x(v: float) -> str:
        return f"{v:.0f}x" if v >= 10 else f"{v:.2f}x"

    swap_wins = sum(r.faster == "swap" for r in rows)
    return (f"Swapping was faster at {swap_wins} of {len(rows)} points; recomputing took {x(lo)} to {x(hi)} "
            "as long as swapping out and back in.")


def e2e_table(rows) -> str:
    return markdown_table(
        ["rate (req/s)", "mode", "norm. latency mean / p50 / p99 (ms/tok)", "throughput (tok/s)",
         "preemptions swap / recompute", "MiB swapped", "tokens recomputed", "outputs differ"],
        [[_rate(r.rate), r.mode, f"{r.mean_norm_latency * 1e3:.1f} / {r.p50_norm_latency * 1e3:.1f} / "
          f"{r.p99_norm_latency * 1e3:.1f}", f"{r.throughput:.1f}", f"{r.preempt_swap} / {r.preempt_recompute}",
          f"{r.bytes_swapped / 2**20:.1f}", r.tokens_recomputed, r.mismatches] for r in rows])


def memory_table(rows) -> str:
    try:
        from pagedkv.ablation.sharing import sharing_table
    except ImportError:
        sharing_table = None
    if sharing_table is not None:
        return sharing_table(rows)
    return markdown_table(
        ["kind", "width", "KV waste", "memory saved", "blocks with / without sharing"],
        [[r.kind, r.width, f"{r.kv_waste * 100:.1f}%", f"{r.memory_saved * 100:.1f}%",
          f"{r.blocks_with_sharing:.1f} / {r.blocks_without_sharing:.1f}"] for r in rows])


def _plain(row) -> dict:
    d = asdict(row)
    extra = d.pop("extra", None) or {}
    d.update({k: v for k, v in extra.items() if k not in d})
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}


def write_csv(path: Path, rows) -> None:
    dicts = [_plain(r) for r in rows]
    with open(path, "w", newline="") as f:
        if not dicts:
            return
        writer = csv.DictWriter(f, fieldnames=list(dicts[0]))
        writer.writeheader()
        writer.writerows(dicts)


def write_json(path: Path, meta: dict, micro, e2e, verdict_rows, memory, warnings: list[str]) -> None:
    def inf_safe(v):
        return "inf" if isinstance(v, float) and math.isinf(v) else v

    doc = {"meta": meta,
           "micro": [_plain(r) | {"policy_gap": policy_gap(r)} for r in micro],
           "e2e": [{k: inf_safe(v) for k, v in _plain(r).items()} for r in e2e],
           "verdict": [{k: inf_safe(v) for k, v in asdict(v).items()} | {"auto_chose": v.auto_chose}
                       for v in verdict_rows],
           "memory": None if memory is None else [_plain(r) for r in memory],
           "warnings": warnings}
    path.write_text(json.dumps(doc, indent=2) + "\n")


def summary(meta: dict, micro, e2e, verdict_rows, memory, warnings: list[str], images: dict[str, str]) -> str:
    """The markdown body: the summary file and the BENCHMARKS.md section. `images` maps
    micro/e2e/memory to the plot paths relative to where the text lives."""
    n = meta["threads"]
    threads = f", {n} torch thread{'s' if n != 1 else ''}" if meta["device"] == "cpu" else ""
    parts = [f"Device: {meta['device']} ({meta['dtype']}{threads}), model: {meta['model']}. "
             f"Run took {meta['elapsed_s'] / 60:.1f} min{' (--quick)' if meta['quick'] else ''}."
             + (" Times are this process's CPU time, and the end-to-end replays run on a virtual clock "
                "that it drives (`--clock cpu`): the machine is shared with other work, whose load would "
                "otherwise be measured too." if meta.get("clock") == "cpu" else "")]
    if micro:
        agree = sum(r.policy == r.faster for r in micro)
        parts += ["### Micro: swap out + in vs recompute (Fig. 19a)",
                  f"![swap vs recompute per block size]({images['micro']})", micro_grid(micro),
                  micro_finding(micro) + " "
                  f"Swap time is the executor moving a group's blocks to the CPU pool and back "
                  f"({meta['transfer']}); recompute time is a prefill of the same tokens. Medians of "
                  f"{meta['repeats']} swaps; prefills repeat as often up to 1024 tokens, once above. "
                  f"The automatic policy, with the cost estimates the engine measured on these runs, "
                  f"picks the faster way at {agree} of {len(micro)} points."]
    if e2e:
        met = sum(v.met for v in verdict_rows)
        parts += ["### End to end (Fig. 19b)", f"![normalized latency vs request rate]({images['e2e']})",
                  f"Workload: {meta['workload']}. KV cache: {meta['e2e_cache']}.",
                  e2e_table(e2e),
                  "### Verdict",
                  "Best mode by mean normalized latency (end-to-end seconds per output token). "
                  f"Target: auto within {TARGET_GAP:.0%} of the better fixed mode at every rate.",
                  verdict_table(verdict_rows),
                  f"Target met at {met} of {len(verdict_rows)} rates."
                  + (" Where auto chose the best fixed mode's way at every preemption (\"as ... mode\"), the "
                     "two ran the same policy, and the gap between them is run-to-run variation." if any(
                         v.same_choices for v in verdict_rows) else "")]
    if memory:
        parts += ["### Memory: KV waste and sharing",
                  f"![memory saved by sharing]({images['memory']})" if images.get("memory") else "",
                  f"Workload: {meta.get('memory_workload', 'the workload above')}, each request run as n = "
                  "2, 4, 6 parallel samples and as beam searches of width 2, 4, 6, with a cache large enough "
                  "that nothing is preempted. Memory saved: blocks saved by sharing over the blocks without "
                  "sharing, summed over the steps; KV waste: allocated slots that hold no token.",
                  memory_table(memory), PAPER_MEMORY]
    elif memory is None and meta.get("memory_note"):
        parts += ["### Memory: KV waste and sharing", meta["memory_note"]]
    if warnings:
        parts += ["### Warnings", "\n".join(f"- {w}" for w in warnings)]
    return "\n\n".join(p for p in parts if p)
