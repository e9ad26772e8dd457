"""vLLM's logits processing, written out row by row in numpy as its sampler defines it: the
independent oracle of the device sampler's `process_logits` (tests/test_sampler.py).

Order, as vLLM's v1 sampler: the structured-output bitmask (-inf where the grammar forbids),
min_tokens (-inf for the stop token ids and EOS while the output is shorter than min_tokens),
logit_bias (added), then `apply_penalties`:

    logits[logits > 0]  /= where(prompt_mask | output_mask, repetition_penalty, 1)
    logits[logits <= 0] *= where(prompt_mask | output_mask, repetition_penalty, 1)
    logits -= frequency_penalty * output_bin_counts
    logits -= presence_penalty * output_mask

all in float32.
"""
from __future__ import annotations

import numpy as np


def reference_process(logits: np.ndarray, params: list, history: list[tuple[list[int], int]] | None,
                      allowed: np.ndarray | None, eos_ids: list[int]) -> np.ndarray:
    """logits float32 [N, V]; params: SamplingParams per row; history: (token ids, prompt
    length) per row; allowed: bool [N, V] or None."""
    out = logits.astype(np.float32).copy()
    n, vocab = out.shape
    for r in range(n):
        p, row = params[r], out[r]
        if allowed is not None and p.structured_outputs is not None and allowed[r].any():
            row[~allowed[r]] = -np.inf
        if p.min_tokens:
            ids, prompt_len = history[r]
            if len(ids) - prompt_len < p.min_tokens:
                stops = set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos_ids))
                keep = row.copy()
                for t in stops:
                    if t < vocab:
                        row[t] = -np.inf
                if np.isneginf(row).all():  # the grammar allowed only stops: it wins
                    row[:] = keep
        for t, b in (p.logit_bias or {}).items():
            row[t] = np.float32(row[t] + np.float32(b))
        if p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0:
            ids, prompt_len = history[r]
            counts = np.zeros(vocab, dtype=np.float32)
            seen = np.zeros(vocab, dtype=bool)
            for j, t in enumerate(ids):
                seen[t] = True
                if j >= prompt_len:
                    counts[t] += 1
            rep = np.float32(p.repetition_penalty)
            for v in range(vocab):
                factor = rep if seen[v] else np.float32(1.0)
                row[v] = row[v] / factor if row[v] > 0 else row[v] * factor
            row -= np.float32(p.frequency_penalty) * counts
            row -= np.float32(p.presence_penalty) * (counts > 0).astype(np.float32)
    return out
