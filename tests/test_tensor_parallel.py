"""Tensor parallelism on the CPU: each rank loads only its slices of the weights, and two ranks
over gloo give the tokens of one rank and of transformers, with and without preemption, every
rank carrying out the block manager's plan on its own KV heads.

A process belongs to one tensor-parallel group at a time: one engine per model here, built once
for the module; test_tensor_parallel_faults.py has the engines that lose a worker."""
import dataclasses

import pytest
import torch
from models import MIXED_WORKLOAD

from pagedkv.runtime.engine.config import EngineConfig
from pagedkv.runtime.engine.llm import LLM
from pagedkv.runtime.engine.llm_engine import LLMEngine
from pagedkv.runtime.engine.sampling_params import SamplingParams
from pagedkv.runtime.engine.step_message import StepMessage
from pagedkv.runtime.models.loader import load_model
from pagedkv.runtime.models.parallel import WeightShard

transformers = pytest.importorskip("transformers")
pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("one_torch_thread")]

MODELS = {
    "mha-tied": dict(num_layers=2, num_heads=4, num_kv_heads=4, tie_word_embeddings=True, vocab_size=509),
    "gqa-untied": dict(num_layers=2, num_heads=4, num_kv_heads=2, tie_word_embeddings=False),
}
PROMPTS = [list(range(5, 12)), [3, 4], list(range(20, 41)), [7, 8, 9, 10, 11, 12, 13, 14, 15], [42] * 5]
WORKLOAD = MIXED_WORKLOAD
# Few blocks, so that the workload preempts. A fixed mode (not auto, which reads the clock):
# one rank and two then make the same plans, so their KV pools can be compared.
SMALL = dict(block_size=4, num_device_blocks=24, max_num_batched_tokens=12, swap_space_gib=0.01,
             preemption_mode="recompute")
LARGE = dict(block_size=4, num_device_blocks=256, swap_space_gib=0.01)


def tokens(results):
    return [[c.token_ids for c in r.outputs] for r in results]


@pytest.fixture(scope="module")
def paths(tiny_model):
    return {name: tiny_model(**kwargs) for name, kwargs in MODELS.items()}


