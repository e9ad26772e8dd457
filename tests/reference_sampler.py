"""The sampler as it ran on the host before it moved to the device, kept unchanged as the
oracle of tests/test_sampler_device.py: the device sampler must give the same tokens and the
same logprobs. Its keys come from runtime.engine.sampler.draw_key, so both share one
global generator.

Token sampling: greedy, temperature, top-k, top-p, min-p, with reproducible seeds.

Random draws invert the CDF: token = the first v whose cumulative probability exceeds u, with
u uniform in (0, 1) from splitmix64 of the row's 64-bit key. A row's draw is thus a pure
function of its key and logits: the rows are drawn together, on any device, unaffected by
the rest of the batch. A seeded request's key is a hash of (seed, *seed_key); the engine
passes seed_key = (sample_index, position), so preemption and recomputation give the same
tokens. Unseeded rows take their key from a process-wide generator.

Filtering order (as transformers' warpers): temperature, top-k (ties with the k-th logit are
kept), top-p (smallest top set whose probability reaches top_p, at least one token), min-p
(keep p >= min_p * p_max). Logprobs are always those of the raw logits.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from pagedkv.runtime.engine.sampler import draw_key
from pagedkv.runtime.engine.sampling_params import SamplingParams

_MASK64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


@dataclass
class SampledToken:
    token_id: int
    logprob: float  # log-softmax of the raw logits at token_id
    top_logprobs: dict[int, float] | None = None  # params.logprobs best tokens of the raw distribution


def uniform(key: int) -> float:
    """A double in (0, 1) from 53 bits of splitmix64's first output for seed `key`."""
    z = (key + _GAMMA) & _MASK64
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
    z ^= z >> 31
    return ((z >> 11) + 0.5) / (1 << 53)


def filter_mask(logits: torch.Tensor, params_list: Sequence[SamplingParams]) -> torch.Tensor:
    """[M, V] bool: True where top-k / top-p / min-p remove a token (logits already scaled)."""
    m, vocab = logits.shape
    dev = logits.device
    remove = torch.zeros_like(logits, dtype=torch.bool)
    top_ks = [p.top_k if 0 < p.top_k < vocab else 0 for p in params_list]
    top_ps = [p.top_p for p in params_list]
    if any(top_ks) or min(top_ps) < 1.0:
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True, stable=True)
        removed = torch.zeros_like(remove)
        if any(top_ks):
            ks = torch.tensor([k or vocab for k in top_ks], device=dev)
            kth = sorted_logits.gather(1, (ks - 1)[:, None])
            removed |= sorted_logits < kth
        if min(top_ps) < 1.0:
            probs = torch.softmax(sorted_logits.masked_fill(removed, float("-inf")), dim=-1)
            before = probs.cumsum(dim=-1) - probs  # mass of the strictly better tokens
            # top_p == 1 must never cut: rounding can push `before` to 1.0 in the tail.
            limit = torch.tensor([p if p < 1.0 else float("inf") for p in top_ps], device=dev)
            removed |= before >= limit[:, None]
        remove.scatter_(1, sorted_idx, removed)
    min_ps = [p.min_p for p in params_list]
    if max(min_ps) > 0.0:
        probs = torch.softmax(logits.masked_fill(remove, float("-inf")), dim=-1)
        floor = torch.tensor(min_ps, device=dev)[:, None] * probs.max(dim=-1, keepdim=True).values
        remove |= probs < floor
    return remove


def _sample_random(logits: torch.Tensor, params_list: Sequence[SamplingParams],
                   keys: list[int]) -> torch.Tensor:
    temps = torch.tensor([p.temperature for p in params_list], device=logits.device)
    scaled = logits / temps[:, None]
    if any(0 < p.top_k < logits.shape[1] or p.top_p < 1.0 or p.min_p > 0.0 for p in params_list):
        scaled = scaled.masked_fill(filter_mask(scaled, params_list), float("-inf"))
    # Inverse CDF: the first token whose cumulative probability exceeds u * total. The target
    # stays below the total, so it lands on a token of non-zero probability.
    cdf = torch.softmax(scaled, dim=-1).cumsum_(dim=-1)
    total = cdf[:, -1:]
    u = torch.tensor([uniform(k) for k in keys], dtype=torch.float64, device=logits.device)
    target = (u[:, None] * total.double()).float()
    target = torch.minimum(target, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True)[:, 0]


def sample_batch(logits: torch.Tensor, params_list: Sequence[SamplingParams],
                 seed_keys: Sequence[tuple[int, ...] | None] | None = None) -> list[SampledToken]:
    """One token per row of `logits` [N, V]. Greedy rows cost one argmax together; the
    random rows are filtered and drawn together too."""
    n = logits.shape[0]
    if len(params_list) != n:
        raise ValueError(f"{len(params_list)} sampling parameters for {n} logits rows")
    if any(p.use_beam_search for p in params_list):
        raise ValueError("beam search requests are driven by BeamSearch, not sample_batch")
    seed_keys = seed_keys if seed_keys is not None else [None] * n
    logits = logits.float()
    log_total = torch.logsumexp(logits, dim=-1, keepdim=True)  # log-softmax = logits - log_total
    tokens = torch.empty(n, dtype=torch.int64, device=logits.device)
    greedy = [i for i, p in enumerate(params_list) if p.is_greedy]
    rand = [i for i, p in enumerate(params_list) if not p.is_greedy]
    if greedy:
        idx = torch.tensor(greedy, device=logits.device)
        tokens[idx] = logits[idx].argmax(dim=-1)
    if rand:
        idx = torch.tensor(rand, device=logits.device)
        keys = [draw_key(params_list[i].seed, seed_keys[i]) for i in rand]
        tokens[idx] = _sample_random(logits[idx], [params_list[i] for i in rand], keys)
    chosen = (logits.gather(1, tokens[:, None]) - log_total)[:, 0].tolist()
    token_list = tokens.tolist()
    max_top = max((p.logprobs or 0) for p in params_list)
    top_vals: list[list[float]] = [[] for _ in range(n)]
    top_ids: list[list[int]] = [[] for _ in range(n)]
    if max_top > 0:
        vals, ids = logits.topk(min(max_top, logits.shape[1]), dim=-1)
        top_vals, top_ids = (vals - log_total).tolist(), ids.tolist()
    out = []
    for i, p in enumerate(params_list):
        top = None
        if p.logprobs is not None:
            top = dict(zip(top_ids[i][:p.logprobs], top_vals[i][:p.logprobs]))
        out.append(SampledToken(token_list[i], chosen[i], top))
    return out


def sample_next(logits: torch.Tensor, params: SamplingParams,
                seed_key: tuple[int, ...] | None = None) -> SampledToken:
    """One token from one row of float logits [V]; see sample_batch."""
    return sample_batch(logits[None, :], [params], [seed_key])[0]
