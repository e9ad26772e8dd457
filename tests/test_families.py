"""Every model family against transformers, on tiny random models built with transformers' own
config classes: greedy tokens and logits, beam search, and outputs that preemption (swap or
recompute) and prefix caching never change; prompts longer than the sliding windows of the
families that have them."""
from __future__ import annotations

import pytest
import torch
from models import MIXED_WORKLOAD, make_llm
from test_engine import hf_beams
from test_model import run_greedy

from pagedkv.kernels.cpu import ops as cpu_ops
from pagedkv.runtime.engine.config import EngineConfig
from pagedkv.runtime.engine.llm_engine import LLMEngine
from pagedkv.runtime.engine.sampling_params import SamplingParams
from pagedkv.runtime.models.loader import load_model

transformers = pytest.importorskip("transformers")
transformers.utils.logging.set_verbosity_error()
pytestmark = pytest.mark.usefixtures("one_torch_thread")

SLIDING, FULL = "sliding_attention", "full_attention"
GEMMA_ROPE = {SLIDING: {"rope_type": "default", "rope_theta": 10000.0},
              FULL: {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0}}
LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
            "short_factor": [1.0, 1.1, 1.3, 1.7, 2.0, 2.5], "long_factor": [1.5, 2.0, 3.0, 4.0, 6.0, 8.0]}

# Each family with GQA or MHA, tied or untied embeddings, and odd vocabularies among them.
FAMILIES = {
    "llama-biases": dict(model_type="llama", attention_bias=True, num_heads=4, num_kv_heads=4),
    "mistral-window": dict(model_type="mistral", vocab_size=509, extra_config=dict(sliding_window=7)),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=True, num_kv_heads=1),
    "qwen3": dict(model_type="qwen3", head_dim=32, tie_word_embeddings=True, vocab_size=511),
    "qwen3-window": dict(model_type="qwen3", head_dim=16, num_heads=4, num_kv_heads=4, num_layers=3,
                         extra_config=dict(use_sliding_window=True, sliding_window=9, max_window_layers=1)),
    "gemma3": dict(model_type="gemma3_text", head_dim=32, num_layers=3, num_kv_heads=1, vocab_size=503,
                   extra_config=dict(sliding_window=6, layer_types=[SLIDING, FULL, SLIDING],
                                     query_pre_attn_scalar=24, rope_parameters=GEMMA_ROPE)),
    "gemma3-mha-untied": dict(model_type="gemma3_text", head_dim=16, num_heads=4, num_kv_heads=4,
                              tie_word_embeddings=False, extra_config=dict(sliding_window=5, sliding_window_pattern=2)),
    "phi3-window": dict(model_type="phi3", num_heads=4, num_kv_heads=4,
                        extra_config=dict(sliding_window=8, partial_rotary_factor=0.5)),
    "phi4-longrope": dict(model_type="phi3", head_dim=16, vocab_size=505, tie_word_embeddings=True,
                          max_position_embeddings=256,
                          extra_config=dict(original_max_position_embeddings=32, rope_parameters=LONGROPE)),
    "smollm3": dict(model_type="smollm3", num_layers=4, tie_word_embeddings=True,
                    extra_config=dict(no_rope_layers=[1, 1, 1, 0])),
    "smollm3-window": dict(model_type="smollm3", num_layers=2, tie_word_embeddings=False,
                           extra_config=dict(no_rope_layers=[1, 0], use_sliding_window=True, sliding_window=6)),
    "qwen3-moe": dict(model_type="qwen3_moe", head_dim=16, num_layers=3,
                      extra_config=dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                                        norm_topk_prob=True, mlp_only_layers=[1])),
    "qwen3-moe-unnormalised": dict(model_type="qwen3_moe", num_heads=4, num_kv_heads=4, tie_word_embeddings=True,
                                   extra_config=dict(num_experts=4, num_experts_per_tok=3,
                                                     moe_intermediate_size=48, norm_topk_prob=False)),
}
WINDOWED = ["mistral-window", "qwen3-window", "gemma3", "gemma3-mha-untied", "phi3-window", "smollm3-window"]
# Longer than every window; the 60-token prompt is prefilled in chunks (max_num_batched_tokens).
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4], list(range(20, 57)), [100], list(range(60, 120))]
# The engine's longest sequence: a longrope model takes its short factors up to its original
# context (32), as transformers does for sequences that short; see test_longrope_long_factors.
ENGINE = {"phi4-longrope": dict(max_model_len=32)}


