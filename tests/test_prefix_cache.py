"""Prefix caching in the block manager: chained hashes, hits on the longest cached prefix,
the evictable LRU list, exact admission, swapping, and the recompute cost that knows it."""
import pytest

from pagedkv.kvcache.allocator import BlockAllocator, Device
from pagedkv.kvcache.block_hash import ROOT, block_hash, full_blocks
from pagedkv.kvcache.block_manager import AllocStatus, BlockManager
from pagedkv.kvcache.sequence import Sequence, SequenceGroup, SequenceStatus
from pagedkv.preemption.policy import CostModel, PreemptionMode, PreemptionPolicy
from pagedkv.preemption.scheduler import Scheduler, SchedulerConfig, SchedulerOutput


def group_of(prompt, n=1, request_id="r"):
    first = Sequence.from_prompt(prompt)
    return SequenceGroup(request_id, [first] + [first.fork() for _ in range(n - 1)])


def run_prefill(bm, group):
    """Allocates the group and marks all its tokens computed, as a finished prefill does."""
    alloc = bm.allocate(group)
    for seq in group.unfinished_seqs():
        seq.num_computed_tokens = len(seq)
        bm.cache_computed(seq)
    return alloc


def refs(bm, block):
    return bm.pools[Device.DEVICE].ref_counts[block]


SYSTEM = list(range(100, 112))  # 3 full blocks of 4


# -- hashes --------------------------------------------------------------------------------------
def test_hashes_are_chained_on_the_parent():
    a, b = Sequence.from_prompt([1, 2, 3, 4, 5, 6, 7, 8]), Sequence.from_prompt([9, 2, 3, 4, 5, 6, 7, 8])
    ha, hb = [h for h, _ in full_blocks(a, 0, 2, 4)], [h for h, _ in full_blocks(b, 0, 2, 4)]
    assert ha[0] == block_hash(ROOT, (1, 2, 3, 4)) and ha[1] == block_hash(ha[0], (5, 6, 7, 8))
    assert ha[0] != hb[0] and ha[1] != hb[1]  # same tokens, different prefix
    assert a.block_hashes == ha and a.fork().block_hashes == ha  # kept, and a fork keeps them
    assert list(full_blocks(a, 1, 2, 4)) == [(ha[1], (5, 6, 7, 8))]


def test_lookup_checks_the_token_ids():
    pool = BlockAllocator(Device.DEVICE, 4)
    block = pool.allocate()
    digest = block_hash(ROOT, (1, 2))
    pool.cache(block, digest, (1, 2))
    assert pool.lookup(digest, (1, 2)) == block
    assert pool.lookup(digest, (1, 3)) is None  # a colliding hash with other tokens is a miss


# -- hits ----------------------------------------------------------------------------------------
def test_second_request_maps_the_cached_prefix():
    bm = BlockManager(block_size=4, num_device_blocks=16, num_cpu_blocks=0, watermark=0.0)
    a = group_of(SYSTEM + [1, 2], request_id="a")
    assert run_prefill(bm, a).computed_tokens == [0]
    b = group_of(SYSTEM + [3, 4, 5, 6, 7], request_id="b")
    free = bm.num_free_device_blocks
    assert bm.allocate(b).computed_tokens == [12]
    ta, tb = bm.get_block_table(a.seqs[0]), bm.get_block_table(b.seqs[0])
    assert tb[:3] == ta[:3] and all(refs(bm, blk) == 2 for blk in ta[:3])
    assert ta[3] != tb[3] and bm.num_free_device_blocks == free - 2  # only the 2 new blocks


def test_the_last_prompt_token_is_always_computed():
    bm = BlockManager(block_size=4, num_device_blocks=16, num_cpu_blocks=0, watermark=0.0)
    run_prefill(bm, group_of(SYSTEM, request_id="a"))
    same = group_of(SYSTEM, request_id="b")
    # Fully cached, but the last block is mapped afresh: its last token is computed for the
    # logits, and a block others read is never written.
    assert bm.allocate(same).computed_tokens == [8]
    assert refs(bm, bm.get_block_table(same.seqs[0])[2]) == 1


