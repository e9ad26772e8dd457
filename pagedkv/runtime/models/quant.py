"""Weight-only quantized linear layers for the CPU, keeping a GGUF file's quantization.

GGUF's 4-bit formats store 32 weights per group as 4-bit codes with a scale and an offset
per group (Q4_0: w = d * (q - 8); Q4_1: w = d * q + m; Q4_K: w = d * sc * q - dmin * m per
32-weight sub-block). All of them are `scale * (q - 8) + zero` with group size 32, the form
torch's CPU kernel for int4 weight-only matmuls takes (`_weight_int4pack_mm_for_cpu`), so the
codes are kept as they are in the file. Q8_0 (w = d * q, q in -128..127) has no per-group
int8 kernel in torch (`_weight_int8pack_mm` scales whole output rows); its codes are split
into two 4-bit halves, q + 128 = 16 * hi + lo, that is w = 16d * (hi - 8) + (d * (lo - 8) + 8d),
and run through the same kernel over twice the input width: the file's codes and scales again.
(cpu_int4.c and cpu_amx.c join the halves back into the 8-bit code before multiplying: the
file's d * q exactly, one product per weight; cpu_vnni.c sums each half exactly in integers;
cpu_q8.c, which a float32 model's Q8_0 matrices take where AMX is missing, the whole codes.)

They run on pagedkv/kernels/cpu/cpu_vnni.c where the CPU has AVX512-VNNI (float32 activations as
signed bytes, each group of 32 scaled so that its largest is +-127 as llama.cpp's, in exact
integer sums with the file's codes, then float32 with the file's scales), else on
pagedkv/kernels/cpu/cpu_int4.c (float32 activations and arithmetic, the file's codes and scales
as they are), either way every row's result independent of its batch;
a bfloat16 model's on pagedkv/kernels/cpu/cpu_amx.c where the CPU has AMX, else by AVX512-BF16's dot products
(pagedkv/kernels/cpu/cpu_bf16.c; either way the weights a bfloat16 model dequantized from the file holds,
float32 sums, every row's result independent of its batch); or, where neither can be built, on torch's kernel, which is vectorised for bfloat16 activations only (float32 ones take
a scalar path, about 20x slower) and wants its scales in the activations' type: a quantized
layer then takes its input in bfloat16, with scales and offsets rounded to bfloat16, and gives
its output back in the caller's type.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from pagedkv.kernels.cpu import ops as cpu_ops

GROUP = 32  # weights per group: GGUF's block of Q4_0/Q4_1/Q8_0, Q4_K's sub-block
GROUP_FORMATS = ("Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q8_0")  # as GroupQuantized (Q5_0 as Q8_0's 8-bit codes)
BLOCK_FORMATS = ("Q6_K",)  # as BlockQuantized: the file's blocks, read in place by their own kernel
KEPT_FORMATS = GROUP_FORMATS + BLOCK_FORMATS


@dataclass
class GroupQuantized:
    """A [N, K] weight as 4-bit codes, groups of 32 along K: w = scale * (code - 8) + zero.
    `split8`: the codes hold 8-bit values as (high, low) halves, high halves in columns 0..K-1,
    low halves in K..2K-1."""

    codes: torch.Tensor   # uint8 [N, K or 2K], values 0..15
    scales: torch.Tensor  # float32 [N, codes columns / 32]
    zeros: torch.Tensor   # float32, like scales
    split8: bool
    fmt: str              # the GGUF format it came from

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape[0], self.codes.shape[1] // (2 if self.split8 else 1)

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [N, K]."""
        w = (self.codes.float() - 8) * self.scales.repeat_interleave(GROUP, 1)
        w += self.zeros.repeat_interleave(GROUP, 1)
        if self.split8:
            high, low = w.chunk(2, dim=1)
            w = high + low
        return w

    def rows(self, index: torch.Tensor | np.ndarray) -> GroupQuantized:
        index = torch.as_tensor(index, dtype=torch.long)
        return GroupQuantized(self.codes[index], self.scales[index], self.zeros[index], self.split8, self.fmt)

    @staticmethod
    def cat(parts: list[GroupQuantized]) -> GroupQuantized:
        """Stacked along the output rows (fused q/k/v, gate/up)."""
        if len({p.split8 for p in parts}) != 1 or len({p.shape[1] for p in parts}) != 1:
            raise ValueError("cannot fuse quantized weights of different formats or widths")
        return GroupQuantized(torch.cat([p.codes for p in parts]), torch.cat([p.scales for p in parts]),
                              torch.cat([p.zeros for p in parts]), parts[0].split8,
                              "+".join(dict.fromkeys(p.fmt for p in parts)))


