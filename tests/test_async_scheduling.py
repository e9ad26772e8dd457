"""Async scheduling: the next step is scheduled and the last one finished on a second thread
while a step computes. The outputs, the memory accounting and fault isolation are those of
the engine without it; only the step that returns a request's tokens moves (one later)."""
import argparse
import threading

import pytest
import torch
from models import MIXED_WORKLOAD, make_llm

from pagedkv.kvcache.block_hash import full_blocks
from pagedkv.kvcache.block_manager import BlockManager
from pagedkv.kvcache.sequence import PENDING_TOKEN, Sequence, SequenceGroup
from pagedkv.runtime.engine.config import EngineConfig
from pagedkv.runtime.engine.sampling_params import SamplingParams
from pagedkv.runtime.models.loader import load_model

PROMPTS = [list(range(5, 12)), [3, 4], list(range(20, 41)), [7, 8, 9, 10, 11, 12, 13, 14, 15], [42] * 5,
           list(range(5, 12)) + [60, 61], [9] * 13]
# No beam search: every step but those where n samples fork runs with the host's work beside it.
PLAIN = [SamplingParams(max_tokens=14, temperature=0, ignore_eos=True),
         SamplingParams(max_tokens=12, n=3, temperature=0.9, seed=7, ignore_eos=True),
         SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=11, logprobs=3, ignore_eos=True),
         SamplingParams(max_tokens=9, temperature=0.7, top_k=20, seed=5, ignore_eos=True),
         SamplingParams(max_tokens=30, temperature=0),
         SamplingParams(max_tokens=16, temperature=0, logprobs=2, ignore_eos=True),
         SamplingParams(max_tokens=20, temperature=1.1, min_p=0.05, seed=3)]


@pytest.fixture(scope="module")
def loaded(tiny_model, one_torch_thread):
    return load_model(tiny_model(num_layers=2, num_heads=4, num_kv_heads=2))


def results(outputs):
    return [[(c.token_ids, c.finish_reason, c.cumulative_logprob, c.logprobs) for c in r.outputs] for r in outputs]


def approx(outputs):
    """`results` with logprobs to float32's rounding: a row computed for a sequence that stopped
    meanwhile changes the batch's shape, and with it the matrix products' blocking in the last bits."""
    def close(x):
        return pytest.approx(x, rel=1e-5, abs=1e-5)
    return [[(tokens, reason, close(logprob), [close(d) for d in top or []] or top)
             for tokens, reason, logprob, top in r] for r in results(outputs)]


def assert_all_free(engine):
    bm = engine.block_manager
    assert bm.num_free_device_blocks == bm.num_device_blocks and bm.num_free_cpu_blocks == bm.num_cpu_blocks
    assert not engine.groups and not engine.beams and not engine.scheduler.has_unfinished()
    # A step scheduled ahead may be left: rows of sequences that stopped since, run by the next call.
    assert engine.prepared is None or all(r.seq.is_finished for r in engine.prepared.out.scheduled)
    assert engine.drawn is None


CONFIGS = {
    "plenty": {},
    "swap": dict(num_device_blocks=24, preemption_mode="swap", max_num_batched_tokens=12),
    "recompute": dict(num_device_blocks=24, preemption_mode="recompute", max_num_batched_tokens=12),
    "chunked prefill": dict(max_num_batched_tokens=5),
    "no prefix cache": dict(enable_prefix_caching=False, num_device_blocks=40),
}


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("workload", ["plain", "with beams"])
def test_outputs_equal_those_of_the_synchronous_engine(loaded, config, workload):
    params = PLAIN if workload == "plain" else MIXED_WORKLOAD + PLAIN[len(MIXED_WORKLOAD):]
    kwargs = CONFIGS[config]
    reference = make_llm(loaded, **kwargs)
    expected = reference.generate(PROMPTS, params, use_tqdm=False)
    llm = make_llm(loaded, async_scheduling=True, **kwargs)
    got = llm.generate(PROMPTS, params, use_tqdm=False)
    assert results(got) == approx(expected)
    assert_all_free(llm.engine)
    stats, ref_stats = llm.engine.stats(), reference.engine.stats()
    assert stats["generated_tokens"] == ref_stats["generated_tokens"]
    if config in ("swap", "recompute"):
        assert stats["preemptions"][config] >= 3


