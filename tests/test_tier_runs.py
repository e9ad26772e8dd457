"""A prefix whose blocks alternate between the tiers below the device: the host leaves to the
disk the blocks the disk holds, so a block on disk can be followed by one in the host. Both are
found, each lands in its own slot, and a failed read of the first makes the one after it count
for nothing (it is recomputed, though the host copied it)."""
import pytest

from pagedkv.kvcache.allocator import Device
from pagedkv.kvcache.block_hash import ROOT, block_hash
from pagedkv.kvcache.block_manager import BlockManager
from pagedkv.kvcache.disk_tier import DiskTier
from pagedkv.kvcache.sequence import Sequence, SequenceGroup, next_seq_id

FINGERPRINT = "f" * 64
HEAD, TAIL = (1, 2), (3, 4)


def alternating_tiers(tmp_path):
    """The head block only on disk, the tail block only in the host tier."""
    disk = DiskTier(tmp_path, 1 << 20, FINGERPRINT, block_bytes=8)
    bm = BlockManager(2, num_device_blocks=4, num_cpu_blocks=2, watermark=0.0, host_caching=True, stores=[disk])
    head = block_hash(ROOT, HEAD)
    tail = block_hash(head, TAIL)
    disk.prepare_store(head, HEAD, b"head-kv!", ROOT)
    disk.wait_idle()
    disk.poll()
    host = bm.pools[Device.CPU]
    block = host.allocate()
    host.cache(block, tail, TAIL, head)
    host.free(block)
    return bm, disk, block


@pytest.mark.parametrize("damaged", [False, True])
def test_a_prefix_from_the_disk_then_the_host(tmp_path, damaged):
    bm, disk, host_block = alternating_tiers(tmp_path)
    if damaged:
        disk.path(block_hash(ROOT, HEAD)).write_bytes(b"damaged")
    seq = Sequence(next_seq_id(), [*HEAD, *TAIL, 5], 5)
    group = SequenceGroup("r", [seq])
    bm.begin_step()
    alloc = bm.allocate(group)
    table = bm.get_block_table(seq)
    assert alloc.loading and alloc.computed_tokens == [0]  # nothing in place before the read
    ops = bm.take_tier_ops()
    assert ops.host_loads == [(host_block, table[1])]  # the tail, into its own slot
    disk.wait_idle()
    bm.begin_step()
    assert not bm.is_loading(group)
    done = bm.finish_loads(group)
    loads = bm.take_tier_ops().loads
    if damaged:
        assert done == 0 and loads == []  # the head is recomputed, and so the tail after it
    else:
        assert done == 4 and [(op.block, op.payload) for op in loads] == [(table[0], b"head-kv!")]
    bm.free(seq)
    bm.begin_step()
    for pool in bm.pools.values():
        assert pool.num_free_blocks == pool.num_blocks
    disk.close()
