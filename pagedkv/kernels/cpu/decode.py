"""A decode batch's decoder layers in one call of pagedkv/kernels/cpu/cpu_decode.c.

The model describes its layers once (`DecodePlan`: where each weight lives and how it
multiplies); each decode step of the sizes it takes then runs every layer in C with
the kernels and matrix products the model's Python loop calls, so the outputs are the loop's,
bit for bit. Float32 matrices go through the BLAS `sgemm_` that torch's F.linear calls for few
rows, found in torch's own library and checked against F.linear before use, or where the model
multiplies them by pagedkv/kernels/cpu/cpu_f32.c instead (`cpu_ops.f32_linear_preferred`), through that.
"""
from __future__ import annotations

import ctypes
import functools
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import ops as cpu_ops

__all__ = ["DECODE_ROWS", "NativeLinear", "NativeLayer", "DecodePlan", "decode_plan", "decode_layers",
           "sgemm_matches_linear"]

DECODE_ROWS = cpu_ops.BF16_LINEAR_ROWS  # the most sequences a step may hold: bf16_linear's rows
KINDS = {"float32": 0, "int4": 1, "bfloat16": 2, "q6k": 3, "int4 dots": 4, "q8": 5}  # LINEAR_* of cpu_decode.c

i32, i64, ptr, f32 = ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p, ctypes.c_float


class _Linear(ctypes.Structure):
    _fields_ = [("kind", i32), ("half", i32), ("data", ptr), ("n", i64), ("columns", i64)]


class _Layer(ctypes.Structure):
    _fields_ = [("qkv", _Linear), ("o", _Linear), ("gate_up", _Linear), ("down", _Linear),
                ("post_norm", ptr), ("next_norm", ptr), ("window", i32), ("rope", i32), ("q_norm", ptr),
                ("k_norm", ptr), ("attn_out_norm", ptr), ("mlp_out_norm", ptr)]


class _DecodeStep(ctypes.Structure):
    _fields_ = [("rows", i64), ("hidden", i32), ("num_heads", i32), ("num_kv_heads", i32), ("head_dim", i32),
                ("intermediate", i32), ("bf16", i32), ("eps", f32), ("scale", f32), ("num_threads", i32),
                ("cos", ptr), ("sin", ptr), ("cache", ptr), ("cache_bf16", i32), ("num_layers", i32),
                ("block_size", i32), ("num_blocks", i64), ("slots", ptr), ("block_tables", ptr),
                ("table_stride", i64), ("table_width", i64), ("context_lens", ptr), ("sgemm", ptr),
                ("qkv", ptr), ("attn", ptr), ("gate_up", ptr), ("act", ptr), ("delta", ptr),
                ("cos_local", ptr), ("sin_local", ptr), ("gelu", i32)]


@dataclass(frozen=True)
class NativeLinear:
    """A weight as cpu_decode.c multiplies it: "float32" or "bfloat16" ([n, columns], contiguous),
    "int4" (cpu_ops.PackedInt4's data; `columns` counts Q8_0's split codes twice), "q8"
    (cpu_ops.PackedQ8's data, cpu_q8.c) or "q6k" (GGUF's Q6_K blocks, cpu_q6k.c)."""
    kind: str
    data: torch.Tensor
    n: int
    columns: int
    half: bool = False


@dataclass(frozen=True)
class NativeLayer:
    qkv: NativeLinear
    o: NativeLinear
    gate_up: NativeLinear
    down: NativeLinear
    post_norm: torch.Tensor  # the post-attention norm's weight
    next_norm: torch.Tensor  # the next layer's input norm weight, or the final norm's
    window: int = 0          # sliding-window attention over this many positions; 0: all
    rope: int = 0            # the rotary table: 0 the model's, 1 the local one (decode_layers' cos_local)
    q_norm: torch.Tensor | None = None         # per-head norms of q and k (Qwen3, Gemma 3)
    k_norm: torch.Tensor | None = None
    attn_out_norm: torch.Tensor | None = None  # norms of the attention's and MLP's outputs (Gemma 3)
    mlp_out_norm: torch.Tensor | None = None


@dataclass(frozen=True)
class DecodePlan:
    """A model's layers for `decode_layers`; keeps the tensors the C structures point into."""
    layers: tuple[NativeLayer, ...]
    structs: ctypes.Array
    dtype: torch.dtype
    hidden: int
    intermediate: int
    max_rows: int | None  # the most sequences a step may hold; None: any number (4-bit layers only)
    gelu: bool = False    # the MLP's gate is GELU's tanh form
    blas: bool = True     # float32 matrices by sgemm_ (else by cpu_f32.c's f32_linear)

    def takes(self, rows: int) -> bool:
        return rows >= 1 and (self.max_rows is None or rows <= self.max_rows)


