"""Reading Llama-family weights and configuration from a GGUF file.

Tensors are dequantized to float with the `gguf` package, renamed to the Hugging Face
Llama names, and the row order of q_proj/k_proj is restored (llama.cpp's converter
interleaves each head's rotary halves; Hugging Face keeps them as two halves).
"""
from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from pagedkv.runtime.models.config import ModelConfig
from pagedkv.runtime.models.parallel import WeightShard
from pagedkv.runtime.models.quant import KEPT_FORMATS, GroupQuantized, from_gguf_blocks

SUPPORTED_ARCHITECTURES = ("llama",)

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
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# Tensors that carry no weight of ours: rope_freqs is read into the config instead.
_NOT_WEIGHTS = {"rope_freqs.weight"}


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
    """ModelConfig from the `llama.*` and `tokenizer.ggml.*` metadata."""
    arch = gguf_value(reader, "general.architecture")

    def key(name: str, default: Any = None, required: bool = False) -> Any:
        value = gguf_value(reader, f"{arch}.{name}", default)
        if value is None and required:
            raise ValueError(f"{path}: GGUF metadata key {arch}.{name} is missing")
        return value

    tensors = {t.name: t for t in reader.tensors}
    hidden = key("embedding_length", required=True)
    heads = key("attention.head_count", required=True)
    head_dim = key("attention.key_length") or hidden // heads
    rope_dim = key("rope.dimension_count")
    if rope_dim is not None and rope_dim != head_dim:
        raise ValueError(f"{path}: partial rotary embeddings ({rope_dim} of {head_dim}) are not supported")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is not None:
        vocab = len(tokens.data)
    elif "token_embd.weight" in tensors:
        vocab = int(tensors["token_embd.weight"].shape[1])  # GGML order: [hidden, vocab]
    else:
        vocab = key("vocab_size", required=True)
    eos = [gguf_value(reader, f"tokenizer.ggml.{k}") for k in ("eos_token_id", "eot_token_id")]
    theta = key("rope.freq_base", 10000.0)
    return ModelConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=key("feed_forward_length", required=True),
        num_layers=key("block_count", required=True),
        num_heads=heads,
        num_kv_heads=key("attention.head_count_kv") or heads,
        head_dim=head_dim,
        rms_norm_eps=key("attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=theta,
        rope_scaling=_rope_scaling(reader, arch, head_dim, theta, path),
        max_position_embeddings=key("context_length", 2048),
        tie_word_embeddings="output.weight" not in tensors,
        bos_token_id=gguf_value(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=list(dict.fromkeys(e for e in eos if e is not None)),
        architecture=arch,
    )


def _rope_scaling(reader: GGUFReader, arch: str, head_dim: int, theta: float, path: str) -> dict | None:
    """Recover Llama-3 RoPE scaling, which llama.cpp stores only as per-frequency factors."""
    kind = gguf_value(reader, f"{arch}.rope.scaling.type", "none")
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(gguf_value(reader, f"{arch}.rope.scaling.factor"))}
    if kind not in ("none", None):
        raise ValueError(f"{path}: RoPE scaling {kind!r} is not supported")
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


def hf_name(gguf_name: str) -> str | None:
    """Hugging Face name of a GGUF tensor, or None if it is not one we know."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _BLOCK_RE.fullmatch(gguf_name)
    if match and match.group(2) in _BLOCK_NAMES:
        layer, part, kind = match.groups()
        return f"model.layers.{layer}.{_BLOCK_NAMES[part]}.{kind}"
    return None


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: per head, rows (pair, 2) back to (2, half)."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _kept_quantized(tensor, qtype: GGMLQuantizationType, name: str, config: ModelConfig) -> GroupQuantized:
    """A matrix in a format kept as it is (see runtime.models.quant), q/k rows in Hugging Face order."""
    rows, cols = int(tensor.shape[1]), int(tensor.shape[0])  # GGML order: fastest dimension first
    weight = from_gguf_blocks(tensor.data, qtype.name, rows, cols)
    for part, heads in (("q_proj", config.num_heads), ("k_proj", config.num_kv_heads)):
        if f".self_attn.{part}." in name:
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
    weights: dict[str, torch.Tensor | GroupQuantized] = {}
    for tensor in reader.tensors:
        if tensor.name in _NOT_WEIGHTS:
            continue
        name = hf_name(tensor.name)
        if name is None:
            raise ValueError(f"{path}: unsupported tensor {tensor.name!r} in GGUF file")
        qtype = GGMLQuantizationType(tensor.tensor_type)
        if keep_quantized and qtype.name in KEPT_FORMATS and len(tensor.shape) == 2 and name.endswith(".weight"):
            weights[name] = _kept_quantized(tensor, qtype, name, config)
            continue
        try:
            array = dequantize(tensor.data, qtype)
        except NotImplementedError:
            raise ValueError(f"{path}: tensor {tensor.name} has type {qtype.name}, "
                             "which the gguf package cannot dequantize") from None
        # GGML lists dimensions fastest-first; numpy wants them the other way round.
        array = array.reshape([int(d) for d in reversed(tensor.shape)])
        if ".self_attn.q_proj." in name:
            array = unpermute_rope_rows(array, config.num_heads)
        elif ".self_attn.k_proj." in name:
            array = unpermute_rope_rows(array, config.num_kv_heads)
        if not (array.flags.writeable and array.flags.c_contiguous and array.dtype == np.float32):
            array = np.array(array, dtype=np.float32)  # F32 tensors are views of the read-only map
        out = torch.from_numpy(array)
        if shard is not None:
            out = shard.load(name, out.shape, out.__getitem__).clone()
        weights[name] = out if dtype == torch.float32 else out.to(dtype)
    return weights
