"""Prompt logprobs (vLLM's `prompt_logprobs`): for each prompt position i >= 1, the logprob of
prompt token i given the tokens before it, its rank, and the k likeliest tokens there.

The scheduler asks for the logits of the prompt positions of the requests that want them
(`ScheduledSeq.prompt_logits`), once per position whatever preemption recomputes; the model
computes those rows besides the sampling rows (`ModelInput.num_prompt_logits`), and
`compute` reduces them on the logits' device to what the request keeps: per position the
target's logprob and rank and the top k ids and logprobs, one copy to the host for the whole
step. `PromptLogprobs` gathers a request's positions across chunks and steps.

Logprobs are those of the raw logits in float32 (vLLM's default), computed as the sampler's
are: logit minus the row's log-sum-exp, never a whole [rows, vocab] log-softmax. The rank is
vLLM's: how many tokens are at least as likely as the target, itself included (1: the
likeliest), counted on the logits, whose order the logprobs share.
"""
from __future__ import annotations

import numpy as np
import torch

from pagedkv.kernels.cpu import ops as cpu_ops

# Rows reduced at a time: a bound on the [rows, vocab] temporaries beside the logits.
_CHUNK_ELEMENTS = 1 << 24


def _logsumexp(x: torch.Tensor) -> torch.Tensor:
    """[rows, 1]: the CPU kernel's one pass where it is built (the sampler's), else torch's."""
    fused = cpu_ops.greedy_and_logsumexp(x)
    return fused[1] if fused is not None else torch.logsumexp(x, dim=-1, keepdim=True)


def _count_at_least(x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """[rows]: how many entries of each row are >= that row's value. On the CPU with numpy,
    whose count of a boolean mask is several times faster than torch's sum of one."""
    if x.device.type == "cpu":
        return torch.from_numpy(np.count_nonzero(x.numpy() >= value.numpy(), axis=1))
    return (x >= value).sum(dim=-1)


@torch.inference_mode()
def compute(logits: torch.Tensor, targets: np.ndarray, k: int) -> np.ndarray:
    """Float64 [R, 2 + 2k] on the host for float logits [R, V] and int64 targets [R]: each
    row's target logprob, its rank, then the ids and logprobs of its k likeliest tokens
    (likeliest first). float64 holds the ids, ranks and float32 values exactly."""
    rows, vocab = logits.shape
    k = min(k, vocab)
    if rows == 0:
        return np.zeros((0, 2 + 2 * k))
    target = torch.from_numpy(np.ascontiguousarray(targets, dtype=np.int64)).to(logits.device)[:, None]
    step = max(1, _CHUNK_ELEMENTS // max(vocab, 1))
    parts = []
    for start in range(0, rows, step):
        x = logits[start:start + step].float().contiguous()
        log_total = _logsumexp(x)
        chosen = x.gather(1, target[start:start + step])
        rank = _count_at_least(x, chosen).to(x.device)
        cols = [(chosen - log_total).double(), rank[:, None].double()]
        if k:
            values, ids = x.topk(k, dim=-1)
            cols += [ids.double(), (values - log_total).double()]
        parts.append(torch.cat(cols, dim=1))
    return torch.cat(parts).cpu().numpy()


class PromptLogprobs:
    """One request's prompt logprobs, filled position by position as steps compute them."""

    def __init__(self, prompt: list[int], k: int) -> None:
        self.prompt = list(prompt)
        self.k = k
        self.values = np.zeros((max(len(prompt) - 1, 0), 2 + 2 * k))  # row i: prompt position i + 1
        self.filled = 0
        self._result: list[dict[int, tuple[float, int]] | None] | None = None

    @property
    def done(self) -> bool:
        return self.filled == len(self.values)

    def put(self, first: int, rows: np.ndarray, width: int) -> None:
        """The reductions (`compute`'s, of its top `width`) of the logits at positions
        first..first + len(rows) - 1, which predict prompt tokens first + 1 onwards."""
        k = self.k
        stop = first + len(rows)
        self.values[first:stop, :2] = rows[:, :2]
        self.values[first:stop, 2:2 + k] = rows[:, 2:2 + k]
        self.values[first:stop, 2 + k:] = rows[:, 2 + width:2 + width + k]
        self.filled = max(self.filled, stop)

    def result(self) -> list[dict[int, tuple[float, int]] | None]:
        """vLLM's shape: None for the first token; then per position {token id: (logprob, rank)}
        with the prompt token first and the k likeliest after it, ranked 1..k (a prompt token
        among them keeps its place, with the rank of its place there)."""
        if self._result is None:
            k = self.k
            out: list[dict[int, tuple[float, int]] | None] = [None]
            targets = self.prompt[1:]
            logprob, rank = self.values[:, 0].tolist(), self.values[:, 1].astype(np.int64).tolist()
            ids = self.values[:, 2:2 + k].astype(np.int64).tolist()
            tops = self.values[:, 2 + k:].tolist()
            ranks = range(1, k + 1)
            for target, lp, r, top_ids, top in zip(targets, logprob, rank, ids, tops):
                entry = {target: (lp, r)}
                entry.update(zip(top_ids, zip(top, ranks)))
                out.append(entry)
            self._result = out
        return self._result
