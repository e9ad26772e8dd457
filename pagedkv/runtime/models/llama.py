"""A Llama-family decoder over the paged KV cache: Llama 2/3, Mistral, Qwen2/3, Qwen3-MoE,
Gemma 3, Phi-3/4, SmolLM2/3, TinyLlama (runtime.models.config says what varies between them).

It runs one ragged batch per call: the new tokens of every scheduled sequence concatenated,
no padding. Each layer writes its new K/V into their cache slots first, then attention reads
all context (cached and new, or the last `window` positions of a sliding-window layer) through
the block tables, so sequences that share cached blocks can be computed in the same batch.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from pagedkv import kernels
from pagedkv.kernels.cpu import decode as cpu_decode
from pagedkv.kernels.cpu import ops as cpu_ops
from pagedkv.runtime.models.config import ModelConfig
from pagedkv.runtime.models.huge_pages import into_huge_pages
from pagedkv.runtime.models.parallel import TensorParallel
from pagedkv.runtime.models.quant import QUANTIZED, BlockLinear, BlockQuantized, GroupQuantized, Int4Linear, int4_supported


@dataclass
class ModelInput:
    """One iteration's batch. Prefill rows come first, decode rows (one token each) after."""

    token_ids: torch.Tensor          # int64 [T]
    positions: torch.Tensor          # int64 [T]
    slot_mapping: torch.Tensor       # int64 [T]
    num_prefill_tokens: int
    prefill_block_tables: torch.Tensor     # int32 [S_p, max_blocks]
    prefill_query_start_loc: torch.Tensor  # int32 [S_p + 1]
    prefill_context_lens: torch.Tensor     # int32 [S_p]
    decode_block_tables: torch.Tensor      # int32 [S_d, max_blocks]
    decode_context_lens: torch.Tensor      # int32 [S_d]
    logits_indices: torch.Tensor | None  # int64 rows whose next-token logits are wanted; None: all
    # The last this many of logits_indices (prompt logprobs' positions) go through the lm_head
    # in a product of their own, so that the rows before them (those that sample) get the
    # logits they get in a step without them: a product's kernel can depend on its rows.
    num_prompt_logits: int = 0


def rope_inv_freq(config: ModelConfig, theta: float | None = None, scaling: dict | None | bool = True,
                  long: bool = False) -> tuple[torch.Tensor, float]:
    """(inverse frequencies, attention factor) of a rotary embedding over config.rotary_dim
    dimensions, as transformers computes them: the model's (theta None, scaling True) or
    another base and scaling (Gemma 3's local layers). Longrope takes its long factors where
    `long`, else its short ones; its attention factor scales cos and sin."""
    dim = config.rotary_dim
    theta = config.rope_theta if theta is None else theta
    scaling = (config.rope_scaling if scaling is True else scaling) or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "longrope":
        factors = torch.tensor(scaling["long_factor" if long else "short_factor"], dtype=torch.float32)
        shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
        return 1.0 / (factors * theta ** shape), float(scaling["attention_factor"])
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / scaling["factor"], 1.0
    if kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_context = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
        return torch.where(medium, smoothed, scaled), 1.0
    raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: default, linear, llama3, longrope)")


# The batch size oneDNN packs weights for; any batch works with them. Measured on an AMD EPYC
# (AVX-512): as fast as unpacked at 1 row, faster from 8 rows on.
_PACK_BATCH = 32
# Up to this many rows (single-stream and small-batch decode) the packed oneDNN weights are the
# slower: on an Intel Xeon (AMX) a float32 decode step of SmolLM2-135M took 91 ms of CPU time
# with them, 54 ms with F.linear on the plain weights; in bfloat16 oneDNN streamed the weights
# at one row at 8 GB/s, pagedkv's AVX512-BF16 loops (pagedkv/kernels/cpu/cpu_bf16.c) at 13 (32 against 21
# ms for the model's matrices, 1 thread). Models whose dense linear weights fit in _DUAL_BYTES
# keep both layouts and pick per call. Quantized matrices run one 4-bit kernel at every size
# (Int4Linear): it gives each row the same result whatever the batch (oneDNN's bfloat16 GEMM
# does not, from 5 rows on), so preemption, which changes batches, stays invisible in their
# outputs.
# In float32, F.linear (MKL) takes 1 to 3 rows at the memory's pace on Intel's CPUs and then
# changes kernels: SmolLM2-135M's matrices took 39.1, 39.9, 42.8 ms at 1, 2, 3 rows, 69.2 at 4,
# where oneDNN took 52.4 (1 thread; 2 threads: 20.5, 20.7, 22.2, then 35.1 against 29.0). On
# other CPUs MKL takes slow paths (45 ms at 1 row on an AMD EPYC). pagedkv's loops
# (pagedkv/kernels/cpu/cpu_f32.c, `cpu_ops.f32_linear_preferred`) take every size where they
# build: about 20 ms at 1 to 4 rows, 30 at 8, on that EPYC, and batches and prompts at 0.95-1.07x
# oneDNN's speed; each row's result is the same whatever its batch, which oneDNN's is not.
_SMALL_ROWS = {torch.float32: 3, torch.bfloat16: cpu_ops.BF16_LINEAR_ROWS}
_DUAL_BYTES = 2 << 30