@functools.lru_cache(maxsize=None)
def _sgemm() -> int | None:
    """The address of the Fortran `sgemm_` in torch's CPU library, or None."""
    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        return ctypes.cast(lib.sgemm_, ctypes.c_void_p).value
    except (OSError, AttributeError):
        return None


def _sgemm_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight^T by `sgemm_` with the arguments cpu_decode.c passes."""
    fn = ctypes.CFUNCTYPE(None, *[ctypes.c_void_p] * 13)(_sgemm())
    n, k = weight.shape
    out = torch.empty((x.shape[0], n))
    ints = [ctypes.c_int(v) for v in (n, x.shape[0], k)]
    one, zero = ctypes.c_float(1.0), ctypes.c_float(0.0)
    ref = ctypes.byref
    fn(ctypes.c_char_p(b"T"), ctypes.c_char_p(b"N"), ref(ints[0]), ref(ints[1]), ref(ints[2]), ref(one),
       weight.data_ptr(), ref(ints[2]), x.data_ptr(), ref(ints[2]), ref(zero), out.data_ptr(), ref(ints[0]))
    return out


def sgemm_matches_linear(weight: torch.Tensor) -> bool:
    """Whether `sgemm_` gives F.linear's bits for 1 to DECODE_ROWS rows against this float32
    weight: both are torch's BLAS where it has one, but a build may route F.linear elsewhere."""
    if _sgemm() is None or weight.dtype != torch.float32 or not weight.is_contiguous():
        return False
    x = torch.randn(DECODE_ROWS, weight.shape[1], generator=torch.Generator().manual_seed(0))
    return all(torch.equal(_sgemm_linear(x[:m], weight), F.linear(x[:m], weight))
               for m in range(1, DECODE_ROWS + 1))


def _linear_struct(w: NativeLinear, dots: bool = False) -> _Linear:
    """`dots`: bfloat16 rows through 4-bit weights by cpu_bf16.c's dot products (no AMX)."""
    kind = "int4 dots" if dots and w.kind == "int4" else w.kind
    return _Linear(KINDS[kind], int(w.half), w.data.data_ptr(), w.n, w.columns)


def decode_plan(layers: list[NativeLayer], dtype: torch.dtype, float32_rows: int = DECODE_ROWS,
                gelu: bool = False, blas: bool = True) -> DecodePlan | None:
    """The plan for these layers, or None where cpu_decode.c cannot run them: no library, a
    weight kind the row type cannot take, or float32 weights without a BLAS that gives
    F.linear's bits (with `blas`; without it, float32 matrices take f32_linear, as the model's
    loop does). Steps hold up to `float32_rows` sequences where a float32 matrix is among
    them (the most rows the model gives F.linear or f32_linear rather than oneDNN), DECODE_ROWS
    where a bfloat16 one is (bf16_linear's most), and any number where all are 4-bit
    (cpu_int4.c's kernel, or in bfloat16 cpu_amx.c's, which the model uses at every size)."""
    if cpu_ops.library() is None or dtype not in cpu_ops.DTYPES or not layers:
        return None
    # 4-bit matrices: cpu_int4.c for float32 rows, cpu_amx.c for bfloat16 ones, or without AMX
    # cpu_bf16.c's dot products (as the model's loop picks them, cpu_ops.int4_linear).
    dots = dtype == torch.bfloat16 and not cpu_ops.amx_supported() and cpu_ops.int4_bf16_supported()
    bf16_int4 = {"int4"} if cpu_ops.amx_supported() or dots else set()
    allowed = {"bfloat16", *bf16_int4} if dtype == torch.bfloat16 else {"float32", "int4", "q6k", "q8"}
    checked: set[tuple[int, int]] = set()
    for layer in layers:
        for w in (layer.qkv, layer.o, layer.gate_up, layer.down):
            if w.kind not in allowed or (w.kind not in ("int4", "q6k", "q8") and not w.data.is_contiguous()):
                return None
            if w.kind == "bfloat16" and not cpu_ops.bf16_linear_supported():
                return None
            if w.kind == "float32" and blas and w.data.shape not in checked:
                if not sgemm_matches_linear(w.data):
                    return None
                checked.add(w.data.shape)
    def pointer(t: torch.Tensor | None) -> int | None:
        return None if t is None else t.data_ptr()

    structs = (_Layer * len(layers))(*[
        _Layer(_linear_struct(l.qkv, dots), _linear_struct(l.o, dots), _linear_struct(l.gate_up, dots),
               _linear_struct(l.down, dots), l.post_norm.data_ptr(), l.next_norm.data_ptr(), l.window, l.rope,
               pointer(l.q_norm), pointer(l.k_norm), pointer(l.attn_out_norm), pointer(l.mlp_out_norm))
        for l in layers])
    kinds = {w.kind for l in layers for w in (l.qkv, l.o, l.gate_up, l.down)}
    max_rows = float32_rows if "float32" in kinds else DECODE_ROWS if "bfloat16" in kinds else None
    return DecodePlan(tuple(layers), structs, dtype, layers[0].post_norm.numel(), layers[0].gate_up.n // 2,
                      max_rows, gelu, blas)


