"""Property-based test: random allocate / append / fork / free / swap / recompute sequences,
with prefix caching on or off, against a model of the KV memory, with the block manager's
invariants checked after every step.

Each slot of the fake memory holds what real K/V depend on: the whole prefix up to and
including its token. Every sequence must read back exactly its own prefixes through its block
table after any copy-on-write copies, swaps, cache hits and evictions, and a prefix-cache hit
may skip writing only what the memory already holds.

Swaps come one group at a time and as a step does them: several groups (which may share
cached blocks) moved together, their plans joined as the scheduler joins them, and carried
out once, all reads before all writes.

With the tiers below the device on (the CPU pool as a host tier, a disk tier in a temporary
folder), the memory model follows blocks through them too: evicted blocks demoted to the host
or stored on disk (their slots pickled as the payload), loaded back at admission, disk reads
landing in a later step, or failing on a damaged file; every rule is one step, whose pinned
blocks go back at its end.

With a sliding window, every computation first releases the blocks that lie wholly before the
window of its first position, as the scheduler does: a sequence must still read back every
position of its last position's window, and hold nothing before it.
"""
import pickle
import shutil
import tempfile
from collections import Counter

import hypothesis.strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from pagedkv.kvcache.allocator import CachedBlock, Device
from pagedkv.kvcache.block_hash import ROOT, block_hash
from pagedkv.kvcache.block_manager import NULL_BLOCK, AllocStatus, BlockManager, BlockManagerError
from pagedkv.kvcache.disk_tier import DiskTier
from pagedkv.kvcache.sequence import Sequence, SequenceGroup, SequenceStatus

TOKENS = st.integers(min_value=0, max_value=50)
# A few shared heads make cache hits (and evictions of them) frequent.
HEADS = st.sampled_from([[], [1, 2, 3, 4, 5, 6, 7, 8], [9] * 8, list(range(20, 32))])
PROMPTS = st.builds(lambda head, tail: head + tail, HEADS, st.lists(TOKENS, max_size=14)).filter(bool)


def chain_hash(prefix: tuple[int, ...], block_size: int) -> bytes:
    """The chained hash of a full prefix, computed afresh from its tokens."""
    digest = ROOT
    for start in range(0, len(prefix), block_size):
        digest = block_hash(digest, prefix[start:start + block_size])
    return digest


