"""BeamSearch must reproduce transformers' beam search exactly: same hypotheses, same order,
same scores. We drive it with the logits of a tiny random Llama (full forward of every beam
each step, shaped as transformers does it) and compare with `model.generate(num_beams=...)`."""
from __future__ import annotations

import collections
import itertools
import math

import pytest
import torch

from pagedkv.runtime.engine.beam_search import BeamSearch
from pagedkv.runtime.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.usefixtures("one_torch_thread")

transformers = pytest.importorskip("transformers")


def _model(seed: int, vocab: int = 160, eos: list[int] = (), eos_bias: float = 0.0):
    """A tiny random Llama; `eos_bias` is added to the EOS logits (a biased lm_head) so that
    beams end often and at many steps."""
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
        bos_token_id=None, eos_token_id=None, pad_token_id=None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(config).float().eval()
    if eos_bias:
        head = torch.nn.Linear(config.hidden_size, vocab, bias=True)
        with torch.no_grad():
            head.weight.copy_(model.lm_head.weight)
            head.bias.zero_()
            head.bias[list(eos)] = eos_bias
        model.lm_head = head
    return model


def _likely_tokens(model, prompt: list[int]) -> list[int]:
    """Tokens in order of preference right after the prompt."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt])).logits[0, -1]
    return logits.argsort(descending=True).tolist()


def _pick_eos(forward: "Forward", prompt: list[int], count: int) -> list[int]:
    """The tokens a beam search without EOS emits most after its first step: used as EOS,
    they end beams early, at various steps."""
    hyps, _ = run_ours(forward, prompt, SamplingParams(max_tokens=8, beam_width=6, n=6), [])
    counts = collections.Counter(t for h in hyps for t in h.token_ids[1:])
    return [t for t, _ in counts.most_common(count)]


class Forward:
    """Last-position logits of a batch of beams, computed as generate(use_cache=False) does
    (same batch shape, mask and logits_to_keep) so that the floats are bit-identical."""

    def __init__(self, model) -> None:
        self.model = model
        self.cache: dict[tuple, torch.Tensor] = {}

    def __call__(self, beams: list[list[int]]) -> torch.Tensor:
        key = tuple(map(tuple, beams))
        if key not in self.cache:
            ids = torch.tensor(beams)
            with torch.no_grad():
                out = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), logits_to_keep=1)
            self.cache[key] = out.logits[:, -1].float()
        return self.cache[key]


def run_ours(forward: Forward, prompt: list[int], params: SamplingParams, eos: list[int]):
    """Drive BeamSearch the way the engine does: one running sequence at first, then fork
    each new beam from its parent's row."""
    search = BeamSearch(params, len(prompt), eos)
    beams = [list(prompt)]
    steps = 0
    while True:
        # transformers runs beam_width identical prompt rows on the first step
        batch = beams if len(beams) > 1 else beams * params.beam_width
        choices = search.step(forward(batch)[:len(beams)])
        steps += 1
        if search.done:
            assert choices == []
            break
        assert len(choices) == params.beam_width
        cums = [c.cum_logprob for c in choices]
        assert cums == sorted(cums, reverse=True)
        beams = [beams[c.parent] + [c.token_id] for c in choices]
    return search.finalize(), steps


def run_hf(model, prompt: list[int], params: SamplingParams, eos: list[int]):
    out = model.generate(
        torch.tensor([prompt]), num_beams=params.beam_width, num_return_sequences=params.n,
        do_sample=False, max_new_tokens=params.max_tokens, length_penalty=params.length_penalty,
        early_stopping=params.early_stopping, eos_token_id=eos, pad_token_id=eos[0],
        output_scores=True, return_dict_in_generate=True, use_cache=False)
    return out.sequences[:, len(prompt):].tolist(), out.sequences_scores.tolist()


def check_same(model, forward, prompt, params, eos) -> tuple[list, int]:
    hyps, steps = run_ours(forward, prompt, params, eos)
    seqs, scores = run_hf(model, prompt, params, eos)
    label = (params.beam_width, params.n, params.length_penalty, params.early_stopping)
    assert len(hyps) == len(seqs) == params.n, label
    for h, seq, score in zip(hyps, seqs, scores):
        n = len(h.token_ids)
        # transformers pads shorter hypotheses with pad_token_id (= eos[0] here)
        assert seq[:n] == h.token_ids and all(t == eos[0] for t in seq[n:]), (label, hyps, seqs)
        # Same float32 operations on the same logits; a tolerance only for thread-count effects.
        assert h.score == pytest.approx(score, rel=1e-6, abs=1e-6), (label, h.score, score)
        assert 1 <= n <= params.max_tokens
        assert h.finish_reason == ("stop" if h.token_ids[-1] in eos else "length")
        assert (h.token_ids[-1] in eos) or n == params.max_tokens
        assert all(t not in eos for t in h.token_ids[:-1])
        assert math.isclose(sum(h.logprobs), h.cum_logprob, rel_tol=1e-4, abs_tol=1e-4)
        assert math.isclose(h.cum_logprob / n ** params.length_penalty, h.score, rel_tol=1e-5)
    return hyps, steps


