"""The physical KV cache: a device pool and a CPU swap pool, both block-major.

Layout [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]: one block's K and V
for every layer are one contiguous chunk, so swapping a set of blocks is one batched copy
and copy-on-write is one chunk copy per pair. The block manager plans; this carries it out.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from pagedkv import kernels

GIB = 1 << 30


@dataclass(frozen=True)
class CacheSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @property
    def block_shape(self) -> tuple[int, ...]:
        return (self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def bytes_per_block(self) -> int:
        n = self.num_layers * 2 * self.block_size * self.num_kv_heads * self.head_dim
        return n * torch.finfo(self.dtype).bits // 8

    def blocks_for_bytes(self, num_bytes: float) -> int:
        return int(num_bytes // self.bytes_per_block)


def _pin_memory() -> bool:
    return torch.cuda.is_available()


class CacheEngine:
    def __init__(self, spec: CacheSpec, num_device_blocks: int, num_cpu_blocks: int,
                 device: torch.device) -> None:
        self.spec = spec
        self.device = device
        # Zeros: attention reads whole blocks, and the torch path masks the slots past a
        # sequence's end by weight, which uninitialised NaNs would poison. The CPU pool only
        # ever receives whole copied blocks, so it can stay uninitialised (and uncommitted).
        self.device_cache = torch.zeros((num_device_blocks, *spec.block_shape), dtype=spec.dtype,
                                        device=device)
        self.cpu_cache = torch.empty((num_cpu_blocks, *spec.block_shape), dtype=spec.dtype,
                                     pin_memory=_pin_memory() and device.type == "cuda")
        self.bytes_swapped = 0
        self.swap_seconds = 0.0

    @property
    def num_device_blocks(self) -> int:
        return self.device_cache.shape[0]

    @property
    def num_cpu_blocks(self) -> int:
        return self.cpu_cache.shape[0]

    def _pairs(self, pairs: list[tuple[int, int]], device: torch.device) -> torch.Tensor:
        return torch.tensor(pairs, dtype=torch.int64, device=device).view(-1, 2)

    def _swap(self, src: torch.Tensor, dst: torch.Tensor, mapping: list[tuple[int, int]]) -> None:
        if not mapping:
            return
        start = time.perf_counter()
        on = self.device if self.device.type == "cuda" else torch.device("cpu")
        kernels.swap_blocks(src, dst, self._pairs(mapping, on))
        if self.device.type == "cuda":
            torch.cuda.current_stream().synchronize()
        self.swap_seconds += time.perf_counter() - start
        self.bytes_swapped += len(mapping) * self.spec.bytes_per_block

    def swap_out(self, mapping: list[tuple[int, int]]) -> None:
        """Device block -> CPU block, for each pair of the block manager's plan."""
        self._swap(self.device_cache, self.cpu_cache, mapping)

    def swap_in(self, mapping: list[tuple[int, int]]) -> None:
        """CPU block -> device block."""
        self._swap(self.cpu_cache, self.device_cache, mapping)

    def read_blocks(self, from_cpu_pool: bool, blocks: list[int]) -> list[bytes]:
        """Each block's bytes, every layer's K and V (the block-major layout keeps them together),
        in one gather and one transfer."""
        pool = self.cpu_cache if from_cpu_pool else self.device_cache
        index = torch.tensor(blocks, dtype=torch.int64, device=pool.device)
        data = pool.index_select(0, index).cpu().contiguous()
        raw = data.view(torch.uint8).reshape(len(blocks), -1).numpy()
        return [raw[i].tobytes() for i in range(len(blocks))]

    def write_blocks(self, blocks: list[int], payloads: list[bytes]) -> None:
        """Puts blocks' bytes (as `read_blocks` gives them) into device blocks, in one transfer."""
        if not blocks:
            return
        joined = torch.frombuffer(bytearray(b"".join(payloads)), dtype=torch.uint8)
        data = joined.view(self.spec.dtype).view(len(blocks), *self.spec.block_shape)
        index = torch.tensor(blocks, dtype=torch.int64, device=self.device)
        self.device_cache.index_copy_(0, index, data.to(self.device, non_blocking=False))

    def copy(self, pairs: list[tuple[int, int]]) -> None:
        """Copy-on-write: each (src, dst) device block."""
        if pairs:
            kernels.copy_blocks(self.device_cache, self._pairs(pairs, self.device_cache.device))

    @property
    def swap_bandwidth(self) -> float | None:
        """Measured bytes per second of swapping so far (None before the first swap)."""
        return self.bytes_swapped / self.swap_seconds if self.swap_seconds > 0 else None