def test_the_host_work_runs_beside_the_forward(loaded, monkeypatch):
    llm = make_llm(loaded, async_scheduling=True, profile_steps=True)
    engine = llm.engine
    threads, forwards = [], []
    schedule, execute = engine.scheduler.schedule, engine.executor.execute
    monkeypatch.setattr(engine.scheduler, "schedule",
                        lambda: threads.append(threading.current_thread().name) or schedule())
    monkeypatch.setattr(engine.executor, "execute",
                        lambda *a, **k: forwards.append(threading.current_thread().name) or execute(*a, **k))
    llm.generate(PROMPTS, PLAIN, use_tqdm=False)
    on_host = sum(name.startswith("pagedkv-host") for name in threads)
    # Only the first step, and the one after the step where n samples fork, are scheduled here.
    assert on_host >= len(threads) - 2 and on_host > 10
    assert all(name == threading.current_thread().name for name in forwards)
    summary = engine.stats()["step_profile_ms"]
    assert summary["decode"]["overlapped"] > 0
    assert "overlapped" in engine.profile.report()


def test_stops_inside_a_step_in_flight_finish_as_without_it(loaded):
    """A sequence that stops on a token (EOS, a stop token) has computed one row of the next
    step for nothing; its output and its blocks are as without async scheduling."""
    free_run = make_llm(loaded).generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
                                         use_tqdm=False)
    # Each prompt stops at the token it greedily emits 5th: mid-way, not by length.
    params = [SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[r.outputs[0].token_ids[4]])
              for r in free_run]
    expected = make_llm(loaded).generate(PROMPTS, params, use_tqdm=False)
    llm = make_llm(loaded, async_scheduling=True)
    got = llm.generate(PROMPTS, params, use_tqdm=False)
    assert results(got) == approx(expected)
    assert all(c.finish_reason == "stop" and len(c.token_ids) <= 5 for r in got for c in r.outputs)
    assert_all_free(llm.engine)


def test_stop_strings_and_streaming(loaded):
    params = SamplingParams(max_tokens=24, temperature=0.8, seed=2, stop=["e"])
    expected = make_llm(loaded).generate(PROMPTS, params, use_tqdm=False)
    engine = make_llm(loaded, async_scheduling=True).engine
    streamed: dict[str, list[int]] = {}
    final = {}
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(str(i), prompt, params, stream=True)
    while engine.has_unfinished():
        for output in engine.step():
            streamed[output.request_id] = streamed.get(output.request_id, []) + output.outputs[0].new_token_ids
            if output.finished:
                final[output.request_id] = output
    for i, reference in enumerate(expected):
        assert results([final[str(i)]]) == approx([reference])
        assert final[str(i)].outputs[0].text == reference.outputs[0].text
        assert streamed[str(i)] == reference.outputs[0].token_ids
    assert_all_free(engine)


def test_abort_with_a_token_in_flight(loaded):
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    expected = make_llm(loaded).generate(PROMPTS[:3], params, use_tqdm=False)
    engine = make_llm(loaded, async_scheduling=True).engine
    for i, prompt in enumerate(PROMPTS[:4]):
        engine.add_request(str(i), prompt, params, stream=False)
    finished = {}
    for _ in range(6):
        finished.update({o.request_id: o for o in engine.step() if o.finished})
    assert engine.drawn is not None and any(s.has_pending_token for s in engine.groups["3"].seqs)
    aborted = engine.abort("3")
    assert aborted.finished and PENDING_TOKEN not in aborted.outputs[0].token_ids
    assert aborted.outputs[0].token_ids == make_llm(loaded).generate(
        [PROMPTS[3]], params, use_tqdm=False)[0].outputs[0].token_ids[:len(aborted.outputs[0].token_ids)]
    while engine.has_unfinished():
        finished.update({o.request_id: o for o in engine.step() if o.finished})
    assert set(finished) == {"0", "1", "2"}
    assert [results([finished[str(i)]]) for i in range(3)] == [approx([r]) for r in expected]
    assert_all_free(engine)


