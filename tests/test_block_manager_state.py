"""Property-based test: random allocate / append / fork / free / swap / recompute sequences
against a model of the KV memory, with the block manager's invariants checked after every step.

Each slot of the fake memory holds the token id written there; every sequence must read back
exactly its own tokens through its block table after any copy-on-write copies and swaps.
"""
from collections import Counter

import hypothesis.strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kvcache.allocator import Device
from kvcache.block_manager import AllocStatus, BlockManager
from kvcache.sequence import Sequence, SequenceGroup, SequenceStatus

TOKENS = st.integers(min_value=0, max_value=50)


class BlockManagerMachine(RuleBasedStateMachine):
    @initialize(block_size=st.sampled_from([1, 2, 3, 4, 8]),
                num_device=st.integers(4, 40), num_cpu=st.integers(0, 24),
                watermark=st.sampled_from([0.0, 0.1]))
    def setup(self, block_size, num_device, num_cpu, watermark):
        self.bm = BlockManager(block_size, num_device, num_cpu, watermark)
        self.memory = {Device.DEVICE: [[None] * block_size for _ in range(num_device)],
                       Device.CPU: [[None] * block_size for _ in range(num_cpu)]}
        self.groups: list[SequenceGroup] = []
        self.counter = 0

    # -- helpers ----------------------------------------------------------------------------
    def write(self, seq, position):
        bs = self.bm.block_size
        block = self.bm.get_block_table(seq)[position // bs]
        self.memory[self.bm.get_device(seq)][block][position % bs] = seq.token_ids[position]

    def groups_on(self, device):
        return [g for g in self.groups if self.bm.get_device(g.unfinished_seqs()[0]) is device]

    def live_seqs(self):
        return [s for g in self.groups for s in g.unfinished_seqs()]

    def copy_blocks(self, src_dev, dst_dev, mapping):
        for src, dst in mapping:
            self.memory[dst_dev][dst] = list(self.memory[src_dev][src])

    # -- rules ------------------------------------------------------------------------------
    @rule(prompt=st.lists(TOKENS, min_size=1, max_size=30), n=st.integers(1, 4))
    def add_request(self, prompt, n):
        first = Sequence.from_prompt(prompt)
        group = SequenceGroup(f"r{self.counter}", [first] + [first.fork() for _ in range(n - 1)])
        self.counter += 1
        status = self.bm.can_allocate(group)
        need = -(-len(prompt) // self.bm.block_size)
        if status is AllocStatus.NEVER:
            assert self.bm.num_device_blocks - need < self.bm.watermark_blocks
            return
        if status is AllocStatus.LATER:
            assert self.bm.num_free_device_blocks - need < self.bm.watermark_blocks
            return
        free_before = self.bm.num_free_device_blocks
        assert self.bm.allocate(group) == len(prompt)
        assert self.bm.num_free_device_blocks == free_before - need  # the prompt is stored once
        self.groups.append(group)
        for seq in group.seqs:
            for pos in range(len(seq)):
                self.write(seq, pos)

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
            self.copy_blocks(Device.DEVICE, Device.DEVICE, pairs)
            block = self.bm.get_block_table(seq)[(len(seq) - 1) // self.bm.block_size]
            assert self.bm.pools[Device.DEVICE].ref_counts[block] == 1  # never write a shared block
            self.write(seq, len(seq) - 1)

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

    @precondition(lambda self: self.live_seqs())
    @rule(data=st.data())
    def swap_out(self, data):
        groups = self.groups_on(Device.DEVICE)
        if not groups:
            return
        group = data.draw(st.sampled_from(groups))
        unique = {b for s in group.unfinished_seqs() for b in self.bm.get_block_table(s)}
        if not self.bm.can_swap_out(group):
            assert len(unique) > self.bm.num_free_cpu_blocks
            return
        free_dev, free_cpu = self.bm.num_free_device_blocks, self.bm.num_free_cpu_blocks
        mapping = self.bm.swap_out(group)
        assert set(mapping) == unique and len(set(mapping.values())) == len(unique)
        assert self.bm.num_free_device_blocks == free_dev + len(unique)
        assert self.bm.num_free_cpu_blocks == free_cpu - len(unique)
        self.copy_blocks(Device.DEVICE, Device.CPU, mapping.items())

    @precondition(lambda self: self.live_seqs())
    @rule(data=st.data())
    def swap_in(self, data):
        groups = self.groups_on(Device.CPU)
        if not groups:
            return
        group = data.draw(st.sampled_from(groups))
        unique = {b for s in group.unfinished_seqs() for b in self.bm.get_block_table(s)}
        if self.bm.can_swap_in(group) is not AllocStatus.OK:
            return
        mapping = self.bm.swap_in(group)
        assert set(mapping) == unique and len(set(mapping.values())) == len(unique)
        self.copy_blocks(Device.CPU, Device.DEVICE, mapping.items())

    @precondition(lambda self: self.live_seqs())
    @rule(data=st.data())
    def recompute(self, data):
        """Preemption by recomputation: drop the group's blocks, map it again, rewrite all."""
        group = data.draw(st.sampled_from(self.groups))
        for seq in group.unfinished_seqs():
            self.bm.free(seq)
        if self.bm.can_allocate(group) is not AllocStatus.OK:
            for seq in group.unfinished_seqs():
                seq.status = SequenceStatus.FINISHED_ABORTED
            self.groups.remove(group)
            return
        shared = self.bm.allocate(group)
        first = group.unfinished_seqs()[0]
        for seq in group.unfinished_seqs():
            assert seq.token_ids[:shared] == first.token_ids[:shared]
            for pos in range(len(seq)):
                self.write(seq, pos)

    # -- invariants -------------------------------------------------------------------------
    @invariant()
    def reference_counts_match_tables(self):
        if not hasattr(self, "bm"):
            return
        for device, pool in self.bm.pools.items():
            expected = Counter(b for s in self.live_seqs() if self.bm.get_device(s) is device
                               for b in self.bm.get_block_table(s))
            free = pool.free_block_ids()
            assert pool.num_free_blocks == len(free)  # no block twice on the free list
            for block in range(pool.num_blocks):
                assert pool.ref_counts[block] == expected.get(block, 0)
                assert (block in free) == (expected.get(block, 0) == 0)
            assert pool.num_used_blocks + pool.num_free_blocks == pool.num_blocks

    @invariant()
    def every_sequence_reads_back_its_tokens(self):
        if not hasattr(self, "bm"):
            return
        bs = self.bm.block_size
        for seq in self.live_seqs():
            table = self.bm.get_block_table(seq)
            assert len(table) == -(-len(seq) // bs)
            memory = self.memory[self.bm.get_device(seq)]
            assert [memory[table[i // bs]][i % bs] for i in range(len(seq))] == seq.token_ids

    def teardown(self):
        if not hasattr(self, "bm"):
            return
        for seq in self.live_seqs():
            self.bm.free(seq)
        for pool in self.bm.pools.values():
            assert pool.num_free_blocks == pool.num_blocks
            assert not any(pool.ref_counts)


TestBlockManagerMachine = BlockManagerMachine.TestCase