@pytest.fixture(scope="module")
def family(request, tmp_path_factory):
    from models import make_tiny_llama

    name = request.param
    path = make_tiny_llama(str(tmp_path_factory.mktemp(name)), **FAMILIES[name])
    hf = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    hf.generation_config.eos_token_id = None  # greedy runs here never stop (nor suppress) at EOS
    return name, path, load_model(path), hf


def prompts_for(name: str) -> list[list[int]]:
    return [p[:24] for p in PROMPTS] if name in ENGINE else PROMPTS


def check_greedy_and_logits(name, path, loaded, hf, block_size, max_tokens=8, prompts=None, **engine_args):
    engine = LLMEngine(EngineConfig(model=path, block_size=block_size, num_device_blocks=256, swap_space_gib=0.01,
                                    max_num_batched_tokens=24, **{**ENGINE.get(name, {}), **engine_args}), loaded)
    prompts = prompts or prompts_for(name)
    ours, seen = run_greedy(engine, prompts, max_tokens)
    for i, prompt in enumerate(prompts):
        ref = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=max_tokens, pad_token_id=0)
        assert ours[i] == ref[0, len(prompt):].tolist(), f"prompt {i}"
        for tokens, row_logits in seen[i][::3] + seen[i][-1:]:
            with torch.no_grad():
                expected = hf(torch.tensor([tokens])).logits[0, -1]
            torch.testing.assert_close(row_logits, expected, atol=1e-4, rtol=1e-4)
    assert engine.block_manager.num_free_device_blocks == 256
    return engine


@pytest.mark.parametrize("family", list(FAMILIES), indirect=True)
@pytest.mark.parametrize("block_size", [4, 16])
def test_greedy_and_logits_equal_transformers(family, block_size):
    check_greedy_and_logits(*family, block_size)


@pytest.mark.parametrize("family", ["mistral-window", "gemma3", "qwen3-moe", "phi4-longrope"], indirect=True)
def test_torch_path_equals_transformers_too(family, monkeypatch):
    # The path CUDA takes, and the CPU's where the C kernels cannot be built.
    monkeypatch.setattr(cpu_ops, "library", lambda: None)
    check_greedy_and_logits(*family, 8)


@pytest.mark.parametrize("family", list(FAMILIES), indirect=True)
def test_beam_search_equals_transformers(family):
    name, _, loaded, hf = family
    params = SamplingParams(max_tokens=6, beam_width=3, n=3)
    prompts = prompts_for(name)[2:5]
    results = make_llm(loaded, **ENGINE.get(name, {})).generate(prompts, params, use_tqdm=False)
    hf.generation_config.eos_token_id = loaded.config.eos_token_ids  # beams end at EOS on both sides
    try:
        for prompt, result in zip(prompts, results):
            assert [c.token_ids for c in result.outputs] == hf_beams(hf, prompt, 3, 6, 1.0, False)
    finally:
        hf.generation_config.eos_token_id = None


@pytest.mark.parametrize("family", list(FAMILIES), indirect=True)
@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_preemption_and_prefix_caching_are_invisible(family, mode):
    name, _, loaded, _ = family
    prompts = prompts_for(name)
    args = ENGINE.get(name, {})
    blocks = 20
    if loaded.config.kv_window:  # every layer windowed: blocks out of the window are freed, so
        prompts, blocks = [p[:20] for p in prompts], 12  # only a smaller cache runs out of them
    # The reference shares nothing; the second run caches prefixes (a prompt repeated, so that
    # the repeat hits) and preempts.
    reference = make_llm(loaded, enable_prefix_caching=False, **args).generate(prompts, MIXED_WORKLOAD, use_tqdm=False)
    llm = make_llm(loaded, num_device_blocks=blocks, preemption_mode=mode, max_num_batched_tokens=12, **args)
    results = llm.generate(prompts + [prompts[4]], MIXED_WORKLOAD + [MIXED_WORKLOAD[4]], use_tqdm=False)
    stats = llm.engine.stats()
    assert stats["preemptions"][mode] >= 1
    assert [[c.token_ids for c in r.outputs] for r in results[:-1]] == \
        [[c.token_ids for c in r.outputs] for r in reference]
    assert results[-1].outputs[0].token_ids == reference[4].outputs[0].token_ids
    assert stats["prefix_cache"]["hit_tokens"] > 0
    assert (llm.engine.block_manager.blocks_dropped > 0) == bool(loaded.config.kv_window)
    bm = llm.engine.block_manager
    assert bm.num_free_device_blocks == bm.num_device_blocks and bm.num_free_cpu_blocks == bm.num_cpu_blocks


