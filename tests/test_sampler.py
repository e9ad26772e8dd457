"""SamplingParams validation and the sampler: greedy, filtering, seeded reproducibility,
the sampled distribution, and logprobs."""
from __future__ import annotations

import math
import re
import struct

import numpy as np
import pytest
import torch

from pagedkv.runtime.engine import sampler
from pagedkv.runtime.engine.sampler import SampledToken, sample_batch, sample_next, set_global_seed
from pagedkv.runtime.engine.sampling_params import SamplingParams


@pytest.mark.parametrize("kwargs,field,words", [
    ({"max_tokens": 0}, "max_tokens", ">= 1"),
    ({"max_tokens": True}, "max_tokens", "integer"),
    ({"max_tokens": 3.0}, "max_tokens", "integer"),
    ({"temperature": -1}, "temperature", ">= 0"),
    ({"temperature": "1"}, "temperature", "number"),
    ({"temperature": float("nan")}, "temperature", "finite"),
    ({"top_k": -2}, "top_k", ">= 1"),
    ({"top_k": 1.5}, "top_k", ">= 1"),
    ({"top_k": True}, "top_k", ">= 1"),
    ({"top_p": 0.0}, "top_p", "(0, 1]"),
    ({"top_p": 1.5}, "top_p", "(0, 1]"),
    ({"min_p": -0.1}, "min_p", "[0, 1]"),
    ({"min_p": 2}, "min_p", "[0, 1]"),
    ({"seed": 1.5}, "seed", "integer"),
    ({"seed": True}, "seed", "integer"),
    ({"n": 0}, "n", ">= 1"),
    ({"n": "3"}, "n", "integer"),
    ({"beam_width": 0}, "beam_width", ">= 1"),
    ({"beam_width": 2, "n": 3}, "n", "beam_width"),
    ({"length_penalty": "long"}, "length_penalty", "number"),
    ({"length_penalty": float("inf")}, "length_penalty", "finite"),
    ({"early_stopping": "always"}, "early_stopping", "'never'"),
    ({"early_stopping": 1}, "early_stopping", "'never'"),
    ({"stop": [""]}, "stop", "non-empty strings"),
    ({"stop": [3]}, "stop", "non-empty strings"),
    ({"stop_token_ids": [-1]}, "stop_token_ids", ">= 0"),
    ({"stop_token_ids": [True]}, "stop_token_ids", ">= 0"),
    ({"stop_token_ids": 5}, "stop_token_ids", ">= 0"),
    ({"ignore_eos": 1}, "ignore_eos", "boolean"),
    ({"logprobs": 21}, "logprobs", "[0, 20]"),
    ({"logprobs": -1}, "logprobs", "[0, 20]"),
    ({"logprobs": 2.0}, "logprobs", "[0, 20]"),
])
def test_validation_names_field_and_range(kwargs, field, words):
    with pytest.raises(ValueError) as err:
        SamplingParams(**kwargs)
    message = str(err.value)
    assert message.startswith(field + " must"), message
    assert words in message, message


def test_valid_params_and_dict_round_trip():
    p = SamplingParams(max_tokens=5, temperature=0, top_k=-1, top_p=1, seed=3, stop="END",
                       stop_token_ids=(7,), beam_width=4, n=2, early_stopping="never", logprobs=0)
    assert p.is_greedy and p.use_beam_search
    assert p.temperature == 0.0 and isinstance(p.top_p, float) and p.stop == ["END"]
    assert SamplingParams.from_dict(p.to_dict()) == p
    assert not SamplingParams().is_greedy and not SamplingParams().use_beam_search
    with pytest.raises(ValueError, match="unknown sampling parameter.*best_of.*allowed: .*max_tokens"):
        SamplingParams.from_dict({"max_tokens": 3, "best_of": 2})
    with pytest.raises(ValueError, match="max_tokens must"):
        SamplingParams.from_dict({"max_tokens": "3"})


def _allowed(logits: torch.Tensor, p: SamplingParams) -> set[int]:
    """Independent float64 reference of the filtering rules."""
    x = (logits.double() / p.temperature).tolist()
    order = sorted(range(len(x)), key=lambda i: -x[i])
    keep = list(order)
    if p.top_k > 0:
        kth = x[order[min(p.top_k, len(x)) - 1]]
        keep = [i for i in keep if x[i] >= kth]

    def probs(ids):
        m = max(x[i] for i in ids)
        z = sum(math.exp(x[i] - m) for i in ids)
        return {i: math.exp(x[i] - m) / z for i in ids}

    if p.top_p < 1.0:
        pr, mass, chosen = probs(keep), 0.0, []
        for i in keep:  # still in descending order
            if mass >= p.top_p:
                break
            chosen.append(i)
            mass += pr[i]
        keep = chosen
    if p.min_p > 0.0:
        pr = probs(keep)
        top = max(pr.values())
        keep = [i for i in keep if pr[i] >= p.min_p * top]
    return set(keep)