def test_partial_blocks_are_never_shared_across_requests():
    bm = BlockManager(block_size=4, num_device_blocks=16, num_cpu_blocks=0, watermark=0.0)
    run_prefill(bm, group_of([1, 2, 3, 4, 5, 6], request_id="a"))
    assert bm.stats().cached_blocks == 1
    b = group_of([1, 2, 3, 4, 5, 6, 7], request_id="b")
    assert bm.allocate(b).computed_tokens == [4]


def test_cached_blocks_outlive_their_request_and_count_as_free():
    bm = BlockManager(block_size=4, num_device_blocks=8, num_cpu_blocks=0, watermark=0.0)
    a = group_of(SYSTEM + [1], request_id="a")
    run_prefill(bm, a)
    bm.free(a.seqs[0])
    stats = bm.stats()
    assert bm.num_free_device_blocks == 8 and stats.device_blocks_used == 0
    assert stats.cached_blocks == 3 and stats.evictable_blocks == 3
    b = group_of(SYSTEM + [2], request_id="b")
    assert bm.allocate(b).computed_tokens == [12]
    assert bm.stats().evictable_blocks == 0 and bm.num_free_device_blocks == 4


def test_prefix_caching_off():
    bm = BlockManager(block_size=4, num_device_blocks=16, num_cpu_blocks=0, watermark=0.0,
                      enable_prefix_caching=False)
    run_prefill(bm, group_of(SYSTEM + [1], request_id="a"))
    assert bm.allocate(group_of(SYSTEM + [1], request_id="b")).computed_tokens == [0]
    assert bm.stats().cached_blocks == 0


def test_diverged_group_hits_its_own_blocks():
    # A group of two sequences that diverged after the prompt, as a recomputed beam is.
    bm = BlockManager(block_size=4, num_device_blocks=32, num_cpu_blocks=0, watermark=0.0)
    prompt = SYSTEM[:8]
    first = SequenceGroup("g", [Sequence(1, prompt + [1, 2, 3, 4, 5], 8), Sequence(2, prompt + [6, 7, 8, 9, 1, 2], 8)])
    run_prefill(bm, first)
    for seq in first.seqs:
        bm.free(seq)
    again = SequenceGroup("g", [Sequence(3, prompt + [1, 2, 3, 4, 5], 8), Sequence(4, prompt + [6, 7, 8, 9, 1, 2], 8)])
    alloc = bm.allocate(again)
    assert alloc.shared_tokens == 8 and alloc.computed_tokens == [12, 12]
    t0, t1 = (bm.get_block_table(s) for s in again.seqs)
    assert t0[:2] == t1[:2] and t0[2] != t1[2]


def test_group_hits_no_further_than_its_shortest_shared_head():
    bm = BlockManager(block_size=4, num_device_blocks=32, num_cpu_blocks=0, watermark=0.0)
    run_prefill(bm, group_of(list(range(1, 13)), request_id="a"))
    # The shared part is 2 full blocks, but the 8-token sequence computes its 8th token.
    g = SequenceGroup("g", [Sequence(1, list(range(1, 9)), 8), Sequence(2, list(range(1, 13)), 8)])
    alloc = bm.allocate(g)
    assert alloc.computed_tokens == [4, 4]
    t0, t1 = (bm.get_block_table(s) for s in g.seqs)
    assert t0 == t1[:2]


# -- eviction ------------------------------------------------------------------------------------
def test_never_used_blocks_go_first_then_least_recently_used_tails_first():
    bm = BlockManager(block_size=4, num_device_blocks=5, num_cpu_blocks=0, watermark=0.0)
    a = group_of(SYSTEM, request_id="a")                       # 3 full blocks, all cached
    run_prefill(bm, a)
    table_a = list(bm.get_block_table(a.seqs[0]))
    bm.free(a.seqs[0])
    b = group_of([7, 7, 7, 7, 7], request_id="b")              # 2 blocks: the 2 never used
    run_prefill(bm, b)
    assert not set(bm.get_block_table(b.seqs[0])) & set(table_a) and bm.stats().evicted_blocks == 0
    c = group_of([8] * 8, request_id="c")                      # 2 more: a's tail goes first
    bm.allocate(c)
    assert bm.get_block_table(c.seqs[0]) == [table_a[2], table_a[1]]
    assert bm.stats().evicted_blocks == 2
    # a's head is still cached: a new request with the same start hits it.
    bm.free(b.seqs[0])
    assert bm.allocate(group_of(SYSTEM[:4] + [1], request_id="d")).computed_tokens == [4]


