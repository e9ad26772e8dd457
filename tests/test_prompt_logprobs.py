"""Prompt logprobs in the engine (SamplingParams.prompt_logprobs): transformers' log-softmax of
the prompt's logits, across chunked prefill, prefix-cache hits, preemption of either kind,
async scheduling, n samples and beams; computed once per prompt position, only for the
requests that ask; and the tokens such requests draw are those they draw without asking."""
import numpy as np
import pytest
import torch
from models import MIXED_WORKLOAD, make_llm

from pagedkv.runtime.engine import llm_engine
from pagedkv.runtime.engine.prompt_logprobs import PromptLogprobs, compute
from pagedkv.runtime.engine.sampling_params import SamplingParams

transformers = pytest.importorskip("transformers")
pytestmark = [pytest.mark.timeout(600), pytest.mark.usefixtures("one_torch_thread")]

PROMPTS = [list(range(5, 30)), [3, 4], [42] * 9, list(range(100, 140, 2)), [7]]
TOL = 2e-5  # float32 logits of two implementations of the same model


@pytest.fixture(scope="module")
def reference(model_path):
    """transformers' float32 logits of each prompt position."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    cache: dict[tuple, torch.Tensor] = {}

    def logits(prompt: list[int]) -> torch.Tensor:
        if tuple(prompt) not in cache:
            with torch.no_grad():
                cache[tuple(prompt)] = model(torch.tensor([prompt])).logits[0].float()
        return cache[tuple(prompt)]

    return logits


def check_against(reference, prompt: list[int], got, k: int) -> None:
    """Every position's prompt token logprob (transformers' log-softmax of its logits) and rank
    (how many tokens are at least as likely), and its top k."""
    assert got is not None and len(got) == len(prompt) and got[0] is None
    logits = reference(prompt)
    lp = torch.log_softmax(logits, dim=-1)
    for i in range(1, len(prompt)):
        entry, row, token = got[i], lp[i - 1], prompt[i]
        assert list(entry)[0] == token
        value, rank = entry[token]
        assert value == pytest.approx(row[token].item(), abs=TOL)
        assert rank == int((logits[i - 1] >= logits[i - 1, token]).sum())
        top = torch.topk(row, k)
        listed = list(entry.items())[1:] if token not in top.indices.tolist() else list(entry.items())
        assert len(entry) == k + (token not in top.indices.tolist())
        by_rank = sorted(listed, key=lambda item: item[1][1])
        assert [t for t, _ in by_rank] == top.indices.tolist()
        assert [r for _, (_, r) in by_rank] == list(range(1, k + 1))
        assert np.allclose([v for _, (v, _) in by_rank], top.values.tolist(), atol=TOL)


def _params(p: SamplingParams, **changes) -> SamplingParams:
    fields = {k: v for k, v in vars(p).items() if k not in ("stop_strings", "stop_token_set")}
    return SamplingParams(**{**fields, **changes})


def run(llm, prompts, params):
    return llm.generate(prompts, params, use_tqdm=False)


@pytest.mark.parametrize("budget", [4096, 7, 1])  # one chunk; chunks; a token a step (decode rows)
def test_prompt_logprobs_equal_transformers(loaded, reference, budget):
    llm = make_llm(loaded, max_num_batched_tokens=budget)
    params = [SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=k) for k in (0, 1, 5, 20, 3)]
    outs = run(llm, PROMPTS, params)
    for prompt, p, out in zip(PROMPTS, params, outs):
        check_against(reference, prompt, out.prompt_logprobs, p.prompt_logprobs)
    assert outs[4].prompt_logprobs == [None]  # a one-token prompt has nothing to report


def test_the_step_asks_for_the_prompt_rows_after_the_sampling_rows(loaded):
    from pagedkv.runtime.engine.inputs import host_inputs

    engine = make_llm(loaded, max_num_batched_tokens=30).engine
    for i, (prompt, k) in enumerate([(PROMPTS[3], 1), (PROMPTS[1], None), (PROMPTS[2], 0)]):
        engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=2, prompt_logprobs=k))
    out = engine.scheduler.schedule()
    inputs = host_inputs(out, engine.executor.block_size)
    asked = [(row.seq, *row.prompt_logits) for row in out.scheduled if row.prompt_logits]
    # r0's whole prompt (20 tokens, the last one samples), r1 none, r2 its first 8 tokens of 9.
    assert [(a, b) for _, a, b in asked] == [(0, 19), (0, 8)] and out.num_prompt_logits == 27
    tail = inputs.logits_indices[len(inputs.logits_indices) - out.num_prompt_logits:]
    assert inputs.positions[tail].tolist() == [p for _, a, b in asked for p in range(a, b)]
    assert inputs.token_ids[tail].tolist() == [t for seq, a, b in asked for t in seq.token_ids[a:b]]
    assert inputs.num_prompt_logits == 27 and len(inputs.logits_indices) == 27 + 2  # r0 and r1 sample


def test_only_requests_that_ask_compute_them(loaded, monkeypatch):
    rows = []
    original = llm_engine.compute_prompt_logprobs
    monkeypatch.setattr(llm_engine, "compute_prompt_logprobs",
                        lambda logits, targets, k: rows.append(len(targets)) or original(logits, targets, k))
    llm = make_llm(loaded, max_num_batched_tokens=16)
    asked = SamplingParams(max_tokens=4, temperature=0, prompt_logprobs=2)
    plain = SamplingParams(max_tokens=4, temperature=0)
    outs = run(llm, PROMPTS[:4], [asked, plain, asked, plain])
    assert outs[1].prompt_logprobs is None and outs[3].prompt_logprobs is None
    assert sum(rows) == (len(PROMPTS[0]) - 1) + (len(PROMPTS[2]) - 1)  # each position once
    rows.clear()
    run(llm, PROMPTS[:4], plain)
    assert rows == []


def test_asking_changes_no_token_and_no_logprob(loaded):
    """The sampling rows' logits come from a product of their own: the same bits."""
    prompts = [PROMPTS[0], PROMPTS[3], PROMPTS[2], PROMPTS[0], PROMPTS[3]]
    plain = make_llm(loaded, max_num_batched_tokens=11, enable_prefix_caching=False)
    asked = make_llm(loaded, max_num_batched_tokens=11, enable_prefix_caching=False)
    with_plp = [_params(p, prompt_logprobs=2) for p in MIXED_WORKLOAD]
    for a, b in zip(run(plain, prompts, MIXED_WORKLOAD), run(asked, prompts, with_plp)):
        assert [(c.token_ids, c.cumulative_logprob) for c in a.outputs] == \
               [(c.token_ids, c.cumulative_logprob) for c in b.outputs]
        assert a.prompt_logprobs is None and b.prompt_logprobs is not None


