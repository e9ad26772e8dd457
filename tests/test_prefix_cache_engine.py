"""Prefix caching in the engine: outputs never show it (greedy and beam search against
transformers, seeded sampling against caching off, preemption in every mode), the prefill
starts after the cached tokens, and the statistics count hits the way they are defined."""
import argparse

import pytest
import torch
from models import MIXED_WORKLOAD
from test_engine import hf_beams, tokens

from pagedkv.runtime.engine.config import EngineConfig
from pagedkv.runtime.engine.llm import LLM
from pagedkv.runtime.engine.sampling_params import SamplingParams
from pagedkv.runtime.models.loader import load_model

transformers = pytest.importorskip("transformers")

SYSTEM = list(range(50, 70))  # 5 full blocks of 4
PROMPTS = [SYSTEM + [3, 4], SYSTEM + [7, 8, 9, 10, 11], SYSTEM + [3, 4], SYSTEM[:12] + [90, 91], [5, 6, 7],
           SYSTEM + [3, 4, 5, 6, 7, 8, 9]]
WORKLOAD = MIXED_WORKLOAD + [
    SamplingParams(max_tokens=10, beam_width=2, n=2),
]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    from models import make_tiny_llama

    return make_tiny_llama(str(tmp_path_factory.mktemp("prefix")), num_layers=2, num_heads=4, num_kv_heads=2)


@pytest.fixture(scope="module")
def loaded(model_path):
    return load_model(model_path)


@pytest.fixture(scope="module")
def hf(model_path):
    return transformers.AutoModelForCausalLM.from_pretrained(model_path).eval()


def make_llm(loaded, **kwargs) -> LLM:
    args = dict(block_size=4, num_device_blocks=256, swap_space_gib=0.01)
    args.update(kwargs)
    return LLM(loaded=loaded, **args)


def assert_all_free(llm):
    bm = llm.engine.block_manager
    assert bm.num_free_device_blocks == bm.num_device_blocks and bm.num_free_cpu_blocks == bm.num_cpu_blocks
    assert bm.stats().device_blocks_used == 0


def test_greedy_with_hits_equals_transformers(loaded, hf):
    llm = make_llm(loaded, max_num_batched_tokens=16)  # chunked prefills too
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    for _ in range(2):  # the second time, every prompt finds its head cached
        for prompt, result in zip(PROMPTS, llm.generate(PROMPTS, params, use_tqdm=False)):
            ref = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=10, min_new_tokens=10,
                              pad_token_id=0)
            assert result.outputs[0].token_ids == ref[0, len(prompt):].tolist()
    cache = llm.engine.stats()["prefix_cache"]
    assert cache["hit_tokens"] > 0 and cache["evicted_blocks"] == 0
    assert_all_free(llm)


@pytest.mark.parametrize("width", [2, 4])
def test_beam_search_with_hits_equals_transformers(loaded, hf, width):
    llm = make_llm(loaded)
    params = SamplingParams(max_tokens=7, beam_width=width, n=width)
    for _ in range(2):
        for prompt, result in zip(PROMPTS[:4], llm.generate(PROMPTS[:4], params, use_tqdm=False)):
            assert [c.token_ids for c in result.outputs] == hf_beams(hf, prompt, width, 7, 1.0, False)
    assert llm.engine.stats()["prefix_cache"]["hit_tokens"] > 0
    assert_all_free(llm)


def test_seeded_sampling_is_the_same_with_and_without_caching(loaded):
    params = SamplingParams(max_tokens=12, n=3, temperature=0.9, seed=5, ignore_eos=True)
    off = make_llm(loaded, enable_prefix_caching=False).generate(PROMPTS, params, use_tqdm=False)
    llm = make_llm(loaded)
    for _ in range(2):
        assert tokens(llm.generate(PROMPTS, params, use_tqdm=False)) == tokens(off)
    assert llm.engine.stats()["prefix_cache"]["hit_tokens"] > 0


@pytest.mark.parametrize("blocks, batched", [(28, 12), (34, 64)])
@pytest.mark.parametrize("mode", ["swap", "recompute", "auto"])
def test_preemption_with_caching_is_invisible(loaded, mode, blocks, batched):
    """Twelve requests over a shared head in a pool that holds a few: several groups that share
    cached blocks are preempted in one step. (With the six requests this test once had, one
    victim a step was enough, and the swap bug of shared blocks never showed.)"""
    prompts, workload = PROMPTS * 2, WORKLOAD * 2
    reference = make_llm(loaded, enable_prefix_caching=False).generate(prompts, workload, use_tqdm=False)
    llm = make_llm(loaded, num_device_blocks=blocks, preemption_mode=mode, max_num_batched_tokens=batched)
    results = llm.generate(prompts, workload, use_tqdm=False)
    stats = llm.engine.stats()
    assert stats["preemptions"]["swap"] + stats["preemptions"]["recompute"] >= 3
    if mode == "recompute":
        assert stats["preemptions"]["swap"] == 0 and stats["prefix_cache"]["recompute_cached_tokens"] > 0
    if mode == "swap":  # blocks that other groups hold moved once (a group in prefill recomputes)
        assert stats["swap_copies_saved"] > 0
    assert stats["prefix_cache"]["hit_tokens"] > 0
    assert tokens(results) == tokens(reference)
    assert_all_free(llm)


def test_prefill_computes_only_uncached_tokens_and_stats_count_first_admissions(loaded):
    counts = {}
    for caching in (True, False):
        llm = make_llm(loaded, enable_prefix_caching=caching)
        params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
        llm.generate([SYSTEM + [1]], params, use_tqdm=False)
        llm.generate([SYSTEM + [2, 3]], params, use_tqdm=False)
        counts[caching] = llm.engine.stats()["prefix_cache"]
    on, off = counts[True], counts[False]
    assert (on["queried_tokens"], on["hit_tokens"], on["prefill_tokens_computed"]) == (43, 20, 21 + 2)
    assert on["hit_rate"] == pytest.approx(20 / 43)
    # SYSTEM once, and b's block of [2, 3] and its first two outputs (a's last block stays partial).
    assert on["cached_blocks"] == 5 + 1 and on["evictable_blocks"] == on["cached_blocks"]
    assert (off["hit_tokens"], off["prefill_tokens_computed"], off["cached_blocks"]) == (0, 43, 0)
    assert not off["enabled"] and on["enabled"]


def test_flag_turns_prefix_caching_off():
    parser = argparse.ArgumentParser()
    EngineConfig.add_arguments(parser)
    assert EngineConfig.from_args(parser.parse_args([])).enable_prefix_caching
    assert not EngineConfig.from_args(parser.parse_args(["--no-enable-prefix-caching"])).enable_prefix_caching
    assert EngineConfig.from_args(parser.parse_args(["--enable-prefix-caching"])).enable_prefix_caching
