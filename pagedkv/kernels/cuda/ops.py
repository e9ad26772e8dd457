"""CUDA implementations: the sources in this folder, compiled at run time by cupy.RawModule
(one module per template instantiation, cached per process and device) and launched on
torch's current stream with the tensors' own pointers (no copies between torch and CuPy).

Each public function plans a `Launch` (kernel, grid, block, arguments) and hands it to
`_launcher`; the tests swap that for a CPU emulation of the same CUDA C sources.
cupy is imported lazily, so this module imports on machines without it.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from .. import reference

SOURCE_DIR = Path(__file__).resolve().parent
DTYPE_NAMES = {torch.float32: "float", torch.float16: "half_t", torch.bfloat16: "bf16_t"}
UNIT_NAMES = {16: "pk16", 8: "pk8", 4: "unsigned int", 2: "unsigned short"}
MMA_DTYPES = (torch.float16, torch.bfloat16)  # served by the tensor-core kernel on sm_80+
ATTN_THREADS = 128  # PAGEDKV_ATTN_THREADS in paged_attention.cu
PART_SIZE = 64  # shortest split-K partition, in keys
SPLIT_CTAS_PER_SM = 4  # split-K when the grid has fewer CTAs than this per SM
NO_SPLIT = 1 << 30  # part_size that puts every key in partition 0
MAX_HEAD_DIM = 256  # bounded by the kernel's shared memory


@dataclass(frozen=True)
class Launch:
    source: str  # file in SOURCE_DIR
    kernel: str  # template instantiation, e.g. "copy_chunks_kernel<pk16>"
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    args: tuple  # numpy scalars, in the kernel's parameter order


def _ptr(t: Optional[torch.Tensor]) -> np.uint64:
    return np.uint64(0 if t is None else t.data_ptr())


def _i32(x: int) -> np.int32:
    return np.int32(x)


def _i64(x: int) -> np.int64:
    return np.int64(x)


@functools.lru_cache(maxsize=None)
def source_text(name: str) -> str:
    """A source with its #include "common.cuh" inlined (NVRTC gets one string, and the
    cupy cache key then covers the shared header too)."""
    common = (SOURCE_DIR / "common.cuh").read_text()
    return (SOURCE_DIR / name).read_text().replace('#include "common.cuh"', common)


@functools.lru_cache(maxsize=None)
def _kernel(source: str, name: str, device_index: int):
    import cupy

    with cupy.cuda.Device(device_index):
        module = cupy.RawModule(
            code=source_text(source), options=("-std=c++17",), name_expressions=(name,)
        )
        return module.get_function(name)


def _cupy_launch(launch: Launch, device: torch.device) -> None:
    import cupy

    index = device.index if device.index is not None else torch.cuda.current_device()
    kernel = _kernel(launch.source, launch.kernel, index)
    stream = torch.cuda.current_stream(index).cuda_stream
    with cupy.cuda.Device(index), cupy.cuda.ExternalStream(stream, index):
        kernel(launch.grid, launch.block, launch.args)


_launcher: Callable[[Launch, torch.device], None] = _cupy_launch


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _device_pointer(t: torch.Tensor) -> Optional[int]:
    """Address a kernel can use for `t`: its own for GPU memory, the mapped address for
    pinned host memory (equal to the host one under unified addressing), else None."""
    if t.is_cuda:
        return t.data_ptr()
    if not t.is_pinned():
        return None
    import cupy

    return int(cupy.cuda.runtime.pointerGetAttributes(t.data_ptr()).devicePointer)


def _unit(*byte_values: int) -> int:
    """Widest copy unit (16, 8, 4, 2 bytes) dividing every address/stride/size given."""
    for unit in (16, 8, 4, 2):
        if all(v % unit == 0 for v in byte_values):
            return unit
    raise ValueError("kernel arguments are not even 2-byte aligned")


def _check_cache(kv_cache: torch.Tensor) -> None:
    if kv_cache.dim() != 6 or kv_cache.shape[2] != 2:
        raise ValueError(f"kv_cache must be [blocks, layers, 2, block_size, heads, dim], got {tuple(kv_cache.shape)}")
    if kv_cache.dtype not in DTYPE_NAMES or not kv_cache.is_contiguous():
        raise ValueError(f"kv_cache must be a contiguous {list(DTYPE_NAMES)} tensor")


def reshape_and_cache(key, value, kv_cache, layer: int, slot_mapping) -> None:
    _check_cache(kv_cache)
    num_tokens = key.shape[0]
    if num_tokens == 0:
        return
    key, value = (x.to(kv_cache.dtype) for x in (key, value))
    key, value = (x if x.stride(-1) == 1 else x.contiguous() for x in (key, value))
    slots = slot_mapping.to(device=kv_cache.device, dtype=torch.int64).contiguous()
    es = kv_cache.element_size()
    head_bytes = kv_cache.shape[5] * es
    strides = [s * es for s in (key.stride(0), key.stride(1), value.stride(0), value.stride(1))]
    unit = _unit(head_bytes, key.data_ptr(), value.data_ptr(), kv_cache.data_ptr(), *strides)
    args = (_ptr(key), _i64(strides[0]), _i64(strides[1]), _ptr(value), _i64(strides[2]), _i64(strides[3]),
            _ptr(kv_cache), _i64(kv_cache.stride(0) * es), _i64(layer * kv_cache.stride(1) * es),
            _i64(kv_cache.stride(2) * es), _ptr(slots), _i32(kv_cache.shape[3]), _i32(kv_cache.shape[4]),
            _i32(head_bytes))
    kernel = f"reshape_and_cache_kernel<{UNIT_NAMES[unit]}>"
    _launcher(Launch("cache_ops.cu", kernel, (num_tokens, 1, 1), (128, 1, 1), args), kv_cache.device)


def attention_config(head_dim: int, element_size: int, group: int) -> tuple[int, int, int]:
    """(lanes per key, max rows per CTA, query heads per CTA) for the scalar attention kernel.

    A key's head vector is split over LPT lanes so that each reads ~16 bytes; a CTA holds
    at most 32 // VEC rows (registers), and its heads must share one KV head."""
    lpt = min(32, 1 << max(0, math.ceil(math.log2(max(1, head_dim * element_size // 16)))))
    rows_max = max(1, min(8, 32 // (head_dim // lpt)))
    return lpt, rows_max, _heads_per_cta(group, rows_max)


def _heads_per_cta(group: int, rows: int) -> int:
    """The most query heads of one KV head's group (a divisor of it) that fit in `rows`."""
    return max(h for h in range(1, min(group, rows) + 1) if group % h == 0)


@dataclass(frozen=True)
class MmaConfig:
    """Tiling of paged_attention_mma_kernel: a WM x WN grid of warps, 16 rows per warp row."""
    wm: int  # warps along the rows (query tokens x heads)
    wn: int  # warps along the keys of a tile
    heads: int  # query heads per CTA (a divisor of the GQA group)
    q_tile: int  # query tokens per CTA
    block_n: int  # keys per K/V tile (two stages of K and V fill ~32 KiB of shared memory)


def mma_config(head_dim: int, group: int, decode: bool) -> MmaConfig:
    """Prefill: 4 warps stacked along 64 rows share every tile. Decode: one token per
    sequence, so the CTA's rows are its heads (at most 16) and its warps split the keys."""
    block_n = min(64, 16 << max(0, int(math.log2(max(1, 256 // head_dim)))))
    if decode:
        return MmaConfig(1, min(4, block_n // 16), _heads_per_cta(group, 16), 1, block_n)
    heads = _heads_per_cta(group, 64)
    return MmaConfig(4, 1, heads, 64 // heads, block_n)


@functools.lru_cache(maxsize=None)
def _mma_capable(device: torch.device) -> bool:
    """mma.m16n8k16 for fp16 and bf16, ldmatrix and cp.async need sm_80."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def _split_plan(split: Optional[bool], base_ctas: int, max_keys: int, device: torch.device) -> int:
    """Keys per split-K partition (NO_SPLIT for none). Automatic (None): split when the grid
    has fewer than SPLIT_CTAS_PER_SM CTAs per SM, into about as many partitions as make it
    up, no shorter than PART_SIZE keys; True: partitions of PART_SIZE keys."""
    if split is False:
        return NO_SPLIT
    part = PART_SIZE
    if split is None:
        target = SPLIT_CTAS_PER_SM * _sm_count(device)
        if base_ctas >= target:
            return NO_SPLIT
        keys = -(-max_keys * base_ctas // target)  # ceil: the keys that make up `target` CTAs
        part = max(PART_SIZE, -(-keys // 16) * 16)
    return part if max_keys > part else NO_SPLIT


def _attention(query, kv_cache, layer, block_tables, query_start_loc, context_lens, scale, split, window=0):
    _check_cache(kv_cache)
    num_rows, num_q_heads, head_dim = query.shape
    _, _, _, block_size, num_kv_heads, cache_dim = kv_cache.shape
    if head_dim != cache_dim or head_dim % 32 or head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head_dim {head_dim} (cache {cache_dim}): must match and be a multiple of 32 up to {MAX_HEAD_DIM}")
    if num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads} query heads are not a multiple of {num_kv_heads} kv heads")
    if kv_cache.data_ptr() % 16:
        raise ValueError("kv_cache must be 16-byte aligned")
    device, out_dtype = kv_cache.device, query.dtype
    q = query.to(device=device, dtype=kv_cache.dtype)
    out = torch.empty(num_rows, num_q_heads, head_dim, dtype=kv_cache.dtype, device=device)
    if num_rows == 0:
        return out.to(out_dtype)
    tables = block_tables.to(device=device, dtype=torch.int32).contiguous()
    lens = context_lens.to(device=device, dtype=torch.int32).contiguous()
    qsl = None if query_start_loc is None else query_start_loc.to(device=device, dtype=torch.int32).contiguous()
    group = num_q_heads // num_kv_heads
    dtype_name = DTYPE_NAMES[kv_cache.dtype]
    if kv_cache.dtype in MMA_DTYPES and _mma_capable(device):
        cfg = mma_config(head_dim, group, qsl is None)
        # Q fragments are read as pairs of elements: 4-byte aligned rows.
        if q.stride(-1) != 1 or q.stride(0) % 2 or q.stride(1) % 2 or q.data_ptr() % 4:
            q = q.contiguous()
        heads, q_tile, threads = cfg.heads, cfg.q_tile, 32 * cfg.wm * cfg.wn
        source = "paged_attention_mma.cu"
        kernel = (f"paged_attention_mma_kernel<{dtype_name}, {head_dim}, {cfg.wm}, {cfg.wn}, {heads}, "
                  f"{q_tile}, {cfg.block_n}>")
    else:  # fp32, or a GPU without the sm_80 tensor-core instructions
        q = q if q.stride(-1) == 1 else q.contiguous()
        lpt, rows_max, heads = attention_config(head_dim, kv_cache.element_size(), group)
        q_tile, threads = (1 if qsl is None else rows_max // heads), ATTN_THREADS
        source = "paged_attention.cu"
        kernel = f"paged_attention_kernel<{dtype_name}, {head_dim}, {lpt}, {q_tile * heads}, {heads}>"
    num_tiles, head_groups = -(-num_rows // q_tile), num_q_heads // heads
    # The table width bounds every context without a device->host sync.
    max_keys = tables.shape[1] * block_size
    part_size = _split_plan(split, num_tiles * head_groups, max_keys, device)
    parts = 1 if part_size == NO_SPLIT else -(-max_keys // part_size)
    part_acc = part_ml = None
    if parts > 1:
        part_acc = torch.empty(num_rows, num_q_heads, parts, head_dim, dtype=torch.float32, device=device)
        part_ml = torch.empty(num_rows, num_q_heads, parts, 2, dtype=torch.float32, device=device)
    num_seqs = lens.shape[0]
    args = (_ptr(out), _ptr(part_acc), _ptr(part_ml), _ptr(q), _i64(q.stride(0)), _i64(q.stride(1)),
            _ptr(kv_cache), _i64(kv_cache.stride(0)), _i64(layer * kv_cache.stride(1)), _i64(kv_cache.stride(2)),
            _i32(block_size), _i32(num_kv_heads), _ptr(tables), _i64(tables.stride(0)), _ptr(qsl), _ptr(lens),
            _i32(num_rows), _i32(num_seqs), _i32(num_q_heads), _i32(part_size),
            np.float32(scale * math.log2(math.e)), _i32(max(int(window), 0)))
    _launcher(Launch(source, kernel, (num_tiles, head_groups, parts), (threads, 1, 1), args), device)
    if parts > 1:
        args = (_ptr(out), _ptr(part_acc), _ptr(part_ml), _ptr(qsl), _ptr(lens), _i32(num_seqs),
                _i32(num_q_heads), _i32(head_dim), _i32(parts), _i32(part_size))
        kernel = f"paged_attention_reduce<{dtype_name}>"
        _launcher(Launch("paged_attention.cu", kernel, (num_rows, num_q_heads, 1), (128, 1, 1), args), device)
    return out.to(out_dtype)


def paged_attention_decode(query, kv_cache, layer: int, block_tables, context_lens, scale: float,
                           window: int = 0, split: Optional[bool] = None) -> torch.Tensor:
    """`split` forces (True: partitions of PART_SIZE keys) or forbids (False) split-K; None
    chooses by grid size. The kernel trusts its inputs: context_lens[b] <= block_tables.shape[1] * block_size."""
    return _attention(query, kv_cache, layer, block_tables, None, context_lens, scale, split, window)


def paged_attention_prefill(query, kv_cache, layer: int, block_tables, query_start_loc, context_lens,
                            scale: float, window: int = 0, split: Optional[bool] = None) -> torch.Tensor:
    return _attention(query, kv_cache, layer, block_tables, query_start_loc, context_lens, scale, split, window)


def _copy_chunks(src: torch.Tensor, dst: torch.Tensor, src_ptr: int, dst_ptr: int, src_dst, device) -> None:
    if src_dst.numel() == 0:
        return
    pairs = src_dst.to(device=device, dtype=torch.int64).contiguous()
    chunk_bytes = src[0].numel() * src.element_size()
    unit = _unit(chunk_bytes, src_ptr, dst_ptr)
    units = chunk_bytes // unit
    per_pair = min(1024, max(1, -(-units // (256 * 4))))  # CTAs per chunk: 4 units per thread
    args = (np.uint64(src_ptr), np.uint64(dst_ptr), _ptr(pairs), _i64(units))
    kernel = f"copy_chunks_kernel<{UNIT_NAMES[unit]}>"
    _launcher(Launch("cache_ops.cu", kernel, (pairs.shape[0], per_pair, 1), (256, 1, 1), args), device)


def copy_blocks(kv_cache: torch.Tensor, src_dst: torch.Tensor) -> None:
    _check_cache(kv_cache)
    ptr = kv_cache.data_ptr()
    _copy_chunks(kv_cache, kv_cache, ptr, ptr, src_dst, kv_cache.device)


def swap_blocks(src_cache: torch.Tensor, dst_cache: torch.Tensor, src_dst: torch.Tensor) -> None:
    """One kernel moves every listed block, reading or writing pinned host memory directly
    (see copy_chunks_kernel for why). Asynchronous on the current stream: synchronise
    before the host reads a pool this wrote. Pageable host memory, or two different GPUs,
    take the reference path (gather into staging, one transfer, one scatter)."""
    _check_cache(src_cache)
    _check_cache(dst_cache)
    if src_cache.shape[1:] != dst_cache.shape[1:] or src_cache.dtype != dst_cache.dtype:
        raise ValueError(f"swap between incompatible pools {tuple(src_cache.shape)} and {tuple(dst_cache.shape)}")
    src_ptr, dst_ptr = _device_pointer(src_cache), _device_pointer(dst_cache)
    both_gpu = src_cache.is_cuda and dst_cache.is_cuda
    if src_ptr is None or dst_ptr is None or (both_gpu and src_cache.device != dst_cache.device):
        reference.swap_blocks(src_cache, dst_cache, src_dst)
        return
    device = dst_cache.device if dst_cache.is_cuda else src_cache.device
    _copy_chunks(src_cache, dst_cache, src_ptr, dst_ptr, src_dst, device)
