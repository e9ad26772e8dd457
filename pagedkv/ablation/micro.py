"""Micro-benchmark of preemption (the vLLM paper's Fig. 19a): for each block size, the time to
swap a group's blocks out to the CPU pool and back, against the time to recompute them.

Both go through the engine's own parts: the scheduler plans a prefill of L tokens and the
executor runs it (that is what recomputation costs); the block manager plans the swap of
the group's blocks and the executor carries it out on the cache engine (device -> pinned CPU
pool and back on CUDA, a RAM copy on the CPU). The executor feeds the engine's cost model as
it goes, so each row also says what the automatic policy would choose with those estimates.
"""
from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from pagedkv.kvcache.cache_engine import GIB, CacheSpec
from pagedkv.kvcache.sequence import Sequence, SequenceGroup
from pagedkv import EngineConfig, LoadedModel
from pagedkv.preemption.policy import PreemptionPolicy
from pagedkv.preemption.scheduler import SchedulerOutput
from pagedkv.runtime.engine.config import EngineParts, build_engine_parts
from pagedkv.ablation.workload import FIRST_PLAIN_TOKEN


@dataclass
class MicroRow:
    block_size: int
    context: int          # tokens in the group
    num_blocks: int       # blocks moved by one swap out (and again by the swap in)
    bytes_moved: int      # one way
    swap_out_s: float     # medians over the repeats
    swap_in_s: float
    swap_s: float         # out + in: what preempting by swapping costs
    recompute_s: float    # a prefill of `context` tokens
    faster: str           # "swap" or "recompute", by the measurements
    policy: str           # what the automatic policy chooses with the engine's cost estimates

    @property
    def ratio(self) -> float:
        """Recompute time over swap time: > 1 means swapping wins."""
        return self.recompute_s / self.swap_s if self.swap_s > 0 else float("inf")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _parts(loaded: LoadedModel, engine_args: dict, block_size: int, max_context: int) -> EngineParts:
    base = EngineConfig(**{**engine_args, "block_size": block_size})
    cfg = loaded.config
    spec = CacheSpec(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, block_size, base.torch_dtype())
    blocks = -(-max_context // block_size) + 1
    config = EngineConfig(**{**engine_args, "block_size": block_size, "num_device_blocks": blocks,
                             "swap_space_gib": (blocks + 1) * spec.bytes_per_block / GIB,
                             "max_num_batched_tokens": max_context, "watermark": 0.0,
                             "preemption_mode": "auto",
                             # The same prompt is prefilled again and again: recompute is
                             # measured on tokens that are computed, not found in the cache.
                             "enable_prefix_caching": False})
    return build_engine_parts(config, loaded)


def _round_trip(parts: EngineParts, group: SequenceGroup, timer=time.perf_counter) -> tuple[float, float]:
    """Swaps the group out and back through the executor; seconds for each way."""
    times = []
    for plan, field_name in ((parts.block_manager.swap_out, "blocks_to_swap_out"),
                             (parts.block_manager.swap_in, "blocks_to_swap_in")):
        out = SchedulerOutput(**{field_name: plan(group)})
        _sync(parts.executor.device)
        start = timer()
        parts.executor.apply_cache_ops(out)  # synchronises on CUDA before it returns
        times.append(timer() - start)
    return times[0], times[1]


def _prefill(parts: EngineParts, prompt: list[int], name: str,
             timer=time.perf_counter) -> tuple[SequenceGroup, float]:
    group = SequenceGroup(name, [Sequence.from_prompt(prompt)])
    parts.scheduler.add(group)
    out = parts.scheduler.schedule()
    if out.num_batched_tokens != len(prompt):
        raise RuntimeError(f"the prefill of {len(prompt)} tokens was split ({out.num_batched_tokens} scheduled)")
    _sync(parts.executor.device)
    start = timer()
    parts.executor.execute(out)  # the logits come back to the host, so this waits for the GPU
    return group, timer() - start


def measure_micro(loaded: LoadedModel, engine_args: dict, block_sizes: list[int], contexts: list[int],
                  repeats: int = 3, recompute_repeats: int | None = None, seed: int = 0,
                  progress: bool = True, timer=time.perf_counter) -> list[MicroRow]:
    """One row per (block size, context). Swaps are cheap, so they repeat `repeats` times;
    prefills repeat `recompute_repeats` times (default: as many, but once above 1024 tokens).
    `timer`: wall clock by default; time.process_time counts this process's CPU time only."""
    rng = random.Random(seed)
    vocab = loaded.config.vocab_size
    max_context = max(contexts)
    prompts = {L: [rng.randrange(FIRST_PLAIN_TOKEN, vocab) for _ in range(L)] for L in contexts}
    rows: list[MicroRow] = []
    bar = tqdm(total=len(block_sizes) * len(contexts), desc="micro: swap vs recompute", unit="point",
               disable=not progress)
    for bs in block_sizes:
        parts = _parts(loaded, engine_args, bs, max_context)
        bpb = parts.cache.spec.bytes_per_block
        # Warm up: the first model call, and every page of both pools touched once.
        group, _ = _prefill(parts, prompts[min(contexts)][:8], f"warm-{bs}")
        parts.scheduler.abort(group.request_id)
        every = [(i, i) for i in range(min(parts.cache.num_device_blocks, parts.cache.num_cpu_blocks))]
        parts.cache.swap_out(every)
        parts.cache.swap_in(every)
        measured = []
        for L in contexts:
            bar.set_postfix(block_size=bs, context=L)
            times = []
            n_recompute = recompute_repeats or (repeats if L <= 1024 else 1)
            for r in range(max(n_recompute, 1)):
                group, seconds = _prefill(parts, prompts[L], f"bs{bs}-L{L}-{r}", timer)
                times.append(seconds)
                if r < n_recompute - 1:
                    parts.scheduler.abort(group.request_id)
            trips = [_round_trip(parts, group, timer) for _ in range(max(repeats, 1))]
            num_blocks = parts.block_manager.num_group_blocks(group)
            parts.scheduler.abort(group.request_id)
            out_s = statistics.median(t[0] for t in trips)
            in_s = statistics.median(t[1] for t in trips)
            swap_s = statistics.median(t[0] + t[1] for t in trips)
            recompute_s = statistics.median(times)
            measured.append((L, num_blocks, out_s, in_s, swap_s, recompute_s))
            bar.update(1)
        # The cost model has now seen this block size's prefills and swaps, as a running
        # engine would have: ask the policy what it would do with each group.
        policy = PreemptionPolicy("auto", parts.cost, bpb)
        for L, num_blocks, out_s, in_s, swap_s, recompute_s in measured:
            group = SequenceGroup("probe", [Sequence.from_prompt(prompts[L])])
            group.is_prefilling = False
            choice = policy.choose(group, num_blocks, can_swap=True).value
            rows.append(MicroRow(bs, L, num_blocks, num_blocks * bpb, out_s, in_s, swap_s, recompute_s,
                                 "swap" if swap_s < recompute_s else "recompute", choice))
        del parts
    bar.close()
    return rows


def policy_gap(row: MicroRow) -> float:
    """How much slower the policy's choice is than the faster way, as a fraction (0 = right)."""
    chosen = row.swap_s if row.policy == "swap" else row.recompute_s
    best = min(row.swap_s, row.recompute_s)
    return chosen / best - 1 if best > 0 else 0.0
