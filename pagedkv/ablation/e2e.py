"""End-to-end preemption ablation (the vLLM paper's Fig. 19b): one workload replayed in real
time at several request rates, against a KV cache small enough to preempt often, with
preemption by swapping, by recomputation, and chosen per victim by the cost model (auto).

The workload: Poisson arrivals, long-tailed prompt and output lengths (pagedkv.ablation.workload),
every 5th request sampled with n = 2 (seeded), every 7th a beam search of width 2, the rest
greedy. Preemption is invisible in outputs, so the three modes must return the same tokens:
the runs check that for free.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace

from tqdm import tqdm

from pagedkv.kvcache.cache_engine import GIB, CacheSpec
from pagedkv import EngineConfig, LLMEngine, LoadedModel, SamplingParams
from pagedkv.ablation.replay import CpuClock, percentile, replay
from pagedkv.ablation.workload import WorkloadRequest, make_workload, poisson_arrivals

MODES = ("swap", "recompute", "auto")


@dataclass
class WorkloadSpec:
    num_requests: int = 48
    prompt_mean: float = 96
    output_mean: float = 96
    max_prompt: int = 512
    max_output: int = 256
    sample_every: int = 5   # every 5th request: parallel sampling, n = sample_n
    sample_n: int = 2
    beam_every: int = 7     # every 7th request: beam search of width beam_width
    beam_width: int = 2


@dataclass
class E2ERow:
    rate: float
    mode: str
    requests: int
    mean_norm_latency: float  # seconds per output token, mean over requests
    p50_norm_latency: float
    p99_norm_latency: float
    throughput: float         # generated tokens per second
    elapsed_s: float
    preempt_swap: int         # preemptions as the policy carried them out
    preempt_recompute: int
    bytes_swapped: int        # out and in
    tokens_recomputed: int
    errors: int
    mismatches: int = 0       # requests whose tokens differ from the swap run's at this rate
    extra: dict = field(default_factory=dict)


def params_for(spec: WorkloadSpec, seed: int):
    def params(request: WorkloadRequest) -> SamplingParams:
        i = int(request.request_id.rsplit("-", 1)[1])
        if spec.beam_every and i % spec.beam_every == spec.beam_every - 1:
            return SamplingParams(max_tokens=request.output_len, beam_width=spec.beam_width, n=spec.beam_width,
                                  ignore_eos=True)
        if spec.sample_every and i % spec.sample_every == spec.sample_every - 1:
            return SamplingParams(max_tokens=request.output_len, n=spec.sample_n, temperature=0.8,
                                  seed=seed * 100_003 + i, ignore_eos=True)
        return SamplingParams(max_tokens=request.output_len, temperature=0.0, ignore_eos=True)

    return params


def width_of(params: SamplingParams) -> int:
    return max(params.n, params.beam_width)


def blocks_needed(request: WorkloadRequest, params: SamplingParams, block_size: int) -> int:
    """An upper bound on the blocks the request holds at its largest, when it runs alone."""
    prompt, width = len(request.prompt_ids), width_of(params)
    return -(-prompt // block_size) + width * (-(-request.output_len // block_size) + 1)


def cache_blocks(requests: list[WorkloadRequest], params, block_size: int) -> int:
    """The smallest device pool every request fits in alone: any two large requests that
    overlap make it preempt."""
    largest = max(blocks_needed(r, params(r), block_size) for r in requests)
    return largest + 2


def build_workload(spec: WorkloadSpec, vocab_size: int, rate: float, seed: int,
                   arrival_seed: int | None = None) -> list[WorkloadRequest]:
    """The same requests at every rate; only their arrival times change with it. (make_workload
    draws arrivals before lengths from one generator, so its lengths would change with the rate.)"""
    requests = make_workload(spec.num_requests, vocab_size, seed=seed, prompt_mean=spec.prompt_mean,
                             output_mean=spec.output_mean, max_prompt=spec.max_prompt,
                             max_output=spec.max_output, rate=math.inf)
    rng = random.Random(seed + 1 if arrival_seed is None else arrival_seed)
    arrivals = poisson_arrivals(rng, len(requests), rate)
    return [replace(r, arrival=t) for r, t in zip(requests, arrivals)]


@dataclass
class Run:
    """One replay of the workload in one mode."""

    norm_latencies: list[float]
    generated_tokens: int
    elapsed: float
    preempt_swap: int
    preempt_recompute: int
    bytes_swapped: int
    tokens_recomputed: int
    errors: int
    tokens: dict[str, list[list[int]]]  # request id -> every completion's token ids
    estimates: dict                     # the engine's cost-model estimates at the end


def run_point(loaded: LoadedModel, engine_args: dict, requests: list[WorkloadRequest], params,
              mode: str, block_size: int, num_blocks: int, desc: str | None = None, clock: str = "wall") -> Run:
    cfg = loaded.config
    base = EngineConfig(**engine_args)
    spec = CacheSpec(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, block_size, base.torch_dtype())
    # Room to swap out everything at once, so that swap mode never has to fall back.
    swap_blocks = sum(blocks_needed(r, params(r), block_size) for r in requests) + 1
    config = EngineConfig(**{**engine_args, "block_size": block_size, "num_device_blocks": num_blocks,
                             "swap_space_gib": min(4.0, swap_blocks * spec.bytes_per_block / GIB),
                             "preemption_mode": mode})
    engine = LLMEngine(config, loaded)
    result = replay(engine, requests, params, desc=desc, clock=CpuClock() if clock == "cpu" else None)
    stats = result.stats
    return Run(norm_latencies=[t.normalized_latency for t in result.timings.values() if t.finished is not None],
               generated_tokens=result.generated_tokens, elapsed=result.elapsed,
               preempt_swap=stats["preemptions"]["swap"], preempt_recompute=stats["preemptions"]["recompute"],
               bytes_swapped=engine.cache.bytes_swapped, tokens_recomputed=stats["tokens_recomputed"],
               errors=sum(1 for o in result.outputs.values() if o.error),
               tokens={rid: [c.token_ids for c in out.outputs] for rid, out in result.outputs.items()},
               estimates={"prefill_tokens_per_s": stats["prefill_tokens_per_s"],
                          "swap_bytes_per_s": stats["swap_bytes_per_s"]})


def combine(rate: float, mode: str, runs: list[Run], extra: dict) -> E2ERow:
    """One row from the repeats of a point: latencies pooled over every request of every repeat,
    throughput over their total time, counts summed."""
    norm = [x for run in runs for x in run.norm_latencies]
    elapsed = sum(run.elapsed for run in runs)
    return E2ERow(rate=rate, mode=mode, requests=len(norm),
                  mean_norm_latency=sum(norm) / len(norm) if norm else float("nan"),
                  p50_norm_latency=percentile(norm, 50), p99_norm_latency=percentile(norm, 99),
                  throughput=sum(run.generated_tokens for run in runs) / elapsed if elapsed > 0 else 0.0,
                  elapsed_s=elapsed, preempt_swap=sum(run.preempt_swap for run in runs),
                  preempt_recompute=sum(run.preempt_recompute for run in runs),
                  bytes_swapped=sum(run.bytes_swapped for run in runs),
                  tokens_recomputed=sum(run.tokens_recomputed for run in runs),
                  errors=sum(run.errors for run in runs), extra={**runs[-1].estimates, **extra})


def warm_up(loaded: LoadedModel, engine_args: dict, spec: WorkloadSpec, seed: int) -> None:
    """One short run first, so that no mode pays for the first model calls."""
    requests = make_workload(2, loaded.config.vocab_size, seed=seed + 1, prompt_mean=16, output_mean=4,
                             max_prompt=32, max_output=8)
    engine = LLMEngine(EngineConfig(**{**engine_args, "num_device_blocks": 64, "swap_space_gib": 0.0}), loaded)
    replay(engine, requests, params_for(spec, seed))


def measure_e2e(loaded: LoadedModel, engine_args: dict, spec: WorkloadSpec, rates: list[float],
                block_size: int = 16, num_blocks: int | None = None, seed: int = 0, progress: bool = True,
                clock: str = "wall", repeats: int = 1) -> tuple[list[E2ERow], list[str]]:
    """Rows for every (rate, mode), and warnings (outputs that differ between modes, errors).
    Each repeat replays the same requests with other Poisson arrival times."""
    params = params_for(spec, seed)
    warm_up(loaded, engine_args, spec, seed)
    rows: list[E2ERow] = []
    warnings: list[str] = []
    bar = tqdm(total=len(rates) * len(MODES) * repeats, desc="end to end", unit="run", disable=not progress)
    for k, rate in enumerate(rates):
        runs: dict[str, list[Run]] = {mode: [] for mode in MODES}
        mismatches = dict.fromkeys(MODES, 0)
        for r in range(repeats):
            requests = build_workload(spec, loaded.config.vocab_size, rate, seed, arrival_seed=seed + 1 + r)
            blocks = num_blocks or cache_blocks(requests, params, block_size)
            shift = (k + r) % len(MODES)
            for mode in MODES[shift:] + MODES[:shift]:  # no mode always runs first
                bar.set_postfix(rate=rate, mode=mode)
                desc = f"e2e rate {rate:g} {mode}" if progress else None
                runs[mode].append(run_point(loaded, engine_args, requests, params, mode, block_size, blocks,
                                            desc, clock))
                bar.update(1)
            reference = runs["swap"][-1].tokens
            for mode in MODES:
                mismatches[mode] += sum(1 for rid, toks in runs[mode][-1].tokens.items() if reference.get(rid) != toks)
        for mode in MODES:
            row = combine(rate, mode, runs[mode], {"num_device_blocks": blocks, "block_size": block_size,
                                                   "repeats": repeats})
            row.mismatches = mismatches[mode]
            if row.mismatches:
                warnings.append(f"rate {rate:g}: {row.mismatches} of {row.requests} requests in {mode} mode "
                                "returned other tokens than in swap mode")
            if row.errors:
                warnings.append(f"rate {rate:g}, {mode}: {row.errors} requests ended with an error")
            rows.append(row)
    bar.close()
    return rows, warnings
