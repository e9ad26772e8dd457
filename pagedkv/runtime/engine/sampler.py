"""Token sampling: greedy, temperature, top-k, top-p, min-p, with reproducible seeds, on the
device where the logits are: only token ids and the logprobs asked for reach the host.

Random draws invert the CDF: token = the first v whose cumulative probability exceeds u, with
u uniform in (0, 1) from splitmix64 of the row's 64-bit key. A row's draw is thus a pure
function of its key and logits: the rows are drawn together, on any device, unaffected by
the rest of the batch. A seeded request's key is a hash of (seed, *seed_key); the engine
passes seed_key = (sample_index, position), so preemption and recomputation give the same
tokens. Unseeded rows take their key from a process-wide generator.

Before any of it, the logits are processed in vLLM's order (`process_logits`): a grammar's mask
(structured outputs: -inf where the grammar forbids a token), min_tokens (-inf for EOS and the
stop token ids while the output is shorter), logit_bias (added), then the penalties:
repetition over prompt and output tokens (positive logits divided by it, others multiplied),
frequency (times each token's count in the output) and presence (once per token the output
holds) subtracted. Every row at once, on the logits' device, from per-row arrays that go up
with the other parameters; the greedy fast path takes the processed logits too.

Filtering order (as transformers' warpers): temperature, top-k (ties with the k-th logit are
kept), top-p (smallest top set whose probability reaches top_p, at least one token), min-p
(keep p >= min_p * p_max). Logprobs are always those of the raw logits (vLLM's default).
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from pagedkv.kernels.cpu import ops as cpu_ops
from pagedkv.runtime.engine.sampling_params import SamplingParams
from pagedkv.runtime.engine.staging import Staging

_MASK64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB

_global_rng = random.Random()


@dataclass
class SampledToken:
    token_id: int
    logprob: float  # log-softmax of the raw logits at token_id
    top_logprobs: dict[int, float] | None = None  # params.logprobs best tokens of the raw distribution


def set_global_seed(seed: int) -> None:
    """Seed the generator used by requests without a seed of their own."""
    _global_rng.seed(seed)


def draw_key(seed: int | None, seed_key: tuple[int, ...] | None) -> int:
    """The 64-bit key of one draw: a stable hash of (seed, *seed_key), or fresh randomness."""
    if seed is None:
        return _global_rng.getrandbits(64)
    data = repr((seed, *(seed_key or ()))).encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def uniform(key: int) -> float:
    """A double in (0, 1) from 53 bits of splitmix64's first output for seed `key`."""
    z = (key + _GAMMA) & _MASK64
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
    z ^= z >> 31
    return ((z >> 11) + 0.5) / (1 << 53)


@dataclass
class Controls:
    """What the logits processing needs beyond the parameters, per row, from the engine.

    history: each row's (token ids so far, prompt length), where any row has penalties or
    min_tokens; grammar_mask: int32 [N, words] bitmask (structured.py) where any row has a
    grammar, -1 (all allowed) in the others; eos_token_ids: what min_tokens holds back, with
    each row's stop_token_ids (not where that row ignores EOS)."""

    history: Sequence[tuple[Sequence[int], int]] | None = None
    grammar_mask: np.ndarray | None = None
    eos_token_ids: Sequence[int] = ()


@dataclass
class Processing:
    """Which parts of the logits processing a batch needs."""

    grammar: bool = False
    min_tokens: bool = False
    bias: bool = False
    penalties: bool = False

    def __bool__(self) -> bool:
        return self.grammar or self.min_tokens or self.bias or self.penalties


def _padded(lists: list[list], pad, dtype) -> np.ndarray:
    width = max((len(x) for x in lists), default=0)
    out = np.full((len(lists), max(width, 1)), pad, dtype=dtype)
    for i, x in enumerate(lists):
        out[i, :len(x)] = x
    return out