def test_uncached_blocks_are_reused_before_cached_ones():
    bm = BlockManager(block_size=4, num_device_blocks=3, num_cpu_blocks=0, watermark=0.0)
    a = group_of([1, 2, 3, 4, 5, 6], request_id="a")           # 1 cached block, 1 partial
    run_prefill(bm, a)
    cached, partial = bm.get_block_table(a.seqs[0])
    bm.free(a.seqs[0])
    b = group_of([9, 9, 9, 9, 9, 9, 9, 9], request_id="b")     # takes the never-used block first
    bm.allocate(b)
    assert cached not in bm.get_block_table(b.seqs[0]) and partial in bm.get_block_table(b.seqs[0])
    assert bm.stats().evicted_blocks == 0 and bm.stats().cached_blocks == 1


def test_evicted_blocks_leave_the_hash_table():
    bm = BlockManager(block_size=4, num_device_blocks=3, num_cpu_blocks=0, watermark=0.0)
    a = group_of(SYSTEM, request_id="a")
    run_prefill(bm, a)
    bm.free(a.seqs[0])
    run_prefill(bm, group_of([5] * 12, request_id="b"))        # every block evicted and reused
    pool = bm.pools[Device.DEVICE]
    assert bm.stats().evicted_blocks == 3
    assert sorted(pool.hash_table().values()) == [0, 1, 2]
    assert all(entry.token_ids == (5, 5, 5, 5) for entry in pool.cached.values())


# -- admission -------------------------------------------------------------------------------------
def test_watermark_is_exact_with_hits():
    bm = BlockManager(block_size=4, num_device_blocks=10, num_cpu_blocks=0, watermark=0.2)
    assert bm.watermark_blocks == 2
    a = group_of(SYSTEM + [1], request_id="a")                # 4 blocks, still running
    run_prefill(bm, a)
    # 6 free. Without the cache, 20 tokens need 5 blocks (6 - 5 < 2: LATER); with 3 of them
    # held by a, only 2 are new.
    b = group_of(SYSTEM + list(range(8)), request_id="b")
    assert bm.can_allocate(b) is AllocStatus.OK
    bm.allocate(b)
    assert bm.num_free_device_blocks == 4
    # Evictable hits cost a free block each: 12 cached tokens of a finished request.
    bm.free(a.seqs[0])
    bm.free(b.seqs[0])
    assert bm.num_free_device_blocks == 10
    full = group_of(SYSTEM + list(range(20)), request_id="c")  # 8 blocks: 10 - 8 = 2 OK
    assert bm.can_allocate(full) is AllocStatus.OK
    bigger = group_of(SYSTEM + list(range(21)), request_id="d")  # 9 blocks, hits or not: NEVER
    assert bm.can_allocate(bigger) is AllocStatus.NEVER
    bm.allocate(full)
    assert bm.num_free_device_blocks == 2


def test_hits_are_taken_before_new_blocks_can_evict_them():
    bm = BlockManager(block_size=4, num_device_blocks=4, num_cpu_blocks=0, watermark=0.0)
    a = group_of(SYSTEM + [1], request_id="a")
    run_prefill(bm, a)
    bm.free(a.seqs[0])  # 3 cached and evictable, 1 free
    b = group_of(SYSTEM + [2, 3, 4, 5, 6], request_id="b")  # 3 hits + 2 new: 5 > 4
    assert bm.can_allocate(b) is AllocStatus.NEVER
    c = group_of(SYSTEM + [2], request_id="c")  # 3 hits + 1 new
    assert bm.can_allocate(c) is AllocStatus.OK
    assert bm.allocate(c).computed_tokens == [12]
    assert bm.stats().evicted_blocks == 0 and bm.num_free_device_blocks == 0