GRID = list(itertools.product(range(2, 7), [1.0, 0.0, 2.0, -1.0], [True, False, "never"]))


def check_grid(model, forward, prompt, eos, max_tokens) -> tuple[int, int]:
    """Every beam width, length penalty and early-stopping rule; returns how many hypotheses
    ended before max_tokens and how many searches stopped before max_tokens."""
    short = early_stop = 0
    for k, lp, es in GRID:
        params = SamplingParams(max_tokens=max_tokens, beam_width=k, n=k, length_penalty=lp,
                                early_stopping=es)
        hyps, steps = check_same(model, forward, prompt, params, eos)
        short += sum(len(h.token_ids) < max_tokens for h in hyps)
        early_stop += steps < max_tokens
    return short, early_stop


@pytest.fixture(scope="module")
def model_a():
    model = _model(seed=0)
    return model, Forward(model)


def test_matches_transformers_natural_eos(model_a):
    model, forward = model_a
    prompt = [5, 17, 33, 2]
    short, early_stop = check_grid(model, forward, prompt, _pick_eos(forward, prompt, 1), 8)
    # The grid really exercises EOS: hypotheses ending early and searches stopping early.
    assert short >= 10 and early_stop >= 3, (short, early_stop)


@pytest.mark.parametrize("seed,prompt,eos,bias", [
    (2, [150, 1], [5], 3.0),
    (1, [7, 3, 100, 41, 9, 12], [10, 20], 2.0),  # several EOS ids: more candidates per step
    (3, [60, 61, 62], [1, 2, 3], 2.0),
    (3, [60, 61, 62], [1, 2, 3], 4.0),  # often more than beam_width EOS among the candidates
])
def test_matches_transformers_frequent_eos(seed, prompt, eos, bias):
    model = _model(seed, eos=eos, eos_bias=bias)
    short, early_stop = check_grid(model, Forward(model), prompt, eos, 8)
    assert short >= 100 and early_stop >= 10, (short, early_stop)


def test_matches_transformers_fewer_returned_than_beams():
    model = _model(2, eos=[5], eos_bias=3.0)
    forward = Forward(model)
    for k, n, lp, es in [(2, 1, 1.0, False), (3, 2, 0.0, True), (4, 1, 2.0, "never"),
                         (5, 3, -1.0, False), (6, 2, 1.0, "never"), (4, 3, 0.5, True)]:
        params = SamplingParams(max_tokens=10, beam_width=k, n=n, length_penalty=lp,
                                early_stopping=es)
        check_same(model, forward, [150, 1], params, [5])


def test_matches_transformers_tiny_vocab():
    # More candidates kept than the vocabulary has: transformers then takes some from its
    # -1e9-scored copies of the prompt row on the first step.
    model = _model(4, vocab=8)
    forward = Forward(model)
    for k, es in [(3, False), (4, True), (6, "never"), (6, False)]:
        check_same(model, forward, [1, 2, 3], SamplingParams(max_tokens=5, beam_width=k, n=k,
                                                              early_stopping=es), [0])


def test_single_token_and_no_early_eos(model_a):
    model, forward = model_a
    prompt = [9, 8, 7]
    unlikely = [_likely_tokens(model, prompt)[-1]]
    for k in (2, 5):
        check_same(model, forward, prompt, SamplingParams(max_tokens=1, beam_width=k, n=k), unlikely)
        hyps, _ = check_same(model, forward, prompt,
                             SamplingParams(max_tokens=4, beam_width=k, n=k, early_stopping=True),
                             unlikely)
        assert all(len(h.token_ids) == 4 and h.finish_reason == "length" for h in hyps)


def test_first_step_prompt_eos_is_a_hypothesis():
    # A dominant EOS: the best first token ends a beam at once, and beams must go on anyway.
    logits = torch.tensor([[5.0, 1.0, 0.5, 0.0, -1.0]])
    search = BeamSearch(SamplingParams(max_tokens=3, beam_width=2, n=2), prompt_len=4,
                        eos_token_ids=[0])
    choices = search.step(logits)
    assert [c.token_id for c in choices] == [1, 2] and [c.parent for c in choices] == [0, 0]
    assert not search.done
    lp = torch.log_softmax(logits[0], -1)
    assert choices[0].logprob == pytest.approx(float(lp[1]))
    assert choices[0].cum_logprob == pytest.approx(float(lp[1]))


def test_step_checks_rows_and_done():
    search = BeamSearch(SamplingParams(max_tokens=1, beam_width=3, n=3), prompt_len=2,
                        eos_token_ids=[])
    with pytest.raises(ValueError, match="logits rows"):
        search.step(torch.zeros(3, 10))
    assert search.step(torch.randn(1, 10)) == []
    assert search.done and len(search.finalize()) == 3
    with pytest.raises(RuntimeError):
        search.step(torch.zeros(3, 10))