@dataclass
class BlockQuantized:
    """A [N, K] weight in a GGUF block format kept as the file stores it (BLOCK_FORMATS:
    Q6_K's 16 weights per scale do not fit GroupQuantized's groups of 32): uint8 [N, bytes
    per row], rows contiguous."""

    data: torch.Tensor
    columns: int
    fmt: str

    @property
    def shape(self) -> tuple[int, int]:
        return self.data.shape[0], self.columns

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [N, K], as the gguf package dequantizes it."""
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        values = dequantize(self.data.numpy(), GGMLQuantizationType[self.fmt])
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32).reshape(self.shape))

    def rows(self, index: torch.Tensor | np.ndarray) -> BlockQuantized:
        return BlockQuantized(self.data[torch.as_tensor(index, dtype=torch.long)], self.columns, self.fmt)

    @staticmethod
    def cat(parts: list[BlockQuantized]) -> BlockQuantized:
        if len({(p.fmt, p.columns) for p in parts}) != 1:
            raise ValueError("cannot fuse block-quantized weights of different formats or widths")
        return BlockQuantized(torch.cat([p.data for p in parts]), parts[0].columns, parts[0].fmt)


QUANTIZED = (GroupQuantized, BlockQuantized)  # the kept-quantized weight types


def from_gguf_raw(data: np.ndarray, fmt: str, rows: int, cols: int) -> GroupQuantized | BlockQuantized:
    """The raw bytes of a GGUF tensor ([rows, cols] weights) in the form it is kept in."""
    if fmt in BLOCK_FORMATS:
        raw = np.ascontiguousarray(data).view(np.uint8).reshape(rows, -1)
        return BlockQuantized(torch.from_numpy(raw.copy()), cols, fmt)
    return from_gguf_blocks(data, fmt, rows, cols)


# -- from GGUF blocks -----------------------------------------------------------------------------

def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """The float16 at byte `at` of every block, as float32 [blocks, 1]."""
    return blocks[:, at:at + 2].copy().view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[blocks, 16] bytes -> [blocks, 32] codes: low nibbles are weights 0..15, high 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K's 6-bit scales and minimums of 8 sub-blocks, packed in 12 bytes -> two [blocks, 8]."""
    s = scales.astype(np.uint16)
    sc = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)], axis=1)
    mn = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
    return sc.astype(np.float32), mn.astype(np.float32)