def test_an_abort_before_the_step_that_forks_its_samples(loaded):
    """A request whose prompt completes in the step scheduled ahead, where its n samples would
    fork, aborted before that step runs: the step forks nothing for it (its blocks are gone),
    and the other request finishes as alone."""
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    samples = SamplingParams(max_tokens=6, n=3, temperature=0.9, seed=1, ignore_eos=True)
    expected = make_llm(loaded).generate([PROMPTS[0]], greedy, use_tqdm=False)
    engine = make_llm(loaded, async_scheduling=True).engine
    engine.add_request("a", PROMPTS[0], greedy, stream=False)
    engine.step(), engine.step()
    engine.add_request("b", PROMPTS[2], samples, stream=False)
    engine.step()
    assert any(row.group.request_id == "b" and row.sample for row in engine.prepared.out.scheduled)
    assert engine.abort("b").finished
    finished = {}
    while engine.has_unfinished():
        finished.update({o.request_id: o for o in engine.step() if o.finished})
    assert set(finished) == {"a"} and results([finished["a"]]) == approx(expected)
    assert_all_free(engine)


def test_a_failing_draw_ends_its_request_alone(loaded, monkeypatch):
    params = [SamplingParams(max_tokens=15, temperature=0, ignore_eos=True) for _ in PROMPTS]
    expected = make_llm(loaded).generate(PROMPTS, params, use_tqdm=False)
    engine = make_llm(loaded, async_scheduling=True).engine
    for i, (prompt, p) in enumerate(zip(PROMPTS, params)):
        engine.add_request(str(i), prompt, p, stream=False)
    finished, steps = {}, 0
    while engine.has_unfinished():
        if steps == 4:  # request 2's draws fail from now on: nan logits would not fail, this does
            monkeypatch.setattr(engine.groups["2"].sampling_params, "temperature", float("nan"))
        finished.update({o.request_id: o for o in engine.step() if o.finished})
        steps += 1
    failed = finished.pop("2")
    assert failed.error_code == "internal" and "sampling" in failed.error
    assert all(c.finish_reason == "error" and PENDING_TOKEN not in c.token_ids for c in failed.outputs)
    assert {k: results([v]) for k, v in finished.items()} == {
        str(i): approx([r]) for i, r in enumerate(expected) if i != 2}
    assert_all_free(engine)
    assert not engine.failed


def test_a_failing_last_draw_ends_its_request_with_an_error(loaded, monkeypatch):
    """max_tokens=1: the sequence is freed before its only token is drawn (the token ends it);
    the draw fails, and the request ends with an error, not by length."""
    engine = make_llm(loaded, async_scheduling=True).engine
    engine.add_request("bad", PROMPTS[0], SamplingParams(max_tokens=1, temperature=0.5, seed=1))
    engine.add_request("good", PROMPTS[1], SamplingParams(max_tokens=1, temperature=0))
    monkeypatch.setattr(engine.groups["bad"].sampling_params, "temperature", float("nan"))
    finished = {}
    while engine.has_unfinished():
        finished.update({o.request_id: o for o in engine.step() if o.finished})
    assert [c.finish_reason for c in finished["bad"].outputs] == ["error"]
    assert finished["bad"].outputs[0].token_ids == [] and finished["bad"].error_code == "internal"
    assert [c.finish_reason for c in finished["good"].outputs] == ["length"]
    assert_all_free(engine)