@pytest.mark.parametrize("family", ["phi4-longrope"], indirect=True)
def test_longrope_long_factors(family):
    # An engine whose sequences may pass the original context takes the long factors for every
    # position (llama.cpp's rule); transformers takes them for sequences longer than the
    # original context, so prompts longer than it agree.
    name, path, loaded, hf = family
    check_greedy_and_logits(name, path, loaded, hf, 8, prompts=[list(range(60, 100)), list(range(3, 36))],
                            max_model_len=256)


def test_windows_layers_and_ropes_are_read_from_the_config(tiny_model):
    from pagedkv.runtime.models.families import hf_config

    gemma = hf_config({"architectures": ["Gemma3ForCausalLM"], "vocab_size": 10, "hidden_size": 8,
                       "intermediate_size": 8, "num_hidden_layers": 7, "num_attention_heads": 2, "head_dim": 4,
                       "sliding_window": 512, "sliding_window_pattern": 6, "rope_theta": 1e6,
                       "rope_local_base_freq": 1e4, "query_pre_attn_scalar": 4})
    assert gemma.layer_windows == [512] * 5 + [0, 512]
    assert [gemma.layer_rope(i) for i in range(7)] == [1] * 5 + [0, 1]
    assert gemma.rope_theta == 1e6 and gemma.rope_local_theta == 1e4 and gemma.attention_scale == 0.5
    mistral = hf_config({"architectures": ["MistralForCausalLM"], "vocab_size": 10, "hidden_size": 8,
                         "intermediate_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2,
                         "sliding_window": 4096})
    assert mistral.layer_windows == [4096, 4096] and mistral.all_layers_windowed
    qwen = hf_config({"architectures": ["Qwen2ForCausalLM"], "vocab_size": 10, "hidden_size": 8,
                      "intermediate_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2,
                      "sliding_window": 4096, "use_sliding_window": False})
    assert qwen.layer_windows == [0, 0]
    smol = hf_config({"architectures": ["SmolLM3ForCausalLM"], "vocab_size": 10, "hidden_size": 8,
                      "intermediate_size": 8, "num_hidden_layers": 4, "num_attention_heads": 2,
                      "no_rope_layers": [1, 1, 1, 0]})
    assert [smol.layer_rope(i) for i in range(4)] == [0, 0, 0, -1]


@pytest.mark.parametrize("cfg,message", [
    ({"architectures": ["GPT2LMHeadModel"]}, r"architecture \['GPT2LMHeadModel'\] is not supported"),
    ({"architectures": ["LlamaForCausalLM"], "rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
     "RoPE scaling 'yarn' is not supported"),
    ({"architectures": ["LlamaForCausalLM"], "hidden_act": "relu"}, "activation 'relu' is not supported"),
    ({"architectures": ["Gemma3ForCausalLM"], "final_logit_softcapping": 30.0},
     r"logit soft-capping \(final_logit_softcapping\) is not supported"),
])
def test_what_is_missing_is_one_line(cfg, message):
    from pagedkv.runtime.models.families import hf_config

    base = {"vocab_size": 10, "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 2}
    with pytest.raises(ValueError, match=message) as e:
        hf_config({**base, **cfg}, "model")
    assert "\n" not in str(e.value)


def test_experts_are_not_split_over_ranks():
    from pagedkv.runtime.models.families import hf_config
    from pagedkv.runtime.models.parallel import check_tensor_parallel

    moe = hf_config({"architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 10, "hidden_size": 8,
                     "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 4})
    assert moe.is_moe_layer(0) and moe.num_experts == 4
    check_tensor_parallel(moe, 1)
    with pytest.raises(ValueError, match="mixture-of-experts model .* is not split"):
        check_tensor_parallel(moe, 2)