def _distribution(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    allowed = _allowed(logits, p)
    x = logits.double() / p.temperature
    x[[i for i in range(len(x)) if i not in allowed]] = float("-inf")
    return torch.softmax(x, dim=-1)


def test_greedy_is_argmax_with_ties_to_lowest_id():
    torch.manual_seed(0)
    logits = torch.randn(8, 50)
    logits[3, [7, 30]] = 10.0
    greedy = SamplingParams(temperature=0.0)
    tokens = [t.token_id for t in sample_batch(logits, [greedy] * 8)]
    assert tokens == logits.argmax(dim=-1).tolist() and tokens[3] == 7
    assert sample_next(logits[5], SamplingParams(temperature=1e-7)).token_id == int(logits[5].argmax())


def test_greedy_batches_take_the_short_path_with_the_same_results(monkeypatch):
    """All-greedy CPU batches without top logprobs skip the plan and the packed copy: the same
    tokens, logprobs (bit for bit) and top_logprobs as the general path, NaN and -inf rows too."""
    torch.manual_seed(4)
    logits = torch.randn(6, 300) * 3
    logits[1, [5, 77]] = 20.0          # a tie
    logits[2] = float("-inf")
    logits[3, 10] = float("nan")
    logits[4, 200] = float("inf")
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.0, logprobs=0)] * 3
    short = sample_batch(logits, params)
    assert sampler.greedy_batch(logits, params) is not None
    monkeypatch.setattr(sampler, "greedy_batch", lambda logits, params: None)
    general = sample_batch(logits, params)
    key = [(t.token_id, struct.pack("d", t.logprob), t.top_logprobs) for t in short]
    assert key == [(t.token_id, struct.pack("d", t.logprob), t.top_logprobs) for t in general]
    assert short[1].token_id == 5 and short[1].top_logprobs == {} and short[0].top_logprobs is None
    mixed = params[:2] + [SamplingParams(temperature=0.7, seed=1)]
    assert sampler.greedy_batch(logits[:3], mixed) is None
    assert sampler.greedy_batch(logits[:1], [SamplingParams(temperature=0.0, logprobs=2)]) is None


FILTERS = [
    SamplingParams(temperature=0.8, top_k=5),
    SamplingParams(temperature=1.3, top_p=0.6),
    SamplingParams(temperature=1.0, min_p=0.2),
    SamplingParams(temperature=0.5, top_k=12, top_p=0.9, min_p=0.05),
    SamplingParams(temperature=2.0, top_k=1),
    SamplingParams(temperature=1.0, top_p=1e-6),
]


@pytest.mark.parametrize("params", FILTERS)
def test_filtered_draws_stay_in_allowed_set(params):
    gen = torch.Generator().manual_seed(1)
    for trial in range(20):
        logits = torch.randn(40, generator=gen) * 3
        allowed = _allowed(logits, params)
        rows = logits.expand(50, -1)
        picked = sample_batch(rows, [params] * 50, [(trial, i) for i in range(50)])
        assert {t.token_id for t in picked} <= allowed
    assert len(allowed) >= 1


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0, seed=7),
    SamplingParams(temperature=0.7, top_k=4, seed=8),
    SamplingParams(temperature=1.5, top_p=0.8, seed=9),
    SamplingParams(temperature=1.0, min_p=0.1, top_k=6, seed=10),
])
def test_empirical_distribution_matches_filtered_softmax(params):
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
    draws = 20000
    picked = sample_batch(logits.expand(draws, -1), [params] * draws, [(0, i) for i in range(draws)])
    counts = torch.bincount(torch.tensor([t.token_id for t in picked]), minlength=8).double()
    expected = _distribution(logits, params) * draws
    assert counts[expected == 0].sum() == 0
    nz = expected > 0
    chi2 = float(((counts[nz] - expected[nz]) ** 2 / expected[nz]).sum())
    assert chi2 < 30.0, (chi2, counts.tolist(), expected.tolist())  # df <= 7: p < 1e-4


