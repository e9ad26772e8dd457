"""Beam search for one request, step by step, with transformers' exact semantics.

The engine owns the sequences and the KV cache; this class only decides. Per request:

    search = BeamSearch(params, prompt_len, eos_token_ids)
    beams = [prompt_seq]                          # one running sequence on the first step
    while True:
        logits = model(...)[rows of `beams`]        # [len(beams), V] float32, same order as beams
        choices = search.step(logits)
        if search.done:                           # choices == []: free every running sequence
            break
        # choices[i] = (parent, token_id, logprob, cum_logprob), best first, len == beam_width:
        # new beam i is beams[choices[i].parent] extended by choices[i].token_id.
        # Fork a parent once per extra child, free parents nobody picked.
        beams = [fork_or_reuse(beams[c.parent]).append(c.token_id) for c in choices]
    results = search.finalize()                   # params.n hypotheses, best first

The search keeps the running scores and every beam's generated tokens itself, so it does not
trust anything read back from the engine's sequences. Finished hypotheses (a beam whose new
token is in eos_token_ids, or that reached prompt_len + max_tokens) are stored inside and are
never returned by step(); the engine does not keep sequences for them.

Rules, as `GenerationMixin._beam_search` (transformers 5.x), with k = beam_width:
- Per step, the top K = max(2, 1 + len(eos_token_ids)) * k of all (beam, token) continuations
  by cumulative logprob are considered. The first step has k identical rows in transformers,
  all but the first scored -1e9; we reproduce that from the single prompt row.
- Running beams for the next step: the best k of the K that did not just finish.
- Of the finished continuations, only those ranked in the top k of the K may become
  hypotheses, scored cum_logprob / generated_len ** length_penalty (generated_len counts the
  EOS token). The k best hypotheses so far are kept.
- early_stopping True: stop once k hypotheses exist. False: stop when the best running beam,
  scored at its current length, cannot beat the worst kept hypothesis. "never": the same, but
  with length_penalty > 0 the running beam is scored at the maximum length.
- At the maximum length every continuation finishes, so the best k of them become
  hypotheses (if they beat the kept ones) and the search is done.
- finalize() returns the best n hypotheses, best first (transformers' sequences order).
All scores are float32 and computed with the same tensor operations, so ties break alike.
One difference: transformers marks "no hypothesis" with a -1e9 score, which real scores pass
below with a negative length_penalty (they grow with the length) and then lose to the
marker; here the marker is -inf, which changes nothing while scores stay above -1e9.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pagedkv.runtime.engine.sampling_params import SamplingParams

_NEG = -1.0e9  # transformers' "impossible" score
_NONE = float("-inf")  # the score of an empty hypothesis slot, below any real score


@dataclass
class BeamChoice:
    parent: int  # row of the logits passed to step() this beam continues
    token_id: int
    logprob: float  # log-softmax of the parent's logits at token_id
    cum_logprob: float  # the beam's new running score


@dataclass
class Hypothesis:
    token_ids: list[int]  # generated tokens, including the EOS that ended it
    logprobs: list[float]  # per generated token
    cum_logprob: float
    score: float  # cum_logprob / len(token_ids) ** length_penalty
    finish_reason: str  # "stop" (EOS / stop token) or "length"


class BeamSearch:
    def __init__(self, params: SamplingParams, prompt_len: int, eos_token_ids: list[int]) -> None:
        self.num_beams = params.beam_width
        self.num_return = params.n
        self.length_penalty = params.length_penalty
        self.early_stopping = params.early_stopping
        self.prompt_len = prompt_len
        self.max_length = prompt_len + params.max_tokens
        self.eos = list(dict.fromkeys(eos_token_ids))
        self.eos_set = frozenset(self.eos)  # up to 1 + MAX_STOP_TOKEN_IDS, looked up per candidate
        self.cur_len = prompt_len
        self.beams_to_keep = max(2, 1 + len(self.eos)) * self.num_beams
        self.done = False
        k = self.num_beams
        # Running beams: generated tokens and their logprobs, and the float32 scores.
        self._running: list[tuple[list[int], list[float]]] = [([], [])]
        self._running_scores = torch.full((k,), _NEG, dtype=torch.float32)
        self._running_scores[0] = 0.0
        # The k best hypotheses so far; slots not yet filled hold _NONE.
        self._hyp_scores = torch.full((k,), _NONE, dtype=torch.float32)
        self._hyp_finished = torch.zeros(k, dtype=torch.bool)
        self._hyps: list[Hypothesis | None] = [None] * k

    def step(self, logits: torch.Tensor) -> list[BeamChoice]:
        """Advance one token. `logits` [len(running beams), V], rows in the order of the
        previous step's choices (one row, the prompt's, on the first step)."""
        logprobs = torch.log_softmax(logits.detach().float(), dim=-1)
        top_scores, top_idx, token_lps = self.candidates(logprobs)
        return self.advance(top_scores.cpu(), top_idx.tolist(), token_lps.tolist(), logits.shape[-1])

    def candidates(self, logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The device half of a step: from the log-softmax of the running beams' logits, the
        top continuations' float32 scores, their flat indices (beam * V + token) and token
        logprobs, on the logits' device, best first."""
        if self.done:
            raise RuntimeError("beam search is already done")
        if logprobs.shape[0] != len(self._running):
            raise ValueError(f"expected {len(self._running)} logits rows, got {logprobs.shape[0]}")
        k, vocab = self.num_beams, logprobs.shape[-1]
        first = self.cur_len == self.prompt_len
        rows = logprobs.expand(k, vocab) if first else logprobs
        running = self._running_scores.to(logprobs.device, non_blocking=True)
        scores = (rows + running[:, None]).reshape(-1)
        top_scores, top_idx = torch.topk(scores, min(self.beams_to_keep, scores.numel()))
        # transformers' k prompt rows are identical copies of ours: every parent is row 0.
        parents = torch.zeros_like(top_idx) if first else top_idx // vocab
        return top_scores, top_idx, logprobs[parents, top_idx % vocab]

    def advance(self, top_scores: torch.Tensor, top_idx: list[int], token_lps: list[float],
                vocab: int) -> list[BeamChoice]:
        """The host half of a step, from `candidates`' results (top_scores a float32 CPU tensor)."""
        k = self.num_beams
        first = self.cur_len == self.prompt_len
        parents = [0] * len(top_idx) if first else [i // vocab for i in top_idx]
        tokens = [i % vocab for i in top_idx]
        at_max = self.cur_len + 1 >= self.max_length
        hits = torch.tensor([at_max or t in self.eos_set for t in tokens], dtype=torch.bool)

        # Running beams for the next step: the best k that did not just finish.
        running_scores = top_scores + hits.to(torch.float32) * _NEG
        nxt = torch.topk(running_scores, k)[1]
        self._running_scores = running_scores[nxt]

        # Hypotheses: finished continuations among the top k compete with the kept ones.
        just_finished = hits.clone()
        just_finished[k:] = False
        gen_len = self.cur_len + 1 - self.prompt_len
        # (transformers also masks out everything when a batch item is already complete;
        # for one request that state has already ended the search.)
        cand = top_scores / (gen_len ** self.length_penalty)
        cand = cand.masked_fill(~just_finished, _NONE)
        merged = torch.cat((self._hyp_scores, cand))
        best = torch.topk(merged, k)[1].tolist()
        finished, cand_list, cum_list = just_finished.tolist(), cand.tolist(), top_scores.tolist()
        hyps = []
        for j in best:
            c = j - k
            if c < 0:  # a kept hypothesis (or an empty slot)
                hyps.append(self._hyps[j])
            elif not finished[c]:  # an empty slot; never returned
                hyps.append(None)
            else:
                ids, lps = self._running[parents[c]]
                reason = "stop" if tokens[c] in self.eos_set else "length"
                hyps.append(Hypothesis(ids + [tokens[c]], lps + [token_lps[c]], cum_list[c],
                                       cand_list[c], reason))
        self._hyp_scores = merged[best]
        self._hyp_finished = torch.cat((self._hyp_finished, just_finished))[best]
        self._hyps = hyps

        self.cur_len += 1
        self._update_done(all_hit=bool(hits.all()))
        if self.done:
            self._running = []
            return []
        choices = []
        running = []
        run_list = running_scores.tolist()
        for j in nxt.tolist():
            ids, lps = self._running[parents[j]]
            running.append((ids + [tokens[j]], lps + [token_lps[j]]))
            choices.append(BeamChoice(parents[j], tokens[j], token_lps[j], run_list[j]))
        self._running = running
        return choices

    def _update_done(self, all_hit: bool) -> None:
        lp = self.length_penalty
        if self.early_stopping == "never" and lp > 0.0:
            best_len = self.max_length - self.prompt_len
        else:
            best_len = self.cur_len - self.prompt_len
        best_running = self._running_scores[:1] / (best_len ** lp)
        worst = torch.where(self._hyp_finished, self._hyp_scores.min(), _NONE)
        improvable = bool((best_running > worst).any())
        all_full = bool(self._hyp_finished.all()) and self.early_stopping is True
        self.done = not improvable or all_full or all_hit

    def finalize(self) -> list[Hypothesis]:
        """The best params.n hypotheses, best first (call once done)."""
        found = [h for h, f in zip(self._hyps, self._hyp_finished.tolist()) if f and h is not None]
        if not found:  # a request must never end with no output and no error
            raise RuntimeError("beam search ended without a finished hypothesis")
        return found[:self.num_return]
