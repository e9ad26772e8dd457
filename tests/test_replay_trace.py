"""tools.replay_trace: traces in Mooncake's format through the block manager and its tiers
(no model): hand-counted hits per tier, an unbounded cache bounds every tiered one, larger tiers
never hit less on chat-shaped traces, the in-memory store stands in for the DiskTier, and the
orders in which the host and disk tiers evict a prefix the device evicted tail first (the
replays showed both wrong once)."""
from __future__ import annotations

import json
import random

import pytest

from pagedkv.ablation.report import BENCHMARKS
from pagedkv.kvcache.allocator import Device
from pagedkv.kvcache.block_manager import BlockManager
from pagedkv.kvcache.disk_tier import DiskTier, encode_block
from pagedkv.kvcache.sequence import Sequence, SequenceGroup, next_seq_id
from tools import replay_trace as rt
from tools.multiturn_workloads import multi_turn, to_trace


def chat_trace(conversations: int, turns: int, seed: int, trace_block: int = 8) -> list[rt.TraceRequest]:
    """Conversations behind one shared head, round robin: each turn repeats the conversation's
    last turn and adds blocks (every request's blocks are a prefix chain that later requests of
    its conversation continue)."""
    rng = random.Random(seed)
    counter = iter(range(1, 1 << 30))
    head = [next(counter) for _ in range(2)]
    history = [head + [next(counter) for _ in range(rng.randint(1, 3))] for _ in range(conversations)]
    trace = []
    for turn in range(turns):
        for c in range(conversations):
            if turn:
                history[c] = history[c] + [next(counter) for _ in range(rng.randint(1, 2))]
            length = len(history[c]) * trace_block - rng.randint(0, trace_block - 1)
            trace.append(rt.TraceRequest(len(trace), length, rng.randint(1, 12), list(history[c])))
    return trace