def decode_layers(plan: DecodePlan, h: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  kv_cache: torch.Tensor, slot_mapping: torch.Tensor, block_tables: torch.Tensor,
                  context_lens: torch.Tensor, num_heads: int, num_kv_heads: int, eps: float, scale: float,
                  cos_local: torch.Tensor | None = None, sin_local: torch.Tensor | None = None) -> None:
    """Runs the plan's layers on a decode batch of rows the plan takes, as the model's loop:
    h ([rows, hidden], the residual stream) is updated in place, and x (layer 0's normalised
    input) becomes the final norm's output. cos, sin: [rows, head_dim] in the row type; one
    slot, block table row and context length per row; cos_local, sin_local: the local layers'
    table (layers with rope 1), like cos and sin. The cache must suit the model's kernels
    (cpu_ops.model_kernels_usable) and its head size the attention kernel."""
    rows, hidden = h.shape
    num_blocks, num_layers, _, block_size, cache_heads, head_dim = kv_cache.shape
    slots = cpu_ops.int_array(slot_mapping.cpu(), torch.int64).contiguous()
    tables = cpu_ops.int_array(block_tables.cpu(), torch.int32)
    lens = cpu_ops.int_array(context_lens.cpu(), torch.int32).contiguous()
    if not (plan.takes(rows) and hidden == plan.hidden and h.dtype == x.dtype == cos.dtype == plan.dtype
            and h.is_contiguous() and x.is_contiguous() and x.shape == h.shape and cos.is_contiguous()
            and sin.is_contiguous() and cos.shape == sin.shape == (rows, head_dim) and cache_heads == num_kv_heads
            and num_layers >= len(plan.layers) and slots.numel() == lens.numel() == tables.shape[0] == rows
            and kv_cache.is_contiguous() and kv_cache.dtype in cpu_ops.DTYPES):
        raise ValueError(f"decode_layers: rows {tuple(h.shape)}/{tuple(x.shape)} {h.dtype}, cos/sin "
                         f"{tuple(cos.shape)}, {slots.numel()} slots, {lens.numel()} context lengths and "
                         f"{tables.shape[0]} block tables for a plan of width {plan.hidden} {plan.dtype} and a "
                         f"cache of {num_layers} layers, {cache_heads} KV heads of {head_dim}")
    widths = {"qkv": (num_heads + 2 * num_kv_heads) * head_dim, "attn": num_heads * head_dim,
              "gate_up": 2 * plan.intermediate, "act": plan.intermediate, "delta": hidden}
    buffers = torch.empty(rows * sum(widths.values()), dtype=h.dtype)
    at, pointers = 0, {}
    for name, width in widths.items():
        pointers[name] = buffers[at:].data_ptr()
        at += rows * width
    step = _DecodeStep(
        rows=rows, hidden=hidden, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        intermediate=plan.intermediate, bf16=cpu_ops.DTYPES[h.dtype], eps=eps, scale=scale,
        num_threads=torch.get_num_threads(), cos=cos.data_ptr(), sin=sin.data_ptr(), cache=kv_cache.data_ptr(),
        cache_bf16=cpu_ops.DTYPES[kv_cache.dtype], num_layers=num_layers, block_size=block_size,
        num_blocks=num_blocks, slots=slots.data_ptr(), block_tables=tables.data_ptr(), table_stride=tables.stride(0),
        table_width=tables.shape[1], context_lens=lens.data_ptr(), sgemm=_sgemm() if plan.blas else None,
        cos_local=(cos if cos_local is None else cos_local).data_ptr(),
        sin_local=(sin if sin_local is None else sin_local).data_ptr(), gelu=int(plan.gelu), **pointers)
    rc = cpu_ops.library().decode_layers(ctypes.byref(step), plan.structs, len(plan.layers), h.data_ptr(),
                                         x.data_ptr())
    cpu_ops.check_rc(rc, "decode_layers")
