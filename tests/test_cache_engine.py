"""The cache engine carries out the block manager's plans: swaps and copy-on-write copies."""
import torch

from pagedkv.kvcache.cache_engine import CacheEngine, CacheSpec


def filled_engine(num_device=6, num_cpu=4):
    spec = CacheSpec(num_layers=2, num_kv_heads=2, head_dim=4, block_size=3, dtype=torch.float32)
    engine = CacheEngine(spec, num_device, num_cpu, torch.device("cpu"))
    for b in range(num_device):
        engine.device_cache[b] = b + 1  # block b holds the value b+1 everywhere
    return engine


def test_swap_out_overwrite_swap_in_restores_contents():
    engine = filled_engine()
    original = engine.device_cache.clone()
    engine.swap_out([(1, 0), (4, 2)])
    assert torch.equal(engine.cpu_cache[0], original[1]) and torch.equal(engine.cpu_cache[2], original[4])
    engine.device_cache[1] = -1   # the freed blocks are reused by others
    engine.device_cache[4] = -2
    engine.swap_in([(0, 5), (2, 1)])
    assert torch.equal(engine.device_cache[5], original[1])
    assert torch.equal(engine.device_cache[1], original[4])
    for b in (0, 2, 3):           # untouched blocks stay as they were
        assert torch.equal(engine.device_cache[b], original[b])
    assert engine.bytes_swapped == 4 * engine.spec.bytes_per_block


def test_copy_on_write_copies_whole_blocks_only_where_planned():
    engine = filled_engine()
    original = engine.device_cache.clone()
    engine.copy([(0, 3), (2, 5)])
    assert torch.equal(engine.device_cache[3], original[0])
    assert torch.equal(engine.device_cache[5], original[2])
    for b in (0, 1, 2, 4):
        assert torch.equal(engine.device_cache[b], original[b])


def test_spec_sizes():
    spec = CacheSpec(num_layers=30, num_kv_heads=3, head_dim=64, block_size=16, dtype=torch.bfloat16)
    assert spec.bytes_per_block == 30 * 2 * 16 * 3 * 64 * 2
    assert spec.blocks_for_bytes(spec.bytes_per_block * 10.5) == 10