# -- swapping --------------------------------------------------------------------------------------
def test_swapped_out_blocks_leave_the_cache_and_are_hashed_again_on_the_way_back():
    bm = BlockManager(block_size=4, num_device_blocks=16, num_cpu_blocks=16, watermark=0.0)
    a = group_of(SYSTEM + [1], request_id="a")
    run_prefill(bm, a)
    b = group_of(SYSTEM[:8] + [9, 9, 9, 9, 9], request_id="b")
    run_prefill(bm, b)  # shares a's first 2 blocks, caches 1 of its own
    assert bm.stats().cached_blocks == 4
    bm.swap_out(a)
    # a's third block had no other holder: it left the cache; the 2 shared ones stay.
    assert bm.stats().cached_blocks == 3
    c = group_of(SYSTEM + [2], request_id="c")
    assert bm.allocate(c).computed_tokens == [8]
    bm.free(b.seqs[0])
    shared = bm.get_block_table(c.seqs[0])[:2]
    copies = bm.swap_in(a)
    table = bm.get_block_table(a.seqs[0])
    pool = bm.pools[Device.DEVICE]
    # The 2 shared blocks never left the device (c holds them): a comes back onto them, without
    # a copy; its own 2 are copied, and the full one of them is cached again.
    assert table[:2] == shared and [dst for _, dst in copies] == table[2:]
    assert table[2] in pool.cached and table[3] not in pool.cached
    assert bm.stats().swap_copies_saved == 2
    assert bm.allocate(group_of(SYSTEM + [3], request_id="d")).computed_tokens == [12]


@pytest.mark.parametrize("same_step", [True, False])
def test_groups_sharing_cached_blocks_swap_them_once_each_way(same_step):
    """Two requests share a cached head. Swapped out (in one step's plan or in two), the head
    takes one set of CPU blocks; swapped back in, one set of device blocks. A plan keyed by
    block kept only the second group's copy of the head, and the first came back with garbage."""
    bm = BlockManager(block_size=4, num_device_blocks=16, num_cpu_blocks=16, watermark=0.0)
    a, b = group_of(SYSTEM + [1], request_id="a"), group_of(SYSTEM + [2, 3], request_id="b")
    run_prefill(bm, a)
    assert run_prefill(bm, b).computed_tokens == [12]
    head = bm.get_block_table(a.seqs[0])[:3]
    assert bm.get_block_table(b.seqs[0])[:3] == head
    out_a = bm.swap_out(a)
    out_b = bm.swap_out(b)
    plan = out_a + out_b
    assert sorted(src for src, _ in plan) == sorted(set(src for src, _ in plan))  # each block moves once
    assert len(plan) == 3 + 2 and bm.num_free_cpu_blocks == 16 - 5
    cpu_head = bm.get_block_table(a.seqs[0])[:3]
    assert bm.get_block_table(b.seqs[0])[:3] == cpu_head
    assert all(bm.pools[Device.CPU].ref_counts[block] == 2 for block in cpu_head)
    if same_step:
        back = bm.swap_in(a) + bm.swap_in(b)
    else:
        back = bm.swap_in(b)
        back += bm.swap_in(a)
    assert len({dst for _, dst in back}) == len(back) == 5 and bm.stats().swap_copies_saved == 3 + 3
    assert bm.get_block_table(a.seqs[0])[:3] == bm.get_block_table(b.seqs[0])[:3]
    assert all(refs(bm, block) == 2 for block in bm.get_block_table(a.seqs[0])[:3])
    for group in (a, b):
        bm.free(group.seqs[0])
    assert bm.num_free_device_blocks == 16 and bm.num_free_cpu_blocks == 16


def test_a_twin_is_dropped_when_its_block_is_freed():
    """A device block freed after its copy went to the CPU may be rewritten: the next group that
    swaps the same contents copies them again instead of trusting the old link."""
    bm = BlockManager(block_size=4, num_device_blocks=16, num_cpu_blocks=16, watermark=0.0,
                      enable_prefix_caching=False)
    a = group_of(SYSTEM, n=2, request_id="a")
    run_prefill(bm, a)
    first = bm.swap_out(a)
    assert len(first) == 3  # once for both sequences
    back = bm.swap_in(a)
    assert len(back) == 3  # the device originals were freed: their links went with them
    for seq in a.seqs:
        bm.free(seq)
    assert not any(bm._twins.values())


