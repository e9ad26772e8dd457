"""Every family from a GGUF file written as llama.cpp's converter writes it (tests/gguf_files.py,
with the `gguf` package): float32 files give the safetensors folder's run exactly; quantized
ones equal transformers loading the same file, for the architectures its GGUF loader reads."""
from __future__ import annotations

import os

import pytest
import torch
from gguf.constants import GGMLQuantizationType as Q
from gguf_files import write_family_gguf
from models import make_tiny_llama
from test_families import FAMILIES, LONGROPE, prompts_for
from test_model import run_greedy

from pagedkv.runtime.engine.config import EngineConfig
from pagedkv.runtime.engine.llm_engine import LLMEngine
from pagedkv.runtime.models.loader import load_model

transformers = pytest.importorskip("transformers")
transformers.utils.logging.set_verbosity_error()
pytestmark = pytest.mark.usefixtures("one_torch_thread")

# The families as GGUF can say them: Gemma 3's layers in llama.cpp's 5:1 pattern and its
# attention scaled by head_dim; Qwen3-MoE's experts on every layer, top-k weights normalised.
# The "-hf" ones are also what transformers' GGUF loader reads right (it takes no attention
# biases for llama, head_dim 128 for qwen3, no expert width for qwen3moe, and Gemma 3's
# query_pre_attn_scalar and global RoPE scaling at their defaults).
GEMMA_ROPE = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
              "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0}}
GGUF_FAMILIES = {
    "llama-biases": FAMILIES["llama-biases"],
    "llama-hf": dict(model_type="llama", num_kv_heads=2, vocab_size=512),
    "mistral-window": FAMILIES["mistral-window"],
    "qwen2-hf": FAMILIES["qwen2"],
    "qwen3": FAMILIES["qwen3"],
    "qwen3-hf": dict(model_type="qwen3", num_heads=4, num_kv_heads=2, head_dim=128, vocab_size=512),
    "gemma3": dict(model_type="gemma3_text", head_dim=32, num_layers=7, num_kv_heads=1, vocab_size=512,
                   extra_config=dict(sliding_window=6, sliding_window_pattern=6, query_pre_attn_scalar=32,
                                     rope_parameters=GEMMA_ROPE)),
    "gemma3-hf": dict(model_type="gemma3_text", head_dim=256, num_heads=2, num_layers=7, num_kv_heads=1,
                      vocab_size=512, extra_config=dict(sliding_window=6, sliding_window_pattern=6,
                                                        query_pre_attn_scalar=256)),
    "phi3-window": FAMILIES["phi3-window"],
    "phi4-longrope": dict(FAMILIES["phi4-longrope"], vocab_size=512),
    "smollm3": FAMILIES["smollm3"],
    "qwen3-moe-hf": dict(model_type="qwen3_moe", num_heads=4, num_kv_heads=2, head_dim=16, num_layers=2,
                         extra_config=dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=768,
                                           norm_topk_prob=True)),
}
ENGINE = {"phi4-longrope": dict(max_model_len=32)}
# Quantized matrices of the formats pagedkv keeps as they are (Q8_0, Q4_0, Q4_1) and one it
# dequantizes at load (Q5_0); norms and embeddings as the converter leaves small tensors.
QUANTIZED = {"attn_q": Q.Q8_0, "attn_k": Q.Q4_0, "attn_v": Q.Q8_0, "attn_output": Q.Q4_1, "attn_qkv": Q.Q8_0,
             "ffn_gate": Q.Q5_0, "ffn_up": Q.Q8_0, "ffn_down": Q.Q4_0, "token_embd": Q.Q8_0, "output": Q.Q8_0,
             "ffn_gate_exps": Q.Q8_0, "ffn_up_exps": Q.Q4_0, "ffn_down_exps": Q.Q8_0}


@pytest.fixture(scope="module")
def family(request, tmp_path_factory):
    name = request.param
    folder = make_tiny_llama(str(tmp_path_factory.mktemp(name)), **GGUF_FAMILIES[name])
    return name, folder, tmp_path_factory.mktemp(name + "-gguf")


def greedy(name: str, loaded, path: str, prompts, quantization: str = "none"):
    engine = LLMEngine(EngineConfig(model=path, block_size=4, num_device_blocks=256, swap_space_gib=0.01,
                                    max_num_batched_tokens=24, quantization=quantization, **ENGINE.get(name, {})),
                       loaded)
    return run_greedy(engine, prompts, 8)