class BlockManagerMachine(RuleBasedStateMachine):
    @initialize(block_size=st.sampled_from([1, 2, 3, 4, 8]),
                num_device=st.integers(4, 40), num_cpu=st.integers(0, 24),
                watermark=st.sampled_from([0.0, 0.1]), caching=st.sampled_from([True, True, False]),
                tiers=st.sampled_from(["none", "none", "host", "disk", "host+disk"]),
                disk_blocks=st.integers(2, 30), window=st.sampled_from([None, None, 1, 3, 8]))
    def setup(self, block_size, num_device, num_cpu, watermark, caching, tiers, disk_blocks, window):
        caching = caching or tiers != "none"
        self.folder = tempfile.mkdtemp(prefix="pagedkv-state-") if "disk" in tiers else None
        # A block's payload is its pickled slots: a few hundred bytes at most.
        self.disk = DiskTier(self.folder, disk_blocks * 600, "f" * 64) if self.folder else None
        self.bm = BlockManager(block_size, num_device, num_cpu, watermark, enable_prefix_caching=caching,
                               host_caching="host" in tiers, stores=[self.disk] if self.disk else [],
                               sliding_window=window)
        self.memory = {Device.DEVICE: [[None] * block_size for _ in range(num_device)],
                       Device.CPU: [[None] * block_size for _ in range(num_cpu)]}
        self.groups: list[SequenceGroup] = []
        self.loading: list[SequenceGroup] = []  # admitted, waiting for disk reads
        self.counter = 0

    # -- helpers ----------------------------------------------------------------------------
    @property
    def device_pool(self):
        return self.bm.pools[Device.DEVICE]

    def write(self, seq, position):
        bs = self.bm.block_size
        block = self.bm.get_block_table(seq)[position // bs]
        self.memory[self.bm.get_device(seq)][block][position % bs] = tuple(seq.token_ids[: position + 1])

    def apply_tier_ops(self):
        """The tiers' part of this step, in the executor's order: stores read blocks out,
        demotions copy device blocks to the host, host loads copy them back, disk loads land."""
        ops = self.bm.take_tier_ops()
        for op in ops.stores:
            slots = self.memory[op.device][op.block]
            self.disk.prepare_store(op.entry.block_hash, op.entry.token_ids, pickle.dumps(slots), op.entry.parent)
        if self.disk is not None:
            self.disk.wait_idle()  # the I/O thread's timing must not change what the rules draw
        self.copy_blocks(Device.DEVICE, Device.CPU, ops.demotions)
        self.copy_blocks(Device.CPU, Device.DEVICE, ops.host_loads)
        for op in ops.loads:
            self.memory[Device.DEVICE][op.block] = pickle.loads(op.payload)

    def end_step(self):
        """The step's copies are done: what they pinned goes back; finished disk work comes in."""
        self.apply_tier_ops()
        self.bm.begin_step()

    def compute(self, seq, start):
        """A prefill or decode of positions start.. of the sequence, as the executor does it
        (after the scheduler released what that step's window leaves behind)."""
        self.bm.drop_out_of_window(seq, start)
        for pos in range(start, len(seq)):
            self.write(seq, pos)
        seq.num_computed_tokens = len(seq)
        self.bm.cache_computed(seq)

    def groups_on(self, device):
        return [g for g in self.groups if self.bm.get_device(g.unfinished_seqs()[0]) is device]

    def live_seqs(self):
        return [s for g in self.groups for s in g.unfinished_seqs()]

    def copy_blocks(self, src_dev, dst_dev, pairs):
        """One step's copies: every source read before any destination is written."""
        assert len({dst for _, dst in pairs}) == len(pairs)  # no block written twice
        contents = [list(self.memory[src_dev][src]) for src, _ in pairs]
        for (_, dst), content in zip(pairs, contents):
            self.memory[dst_dev][dst] = content

    def cached_prefixes(self):
        """Full prefixes that cached device blocks hold, read from the memory model."""
        if not self.bm.enable_prefix_caching:
            return set()
        return {self.memory[Device.DEVICE][b][-1] for b in self.device_pool.cached}

    def allocate(self, group):
        """Allocates the group; checks the free-block accounting against the hits it got."""
        pool, bs = self.device_pool, self.bm.block_size
        seqs = group.unfinished_seqs()
        refs_before, free_before = list(pool.ref_counts), self.bm.num_free_device_blocks
        alloc = self.bm.allocate(group)
        loaded = {dst for _, dst in self.bm.tiers.ops.host_loads}
        hit_blocks = {b for s, done in zip(seqs, alloc.computed_tokens)
                      for b in self.bm.get_block_table(s)[: done // bs]} - loaded
        total = len({b for s in seqs for b in self.bm.get_block_table(s)})
        revived = sum(1 for b in hit_blocks if refs_before[b] == 0)
        assert free_before - self.bm.num_free_device_blocks == total - len(hit_blocks) + revived
        return alloc

    # -- rules ------------------------------------------------------------------------------
    @rule(prompt=PROMPTS, n=st.integers(1, 4))
    def add_request(self, prompt, n):
        first = Sequence.from_prompt(prompt)
        group = SequenceGroup(f"r{self.counter}", [first] + [first.fork() for _ in range(n - 1)])
        self.counter += 1
        status = self.bm.can_allocate(group)
        need = -(-len(prompt) // self.bm.block_size)
        held = self.cached_prefixes()
        if status is not AllocStatus.OK:
            assert (status is AllocStatus.NEVER) == (self.bm.num_device_blocks - need < self.bm.watermark_blocks)
            # Exact: mapping it now would dip under the watermark (or not fit at all).
            try:
                self.allocate(group)
            except BlockManagerError:
                return
            assert self.bm.num_free_device_blocks < self.bm.watermark_blocks
            for seq in group.seqs:
                self.bm.free(seq)
            self.end_step()
            return
        alloc = self.allocate(group)
        assert self.bm.num_free_device_blocks >= self.bm.watermark_blocks
        assert alloc.shared_tokens == len(prompt)  # the prompt is stored once
        assert len(set(alloc.computed_tokens)) == 1
        done, bs = alloc.computed_tokens[0], self.bm.block_size
        assert done % bs == 0 and done <= len(prompt) - 1
        if not self.bm.enable_prefix_caching:
            assert done == 0
        # The longest cached prefix: the first block it did not hit (before the last token)
        # was not cached. The blocks it hit are checked by reading them back.
        if done + bs <= len(prompt) - 1 and not self.bm.tiers.enabled:
            assert tuple(prompt[: done + bs]) not in held
        self.apply_tier_ops()  # evicted blocks leave, host blocks come back, before the prefill writes
        if alloc.loading:
            for seq in group.seqs:
                seq.num_computed_tokens = done
            self.loading.append(group)
        else:
            self.groups.append(group)
            for seq in group.seqs:
                self.compute(seq, done)
        self.end_step()

    @precondition(lambda self: self.loading)
    @rule()
    def land_disk_reads(self):
        """Steps until every group waiting for disk reads has them, then prefills the rest."""
        self.disk.wait_idle()
        self.end_step()
        for group in list(self.loading):
            if self.bm.is_loading(group):
                continue
            done = self.bm.finish_loads(group)
            self.apply_tier_ops()
            self.loading.remove(group)
            self.groups.append(group)
            for seq in group.unfinished_seqs():
                self.compute(seq, done)
        self.end_step()

    @precondition(lambda self: self.disk is not None and self.disk.num_blocks)
    @rule(data=st.data())
    def damage_a_disk_block(self, data):
        """A block file goes bad on disk: its read fails, and what follows it in the prefix,
        from whichever tier, is recomputed."""
        self.disk.wait_idle()
        block_hash = data.draw(st.sampled_from(sorted(self.disk._index)))
        self.disk.path(block_hash).write_bytes(b"damaged")

    @precondition(lambda self: self.live_seqs())
    @rule(data=st.data(), token=TOKENS)
    def append_token(self, data, token):
        groups = self.groups_on(Device.DEVICE)
        if not groups:
            return
        group = data.draw(st.sampled_from(groups))
        # Like a decode step: the sampler appends a token to every sequence of the group,
        # then the scheduler asks whether all of them fit.
        seqs = group.unfinished_seqs()
        for seq in seqs:
            seq.append(token)
        if not self.bm.can_append_slots(group):
            for seq in seqs:
                seq.token_ids.pop()
            return
        for seq in seqs:
            before = list(self.bm.get_block_table(seq))
            pairs = self.bm.append_slots(seq)
            for src, dst in pairs:
                assert src != dst and dst not in before
            self.apply_tier_ops()
            self.copy_blocks(Device.DEVICE, Device.DEVICE, pairs)
            block = self.bm.get_block_table(seq)[(len(seq) - 1) // self.bm.block_size]
            assert self.device_pool.ref_counts[block] == 1  # never write a shared block
            assert block not in self.device_pool.cached      # nor a cached one
            self.compute(seq, len(seq) - 1)
        self.end_step()

    @precondition(lambda self: self.live_seqs())
    @rule(data=st.data())
    def fork(self, data):
        groups = self.groups_on(Device.DEVICE)
        if not groups:
            return
        group = data.draw(st.sampled_from(groups))
        parent = data.draw(st.sampled_from(group.unfinished_seqs()))
        child = parent.fork()
        self.bm.fork(parent, child)
        group.seqs.append(child)

    @precondition(lambda self: self.live_seqs())
    @rule(data=st.data())
    def free_sequence(self, data):
        seq = data.draw(st.sampled_from(self.live_seqs()))
        self.bm.free(seq)
        seq.status = SequenceStatus.FINISHED_STOPPED
        self.groups = [g for g in self.groups if not g.is_finished]

    def swap_group_out(self, group) -> list[tuple[int, int]] | None:
        """Swaps one group out (its copies not carried out yet); None if the CPU pool is full."""
        held = Counter(b for s in group.unfinished_seqs() for b in self.bm.get_block_table(s) if b != NULL_BLOCK)
        free_cpu = self.bm.num_free_cpu_blocks
        if not self.bm.can_swap_out(group):
            assert len(held) > free_cpu  # refused only when it might not fit
            return None
        # Blocks that other requests hold too (cache hits) stay on the device for them.
        released = {b for b in held if self.device_pool.ref_counts[b] == held[b]}
        free_dev = self.bm.num_free_device_blocks
        pairs = self.bm.swap_out(group)
        assert {src for src, _ in pairs} <= set(held)  # the rest went onto copies made before
        assert self.bm.num_free_device_blocks == free_dev + len(released)
        assert self.bm.num_free_cpu_blocks == free_cpu - len(pairs)
        assert not released & set(self.device_pool.cached)  # they left the prefix cache
        return pairs

    def swap_group_in(self, group) -> list[tuple[int, int]] | None:
        held = {b for s in group.unfinished_seqs() for b in self.bm.get_block_table(s) if b != NULL_BLOCK}
        if self.bm.can_swap_in(group) is not AllocStatus.OK:
            return None
        free_dev = self.bm.num_free_device_blocks
        pairs = self.bm.swap_in(group)
        assert {src for src, _ in pairs} <= held
        assert self.bm.num_free_device_blocks == free_dev - len(pairs)
        return pairs

    @precondition(lambda self: self.live_seqs())
    @rule(data=st.data())
    def swap_out(self, data):
        groups = self.groups_on(Device.DEVICE)
        if groups:
            pairs = self.swap_group_out(data.draw(st.sampled_from(groups)))
            self.apply_tier_ops()
            self.copy_blocks(Device.DEVICE, Device.CPU, pairs or [])
            self.end_step()

    @precondition(lambda self: len(self.live_seqs()) > 1)
    @rule(data=st.data())
    def swap_out_in_one_step(self, data):
        """Several groups preempted by swap in one step: one plan, carried out once."""
        groups = self.groups_on(Device.DEVICE)
        if len(groups) < 2:
            return
        chosen = data.draw(st.lists(st.sampled_from(groups), min_size=2, max_size=4, unique=True))
        plan = []
        for group in chosen:
            plan += self.swap_group_out(group) or []
        self.apply_tier_ops()
        self.copy_blocks(Device.DEVICE, Device.CPU, plan)
        self.end_step()

    @precondition(lambda self: self.live_seqs())
    @rule(data=st.data())
    def swap_in(self, data):
        groups = self.groups_on(Device.CPU)
        if groups:
            pairs = self.swap_group_in(data.draw(st.sampled_from(groups)))
            self.apply_tier_ops()
            self.copy_blocks(Device.CPU, Device.DEVICE, pairs or [])
            self.end_step()

    @precondition(lambda self: len(self.live_seqs()) > 1)
    @rule(data=st.data())
    def swap_in_in_one_step(self, data):
        groups = self.groups_on(Device.CPU)
        if len(groups) < 2:
            return
        chosen = data.draw(st.lists(st.sampled_from(groups), min_size=2, max_size=4, unique=True))
        plan = []
        for group in chosen:
            plan += self.swap_group_in(group) or []
        self.apply_tier_ops()
        self.copy_blocks(Device.CPU, Device.DEVICE, plan)
        self.end_step()

    @precondition(lambda self: self.live_seqs())
    @rule(data=st.data())
    def recompute(self, data):
        """Preemption by recomputation: drop the group's blocks, map it again, and compute
        what the prefix cache does not hold (the group's own blocks, unless evicted)."""
        group = data.draw(st.sampled_from(self.groups))
        for seq in group.unfinished_seqs():
            self.bm.free(seq)
        if self.bm.can_allocate(group) is not AllocStatus.OK:
            for seq in group.unfinished_seqs():
                seq.status = SequenceStatus.FINISHED_ABORTED
            self.groups.remove(group)
            self.end_step()
            return
        seqs = group.unfinished_seqs()
        alloc = self.allocate(group)
        self.apply_tier_ops()
        first = seqs[0]
        if alloc.loading:
            for seq, done in zip(seqs, alloc.computed_tokens):
                seq.num_computed_tokens = done
            self.groups.remove(group)
            self.loading.append(group)
        else:
            for seq, done in zip(seqs, alloc.computed_tokens):
                assert seq.token_ids[: alloc.shared_tokens] == first.token_ids[: alloc.shared_tokens]
                self.compute(seq, done)
        self.end_step()

    # -- invariants -------------------------------------------------------------------------
    @invariant()
    def reference_counts_match_tables(self):
        if not hasattr(self, "bm"):
            return
        holders = self.live_seqs() + [s for g in self.loading for s in g.unfinished_seqs()]
        for device, pool in self.bm.pools.items():
            expected = Counter(b for s in holders if self.bm.get_device(s) is device
                               for b in self.bm.get_block_table(s) if b != NULL_BLOCK)
            free = pool.free_block_ids()
            assert pool.num_free_blocks == len(free)  # no block twice on the free lists
            for block in range(pool.num_blocks):
                assert pool.ref_counts[block] == expected.get(block, 0)
                assert (block in free) == (expected.get(block, 0) == 0)
            assert pool.num_used_blocks + pool.num_free_blocks == pool.num_blocks

    @invariant()
    def cached_blocks_hold_what_their_hash_says(self):
        if not hasattr(self, "bm"):
            return
        bs = self.bm.block_size
        for device, pool in self.bm.pools.items():
            table = pool.hash_table()
            assert len(table) == len(pool.cached)  # each cached block once in the hash table
            if not self.bm.enable_prefix_caching or (device is Device.CPU and not self.bm.tiers.host_caching):
                assert not table
            for block, entry in pool.cached.items():
                assert table[entry.block_hash] == block
                self.assert_holds(self.memory[device][block], entry)
            evictable = pool.evictable_block_ids()
            assert all(pool.ref_counts[b] == 0 and b in pool.cached for b in evictable)
            assert set(evictable) == {b for b in pool.cached if pool.ref_counts[b] == 0}

    def assert_holds(self, slots, entry):
        """The block's slots are the prefix its cache entry (hash, tokens, parent) names."""
        bs = self.bm.block_size
        prefix = slots[-1]
        assert prefix is not None and len(prefix) % bs == 0
        assert [slot[-1] for slot in slots] == list(entry.token_ids) == list(prefix[-bs:])
        assert all(slot == prefix[: len(prefix) - bs + i + 1] for i, slot in enumerate(slots))
        assert entry.block_hash == chain_hash(prefix, bs)
        assert entry.parent == chain_hash(prefix[:-bs], bs)

    @invariant()
    def every_sequence_reads_back_its_tokens(self):
        if not hasattr(self, "bm"):
            return
        bs = self.bm.block_size
        window = self.bm.sliding_window
        for seq in self.live_seqs():
            table = self.bm.get_block_table(seq)
            assert len(table) == -(-len(seq) // bs)
            # Released blocks are a prefix of the table, before the last position's window.
            first = max(0, len(seq) - window) // bs if window else 0
            dropped = sum(1 for b in table if b == NULL_BLOCK)
            assert dropped <= first and all(b == NULL_BLOCK for b in table[:dropped])
            if window is None:
                assert dropped == 0
            memory = self.memory[self.bm.get_device(seq)]
            kept = range(dropped * bs, len(seq))
            assert [memory[table[i // bs]][i % bs] for i in kept] == [tuple(seq.token_ids[: i + 1]) for i in kept]

    def teardown(self):
        if not hasattr(self, "bm"):
            return
        for seq in self.live_seqs() + [s for g in self.loading for s in g.unfinished_seqs()]:
            self.bm.free(seq)
        self.end_step()
        for pool in self.bm.pools.values():
            assert pool.num_free_blocks == pool.num_blocks
            assert not any(pool.ref_counts)
        if self.disk is not None:  # every block on disk holds what its hash says
            self.disk.wait_idle()
            self.disk.poll()
            held = [(h, None) for h in list(self.disk._index)]
            self.disk.prepare_load(held)
            self.disk.wait_idle()
            for loaded in self.disk.poll():
                if loaded.payload is None:  # damaged by a rule
                    continue
                slots = pickle.loads(loaded.payload)
                header = loaded.header
                entry = CachedBlock(loaded.block_hash, tuple(header["tokens"]), bytes.fromhex(header["parent"]))
                self.assert_holds(slots, entry)
            self.disk.close()
            shutil.rmtree(self.folder, ignore_errors=True)


TestBlockManagerMachine = BlockManagerMachine.TestCase