def fits(trace: list[rt.TraceRequest], block_size: int) -> int:
    """The smallest device pool that runs every request of the trace alone."""
    return max(-(-(r.input_length + r.output_length) // block_size) + 1 for r in trace)


def test_trace_files_and_tokens(tmp_path):
    trace = rt.synthetic_trace(num_groups=2, requests_per_group=3, trace_block=8, seed=1)
    rt.write_trace(tmp_path / "t.jsonl", trace)
    assert rt.read_trace(tmp_path / "t.jsonl") == trace
    a, b = rt.TraceRequest(0, 20, 1, [7, 8, 9]), rt.TraceRequest(1, 12, 1, [7, 8])
    ta, tb = rt.prompt_tokens(a, 8, 0), rt.prompt_tokens(b, 8, 1)
    assert len(ta) == 20 and len(tb) == 12 and ta[:12] == tb  # shared ids, shared tokens; cut to the length
    assert rt.prompt_tokens(rt.TraceRequest(0, 20, 1, [9]), 8, 2)[:8] != ta[:8]
    assert len(rt.prompt_tokens(rt.TraceRequest(0, 30, 1, [1, 2]), 8, 3)) == 30  # too few ids: filled
    (tmp_path / "bad.jsonl").write_text('{"timestamp": 0}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        rt.read_trace(tmp_path / "bad.jsonl")


@pytest.mark.parametrize("store", ["memory", "disk"])
def test_hits_per_tier_counted_by_hand(store):
    # Blocks of 4 tokens, trace blocks of 8. A: 16 tokens (4 blocks); C: 16 other tokens; B: A's
    # 16 tokens and 4 more. A device pool of 5 blocks: C takes the one never used and evicts A's
    # three last blocks (a prefix's tail goes first), which the host tier keeps (or, without it,
    # the store tier); B then finds A's first block on the device and the next three below it.
    # B's fifth block holds its last token, computed for its logits: never a hit.
    trace = [rt.TraceRequest(0, 16, 0, [1, 2]), rt.TraceRequest(1, 16, 0, [5, 6]), rt.TraceRequest(2, 20, 0, [1, 2, 3])]
    kw = dict(block_size=4, trace_block=8, store=store, prompts_only=True)
    host = rt.replay(trace, rt.TierConfig(5, 8, 0), **kw)
    assert host.hit_tokens == {"device": 4, "host": 12, "disk": 0}
    disk = rt.replay(trace, rt.TierConfig(5, 0, 8), **kw)
    assert disk.hit_tokens == {"device": 4, "host": 0, "disk": 12}
    device = rt.replay(trace, rt.TierConfig(5), **kw)
    assert device.hit_tokens == {"device": 4, "host": 0, "disk": 0}
    unbounded = rt.replay(trace, None, **kw)
    assert unbounded.hit_tokens["device"] == 16 and unbounded.prompt_tokens == 52
    assert unbounded.ratio() == pytest.approx(16 / 52)


def test_a_prompt_larger_than_the_device_pool_misses_every_token():
    trace = [rt.TraceRequest(0, 40, 0, [1, 2, 3, 4, 5]), rt.TraceRequest(1, 40, 0, [1, 2, 3, 4, 5])]
    result = rt.replay(trace, rt.TierConfig(6, 16, 16), block_size=4, trace_block=8, store="memory")
    assert result.skipped == 2 and result.requests == 0 and result.prompt_tokens == 80 and result.ratio() == 0.0


@pytest.mark.parametrize("seed", range(4))
def test_an_unbounded_cache_bounds_every_tiered_one(seed):
    trace = rt.synthetic_trace(num_groups=3, requests_per_group=5, trace_block=8, output_length=(1, 12), seed=seed)
    m = fits(trace, 4)
    kw = dict(block_size=4, trace_block=8, store="memory", concurrency=1 + seed % 3, prompts_only=bool(seed % 2))
    bound = rt.replay(trace, None, **kw)
    assert bound.skipped == 0 and bound.hit_tokens["device"] == bound.total_hit_tokens > 0
    for config in [(m, 0, 0), (m, 8, 0), (m, 0, 16), (m, 8, 16), (2 * m, 64, 64), (m + 4, 3, 5)]:
        result = rt.replay(trace, rt.TierConfig(*config), **kw)
        assert result.prompt_tokens == bound.prompt_tokens
        assert result.total_hit_tokens <= bound.total_hit_tokens, config
    # Tiers that hold everything the device evicts reach the bound.
    big = rt.replay(trace, rt.TierConfig(m, 0, 10 * bound.device_blocks), **kw)
    assert big.total_hit_tokens == bound.total_hit_tokens


@pytest.mark.parametrize("seed", range(6))
def test_larger_tiers_never_hit_less_on_a_chat_trace(seed):
    """On conversations that each continue their own last turn, round robin, each tier alone
    never hits less when it grows. Under a host tier of fixed size, a disk that holds everything
    reaches the unbounded cache's hits. In between the pair need not grow monotonically: the
    disk's leaves-first eviction has no stack property, what the host keeps depends on what the
    disk holds (it leaves those to the disk), and a request waiting for reads changes the order
    in which the device caches and evicts."""
    trace = chat_trace(6, 4, seed)
    m = fits(trace, 4)
    sizes = (0, 4, 8, 16, 32, 64, 128)
    kw = dict(block_size=4, trace_block=8, store="memory", prompts_only=bool(seed % 2))
    for grid in ([(m + d, 0, 0) for d in sizes], [(m, h, 0) for h in sizes], [(m, 0, s) for s in sizes]):
        hits = [rt.replay(trace, rt.TierConfig(*c), **kw).total_hit_tokens for c in grid]
        assert hits == sorted(hits), (grid, hits)
    bound = rt.replay(trace, None, **kw)
    under_host = [rt.replay(trace, rt.TierConfig(m, 8, s), **kw) for s in (*sizes, 10 * bound.device_blocks)]
    assert under_host[0].hit_tokens["disk"] == 0 and under_host[-1].total_hit_tokens == bound.total_hit_tokens


@pytest.mark.parametrize("seed", range(3))
def test_the_memory_store_equals_the_disk_tier_while_it_has_room(seed):
    trace = rt.synthetic_trace(num_groups=3, requests_per_group=5, trace_block=16, output_length=(1, 24), seed=seed)
    m = fits(trace, 4)
    kw = dict(block_size=4, trace_block=16, concurrency=1 + seed % 2)
    for config in [(m, 0, 4096), (m, 8, 4096)]:
        disk = rt.replay(trace, rt.TierConfig(*config), store="disk", **kw)
        memory = rt.replay(trace, rt.TierConfig(*config), store="memory", **kw)
        assert disk.hit_tokens == memory.hit_tokens and disk.hit_tokens["disk"] > 0


def test_the_memory_store_equals_the_disk_tier_when_full():
    trace = rt.synthetic_trace(num_groups=4, requests_per_group=10, trace_block=16, output_length=(1, 24), seed=3)
    config = rt.TierConfig(fits(trace, 4), 0, 48)
    disk = rt.replay(trace, config, block_size=4, trace_block=16, store="disk")
    memory = rt.replay(trace, config, block_size=4, trace_block=16, store="memory")
    assert disk.hit_tokens == memory.hit_tokens


def test_the_disk_tier_evicts_a_prefix_stored_tail_first(tmp_path):
    """The device evicts a prefix tail first, so the disk receives it tail first. Its head, once
    the tail has gone, is a leaf like any other and must be evictable."""
    fingerprint = "f" * 64
    head, tail, *others = (bytes([i]) * 32 for i in range(1, 8))
    size = len(encode_block(fingerprint, head, (1, 2), bytes(8), tail))
    tier = DiskTier(tmp_path, 2 * size, fingerprint, block_bytes=8)

    def store(block_hash: bytes, parent: bytes) -> None:
        tier.prepare_store(block_hash, (1, 2), bytes(8), parent)
        tier.wait_idle()
        tier.poll()

    store(tail, head)
    store(head, b"")
    for block_hash in others:  # each needs room: the least recently used leaf goes
        store(block_hash, b"")
    held = set(tier._index)
    tier.close()
    assert head not in held, "the head stayed while newer blocks were evicted"


def test_the_host_tier_evicts_a_demoted_prefix_tail_first():
    bm = BlockManager(4, num_device_blocks=4, num_cpu_blocks=8, watermark=0.0, host_caching=True)

    def run(tokens: range) -> Sequence:
        seq = Sequence(next_seq_id(), list(tokens), len(tokens))
        bm.begin_step()
        bm.allocate(SequenceGroup(f"r{seq.seq_id}", [seq]))
        seq.num_computed_tokens = len(seq)
        bm.cache_computed(seq)
        bm.take_tier_ops()
        bm.free(seq)
        return seq

    first = run(range(100, 113))  # three full blocks and a token
    run(range(200, 213))          # evicts them, tail first, into the host tier in one step
    bm.begin_step()
    host = bm.pools[Device.CPU]
    order = [host.cached[b].block_hash for b in host.evictable_block_ids()]
    assert order == list(reversed(first.block_hashes))  # the tail to go first, as on the device


def test_a_multi_turn_workload_exports_as_a_trace():
    workload = multi_turn(4, 3, 1000, clients=2, system_tokens=32, context_mean=40, context_range=(20, 60),
                          message_mean=10, message_range=(4, 20), answer_mean=6, answer_range=(2, 10), seed=2)
    trace = [rt.TraceRequest(r["timestamp"], r["input_length"], r["output_length"], r["hash_ids"])
             for r in to_trace(workload, 16)]
    assert len(trace) == 12 and all(len(r.hash_ids) == -(-r.input_length // 16) for r in trace)
    assert len({r.hash_ids[0] for r in trace}) == 1  # the shared system prompt's first block
    by_conversation: dict[int, list[rt.TraceRequest]] = {}
    for (c, _), r in zip(workload.interleaved(range(3)), trace):
        by_conversation.setdefault(c, []).append(r)
    for turns in by_conversation.values():
        for before, after in zip(turns, turns[1:]):
            full = before.input_length // 16
            assert after.hash_ids[:full] == before.hash_ids[:full]  # the history's full blocks
    bound = rt.replay(trace, None, block_size=16, trace_block=16, store="memory")
    assert bound.total_hit_tokens > 0


def test_the_command_line(tmp_path):
    before = BENCHMARKS.read_text() if BENCHMARKS.exists() else None
    path = tmp_path / "trace.jsonl"
    assert rt.main(["--generate", str(path), str(path), "--block-size", "64", "--config", "80,0,0",
                    "--config", "80,64,0", "--config", "80,0,128", "--out", str(tmp_path / "out")]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["config"] for r in results] == ["unbounded", "80,0,0", "80,64,0", "80,0,128"]
    assert all(r["hit_ratio"] <= results[0]["hit_ratio"] for r in results)
    assert (tmp_path / "out" / "BENCHMARKS-section.md").exists()
    assert (BENCHMARKS.read_text() if BENCHMARKS.exists() else None) == before
    with pytest.raises(SystemExit):
        rt.main(["--config", "0,1,1", str(path)])
