"""The block manager: maps each sequence's logical blocks onto physical KV-cache blocks.

Semantics follow vLLM's block manager: a group's prompt is mapped once and shared by its
sequences (reference counts), `fork` shares a parent's blocks with a child, the block that
receives a new token is copied first when it is shared (copy-on-write), and a group is
swapped between the device pool and the bounded CPU pool as a whole, each shared block
moving once and staying shared. Pure Python: nothing heavier than the standard library.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

from kvcache.allocator import BlockAllocator, Device
from kvcache.sequence import Sequence, SequenceGroup


class AllocStatus(enum.Enum):
    OK = "ok"        # fits now, with the watermark kept back
    LATER = "later"  # fits once running sequences free blocks
    NEVER = "never"  # cannot fit even in an empty cache


class BlockManagerError(RuntimeError):
    pass


@dataclass
class _Table:
    seq: Sequence
    device: Device
    blocks: list[int]


@dataclass
class BlockStats:
    block_size: int
    device_blocks_total: int
    device_blocks_used: int
    cpu_blocks_total: int
    cpu_blocks_used: int
    slots_allocated: int       # slots in the device blocks in use
    slots_used: int            # of those, the slots that hold a token
    logical_blocks: int        # device blocks the sequences would need without sharing
    copy_on_write_copies: int
    blocks_swapped_out: int
    blocks_swapped_in: int

    @property
    def waste(self) -> float:
        """Internal fragmentation: allocated slots that hold no token."""
        return 1.0 - self.slots_used / self.slots_allocated if self.slots_allocated else 0.0

    @property
    def sharing_saved_blocks(self) -> int:
        return self.logical_blocks - self.device_blocks_used

    @property
    def sharing_saved(self) -> float:
        """Fraction of the blocks that sharing saves against one private copy per sequence."""
        return self.sharing_saved_blocks / self.logical_blocks if self.logical_blocks else 0.0


class BlockManager:
    def __init__(self, block_size: int, num_device_blocks: int, num_cpu_blocks: int,
                 watermark: float = 0.01) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if not 0.0 <= watermark < 1.0:
            raise ValueError(f"watermark must be in [0, 1), got {watermark}")
        self.block_size = block_size
        self.num_device_blocks = num_device_blocks
        self.num_cpu_blocks = num_cpu_blocks
        self.watermark_blocks = int(watermark * num_device_blocks)
        self.pools = {Device.DEVICE: BlockAllocator(Device.DEVICE, num_device_blocks),
                      Device.CPU: BlockAllocator(Device.CPU, num_cpu_blocks)}
        self._tables: dict[int, _Table] = {}
        self.cow_copies = 0
        self.blocks_swapped_out = 0
        self.blocks_swapped_in = 0

    # -- helpers -------------------------------------------------------------------------
    def _num_blocks(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _table(self, seq: Sequence, device: Device | None = None) -> _Table:
        table = self._tables.get(seq.seq_id)
        if table is None:
            raise BlockManagerError(f"sequence {seq.seq_id} has no blocks")
        if device is not None and table.device is not device:
            raise BlockManagerError(f"sequence {seq.seq_id} is in the {table.device.value} pool, "
                                    f"not the {device.value} pool")
        return table

    def _status(self, num_blocks: int) -> AllocStatus:
        if self.num_device_blocks - num_blocks < self.watermark_blocks:
            return AllocStatus.NEVER
        if self.pools[Device.DEVICE].num_free_blocks - num_blocks >= self.watermark_blocks:
            return AllocStatus.OK
        return AllocStatus.LATER

    def _shared_prefix_blocks(self, seqs: list[Sequence]) -> tuple[int, int]:
        """(blocks, tokens) at the head of every sequence that are stored once for all of them.

        Identical sequences (a fresh request) share every block, the partial last one too;
        sequences that diverged (a multi-sequence group being recomputed) share the full
        blocks of their common prefix, which holds at least the prompt's full blocks.
        """
        first = seqs[0].token_ids
        if all(s.token_ids == first for s in seqs[1:]):
            return self._num_blocks(len(first)), len(first)
        common = min(len(s) for s in seqs)
        for s in seqs[1:]:
            tokens = s.token_ids
            common = next((i for i in range(common) if tokens[i] != first[i]), common)
        return common // self.block_size, common // self.block_size * self.block_size

    def _unique_blocks(self, group: SequenceGroup, device: Device) -> list[int]:
        seen: dict[int, None] = {}
        for seq in group.unfinished_seqs():
            seen.update(dict.fromkeys(self._table(seq, device).blocks))
        return list(seen)

    # -- admission and allocation ---------------------------------------------------------
    def _blocks_to_allocate(self, seqs: list[Sequence]) -> int:
        shared, _ = self._shared_prefix_blocks(seqs)
        return shared + sum(self._num_blocks(len(s)) - shared for s in seqs)

    def can_allocate(self, group: SequenceGroup) -> AllocStatus:
        return self._status(self._blocks_to_allocate(group.unfinished_seqs()))

    def allocate(self, group: SequenceGroup) -> int:
        """Maps every unfinished sequence's tokens; returns how many leading tokens of each
        sit in blocks shared by the whole group (they need computing only once)."""
        seqs = group.unfinished_seqs()
        if not seqs:
            raise BlockManagerError(f"request {group.request_id} has no unfinished sequence")
        for seq in seqs:
            if seq.seq_id in self._tables:
                raise BlockManagerError(f"sequence {seq.seq_id} already has blocks")
        pool = self.pools[Device.DEVICE]
        need = self._blocks_to_allocate(seqs)
        if need > pool.num_free_blocks:
            raise BlockManagerError(f"request {group.request_id} needs {need} blocks, "
                                    f"{pool.num_free_blocks} are free")
        num_shared, shared_tokens = self._shared_prefix_blocks(seqs)
        shared = [pool.allocate() for _ in range(num_shared)]
        for block in shared:
            for _ in range(len(seqs) - 1):
                pool.incref(block)
        for seq in seqs:
            own = [pool.allocate() for _ in range(self._num_blocks(len(seq)) - num_shared)]
            self._tables[seq.seq_id] = _Table(seq, Device.DEVICE, shared + own)
        return shared_tokens

    # -- decoding ----------------------------------------------------------------------------
    def _blocks_to_append(self, table: _Table) -> int:
        num_tokens = len(table.seq.token_ids)
        missing = self._num_blocks(num_tokens) - len(table.blocks)
        if missing > 0:
            return missing
        last = table.blocks[(num_tokens - 1) // self.block_size]
        return 1 if self.pools[Device.DEVICE].ref_counts[last] > 1 else 0

    def can_append_slots(self, group: SequenceGroup) -> bool:
        need = sum(self._blocks_to_append(self._table(seq, Device.DEVICE))
                   for seq in group.unfinished_seqs())
        return need <= self.pools[Device.DEVICE].num_free_blocks

    def append_slots(self, seq: Sequence) -> list[tuple[int, int]]:
        """Makes room for the sequence's newest token. Returns the copy-on-write pairs
        (src, dst) that the executor must copy before the token is written."""
        table = self._table(seq, Device.DEVICE)
        blocks, pool = table.blocks, self.pools[Device.DEVICE]
        num_tokens = len(seq.token_ids)
        while len(blocks) * self.block_size < num_tokens:
            blocks.append(pool.allocate())
        index = (num_tokens - 1) // self.block_size
        last = blocks[index]
        if pool.ref_counts[last] == 1:
            return []
        fresh = pool.allocate()
        pool.free(last)  # one reference fewer; the other sequences keep the original
        blocks[index] = fresh
        self.cow_copies += 1
        return [(last, fresh)]

    def fork(self, parent: Sequence, child: Sequence) -> None:
        table = self._table(parent)
        if child.seq_id in self._tables:
            raise BlockManagerError(f"sequence {child.seq_id} already has blocks")
        pool = self.pools[table.device]
        for block in table.blocks:
            pool.incref(block)
        self._tables[child.seq_id] = _Table(child, table.device, list(table.blocks))

    def free(self, seq: Sequence) -> None:
        table = self._tables.pop(seq.seq_id, None)
        if table is None:
            raise BlockManagerError(f"sequence {seq.seq_id} has no blocks to free")
        pool = self.pools[table.device]
        for block in table.blocks:
            pool.free(block)

    # -- swapping ----------------------------------------------------------------------------
    def can_swap_out(self, group: SequenceGroup) -> bool:
        return len(self._unique_blocks(group, Device.DEVICE)) <= self.pools[Device.CPU].num_free_blocks

    def can_swap_in(self, group: SequenceGroup) -> AllocStatus:
        # Room for the blocks plus one new block per sequence, so that all can grow at once.
        return self._status(len(self._unique_blocks(group, Device.CPU)) + len(group.unfinished_seqs()))

    def swap_out(self, group: SequenceGroup) -> dict[int, int]:
        """Moves the group to the CPU pool; returns {device_block: cpu_block}."""
        if not self.can_swap_out(group):
            raise BlockManagerError(f"no room in the CPU pool to swap out request {group.request_id}")
        mapping = self._move(group, Device.DEVICE, Device.CPU)
        self.blocks_swapped_out += len(mapping)
        return mapping

    def swap_in(self, group: SequenceGroup) -> dict[int, int]:
        """Moves the group back to the device pool; returns {cpu_block: device_block}."""
        need = len(self._unique_blocks(group, Device.CPU))
        if need > self.pools[Device.DEVICE].num_free_blocks:
            raise BlockManagerError(f"request {group.request_id} needs {need} device blocks to swap in, "
                                    f"{self.pools[Device.DEVICE].num_free_blocks} are free")
        mapping = self._move(group, Device.CPU, Device.DEVICE)
        self.blocks_swapped_in += len(mapping)
        return mapping

    def _move(self, group: SequenceGroup, src: Device, dst: Device) -> dict[int, int]:
        src_pool, dst_pool = self.pools[src], self.pools[dst]
        mapping: dict[int, int] = {}
        for seq in group.unfinished_seqs():
            table = self._table(seq, src)
            moved = []
            for block in table.blocks:
                target = mapping.get(block)
                if target is None:
                    target = mapping[block] = dst_pool.allocate()
                else:
                    dst_pool.incref(target)
                src_pool.free(block)
                moved.append(target)
            table.blocks, table.device = moved, dst
        return mapping

    # -- queries -------------------------------------------------------------------------------
    def get_block_table(self, seq: Sequence) -> list[int]:
        """The sequence's physical blocks in order (the live list: do not modify it)."""
        return self._table(seq).blocks

    def get_device(self, seq: Sequence) -> Device:
        return self._table(seq).device

    def num_group_blocks(self, group: SequenceGroup) -> int:
        """Distinct device blocks the group holds (what swapping it would move)."""
        return len(self._unique_blocks(group, Device.DEVICE))

    def has_blocks(self, seq: Sequence) -> bool:
        return seq.seq_id in self._tables

    @property
    def num_free_device_blocks(self) -> int:
        return self.pools[Device.DEVICE].num_free_blocks

    @property
    def num_free_cpu_blocks(self) -> int:
        return self.pools[Device.CPU].num_free_blocks

    def stats(self) -> BlockStats:
        filled: dict[int, int] = {}  # device block -> tokens it holds
        logical = 0
        for table in self._tables.values():
            if table.device is not Device.DEVICE:
                continue
            logical += len(table.blocks)
            num_tokens = min(len(table.seq.token_ids), len(table.blocks) * self.block_size)
            for i, block in enumerate(table.blocks):
                held = min(self.block_size, num_tokens - i * self.block_size)
                filled[block] = max(filled.get(block, 0), held)
        device, cpu = self.pools[Device.DEVICE], self.pools[Device.CPU]
        return BlockStats(self.block_size, device.num_blocks, device.num_used_blocks,
                          cpu.num_blocks, cpu.num_used_blocks,
                          device.num_used_blocks * self.block_size, sum(filled.values()), logical,
                          self.cow_copies, self.blocks_swapped_out, self.blocks_swapped_in)
