"""The block manager: maps each sequence's logical blocks onto physical KV-cache blocks.

Semantics follow vLLM's block manager: a group's prompt is mapped once and shared by its
sequences (reference counts), `fork` shares a parent's blocks with a child, the block that
receives a new token is copied first when it is shared (copy-on-write), and a group is
swapped between the device pool and the bounded CPU pool as a whole, each shared block
moving once and staying shared.

Blocks are shared across groups too (prefix caching), and such a block may move with one
group while another keeps it. A complete block (every slot written) that is copied to the
other pool keeps a link to its copy, its twin, for as long as both stay allocated: a complete
block is never written again, so the two hold the same K/V, and the next group that moves the
block shares the twin instead of copying it again. Two groups that swap out a common prefix,
in one step or in two, so hold it once in the CPU pool, and come back to one device copy.
Plans are lists of (src, dst) pairs, which cannot drop an entry as a dict keyed by block
would when two groups move the same block in one step.

Prefix caching shares blocks across requests: once its tokens are computed, every full
device block is indexed by a hash chained on its parent's, and `allocate` maps the longest
cached prefix of each sequence onto those blocks. A cached block no sequence holds keeps its
contents until the allocator needs it back (see BlockAllocator). Below the device, the CPU
pool (host tier) and store tiers (a directory, ...) can keep the blocks the device evicts, and
`allocate` continues the cached prefix there (tiering.py).

Sliding windows: when every layer of the model attends only to the last `sliding_window`
positions, a block that lies wholly before the window of the first position a step computes
is never read again by that sequence, and `drop_out_of_window` releases it (vLLM frees such
blocks too). Its table entry becomes NULL_BLOCK; the kernels read no table entry before a
row's window. Pure Python: nothing heavier than the standard library.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

from collections import Counter

from pagedkv.kvcache.allocator import BlockAllocator, Device
from pagedkv.kvcache.block_hash import full_blocks, parent_hash
from pagedkv.kvcache.sequence import Sequence, SequenceGroup
from pagedkv.kvcache.tiering import LowerHit, StoreOp, StoreTier, TierOps, Tiers


class AllocStatus(enum.Enum):
    OK = "ok"        # fits now, with the watermark kept back
    LATER = "later"  # fits once running sequences free blocks
    NEVER = "never"  # cannot fit even in an empty cache


class BlockManagerError(RuntimeError):
    pass


_OTHER = {Device.DEVICE: Device.CPU, Device.CPU: Device.DEVICE}
NULL_BLOCK = -1  # a table entry whose block fell out of every layer's sliding window and was released


@dataclass
class _Table:
    seq: Sequence
    device: Device
    blocks: list[int]
    num_hashed: int = 0  # leading blocks already offered to the prefix cache


@dataclass
class Allocation:
    """What `allocate` mapped: the group's shared head and each sequence's cached head."""

    shared_tokens: int          # leading tokens stored once for the whole group
    computed_tokens: list[int]  # per unfinished sequence: leading tokens whose K/V are cached
    loading: bool = False       # blocks after those are being read from a store tier


@dataclass
class _Plan:
    num_shared: int            # blocks at the head stored once for every sequence
    shared_tokens: int
    shared_hits: list[int]     # cached blocks at the head of the shared part
    own_hits: list[list[int]]  # per sequence, cached blocks right after the shared part
    lower: list[LowerHit]      # blocks after the shared hits that a tier below holds
    num_new: int               # blocks to take from the free pool
    num_revived: int           # hits on evictable blocks: they stop counting as free
    num_total: int             # blocks the group holds once mapped (what an empty cache needs)

    @property
    def need(self) -> int:
        return self.num_new + self.num_revived


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
    cached_blocks: int = 0     # device blocks in the prefix cache (in use or evictable)
    evictable_blocks: int = 0  # of those, the ones no sequence holds (counted as free)
    evicted_blocks: int = 0    # cached blocks reused for other contents so far
    swap_copies_saved: int = 0  # block moves that found their contents in the other pool already

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
                 watermark: float = 0.01, enable_prefix_caching: bool = True, host_caching: bool = False,
                 stores: list[StoreTier] | None = None, block_bytes: int = 0,
                 sliding_window: int | None = None) -> None:
        """sliding_window: every layer of the model sees at most this many positions up to a
        query's own (the largest window of its layers), so that blocks before it are released;
        None where any layer sees them all."""
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if not 0.0 <= watermark < 1.0:
            raise ValueError(f"watermark must be in [0, 1), got {watermark}")
        self.block_size = block_size
        self.num_device_blocks = num_device_blocks
        self.num_cpu_blocks = num_cpu_blocks
        self.watermark_blocks = int(watermark * num_device_blocks)
        self.enable_prefix_caching = enable_prefix_caching
        if (host_caching or stores) and not enable_prefix_caching:
            raise ValueError("the KV tiers below the device keep prefix-cache blocks: they need prefix caching on")
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
        self.sliding_window = sliding_window
        self.blocks_dropped = 0  # blocks released because they fell out of the window
        self.pools = {Device.DEVICE: BlockAllocator(Device.DEVICE, num_device_blocks),
                      Device.CPU: BlockAllocator(Device.CPU, num_cpu_blocks)}
        self.tiers = Tiers(self.pools[Device.DEVICE], self.pools[Device.CPU], host_caching, stores or [],
                           self._release, block_bytes)
        self._tables: dict[int, _Table] = {}
        # Complete blocks with an identical copy in the other pool (see the module's docstring).
        self._twins: dict[Device, dict[int, int]] = {Device.DEVICE: {}, Device.CPU: {}}
        self.cow_copies = 0
        self.blocks_swapped_out = 0
        self.blocks_swapped_in = 0
        self.swap_copies_saved = 0

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

    def _status(self, need: int, total: int) -> AllocStatus:
        """OK if `need` free blocks can go now with the watermark kept back; NEVER if the
        `total` blocks would not fit even in an empty cache; LATER otherwise."""
        if self.pools[Device.DEVICE].num_free_blocks - need >= self.watermark_blocks:
            return AllocStatus.OK
        if self.num_device_blocks - total < self.watermark_blocks:
            return AllocStatus.NEVER
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
        seen.pop(NULL_BLOCK, None)
        return list(seen)

    def _blocks_to_move(self, group: SequenceGroup, device: Device) -> int:
        """Distinct blocks of the group in `device` that moving it would copy: those without a
        twin in the other pool."""
        twins = self._twins[device]
        return sum(1 for block in self._unique_blocks(group, device) if block not in twins)

    def _release(self, device: Device, block: int, keep_cached: bool = True) -> None:
        """Drops one reference; a block that becomes free loses its twin (it may be rewritten)."""
        if self.pools[device].free(block, keep_cached):
            twin = self._twins[device].pop(block, None)
            if twin is not None:
                del self._twins[_OTHER[device]][twin]

    # -- prefix cache ----------------------------------------------------------------------------
    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """Cached device blocks holding the sequence's leading full blocks, up to the first
        miss. The block of the last token never counts: that token is computed for its logits."""
        if not self.enable_prefix_caching:
            return []
        pool, bs = self.pools[Device.DEVICE], self.block_size
        hits: list[int] = []
        for block_hash, tokens in full_blocks(seq, 0, (len(seq) - 1) // bs, bs):
            block = pool.lookup(block_hash, tokens)
            if block is None:
                break
            hits.append(block)
        return hits

    def cache_computed(self, seq: Sequence) -> None:
        """Offers the sequence's full blocks among its first `num_computed_tokens` tokens (those
        whose K/V are written by the end of the current step) to the prefix cache."""
        if not self.enable_prefix_caching:
            return
        table = self._tables.get(seq.seq_id)
        if table is None or table.device is not Device.DEVICE:
            table = self._table(seq, Device.DEVICE)  # raises the error that says why
        # A pending last token (async scheduling) has no id yet: its block waits.
        full = min(seq.num_computed_tokens, seq.num_known_tokens) // self.block_size
        if full <= table.num_hashed:  # the common case: called every step, a block fills rarely
            return
        pool, blocks = self.pools[Device.DEVICE], table.blocks
        for index, (block_hash, tokens) in enumerate(full_blocks(seq, table.num_hashed, full, self.block_size),
                                                     table.num_hashed):
            if blocks[index] != NULL_BLOCK:  # released already (out of the window): not cached
                pool.cache(blocks[index], block_hash, tokens, parent_hash(seq, index))
        table.num_hashed = full

    def num_kept_tokens(self, group: SequenceGroup) -> int:
        """Leading tokens of the group's first sequence whose cached blocks other requests hold
        as well: they stay cached when the group lets go of its blocks (recompute finds them)."""
        seqs = group.unfinished_seqs()
        pool = self.pools[Device.DEVICE]
        held = Counter(b for s in seqs for b in self._table(s, Device.DEVICE).blocks)
        kept = 0
        for block in self._table(seqs[0]).blocks[: len(seqs[0]) // self.block_size]:
            if block not in pool.cached or pool.ref_counts[block] <= held[block]:
                break
            kept += 1
        return kept * self.block_size

    # -- admission and allocation ---------------------------------------------------------
    def _plan(self, seqs: list[Sequence], read_cache: bool = True) -> _Plan:
        num_shared, shared_tokens = self._shared_prefix_blocks(seqs)
        hits = [self._cached_prefix(s) if read_cache else [] for s in seqs]
        # The shared part is one set of blocks, so it hits only as far as every sequence does;
        # a sequence's own blocks hit only after a fully cached shared part (a prefix chain).
        shared_hits = hits[0][: min(num_shared, *(len(h) for h in hits))]
        full = len(shared_hits) == num_shared
        own_hits = [h[num_shared:] if full else [] for h in hits]
        own_total = [self._num_blocks(len(s)) - num_shared for s in seqs]
        pool = self.pools[Device.DEVICE]
        revived = {b for b in shared_hits if pool.ref_counts[b] == 0}
        revived.update(b for own in own_hits for b in own if pool.ref_counts[b] == 0)
        num_new = num_shared - len(shared_hits) + sum(t - len(o) for t, o in zip(own_total, own_hits))
        lower = self._lower_hits(seqs[0], num_shared, len(shared_hits)) if read_cache else []
        return _Plan(num_shared, shared_tokens, shared_hits, own_hits, lower, num_new, len(revived),
                     num_shared + sum(own_total))

    def _lower_hits(self, lead: Sequence, num_shared: int, num_hits: int) -> list[LowerHit]:
        """The shared part's blocks after the device's hits that a tier below holds (never the
        block of the last token, which is computed for its logits)."""
        stop = min(num_shared, (len(lead) - 1) // self.block_size)
        if not self.tiers.enabled or num_hits >= stop:
            return []
        blocks = full_blocks(lead, num_hits, stop, self.block_size)
        return self.tiers.lower_hits([(h, tokens, parent_hash(lead, i)) for i, (h, tokens) in enumerate(blocks, num_hits)])

    def can_allocate(self, group: SequenceGroup, read_cache: bool = True) -> AllocStatus:
        plan = self._plan(group.unfinished_seqs(), read_cache)
        return self._status(plan.need, plan.num_total)

    def allocate(self, group: SequenceGroup, read_cache: bool = True) -> Allocation:
        """Maps every unfinished sequence's tokens, reusing cached blocks for the longest
        cached prefix of each; returns what is shared and what is computed already.
        `read_cache` False takes nothing from the prefix cache or the tiers below (every token
        is computed); the blocks computed are offered to the cache as usual."""
        seqs = group.unfinished_seqs()
        if not seqs:
            raise BlockManagerError(f"request {group.request_id} has no unfinished sequence")
        for seq in seqs:
            if seq.seq_id in self._tables:
                raise BlockManagerError(f"sequence {seq.seq_id} already has blocks")
        pool = self.pools[Device.DEVICE]
        plan = self._plan(seqs, read_cache)
        if plan.need > pool.num_free_blocks:
            raise BlockManagerError(f"request {group.request_id} needs {plan.need} blocks, "
                                    f"{pool.num_free_blocks} are free")
        # Hits first, so that taking new blocks cannot evict them (or demote onto them).
        self.tiers.hold(plan.lower)
        for block in plan.shared_hits:
            for _ in seqs:
                pool.acquire(block)
        for own in plan.own_hits:
            for block in own:
                pool.acquire(block)
        shared = list(plan.shared_hits)
        for _ in range(plan.num_shared - len(shared)):
            block = pool.allocate()
            for _ in range(len(seqs) - 1):
                pool.incref(block)
            shared.append(block)
        num_hits = len(plan.shared_hits)
        lower = plan.lower
        loaded = self.tiers.load(seqs[0].seq_id, lower, shared[num_hits:num_hits + len(lower)]) if lower else 0
        if self.tiers.enabled and read_cache:
            self.tiers.count_misses()
        computed = []
        for seq, own in zip(seqs, plan.own_hits):
            new = [pool.allocate() for _ in range(self._num_blocks(len(seq)) - plan.num_shared - len(own))]
            hashed = num_hits + len(own)
            self._tables[seq.seq_id] = _Table(seq, Device.DEVICE, shared + own + new, hashed)
            computed.append((hashed + loaded) * self.block_size)
        return Allocation(plan.shared_tokens, computed, loaded < len(lower))

    # -- the tiers below the device ------------------------------------------------------------
    def begin_step(self) -> list[tuple[str, int, float]]:
        """At the start of a step's planning: the last step's copies are done (their pins go)
        and finished reads come in. Returns the reads' (tier, bytes, seconds)."""
        return self.tiers.begin_step()

    def idle(self) -> list[StoreOp]:
        """When no step follows (the engine is idle): the last step's copies are done, and what
        it cached goes to the write-through tiers; returns those stores for the executor."""
        return self.tiers.idle()

    def is_loading(self, group: SequenceGroup) -> bool:
        """Whether the group waits for blocks being read from a store tier."""
        return self.tiers.enabled and self.tiers.is_loading(group.unfinished_seqs()[0].seq_id)

    def wait_for_reads(self, timeout: float) -> None:
        """Sleeps until a read from a store tier lands (or `timeout` seconds pass)."""
        if self.tiers.enabled:
            self.tiers.wait_for_reads(timeout)

    def finish_loads(self, group: SequenceGroup) -> int:
        """Once its reads are done: plans the copies of the good blocks into the group's table
        (the rest are recomputed); returns the tokens they hold, the shared head's computed
        tokens from now on."""
        lead = group.unfinished_seqs()[0]
        good = self.tiers.finish_loads(lead.seq_id)
        return lead.num_computed_tokens + good * self.block_size

    def take_tier_ops(self) -> TierOps:
        return self.tiers.take_ops()

    def flush_to_stores(self) -> TierOps:
        """The stores that put every cached block the store tiers lack there (shutdown)."""
        self.tiers.flush()
        return self.tiers.take_ops()

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
        self._release(Device.DEVICE, last)  # one reference fewer; the other sequences keep the original
        blocks[index] = fresh
        self.cow_copies += 1
        return [(last, fresh)]

    def fork(self, parent: Sequence, child: Sequence) -> None:
        table = self._table(parent)
        if child.seq_id in self._tables:
            raise BlockManagerError(f"sequence {child.seq_id} already has blocks")
        pool = self.pools[table.device]
        for block in table.blocks:
            if block != NULL_BLOCK:
                pool.incref(block)
        self._tables[child.seq_id] = _Table(child, table.device, list(table.blocks), table.num_hashed)

    def free(self, seq: Sequence) -> None:
        table = self._tables.get(seq.seq_id)
        if table is None:
            raise BlockManagerError(f"sequence {seq.seq_id} has no blocks to free")
        if table.device is Device.DEVICE:
            # Blocks filled by decoding are offered to the cache here, once, rather than every
            # step: a chat's next turn or a recomputed group finds them when they are done.
            self.cache_computed(seq)
        del self._tables[seq.seq_id]
        if self.tiers.enabled:
            self.tiers.cancel_loads(seq.seq_id)
        # Tail first: on the evictable list, a prefix's last blocks then go before its head.
        for block in reversed(table.blocks):
            if block != NULL_BLOCK:
                self._release(table.device, block)

    # -- sliding windows ---------------------------------------------------------------------------
    def drop_out_of_window(self, seq: Sequence, start: int) -> int:
        """Before a step computes positions from `start` on: releases the sequence's blocks
        that lie wholly before the window of position `start` (start - sliding_window + 1),
        which neither this step nor a later one reads. Returns how many it released. Nothing
        without a sliding window, or for a sequence whose blocks are not on the device."""
        table = self._tables.get(seq.seq_id)
        if self.sliding_window is None or table is None or table.device is not Device.DEVICE:
            return 0
        end = min(max(0, start - self.sliding_window + 1) // self.block_size, len(table.blocks))
        dropped = 0
        for index in range(end - 1, -1, -1):  # from the window back: the blocks before were dropped already
            block = table.blocks[index]
            if block == NULL_BLOCK:
                break
            table.blocks[index] = NULL_BLOCK
            if self.tiers.enabled:
                # This step's tier copies may still target or read it (a load that landed, a
                # demotion of it): the tiers let go of it when the next step begins.
                self.tiers.pin(Device.DEVICE, block)
            else:
                self._release(Device.DEVICE, block)
            dropped += 1
        self.blocks_dropped += dropped
        return dropped

    # -- swapping ----------------------------------------------------------------------------
    def can_swap_out(self, group: SequenceGroup) -> bool:
        return self._blocks_to_move(group, Device.DEVICE) <= self.pools[Device.CPU].num_free_blocks

    def can_swap_in(self, group: SequenceGroup) -> AllocStatus:
        # Room for the blocks plus one new block per sequence, so that all can grow at once.
        need = self._blocks_to_move(group, Device.CPU) + len(group.unfinished_seqs())
        return self._status(need, need)

    def swap_out(self, group: SequenceGroup) -> list[tuple[int, int]]:
        """Moves the group to the CPU pool; returns the (device_block, cpu_block) copies."""
        if not self.can_swap_out(group):
            raise BlockManagerError(f"no room in the CPU pool to swap out request {group.request_id}")
        copies = self._move(group, Device.DEVICE, Device.CPU)
        self.blocks_swapped_out += len(copies)
        return copies

    def swap_in(self, group: SequenceGroup) -> list[tuple[int, int]]:
        """Moves the group back to the device pool; returns the (cpu_block, device_block) copies."""
        need = self._blocks_to_move(group, Device.CPU)
        if need > self.pools[Device.DEVICE].num_free_blocks:
            raise BlockManagerError(f"request {group.request_id} needs {need} device blocks to swap in, "
                                    f"{self.pools[Device.DEVICE].num_free_blocks} are free")
        copies = self._move(group, Device.CPU, Device.DEVICE)
        self.blocks_swapped_in += len(copies)
        for seq in group.unfinished_seqs():
            self.cache_computed(seq)  # fresh device blocks: hashed again
        return copies

    def _move(self, group: SequenceGroup, src: Device, dst: Device) -> list[tuple[int, int]]:
        """Moves every table of the group to `dst`: each distinct block once, onto its twin
        where it has one, else onto a fresh block that a copy fills (returned)."""
        dst_pool, twins, bs = self.pools[dst], self._twins[src], self.block_size
        # The host tier keeps a swapped group's hashed blocks in its prefix cache.
        host_keeps = dst is Device.CPU and self.tiers.host_caching
        targets: dict[int, int] = {}
        copies: list[tuple[int, int]] = []
        for seq in group.unfinished_seqs():
            table = self._table(seq, src)
            complete = seq.num_computed_tokens // bs  # blocks never written again
            moved = []
            for index, block in enumerate(table.blocks):
                if block == NULL_BLOCK:
                    moved.append(NULL_BLOCK)
                    continue
                target = targets.get(block)
                if target is None:
                    target = twins.get(block)
                    if target is None:
                        target = dst_pool.allocate()
                        copies.append((block, target))
                        if index < complete:
                            twins[block], self._twins[dst][target] = target, block
                        if host_keeps and index < table.num_hashed:
                            tokens = tuple(seq.token_ids[index * bs:(index + 1) * bs])
                            dst_pool.cache(target, seq.block_hashes[index], tokens, parent_hash(seq, index))
                    else:
                        dst_pool.incref(target)
                        self.swap_copies_saved += 1
                    targets[block] = target
                else:
                    dst_pool.incref(target)
                if src is Device.CPU and self.tiers.enabled:
                    # Read by this step's swap-in, after its demotions and swap-outs have written
                    # the host pool: nothing may take the block before the next step.
                    self.tiers.pin(Device.CPU, block)
                else:
                    # A block that leaves the device leaves the prefix cache with its last holder.
                    self._release(src, block, keep_cached=False)
                moved.append(target)
            table.blocks, table.device, table.num_hashed = moved, dst, 0
        return copies

    # -- queries -------------------------------------------------------------------------------
    def get_block_table(self, seq: Sequence) -> list[int]:
        """The sequence's physical blocks in order (the live list: do not modify it)."""
        return self._table(seq).blocks

    def get_device(self, seq: Sequence) -> Device:
        return self._table(seq).device

    def num_group_blocks(self, group: SequenceGroup) -> int:
        """Distinct device blocks that swapping the group out would copy."""
        return self._blocks_to_move(group, Device.DEVICE)

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
            logical += sum(1 for block in table.blocks if block != NULL_BLOCK)
            num_tokens = min(len(table.seq.token_ids), len(table.blocks) * self.block_size)
            for i, block in enumerate(table.blocks):
                if block == NULL_BLOCK:
                    continue
                held = min(self.block_size, num_tokens - i * self.block_size)
                filled[block] = max(filled.get(block, 0), held)
        device, cpu = self.pools[Device.DEVICE], self.pools[Device.CPU]
        return BlockStats(self.block_size, device.num_blocks, device.num_used_blocks,
                          cpu.num_blocks, cpu.num_used_blocks,
                          device.num_used_blocks * self.block_size, sum(filled.values()), logical,
                          self.cow_copies, self.blocks_swapped_out, self.blocks_swapped_in,
                          len(device.cached), device.num_evictable_blocks, device.num_evicted,
                          self.swap_copies_saved)