def test_a_sequence_that_its_pending_token_ends_is_not_scheduled_again(loaded, monkeypatch):
    """Requests that end by length compute no row more than without async scheduling."""
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (1, 2, 5, 9, 3, 7, 4)]
    rows = {}
    for async_scheduling in (False, True):
        llm = make_llm(loaded, async_scheduling=async_scheduling)
        schedule, counted = llm.engine.scheduler.schedule, []

        def counting(schedule=schedule, counted=counted):
            out = schedule()
            counted.append(sum(r.end - r.start for r in out.scheduled))
            return out

        monkeypatch.setattr(llm.engine.scheduler, "schedule", counting)
        llm.generate(PROMPTS, params, use_tqdm=False)
        rows[async_scheduling] = sum(counted)
        assert_all_free(llm.engine)
    assert rows[True] == rows[False]


def test_a_stop_on_a_block_boundary_then_a_turn_that_reuses_it(loaded):
    """The row of a step scheduled ahead writes the stop token's K/V, and the prefix cache holds
    its block: that step runs even when nothing else is left, so the next turn reads it."""
    prompt = list(range(30, 39))  # 9 tokens: the 3rd output token fills the 3rd block of 4
    free_run = make_llm(loaded).generate([prompt], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
                                         use_tqdm=False)[0].outputs[0].token_ids
    stop = SamplingParams(max_tokens=8, temperature=0, stop_token_ids=[free_run[2]])
    turn = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=1)
    outputs = {}
    for async_scheduling in (False, True):
        llm = make_llm(loaded, async_scheduling=async_scheduling)
        first = llm.generate([prompt], stop, use_tqdm=False)[0].outputs[0].token_ids
        assert first == free_run[:3]
        second = llm.generate([prompt + first + [7, 8]], turn, use_tqdm=False)
        outputs[async_scheduling] = second
        # The first turn's 12 tokens: without async scheduling the stop token's K/V is never computed.
        assert llm.engine.stats()["prefix_cache"]["hit_tokens"] == (12 if async_scheduling else 8)
        assert_all_free(llm.engine)
    assert results(outputs[True]) == approx(outputs[False])


def test_requests_that_stop_while_preempted(loaded, monkeypatch):
    """Frequent stop tokens in a cache that preempts every few steps: a sequence preempted while
    its token was in flight can stop on that token, and leaves the queue it waits in."""
    frequent = list(range(0, 512, 3))
    params = [SamplingParams(max_tokens=24, temperature=0.9, seed=i, stop_token_ids=frequent) for i in range(24)]
    prompts = [[(7 * i + j) % 500 + 3 for j in range(5 + i % 12)] for i in range(24)]
    for mode in ("recompute", "swap"):
        kwargs = dict(num_device_blocks=12, preemption_mode=mode, max_num_batched_tokens=16)
        expected = make_llm(loaded, **kwargs).generate(prompts, params, use_tqdm=False)
        llm = make_llm(loaded, async_scheduling=True, **kwargs)
        scheduler, stopped_while_preempted = llm.engine.scheduler, []
        free_finished = scheduler.free_finished

        def counting(preempted_too=False, free_finished=free_finished, scheduler=scheduler,
                     stopped=stopped_while_preempted):
            stopped += [g for g in scheduler.waiting + scheduler.swapped if g.is_finished]
            free_finished(preempted_too)

        monkeypatch.setattr(scheduler, "free_finished", counting)
        assert results(llm.generate(prompts, params, use_tqdm=False)) == approx(expected)
        assert llm.engine.stats()["preemptions"][mode] >= 3 and stopped_while_preempted
        assert_all_free(llm.engine)


def test_a_pending_token_is_never_hashed():
    bm = BlockManager(block_size=4, num_device_blocks=16, num_cpu_blocks=0)
    seq = Sequence.from_prompt(list(range(7)))
    bm.allocate(SequenceGroup("r", [seq]))
    seq.num_computed_tokens = 7
    seq.reserve_token()  # the 8th token fills the second block: its id is not known yet
    bm.append_slots(seq)
    seq.num_computed_tokens = 8
    bm.cache_computed(seq)
    assert len(seq.block_hashes) == 1
    with pytest.raises(ValueError, match="not sampled yet"):
        list(full_blocks(seq, 0, 2, 4))
    seq.append(99, -0.5)
    assert seq.token_ids[-1] == 99 and len(seq) == 8 and seq.cumulative_logprob == -0.5
    bm.cache_computed(seq)
    assert len(seq.block_hashes) == 2
    bm.free(seq)
    assert bm.num_free_device_blocks == 16