def test_n_samples_and_beams_report_them_once(loaded, reference):
    llm = make_llm(loaded)
    params = [SamplingParams(max_tokens=5, n=3, temperature=0.9, seed=1, prompt_logprobs=2),
              SamplingParams(max_tokens=5, beam_width=3, n=2, prompt_logprobs=2)]
    for out in run(llm, [PROMPTS[0], PROMPTS[3]], params):
        check_against(reference, out.prompt_token_ids, out.prompt_logprobs, 2)
        assert len(out.outputs) in (2, 3)


def test_prefix_cache_hits_are_computed_again(loaded, reference):
    """A cached position has no logits: a request that asks reads nothing from the cache (its
    blocks, computed, are cached as usual), and one that does not still hits."""
    llm = make_llm(loaded)
    engine = llm.engine
    run(llm, [PROMPTS[0]], SamplingParams(max_tokens=2, temperature=0))
    before = engine.stats()["prefix_cache"]
    out = run(llm, [PROMPTS[0]], SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=4))[0]
    check_against(reference, PROMPTS[0], out.prompt_logprobs, 4)
    after = engine.stats()["prefix_cache"]
    assert after["hit_tokens"] == before["hit_tokens"] and after["queried_tokens"] == before["queried_tokens"]
    run(llm, [PROMPTS[0]], SamplingParams(max_tokens=2, temperature=0))
    assert engine.stats()["prefix_cache"]["hit_tokens"] > after["hit_tokens"]


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_preemption_computes_each_position_once(loaded, reference, monkeypatch, mode, async_scheduling):
    rows = []
    original = llm_engine.compute_prompt_logprobs
    monkeypatch.setattr(llm_engine, "compute_prompt_logprobs",
                        lambda logits, targets, k: rows.append(len(targets)) or original(logits, targets, k))
    # A pool that holds about two of these at a time: they preempt each other, mid-prefill too.
    llm = make_llm(loaded, num_device_blocks=24, max_num_batched_tokens=9, preemption_mode=mode,
                   async_scheduling=async_scheduling)
    prompts = [PROMPTS[0], PROMPTS[3], PROMPTS[0][3:], PROMPTS[3][1:], PROMPTS[0][::-1], PROMPTS[2]]
    params = [_params(p, max_tokens=16, prompt_logprobs=3, ignore_eos=True)
              for p in (MIXED_WORKLOAD * 2)[:len(prompts)]]
    outs = run(llm, prompts, params)
    assert llm.engine.stats()["preemptions"][mode] > 0
    for prompt, out in zip(prompts, outs):
        check_against(reference, prompt, out.prompt_logprobs, 3)
    assert sum(rows) == sum(len(p) - 1 for p in prompts)
    alone = make_llm(loaded, enable_prefix_caching=False)
    for prompt, p, out in zip(prompts, params, outs):
        ref = run(alone, [prompt], p)[0]
        assert [c.token_ids for c in ref.outputs] == [c.token_ids for c in out.outputs]
    assert not llm.engine.prompt_logprobs  # forgotten with their requests


def test_streamed_outputs_carry_them_once_the_prompt_is_done(loaded):
    engine = make_llm(loaded, max_num_batched_tokens=6).engine
    engine.add_request("r", PROMPTS[0], SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=1))
    seen = []
    while engine.has_unfinished():
        for out in engine.step():
            seen.append(out.prompt_logprobs is not None)
    assert seen and all(seen)  # the first output comes with the first token, after the prompt


def test_aborted_requests_forget_them(loaded):
    engine = make_llm(loaded, max_num_batched_tokens=6).engine
    engine.add_request("r", PROMPTS[0], SamplingParams(max_tokens=3, prompt_logprobs=1))
    engine.step()
    assert engine.abort("r").prompt_logprobs is None  # incomplete: not reported
    assert not engine.prompt_logprobs and not engine.has_unfinished()


@pytest.mark.parametrize("value", [-1, 21, True, 1.5, "2"])
def test_prompt_logprobs_are_bounded_like_logprobs(value):
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=value)


def test_compute_ranks_ties_as_vllm():
    logits = torch.tensor([[1.0, 3.0, 2.5, 0.0], [0.0, 0.0, 1.0, 0.0]])
    values = compute(logits, np.array([2, 3]), 2)
    assert values[:, 1].tolist() == [2, 4]  # tokens at least as likely: the target and its ties too
    state = PromptLogprobs([9, 2, 3], 1)
    state.put(0, values, 2)
    assert state.done
    result = state.result()
    assert result[0] is None and list(result[1]) == [2, 1] and result[1][1][1] == 1
    assert result[2] == {3: (pytest.approx(values[1, 0]), 4), 2: (pytest.approx(values[1, 4]), 1)}
