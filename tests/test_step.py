"""One engine step's machinery: inputs built with numpy against a per-token reference, outputs
only for requests that stream or finish, the step profile, and CUDA graphs for decode (GPU:
the same outputs with and without them)."""
import pytest
import torch
from models import make_llm

from pagedkv.runtime.engine.cuda_graphs import batch_buckets
from pagedkv.runtime.engine.inputs import host_inputs
from pagedkv.runtime.engine.profile import PHASES
from pagedkv.runtime.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = [list(range(5, 12)), [3, 4], list(range(20, 61)), [7, 8, 9, 10, 11, 12, 13, 14, 15], [42] * 5]
MIX = [SamplingParams(max_tokens=14, temperature=0, ignore_eos=True),
       SamplingParams(max_tokens=8, beam_width=3, n=3),
       SamplingParams(max_tokens=12, n=3, temperature=0.9, seed=7, ignore_eos=True),
       SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, top_k=20, seed=11, ignore_eos=True, logprobs=3),
       SamplingParams(max_tokens=9, temperature=0.7, min_p=0.1, seed=3, ignore_eos=True)]


def reference_inputs(out, block_size):
    """Per token, the obvious way."""
    tokens, positions, slots, indices = [], [], [], []
    for row in out.scheduled:
        for p in range(row.start, row.end):
            tokens.append(row.seq.token_ids[p])
            positions.append(p)
            slots.append(row.block_table[p // block_size] * block_size + p % block_size)
        if row.sample:
            indices.append(len(tokens) - 1)

    def table(rows):
        cut = [row.block_table[: -(-row.end // block_size)] for row in rows]
        width = max((len(t) for t in cut), default=0)
        return [t + [0] * (width - len(t)) for t in cut]

    starts = [0]
    for row in out.prefills:
        starts.append(starts[-1] + row.end - row.start)
    return dict(token_ids=tokens, positions=positions, slot_mapping=slots, logits_indices=indices,
                prefill_block_tables=table(out.prefills), decode_block_tables=table(out.decodes),
                prefill_query_start_loc=starts, prefill_context_lens=[r.end for r in out.prefills],
                decode_context_lens=[r.end for r in out.decodes])


def test_host_inputs_equal_per_token_reference(loaded):
    # Chunked prefills, decodes, parallel samples, beams and preemption by both modes.
    llm = make_llm(loaded, num_device_blocks=24, max_num_batched_tokens=12)
    engine = llm.engine
    for i, (prompt, params) in enumerate(zip(PROMPTS, MIX)):
        engine.add_request(str(i), prompt, params)
    kinds = set()
    while engine.has_unfinished():
        out = engine.scheduler.schedule()
        if not out.is_empty:
            got = host_inputs(out, engine.block_manager.block_size)
            expected = reference_inputs(out, engine.block_manager.block_size)
            for name, values in expected.items():
                array = getattr(got, name)
                assert array.tolist() == values, name
                assert array.dtype.name == ("int32" if "block" in name or "lens" in name or "loc" in name
                                            else "int64"), name
            assert got.num_prefill_tokens == sum(r.end - r.start for r in out.prefills)
            kinds.add((bool(out.prefills), bool(out.decodes)))
        engine.process(out, engine.executor.execute(out))
    assert kinds == {(True, False), (False, True), (True, True)}
    assert engine.stats()["preemptions"]["swap"] + engine.stats()["preemptions"]["recompute"] > 0


def test_outputs_only_for_requests_that_stream_or_finish(loaded):
    engine = make_llm(loaded).engine
    engine.add_request("quiet", PROMPTS[0], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True),
                       stream=False)
    engine.add_request("loud", PROMPTS[1], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    seen = {"quiet": [], "loud": []}
    while engine.has_unfinished():
        for output in engine.step():
            seen[output.request_id].append((output.finished, list(output.outputs[0].new_token_ids)))
    assert [f for f, _ in seen["quiet"]] == [True]
    assert [f for f, _ in seen["loud"]] == [False] * 4 + [True]
    assert all(len(new) == 1 for _, new in seen["loud"])
    assert not engine.streaming


def test_step_profile(loaded, capsys):
    llm = make_llm(loaded, profile_steps=True)
    llm.generate(PROMPTS, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True), use_tqdm=False)
    summary = llm.engine.stats()["step_profile_ms"]
    assert set(summary) == {"prefill", "decode"}
    assert summary["prefill"]["steps"] == 1 and summary["decode"]["steps"] == 5
    for row in summary.values():
        assert all(row[p] >= 0 for p in PHASES) and row["forward"] > 0
        assert row["total"] == pytest.approx(sum(row[p] for p in PHASES))
    report = capsys.readouterr().err
    assert all(p in report for p in PHASES) and "decode" in report and "prefill" in report
    quiet = make_llm(loaded)
    quiet.generate(PROMPTS[:1], SamplingParams(max_tokens=2), use_tqdm=False)
    assert "step_profile_ms" not in quiet.engine.stats() and not quiet.engine.profile.summary()


def test_batch_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(3) == [1, 2, 4]
    assert batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(20) == [1, 2, 4, 8, 16, 32]
    assert batch_buckets(256) == [1, 2, 4, 8] + list(range(16, 257, 16))


def test_cpu_engine_runs_eagerly(loaded):
    assert make_llm(loaded).engine.executor.graphs is None


# -- GPU --------------------------------------------------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_graphs_give_the_same_outputs(loaded, dtype):
    def run(enforce_eager: bool):
        llm = make_llm(loaded, device="cuda", dtype=dtype, max_num_seqs=20, enforce_eager=enforce_eager)
        prompts = PROMPTS * 4  # 20 requests of several lengths: the batch shrinks through buckets
        params = [p for p in MIX for _ in range(4)]
        results = llm.generate(prompts, params, use_tqdm=False)
        return llm, [[c.token_ids for c in r.outputs] for r in results]

    graphed, with_graphs = run(False)
    assert graphed.engine.executor.graphs is not None and graphed.engine.executor.graphs.graphs
    _, eager = run(True)
    if dtype == "float32":
        assert with_graphs == eager
    else:  # bfloat16: attention split differently may move a near-tie; most must agree
        same = sum(a == b for a, b in zip(with_graphs, eager))
        assert same >= len(eager) - 2


@pytest.mark.gpu
@cuda
def test_graph_replay_equals_eager_forward_on_the_same_inputs(loaded):
    llm = make_llm(loaded, device="cuda", dtype="bfloat16", max_num_seqs=12)
    engine = llm.engine
    graphs = engine.executor.graphs
    for i in range(11):
        engine.add_request(str(i), PROMPTS[i % 5] + [i], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    engine.step()  # prefill
    checked = 0
    while engine.has_unfinished():
        out = engine.scheduler.schedule()
        inputs = host_inputs(out, engine.block_manager.block_size)
        engine.executor.apply_cache_ops(out)
        replayed = graphs.run(inputs).clone()
        bucket = next(b for b in graphs.buckets if b >= len(out.decodes))
        eager = engine.executor.model.forward(graphs._input(bucket), engine.cache.device_cache)
        assert torch.equal(replayed, eager[: len(out.decodes)])
        checked += 1
        engine.process(out, replayed)
    assert checked == 5


@pytest.mark.gpu
@cuda
def test_cupy_kernels_launch_on_the_current_stream_and_are_captured():
    """A graph captured on a side stream holds the CuPy kernels: capturing runs nothing, each
    replay runs them on the inputs of that moment (compared with the torch references)."""
    from pagedkv import kernels
    from pagedkv.kernels import reference

    dev, dtype = torch.device("cuda"), torch.float16
    cache = torch.zeros(6, 1, 2, 4, 2, 64, device=dev, dtype=dtype)  # 6 blocks of 4 tokens, 2 KV heads
    key, value = (torch.zeros(3, 2, 64, device=dev, dtype=dtype) for _ in range(2))
    slots = torch.tensor([1, 6, -1], device=dev)
    query = torch.zeros(2, 4, 64, device=dev, dtype=dtype)
    tables = torch.tensor([[0, 1, 2], [3, 4, 5]], device=dev, dtype=torch.int32)
    lens = torch.tensor([7, 12], device=dev, dtype=torch.int32)

    def step():
        kernels.reshape_and_cache(key, value, cache, 0, slots)
        return kernels.paged_attention_decode(query, cache, 0, tables, lens, 0.125)

    step()  # compiles the kernels outside the capture
    cache.zero_()
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        out = step()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    assert not cache.any()
    for seed in range(2):
        gen = torch.Generator(device=dev).manual_seed(seed)
        before = torch.randn(cache.shape, generator=gen, device=dev).to(dtype)
        cache.copy_(before)
        for t in (key, value, query):
            t.copy_(torch.randn(t.shape, generator=gen, device=dev))
        lens.copy_(torch.tensor([5 + seed, 12 - seed]))
        graph.replay()
        torch.cuda.synchronize()
        expected = before.clone()
        reference.reshape_and_cache(key, value, expected, 0, slots)
        assert torch.equal(cache, expected)
        ref = reference.paged_attention_decode(query, expected, 0, tables, lens, 0.125)
        torch.testing.assert_close(out, ref, atol=2e-3, rtol=2e-3)


@pytest.mark.gpu
@cuda
def test_greedy_and_beams_on_the_gpu_equal_transformers_on_the_gpu(loaded, model_path):
    """Device sampling and the device beam top-k, through CUDA graphs, float32 (no TF32)."""
    transformers = pytest.importorskip("transformers")
    torch.backends.cuda.matmul.allow_tf32 = False
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).cuda().eval()
    llm = make_llm(loaded, device="cuda", dtype="float32")
    greedy = llm.generate(PROMPTS, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True), use_tqdm=False)
    beams = llm.generate(PROMPTS[:3], SamplingParams(max_tokens=6, beam_width=3, n=3), use_tqdm=False)
    for prompt, result in zip(PROMPTS, greedy):
        ref = hf.generate(torch.tensor([prompt], device="cuda"), do_sample=False, max_new_tokens=10,
                          min_new_tokens=10, pad_token_id=0)
        assert result.outputs[0].token_ids == ref[0, len(prompt):].tolist()
    for prompt, result in zip(PROMPTS[:3], beams):
        ref = hf.generate(torch.tensor([prompt], device="cuda"), do_sample=False, num_beams=3,
                          num_return_sequences=3, max_new_tokens=6, pad_token_id=-1)
        assert [c.token_ids for c in result.outputs] == [[t for t in row[len(prompt):].tolist() if t != -1]
                                                         for row in ref]
