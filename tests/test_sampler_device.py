"""The device sampler against the host sampler it replaced (tests/reference_sampler.py):
the same tokens and the same logprobs for random mixes of parameters, on the CPU and, with
the `gpu` marker, on CUDA (same tokens where the draw is not a near-tie)."""
from __future__ import annotations

import random

import pytest
import torch

import reference_sampler
from pagedkv.runtime.engine import sampler
from pagedkv.runtime.engine.sampler import sample_batch, set_global_seed, uniform, uniform_tensor
from pagedkv.runtime.engine.sampling_params import SamplingParams


def random_params(rng: random.Random, vocab: int) -> SamplingParams:
    kind = rng.random()
    temperature = 0.0 if kind < 0.25 else rng.choice([1e-6, 0.3, 0.7, 1.0, 1.5, 3.0])
    return SamplingParams(
        temperature=temperature,
        top_k=rng.choice([0, -1, 1, 2, 5, 17, vocab - 1, vocab, vocab + 3]),
        top_p=rng.choice([1.0, 1.0, 0.999, 0.9, 0.5, 0.1, 1e-6]),
        min_p=rng.choice([0.0, 0.0, 0.01, 0.1, 0.5, 1.0]),
        seed=rng.choice([None, None, 0, 7, 2**40 + 3, -5]),
        logprobs=rng.choice([None, None, 0, 1, 5, 20]))


def random_logits(gen: torch.Generator, n: int, vocab: int) -> torch.Tensor:
    logits = torch.randn(n, vocab, generator=gen) * float(torch.rand(1, generator=gen) * 6 + 0.1)
    if n > 1:  # ties and impossible tokens too
        logits[0, : vocab // 3] = 2.0
        logits[-1, ::3] = float("-inf")
    return logits


@pytest.mark.parametrize("trial", range(40))
def test_device_sampler_equals_host_sampler(trial):
    rng = random.Random(trial)
    gen = torch.Generator().manual_seed(trial)
    vocab = rng.choice([7, 50, 301])
    n = rng.choice([1, 2, 5, 16])
    logits = random_logits(gen, n, vocab)
    params = [random_params(rng, vocab) for _ in range(n)]
    keys = [rng.choice([None, (rng.randrange(4), rng.randrange(1000))]) for _ in range(n)]
    set_global_seed(trial)
    expected = reference_sampler.sample_batch(logits, params, keys)
    set_global_seed(trial)
    got = sample_batch(logits, params, keys)
    assert [t.token_id for t in got] == [t.token_id for t in expected]
    # Logprobs to float32 precision: on the CPU the log-sum-exp is one C pass
    # (cpu_ops.greedy_and_logsumexp) that sums in another order than torch.logsumexp.
    assert [t.logprob for t in got] == pytest.approx([t.logprob for t in expected], rel=0, abs=1e-5)
    assert [t.top_logprobs and list(t.top_logprobs) for t in got] == \
        [t.top_logprobs and list(t.top_logprobs) for t in expected]  # None, or the same ids in order
    for g, e in zip(got, expected):
        assert list((g.top_logprobs or {}).values()) == pytest.approx(list((e.top_logprobs or {}).values()), abs=1e-5)


def test_uniform_tensor_equals_uniform_with_wraparound():
    keys = [0, 1, 2, 2**31, 2**32 - 1, 2**62, 2**63 - 1, 2**63, 2**63 + 1, 2**64 - 1, 0x123456789ABCDEF0,
            0xFFFFFFFF00000000, 0x8000000000000001]
    keys += [random.Random(3).getrandbits(64) for _ in range(2000)]
    signed = torch.tensor([k - 2**64 if k >= 2**63 else k for k in keys], dtype=torch.int64)
    assert uniform_tensor(signed).tolist() == [uniform(k) for k in keys]


def test_one_copy_each_way_through_staging():
    uploads = []

    class Recording(sampler.Staging):
        def upload(self, arrays):
            uploads.append(sorted(arrays))
            return super().upload(arrays)

    logits = torch.randn(3, 20)
    params = [SamplingParams(temperature=0.0), SamplingParams(seed=1, top_k=3), SamplingParams(logprobs=2)]
    sample_batch(logits, params, [None, (0, 4), None], staging=Recording(torch.device("cpu")))
    assert uploads == [["greedy", "key", "min_p", "temperature", "top_k", "top_p"]]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_sampler_equals_host_sampler():
    rng = random.Random(0)
    gen = torch.Generator().manual_seed(0)
    agree = total = 0
    for trial in range(30):
        vocab = rng.choice([50, 32000])
        n = rng.choice([1, 8, 64])
        logits = random_logits(gen, n, vocab)
        params = [random_params(rng, vocab) for _ in range(n)]
        keys = [(0, rng.randrange(1000)) for _ in range(n)]
        params = [SamplingParams(**{**p.to_dict(), "seed": p.seed if p.seed is not None else 11}) for p in params]
        expected = reference_sampler.sample_batch(logits, params, keys)
        got = sample_batch(logits.cuda(), params, keys)
        for e, g, p in zip(expected, got, params):
            total += 1
            agree += e.token_id == g.token_id
            if p.is_greedy:
                assert g.token_id == e.token_id
            assert g.logprob == pytest.approx(e.logprob, abs=1e-4) or g.token_id != e.token_id
    assert agree >= 0.99 * total  # a softmax on another device may move a draw across a CDF step