def test_seeded_draw_depends_only_on_seed_and_key():
    torch.manual_seed(0)
    logits = torch.randn(6, 100)
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)
    alone = [sample_next(logits[i], params, (0, 10 + i)).token_id for i in range(6)]
    others = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.9, seed=5),
              SamplingParams(temperature=1.1)]
    for shuffle in range(3):
        perm = torch.randperm(6).tolist()
        rows = torch.cat([logits[perm], torch.randn(3, 100)])
        keys = [(0, 10 + i) for i in perm] + [(1, 0), (2, 2), None]
        got = sample_batch(rows, [params] * 6 + others, keys)
        assert [got[perm.index(i)].token_id for i in range(6)] == alone
    assert sample_next(logits[0], SamplingParams(temperature=1.0, top_p=0.95, seed=1234),
                       (0, 10)).token_id == alone[0]


def test_different_keys_and_seeds_give_different_draws():
    logits = torch.zeros(1000)
    params = SamplingParams(seed=3)
    by_key = {sample_next(logits, params, (0, pos)).token_id for pos in range(200)}
    by_sample = {sample_next(logits, params, (i, 5)).token_id for i in range(200)}
    by_seed = {sample_next(logits, SamplingParams(seed=s), (0, 5)).token_id for s in range(200)}
    assert min(len(by_key), len(by_sample), len(by_seed)) > 150  # ~180 distinct expected


def test_unseeded_draws_follow_global_generator():
    logits = torch.zeros(10000)
    params = SamplingParams()
    set_global_seed(42)
    first = [sample_next(logits, params).token_id for _ in range(5)]
    set_global_seed(42)
    assert [sample_next(logits, params).token_id for _ in range(5)] == first
    assert len(set(first)) > 1


def test_logprobs_are_raw_log_softmax():
    torch.manual_seed(2)
    logits = torch.randn(4, 64) * 2
    params = [SamplingParams(temperature=0.0, logprobs=5), SamplingParams(temperature=0.5, logprobs=0),
              SamplingParams(temperature=2.0, top_k=3, logprobs=20, seed=1), SamplingParams()]
    out = sample_batch(logits, params, [None, None, (0, 1), None])
    raw = torch.log_softmax(logits, dim=-1)
    for row, (tok, p) in enumerate(zip(out, params)):
        assert isinstance(tok, SampledToken)
        assert tok.logprob == pytest.approx(float(raw[row, tok.token_id]), abs=1e-6)
        if p.logprobs is None:
            assert tok.top_logprobs is None
            continue
        assert len(tok.top_logprobs) == p.logprobs
        best = raw[row].topk(p.logprobs)
        assert list(tok.top_logprobs) == best.indices.tolist()
        assert list(tok.top_logprobs.values()) == pytest.approx(best.values.tolist(), abs=1e-6)


