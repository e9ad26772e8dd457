"""Memory that copy-on-write sharing saves for parallel sampling and beam search.

A request with n parallel samples, or a beam of width k, stores its prompt once and lets
its sequences share the blocks of their common prefix. The saving is measured as the vLLM
paper does: over every engine step, the device blocks actually in use against the blocks
the same sequences would hold with one private copy each (`BlockStats.logical_blocks`):

    memory saved = 1 - sum over steps of blocks in use / sum over steps of logical blocks

The cache is sized so that nothing is ever preempted, so the figures measure sharing alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from pagedkv import EngineConfig, LLMEngine, LoadedModel, SamplingParams
from pagedkv.ablation.replay import replay
from pagedkv.ablation.workload import WorkloadRequest

PARALLEL = "parallel sampling"
BEAM = "beam search"
# The savings the vLLM paper reports (its section 6.3, Alpaca and ShareGPT traces).
PAPER_RANGES = {PARALLEL: (0.06, 0.30), BEAM: (0.37, 0.66)}


@dataclass
class SharingRow:
    kind: str                      # "parallel sampling" or "beam search"
    width: int                     # n, or the beam width
    kv_waste: float                # time average of the internal fragmentation
    memory_saved: float            # fraction, 0..1
    blocks_with_sharing: float     # device blocks in use, mean over steps
    blocks_without_sharing: float  # blocks one private copy per sequence would need, mean over steps


def blocks_needed(requests: list[WorkloadRequest], width: int, block_size: int) -> int:
    """Device blocks that hold every request at once with no sharing at all, plus room to grow."""
    return sum(width * (-(-(len(r.prompt_ids) + r.output_len) // block_size) + 1) for r in requests)


def _params(requests: list[WorkloadRequest], kind: str, width: int,
            seed: int) -> Callable[[WorkloadRequest], SamplingParams]:
    index = {r.request_id: i for i, r in enumerate(requests)}

    def params_for(request: WorkloadRequest) -> SamplingParams:
        if kind == BEAM:
            return SamplingParams(max_tokens=request.output_len, beam_width=width, ignore_eos=True)
        return SamplingParams(max_tokens=request.output_len, n=width, temperature=0.8,
                              seed=seed + index[request.request_id], ignore_eos=True)
    return params_for


def measure_one(loaded: LoadedModel, requests: list[WorkloadRequest], kind: str, width: int,
                engine_args: dict | None = None, progress: bool = True, seed: int = 0) -> SharingRow:
    """Runs the requests as n = width parallel samples or a beam of that width."""
    if kind not in PAPER_RANGES:
        raise ValueError(f"kind must be {PARALLEL!r} or {BEAM!r}, got {kind!r}")
    args = dict(engine_args or {})
    block_size = args.get("block_size", EngineConfig.block_size)
    if args.get("num_device_blocks") is None:
        args.pop("kv_cache_gib", None)
        args["num_device_blocks"] = blocks_needed(requests, width, block_size) + 16
    engine = LLMEngine(EngineConfig(**args), loaded)

    def sample(e: LLMEngine) -> tuple[int, int, float]:
        s = e.block_manager.stats()
        return s.device_blocks_used, s.logical_blocks, s.waste

    result = replay(engine, requests, _params(requests, kind, width, seed), on_step=sample,
                    desc=f"{kind}, width {width}" if progress else None)
    if result.stats["preemptions"]["swap"] or result.stats["preemptions"]["recompute"]:
        raise RuntimeError(f"{kind} width {width}: the cache was too small, requests were preempted")
    samples = [s for s in result.samples if s[1] > 0]
    used = sum(s[0] for s in samples)
    logical = sum(s[1] for s in samples)
    steps = max(len(samples), 1)
    return SharingRow(kind, width, kv_waste=sum(s[2] for s in samples) / steps,
                      memory_saved=1.0 - used / logical if logical else 0.0,
                      blocks_with_sharing=used / steps, blocks_without_sharing=logical / steps)


def measure_sharing(loaded: LoadedModel, requests: list[WorkloadRequest], widths=(2, 4, 6),
                    engine_args: dict | None = None, progress: bool = True) -> list[SharingRow]:
    """For each width: the requests with n = width parallel samples (temperature 0.8, fixed
    seeds), then with a beam of that width. Rows in that order."""
    rows = []
    for width in widths:
        for kind in (PARALLEL, BEAM):
            rows.append(measure_one(loaded, requests, kind, width, engine_args, progress))
    return rows


def sharing_table(rows: list[SharingRow]) -> str:
    """Markdown table of the rows beside the vLLM paper's ranges."""
    from pagedkv.ablation.report import markdown_table

    body = []
    for r in rows:
        low, high = PAPER_RANGES[r.kind]
        inside = "yes" if low <= r.memory_saved <= high else ("above" if r.memory_saved > high else "below")
        body.append([r.kind, r.width, f"{r.blocks_without_sharing:.1f}", f"{r.blocks_with_sharing:.1f}",
                     f"{100 * r.memory_saved:.1f}%", f"{100 * low:.0f}-{100 * high:.0f}%", inside,
                     f"{100 * r.kv_waste:.2f}%"])
    return markdown_table(["kind", "width", "blocks without sharing (mean)", "blocks in use (mean)",
                           "memory saved", "vLLM paper", "in range", "KV waste"], body)
