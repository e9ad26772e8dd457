"""Bad input hurts no one else: parameters are checked at admission in the precision they are
used in, and a request whose sampling or beam search fails in a step ends alone, with an error,
while the requests beside it finish exactly as they would have without it."""
import pytest
import torch

from pagedkv.runtime.engine.llm import LLM
from pagedkv.runtime.engine.sampling_params import SamplingParams
from pagedkv.runtime.models.loader import load_model

PROMPTS = [[5, 6, 7], list(range(20, 33)), [9] * 6, [100, 200, 300, 400], [3, 4], list(range(40, 49)),
           [77, 78], [11, 12, 13, 14, 15]]
GOOD = [SamplingParams(max_tokens=12, temperature=0.0),
        SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, seed=1, n=2),
        SamplingParams(max_tokens=8, beam_width=3, n=2, temperature=0.0),
        SamplingParams(max_tokens=14, temperature=1.0, top_k=20, seed=7, ignore_eos=True),
        SamplingParams(max_tokens=9, temperature=0.7, min_p=0.05, seed=3, logprobs=2),
        SamplingParams(max_tokens=6, beam_width=2, length_penalty=0.5, temperature=0.0),
        SamplingParams(max_tokens=11, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=7, temperature=1.2, seed=11, n=3)]


@pytest.fixture(scope="module")
def loaded(tiny_model):
    return load_model(tiny_model())


DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])]


def make_llm(loaded, device: str = "cpu", async_scheduling: bool = False) -> LLM:
    # float32 on CUDA too: the comparison with and without the poison is exact only if a row's
    # logits do not depend on the batch around it.
    return LLM(loaded=loaded, block_size=4, num_device_blocks=256, swap_space_gib=0.01, device=device,
               dtype="float32", async_scheduling=async_scheduling)


def run(engine, requests: dict, poison_at: dict | None = None) -> dict:
    """Steps the engine to the end; poison_at[step] = [(request id, attribute, value)] changes a
    request's parameters (or its beam search's) behind validation's back before that step."""
    for request_id, (prompt, params) in requests.items():
        engine.add_request(request_id, prompt, params)
    finished, step = {}, 0
    while engine.has_unfinished():
        for request_id, name, value in (poison_at or {}).get(step, []):
            target = engine.beams.get(request_id) or engine.groups[request_id].sampling_params
            setattr(target, name, value)
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
        step += 1
    return finished


def summary(output):
    return [(c.token_ids, c.finish_reason) for c in output.outputs]


# -- admission: the exact reproductions, refused with a message that names the parameter ----------
@pytest.mark.parametrize("params, name", [
    (dict(top_p=1e-46), "top_p"),                                               # 0 in float32
    (dict(top_p=1e-40), "top_p"),                                               # subnormal in float32
    (dict(temperature=1e39), "temperature"),                                    # inf in float32
    (dict(beam_width=2, length_penalty=300, max_tokens=40), "length_penalty"),  # 40 ** 300 overflows
    (dict(beam_width=2, length_penalty=1e308, max_tokens=40), "length_penalty"),
    (dict(beam_width=2, length_penalty=400, early_stopping="never", max_tokens=40), "length_penalty"),
    (dict(beam_width=2, length_penalty=-300, max_tokens=40), "length_penalty"),
])
def test_parameters_that_break_float32_are_refused_at_admission(params, name):
    with pytest.raises(ValueError) as e:
        SamplingParams(**params)
    assert str(e.value).startswith(f"{name} must"), e.value
    assert "float32" in str(e.value)


def test_the_same_values_pass_where_they_are_harmless():
    SamplingParams(length_penalty=300, max_tokens=40)                   # no beam search: unused
    SamplingParams(beam_width=2, length_penalty=300, max_tokens=1)      # length 1 ** anything is 1
    SamplingParams(beam_width=2, length_penalty=8, max_tokens=4096)     # 4096 ** 8 is 8e28
    SamplingParams(top_p=2e-38, min_p=1e-46, temperature=3e38)


def test_negative_length_penalty_beam_search_returns_n_outputs(loaded):
    """A final reply with `outputs: []` for a legal request: the scores outgrew the -1e9
    that marked an empty hypothesis slot."""
    params = SamplingParams(beam_width=2, n=2, length_penalty=-5, max_tokens=32, temperature=0.0)
    output = make_llm(loaded).generate([[5, 6, 7]], params, use_tqdm=False)[0]
    assert output.error is None and len(output.outputs) == 2
    for c in output.outputs:
        assert 1 <= len(c.token_ids) <= 32 and c.finish_reason in ("stop", "length")
    scores = [c.cumulative_logprob * len(c.token_ids) ** 5 for c in output.outputs]
    assert scores == sorted(scores, reverse=True)  # best first, by the penalised score


# -- in a step: one poisoned request among 8 good ones ---------------------------------------------
POISONS = {
    # the sampler's answer to a top_p of 0: a token id equal to the vocabulary size
    "top_p 0 at once": {0: [("poison", "top_p", 0.0)]},
    "top_p 0 mid-way": {3: [("poison", "top_p", 0.0)]},
    # OverflowError in beam search: 2 ** 1e308
    "length_penalty 1e308": {2: [("poison", "length_penalty", 1e308)]},
    "temperature nan": {1: [("poison", "temperature", float("nan"))]},
}


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("poison", list(POISONS))
def test_a_poisoned_request_fails_alone_and_the_others_finish_as_without_it(loaded, poison, device,
                                                                             async_scheduling):
    good = {f"good{i}": (prompt, params) for i, (prompt, params) in enumerate(zip(PROMPTS, GOOD))}
    clean = run(make_llm(loaded, device).engine, good)
    beam = "length_penalty" in poison
    bad = SamplingParams(max_tokens=20, beam_width=2 if beam else 1, temperature=0.0 if beam else 0.9, seed=5)
    engine = make_llm(loaded, device, async_scheduling).engine
    mixed = run(engine, {**dict(list(good.items())[:4]), "poison": ([8, 9, 10, 11], bad),
                         **dict(list(good.items())[4:])}, POISONS[poison])
    assert set(mixed) == set(clean) | {"poison"}
    for request_id in clean:
        assert mixed[request_id].error is None
        assert summary(mixed[request_id]) == summary(clean[request_id]), request_id
    failed = mixed["poison"]
    assert failed.finished and failed.error_code == "internal" and "sampling" in failed.error
    assert all(c.finish_reason == "error" for c in failed.outputs)
    assert engine.block_manager.num_free_device_blocks == 256  # every block free again
    assert not engine.groups and not engine.beams and not engine.failed
