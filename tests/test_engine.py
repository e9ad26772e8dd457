"""The serving engine: continuous batching, FCFS preemption that outputs never show,
sharing, beam search against transformers, and errors."""
import pytest
import torch
from models import MIXED_WORKLOAD, make_llm

from pagedkv.runtime.engine.sampling_params import SamplingParams
from pagedkv.runtime.models.loader import load_model

transformers = pytest.importorskip("transformers")

MODEL = dict(num_layers=2, num_heads=4, num_kv_heads=2)
PROMPTS = [list(range(5, 12)), [3, 4], list(range(20, 41)), [7, 8, 9, 10, 11, 12, 13, 14, 15], [42] * 5]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    from models import make_tiny_llama

    return make_tiny_llama(str(tmp_path_factory.mktemp("engine")), **MODEL)


@pytest.fixture(scope="module")
def loaded(model_path):
    return load_model(model_path)


def tokens(results):
    return [[c.token_ids for c in r.outputs] for r in results]


# -- continuous batching -------------------------------------------------------------------------
def test_short_request_behind_long_ones_finishes_first(loaded):
    engine = make_llm(loaded).engine
    for i in range(2):
        engine.add_request(f"long{i}", PROMPTS[2], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
    engine.add_request("short", PROMPTS[1], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    finished_at = {}
    step = 0
    while engine.has_unfinished():
        step += 1
        for out in engine.step():
            if out.finished:
                finished_at[out.request_id] = step
    assert finished_at["short"] < finished_at["long0"] and finished_at["short"] < finished_at["long1"]
    # One token per step from the prefill on, and no idle step after the last one.
    assert step == finished_at["long0"] == 30
    assert engine.stats()["queues"] == {"waiting": 0, "running": 0, "swapped": 0}


def test_finished_blocks_are_reused_at_once_and_no_padding(loaded):
    # Room for one request at a time: the second is admitted the iteration after the first ends.
    engine = make_llm(loaded, num_device_blocks=6, watermark=0.0).engine
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    engine.add_request("a", list(range(5, 20)), params)
    engine.add_request("b", list(range(30, 45)), params)
    sched = engine.scheduler
    group_a = engine.groups["a"]
    a_done_step, b_start_step, step = None, None, 0
    while engine.has_unfinished():
        step += 1
        out = sched.schedule()
        # No padding: the batch holds exactly the scheduled tokens.
        batch = engine.executor.prepare(out) if not out.is_empty else None
        expected = sum(r.end - r.start for r in out.scheduled)
        assert out.num_batched_tokens == expected
        if batch is not None:
            assert batch.token_ids.shape[0] == expected
        if any(r.group.request_id == "b" for r in out.scheduled) and b_start_step is None:
            b_start_step = step
        logits = engine.executor.execute(out)
        engine.process(out, logits)
        if group_a.is_finished and a_done_step is None:
            a_done_step = step
    assert b_start_step == a_done_step + 1
    assert engine.block_manager.num_free_device_blocks == 6


# -- exactness against transformers ---------------------------------------------------------------
def test_greedy_batch_equals_transformers(loaded, model_path):
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_path).eval()
    results = make_llm(loaded, max_num_batched_tokens=16).generate(
        PROMPTS, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True), use_tqdm=False)
    for prompt, result in zip(PROMPTS, results):
        ref = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=10, min_new_tokens=10,
                          pad_token_id=0)
        assert result.outputs[0].token_ids == ref[0, len(prompt):].tolist()


def hf_beams(hf, prompt, width, max_tokens, length_penalty, early_stopping):
    out = hf.generate(torch.tensor([prompt]), do_sample=False, num_beams=width, num_return_sequences=width,
                      max_new_tokens=max_tokens, length_penalty=length_penalty,
                      early_stopping=early_stopping, pad_token_id=-1)
    return [[t for t in row[len(prompt):].tolist() if t != -1] for row in out]


@pytest.mark.parametrize("width,length_penalty,early_stopping",
                         [(2, 1.0, False), (3, 0.0, True), (4, 2.0, "never"), (5, 1.0, True), (6, -1.0, False)])
def test_beam_search_equals_transformers(loaded, model_path, width, length_penalty, early_stopping):
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_path).eval()
    params = SamplingParams(max_tokens=7, beam_width=width, n=width, length_penalty=length_penalty,
                            early_stopping=early_stopping)
    results = make_llm(loaded).generate(PROMPTS[:3], params, use_tqdm=False)
    for prompt, result in zip(PROMPTS[:3], results):
        assert [c.token_ids for c in result.outputs] == hf_beams(hf, prompt, width, 7, length_penalty,
                                                                 early_stopping)


