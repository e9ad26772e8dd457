"""Reading weights and configuration from a GGUF file, as llama.cpp's converter writes them
for the families pagedkv runs (runtime.models.families): llama, qwen2, qwen3, qwen3moe,
gemma3, phi3, smollm3.

Tensors are dequantized to float with the `gguf` package (or kept quantized, see
runtime.models.quant) and renamed to the Hugging Face names. What the converter changed is
undone: the row order of q_proj/k_proj for the architectures llama.cpp rotates in its NORM
style (llama, smollm3: each head's rotary halves interleaved; the NEOX-style ones, qwen2,
qwen3, qwen3moe, gemma3, phi3, keep Hugging Face's two halves), Gemma's norms stored as 1 + w,
Phi-3's fused projections, and the experts stacked in one tensor per projection. What the
file does not say is what llama.cpp assumes for the architecture (Gemma 3's local RoPE base,
its 5:1 layer pattern, SmolLM3's NoPE layers, Qwen3-MoE's normalised top-k weights).
"""
from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from pagedkv.runtime.models.config import FULL, SLIDING, ModelConfig
from pagedkv.runtime.models.families import unfused
from pagedkv.runtime.models.parallel import WeightShard
from pagedkv.runtime.models.quant import KEPT_FORMATS, BlockQuantized, GroupQuantized, from_gguf_raw

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "qwen3moe", "gemma3", "phi3", "smollm3")
_PERMUTED = ("llama", "smollm3")  # llama.cpp's NORM-style rotary: the converter permuted q/k rows
_QK_NORM = ("qwen3", "qwen3moe", "gemma3")
_FAMILY = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen3moe": "qwen3_moe", "gemma3": "gemma3_text",
           "phi3": "phi3", "smollm3": "smollm3"}

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_qkv": "self_attn.qkv_proj",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate_inp": "mlp.gate",
}
# Where an architecture names a tensor differently (Gemma 3's ffn_norm is the norm before the
# MLP, its post_attention_norm the attention output's; Phi-3's ffn_up holds gate and up).
_ARCH_BLOCK_NAMES = {"gemma3": {"ffn_norm": "pre_feedforward_layernorm"}, "phi3": {"ffn_up": "mlp.gate_up_proj"}}
_EXPERTS = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# Tensors that carry no weight of ours: rope_freqs and Phi-3's factors are read into the config.
_NOT_WEIGHTS = {"rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"}