@dataclass
class DualWeight:
    """A dense weight in two layouts: oneDNN-packed for batches, plain [out, in] for few rows
    (packed None: a float32 model's, which pagedkv's loops take at every size)."""
    packed: torch.Tensor | None
    plain: torch.Tensor


@functools.lru_cache(maxsize=None)
def onednn_linear_available() -> bool:
    """Whether torch can run float32 linear layers through oneDNN with prepacked weights."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        weight = torch.ops.mkldnn._reorder_linear_weight(torch.eye(8), _PACK_BATCH)
        out = torch.ops.mkldnn._linear_pointwise(torch.arange(16.0).view(2, 8), weight, None, "none", [], "")
    except Exception:  # an op missing from this torch build, or one that changed its signature
        return False
    return torch.equal(out, torch.arange(16.0).view(2, 8))


@functools.lru_cache(maxsize=None)
def cpu_has_bfloat16() -> bool:
    """Whether the CPU computes in bfloat16 natively (AVX512-BF16 or AMX), so that bfloat16
    weights run at least as fast as float32 ones instead of through conversions."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:  # not Linux: trust oneDNN's own check
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return "avx512_bf16" in flags or "amx_bf16" in flags


class LlamaModel:
    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor | GroupQuantized], device: torch.device,
                 dtype: torch.dtype, tp: TensorParallel | None = None, keep_quantized: bool = True) -> None:
        self.config, self.device, self.dtype = config, device, dtype
        # Tensor parallelism: `weights` are this rank's shard (runtime.models.parallel), so
        # this rank computes its share of the heads.
        self.tp = tp or TensorParallel()
        self.num_heads = config.num_heads // self.tp.world_size
        self.num_kv_heads = config.num_kv_heads // self.tp.world_size
        # Quantized matrices (GGUF, see runtime.models.quant) run quantized on the CPU only.
        self.keep_quantized = keep_quantized and torch.device(device).type == "cpu"
        # How linear layers run. CUDA: F.linear (cuBLAS). CPU, float32: oneDNN with weights
        # prepacked at load, about twice as fast as F.linear's BLAS call from a batch of 8 rows
        # on (MKL takes slow code paths on AMD CPUs) and as fast as the best at 1 row. Other CPU
        # cases: weights stored transposed ([in, out], contiguous), which BLAS streams faster in
        # the matrix-vector products of small-batch decode.
        if torch.device(device).type != "cpu":
            self.linear_kind = "linear"
        elif dtype in (torch.float32, torch.bfloat16) and onednn_linear_available():
            self.linear_kind = "onednn"
        else:
            self.linear_kind = "mm"
        w = {k: self._tensor(v) for k, v in weights.items()}
        dense_bytes = sum(v.numel() * v.element_size() for v in w.values() if isinstance(v, torch.Tensor))
        small_rows_kernel = dtype == torch.float32 or (dtype == torch.bfloat16 and cpu_ops.bf16_linear_supported())
        self.dual = self.linear_kind == "onednn" and small_rows_kernel and dense_bytes <= _DUAL_BYTES
        # Float32: pagedkv's loops at every size where they build (each row's result the same
        # whatever its batch), else F.linear for few rows and oneDNN for more.
        self.own_f32 = dtype == torch.float32 and self.linear_kind == "onednn" and cpu_ops.f32_linear_preferred()
        self.small_rows = cpu_ops.F32_LINEAR_ROWS if self.own_f32 else _SMALL_ROWS.get(dtype, 0)  # take plain weights
        embed = w["model.embed_tokens.weight"]
        self.embed = self._tensor(embed.dequantize()) if isinstance(embed, QUANTIZED) else embed
        self.lm_head = self._weight(embed if config.tie_word_embeddings else w["lm_head.weight"])
        self.norm = self._norm_weight(w["model.norm.weight"])
        # Gemma's embeddings are scaled by sqrt(hidden_size), rounded to the weights' type first.
        self.embed_scale = (None if config.embedding_multiplier is None
                            else torch.tensor(config.embedding_multiplier, dtype=torch.float32).to(self.embed.dtype))
        self.layers = [self._layer(w, i) for i in range(config.num_layers)]
        # One rotary embedding per base: the model's, and Gemma 3's local one for its sliding layers.
        long = self._long_rope(config)
        self.ropes = [rope_inv_freq(config, long=long)]
        if config.rope_local_theta is not None:
            self.ropes.append(rope_inv_freq(config, config.rope_local_theta, scaling=None))
        self.ropes = [(inv_freq.to(device), factor) for inv_freq, factor in self.ropes]
        self.scale = config.attention_scale
        self.decode_plan: cpu_decode.DecodePlan | None = None
        if torch.device(device).type == "cpu":
            self._streamed_weights_into_huge_pages()
            self.decode_plan = self._decode_plan()

    @staticmethod
    def _long_rope(config: ModelConfig) -> bool:
        """Whether longrope takes its long factors: where the model serves contexts past its
        original length (llama.cpp's rule: fixed for the engine's context, so a sequence's
        keys never change with its length; transformers switches per forward pass)."""
        scaling = config.rope_scaling or {}
        return (scaling.get("rope_type") == "longrope"
                and config.max_position_embeddings > scaling["original_max_position_embeddings"])

    def _norm_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """An RMS norm's weight as `rms_norm` takes it: Gemma's (1 + w), in float32."""
        if self.config.norm_unit_offset:
            return 1.0 + weight.float()
        return weight

    def _layer(self, w: dict, i: int) -> dict:
        """Layer i's weights, prepared, and its attention settings."""
        cfg, p = self.config, f"model.layers.{i}."
        qkv = self._fuse([w[p + f"self_attn.{n}_proj.weight"] for n in "qkv"])
        bias = None
        if p + "self_attn.q_proj.bias" in w:
            bias = torch.cat([w[p + f"self_attn.{n}_proj.bias"] for n in "qkv"])
        norm = self._norm_weight
        layer = dict(input_norm=norm(w[p + "input_layernorm.weight"]), qkv=self._weight(qkv), qkv_bias=bias,
                     o=self._weight(w[p + "self_attn.o_proj.weight"]), o_bias=w.get(p + "self_attn.o_proj.bias"),
                     q_norm=None, k_norm=None, attn_out_norm=None, mlp_out_norm=None, gate_up=None, down=None,
                     moe=None, window=cfg.layer_window(i), rope=cfg.layer_rope(i))
        if cfg.qk_norm:
            layer.update(q_norm=norm(w[p + "self_attn.q_norm.weight"]), k_norm=norm(w[p + "self_attn.k_norm.weight"]))
        if cfg.sandwich_norms:  # Gemma 3: post_attention_layernorm is the attention output's norm
            layer.update(attn_out_norm=norm(w[p + "post_attention_layernorm.weight"]),
                         post_norm=norm(w[p + "pre_feedforward_layernorm.weight"]),
                         mlp_out_norm=norm(w[p + "post_feedforward_layernorm.weight"]))
        else:
            layer["post_norm"] = norm(w[p + "post_attention_layernorm.weight"])
        if cfg.is_moe_layer(i):
            def dense(name: str) -> torch.Tensor:
                t = w[name]
                return self._tensor(t.dequantize()) if isinstance(t, QUANTIZED) else t

            experts = range(cfg.num_experts)
            layer["moe"] = dict(
                router=dense(p + "mlp.gate.weight"),
                gate_up=torch.stack([torch.cat([dense(f"{p}mlp.experts.{e}.gate_proj.weight"),
                                                dense(f"{p}mlp.experts.{e}.up_proj.weight")]) for e in experts]),
                down=torch.stack([dense(f"{p}mlp.experts.{e}.down_proj.weight") for e in experts]))
        else:
            layer.update(gate_up=self._weight(self._fuse([w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"]])),
                         down=self._weight(w[p + "mlp.down_proj.weight"]))
        return layer

    def _streamed_weights_into_huge_pages(self) -> None:
        """The weights a decode step reads in plain layouts (F.linear's, the 4-bit kernel's, the
        embedding) moved into huge pages (runtime.models.huge_pages). oneDNN's packed weights
        are opaque to torch and stay where oneDNN put them."""
        def plain(w) -> torch.Tensor | None:
            if isinstance(w, DualWeight):
                return w.plain
            if isinstance(w, Int4Linear) and isinstance(w.packed, (cpu_ops.PackedInt4, cpu_ops.PackedQ8)):
                return w.packed.data
            return w if isinstance(w, torch.Tensor) and w.layout == torch.strided else None

        matrices = ("qkv", "o", "gate_up", "down")
        weights = [self.embed, self.lm_head] + [layer[k] for layer in self.layers for k in matrices]
        unique = list({id(t): t for t in map(plain, weights) if t is not None}.values())
        moved = {id(old): new for old, new in zip(unique, into_huge_pages(unique))}

        def rehomed(w):
            t = plain(w)
            if t is None:
                return w
            if isinstance(w, DualWeight):
                return DualWeight(w.packed, moved[id(t)])
            if isinstance(w, Int4Linear):
                w.packed = dataclasses.replace(w.packed, data=moved[id(t)])
                return w
            return moved[id(t)]

        self.embed, self.lm_head = rehomed(self.embed), rehomed(self.lm_head)
        for layer in self.layers:
            for k in matrices:
                layer[k] = rehomed(layer[k])

    def _decode_plan(self) -> cpu_decode.DecodePlan | None:
        """The layers for pagedkv/kernels/cpu/cpu_decode.c, which runs a small decode batch's loop in one
        call; None where it cannot (biases, tensor parallelism, weights other than the few-row
        layouts `linear` picks below, a head size the attention kernel does not take, experts,
        partial rotary or longrope, NoPE layers, or Gemma's float32 norms in a bfloat16 model).
        Qwen3's and Gemma 3's q/k norms, Gemma's norms around the attention and the MLP, GELU
        and Gemma 3's local rotary table run there too."""
        def native(w) -> cpu_decode.NativeLinear | None:
            if isinstance(w, DualWeight) and w.plain.dtype in (torch.float32, torch.bfloat16):
                kind = "float32" if w.plain.dtype == torch.float32 else "bfloat16"
                return cpu_decode.NativeLinear(kind, w.plain, *w.plain.shape)
            if isinstance(w, BlockLinear):
                return cpu_decode.NativeLinear("q6k", w.packed, w.out_features, w.in_features)
            if isinstance(w, Int4Linear) and isinstance(w.packed, cpu_ops.PackedInt4):
                return cpu_decode.NativeLinear("int4", w.packed.data, *w.packed.shape, half=w.packed.half)
            if isinstance(w, Int4Linear) and isinstance(w.packed, cpu_ops.PackedQ8):
                return cpu_decode.NativeLinear("q8", w.packed.data, *w.packed.shape)
            return None

        cfg = self.config
        if (self.tp.world_size != 1 or cpu_ops.library() is None or not cpu_ops.paged_attention_supports(cfg.head_dim)
                or cfg.rotary_dim != cfg.head_dim or self.ropes[0][1] != 1.0
                or (cfg.norm_unit_offset and self.dtype != torch.float32)
                or any(layer[k] is not None for layer in self.layers for k in ("qkv_bias", "o_bias", "moe"))
                or any(layer["rope"] < 0 for layer in self.layers)):
            return None
        layers = []
        for i, layer in enumerate(self.layers):
            matrices = [native(layer[k]) for k in ("qkv", "o", "gate_up", "down")]
            if None in matrices:
                return None
            following = self.layers[i + 1]["input_norm"] if i + 1 < len(self.layers) else self.norm
            layers.append(cpu_decode.NativeLayer(*matrices, post_norm=layer["post_norm"], next_norm=following,
                                                 window=layer["window"], rope=layer["rope"], q_norm=layer["q_norm"],
                                                 k_norm=layer["k_norm"], attn_out_norm=layer["attn_out_norm"],
                                                 mlp_out_norm=layer["mlp_out_norm"]))
        return cpu_decode.decode_plan(layers, self.dtype, float32_rows=self.small_rows,
                                      gelu=cfg.hidden_act == "gelu_tanh", blas=not self.own_f32)

    def _tensor(self, weight: torch.Tensor | GroupQuantized | BlockQuantized
                ) -> torch.Tensor | GroupQuantized | BlockQuantized:
        """On the device in the dtype; a quantized matrix stays so where it will run quantized."""
        if isinstance(weight, QUANTIZED):
            if self.keep_quantized and int4_supported(weight):
                return weight
            weight = weight.dequantize()
        return weight.to(device=self.device, dtype=self.dtype)

    def _fuse(self, parts: list[torch.Tensor | GroupQuantized]) -> torch.Tensor | GroupQuantized:
        """Matrices stacked along the output rows; quantized if all are, in one format."""
        if all(isinstance(p, GroupQuantized) for p in parts) and len({p.split8 for p in parts}) == 1:
            return GroupQuantized.cat(parts)
        if all(isinstance(p, BlockQuantized) for p in parts) and len({(p.fmt, p.columns) for p in parts}) == 1:
            return BlockQuantized.cat(parts)
        return torch.cat([p.dequantize().to(self.dtype) if isinstance(p, QUANTIZED) else p for p in parts])

    def _weight(self, weight: torch.Tensor | GroupQuantized) -> torch.Tensor | DualWeight | Int4Linear:
        if isinstance(weight, BlockQuantized):
            return BlockLinear(weight)
        if isinstance(weight, GroupQuantized):
            return Int4Linear(weight, eight_bit=self.dtype == torch.float32)
        if self.own_f32:
            return DualWeight(None, weight.contiguous())
        if self.linear_kind == "onednn":
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), _PACK_BATCH)
            # bfloat16's few-row loops take 32 columns at a time.
            dual = self.dual and (self.dtype == torch.float32 or weight.shape[1] % 32 == 0)
            return DualWeight(packed, weight.contiguous()) if dual else packed
        if self.linear_kind == "mm":
            return weight.t().contiguous()
        return weight

    def linear(self, x: torch.Tensor, weight: torch.Tensor | DualWeight | Int4Linear,
               bias: torch.Tensor | None = None) -> torch.Tensor:
        """x @ W^T (+ bias) for a weight prepared by `_weight`."""
        if isinstance(weight, Int4Linear):
            return weight(x, bias)
        if isinstance(weight, DualWeight):
            if weight.packed is None:
                return cpu_ops.f32_linear(x, weight.plain, bias)
            if x.shape[0] <= self.small_rows:
                if self.dtype == torch.bfloat16:
                    return cpu_ops.bf16_linear(x, weight.plain, bias)
                return F.linear(x, weight.plain, bias)
            weight = weight.packed
        if self.linear_kind == "onednn":
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
        if self.linear_kind == "mm":
            return torch.mm(x, weight) if bias is None else torch.addmm(bias, x, weight)
        return F.linear(x, weight, bias)

    def describe(self) -> str:
        """How the linear layers run, in words."""
        small = "pagedkv's AVX512-BF16 loops" if self.dtype == torch.bfloat16 else "F.linear"
        few = f" ({small} up to {self.small_rows} rows)" if self.dual else ""
        kinds = {"onednn": "pagedkv's AVX-512 loops at every size" if self.own_f32
                 else "oneDNN, weights prepacked" + few, "mm": "torch.mm on transposed weights", "linear": "F.linear"}
        dense = f"{str(self.dtype).removeprefix('torch.')} {kinds[self.linear_kind]}"
        quantized = [lin for lin in self.linear_weights() if isinstance(lin, Int4Linear)]
        if not quantized:
            return f"linear layers {dense}"
        formats = ", ".join(sorted({lin.fmt for lin in quantized}))
        if all(lin.kernel == "pagedkv" for lin in quantized):
            if self.dtype == torch.bfloat16 and cpu_ops.amx_supported():
                how = ("pagedkv's 4-bit AMX kernel (bfloat16 activations and weights, float32 sums, "
                       "batch-invariant rows)")
            elif self.dtype == torch.bfloat16 and cpu_ops.int4_bf16_supported():
                how = ("pagedkv's 4-bit AVX512-BF16 kernel (bfloat16 activations and weights, float32 sums, "
                       "batch-invariant rows)")
            elif any(isinstance(lin.packed, cpu_ops.PackedQ8) for lin in quantized):
                how = ("pagedkv's 4-bit and 8-bit CPU kernels (float32 activations, 8-bit codes whole, "
                       "batch-invariant rows)")
            else:
                how = "pagedkv's 4-bit CPU kernel (float32 activations, batch-invariant rows)"
        else:
            bf16 = "native" if cpu_has_bfloat16() else "emulated (no avx512_bf16/amx_bf16)"
            how = f"torch's int4 CPU kernel, bfloat16 activations (CPU bfloat16: {bf16})"
        return f"quantized linear layers ({formats}) by {how}, group size 32; other layers {dense}"

    def linear_weights(self) -> list:
        """The lm_head and every layer's matrices, as `linear` takes them."""
        return [self.lm_head] + [layer[k] for layer in self.layers for k in ("qkv", "o", "gate_up", "down")]

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """transformers' LlamaRMSNorm: normalise in float32, round to x's dtype, then scale.
        Gemma's (norm_unit_offset; `weight` is then 1 + w in float32): scale in float32, then
        round. Over x's last dimension (a row, or a head of q or k)."""
        eps = self.config.rms_norm_eps
        if x.device.type == "cpu":  # torch's fused norm: the same bits on the CPU in one pass, not five
            normed = F.rms_norm(x.float(), (x.shape[-1],), eps=eps)
        else:
            x32 = x.float()
            normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        if self.config.norm_unit_offset:
            return (normed * weight).to(x.dtype)
        return weight * normed.to(x.dtype)

    def rotary(self, positions: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """cos and sin [T, 1, rotary_dim] of each rotary embedding (self.ropes); sin's first
        half negated, for `apply_rotary`."""
        tables = []
        for inv_freq, factor in self.ropes:
            freqs = positions.float()[:, None] * inv_freq[None, :]
            cos, sin = freqs.cos(), freqs.sin()
            if factor != 1.0:  # longrope's attention factor (transformers scales cos and sin in float32)
                cos, sin = cos * factor, sin * factor
            tables.append((torch.cat([cos, cos], dim=-1).to(self.dtype)[:, None, :],
                           torch.cat([-sin, sin], dim=-1).to(self.dtype)[:, None, :]))
        return tables

    @staticmethod
    def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x * cos + rotate_half(x) * sin over x's first cos.shape[-1] dimensions (all of them, or
        Phi's partial rotary), rotate_half(x) = [-x2, x1]; the sign lives in `sin`."""
        rot = cos.shape[-1]
        if rot != x.shape[-1]:
            return torch.cat([LlamaModel.apply_rotary(x[..., :rot], cos, sin), x[..., rot:]], dim=-1)
        half = rot // 2
        swapped = torch.cat([x[..., half:], x[..., :half]], dim=-1)
        return (x * cos).add_(swapped.mul_(sin))

    def attention(self, q: torch.Tensor, kv_cache: torch.Tensor, layer: int, batch: ModelInput,
                  window: int = 0) -> torch.Tensor:
        p = batch.num_prefill_tokens
        parts = []
        if p:
            parts.append(kernels.paged_attention_prefill(
                q[:p], kv_cache, layer, batch.prefill_block_tables, batch.prefill_query_start_loc,
                batch.prefill_context_lens, self.scale, window))
        if p < q.shape[0]:
            parts.append(kernels.paged_attention_decode(
                q[p:], kv_cache, layer, batch.decode_block_tables, batch.decode_context_lens, self.scale, window))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    @torch.inference_mode()
    def forward(self, batch: ModelInput, kv_cache: torch.Tensor,
                started: Callable[[], None] | None = None) -> torch.Tensor:
        """Returns float32 logits [len(batch.logits_indices), vocab] (every token's when None;
        [rows, 0] on tensor-parallel ranks other than 0). `started` is called once the
        layers' work is under way: on the CPU as they begin (a thread that holds the GIL
        meanwhile would stall the Python between the kernels), on a GPU once they are queued."""
        cfg = self.config
        ropes = self.rotary(batch.positions)
        # On the CPU, the steps between the matrix products are C kernels: rotary embedding with
        # the cache write, residual add with the norm, SiLU with the product (pagedkv/kernels/cpu_ops).
        fused = cpu_ops.model_kernels_usable(self.dtype, kv_cache)
        h = self.tp.embedding(batch.token_ids, self.embed)
        if self.embed_scale is not None:
            h = h * self.embed_scale
        x = self.add_norm(h, None, self.layers[0]["input_norm"] if self.layers else self.norm, fused)
        on_cpu = torch.device(self.device).type == "cpu"
        if started is not None and on_cpu:
            started()
        if (fused and self.decode_plan is not None and batch.num_prefill_tokens == 0
                and self.decode_plan.takes(batch.token_ids.shape[0])):  # `layers` in one C call
            (cos, sin), local = ropes[0], ropes[-1]
            cpu_decode.decode_layers(self.decode_plan, h, x, cos[:, 0], sin[:, 0], kv_cache, batch.slot_mapping,
                                     batch.decode_block_tables, batch.decode_context_lens, self.num_heads,
                                     self.num_kv_heads, cfg.rms_norm_eps, self.scale, local[0][:, 0], local[1][:, 0])
        else:
            x = self.layers_forward(h, x, ropes, kv_cache, batch, fused)
        logits = self.logits(x, batch.logits_indices, batch.num_prompt_logits)
        if started is not None and not on_cpu:
            started()
        return logits

    def logits(self, x: torch.Tensor, indices: torch.Tensor | None, num_apart: int = 0) -> torch.Tensor:
        """Float32 logits of the rows of x that `indices` names (all when None); its last
        `num_apart` rows in a product of their own."""
        if indices is not None:
            x = x[indices]
        split = x.shape[0] - num_apart
        if num_apart and split:
            return torch.cat([self.logits(x[:split], None), self.logits(x[split:], None)])
        return self.tp.gather_logits(self.linear(x, self.lm_head).float(), self.config.vocab_size)

    def layers_forward(self, h: torch.Tensor, x: torch.Tensor, ropes: list[tuple[torch.Tensor, torch.Tensor]],
                       kv_cache: torch.Tensor, batch: ModelInput, fused: bool) -> torch.Tensor:
        """The decoder layers: h, the residual stream, is updated in place; x is layer 0's
        normalised input. `ropes`: `rotary`'s tables. Returns the final norm's output."""
        num_tokens = batch.token_ids.shape[0]
        hq, hkv, d = self.num_heads, self.num_kv_heads, self.config.head_dim
        q_size, kv_size = hq * d, hkv * d
        whole_rotary = self.config.rotary_dim == d
        for i, layer in enumerate(self.layers):
            qkv = self.linear(x, layer["qkv"], layer["qkv_bias"])
            if layer["q_norm"] is not None:  # each head of q and k normalised before the rotary embedding
                q = qkv[:, :q_size].view(num_tokens, hq, d)
                k = qkv[:, q_size:q_size + kv_size].view(num_tokens, hkv, d)
                q.copy_(self.normed(q, layer["q_norm"], fused))
                k.copy_(self.normed(k, layer["k_norm"], fused))
            rope = layer["rope"]
            if fused and rope >= 0 and whole_rotary:
                cos, sin = ropes[rope]
                cpu_ops.rotary_and_cache(qkv, cos[:, 0], sin[:, 0], kv_cache, i, batch.slot_mapping, hq, hkv)
                q = qkv[:, :q_size].view(num_tokens, hq, d)
            else:  # rotate the query and key heads together: they are adjacent in the fused output
                qk = qkv[:, :q_size + kv_size].view(num_tokens, hq + hkv, d)
                if rope >= 0:
                    qk = self.apply_rotary(qk, *ropes[rope])
                q, k = qk[:, :hq], qk[:, hq:]
                v = qkv[:, q_size + kv_size:].view(num_tokens, hkv, d)
                kernels.reshape_and_cache(k, v, kv_cache, i, batch.slot_mapping)
            attn = self.attention(q, kv_cache, i, batch, layer["window"]).reshape(num_tokens, q_size)
            out = self.tp.all_reduce(self.linear(attn, layer["o"]))
            if layer["o_bias"] is not None:  # once, after the ranks' partial sums meet
                out = out.add_(layer["o_bias"])
            if layer["attn_out_norm"] is not None:
                out = self.normed(out, layer["attn_out_norm"], fused)
            x = self.add_norm(h, out, layer["post_norm"], fused)
            if layer["moe"] is not None:
                x = self.experts(x, layer["moe"])
            else:
                x = self.linear(self.act_and_mul(self.linear(x, layer["gate_up"]), fused), layer["down"])
            x = self.tp.all_reduce(x)
            if layer["mlp_out_norm"] is not None:
                x = self.normed(x, layer["mlp_out_norm"], fused)
            following = self.layers[i + 1]["input_norm"] if i + 1 < len(self.layers) else self.norm
            x = self.add_norm(h, x, following, fused)
        return x

    def normed(self, x: torch.Tensor, weight: torch.Tensor, fused: bool) -> torch.Tensor:
        """The RMS norm of x's rows (or heads: [tokens, heads, head_dim]), by the CPU kernel that
        cpu_decode.c calls where `fused`, so that the one-call layers and this loop agree."""
        if fused and weight.dtype == x.dtype:
            shape = x.shape
            return cpu_ops.add_rms_norm(x.reshape(-1, shape[-1]).contiguous(), None, weight,
                                        self.config.rms_norm_eps).view(shape)
        return self.rms_norm(x, weight)

    def add_norm(self, h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, fused: bool) -> torch.Tensor:
        """The residual stream h += delta (in place; None adds nothing), then its RMS norm."""
        if fused and weight.dtype == h.dtype:  # (Gemma's float32 weights of a bfloat16 model take torch's)
            return cpu_ops.add_rms_norm(h, delta, weight, self.config.rms_norm_eps)
        if delta is not None:
            h.add_(delta)
        return self.rms_norm(h, weight)

    def act_and_mul(self, gate_up: torch.Tensor, fused: bool) -> torch.Tensor:
        """act(gate) * up for the fused [gate | up] rows of the MLP: SiLU, or GELU's tanh form."""
        if self.config.hidden_act == "gelu_tanh" and fused:
            return cpu_ops.silu_and_mul(gate_up, gelu=True)
        if self.config.hidden_act == "gelu_tanh":
            gate, up = gate_up.chunk(2, dim=-1)
            return F.gelu(gate, approximate="tanh").mul_(up)
        return self.silu_and_mul(gate_up, fused)

    @staticmethod
    def silu_and_mul(gate_up: torch.Tensor, fused: bool) -> torch.Tensor:
        """silu(gate) * up for the fused [gate | up] rows of the MLP."""
        if fused:
            return cpu_ops.silu_and_mul(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate).mul_(up)

    # A batch whose token-expert pairs are at most this many multiplies the gathered weights of
    # each pair at once (decode: each pair reads its expert's matrices once either way); larger
    # batches go expert by expert over the rows routed to it.
    _GATHER_PAIRS = 64

    def experts(self, x: torch.Tensor, moe: dict) -> torch.Tensor:
        """A mixture-of-experts MLP (Qwen3-MoE's): softmax over the router's logits in float32,
        each token's top-k experts (weights renormalised with norm_topk_prob), their SiLU MLPs
        summed with those weights. Batched matrix products, no loop over tokens: a small batch's
        (token, expert) pairs in one product of gathered weights, a larger one expert by expert."""
        cfg = self.config
        probs = torch.softmax(F.linear(x, moe["router"]), dim=1, dtype=torch.float)
        weights, chosen = torch.topk(probs, cfg.num_experts_per_tok, dim=-1)
        if cfg.norm_topk_prob:
            weights /= weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)
        tokens, k = chosen.shape
        out = torch.zeros_like(x)
        if tokens * k <= self._GATHER_PAIRS:
            flat = chosen.reshape(-1)
            rows = x.repeat_interleave(k, dim=0)[:, :, None]                     # [pairs, H, 1]
            gate_up = torch.bmm(moe["gate_up"][flat], rows)[..., 0]              # [pairs, 2I]
            act = self.silu_and_mul(gate_up, False)
            y = torch.bmm(moe["down"][flat], act[:, :, None])[..., 0]            # [pairs, H]
            y = y * weights.reshape(-1, 1)
            return out.index_add_(0, torch.arange(tokens, device=x.device).repeat_interleave(k), y)
        order = torch.argsort(chosen.reshape(-1), stable=True)
        counts = torch.bincount(chosen.reshape(-1), minlength=cfg.num_experts).tolist()
        token_of = order // k
        start = 0
        for expert, count in enumerate(counts):
            if not count:
                continue
            pairs = order[start:start + count]
            rows = token_of[start:start + count]
            start += count
            act = self.silu_and_mul(F.linear(x[rows], moe["gate_up"][expert]), False)
            y = F.linear(act, moe["down"][expert]) * weights.reshape(-1)[pairs, None]
            out.index_add_(0, rows, y)
        return out