def test_fork_and_copy_on_write_with_cached_blocks():
    bm = BlockManager(block_size=4, num_device_blocks=16, num_cpu_blocks=0, watermark=0.0)
    run_prefill(bm, group_of(SYSTEM + [1], request_id="a"))
    g = group_of(SYSTEM + [2, 3], request_id="g")
    run_prefill(bm, g)
    parent = g.seqs[0]
    child = parent.fork()
    bm.fork(parent, child)
    g.seqs.append(child)
    head = bm.get_block_table(parent)[:3]
    assert all(refs(bm, blk) == 3 for blk in head)
    child.append(4)
    pairs = bm.append_slots(child)
    assert len(pairs) == 1 and pairs[0][0] == bm.get_block_table(parent)[3]  # only the partial block
    assert bm.get_block_table(child)[:3] == head


# -- preemption ------------------------------------------------------------------------------------
def test_kept_tokens_are_those_other_requests_hold():
    bm = BlockManager(block_size=4, num_device_blocks=16, num_cpu_blocks=0, watermark=0.0)
    a = group_of(SYSTEM + [1, 2, 3, 4, 5], request_id="a")
    run_prefill(bm, a)
    assert bm.num_kept_tokens(a) == 0  # alone: freeing would make every block evictable
    b = group_of(SYSTEM[:8] + [6], request_id="b")
    run_prefill(bm, b)
    assert bm.num_kept_tokens(a) == 8 and bm.num_kept_tokens(b) == 8


def test_recompute_cost_counts_only_uncached_tokens():
    cost = CostModel(prefill_tokens_per_s=1000.0, swap_bytes_per_s=1e6)
    policy = PreemptionPolicy("auto", cost, bytes_per_block=1000)
    group = SequenceGroup("g", [Sequence(1, list(range(110)), 100)])
    group.is_prefilling = False
    # Swap: 2 * 4 blocks * 1000 B / 1e6 B/s = 8 ms. Recompute: 110 tokens = 110 ms, 5 = 5 ms.
    assert policy.choose(group, 4, can_swap=True) is PreemptionMode.SWAP
    assert policy.choose(group, 4, can_swap=True, cached_tokens=105) is PreemptionMode.RECOMPUTE


# -- scheduler -------------------------------------------------------------------------------------
def make_scheduler(num_blocks=32, budget=64, mode="recompute", caching=True):
    bm = BlockManager(block_size=4, num_device_blocks=num_blocks, num_cpu_blocks=0, watermark=0.0,
                      enable_prefix_caching=caching)
    policy = PreemptionPolicy(mode, CostModel(), bytes_per_block=1000)
    return Scheduler(SchedulerConfig(max_num_batched_tokens=budget, preemption_mode=mode), bm, policy)


def step(sched):
    """One iteration without a model: every row that samples gets a made-up token."""
    out = sched.schedule()
    for row in out.scheduled:
        if row.sample:
            row.seq.append(len(row.seq) % 50 + 1)
    return out


def request(prompt, request_id, arrival=0.0):
    group = group_of(prompt, request_id=request_id)
    group.arrival_time = arrival
    return group


def test_prefill_starts_at_the_cached_length():
    sched = make_scheduler()
    sched.add(request(SYSTEM + [1], "a", 0.0))
    out = step(sched)
    assert [(r.start, r.end) for r in out.prefills] == [(0, 13)]
    sched.add(request(SYSTEM + [2, 3], "b", 1.0))
    out = step(sched)
    assert [(r.group.request_id, r.start, r.end) for r in out.scheduled] == [("b", 12, 14), ("a", 13, 14)]
    assert (sched.prefix_queried_tokens, sched.prefix_hit_tokens) == (27, 12)


def test_same_prompt_in_one_step_hits_what_the_first_one_computes():
    # Each layer writes the batch's K/V before attention reads, so b can read what a writes.
    sched = make_scheduler()
    sched.add(request(SYSTEM + [1], "a", 0.0))
    sched.add(request(SYSTEM + [2], "b", 1.0))
    out = step(sched)
    assert [(r.start, r.end) for r in out.scheduled] == [(0, 13), (12, 13)]