# -- without processes: shards, refusals, the step encoding ---------------------------------------
@pytest.mark.parametrize("name", list(MODELS))
def test_each_rank_reads_its_slices_and_they_make_the_whole(paths, tmp_path, name):
    from models import make_tiny_llama

    path = make_tiny_llama(str(tmp_path), max_shard_size="20KB", **MODELS[name])  # several files
    whole = load_model(path).weights
    shards = [load_model(path, shard=WeightShard(rank, 2)).weights for rank in range(2)]
    vocab = load_model(path).config.vocab_size
    for weight, full in whole.items():
        dim = WeightShard.split_dim(weight)
        if dim is None:
            assert all(torch.equal(s[weight], full) for s in shards), weight
            continue
        joined = torch.cat([s[weight] for s in shards], dim)
        if weight in ("model.embed_tokens.weight", "lm_head.weight"):
            assert joined.shape[0] == 2 * -(-vocab // 2) and not joined[vocab:].any()  # zero padding
            joined = joined[:vocab]
        assert torch.equal(joined, full), weight


def test_gguf_shards_are_slices_of_the_dequantized_tensors(tmp_path):
    from gguf_files import gpt2_vocab, write_gguf
    from models import make_tiny_llama

    folder = make_tiny_llama(str(tmp_path / "hf"), with_tokenizer=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    path = write_gguf(str(tmp_path / "tiny.gguf"), {k: v.numpy() for k, v in model.state_dict().items()},
                      model.config, metadata=gpt2_vocab(None))
    whole = load_model(path).weights
    for rank in range(2):
        shard = WeightShard(rank, 2)
        part = load_model(path, shard=shard).weights
        assert part.keys() == whole.keys()
        for weight, full in whole.items():
            assert torch.equal(part[weight], shard.load(weight, full.shape, full.__getitem__)), weight


def test_heads_that_do_not_divide_are_refused_before_any_process_starts(paths):
    with pytest.raises(ValueError, match=r"tensor_parallel_size 3 does not divide the model's attention heads \(4\)"):
        LLMEngine(EngineConfig(model=paths["mha-tied"], tensor_parallel_size=3))
    with pytest.raises(ValueError, match=r"larger than the model's 2 KV heads"):
        LLMEngine(EngineConfig(model=paths["gqa-untied"], tensor_parallel_size=4))
    with pytest.raises(ValueError, match="tensor_parallel_size must be >= 1"):
        EngineConfig(tensor_parallel_size=0)


def test_step_message_round_trip(paths):
    llm = LLM(loaded=load_model(paths["gqa-untied"]), **SMALL)
    engine = llm.engine
    engine.add_request("a", PROMPTS[2], SamplingParams(max_tokens=4, prompt_logprobs=2))
    out = engine.scheduler.schedule()
    out.blocks_to_swap_out, out.blocks_to_copy = [(3, 1)], [(4, 5)]
    batch = engine.executor.prepare(out)
    assert batch.num_prompt_logits == 12  # the first chunk's positions (the budget), all of them
    back = StepMessage.decode(StepMessage.of(out, batch).encode(), torch.device("cpu"))
    assert (back.blocks_to_swap_out, back.blocks_to_swap_in, back.blocks_to_copy) == ([(3, 1)], [], [(4, 5)])
    for field in dataclasses.fields(batch):
        sent, received = getattr(batch, field.name), getattr(back.batch, field.name)
        if torch.is_tensor(sent):
            assert sent.dtype == received.dtype and torch.equal(sent, received), field.name
        else:
            assert sent == received, field.name


# -- two ranks: exactness ------------------------------------------------------------------------
@pytest.fixture(scope="module", params=list(MODELS))
def tp(request, paths):
    """(name, TP=2 engine over gloo, TP=1 engine): both with few blocks."""
    name = request.param
    loaded = load_model(paths[name])
    llm = LLM(loaded=loaded, tensor_parallel_size=2, **SMALL)
    yield name, llm, LLM(loaded=loaded, **SMALL)
    llm.close()


def test_greedy_equals_one_rank_and_transformers(tp, paths):
    name, llm, single = tp
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    results = tokens(llm.generate(PROMPTS, params, use_tqdm=False))
    assert results == tokens(single.generate(PROMPTS, params, use_tqdm=False))
    hf = transformers.AutoModelForCausalLM.from_pretrained(paths[name]).eval()
    for prompt, result in zip(PROMPTS, results):
        ref = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=10, min_new_tokens=10,
                          pad_token_id=0)
        assert result[0] == ref[0, len(prompt):].tolist()


@pytest.mark.parametrize("width,length_penalty,early_stopping", [(3, 1.0, False), (4, 0.5, True)])
def test_beam_search_equals_one_rank_and_transformers(tp, paths, width, length_penalty, early_stopping):
    name, llm, single = tp
    params = SamplingParams(max_tokens=7, beam_width=width, n=width, length_penalty=length_penalty,
                            early_stopping=early_stopping)
    results = tokens(llm.generate(PROMPTS[:3], params, use_tqdm=False))
    assert results == tokens(single.generate(PROMPTS[:3], params, use_tqdm=False))
    hf = transformers.AutoModelForCausalLM.from_pretrained(paths[name]).eval()
    for prompt, result in zip(PROMPTS[:3], results):
        out = hf.generate(torch.tensor([prompt]), do_sample=False, num_beams=width, num_return_sequences=width,
                          max_new_tokens=7, length_penalty=length_penalty, early_stopping=early_stopping,
                          pad_token_id=-1)
        assert result == [[t for t in row[len(prompt):].tolist() if t != -1] for row in out]


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_preemption_is_invisible_and_every_rank_follows_the_plan(tp, mode):
    name, llm, single = tp
    # The preemption mode is rank 0's business alone (the workers only follow plans).
    for engine in (llm.engine, single.engine):
        engine.scheduler.policy.mode = mode
    reference = LLM(loaded=load_model(llm.engine.model_source), **LARGE).generate(PROMPTS, WORKLOAD, use_tqdm=False)
    before, swapped_before = dict(llm.engine.stats()["preemptions"]), llm.engine.cache.bytes_swapped
    results = llm.generate(PROMPTS, WORKLOAD, use_tqdm=False)
    assert tokens(results) == tokens(reference)
    preemptions = {k: v - before[k] for k, v in llm.engine.stats()["preemptions"].items()}
    assert preemptions[mode] >= 1 and preemptions[{"swap": "recompute", "recompute": "swap"}[mode]] == 0
    bm = llm.engine.block_manager
    assert bm.num_free_device_blocks == bm.num_device_blocks and bm.num_free_cpu_blocks == bm.num_cpu_blocks
    # One rank with the same blocks gets the same plans; each rank's pool must then hold its
    # heads of every block that rank's K/V went through: swaps and copies included.
    single.generate(PROMPTS, WORKLOAD, use_tqdm=False)
    reports = llm.engine.executor.rank_reports(with_pools=True)
    whole = single.engine.cache.device_cache
    heads = whole.shape[-2] // 2
    for rank, report in enumerate(reports):
        assert report["rank"] == rank and report["device_blocks"] == bm.num_device_blocks
        assert report["cpu_blocks"] == bm.num_cpu_blocks
        assert report["bytes_swapped"] == reports[0]["bytes_swapped"]
        torch.testing.assert_close(report["device_cache"], whole[..., rank * heads:(rank + 1) * heads, :],
                                   atol=1e-4, rtol=1e-4)
    assert (reports[0]["bytes_swapped"] > swapped_before) == (mode == "swap")


def test_prompt_logprobs_equal_one_rank(tp):
    """The prompt's rows go through the split lm_head in a product of their own on every rank."""
    name, llm, single = tp
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, prompt_logprobs=3)
    results = llm.generate(PROMPTS, params, use_tqdm=False)
    alone = single.generate(PROMPTS, params, use_tqdm=False)
    assert tokens(results) == tokens(alone)
    for prompt, got, ref in zip(PROMPTS, results, alone):
        assert got.prompt_logprobs[0] is None and len(got.prompt_logprobs) == len(prompt)
        for a, b in zip(got.prompt_logprobs[1:], ref.prompt_logprobs[1:]):
            assert list(a) == list(b) and all(a[t][1] == b[t][1] for t in a)
            assert all(abs(a[t][0] - b[t][0]) < 1e-4 for t in a)
