"""The model families pagedkv runs, as Hugging Face describes them: a config.json to a
ModelConfig, and the tensors each needs under their Hugging Face names.

Every family is a variant of one decoder (runtime.models.config says which parts vary). What
is not supported fails here, with one line that names it: an architecture, a RoPE scaling
type, an activation, logit soft-capping.
"""
from __future__ import annotations

import math
import os
from typing import Any

from pagedkv.runtime.models.config import FULL, SLIDING, ModelConfig

# model_type -> the architecture class transformers names it by.
FAMILIES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
            "phi3": "Phi3ForCausalLM", "smollm3": "SmolLM3ForCausalLM"}
SUPPORTED_ARCHITECTURES = tuple(FAMILIES.values())
_BY_ARCHITECTURE = {arch: model_type for model_type, arch in FAMILIES.items()}
SUPPORTED_ROPE = ("default", "linear", "llama3", "longrope")  # what runtime.models.llama implements
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}


def family_of(cfg: dict[str, Any], source: str = "") -> str:
    """The model_type of a config.json we can run, else a one-line error naming what is there."""
    archs = cfg.get("architectures") or [FAMILIES.get(cfg.get("model_type", ""), "")]
    if isinstance(archs, list):
        for arch in archs:
            if arch in _BY_ARCHITECTURE:
                return _BY_ARCHITECTURE[arch]
    raise ValueError(f"{source}: architecture {archs} is not supported "
                     f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")


def hf_config(cfg: dict[str, Any], source: str = "") -> ModelConfig:
    """ModelConfig from config.json, after checking that we can run the model it describes."""
    if not isinstance(cfg, dict):
        raise ValueError(f"{os.path.join(source, 'config.json')}: not a JSON object")
    family = family_of(cfg, source)
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu"
    if act not in _ACTIVATIONS:
        raise ValueError(f"{source}: activation {act!r} is not supported (supported: {', '.join(_ACTIVATIONS)})")
    if cfg.get("mlp_bias"):
        raise ValueError(f"{source}: MLP biases (mlp_bias) are not supported")
    for capping in ("final_logit_softcapping", "attn_logit_softcapping"):
        if cfg.get(capping):
            raise ValueError(f"{source}: logit soft-capping ({capping}) is not supported")
    try:
        return _from_hf(family, dict(cfg), _ACTIVATIONS[act], source)
    except KeyError as e:
        raise ValueError(f"{os.path.join(source, 'config.json')}: no {e.args[0]!r}, which a {family} config "
                         "needs (is the file complete?)") from None
    except (TypeError, ZeroDivisionError) as e:
        raise ValueError(f"{os.path.join(source, 'config.json')}: a value of the wrong type or zero ({e})") from None


def _rope(params: dict[str, Any] | None, cfg: dict[str, Any], source: str) -> tuple[float, dict | None]:
    """(theta, scaling) from one RoPE parameter set (transformers 5's rope_parameters, or the
    older rope_theta with rope_scaling)."""
    params = dict(params or {})
    theta = float(params.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
    params.pop("partial_rotary_factor", None)
    if not params:
        return theta, None
    kind = params.setdefault("rope_type", params.pop("type", "default"))
    if kind in ("su", "yarn") and family_of(cfg) == "phi3":  # Phi-3's older names for longrope
        kind = params["rope_type"] = "longrope"
    if kind not in SUPPORTED_ROPE:
        raise ValueError(f"{source}: RoPE scaling {kind!r} is not supported (supported: {', '.join(SUPPORTED_ROPE)})")
    if kind == "default":
        return theta, None
    if kind == "longrope":
        original = params.get("original_max_position_embeddings") or cfg.get("original_max_position_embeddings")
        if not original:
            raise ValueError(f"{source}: longrope scaling without original_max_position_embeddings")
        params["original_max_position_embeddings"] = int(original)
        factor = params.get("factor") or cfg.get("max_position_embeddings", original) / original
        if params.get("attention_factor") is None:  # transformers' default for Phi-3
            params["attention_factor"] = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    return theta, params


def _layer_types(family: str, cfg: dict[str, Any], num_layers: int, no_rope: list[int]) -> tuple[list[str], int | None]:
    """(layer types, window): which layers attend through a sliding window, and its size."""
    window = cfg.get("sliding_window")
    types = cfg.get("layer_types")
    if family in ("qwen2", "qwen3", "qwen3_moe", "smollm3") and not cfg.get("use_sliding_window", False):
        window = None  # transformers ignores these families' sliding_window unless use_sliding_window
    if not window:
        return [FULL] * num_layers, None
    if types is None:
        if family == "gemma3_text":
            pattern = cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or 6
            types = [SLIDING if (i + 1) % pattern else FULL for i in range(num_layers)]
        elif family in ("qwen2", "qwen3", "qwen3_moe"):
            first = cfg.get("max_window_layers", num_layers)
            types = [SLIDING if i >= first else FULL for i in range(num_layers)]
        elif family == "smollm3":
            types = [SLIDING if not no_rope[i] else FULL for i in range(num_layers)]
        else:  # Llama, Mistral, Phi-3: every layer
            types = [SLIDING] * num_layers
    if len(types) != num_layers or any(t not in (FULL, SLIDING) for t in types):
        raise ValueError(f"layer_types {types} is not {num_layers} of {FULL!r} and {SLIDING!r}")
    return list(types), int(window)


def _from_hf(family: str, cfg: dict[str, Any], act: str, source: str) -> ModelConfig:
    heads = cfg["num_attention_heads"]
    num_layers = cfg["num_hidden_layers"]
    eos = cfg.get("eos_token_id")
    eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    params = cfg.get("rope_parameters")
    local_theta = None
    partial = cfg.get("partial_rotary_factor", 1.0)
    if isinstance(params, dict) and isinstance(params.get(FULL), dict):  # per layer type (Gemma 3)
        theta, scaling = _rope(params[FULL], cfg, source)
        local_theta, local_scaling = _rope(params.get(SLIDING), cfg, source)
        if local_scaling is not None:
            raise ValueError(f"{source}: RoPE scaling of the sliding layers is not supported")
    else:
        if isinstance(params, dict):
            partial = params.get("partial_rotary_factor", partial)
        theta, scaling = _rope(params if isinstance(params, dict) else cfg.get("rope_scaling"), cfg, source)
        if family == "gemma3_text":
            local_theta = float(cfg.get("rope_local_base_freq", 10000.0))
    no_rope = list(cfg.get("no_rope_layers") or []) if family == "smollm3" else []
    if no_rope and len(no_rope) != num_layers:
        raise ValueError(f"{source}: no_rope_layers has {len(no_rope)} entries for {num_layers} layers")
    types, window = _layer_types(family, cfg, num_layers, no_rope)
    gemma = family == "gemma3_text"
    experts = cfg.get("num_experts", cfg.get("num_local_experts", 0)) if family == "qwen3_moe" else 0
    return ModelConfig(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        tie_word_embeddings=cfg.get("tie_word_embeddings", gemma),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=eos_ids,
        architecture=family,
        sliding_window=window,
        layer_types=tuple(types) if window else (),
        no_rope_layers=tuple(int(x) for x in no_rope),
        rope_local_theta=local_theta,
        partial_rotary_factor=float(partial),
        qk_norm=family in ("qwen3", "qwen3_moe", "gemma3_text"),
        norm_unit_offset=gemma,
        sandwich_norms=gemma,
        hidden_act=act,
        embedding_multiplier=cfg["hidden_size"] ** 0.5 if gemma else None,
        query_pre_attn_scalar=cfg.get("query_pre_attn_scalar", 256) if gemma else None,
        num_experts=int(experts or 0),
        num_experts_per_tok=int(cfg.get("num_experts_per_tok", 0)) if experts else 0,
        moe_intermediate_size=int(cfg.get("moe_intermediate_size", 0)) if experts else 0,
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
        decoder_sparse_step=int(cfg.get("decoder_sparse_step", 1) or 1),
        mlp_only_layers=tuple(cfg.get("mlp_only_layers") or ()),
    )


def expected_weight_names(config: ModelConfig, with_optional: bool = False) -> list[str]:
    """The tensors a model needs, under Hugging Face names (with_optional adds the attention
    biases a model may have)."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not config.tie_word_embeddings:
        names.append("lm_head.weight")
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        if config.sandwich_norms:
            names += [p + "pre_feedforward_layernorm.weight", p + "post_feedforward_layernorm.weight"]
        names += [f"{p}self_attn.{x}_proj.weight" for x in "qkvo"]
        if config.qk_norm:
            names += [p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"]
        if config.is_moe_layer(i):
            names.append(p + "mlp.gate.weight")
            names += [f"{p}mlp.experts.{e}.{x}_proj.weight" for e in range(config.num_experts)
                      for x in ("gate", "up", "down")]
        else:
            names += [f"{p}mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
        if with_optional:
            names += [f"{p}self_attn.{x}_proj.bias" for x in "qkvo"]
    return names


def expected_shape(name: str, config: ModelConfig) -> tuple[int, ...] | None:
    """The shape the config implies for the tensor `name` (None: one we do not check)."""
    h, d = config.hidden_size, config.head_dim
    q, kv = config.num_heads * d, config.num_kv_heads * d
    if ".mlp.experts." in name:
        inter = config.moe_intermediate_size
    else:
        inter = config.intermediate_size
    shapes = {"q_norm.weight": (d,), "k_norm.weight": (d,),  # before "norm.weight", which they end with
              "embed_tokens.weight": (config.vocab_size, h), "lm_head.weight": (config.vocab_size, h),
              "norm.weight": (h,),
              "q_proj.weight": (q, h), "k_proj.weight": (kv, h), "v_proj.weight": (kv, h),
              "o_proj.weight": (h, q), "q_proj.bias": (q,), "k_proj.bias": (kv,), "v_proj.bias": (kv,),
              "o_proj.bias": (h,), "mlp.gate.weight": (config.num_experts, h),
              "gate_proj.weight": (inter, h), "up_proj.weight": (inter, h), "down_proj.weight": (h, inter)}
    return next((s for k, s in shapes.items() if name.endswith(k)), None)


def unfused(name: str, tensor, config: ModelConfig) -> list[tuple[str, Any]]:
    """Phi-3's fused projections (qkv_proj, gate_up_proj) as the separate matrices of the other
    families; any other tensor as it is. `tensor` is a torch tensor or a quantized matrix
    (anything with `rows`, runtime.models.quant.GroupQuantized)."""
    if name.endswith("self_attn.qkv_proj.weight"):
        q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        bounds = [(0, q), (q, q + kv), (q + kv, q + 2 * kv)]
        parts = [("q", "qkv_proj"), ("k", "qkv_proj"), ("v", "qkv_proj")]
    elif name.endswith("mlp.gate_up_proj.weight"):
        half = tensor.shape[0] // 2
        bounds = [(0, half), (half, 2 * half)]
        parts = [("gate", "gate_up_proj"), ("up", "gate_up_proj")]
    else:
        return [(name, tensor)]
    out = []
    for (start, end), (part, fused) in zip(bounds, parts):
        piece = tensor.rows(list(range(start, end))) if hasattr(tensor, "rows") else tensor[start:end]
        out.append((name.replace(fused, f"{part}_proj"), piece))
    return out


FUSED = ("self_attn.qkv_proj.weight", "mlp.gate_up_proj.weight")
