"""Blocks that fell out of every layer's sliding window are released: a model whose layers are
all windowed runs sequences far longer than its cache holds, with the tokens transformers
gives, beam search's forks included; the KV content checker (on in the suite) verifies each
step that every slot a row reads is its own and that no released block is still mapped."""
from __future__ import annotations

import pytest
import torch
from models import make_llm
from test_engine import hf_beams

from pagedkv.runtime.engine.sampling_params import SamplingParams
from pagedkv.runtime.models.loader import load_model

transformers = pytest.importorskip("transformers")
transformers.utils.logging.set_verbosity_error()
pytestmark = pytest.mark.usefixtures("one_torch_thread")

WINDOW = 8


@pytest.fixture(scope="module")
def windowed(tiny_model):
    path = tiny_model(model_type="mistral", num_layers=2, extra_config=dict(sliding_window=WINDOW))
    hf = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    hf.generation_config.eos_token_id = None
    return load_model(path), hf


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_long_generations_run_in_a_cache_a_fraction_of_their_length(windowed, mode):
    loaded, hf = windowed
    assert loaded.config.kv_window == WINDOW
    prompts = [list(range(5, 11)), list(range(40, 50)), [7, 8, 9]]
    # 3 sequences of 130 tokens in 4-token blocks would need 100 blocks; each holds at most
    # 4 at a time (its window and the block being filled), and preemption covers the rest.
    llm = make_llm(loaded, num_device_blocks=10, preemption_mode=mode, max_num_batched_tokens=8)
    results = llm.generate(prompts, SamplingParams(max_tokens=120, temperature=0, ignore_eos=True), use_tqdm=False)
    for prompt, result in zip(prompts, results):
        ref = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=120, pad_token_id=0)
        assert result.outputs[0].token_ids == ref[0, len(prompt):].tolist()
    bm = llm.engine.block_manager
    assert bm.blocks_dropped >= 3 * 25
    assert bm.num_free_device_blocks == bm.num_device_blocks and bm.num_free_cpu_blocks == bm.num_cpu_blocks
    assert llm.engine.executor.checker is not None and llm.engine.executor.checker.steps_checked > 0


def test_beams_fork_tables_with_released_blocks(windowed):
    loaded, hf = windowed
    hf.generation_config.eos_token_id = loaded.config.eos_token_ids
    try:
        prompt = list(range(60, 75))
        llm = make_llm(loaded, num_device_blocks=40)
        result = llm.generate([prompt], SamplingParams(max_tokens=24, beam_width=3, n=3), use_tqdm=False)[0]
        assert [c.token_ids for c in result.outputs] == hf_beams(hf, prompt, 3, 24, 1.0, False)
        assert llm.engine.block_manager.blocks_dropped > 0
    finally:
        hf.generation_config.eos_token_id = None


def test_models_with_a_full_attention_layer_keep_every_block(tiny_model):
    path = tiny_model(model_type="gemma3_text", head_dim=32, num_layers=2,
                      extra_config=dict(sliding_window=4, layer_types=["sliding_attention", "full_attention"]))
    loaded = load_model(path)
    assert loaded.config.layer_windows == [4, 0] and loaded.config.kv_window is None
    llm = make_llm(loaded)
    llm.generate([list(range(3, 30))], SamplingParams(max_tokens=20, temperature=0), use_tqdm=False)
    assert llm.engine.block_manager.blocks_dropped == 0


def test_a_block_released_too_early_is_caught(windowed, monkeypatch):
    from pagedkv.kvcache.block_manager import BlockManager
    from pagedkv.runtime.engine.kv_check import KVContentError

    real = BlockManager.drop_out_of_window
    # One block too many: the window's first block goes too.
    monkeypatch.setattr(BlockManager, "drop_out_of_window",
                        lambda self, seq, start: real(self, seq, start + self.block_size))
    llm = make_llm(windowed[0], num_device_blocks=40)
    with pytest.raises(KVContentError, match="released block"):
        llm.generate([list(range(5, 30))], SamplingParams(max_tokens=30, temperature=0), use_tqdm=False)


def test_with_the_host_tier_outputs_are_the_same(windowed):
    # Released blocks wait for the step's tier copies (they are pinned until the next step);
    # prompts that share a head hit the device cache or the host tier below it.
    loaded, _ = windowed
    head = list(range(100, 130))
    prompts = [head + [5, 6, 7], head + [8, 9], list(range(3, 40)), head + [5, 6, 7]]
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    want = [r.outputs[0].token_ids for r in make_llm(loaded).generate(prompts, params, use_tqdm=False)]
    llm = make_llm(loaded, num_device_blocks=14, kv_host_cache_gb=0.001, max_num_batched_tokens=8)
    got = [r.outputs[0].token_ids for r in llm.generate(prompts, params, use_tqdm=False)]
    assert got == want
    assert llm.engine.block_manager.blocks_dropped > 0 and llm.engine.block_manager.tiers.enabled