@pytest.mark.parametrize("family", list(GGUF_FAMILIES), indirect=True)
def test_float32_gguf_equals_the_safetensors_run(family):
    name, folder, tmp = family
    path = write_family_gguf(str(tmp / "f32.gguf"), folder)
    from_gguf, from_folder = load_model(path), load_model(folder)
    assert from_gguf.config.layer_windows == from_folder.config.layer_windows
    assert [from_gguf.config.layer_rope(i) for i in range(from_gguf.config.num_layers)] == \
        [from_folder.config.layer_rope(i) for i in range(from_folder.config.num_layers)]
    assert sorted(from_gguf.weights) == sorted(from_folder.weights)
    for key, tensor in from_folder.weights.items():
        if from_gguf.config.norm_unit_offset and key.endswith("norm.weight"):
            # The file holds 1 + w: w itself comes back rounded, the 1 + w the model uses exactly.
            assert torch.equal(1.0 + from_gguf.weights[key], 1.0 + tensor), key
        else:
            assert torch.equal(from_gguf.weights[key], tensor), key
    prompts = prompts_for(name)
    (tokens, seen), (want, want_seen) = greedy(name, from_gguf, path, prompts), greedy(name, from_folder, folder, prompts)
    assert tokens == want
    for i in seen:
        for (_, a), (_, b) in zip(seen[i], want_seen[i]):
            if from_gguf.config.num_experts:  # batched products over experts copied elsewhere: last bits
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
            else:
                assert torch.equal(a, b)


def hf_from_gguf(path: str):
    """transformers' model for a GGUF file (what from_pretrained(gguf_file=...) builds, without
    accelerate), float32."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder, file = os.path.split(path)
    config = transformers.AutoConfig.from_pretrained(folder, gguf_file=file)
    with torch.device("meta"):
        skeleton = transformers.AutoModelForCausalLM.from_config(config)
    tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=skeleton)["tensors"]
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    if "lm_head.weight" in missing:
        model.tie_weights()
    model.generation_config.eos_token_id = None
    return model


# transformers' GGUF loader reads neither Phi-3's partial rotary nor its RoPE factors, nor a
# llama file's sliding window, nor SmolLM3 at all: those files are checked against the
# safetensors run above, and here against their own dequantized weights.
HF_READS = [name for name in GGUF_FAMILIES if name.endswith("-hf")]


@pytest.mark.parametrize("family", HF_READS, indirect=True)
def test_quantized_gguf_equals_transformers_gguf_loader(family):
    name, folder, tmp = family
    path = write_family_gguf(str(tmp / "q.gguf"), folder, qtypes=QUANTIZED)
    hf = hf_from_gguf(path)
    ours = load_model(path)
    prompts = prompts_for(name)
    tokens, seen = greedy(name, ours, path, prompts)
    for i, prompt in enumerate(prompts):
        ref = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=8, pad_token_id=0)
        assert tokens[i] == ref[0, len(prompt):].tolist(), f"prompt {i}"
        for ids, row_logits in seen[i][::4]:
            with torch.no_grad():
                expected = hf(torch.tensor([ids])).logits[0, -1]
            torch.testing.assert_close(row_logits, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", list(GGUF_FAMILIES), indirect=True)
def test_quantized_gguf_kept_quantized_follows_the_dequantized_run(family):
    # The 4- and 8-bit matrices kept as they are against the same file dequantized: logits within
    # 4% of their range (up to 2% seen; where the CPU has AVX512-VNNI the activations enter those
    # matrices as bytes, each rounded by up to 1/254 of its group's largest, in every matrix of
    # every layer, and the KV cache is bfloat16; a wrong scale, offset or code errs by the range).
    name, folder, tmp = family
    path = write_family_gguf(str(tmp / "q.gguf"), folder, qtypes=QUANTIZED)
    prompts = prompts_for(name)[:3]
    kept = load_model(path, quantization="auto")
    assert any(type(w).__name__ == "GroupQuantized" for w in kept.weights.values())
    (_, seen), (_, want_seen) = greedy(name, kept, path, prompts, "auto"), greedy(name, load_model(path), path, prompts)
    for i in seen:
        (_, a), (_, b) = seen[i][0], want_seen[i][0]
        assert (a - b).abs().max() <= 0.04 * (b.max() - b.min()), i