def from_gguf_blocks(data: np.ndarray, fmt: str, rows: int, cols: int) -> GroupQuantized:
    """The raw bytes of a GGUF tensor ([rows, cols] weights, row-major) as a GroupQuantized."""
    if fmt not in GROUP_FORMATS or cols % GROUP:
        raise ValueError(f"cannot keep a {fmt} tensor of width {cols} quantized")
    raw = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
    if fmt == "Q4_0":  # d, 16 bytes of codes
        b = raw.reshape(-1, 18)
        d = _f16(b, 0)
        codes, scales, zeros = _nibbles(b[:, 2:]), d, np.zeros_like(d)
    elif fmt == "Q4_1":  # d, m, 16 bytes of codes: w = d * q + m
        b = raw.reshape(-1, 20)
        d, m = _f16(b, 0), _f16(b, 2)
        codes, scales, zeros = _nibbles(b[:, 4:]), d, m + 8 * d
    elif fmt == "Q4_K":  # 256 weights: d, dmin, 12 bytes of 6-bit scales/minimums, 128 bytes of codes
        b = raw.reshape(-1, 144)
        d, dmin = _f16(b, 0), _f16(b, 2)
        sc, mn = _k_scale_min(b[:, 4:16])
        qs = b[:, 16:].reshape(-1, 4, 32)  # 4 chunks of 64 weights: low nibbles first, then high
        codes = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(-1, 8, GROUP)
        scale = d * sc  # [blocks, 8]
        scales, zeros = scale.reshape(-1, 1), (8 * scale - dmin * mn).reshape(-1, 1)
        codes = codes.reshape(-1, GROUP)
    else:  # Q8_0: d, 32 signed bytes; Q5_0: d, 32 high bits, 16 bytes of low nibbles, w = d * (q - 16)
        if fmt == "Q5_0":  # as Q8_0's w = d * q with q = q5 - 16, in -16..15: the same values exactly
            b = raw.reshape(-1, 22)
            d = _f16(b, 0)
            high = b[:, 2:6].copy().view("<u4")  # [blocks, 1]: bit j is weight j's fifth bit
            bits = ((high >> np.arange(32, dtype=np.uint32)) & 1).astype(np.int16)
            q = (_nibbles(b[:, 6:]).astype(np.int16) | (bits << 4)) - 16 + 128
        else:
            b = raw.reshape(-1, 34)
            d = _f16(b, 0)
            q = b[:, 2:].view(np.int8).astype(np.int16) + 128
        hi, lo = (q >> 4).astype(np.uint8), (q & 0x0F).astype(np.uint8)
        groups = cols // GROUP
        codes = np.concatenate([hi.reshape(rows, groups * GROUP), lo.reshape(rows, groups * GROUP)], axis=1)
        scales = np.concatenate([16 * d.reshape(rows, groups), d.reshape(rows, groups)], axis=1)
        zeros = np.concatenate([np.zeros((rows, groups), np.float32), 8 * d.reshape(rows, groups)], axis=1)
        return GroupQuantized(torch.from_numpy(codes), torch.from_numpy(scales), torch.from_numpy(zeros),
                              True, fmt)
    groups = cols // GROUP
    return GroupQuantized(torch.from_numpy(np.ascontiguousarray(codes.reshape(rows, cols), dtype=np.uint8)),
                          torch.from_numpy(np.ascontiguousarray(scales.reshape(rows, groups))),
                          torch.from_numpy(np.ascontiguousarray(zeros.reshape(rows, groups))), False, fmt)


# -- the layer ------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def int4_cpu_available() -> bool:
    """Whether this torch build has the CPU int4 weight-only matmul, with the semantics used here."""
    rows = torch.arange(16, dtype=torch.float32)  # row n: scale n + 1, zero n
    try:
        codes = torch.arange(16, dtype=torch.int32).repeat(16, 2)  # [16, 32]: codes 0..15 twice
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        sz = torch.stack([rows + 1, rows], -1)[None].to(torch.bfloat16)  # [1 group, 16 rows, 2]
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(torch.ones(1, GROUP, dtype=torch.bfloat16), packed,
                                                          GROUP, sz)
    except Exception:  # an op missing from this torch build, or one that changed its signature
        return False
    return torch.equal(out.float()[0], (rows + 1) * 2 * sum(range(-8, 8)) + GROUP * rows)


def int4_supported(weight: GroupQuantized | BlockQuantized) -> bool:
    """Both 4-bit kernels take output rows by 16; block formats need pagedkv's CPU kernels."""
    if isinstance(weight, BlockQuantized):
        return cpu_ops.library() is not None and weight.columns % cpu_ops.Q6K_WEIGHTS == 0
    return weight.shape[0] % 16 == 0 and (cpu_ops.library() is not None or int4_cpu_available())