def processing_arrays(params_list: Sequence[SamplingParams], controls: Controls | None,
                      vocab: int) -> tuple[Processing, dict[str, np.ndarray]]:
    """The per-row arrays of `process_logits`. Token ids are padded with `vocab`, a column
    that the scatters write and the result drops."""
    n = len(params_list)
    controls = controls or Controls()
    proc = Processing()
    arrays: dict[str, np.ndarray] = {}
    if any(p.structured_outputs is not None for p in params_list):
        if controls.grammar_mask is None or controls.grammar_mask.shape[0] != n:
            raise ValueError("a structured request's row has no grammar mask")
        proc.grammar = True
        arrays["grammar"] = controls.grammar_mask
    history = controls.history
    need_history = any(p.has_penalties or p.min_tokens for p in params_list)
    if need_history and (history is None or len(history) != n):
        raise ValueError("penalties and min_tokens need every row's tokens")
    blocked = []
    for i, p in enumerate(params_list):
        ids: list[int] = []
        if p.min_tokens and len(history[i][0]) - history[i][1] < p.min_tokens:
            ids = list(p.stop_token_ids) + ([] if p.ignore_eos else list(controls.eos_token_ids))
            ids = [t for t in ids if t < vocab]
        blocked.append(ids)
    if any(blocked):
        proc.min_tokens = True
        arrays["blocked"] = _padded(blocked, vocab, np.int64)
    if any(p.logit_bias for p in params_list):
        proc.bias = True
        items = [[(t, v) for t, v in (p.logit_bias or {}).items() if t < vocab] for p in params_list]
        arrays["bias_ids"] = _padded([[t for t, _ in row] for row in items], vocab, np.int64)
        arrays["bias"] = _padded([[v for _, v in row] for row in items], 0.0, np.float32)
    if any(p.has_penalties for p in params_list):
        proc.penalties = True
        rows = [list(history[i][0]) if p.has_penalties else [] for i, p in enumerate(params_list)]
        arrays["seen"] = _padded(rows, vocab, np.int64)
        arrays["output"] = _padded([[j >= history[i][1] for j in range(len(r))] for i, r in enumerate(rows)],
                                   False, np.float32)
        arrays["penalty"] = np.array([[p.presence_penalty, p.frequency_penalty, p.repetition_penalty]
                                      for p in params_list], dtype=np.float64).astype(np.float32).reshape(n, 3)
    return proc, arrays


def grammar_allowed(mask: torch.Tensor, vocab: int) -> torch.Tensor:
    """[N, V] bool from an int32 [N, words] bitmask (bit j of word w: token 32 * w + j)."""
    shifts = torch.arange(32, device=mask.device, dtype=torch.int32)
    bits = (mask[:, :, None] >> shifts) & 1
    return bits.reshape(mask.shape[0], -1)[:, :vocab].bool()


