"""Unit tests of the block allocator and the block manager (vLLM's block-manager semantics)."""
import pytest

from pagedkv.kvcache.allocator import BlockAllocator, BlockAllocatorError, Device
from pagedkv.kvcache.block_manager import AllocStatus, BlockManager, BlockManagerError
from pagedkv.kvcache.sequence import Sequence, SequenceGroup, SequenceStatus


def group_of(prompt, n=1, request_id="r"):
    first = Sequence.from_prompt(prompt)
    return SequenceGroup(request_id, [first] + [first.fork() for _ in range(n - 1)])


def refs(bm, block, device=Device.DEVICE):
    return bm.pools[device].ref_counts[block]


# -- allocator -------------------------------------------------------------------------------
def test_allocator_hands_out_every_block_then_fails():
    pool = BlockAllocator(Device.DEVICE, 3)
    blocks = [pool.allocate() for _ in range(3)]
    assert sorted(blocks) == [0, 1, 2] and pool.num_free_blocks == 0
    with pytest.raises(BlockAllocatorError, match="out of device blocks"):
        pool.allocate()
    pool.free(blocks[1])
    assert pool.num_free_blocks == 1 and pool.allocate() == blocks[1]


def test_allocator_refcounts_and_double_free():
    pool = BlockAllocator(Device.CPU, 2)
    b = pool.allocate()
    pool.incref(b)
    pool.free(b)
    assert pool.num_free_blocks == 1  # still referenced once
    pool.free(b)
    assert pool.num_free_blocks == 2
    with pytest.raises(BlockAllocatorError, match="double free"):
        pool.free(b)
    with pytest.raises(BlockAllocatorError, match="is free"):
        pool.incref(b)


# -- allocation and admission ----------------------------------------------------------------
def test_allocate_until_full_then_later():
    bm = BlockManager(block_size=4, num_device_blocks=6, num_cpu_blocks=0, watermark=0.0)
    groups = [group_of(list(range(8)), request_id=str(i)) for i in range(3)]  # 2 blocks each
    for g in groups:
        assert bm.can_allocate(g) is AllocStatus.OK
        bm.allocate(g)
    assert bm.num_free_device_blocks == 0
    extra = group_of([1])
    assert bm.can_allocate(extra) is AllocStatus.LATER
    with pytest.raises(BlockManagerError, match="needs 1 blocks, 0 are free"):
        bm.allocate(extra)
    bm.free(groups[0].seqs[0])
    assert bm.can_allocate(extra) is AllocStatus.OK


def test_watermark_keeps_blocks_back_and_never_for_too_long_prompt():
    bm = BlockManager(block_size=4, num_device_blocks=100, num_cpu_blocks=0, watermark=0.1)
    assert bm.watermark_blocks == 10
    assert bm.can_allocate(group_of([0] * 4 * 90)) is AllocStatus.OK      # leaves exactly 10
    assert bm.can_allocate(group_of([0] * (4 * 90 + 1))) is AllocStatus.NEVER
    bm.allocate(group_of([0] * 4 * 85))                                    # 15 left
    assert bm.can_allocate(group_of([0] * 4 * 5)) is AllocStatus.OK
    assert bm.can_allocate(group_of([0] * 4 * 6)) is AllocStatus.LATER     # would dip under 10


def test_prompt_is_shared_by_all_sequences_of_a_group():
    bm = BlockManager(block_size=4, num_device_blocks=10, num_cpu_blocks=0, watermark=0.0)
    g = group_of(list(range(10)), n=3)  # 3 blocks, the last partial
    assert bm.allocate(g).shared_tokens == 10
    tables = [bm.get_block_table(s) for s in g.seqs]
    assert tables[0] == tables[1] == tables[2] and len(tables[0]) == 3
    assert all(refs(bm, b) == 3 for b in tables[0])
    assert bm.num_free_device_blocks == 7
    stats = bm.stats()
    assert stats.logical_blocks == 9 and stats.device_blocks_used == 3
    assert stats.sharing_saved == pytest.approx(6 / 9)


