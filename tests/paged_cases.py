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


def poison_before_window(cache: torch.Tensor, tables: torch.Tensor, ctx_lens: list[int], q_lens: list[int],
                         window: int, out_of_range: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The cache with one more block, all NaN, and tables whose entries for blocks wholly before
    each sequence's earliest window (that of its first new token) name that block, or with
    `out_of_range` a block past the cache: a kernel that reads or checks such an entry is
    caught, as a freed block of a sliding-window layer must never be read."""
    block_size, num_blocks = cache.shape[3], cache.shape[0]
    nan_block = torch.full_like(cache[:1], float("nan"))
    cache = torch.cat([cache, nan_block])
    tables = tables.clone()
    for s, (ctx, q_len) in enumerate(zip(ctx_lens, q_lens)):
        first = max(0, ctx - q_len + 1 - window)
        tables[s, :first // block_size] = num_blocks + 1000 if out_of_range else num_blocks
    return cache, tables