def test_chunked_prefill_starts_at_the_cached_length():
    sched = make_scheduler(budget=5)
    a = request(SYSTEM + [1], "a", 0.0)
    sched.add(a)
    spans = [(r.start, r.end) for _ in range(3) for r in step(sched).prefills]
    assert spans == [(0, 5), (5, 10), (10, 13)]
    sched.finish(a, SequenceStatus.FINISHED_STOPPED)
    sched.free_finished()
    sched.add(request(SYSTEM + list(range(10)), "b", 1.0))
    spans = [(r.start, r.end) for _ in range(2) for r in step(sched).prefills]
    assert spans == [(12, 17), (17, 22)]


@pytest.mark.parametrize("how", ["abort", "preempt"])
def test_a_group_ended_mid_prefill_offers_only_what_its_lead_computed(how):
    """n samples share their prompt, which the lead computes for all of them; the others count it
    as computed from the start. Ended before the lead got through it, the group must not offer
    the unwritten blocks to the prefix cache (the others' counts once did)."""
    sched = make_scheduler(budget=5)
    group = group_of(SYSTEM + [1], n=3, request_id="a")
    sched.add(group)
    assert [(r.start, r.end) for r in step(sched).prefills] == [(0, 5)]
    if how == "abort":
        sched.abort("a")
    else:
        sched._preempt(group, SchedulerOutput())
    bm = sched.bm
    pool = bm.pools[Device.DEVICE]
    assert len(pool.cached) == 1  # the lead's first block; not the 2 it had not reached
    assert bm.allocate(group_of(SYSTEM + [2], request_id="b")).computed_tokens == [4]


def test_caching_off_computes_everything():
    sched = make_scheduler(caching=False)
    sched.add(request(SYSTEM + [1], "a", 0.0))
    step(sched)
    sched.add(request(SYSTEM + [2, 3], "b", 1.0))
    assert [(r.start, r.end) for r in step(sched).prefills] == [(0, 14)]
    assert sched.prefix_hit_tokens == 0


def test_a_recomputed_group_finds_its_own_blocks_and_they_are_not_prefix_hits():
    sched = make_scheduler(num_blocks=6)
    a = request(list(range(1, 9)), "a", 0.0)
    sched.add(a)
    sched.add(request(list(range(11, 19)), "b", 1.0))
    recomputed = None
    for _ in range(30):
        out = step(sched)
        if out.preempted:
            assert [(g.request_id, m) for g, m in out.preempted] == [("b", PreemptionMode.RECOMPUTE)]
            sched.finish(a, SequenceStatus.FINISHED_STOPPED)  # a leaves room, b comes back
            sched.free_finished()
        back = [r for r in out.prefills if r.group.request_id == "b" and r.start > 0]
        if back:
            recomputed = back[0]
            break
    assert sched.preemptions["recompute"] >= 1 and recomputed is not None
    assert recomputed.start % 4 == 0 and recomputed.start >= 8  # at least b's prompt was still cached
    assert sched.recompute_cached_tokens == recomputed.start
    assert (sched.prefix_queried_tokens, sched.prefix_hit_tokens) == (16, 0)
    for group in list(sched.running) + list(sched.waiting):
        sched.finish(group, SequenceStatus.FINISHED_ABORTED)
    assert sched.bm.num_free_device_blocks == 6


def test_decoded_blocks_are_cached_when_the_sequence_is_freed():
    sched = make_scheduler()
    a = request([1, 2, 3, 4, 5, 6], "a", 0.0)
    sched.add(a)
    for _ in range(4):                         # prefill, then decodes: 10 tokens, 9 computed
        step(sched)
    seq = a.seqs[0]
    assert seq.num_computed_tokens == 9 and sched.bm.stats().cached_blocks == 1  # decoding adds none
    sched.finish(a, SequenceStatus.FINISHED_STOPPED)
    assert sched.bm.stats().cached_blocks == 2  # the block that decoding filled, on the way out
    sched.free_finished()
    sched.add(request(seq.token_ids + [7, 7], "b", 1.0))  # the next turn of a chat
    assert [(r.start, r.end) for r in step(sched).prefills] == [(8, 12)]