def test_uniform_is_splitmix64_with_wraparound():
    mask = (1 << 64) - 1

    def splitmix64(key: int) -> int:  # the published algorithm, first output
        z = (key + 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    keys = [0, 1, 2**63 - 1, 2**63, 2**64 - 1, 0x123456789ABCDEF0]
    for key in keys:
        assert sampler.uniform(key) == ((splitmix64(key) >> 11) + 0.5) / 2**53
    draws = torch.tensor([sampler.uniform(k) for k in range(20000)])
    assert 0 < float(draws.min()) and float(draws.max()) < 1
    counts = torch.histc(draws, bins=10, min=0, max=1)
    assert float(((counts - 2000) ** 2 / 2000).sum()) < 33.7  # chi2, df 9: p < 1e-4


def test_draw_never_lands_on_a_zero_probability_token():
    # The extreme keys give u next to 0 and next to 1: the first and last allowed tokens.
    logits = torch.full((1, 10), float("-inf"))
    logits[0, 3] = logits[0, 6] = 0.0
    low = next(k for k in range(100000) if sampler.uniform(k) < 1e-4)
    high = next(k for k in range(100000) if sampler.uniform(k) > 1 - 1e-4)
    plan = sampler.plan_batch([SamplingParams(temperature=1.0)], None, 10)

    def draw(key: int) -> int:
        plan.arrays["key"] = np.array([key], dtype=np.uint64).view(np.int64)
        return int(sampler.sample_on_device(logits, sampler.Staging(logits.device).upload(plan.arrays), plan)[0, 0])

    assert draw(low) == 3
    assert draw(high) == 6


def test_batch_checks():
    with pytest.raises(ValueError, match="beam search"):
        sample_batch(torch.zeros(1, 5), [SamplingParams(beam_width=2)])
    with pytest.raises(ValueError, match="2 sampling parameters for 1"):
        sample_batch(torch.zeros(1, 5), [SamplingParams()] * 2)


# -- logits processing: penalties, logit_bias, min_tokens, grammar masks ---------------------------
from hypothesis import given, strategies as st  # noqa: E402

from reference_penalties import reference_process  # noqa: E402

from pagedkv.runtime.engine.sampler import Controls, plan_batch, process_logits  # noqa: E402
from pagedkv.runtime.engine.staging import Staging  # noqa: E402

_VOCAB = 37


@st.composite
def _processing_case(draw):
    n = draw(st.integers(1, 5))
    rows, history = [], []
    for _ in range(n):
        prompt = draw(st.lists(st.integers(0, _VOCAB - 1), min_size=1, max_size=12))
        output = draw(st.lists(st.integers(0, _VOCAB - 1), max_size=12))
        bias = draw(st.dictionaries(st.integers(0, _VOCAB - 1), st.floats(-100, 100, width=32), max_size=6))
        p = SamplingParams(
            max_tokens=30, temperature=0,
            presence_penalty=draw(st.sampled_from([0.0, 0.5, -1.25, 2.0])),
            frequency_penalty=draw(st.sampled_from([0.0, 0.3, -0.7, 1.9])),
            repetition_penalty=draw(st.sampled_from([1.0, 1.3, 0.8, 2.5])),
            logit_bias=bias or None, min_tokens=draw(st.sampled_from([0, 3, 20])),
            stop_token_ids=draw(st.lists(st.integers(0, _VOCAB - 1), max_size=3)),
            ignore_eos=draw(st.booleans()),
            structured_outputs={"regex": "a"} if draw(st.booleans()) else None)
        rows.append(p)
        history.append((prompt + output, len(prompt)))
    seed = draw(st.integers(0, 2**31))
    return rows, history, seed


def _bitmask(allowed: np.ndarray) -> np.ndarray:
    n, vocab = allowed.shape
    words = (vocab + 31) // 32
    bits = np.zeros((n, words * 32), dtype=np.uint8)
    bits[:, :vocab] = allowed
    return np.packbits(bits, axis=1, bitorder="little").view(np.int32).reshape(n, words)


@given(_processing_case())
def test_processing_equals_vllm_reference(case):
    params, history, seed = case
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(len(params), _VOCAB, generator=g) * 4
    allowed = (torch.rand(len(params), _VOCAB, generator=g) < 0.4).numpy()
    allowed[0, :] = False  # a row that allows nothing is left unconstrained
    for r, p in enumerate(params):
        if p.structured_outputs is None:
            allowed[r, :] = True
    eos = [2, 5]
    controls = Controls(history, _bitmask(allowed), eos)
    plan = plan_batch(params, None, _VOCAB, controls)
    got = process_logits(logits, Staging(torch.device("cpu")).upload(plan.arrays), plan.processing).numpy()
    want = reference_process(logits.numpy(), params, history, allowed, eos)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)
    # The sampler picks its greedy tokens from the processed logits, its logprobs from the raw ones.
    picked = sample_batch(logits, params, None, None, controls)
    raw = torch.log_softmax(logits, dim=-1)
    for r, t in enumerate(picked):
        assert want[r, t.token_id] == want[r].max()
        assert t.logprob == pytest.approx(raw[r, t.token_id].item(), abs=1e-5)


def test_random_rows_draw_from_processed_logits():
    logits = torch.zeros(4, _VOCAB)
    params = [SamplingParams(temperature=1.0, seed=i, logit_bias={7: -100.0, 9: 100.0}) for i in range(4)]
    assert [t.token_id for t in sample_batch(logits, params, [(0, i) for i in range(4)])] == [9] * 4


def test_penalty_params_are_checked():
    for kwargs, words in [({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": -3}, "frequency"),
                          ({"repetition_penalty": 0}, "repetition_penalty"), ({"logit_bias": {1: 101}}, "[-100, 100]"),
                          ({"logit_bias": {-1: 1}}, "token ids"), ({"min_tokens": 17}, "at most max_tokens"),
                          ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "exactly one"),
                          ({"structured_outputs": {"json": "{"}}, "not valid JSON"),
                          ({"structured_outputs": {"regex": "a"}, "beam_width": 2}, "beam search"),
                          ({"structured_outputs": {"choice": []}}, "non-empty list")]:
        with pytest.raises(ValueError, match=re.escape(words)):
            SamplingParams(**kwargs)