def open_gguf(path: str) -> GGUFReader:
    """Open a GGUF file and check that it holds a model we can run."""
    try:
        reader = GGUFReader(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"GGUF file not found: {path}") from None
    except Exception as exc:  # the reader raises plain ValueErrors on bad magic or version
        raise ValueError(f"{path}: not a readable GGUF file ({exc})") from exc
    arch = gguf_value(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{path}: GGUF architecture {arch!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    return reader


def gguf_value(reader: GGUFReader, key: str, default: Any = None) -> Any:
    """A metadata value as plain Python (str, int, float, bool or list), or `default`."""
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_config(reader: GGUFReader, path: str = "") -> ModelConfig:
    """ModelConfig from the `{arch}.*` and `tokenizer.ggml.*` metadata."""
    arch = gguf_value(reader, "general.architecture")

    def key(name: str, default: Any = None, required: bool = False) -> Any:
        value = gguf_value(reader, f"{arch}.{name}", default)
        if value is None and required:
            raise ValueError(f"{path}: GGUF metadata key {arch}.{name} is missing")
        return value

    tensors = {t.name: t for t in reader.tensors}
    hidden = key("embedding_length", required=True)
    heads = key("attention.head_count", required=True)
    num_layers = key("block_count", required=True)
    head_dim = key("attention.key_length") or hidden // heads
    rope_dim = key("rope.dimension_count")
    if rope_dim is not None and rope_dim != head_dim and arch != "phi3":
        raise ValueError(f"{path}: partial rotary embeddings ({rope_dim} of {head_dim}) are not supported "
                         f"for GGUF architecture {arch!r}")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is not None:
        vocab = len(tokens.data)
    elif "token_embd.weight" in tensors:
        vocab = int(tensors["token_embd.weight"].shape[1])  # GGML order: [hidden, vocab]
    else:
        vocab = key("vocab_size", required=True)
    eos = [gguf_value(reader, f"tokenizer.ggml.{k}") for k in ("eos_token_id", "eot_token_id")]
    theta = key("rope.freq_base", 10000.0)
    window = key("attention.sliding_window") or None
    types: list[str] = []
    if window:
        if arch == "gemma3":  # llama.cpp: every sixth layer global, unless the file says otherwise
            pattern = key("attention.sliding_window_pattern", 6)
            if isinstance(pattern, list):
                types = [SLIDING if p else FULL for p in pattern]
            else:
                types = [SLIDING if (i + 1) % pattern else FULL for i in range(num_layers)]
        else:
            types = [SLIDING] * num_layers
    gemma = arch == "gemma3"
    max_position = key("context_length", 2048)
    config = ModelConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=key("feed_forward_length", required=True),
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=key("attention.head_count_kv") or heads,
        head_dim=head_dim,
        rms_norm_eps=key("attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=theta,
        rope_scaling=_rope_scaling(reader, arch, rope_dim or head_dim, theta, max_position, path),
        max_position_embeddings=max_position,
        tie_word_embeddings="output.weight" not in tensors,
        bos_token_id=gguf_value(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=list(dict.fromkeys(e for e in eos if e is not None)),
        architecture=_FAMILY[arch],
        sliding_window=window,
        layer_types=tuple(types),
        # llama.cpp: SmolLM3 leaves every fourth layer without RoPE.
        no_rope_layers=tuple(int((i + 1) % 4 != 0) for i in range(num_layers)) if arch == "smollm3" else (),
        rope_local_theta=10000.0 if gemma else None,  # llama.cpp's base for Gemma 3's sliding layers
        partial_rotary_factor=rope_dim / head_dim if rope_dim else 1.0,
        qk_norm=arch in _QK_NORM,
        norm_unit_offset=gemma,
        sandwich_norms=gemma,
        hidden_act="gelu_tanh" if gemma else "silu",
        embedding_multiplier=hidden ** 0.5 if gemma else None,
        # llama.cpp: 1/sqrt(head_dim), except Gemma 3 27B's 1/sqrt(hidden / heads)
        query_pre_attn_scalar=(hidden / heads if num_layers == 62 else head_dim) if gemma else None,
    )
    if arch == "qwen3moe":
        config.num_experts = key("expert_count", required=True)
        config.num_experts_per_tok = key("expert_used_count", required=True)
        config.moe_intermediate_size = key("expert_feed_forward_length", required=True)
        config.norm_topk_prob = True  # llama.cpp normalises Qwen3-MoE's top-k weights
    if gguf_value(reader, f"{arch}.final_logit_softcapping") or gguf_value(reader, f"{arch}.attn_logit_softcapping"):
        raise ValueError(f"{path}: logit soft-capping is not supported")
    return config


def _rope_scaling(reader: GGUFReader, arch: str, head_dim: int, theta: float, max_position: int,
                  path: str) -> dict | None:
    """Linear scaling; Phi-3's longrope (its factors are tensors); Llama-3 scaling, which
    llama.cpp stores only as per-frequency factors."""
    kind = gguf_value(reader, f"{arch}.rope.scaling.type", "none")
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(gguf_value(reader, f"{arch}.rope.scaling.factor"))}
    if kind not in ("none", None):
        raise ValueError(f"{path}: RoPE scaling {kind!r} is not supported")
    factors = {t.name: t for t in reader.tensors if t.name.startswith("rope_factors_")}
    if factors:
        if set(factors) != {"rope_factors_long.weight", "rope_factors_short.weight"}:
            raise ValueError(f"{path}: RoPE factors {sorted(factors)} are not the long and short ones of longrope")
        original = gguf_value(reader, f"{arch}.rope.scaling.original_context_length")
        if not original:
            raise ValueError(f"{path}: longrope factors without {arch}.rope.scaling.original_context_length")
        scale = max_position / original
        attention = gguf_value(reader, f"{arch}.rope.scaling.attn_factor")
        if attention is None:
            attention = math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0

        def read(name: str) -> list[float]:
            t = factors[name]
            return [float(x) for x in np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(-1)]

        return {"rope_type": "longrope", "long_factor": read("rope_factors_long.weight"),
                "short_factor": read("rope_factors_short.weight"), "original_max_position_embeddings": int(original),
                "attention_factor": float(attention)}
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if freqs is None:
        return None
    factors = np.asarray(dequantize(freqs.data, freqs.tensor_type), dtype=np.float64).reshape(-1)
    # Llama 3.1/3.2 use low/high factors 1 and 4 over an 8192 original context; only the
    # overall factor varies, and it is the largest per-frequency factor.
    scaling = {"rope_type": "llama3", "factor": float(factors.max()), "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    if not np.allclose(factors, llama3_rope_factors(scaling, head_dim, theta), rtol=1e-3):
        raise ValueError(f"{path}: rope_freqs do not match Llama-3 RoPE scaling; not supported")
    return scaling


def llama3_rope_factors(scaling: dict, head_dim: int, theta: float) -> np.ndarray:
    """The factors llama.cpp's converter writes into rope_freqs for Llama-3 scaling."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    old = scaling["original_max_position_embeddings"]
    low_wl = old / scaling["low_freq_factor"]
    high_wl = old / scaling["high_freq_factor"]
    factor = scaling["factor"]
    smooth = (old / wavelen - scaling["low_freq_factor"]) / (
        scaling["high_freq_factor"] - scaling["low_freq_factor"])
    mid = 1.0 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < high_wl, 1.0, np.where(wavelen > low_wl, factor, mid))


def hf_name(gguf_name: str, arch: str = "llama") -> str | None:
    """Hugging Face name of a GGUF tensor, or None if it is not one we know (the experts'
    stacked tensors: the name with `{e}` where the expert's number goes)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _BLOCK_RE.fullmatch(gguf_name)
    if not match:
        return None
    layer, part, kind = match.groups()
    if part in _EXPERTS:
        return f"model.layers.{layer}.mlp.experts.{{e}}.{_EXPERTS[part]}.{kind}"
    name = _ARCH_BLOCK_NAMES.get(arch, {}).get(part) or _BLOCK_NAMES.get(part)
    return None if name is None else f"model.layers.{layer}.{name}.{kind}"


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: per head, rows (pair, 2) back to (2, half)."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _kept_quantized(tensor, qtype: GGMLQuantizationType, name: str, config: ModelConfig,
                    permuted: bool) -> GroupQuantized | BlockQuantized:
    """A matrix in a format kept as it is (see runtime.models.quant), q/k rows in Hugging Face order."""
    rows, cols = int(tensor.shape[1]), int(tensor.shape[0])  # GGML order: fastest dimension first
    weight = from_gguf_raw(tensor.data, qtype.name, rows, cols)
    for part, heads in (("q_proj", config.num_heads), ("k_proj", config.num_kv_heads)):
        if f".self_attn.{part}." in name and permuted:
            weight = weight.rows(unpermute_rope_rows(np.arange(rows), heads))
    return weight


def gguf_weights(reader: GGUFReader, config: ModelConfig, dtype: torch.dtype = torch.float32,
                 path: str = "", shard: WeightShard | None = None,
                 keep_quantized: bool = False) -> dict[str, torch.Tensor | GroupQuantized]:
    """All model tensors, dequantized, renamed and with q/k rows in Hugging Face order. With
    `shard`, each tensor is cut to that rank's part right after it is dequantized.
    keep_quantized: matrices stored in a format of runtime.models.quant.KEPT_FORMATS stay in it
    (not with `shard`: a tensor-parallel rank dequantizes)."""
    keep_quantized = keep_quantized and shard is None
    arch = gguf_value(reader, "general.architecture")
    permuted = arch in _PERMUTED
    weights: dict[str, torch.Tensor | GroupQuantized] = {}

    def put(name: str, value: torch.Tensor | GroupQuantized) -> None:
        for part_name, part in unfused(name, value, config):  # Phi-3's fused projections, split
            if isinstance(part, torch.Tensor):
                if shard is not None:
                    part = shard.load(part_name, part.shape, part.__getitem__).clone()
                part = part.contiguous() if dtype == torch.float32 else part.to(dtype).contiguous()
            weights[part_name] = part

    for tensor in reader.tensors:
        if tensor.name in _NOT_WEIGHTS:
            continue
        name = hf_name(tensor.name, arch)
        if name is None:
            raise ValueError(f"{path}: unsupported tensor {tensor.name!r} in GGUF file (architecture {arch})")
        qtype = GGMLQuantizationType(tensor.tensor_type)
        if keep_quantized and qtype.name in KEPT_FORMATS and len(tensor.shape) == 2 and name.endswith(".weight"):
            put(name, _kept_quantized(tensor, qtype, name, config, permuted))
            continue
        try:
            array = dequantize(tensor.data, qtype)
        except NotImplementedError:
            raise ValueError(f"{path}: tensor {tensor.name} has type {qtype.name}, "
                             "which the gguf package cannot dequantize") from None
        # GGML lists dimensions fastest-first; numpy wants them the other way round.
        array = array.reshape([int(d) for d in reversed(tensor.shape)])
        if permuted and ".self_attn.q_proj." in name:
            array = unpermute_rope_rows(array, config.num_heads)
        elif permuted and ".self_attn.k_proj." in name:
            array = unpermute_rope_rows(array, config.num_kv_heads)
        if not (array.flags.writeable and array.flags.c_contiguous and array.dtype == np.float32):
            array = np.array(array, dtype=np.float32)  # F32 tensors are views of the read-only map
        if config.norm_unit_offset and name.endswith("norm.weight"):
            array = array - np.float32(1)  # Gemma's converter stored 1 + w (as transformers reads it back)
        if "{e}" in name:  # the experts of one projection, stacked: [experts, rows, columns]
            for e in range(array.shape[0]):
                put(name.format(e=e), torch.from_numpy(np.ascontiguousarray(array[e])))
            continue
        put(name, torch.from_numpy(array))
    return weights