@pytest.mark.timeout(300)
def test_a_server_with_async_scheduling(tiny_model, tmp_path):
    """`pagedkv serve --async-scheduling`: greedy and seeded replies equal the offline API's, a
    stream adds up, an abort mid-stream frees its blocks."""
    from server_process import running_server

    from pagedkv.runtime.engine.llm import LLM
    from pagedkv.runtime.serving.client import Client, ServerError

    path = tiny_model()
    offline = LLM(model=path, num_device_blocks=512, block_size=4)
    with running_server(path, "--num-device-blocks", "128", "--block-size", "4", "--async-scheduling",
                        log_path=str(tmp_path / "server.log")) as server, Client(server.address, timeout=60) as client:
        for params in (dict(max_tokens=12, temperature=0.0), dict(max_tokens=10, temperature=0.8, seed=3, n=3)):
            final = client.generate(prompt_ids=PROMPTS[2], **params)
            expected = offline.generate([PROMPTS[2]], SamplingParams(**params), use_tqdm=False)[0]
            assert [(o["token_ids"], o["finish_reason"]) for o in final["outputs"]] == [
                (c.token_ids, c.finish_reason) for c in expected.outputs]
        replies = list(client.stream(prompt_ids=PROMPTS[0], max_tokens=20, temperature=0.0, ignore_eos=True))
        streamed = [t for r in replies[:-1] for t in r["outputs"][0]["token_ids"]]
        assert replies[-1]["type"] == "final" and streamed == replies[-1]["outputs"][0]["token_ids"]
        stream = client.stream(prompt_ids=PROMPTS[3], max_tokens=400, temperature=0.0, ignore_eos=True)
        first = next(stream)
        client.abort(first["id"])
        with pytest.raises(ServerError) as error:
            for reply in stream:
                assert reply["type"] == "token"
        assert error.value.code == "aborted"
        blocks = client.stats()["blocks"]
        assert blocks["device"]["used"] == 0 and blocks["cpu"]["used"] == 0


def test_a_cpu_whose_cores_all_compute_gets_a_warning(loaded, caplog, monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0})
    with caplog.at_level("WARNING", logger="pagedkv.engine"):
        make_llm(loaded, async_scheduling=True)
    assert "host thread takes one from them" in caplog.text
    caplog.clear()
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3})  # the tests run one torch thread
    with caplog.at_level("WARNING", logger="pagedkv.engine"):
        make_llm(loaded, async_scheduling=True)
    assert "host thread" not in caplog.text


def test_the_command_line_flag():
    parser = argparse.ArgumentParser()
    EngineConfig.add_arguments(parser)
    assert EngineConfig.from_args(parser.parse_args(["--async-scheduling"])).async_scheduling
    assert not EngineConfig.from_args(parser.parse_args([])).async_scheduling


def test_async_scheduling_is_refused_with_tensor_parallelism():
    with pytest.raises(ValueError, match="async_scheduling.*tensor_parallel_size 2"):
        EngineConfig(async_scheduling=True, tensor_parallel_size=2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_outputs_equal_those_of_the_synchronous_engine_on_cuda(loaded):
    kwargs = dict(device="cuda", dtype="float32", num_device_blocks=24, preemption_mode="swap",
                  max_num_batched_tokens=12)
    expected = make_llm(loaded, **kwargs).generate(PROMPTS, PLAIN, use_tqdm=False)
    llm = make_llm(loaded, async_scheduling=True, **kwargs)
    assert results(llm.generate(PROMPTS, PLAIN, use_tqdm=False)) == approx(expected)
    assert_all_free(llm.engine)