def _forbid_on_cpu(x: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """Writes -inf where the bitmask forbids, in place, with numpy (an order of magnitude faster
    than torch's bit expansion and masked_fill for [32, 49152] on the CPU); returns the bool
    [N, V] of what is allowed."""
    vocab = x.shape[1]
    forbidden = np.unpackbits(~mask.numpy().view(np.uint8), axis=1, bitorder="little")[:, :vocab].view(bool)
    forbidden[forbidden.all(axis=1)] = False
    np.copyto(x.numpy(), np.float32(-np.inf), where=forbidden)
    return ~forbidden


def in_place(proc: Processing, max_top: int) -> bool:
    """Whether the processing may write into the logits themselves: masks alone (a grammar,
    min_tokens) write -inf only where no token is drawn, so the drawn token's raw logit stays;
    top logprobs need the raw rows whole."""
    return not (proc.bias or proc.penalties) and not max_top


@torch.inference_mode()  # the model's logits are inference tensors, which change in place only there
def process_logits(logits: torch.Tensor, t: dict[str, torch.Tensor], proc: Processing,
                   inplace: bool = False) -> torch.Tensor:
    """The float32 logits after the grammar mask, min_tokens, logit_bias and the penalties, in
    vLLM's order: a new tensor, or `logits` itself changed where `inplace` (see `in_place`)."""
    n, vocab = logits.shape
    x = logits.float()
    if not inplace or x is not logits or not x.is_contiguous():
        x = x.clone()
    allowed = None
    if proc.grammar:
        # A row that allows nothing is one whose result is dropped (its sequence ended while
        # the step computed) or whose matcher failed; it is drawn as if unconstrained.
        if x.device.type == "cpu":
            allowed = torch.from_numpy(_forbid_on_cpu(x, t["grammar"]))
        else:
            allowed = grammar_allowed(t["grammar"], vocab)
            allowed |= ~allowed.any(dim=1, keepdim=True)
            x.masked_fill_(~allowed, float("-inf"))
    if proc.min_tokens:
        blocked = torch.zeros(n, vocab + 1, dtype=torch.bool, device=x.device)
        blocked.scatter_(1, t["blocked"], True)
        blocked = blocked[:, :vocab]
        if allowed is not None:  # where the grammar allows only these, the grammar wins
            blocked &= (allowed & ~blocked).any(dim=1, keepdim=True)
        x.masked_fill_(blocked, float("-inf"))
    if proc.bias:
        bias = torch.zeros(n, vocab + 1, dtype=torch.float32, device=x.device)
        bias.scatter_add_(1, t["bias_ids"], t["bias"])
        x += bias[:, :vocab]
    if proc.penalties:
        seen_ids = t["seen"]
        counts = torch.zeros(n, vocab + 1, dtype=torch.float32, device=x.device)
        counts.scatter_add_(1, seen_ids, t["output"])
        seen = torch.zeros(n, vocab + 1, dtype=torch.bool, device=x.device)
        seen.scatter_(1, seen_ids, True)
        counts, seen = counts[:, :vocab], seen[:, :vocab]
        presence, frequency, repetition = t["penalty"][:, 0:1], t["penalty"][:, 1:2], t["penalty"][:, 2:3]
        factor = torch.where(seen, repetition, torch.ones_like(x))
        x = torch.where(x > 0, x / factor, x * factor)
        x -= frequency * counts
        x -= presence * (counts > 0).float()
    return x


@dataclass
class SamplingPlan:
    """Which parts of the sampler a batch needs, decided on the host from the parameters alone
    (no device sync). The filters run for every row when any random row needs them: a row
    whose parameters are neutral (top_k = vocab, top_p = inf, min_p = 0) comes out unchanged."""

    params: list[SamplingParams]
    arrays: dict[str, np.ndarray]  # per-row parameters, uploaded in one copy
    any_greedy: bool
    any_random: bool
    top_k: bool
    top_p: bool
    min_p: bool
    max_top: int  # the most top logprobs any row asked for
    processing: Processing = None  # the logits processing the batch needs (none: nothing to do)


def _row(p: SamplingParams, vocab: int) -> tuple[float, float, float, float, float]:
    """(greedy, temperature, top_k, top_p, min_p) of one row; greedy rows get neutral values:
    their random draw is computed and thrown away."""
    if p.is_greedy:
        return 1.0, 1.0, vocab, float("inf"), 0.0
    return (0.0, p.temperature, p.top_k if 0 < p.top_k < vocab else vocab,
            p.top_p if p.top_p < 1.0 else float("inf"), p.min_p)


def plan_batch(params_list: Sequence[SamplingParams], seed_keys: Sequence[tuple[int, ...] | None] | None,
               vocab: int, controls: Controls | None = None) -> SamplingPlan:
    n = len(params_list)
    if any(p.use_beam_search for p in params_list):
        raise ValueError("beam search requests are driven by BeamSearch, not sample_batch")
    seed_keys = seed_keys if seed_keys is not None else [None] * n
    rows: dict[int, tuple] = {}  # one request's rows share a SamplingParams: convert it once
    table = np.array([rows.get(id(p)) or rows.setdefault(id(p), _row(p, vocab)) for p in params_list],
                     dtype=np.float64).reshape(n, 5)
    greedy = table[:, 0] > 0
    rand = ~greedy
    # Keys in row order of the random rows: unseeded rows consume the global generator so.
    keys = np.zeros(n, dtype=np.uint64)
    for i in np.flatnonzero(rand).tolist():
        keys[i] = draw_key(params_list[i].seed, seed_keys[i])
    # float64 -> float32 rounds as Python float -> float32 does.
    arrays = {"temperature": table[:, 1].astype(np.float32), "top_k": table[:, 2].astype(np.int64),
              "top_p": table[:, 3].astype(np.float32), "min_p": table[:, 4].astype(np.float32),
              "key": keys.view(np.int64), "greedy": greedy.view(np.uint8)}
    proc, extra = processing_arrays(params_list, controls, vocab)
    arrays.update(extra)
    return SamplingPlan(list(params_list), arrays, bool(greedy.any()), bool(rand.any()),
                        bool((table[rand, 2] < vocab).any()), bool((table[rand, 3] < np.inf).any()),
                        bool((table[rand, 4] > 0.0).any()), max((p.logprobs or 0) for p in params_list), proc)


def _shr(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's >> is arithmetic)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def _signed(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


def uniform_tensor(keys: torch.Tensor) -> torch.Tensor:
    """`uniform` of int64 keys (bit patterns of the 64-bit keys), on the keys' device, as
    float64. int64 addition and multiplication wrap modulo 2**64, as the unsigned ones do."""
    z = keys + _signed(_GAMMA)
    z = (z ^ _shr(z, 30)) * _signed(_MIX1)
    z = (z ^ _shr(z, 27)) * _signed(_MIX2)
    z = z ^ _shr(z, 31)
    return (_shr(z, 11).double() + 0.5) / float(1 << 53)


def filter_mask(logits: torch.Tensor, t: dict[str, torch.Tensor], plan: SamplingPlan) -> torch.Tensor:
    """[N, V] bool: True where top-k / top-p / min-p remove a token (logits already scaled)."""
    remove = torch.zeros_like(logits, dtype=torch.bool)
    if plan.top_k or plan.top_p:
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True, stable=True)
        removed = torch.zeros_like(remove)
        if plan.top_k:
            kth = sorted_logits.gather(1, (t["top_k"] - 1)[:, None])
            removed |= sorted_logits < kth
        if plan.top_p:
            probs = torch.softmax(sorted_logits.masked_fill(removed, float("-inf")), dim=-1)
            before = probs.cumsum(dim=-1) - probs  # mass of the strictly better tokens
            # top_p == 1 is inf here and never cuts: rounding can push `before` to 1.0 in the tail.
            removed |= before >= t["top_p"][:, None]
        remove.scatter_(1, sorted_idx, removed)
    if plan.min_p:
        probs = torch.softmax(logits.masked_fill(remove, float("-inf")), dim=-1)
        remove |= probs < t["min_p"][:, None] * probs.max(dim=-1, keepdim=True).values
    return remove


def _draw(logits: torch.Tensor, t: dict[str, torch.Tensor], plan: SamplingPlan) -> torch.Tensor:
    scaled = logits / t["temperature"][:, None]
    if plan.top_k or plan.top_p or plan.min_p:
        scaled = scaled.masked_fill(filter_mask(scaled, t, plan), float("-inf"))
    # Inverse CDF: the first token whose cumulative probability exceeds u * total. The target
    # stays below the total, so it lands on a token of non-zero probability.
    cdf = torch.softmax(scaled, dim=-1).cumsum_(dim=-1)
    total = cdf[:, -1:]
    target = (uniform_tensor(t["key"])[:, None] * total.double()).float()
    target = torch.minimum(target, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True)[:, 0]


def sample_on_device(logits: torch.Tensor, t: dict[str, torch.Tensor], plan: SamplingPlan) -> torch.Tensor:
    """Float64 [N, 2 + 2 * max_top] on the logits' device: token id, its logprob, then the top
    ids and their logprobs (float64 holds the ids and the float32 values exactly), so that one
    copy brings a batch's results to the host."""
    logits = logits.float()
    # log-softmax = logits - log_total; greedy: the first maximum, as argmax (max(dim) costs a
    # third of argmax's CPU time). On the CPU both in one kernel call, not five operations.
    tokens, log_total = _greedy(logits)
    processed = logits
    if plan.processing:  # tokens come from the processed logits, logprobs from the raw ones
        processed = process_logits(logits, t, plan.processing, in_place(plan.processing, plan.max_top))
        if plan.any_greedy:
            tokens = _greedy(processed)[0]
    if plan.any_random:
        drawn = _draw(processed, t, plan)
        tokens = torch.where(t["greedy"].view(torch.bool), tokens, drawn) if plan.any_greedy else drawn
    cols = [tokens[:, None].double(), (logits.gather(1, tokens[:, None]) - log_total).double()]
    if plan.max_top:
        vals, ids = logits.topk(min(plan.max_top, logits.shape[1]), dim=-1)
        cols += [ids.double(), (vals - log_total).double()]
    return torch.cat(cols, dim=1)


def _greedy(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The first maximum of each row and the row's log-sum-exp."""
    fused = cpu_ops.greedy_and_logsumexp(logits)
    if fused is not None:
        return fused
    return logits.max(dim=-1).indices, torch.logsumexp(logits, dim=-1, keepdim=True)


def unpack(packed: torch.Tensor, plan: SamplingPlan) -> list[SampledToken]:
    """The host side of `sample_on_device`'s result."""
    width = (packed.shape[1] - 2) // 2
    out = []
    for row, p in zip(packed.tolist(), plan.params):
        top = None
        if p.logprobs is not None:
            k = p.logprobs
            top = dict(zip((int(i) for i in row[2:2 + k]), row[2 + width:2 + width + k]))
        out.append(SampledToken(int(row[0]), row[1], top))
    return out


def sample_batch(logits: torch.Tensor, params_list: Sequence[SamplingParams],
                 seed_keys: Sequence[tuple[int, ...] | None] | None = None,
                 staging: Staging | None = None, controls: Controls | None = None) -> list[SampledToken]:
    """One token per row of `logits` [N, V], on the logits' device: the parameters go up in
    one copy (through `staging` when given), the results come down in one. `controls`: what
    penalties, min_tokens and grammars need (see Controls)."""
    n = logits.shape[0]
    if len(params_list) != n:
        raise ValueError(f"{len(params_list)} sampling parameters for {n} logits rows")
    processes = any(p.processes_logits for p in params_list)
    if not processes:
        greedy = greedy_batch(logits, params_list)
        if greedy is not None:
            return greedy
    plan = plan_batch(params_list, seed_keys, logits.shape[1], controls)
    if n == 0:
        return []
    tensors = (staging or Staging(logits.device)).upload(plan.arrays)
    if processes and _fast_greedy(logits, params_list):
        return greedy_batch(logits, params_list,
                            lambda: process_logits(logits, tensors, plan.processing, in_place(plan.processing, 0)))
    return unpack(sample_on_device(logits, tensors, plan).cpu(), plan)


def _fast_greedy(logits: torch.Tensor, params_list: Sequence[SamplingParams]) -> bool:
    return (logits.device.type == "cpu" and cpu_ops.greedy_and_logsumexp(logits[:0]) is not None
            and all(p.is_greedy and not p.logprobs and not p.use_beam_search for p in params_list))


def greedy_batch(logits: torch.Tensor, params_list: Sequence[SamplingParams],
                 process: Callable[[], torch.Tensor] | None = None) -> list[SampledToken] | None:
    """`sample_batch` of a CPU batch whose rows are all greedy and ask for no top logprobs (the
    common case): the kernel's tokens and log-sum-exps, without a plan, an upload or a packed
    copy. None where that does not apply. `process`: gives the logits after `process_logits`
    (perhaps `logits` changed in place), which then pick the tokens; the logprobs are those of
    the raw logits, read before."""
    if not params_list or any(not p.is_greedy or p.logprobs or p.use_beam_search for p in params_list):
        return None
    fused = cpu_ops.greedy_and_logsumexp(logits)
    if fused is None:
        return None
    tokens, log_total = fused
    if process is not None:
        tokens = cpu_ops.greedy_and_logsumexp(process())[0]
    logprobs = (logits.gather(1, tokens[:, None]) - log_total)[:, 0].tolist()
    return [SampledToken(t, lp, None if p.logprobs is None else {})
            for t, lp, p in zip(tokens.tolist(), logprobs, params_list)]


def sample_next(logits: torch.Tensor, params: SamplingParams,
                seed_key: tuple[int, ...] | None = None) -> SampledToken:
    """One token from one row of float logits [V]; see sample_batch."""
    return sample_batch(logits[None, :], [params], [seed_key])[0]
