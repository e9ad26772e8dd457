"""The torch reference kernels against a naive oracle built from python loops over slots."""

from __future__ import annotations

import math

import pytest
import torch

from pagedkv.kernels import reference as ref

HEADS = [(4, 4), (8, 2), (6, 3)]  # (query heads, kv heads): MHA and two GQA ratios
TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}


def make_cache(num_blocks, layers, block_size, kv_heads, head_dim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (num_blocks, layers, 2, block_size, kv_heads, head_dim)
    return torch.randn(shape, generator=g).to(dtype)


def make_tables(ctx_lens, block_size, num_blocks, seed=0, pad=-1):
    """Disjoint random blocks per sequence; unused entries hold `pad`."""
    g = torch.Generator().manual_seed(seed + 1)
    need = [math.ceil(c / block_size) for c in ctx_lens]
    width = max(need) + 2
    perm = torch.randperm(num_blocks, generator=g).tolist()
    assert sum(need) <= num_blocks
    tables = torch.full((len(ctx_lens), width), pad, dtype=torch.int32)
    at = 0
    for s, n in enumerate(need):
        tables[s, :n] = torch.tensor(perm[at : at + n], dtype=torch.int32)
        at += n
    return tables


def naive_kv(kv_cache, layer, table, ctx):
    """K and V [ctx, Hkv, D] of one sequence, slot by slot (zeros where the table names no
    block of the cache)."""
    bs = kv_cache.shape[3]
    zero = torch.zeros_like(kv_cache[0, layer, 0, 0])

    def row(p, kv):
        block = int(table[p // bs])
        return kv_cache[block, layer, kv, p % bs] if 0 <= block < kv_cache.shape[0] else zero

    ks = [row(p, 0) for p in range(ctx)]
    vs = [row(p, 1) for p in range(ctx)]
    return torch.stack(ks).double(), torch.stack(vs).double()


def naive_attention(q, positions, k, v, scale, window=0):
    """q [n, Hq, D]; row i sees keys 0..positions[i] (the last `window` of them when window > 0);
    explicit loops over heads."""
    n, hq, d = q.shape
    group = hq // k.shape[1]
    out = torch.zeros(n, hq, d, dtype=torch.float64)
    for i, pos in enumerate(positions):
        first = max(0, pos + 1 - window) if window > 0 else 0
        for h in range(hq):
            kk, vv = k[first: pos + 1, h // group], v[first: pos + 1, h // group]
            logits = kk @ q[i, h].double() * scale
            p = torch.exp(logits - logits.max())
            out[i, h] = (p / p.sum()) @ vv
    return out


def check_close(got, want, dtype):
    assert got.dtype == dtype
    err = (got.double() - want).abs().max().item()
    assert err <= TOL[dtype], f"max abs error {err}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("block_size", [1, 8, 16, 32])
def test_decode_matches_naive(block_size, heads, head_dim, dtype):
    hq, hkv = heads
    g = torch.Generator().manual_seed(block_size * 7 + hq + head_dim)
    ctx_lens = [1, block_size, 3 * block_size + 1, int(torch.randint(1, 90, (1,), generator=g))]
    num_blocks = sum(math.ceil(c / block_size) for c in ctx_lens) + 3
    cache = make_cache(num_blocks, 2, block_size, hkv, head_dim, dtype, seed=hq)
    tables = make_tables(ctx_lens, block_size, num_blocks, seed=block_size)
    query = torch.randn(len(ctx_lens), hq, head_dim, generator=g).to(dtype)
    scale = head_dim**-0.5
    got = ref.paged_attention_decode(
        query, cache, 1, tables, torch.tensor(ctx_lens, dtype=torch.int32), scale
    )
    for b, ctx in enumerate(ctx_lens):
        k, v = naive_kv(cache, 1, tables[b], ctx)
        want = naive_attention(query[b : b + 1], [ctx - 1], k, v, scale)
        check_close(got[b : b + 1], want, dtype)


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_decode_long_tailed_batch_in_chunks_matches_naive(block_size):
    # Many short rows and a few long ones: the rows are cut into several chunks by length.
    g = torch.Generator().manual_seed(block_size)
    ctx_lens = [int(x) for x in torch.randint(1, 24, (20,), generator=g)] + [0, 150, 300, 97, 64, 1]
    blocks = tuple(sorted((math.ceil(c / block_size) for c in ctx_lens), reverse=True))
    chunks = ref.decode_chunks(blocks, block_size)
    assert len(chunks) > 1
    assert [b0 for _, b0, _ in chunks] == [0] + [b1 for _, _, b1 in chunks[:-1]]
    assert chunks[-1][2] == blocks[0]
    assert all(n == sum(b > b0 for b in blocks) for n, b0, _ in chunks)
    num_blocks = sum(blocks) + 3
    cache = make_cache(num_blocks, 2, block_size, 2, 64, torch.float32, seed=3)
    tables = make_tables(ctx_lens, block_size, num_blocks, seed=block_size)
    query = torch.randn(len(ctx_lens), 6, 64, generator=g)
    got = ref.paged_attention_decode(query, cache, 1, tables, torch.tensor(ctx_lens, dtype=torch.int32), 0.125)
    for b, ctx in enumerate(ctx_lens):
        if ctx == 0:
            assert not got[b].any()
            continue
        k, v = naive_kv(cache, 1, tables[b], ctx)
        check_close(got[b : b + 1], naive_attention(query[b : b + 1], [ctx - 1], k, v, 0.125), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("block_size", [1, 8, 16, 32])
def test_prefill_matches_naive(block_size, heads, dtype):
    """Fresh prefill, chunked prefill with a cached prefix, a decode token, an empty sequence."""
    hq, hkv = heads
    head_dim = 64 if block_size % 16 else 128
    seqs = [(37, 37), (50, 9), (20, 1), (5, 0), (2 * block_size, 2 * block_size)]  # (ctx, q_len)
    ctx_lens = [c for c, _ in seqs]
    num_blocks = sum(math.ceil(c / block_size) for c in ctx_lens) + 2
    cache = make_cache(num_blocks, 3, block_size, hkv, head_dim, dtype, seed=block_size)
    tables = make_tables(ctx_lens, block_size, num_blocks, seed=hq, pad=0)
    starts = [0]
    for _, q_len in seqs:
        starts.append(starts[-1] + q_len)
    g = torch.Generator().manual_seed(hq * 3 + block_size)
    query = torch.randn(starts[-1], hq, head_dim, generator=g).to(dtype)
    scale = 0.1
    got = ref.paged_attention_prefill(
        query,
        cache,
        2,
        tables,
        torch.tensor(starts, dtype=torch.int32),
        torch.tensor(ctx_lens, dtype=torch.int32),
        scale,
    )
    assert got.shape == query.shape
    for s, (ctx, q_len) in enumerate(seqs):
        if q_len == 0:
            continue
        k, v = naive_kv(cache, 2, tables[s], ctx)
        positions = list(range(ctx - q_len, ctx))
        want = naive_attention(query[starts[s] : starts[s + 1]], positions, k, v, scale)
        check_close(got[starts[s] : starts[s + 1]], want, dtype)


def test_prefill_after_reshape_and_cache_equals_decode_steps():
    """Write a prompt with reshape_and_cache, prefill it, then compare the last row with decode."""
    bs, hq, hkv, d, layers = 4, 4, 2, 64, 2
    cache = torch.zeros(16, layers, 2, bs, hkv, d)
    table = torch.tensor([[5, 2, 9, 11]], dtype=torch.int32)
    n = 13
    slots = torch.tensor([int(table[0, p // bs]) * bs + p % bs for p in range(n)])
    g = torch.Generator().manual_seed(3)
    key, value = torch.randn(n, hkv, d, generator=g), torch.randn(n, hkv, d, generator=g)
    ref.reshape_and_cache(key, value, cache, 1, slots)
    query = torch.randn(n, hq, d, generator=g)
    starts, lens = torch.tensor([0, n], dtype=torch.int32), torch.tensor([n], dtype=torch.int32)
    out = ref.paged_attention_prefill(query, cache, 1, table, starts, lens, 0.125)
    want = naive_attention(query, list(range(n)), key.double(), value.double(), 0.125)
    check_close(out, want, torch.float32)
    last = ref.paged_attention_decode(query[-1:], cache, 1, table, lens, 0.125)
    torch.testing.assert_close(last, out[-1:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reshape_and_cache_writes_exactly_the_slots(dtype):
    bs, layers, hkv, d = 8, 3, 2, 32
    cache = make_cache(10, layers, bs, hkv, d, dtype)
    before = cache.clone()
    slots = torch.tensor([17, -1, 0, 79, 40, -5, 8])
    g = torch.Generator().manual_seed(1)
    key = torch.randn(len(slots), hkv, d, generator=g).to(dtype)
    value = torch.randn(len(slots), hkv, d, generator=g).to(dtype)
    ref.reshape_and_cache(key, value, cache, 1, slots)
    want = before.clone()
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            want[s // bs, 1, 0, s % bs] = key[t]
            want[s // bs, 1, 1, s % bs] = value[t]
    assert torch.equal(cache, want)
    assert not torch.equal(cache, before)


def test_copy_blocks_copies_whole_blocks_only():
    cache = make_cache(12, 3, 4, 2, 32, torch.float32)
    before = cache.clone()
    pairs = torch.tensor([[3, 7], [3, 8], [0, 11], [5, 1]])
    ref.copy_blocks(cache, pairs)
    want = before.clone()
    for s, d in pairs.tolist():
        want[d] = before[s]
    assert torch.equal(cache, want)
    ref.copy_blocks(cache, torch.empty(0, 2, dtype=torch.long))
    assert torch.equal(cache, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swap_blocks_round_trip(dtype):
    device_pool = make_cache(10, 2, 4, 2, 32, dtype, seed=1)
    cpu_pool = make_cache(6, 2, 4, 2, 32, dtype, seed=2)
    dev_before, cpu_before = device_pool.clone(), cpu_pool.clone()
    out_map = torch.tensor([[9, 0], [2, 5], [4, 3]])
    ref.swap_blocks(device_pool, cpu_pool, out_map)
    want = cpu_before.clone()
    for s, d in out_map.tolist():
        want[d] = dev_before[s]
    assert torch.equal(cpu_pool, want)
    assert torch.equal(device_pool, dev_before)
    # ...and back into other device blocks.
    in_map = torch.tensor([[0, 1], [5, 6], [3, 7]])
    ref.swap_blocks(cpu_pool, device_pool, in_map)
    want_dev = dev_before.clone()
    for (s, _), (_, d) in zip(out_map.tolist(), in_map.tolist()):
        want_dev[d] = dev_before[s]
    assert torch.equal(device_pool, want_dev)


def test_swap_blocks_rejects_mismatched_pools():
    with pytest.raises(ValueError):
        ref.swap_blocks(torch.zeros(4, 2, 2, 4, 2, 32), torch.zeros(4, 2, 2, 8, 2, 32), torch.tensor([[0, 1]]))


def test_prefill_rejects_more_new_tokens_than_context():
    cache = torch.zeros(4, 1, 2, 4, 1, 32)
    with pytest.raises(ValueError):
        ref.paged_attention_prefill(
            torch.zeros(3, 1, 32), cache, 0, torch.zeros(1, 1, dtype=torch.int32),
            torch.tensor([0, 3], dtype=torch.int32), torch.tensor([2], dtype=torch.int32), 1.0,
        )


@pytest.mark.parametrize("window", [1, 5, 16, 37])
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_sliding_window_decode_and_prefill_match_naive(block_size, window):
    """Each row sees the last `window` positions up to its own; table entries of blocks wholly
    before a sequence's earliest window are never read (they name a block past the cache)."""
    from paged_cases import poison_before_window

    hq, hkv, head_dim = 6, 2, 32
    seqs = [(60, 60), (45, 7), (20, 1), (3, 3), (90, 1)]  # (context, new tokens)
    ctx_lens, q_lens = [c for c, _ in seqs], [n for _, n in seqs]
    num_blocks = sum(math.ceil(c / block_size) for c in ctx_lens) + 2
    cache = make_cache(num_blocks, 2, block_size, hkv, head_dim, torch.float32, seed=window)
    tables = make_tables(ctx_lens, block_size, num_blocks, seed=block_size, pad=0)
    clean = cache
    cache, tables = poison_before_window(cache, tables, ctx_lens, q_lens, window, out_of_range=True)
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    g = torch.Generator().manual_seed(window)
    query = torch.randn(starts[-1], hq, head_dim, generator=g)
    lens = torch.tensor(ctx_lens, dtype=torch.int32)
    got = ref.paged_attention_prefill(query, cache, 1, tables, torch.tensor(starts, dtype=torch.int32), lens, 0.2,
                                      window=window)
    last_rows = torch.tensor(starts[1:]) - 1
    decoded = ref.paged_attention_decode(query[last_rows], cache, 1, tables, lens, 0.2, window=window)
    for s, (ctx, q_len) in enumerate(seqs):
        k, v = naive_kv(clean, 1, tables[s], ctx)
        want = naive_attention(query[starts[s]: starts[s + 1]], list(range(ctx - q_len, ctx)), k, v, 0.2, window)
        check_close(got[starts[s]: starts[s + 1]], want, torch.float32)
        check_close(decoded[s: s + 1], want[-1:], torch.float32)
