"""A pool of fixed-size physical blocks with reference counts, an O(1) free list, and the
prefix cache: full blocks indexed by content hash, kept (evictable) after their last user."""
from __future__ import annotations

import enum
from collections import OrderedDict
from typing import Callable, NamedTuple


class Device(enum.Enum):
    DEVICE = "device"  # the accelerator's pool (or the CPU's main pool when there is none)
    CPU = "cpu"        # the swap pool in (pinned) host memory


class BlockAllocatorError(RuntimeError):
    pass


class CachedBlock(NamedTuple):
    """What a cached block holds: its chained hash and, to rule out collisions, its token ids;
    and its parent's hash (the block before it in its prefix; b"" for a first block)."""

    block_hash: bytes
    token_ids: tuple[int, ...]
    parent: bytes = b""


class BlockAllocator:
    """Hands out block numbers 0..num_blocks-1.

    A block whose count drops to 0 is free again. If it is in the prefix cache it keeps its
    hash and contents on the evictable list (least recently freed first) and still counts as
    free: `allocate` takes never-used and uncached blocks first, and evicts only when none is left.
    """

    def __init__(self, device: Device, num_blocks: int,
                 on_evict: Callable[[int, CachedBlock], None] | None = None) -> None:
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        self.device = device
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        # Popping from the end hands out low block numbers first.
        self._free = list(range(num_blocks - 1, -1, -1))
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._by_hash: dict[bytes, int] = {}
        self.cached: dict[int, CachedBlock] = {}  # block -> contents (read-only outside)
        self.num_evicted = 0
        # Called with a cached block and what it held just before `allocate` hands it out for
        # other contents: the block manager demotes the contents to a lower tier there.
        self.on_evict = on_evict
        # Called with (True, block, contents) when a block enters the prefix cache and with
        # (False, block, contents) when it leaves it, however it leaves: the KV events and the
        # shared tier's write-through listen here.
        self.listeners: list[Callable[[bool, int, CachedBlock], None]] = []

    @property
    def num_free_blocks(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_evictable_blocks(self) -> int:
        return len(self._evictable)

    def allocate(self) -> int:
        if self._free:
            block = self._free.pop()
        elif self._evictable:
            block, _ = self._evictable.popitem(last=False)
            entry = self.cached[block]
            self._uncache(block)
            self.num_evicted += 1
            if self.on_evict is not None:
                self.on_evict(block, entry)
        else:
            raise BlockAllocatorError(f"out of {self.device.value} blocks ({self.num_blocks} in the pool)")
        self.ref_counts[block] = 1
        return block

    def incref(self, block: int) -> None:
        if self.ref_counts[block] <= 0:
            raise BlockAllocatorError(f"{self.device.value} block {block} is free; cannot share it")
        self.ref_counts[block] += 1

    def free(self, block: int, keep_cached: bool = True) -> bool:
        """Drops one reference; True if that was the last. With none left, a cached block
        becomes evictable (unless `keep_cached` is False, which drops its cache entry) and any
        other block is free."""
        count = self.ref_counts[block]
        if count <= 0:
            raise BlockAllocatorError(f"double free of {self.device.value} block {block}")
        self.ref_counts[block] = count - 1
        if count > 1:
            return False
        if not keep_cached:
            self._uncache(block)
        if block in self.cached:
            self._evictable[block] = None
        else:
            self._free.append(block)
        return True

    # -- prefix cache ----------------------------------------------------------------------------
    def lookup(self, block_hash: bytes, token_ids: tuple[int, ...]) -> int | None:
        """The cached block with this hash and these tokens, or None."""
        block = self._by_hash.get(block_hash)
        if block is None or self.cached[block].token_ids != token_ids:
            return None
        return block

    def acquire(self, block: int) -> None:
        """One more reference to a cached block (a hit), taking it off the evictable list."""
        if self.ref_counts[block] == 0:
            del self._evictable[block]
        self.ref_counts[block] += 1

    def cache(self, block: int, block_hash: bytes, token_ids: tuple[int, ...], parent: bytes = b"") -> None:
        """Indexes a full, in-use block by its contents. A block with the same contents that
        is cached already stays the one that hits; this one is then simply not cached."""
        if self.ref_counts[block] <= 0:
            raise BlockAllocatorError(f"{self.device.value} block {block} is free; cannot cache it")
        if block_hash not in self._by_hash and block not in self.cached:
            self._by_hash[block_hash] = block
            self.cached[block] = entry = CachedBlock(block_hash, token_ids, parent)
            for listener in self.listeners:
                listener(True, block, entry)

    def _uncache(self, block: int) -> None:
        entry = self.cached.pop(block, None)
        if entry is not None:
            del self._by_hash[entry.block_hash]
            for listener in self.listeners:
                listener(False, block, entry)

    def free_block_ids(self) -> set[int]:
        return set(self._free) | set(self._evictable)

    def evictable_block_ids(self) -> list[int]:
        """Evictable blocks, the next to be evicted first."""
        return list(self._evictable)

    def hash_table(self) -> dict[bytes, int]:
        return dict(self._by_hash)
