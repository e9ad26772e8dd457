"""A pool of fixed-size physical blocks with reference counts and an O(1) free list."""
from __future__ import annotations

import enum


class Device(enum.Enum):
    DEVICE = "device"  # the accelerator's pool (or the CPU's main pool when there is none)
    CPU = "cpu"        # the swap pool in (pinned) host memory


class BlockAllocatorError(RuntimeError):
    pass


class BlockAllocator:
    """Hands out block numbers 0..num_blocks-1; a block is free again when its count drops to 0."""

    def __init__(self, device: Device, num_blocks: int) -> None:
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        self.device = device
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        # Popping from the end hands out low block numbers first.
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise BlockAllocatorError(f"out of {self.device.value} blocks ({self.num_blocks} in the pool)")
        block = self._free.pop()
        self.ref_counts[block] = 1
        return block

    def incref(self, block: int) -> None:
        if self.ref_counts[block] <= 0:
            raise BlockAllocatorError(f"{self.device.value} block {block} is free; cannot share it")
        self.ref_counts[block] += 1

    def free(self, block: int) -> None:
        """Drops one reference; the block returns to the free list when none is left."""
        count = self.ref_counts[block]
        if count <= 0:
            raise BlockAllocatorError(f"double free of {self.device.value} block {block}")
        self.ref_counts[block] = count - 1
        if count == 1:
            self._free.append(block)

    def free_block_ids(self) -> set[int]:
        return set(self._free)