def test_allocate_diverged_group_shares_the_full_blocks_of_the_common_prefix():
    bm = BlockManager(block_size=4, num_device_blocks=20, num_cpu_blocks=0, watermark=0.0)
    prompt = list(range(6))
    a, b = Sequence(1, prompt + [7, 8, 9], 6), Sequence(2, prompt + [7, 5], 6)
    g = SequenceGroup("g", [a, b])
    assert bm.allocate(g).shared_tokens == 4        # common prefix 7 tokens -> 1 full block
    ta, tb = bm.get_block_table(a), bm.get_block_table(b)
    assert ta[0] == tb[0] and refs(bm, ta[0]) == 2
    assert len(ta) == 3 and len(tb) == 2 and not set(ta[1:]) & set(tb[1:])


def test_allocate_twice_and_unknown_sequences_are_errors():
    bm = BlockManager(block_size=4, num_device_blocks=4, num_cpu_blocks=0)
    g = group_of([1, 2])
    bm.allocate(g)
    with pytest.raises(BlockManagerError, match="already has blocks"):
        bm.allocate(g)
    stranger = Sequence.from_prompt([1])
    for op in (bm.free, bm.append_slots, bm.get_block_table):
        with pytest.raises(BlockManagerError, match="has no blocks"):
            op(stranger)


# -- appending and copy-on-write -------------------------------------------------------------
def test_append_within_a_block_and_across_the_boundary():
    bm = BlockManager(block_size=4, num_device_blocks=4, num_cpu_blocks=0, watermark=0.0)
    g = group_of([1, 2, 3])
    s = g.seqs[0]
    bm.allocate(g)
    s.append(4)
    assert bm.append_slots(s) == [] and len(bm.get_block_table(s)) == 1
    s.append(5)
    assert bm.can_append_slots(g)
    assert bm.append_slots(s) == [] and len(bm.get_block_table(s)) == 2
    assert bm.num_free_device_blocks == 2


def test_copy_on_write_after_fork():
    bm = BlockManager(block_size=4, num_device_blocks=8, num_cpu_blocks=0, watermark=0.0)
    g = group_of([1, 2, 3, 4, 5, 6])
    parent = g.seqs[0]
    bm.allocate(g)
    child = parent.fork()
    bm.fork(parent, child)
    g.seqs.append(child)
    before = list(bm.get_block_table(parent))
    assert bm.get_block_table(child) == before and all(refs(bm, b) == 2 for b in before)

    child.append(7)
    pairs = bm.append_slots(child)
    assert len(pairs) == 1
    src, dst = pairs[0]
    assert src == before[1] and dst not in before           # the source is never a destination
    assert bm.get_block_table(parent) == before            # the parent's table is untouched
    assert bm.get_block_table(child) == [before[0], dst]
    assert refs(bm, src) == 1 and refs(bm, dst) == 1 and refs(bm, before[0]) == 2
    parent.append(8)
    assert bm.append_slots(parent) == []                    # now the parent owns its last block
    assert bm.stats().copy_on_write_copies == 1


def test_append_on_a_full_shared_block_needs_no_copy():
    bm = BlockManager(block_size=2, num_device_blocks=8, num_cpu_blocks=0, watermark=0.0)
    g = group_of([1, 2], n=2)
    bm.allocate(g)
    a, b = g.seqs
    a.append(3), b.append(4)
    assert bm.append_slots(a) == [] and bm.append_slots(b) == []
    assert bm.get_block_table(a)[0] == bm.get_block_table(b)[0]
    assert bm.get_block_table(a)[1] != bm.get_block_table(b)[1]


def test_can_append_slots_counts_new_blocks_and_copies():
    bm = BlockManager(block_size=2, num_device_blocks=3, num_cpu_blocks=0, watermark=0.0)
    g = group_of([1, 2, 3], n=2)        # 2 shared blocks, the last partial; 1 free
    bm.allocate(g)
    for s in g.seqs:
        s.append(9)
    assert not bm.can_append_slots(g)   # both want to write into the shared partial block
    bm.free(g.seqs[1])
    g.seqs[1].status = SequenceStatus.FINISHED_STOPPED
    assert bm.can_append_slots(g)


