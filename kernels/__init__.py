"""Paged KV-cache kernels: one dispatch point for the engine.

Every function runs the CUDA implementation (kernels/*.cu through cupy, see cuda_ops) when
its tensors live on a CUDA device and cupy is importable, and the torch reference
(kernels/reference.py) otherwise. The KV cache of a pool is one contiguous tensor
[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim] (dim 2: 0 = K, 1 = V).
"""

from __future__ import annotations

import functools

import torch

from . import reference

__all__ = [
    "cuda_available",
    "reshape_and_cache",
    "paged_attention_decode",
    "paged_attention_prefill",
    "copy_blocks",
    "swap_blocks",
]


@functools.lru_cache(maxsize=None)
def cuda_available() -> bool:
    """True when a CUDA device is present and cupy can drive it."""
    if not torch.cuda.is_available():
        return False
    try:
        import cupy  # noqa: F401
    except Exception:  # ImportError, or a cupy build that does not match the driver
        return False
    return True


def _impl(*tensors: torch.Tensor):
    if any(t.is_cuda for t in tensors) and cuda_available():
        from . import cuda_ops

        return cuda_ops
    return reference


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    layer: int,
    slot_mapping: torch.Tensor,
) -> None:
    """Write key/value [T, Hkv, D] of token t into slot slot_mapping[t] (skipped if < 0)."""
    _impl(kv_cache).reshape_and_cache(key, value, kv_cache, layer, slot_mapping)


def paged_attention_decode(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    layer: int,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """query [B, Hq, D] attends to the first context_lens[b] tokens of its block table."""
    return _impl(kv_cache).paged_attention_decode(
        query, kv_cache, layer, block_tables, context_lens, scale
    )


def paged_attention_prefill(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    layer: int,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Causal attention of a ragged batch [T, Hq, D] whose K/V are already cached."""
    return _impl(kv_cache).paged_attention_prefill(
        query, kv_cache, layer, block_tables, query_start_loc, context_lens, scale
    )


def copy_blocks(kv_cache: torch.Tensor, src_dst: torch.Tensor) -> None:
    """Copy whole blocks (all layers, K and V): src_dst[i, 0] onto src_dst[i, 1]."""
    _impl(kv_cache).copy_blocks(kv_cache, src_dst)


def swap_blocks(src_cache: torch.Tensor, dst_cache: torch.Tensor, src_dst: torch.Tensor) -> None:
    """Block src_dst[i, 0] of src_cache goes to block src_dst[i, 1] of dst_cache, batched."""
    _impl(src_cache, dst_cache).swap_blocks(src_cache, dst_cache, src_dst)
