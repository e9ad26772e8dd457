"""Random paged KV caches and block tables, shared by the kernel tests."""
from __future__ import annotations

import math

import torch


def random_paged_cache(ctx_lens: list[int], block_size: int, hkv: int, head_dim: int, dtype: torch.dtype,
                       layers: int = 2, seed: int = 0, device: str = "cpu"):
    """A random cache with a few spare blocks, and disjoint random block tables padded with -1.
    Returns (cache, tables, generator) with cache and tables on `device` (the cache drawn
    there: long contexts would be slow to draw on the host) and a CPU generator."""
    g = torch.Generator().manual_seed(seed)
    need = [math.ceil(c / block_size) for c in ctx_lens]
    num_blocks = sum(need) + 3
    shape = (num_blocks, layers, 2, block_size, hkv, head_dim)
    if torch.device(device).type == "cpu":
        cache = torch.randn(shape, generator=g).to(dtype)
    else:
        cache = torch.randn(shape, generator=torch.Generator(device).manual_seed(seed), device=device).to(dtype)
    perm = torch.randperm(num_blocks, generator=g)
    tables = torch.full((len(ctx_lens), max(need) + 1), -1, dtype=torch.int32)
    at = 0
    for s, n in enumerate(need):
        tables[s, :n] = perm[at: at + n].int()
        at += n
    return cache, tables.to(device), g


def assert_close(got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape and got.device == want.device
    err = (got.float() - want.float()).abs().max().item()
    assert err <= tol, f"max abs error {err} > {tol}"