# -- preemption is invisible -------------------------------------------------------------------
WORKLOAD = MIXED_WORKLOAD


@pytest.mark.parametrize("mode", ["swap", "recompute", "auto"])
def test_preemption_is_invisible(loaded, mode):
    reference = make_llm(loaded).generate(PROMPTS, WORKLOAD, use_tqdm=False)
    llm = make_llm(loaded, num_device_blocks=24, preemption_mode=mode, max_num_batched_tokens=12)
    results = llm.generate(PROMPTS, WORKLOAD, use_tqdm=False)
    stats = llm.engine.stats()
    assert stats["preemptions"]["swap"] + stats["preemptions"]["recompute"] >= 3
    if mode != "auto":
        assert stats["preemptions"][{"swap": "recompute", "recompute": "swap"}[mode]] == 0
    assert tokens(results) == tokens(reference)
    bm = llm.engine.block_manager
    assert bm.num_free_device_blocks == bm.num_device_blocks and bm.num_free_cpu_blocks == bm.num_cpu_blocks


def test_fcfs_preempts_latest_and_swapped_come_back_before_waiting(loaded):
    engine = make_llm(loaded, num_device_blocks=20, preemption_mode="swap").engine
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(str(i), prompt, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
                           arrival_time=float(i))
    sched = engine.scheduler
    preempted_any = False
    while engine.has_unfinished():
        swapped_before = list(sched.swapped)
        waiting_before = {g.request_id for g in sched.waiting}
        out = sched.schedule()
        for victim, _ in out.preempted:
            preempted_any = True
            # Every group still running arrived before the victim.
            assert all(g.arrival_time < victim.arrival_time for g in sched.running)
        admitted = {r.group.request_id for r in out.scheduled} & waiting_before
        if admitted:
            assert not sched.swapped, "waiting groups admitted while others are still swapped out"
            assert not swapped_before or out.blocks_to_swap_in
        logits = engine.executor.execute(out)
        engine.process(out, logits)
    assert preempted_any


# -- sharing -------------------------------------------------------------------------------------
@pytest.mark.parametrize("params", [SamplingParams(max_tokens=4, n=4, temperature=1.0, seed=1, ignore_eos=True),
                                    SamplingParams(max_tokens=4, beam_width=4, n=4)])
def test_prompt_is_stored_once(loaded, params):
    engine = make_llm(loaded, block_size=4).engine
    prompt = list(range(10, 42))  # 8 full blocks
    engine.add_request("r", prompt, params)
    engine.step()  # prefill, then 4 sequences
    engine.step()  # first decode: each sequence got its own last block
    stats = engine.block_manager.stats()
    assert len(engine.groups["r"].unfinished_seqs()) == 4
    # The prompt once, plus at most one block each (beams may share a parent's last block).
    assert 8 + 1 <= stats.device_blocks_used <= 8 + 4
    assert stats.logical_blocks == 4 * 9
    assert stats.sharing_saved_blocks == 36 - stats.device_blocks_used >= 3 * 8
    assert engine.stats()["sharing_saved"] == pytest.approx(stats.sharing_saved_blocks / 36)


# -- errors --------------------------------------------------------------------------------------
def test_errors(loaded):
    engine = make_llm(loaded, num_device_blocks=8, watermark=0.0).engine
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="can never fit"):
        engine.add_request("long", list(range(40)), SamplingParams())     # 10 blocks > 8
    with pytest.raises(ValueError, match="can never fit"):
        engine.add_request("wide", list(range(24)), SamplingParams(n=4))  # 6 + 4 blocks
    with pytest.raises(ValueError, match="can never fit"):
        engine.add_request("beam", list(range(24)), SamplingParams(beam_width=6))
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("empty", [], SamplingParams())
    with pytest.raises(ValueError, match="token ids"):
        engine.add_request("vocab", [1, 10**6], SamplingParams())
    engine.add_request("ok", [1, 2, 3], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("ok", [1, 2, 3], SamplingParams())
    while engine.has_unfinished():
        engine.step()
    assert engine.block_manager.num_free_device_blocks == 8


def test_abort_frees_blocks_at_once(loaded):
    engine = make_llm(loaded, num_device_blocks=32).engine
    engine.add_request("a", PROMPTS[2], SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    assert engine.block_manager.num_free_device_blocks < 32
    out = engine.abort("a")
    assert out.finished and out.outputs[0].finish_reason == "aborted"
    assert engine.block_manager.num_free_device_blocks == 32 and not engine.has_unfinished()