class Int4Linear:
    """x @ W^T for a GroupQuantized W. Where the CPU kernels build: float32 activations, each
    row's result independent of the rest of the batch (pagedkv/kernels/cpu/cpu_int4.c, float32-accurate,
    about twice as fast as torch's kernel from 16 rows on; pagedkv/kernels/cpu/cpu_vnni.c, where the CPU has
    AVX512-VNNI, activations as signed bytes in exact integer sums, 2 to 2.6 times cpu_int4.c's
    speed where AMX is missing; Q8_0's whole codes by pagedkv/kernels/cpu/cpu_q8.c there); bfloat16
    activations on AMX (pagedkv/kernels/cpu/cpu_amx.c), 3 to 4.5 times
    cpu_int4.c's speed from 32 rows on, or without AMX by AVX512-BF16 dot products
    (pagedkv/kernels/cpu/cpu_bf16.c, 1.1 to 1.2 times cpu_vnni.c's speed from 64 rows on, a quarter of it at
    one row). Else torch's int4 CPU kernel, whose vectorised path takes bfloat16 activations and
    bfloat16 scales."""

    def __init__(self, weight: GroupQuantized, kernel: str | None = None, eight_bit: bool = True) -> None:
        """kernel: "pagedkv" or "torch"; None takes pagedkv's where the CPU kernels build.
        eight_bit: Q8_0's (and Q5_0's) codes whole, through cpu_q8.c, where it runs and AMX is
        missing (a float32 model's; AMX's tile products outrun it from a few rows, and a
        bfloat16 model's kernels take the halves)."""
        self.out_features, self.in_features = weight.shape
        self.split8, self.fmt = weight.split8, weight.fmt
        self.kernel = kernel or ("pagedkv" if cpu_ops.library() is not None else "torch")
        if self.kernel == "pagedkv":
            eight = weight.split8 and eight_bit and cpu_ops.q8_supported() and not cpu_ops.amx_supported()
            self.packed = (eight and _packed_q8(weight)) or cpu_ops.pack_int4(weight.codes, weight.scales, weight.zeros)
            return
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(weight.codes.to(torch.int32), 1)
        # [groups, N, 2]: per group and output row, (scale, zero).
        self.scales_zeros = torch.stack([weight.scales, weight.zeros], -1).transpose(0, 1).contiguous()
        self.scales_zeros = self.scales_zeros.to(torch.bfloat16)

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.kernel == "pagedkv":
            if isinstance(self.packed, cpu_ops.PackedQ8):
                out = cpu_ops.q8_linear(x, self.packed)
            else:
                out = cpu_ops.int4_linear(x, self.packed, repeat_x=self.split8)
            return out if bias is None else out.add_(bias)
        xb = x.to(torch.bfloat16)
        if self.split8:
            xb = torch.cat([xb, xb], dim=1)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, self.packed, GROUP, self.scales_zeros).to(x.dtype)
        return out if bias is None else out.add_(bias)


def _packed_q8(weight: GroupQuantized) -> cpu_ops.PackedQ8 | None:
    """Q8_0's split halves joined again (q + 128 = 16 * high + low, d the low halves' scale) in
    cpu_q8.c's layout; None where the scales are not the file's float16 ones."""
    columns, groups = weight.shape[1], weight.shape[1] // GROUP
    codes = weight.codes[:, :columns].to(torch.int32) * 16 + weight.codes[:, columns:]
    d = weight.scales[:, groups:]
    if not torch.equal(d.half().float(), d) or not torch.equal(weight.scales[:, :groups], 16 * d):
        return None
    return cpu_ops.pack_q8(codes.to(torch.uint8), d.contiguous())


class BlockLinear(Int4Linear):
    """x @ W^T for a BlockQuantized W (Q6_K): pagedkv/kernels/cpu/cpu_q6k.c reads the file's
    blocks in place, float32 activations and sums, each row's result independent of the batch.
    An Int4Linear to the model: a quantized layer that is called the same way."""

    def __init__(self, weight: BlockQuantized) -> None:  # noqa: super().__init__ packs 4-bit codes
        self.out_features, self.in_features = weight.shape
        self.split8, self.fmt, self.kernel = False, weight.fmt, "pagedkv"
        self.packed = weight.data

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        out = cpu_ops.q6k_linear(x, self.packed, self.out_features, self.in_features)
        return out if bias is None else out.add_(bias)