# -- free ---------------------------------------------------------------------------------------
def test_free_returns_every_block_and_double_free_is_an_error():
    bm = BlockManager(block_size=4, num_device_blocks=10, num_cpu_blocks=0, watermark=0.0)
    g = group_of(list(range(9)), n=3)
    bm.allocate(g)
    for s in g.seqs:
        s.append(1)
        bm.append_slots(s)
    for s in g.seqs:
        bm.free(s)
    assert bm.num_free_device_blocks == 10
    assert all(c == 0 for c in bm.pools[Device.DEVICE].ref_counts)
    with pytest.raises(BlockManagerError):
        bm.free(g.seqs[0])


# -- swapping -----------------------------------------------------------------------------------
def test_swap_out_and_in_moves_shared_blocks_once():
    bm = BlockManager(block_size=4, num_device_blocks=12, num_cpu_blocks=12, watermark=0.0)
    g = group_of(list(range(6)), n=2)
    bm.allocate(g)
    a, b = g.seqs
    a.append(1), b.append(2)
    bm.append_slots(a), bm.append_slots(b)               # one CoW copy: 3 unique blocks
    unique = set(bm.get_block_table(a)) | set(bm.get_block_table(b))
    assert len(unique) == 3
    free_dev, free_cpu = bm.num_free_device_blocks, bm.num_free_cpu_blocks

    assert bm.can_swap_out(g)
    out = dict(bm.swap_out(g))
    assert set(out) == unique and len(set(out.values())) == 3
    assert bm.num_free_device_blocks == free_dev + 3 and bm.num_free_cpu_blocks == free_cpu - 3
    assert bm.get_device(a) is Device.CPU
    shared_cpu = bm.get_block_table(a)[0]
    assert bm.get_block_table(b)[0] == shared_cpu and refs(bm, shared_cpu, Device.CPU) == 2

    assert bm.can_swap_in(g) is AllocStatus.OK
    back = dict(bm.swap_in(g))
    assert set(back) == set(out.values()) and len(set(back.values())) == 3
    assert bm.num_free_device_blocks == free_dev and bm.num_free_cpu_blocks == free_cpu
    assert bm.get_block_table(a)[0] == bm.get_block_table(b)[0]
    assert bm.stats().blocks_swapped_out == 3 and bm.stats().blocks_swapped_in == 3


def test_cpu_pool_is_bounded():
    bm = BlockManager(block_size=4, num_device_blocks=8, num_cpu_blocks=1, watermark=0.0)
    g = group_of(list(range(8)))  # 2 blocks
    bm.allocate(g)
    assert not bm.can_swap_out(g)
    with pytest.raises(BlockManagerError, match="CPU pool"):
        bm.swap_out(g)
    assert bm.get_device(g.seqs[0]) is Device.DEVICE  # nothing moved


def test_swap_in_without_room_is_an_error():
    bm = BlockManager(block_size=4, num_device_blocks=2, num_cpu_blocks=4, watermark=0.0)
    g = group_of(list(range(8)), request_id="a")
    bm.allocate(g)
    bm.swap_out(g)
    other = group_of([1, 2, 3, 4, 5], request_id="b")
    bm.allocate(other)
    assert bm.can_swap_in(g) is AllocStatus.NEVER   # 2 blocks + room to grow > 2 in all
    with pytest.raises(BlockManagerError, match="to swap in"):
        bm.swap_in(g)
    with pytest.raises(BlockManagerError, match="cpu pool"):
        bm.append_slots(g.seqs[0])


def test_stats_report_waste():
    bm = BlockManager(block_size=8, num_device_blocks=10, num_cpu_blocks=0)
    bm.allocate(group_of(list(range(10))))   # 2 blocks, 10 of 16 slots used
    s = bm.stats()
    assert (s.slots_allocated, s.slots_used) == (16, 10)
    assert s.waste == pytest.approx(6 / 16)
