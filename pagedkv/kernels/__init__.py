"""Paged KV-cache kernels: one dispatch point for the engine.

Every function runs the CUDA implementation (pagedkv/kernels/cuda/*.cu through cupy, see cuda_ops) when
its tensors live on a CUDA device and cupy is importable; on the CPU, the attention (decode and
prompts) and the cache write run pagedkv/kernels/cpu/cpu_kernels.c (see cpu_ops, which also holds the CPU
model's own kernels) and the rest the torch reference (pagedkv/kernels/reference.py), which is also every
kernel's fallback and test oracle. The KV cache of a pool is one contiguous tensor
[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim] (dim 2: 0 = K, 1 = V).
"""

from __future__ import annotations

import functools

import torch

from . import reference
from .cpu import ops as cpu_ops

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


def _dispatched(name: str):
    """The kernel `name`: CUDA when any tensor argument is on a CUDA device, else the CPU
    kernel where there is one, else the reference. Signature and docstring are the reference's,
    which the other implementations mirror."""
    ref = getattr(reference, name)
    on_cpu = getattr(cpu_ops, name, ref)

    @functools.wraps(ref)
    def run(*args, **kwargs):
        on_cuda = any(isinstance(a, torch.Tensor) and a.is_cuda for a in (*args, *kwargs.values()))
        if on_cuda and cuda_available():
            from .cuda import ops as cuda_ops

            return getattr(cuda_ops, name)(*args, **kwargs)
        return on_cpu(*args, **kwargs)

    return run


reshape_and_cache = _dispatched("reshape_and_cache")
paged_attention_decode = _dispatched("paged_attention_decode")
paged_attention_prefill = _dispatched("paged_attention_prefill")
copy_blocks = _dispatched("copy_blocks")
swap_blocks = _dispatched("swap_blocks")
