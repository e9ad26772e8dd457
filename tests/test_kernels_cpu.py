"""The CPU kernels (pagedkv/kernels/cpu/cpu_kernels.c) against the torch reference, their oracle."""
from __future__ import annotations

import logging

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pagedkv import kernels
from pagedkv.kernels.cpu import ops as cpu_ops
from pagedkv.kernels import reference
from paged_cases import random_paged_cache

pytestmark = pytest.mark.skipif(cpu_ops.library() is None, reason="no C compiler to build the CPU kernels")

# (query heads, KV heads): multi-head, grouped (GQA) and multi-query attention.
HEADS = [(4, 4), (8, 2), (9, 3), (6, 1)]


def decode_case(ctx_lens, block_size, heads, head_dim, cache_dtype, seed=0, layers=2):
    hq, hkv = heads
    cache, tables, g = random_paged_cache(ctx_lens, block_size, hkv, head_dim, cache_dtype, layers=layers, seed=seed)
    query = torch.randn(len(ctx_lens), hq, head_dim, generator=g)
    return cache, tables, query, torch.tensor(ctx_lens, dtype=torch.int32)


# Head sizes of 1 and 5 vectors of 16 read bfloat16 rows in element order, 2, 4 and 8 in pairs.
HEAD_DIMS = [16, 32, 64, 80, 128]


@settings(max_examples=60)
@given(ctx_lens=st.lists(st.integers(1, 300), min_size=1, max_size=6), block_size=st.sampled_from([1, 4, 16, 32]),
       heads=st.sampled_from(HEADS), head_dim=st.sampled_from(HEAD_DIMS),
       cache_dtype=st.sampled_from([torch.float32, torch.bfloat16]), layer=st.sampled_from([0, 1, -1]))
def test_decode_equals_reference(ctx_lens, block_size, heads, head_dim, cache_dtype, layer):
    # float32 queries keep the comparison at float32 precision for either cache type.
    cache, tables, query, lens = decode_case(ctx_lens, block_size, heads, head_dim, cache_dtype, seed=len(ctx_lens))
    scale = head_dim ** -0.5
    got = cpu_ops.paged_attention_decode(query, cache, layer, tables, lens, scale)
    want = reference.paged_attention_decode(query, cache, layer, tables, lens, scale)
    assert got.dtype == query.dtype and got.shape == query.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)


def prefill_case(ctx_and_new, block_size, heads, head_dim, cache_dtype, seed=0):
    """A cache holding each sequence's context, and the query rows of its last new tokens."""
    hq, hkv = heads
    ctx_lens = [c for c, _ in ctx_and_new]
    cache, tables, g = random_paged_cache(ctx_lens, block_size, hkv, head_dim, cache_dtype, seed=seed)
    new = torch.tensor([n for _, n in ctx_and_new])
    starts = torch.cat([torch.zeros(1, dtype=torch.long), new.cumsum(0)]).int()
    query = torch.randn(int(new.sum()), hq, head_dim, generator=g)
    return cache, tables, query, starts, torch.tensor(ctx_lens, dtype=torch.int32)


@st.composite
def contexts_and_new_tokens(draw, max_ctx=120):
    ctx = draw(st.lists(st.integers(1, max_ctx), min_size=1, max_size=4))
    return [(c, draw(st.sampled_from([0, 1, c, max(1, c // 3)]))) for c in ctx]


@settings(max_examples=40)
@given(ctx_and_new=contexts_and_new_tokens(), block_size=st.sampled_from([1, 4, 16, 32]),
       heads=st.sampled_from(HEADS), head_dim=st.sampled_from(HEAD_DIMS),
       cache_dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_prefill_equals_reference(ctx_and_new, block_size, heads, head_dim, cache_dtype):
    # New tokens: none, one (a decode row inside a prefill batch), the whole context (a prompt)
    # or its last third (a prompt after a cached prefix).
    cache, tables, query, starts, lens = prefill_case(ctx_and_new, block_size, heads, head_dim, cache_dtype)
    scale = head_dim ** -0.5
    got = cpu_ops.paged_attention_prefill(query, cache, 1, tables, starts, lens, scale)
    want = reference.paged_attention_prefill(query, cache, 1, tables, starts, lens, scale)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)


def test_a_prompt_row_equals_the_same_row_decoded(attention_path):
    # Recomputing a preempted sequence's prompt must give the attention its decode steps gave:
    # row i of a prompt, and a decode of that token over the same context, bit for bit; long
    # prompts too (torch's SDPA, which took prompts from 320 rows, did not).
    for cache_dtype in (torch.float32, torch.bfloat16):
        cache, tables, query, starts, lens = prefill_case([(400, 400), (45, 20)], 16, (9, 3), 64, cache_dtype)
        prompt = cpu_ops.paged_attention_prefill(query.bfloat16(), cache, 0, tables, starts, lens, 0.125)
        seq = torch.tensor([0] * 400 + [1] * 20)
        row_ctx = torch.cat([torch.arange(1, 401), torch.arange(26, 46)]).int()
        decoded = cpu_ops.paged_attention_decode(query.bfloat16(), cache, 0, tables[seq], row_ctx, 0.125)
        assert torch.equal(prompt, decoded)


def test_prefill_refuses_more_new_tokens_than_context():
    cache, tables, query, starts, lens = prefill_case([(30, 30), (20, 5)], 16, (4, 2), 64, torch.float32)
    for short in (4, 0):  # as the reference: an error, even where the context is empty
        lens[1] = short
        with pytest.raises(ValueError, match="more new tokens than context"):
            cpu_ops.paged_attention_prefill(query, cache, 0, tables, starts, lens, 0.125)
        with pytest.raises(ValueError, match="new tokens but context length"):
            reference.paged_attention_prefill(query, cache, 0, tables, starts, lens, 0.125)
    lens[1] = 20
    with pytest.raises(ValueError, match="4 query start offsets for 2 sequences"):
        cpu_ops.paged_attention_prefill(query, cache, 0, tables, torch.tensor([0, 30, 35, 35]), lens, 0.125)
    with pytest.raises(ValueError, match="query rows outside the batch"):
        cpu_ops.paged_attention_prefill(query, cache, 0, tables, torch.tensor([0, 30, 36]), lens, 0.125)


def test_head_sizes_the_kernel_lacks_take_the_reference():
    assert cpu_ops.library().paged_attention_supports(24) == 0
    assert all(cpu_ops.library().paged_attention_supports(d) for d in HEAD_DIMS)
    cache, tables, query, lens = decode_case([33, 7], 8, (8, 2), 24, torch.float32)
    torch.testing.assert_close(cpu_ops.paged_attention_decode(query, cache, 0, tables, lens, 0.125),
                               reference.paged_attention_decode(query, cache, 0, tables, lens, 0.125))


@pytest.mark.parametrize("heads", HEADS)
def test_decode_bfloat16_queries_round_like_the_reference(heads):
    cache, tables, query, lens = decode_case([5, 40, 130], 16, heads, 64, torch.bfloat16)
    query = query.bfloat16()
    got = cpu_ops.paged_attention_decode(query, cache, 1, tables, lens, 0.125)
    want = reference.paged_attention_decode(query, cache, 1, tables, lens, 0.125)
    assert got.dtype == torch.bfloat16
    # Both compute in float32 and round once: at most one bfloat16 step apart.
    assert ((got.float() - want.float()).abs() <= want.float().abs() * 2 ** -7 + 1e-6).all()


@pytest.fixture(params=["amx", "vectors"])
def attention_path(request):
    """Attention over bfloat16 caches by AMX's tile products (where the CPU has AMX), or by
    vector FMAs: each path against the reference."""
    if request.param == "amx" and not cpu_ops.amx_supported():
        pytest.skip("no AMX on this CPU or operating system")
    cpu_ops.set_amx(request.param == "amx")
    yield request.param
    cpu_ops.set_amx(True)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ctx_and_new=contexts_and_new_tokens(max_ctx=200), block_size=st.sampled_from([1, 4, 6, 16, 32]),
       heads=st.sampled_from(HEADS), head_dim=st.sampled_from([32, 64, 80, 128]))
def test_bfloat16_rows_on_either_path_round_like_the_reference(attention_path, ctx_and_new, block_size, heads,
                                                               head_dim):
    # bfloat16 queries over a bfloat16 cache: AMX takes heads a multiple of 32 wide, in tiles of
    # 16 positions read in place within a block and copied across blocks or past the context.
    cache, tables, query, starts, lens = prefill_case(ctx_and_new, block_size, heads, head_dim, torch.bfloat16)
    query = query.bfloat16()
    got = cpu_ops.paged_attention_prefill(query, cache, 1, tables, starts, lens, head_dim ** -0.5)
    want = reference.paged_attention_prefill(query, cache, 1, tables, starts, lens, head_dim ** -0.5)
    assert got.dtype == torch.bfloat16
    # Both compute in float32 and round once: at most one bfloat16 step apart.
    assert ((got.float() - want.float()).abs() <= want.float().abs() * 2 ** -7 + 1e-6).all()
    seqs = (starts[1:] > starts[:-1]).nonzero().flatten()  # each one's last row, decoded: the same bits
    last = (starts[1:] - 1).long()[seqs]
    decoded = cpu_ops.paged_attention_decode(query[last], cache, 1, tables[seqs], lens[seqs], head_dim ** -0.5)
    assert torch.equal(decoded, got[last])


def test_a_tile_across_blocks_is_never_read_as_one(attention_path):
    # Blocks of 6 positions, one layer: block 1 starts 12 slots after block 0, so a tile over
    # blocks 0, 5 and 1 has its first and last rows 15 slots apart like 16 rows of one block.
    g = torch.Generator().manual_seed(3)
    cache = torch.randn(8, 1, 2, 6, 2, 64, generator=g).bfloat16()
    tables = torch.tensor([[0, 5, 1, 7]], dtype=torch.int32)
    query = torch.randn(1, 4, 64, generator=g).bfloat16()
    for ctx in (16, 19):
        lens = torch.tensor([ctx], dtype=torch.int32)
        got = cpu_ops.paged_attention_decode(query, cache, 0, tables, lens, 0.125)
        want = reference.paged_attention_decode(query, cache, 0, tables, lens, 0.125)
        assert ((got.float() - want.float()).abs() <= want.float().abs() * 2 ** -7 + 1e-6).all(), ctx


def test_decode_reads_strided_query_rows_in_place():
    # The model passes the query heads as a view of its fused q/k/v projection.
    cache, tables, query, lens = decode_case([33, 7], 8, (8, 2), 64, torch.float32)
    fused = torch.cat([query.reshape(2, -1), torch.randn(2, 2 * 2 * 64)], dim=1)
    view = fused[:, :8 * 64].view(2, 8, 64)
    assert not view.is_contiguous()
    got = cpu_ops.paged_attention_decode(view, cache, 0, tables, lens, 0.125)
    torch.testing.assert_close(got, reference.paged_attention_decode(query, cache, 0, tables, lens, 0.125))


def test_decode_rows_without_context_are_zero():
    cache, tables, query, lens = decode_case([17, 1, 40], 16, (4, 2), 64, torch.float32)
    lens[1] = 0
    got = cpu_ops.paged_attention_decode(query, cache, 0, tables, lens, 0.125)
    assert not got[1].any()
    keep = torch.tensor([0, 2])
    want = reference.paged_attention_decode(query[keep], cache, 0, tables[keep], lens[keep], 0.125)
    torch.testing.assert_close(got[keep], want)


def test_threads_split_sequences_not_results():
    cache, tables, query, lens = decode_case([300, 2, 77, 150, 9, 260, 31], 16, (9, 3), 64, torch.bfloat16)
    p_cache, p_tables, p_query, starts, p_lens = prefill_case([(90, 90), (40, 13)], 4, (9, 3), 64, torch.bfloat16)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append((cpu_ops.paged_attention_decode(query, cache, 1, tables, lens, 0.125),
                            cpu_ops.paged_attention_prefill(p_query, p_cache, 1, p_tables, starts, p_lens, 0.125)))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_a_rows_attention_ignores_which_heads_and_sequences_share_its_job(cache_dtype):
    # A job walks a sequence's context once for up to 8 KV heads (where the threads still have
    # jobs enough), else for one: twelve KV heads take jobs of 8 and 4 in a batch on one thread,
    # jobs of one head for a sequence alone on two. Each sequence alone gives the bits it gives
    # in the batch, and the reference's values.
    cache, tables, query, lens = decode_case([70, 5, 129, 33, 16], 16, (12, 12), 64, cache_dtype)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        batch = cpu_ops.paged_attention_decode(query, cache, 1, tables, lens, 0.125)
        torch.set_num_threads(2)
        alone = [cpu_ops.paged_attention_decode(query[s:s + 1], cache, 1, tables[s:s + 1], lens[s:s + 1], 0.125)
                 for s in range(len(lens))]
    finally:
        torch.set_num_threads(before)
    assert torch.equal(torch.cat(alone), batch)
    want = reference.paged_attention_decode(query, cache, 1, tables, lens, 0.125)
    torch.testing.assert_close(batch, want, rtol=1e-5, atol=2e-6)


def test_decode_refuses_tables_that_leave_the_cache():
    cache, tables, query, lens = decode_case([20, 30], 16, (4, 4), 64, torch.float32)
    bad = tables.clone()
    bad[1, 1] = cache.shape[0]  # one past the last block
    with pytest.raises(IndexError, match="outside the cache"):
        cpu_ops.paged_attention_decode(query, cache, 0, bad, lens, 0.125)
    bad[1, 1] = -1
    with pytest.raises(IndexError, match="outside the cache"):
        cpu_ops.paged_attention_decode(query, cache, 0, bad, lens, 0.125)
    longer = lens.clone()
    longer[0] = tables.shape[1] * 16 + 1
    with pytest.raises(IndexError, match="longer than its block table"):
        cpu_ops.paged_attention_decode(query, cache, 0, tables, longer, 0.125)
    with pytest.raises(IndexError, match="layer 2 is out of range"):
        cpu_ops.paged_attention_decode(query, cache, 2, tables, lens, 0.125)
    with pytest.raises(ValueError, match="query heads of 32"):
        cpu_ops.paged_attention_decode(query[..., :32], cache, 0, tables, lens, 0.125)


@pytest.mark.parametrize("src_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_reshape_and_cache_equals_reference(src_dtype, cache_dtype):
    cache, _, g = random_paged_cache([40, 40], 8, 2, 32, cache_dtype, layers=3)
    slots = torch.tensor([17, -1, 0, 79, 40, -5, 8, 63])
    # Sources as the model passes them: views of a wider row (k and v of a fused projection).
    rows = (torch.randn(len(slots), 5, 2, 32, generator=g) * 100).to(src_dtype)
    key, value = rows[:, 1], rows[:, 3]
    want = cache.clone()
    reference.reshape_and_cache(key, value, want, 1, slots)
    cpu_ops.reshape_and_cache(key, value, cache, 1, slots)
    assert torch.equal(cache, want)  # bit for bit, float32 -> bfloat16 rounding included


def test_reshape_and_cache_refuses_slots_outside_and_writes_nothing():
    cache, _, g = random_paged_cache([16], 8, 2, 32, torch.float32, layers=2)
    before = cache.clone()
    key = torch.randn(2, 2, 32, generator=g)
    with pytest.raises(IndexError, match="outside the cache"):
        cpu_ops.reshape_and_cache(key, key, cache, 0, torch.tensor([3, cache.shape[0] * 8]))
    with pytest.raises(ValueError, match="for a cache of 2 KV heads of 32"):
        cpu_ops.reshape_and_cache(key[:, :, :16], key[:, :, :16], cache, 0, torch.tensor([3, 4]))
    with pytest.raises(ValueError, match="1 slots"):
        cpu_ops.reshape_and_cache(key, key, cache, 0, torch.tensor([3]))
    assert torch.equal(cache, before)


def test_dispatch_uses_the_cpu_kernel_and_falls_back_for_float16(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_ops, "library", lambda real=cpu_ops.library: calls.append(1) or real())
    cache, tables, query, lens = decode_case([20], 16, (4, 4), 64, torch.float32)
    kernels.paged_attention_decode(query, cache, 0, tables, lens, 0.125)
    assert calls
    half = cache.half()
    got = kernels.paged_attention_decode(query.half(), half, 0, tables, lens, 0.125)
    torch.testing.assert_close(got, reference.paged_attention_decode(query.half(), half, 0, tables, lens, 0.125))


def test_without_a_compiler_the_reference_runs(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CC", "no-such-compiler")
    monkeypatch.setenv("PAGEDKV_CACHE_DIR", str(tmp_path))
    cpu_ops.library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="pagedkv.kernels.cpu.ops"):
            assert cpu_ops.library() is None
        assert "using the torch reference" in caplog.text and "no-such-compiler" in caplog.text
        cache, tables, query, lens = decode_case([20, 3], 16, (4, 2), 64, torch.float32)
        torch.testing.assert_close(cpu_ops.paged_attention_decode(query, cache, 0, tables, lens, 0.125),
                                   reference.paged_attention_decode(query, cache, 0, tables, lens, 0.125))
        monkeypatch.setenv("CC", "gcc")
        monkeypatch.setenv("PAGEDKV_CPU_KERNELS", "0")
        cpu_ops.library.cache_clear()
        assert cpu_ops.library() is None
    finally:
        cpu_ops.library.cache_clear()


def test_a_fresh_cache_folder_gets_its_own_build(monkeypatch, tmp_path):
    monkeypatch.setenv("PAGEDKV_CACHE_DIR", str(tmp_path / "new"))
    cpu_ops.library.cache_clear()
    try:
        assert cpu_ops.library() is not None
        built = list((tmp_path / "new").iterdir())
        assert len(built) == 1 and built[0].name.startswith("cpu_kernels-") and built[0].suffix == ".so"
    finally:
        cpu_ops.library.cache_clear()


def test_int4_packing_and_inputs_are_checked():
    codes = torch.randint(0, 16, (24, 64), dtype=torch.uint8)
    scales = torch.ones(24, 2)
    with pytest.raises(ValueError, match="cannot pack"):
        cpu_ops.pack_int4(codes, scales, scales)  # 24 output rows: not whole tiles of 16
    packed = cpu_ops.pack_int4(codes[:16], scales[:16], scales[:16])
    assert packed.shape == (16, 64) and packed.half
    with pytest.raises(ValueError, match="input"):
        cpu_ops.int4_linear(torch.randn(3, 32), packed)
    out = cpu_ops.int4_linear(torch.randn(3, 32), packed, repeat_x=True)  # Q8_0's split codes read x twice
    assert out.shape == (3, 16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_rotary_and_cache_is_the_models_torch_ops_bit_for_bit(dtype, cache_dtype):
    from pagedkv.runtime.models.llama import LlamaModel

    hq, hkv, d, tokens = 6, 2, 64, 9
    cache, _, g = random_paged_cache([48], 16, hkv, d, cache_dtype, layers=3)
    qkv = (torch.randn(tokens, (hq + 2 * hkv) * d, generator=g) * 4).to(dtype)
    angles = torch.rand(tokens, 1, d // 2, generator=g) * 300
    cos = torch.cat([angles.cos(), angles.cos()], dim=-1).to(dtype)
    sin = torch.cat([-angles.sin(), angles.sin()], dim=-1).to(dtype)
    slots = torch.tensor([5, -1, 0, 47, 16, 17, 3, -1, 30])
    rotated = LlamaModel.apply_rotary(qkv[:, :(hq + hkv) * d].view(tokens, hq + hkv, d), cos, sin)
    want = cache.clone()
    reference.reshape_and_cache(rotated[:, hq:], qkv[:, (hq + hkv) * d:].view(tokens, hkv, d), want, 2, slots)
    got_qkv = qkv.clone()
    cpu_ops.rotary_and_cache(got_qkv, cos[:, 0], sin[:, 0], cache, 2, slots, hq, hkv)
    assert torch.equal(got_qkv[:, :(hq + hkv) * d].view(tokens, hq + hkv, d), rotated)
    assert torch.equal(cache, want)
    before = got_qkv.clone()
    with pytest.raises(IndexError, match="outside the cache"):
        cpu_ops.rotary_and_cache(got_qkv, cos[:, 0], sin[:, 0], cache, 2, slots + 100, hq, hkv)
    assert torch.equal(got_qkv, before) and torch.equal(cache, want)  # nothing changed
    with pytest.raises(ValueError, match="rotary_and_cache"):
        cpu_ops.rotary_and_cache(got_qkv, cos[:, 0], sin[:, 0], cache, 2, slots, hq + 1, hkv)


needs_bf16_linear = pytest.mark.skipif(not cpu_ops.bf16_linear_supported(), reason="no AVX512-BF16 on this CPU")


@needs_bf16_linear
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
def test_bf16_linear_rounds_a_float32_sum_of_exact_products_once(rows):
    g = torch.Generator().manual_seed(rows)
    weight = torch.randn(37, 96, generator=g).bfloat16()  # 37: a last step of W with one row
    bias = torch.randn(37, generator=g).bfloat16()
    x = torch.randn(rows, 96, generator=g).bfloat16()
    exact = x.double() @ weight.double().t() + bias.double()  # the products are exact in float32
    got = cpu_ops.bf16_linear(x, weight, bias)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, 37)
    # Rounded to nearest: within half a bfloat16 step (2^(e - 9) for |exact| in [2^(e-1), 2^e))
    # of the exact value, give or take the float32 sum's own error (about 1e-5 here).
    half_step = torch.ldexp(torch.ones_like(exact), torch.frexp(exact).exponent - 9)
    assert ((got.double() - exact).abs() <= half_step + 1e-4).all()


@needs_bf16_linear
def test_bf16_linear_rows_ignore_their_batch_and_threads():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(300, 576, generator=g).bfloat16()
    x = torch.randn(4, 576, generator=g).bfloat16()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = torch.cat([cpu_ops.bf16_linear(x[i:i + 1], weight) for i in range(4)])
        torch.set_num_threads(2)
        together = cpu_ops.bf16_linear(x, weight)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(alone, together)


@needs_bf16_linear
def test_bf16_linear_refuses_what_it_cannot_run():
    weight = torch.randn(8, 64).bfloat16()
    with pytest.raises(ValueError, match="1 to 4 rows"):
        cpu_ops.bf16_linear(torch.randn(5, 64).bfloat16(), weight)
    with pytest.raises(ValueError, match="multiples of 32"):
        cpu_ops.bf16_linear(torch.randn(1, 48).bfloat16(), torch.randn(8, 48).bfloat16())
    with pytest.raises(ValueError, match="for a weight"):
        cpu_ops.bf16_linear(torch.randn(1, 64), weight)


needs_f32_linear = pytest.mark.skipif(cpu_ops.library() is None or not cpu_ops.library().f32_linear_supported(),
                                      reason="no AVX-512 on this CPU")


@needs_f32_linear
@settings(max_examples=40, deadline=None)
@given(rows=st.one_of(st.integers(1, 2 * cpu_ops.F32_LINEAR_ROWS), st.integers(1, 300)), n=st.integers(1, 70),
       k=st.integers(1, 700), bias=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_f32_linear_is_float32_accurate_and_rows_ignore_their_batch(rows, n, k, bias, seed):
    # Any shape: widths that end in a partial vector of 16, odd numbers of W's rows (steps of 2,
    # bands of 4), the streaming loops' few rows and the GEMM's blocks of rows with their tails;
    # each output within float32's summation error of the float64 product, and each row the
    # bits it has alone, in any batch and on either thread count.
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=g)
    x = torch.randn(rows, k, generator=g) * torch.rand(rows, 1, generator=g).mul(8).exp2()
    b = torch.randn(n, generator=g) if bias else None
    got = cpu_ops.f32_linear(x, weight, b)
    exact = x.double() @ weight.double().t() + (0 if b is None else b.double())
    magnitude = x.abs().double() @ weight.abs().double().t() + (0 if b is None else b.abs().double())
    assert ((got.double() - exact).abs() <= 2 ** -24 * (k // 16 + 20) * magnitude).all()
    alone = torch.cat([cpu_ops.f32_linear(x[i:i + 1], weight, b) for i in range(rows)])
    assert torch.equal(alone, got)
    wide = torch.randn(rows, k + 5, generator=g)
    wide[:, :k] = x
    assert torch.equal(cpu_ops.f32_linear(wide[:, :k], weight, b), got)  # rows further apart than their width
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2 if before == 1 else 1)
        assert torch.equal(cpu_ops.f32_linear(x, weight, b), got)
    finally:
        torch.set_num_threads(before)


@needs_f32_linear
def test_f32_linear_rows_ignore_their_batch_on_a_models_shapes():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 1536, generator=g)
    for n, k in ((960, 576), (576, 1536), (3072, 576)):  # threads split W's rows: both get some
        weight = torch.randn(n, k, generator=g)
        full = cpu_ops.f32_linear(x[:, :k], weight)
        for start, stop in ((0, 1), (1, 3), (2, 6), (3, 8), (5, 17), (0, 64), (100, 300)):
            assert torch.equal(cpu_ops.f32_linear(x[start:stop, :k], weight), full[start:stop]), (n, k, start)


@needs_f32_linear
def test_f32_linear_refuses_what_it_cannot_run():
    weight = torch.randn(8, 64)
    with pytest.raises(ValueError, match="for a weight"):
        cpu_ops.f32_linear(torch.randn(1, 64).bfloat16(), weight)
    with pytest.raises(ValueError, match="for a weight"):
        cpu_ops.f32_linear(torch.randn(1, 64), weight.t().contiguous().t())


@needs_f32_linear
def test_f32_linear_of_no_rows_is_empty():
    # A step none of whose tokens wants logits hands the lm_head no rows, as F.linear takes them.
    assert cpu_ops.f32_linear(torch.randn(0, 64), torch.randn(8, 64)).shape == (0, 8)


@pytest.mark.skipif(not cpu_ops.bf16_linear_supported(), reason="needs AVX512-BF16")
def test_bf16_linear_of_no_rows_is_empty():
    x, w = torch.randn(0, 64).bfloat16(), torch.randn(8, 64).bfloat16()
    assert cpu_ops.bf16_linear(x, w).shape == (0, 8)


def model_ops(dtype):
    """The model's torch implementations of the steps the elementwise kernels replace."""
    from pagedkv.runtime.models.llama import LlamaModel

    def add_norm(h, delta, weight, eps):
        norm = LlamaModel.__new__(LlamaModel)
        norm.config = type("Config", (), {"rms_norm_eps": eps, "norm_unit_offset": False})()
        return norm.add_norm(h, delta, weight, fused=False)

    return add_norm, lambda gate_up: LlamaModel.silu_and_mul(gate_up, fused=False)


def within_steps(got: torch.Tensor, want: torch.Tensor, steps: int) -> bool:
    """Whether got is within `steps` units in the last place of want (in want's type)."""
    bits = 7 if want.dtype == torch.bfloat16 else 23
    ulp = torch.ldexp(torch.ones_like(want, dtype=torch.float64), torch.frexp(want.double()).exponent - 1 - bits)
    return bool(((got.double() - want.double()).abs() <= steps * ulp + 1e-30).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, width", [(1, 576), (5, 64), (40, 100)])
def test_add_rms_norm_is_the_models_add_and_norm(dtype, rows, width):
    torch_add_norm, _ = model_ops(dtype)
    g = torch.Generator().manual_seed(rows)
    h = (torch.randn(rows, width, generator=g) * 3).to(dtype)
    delta = torch.randn(rows, width, generator=g).to(dtype)
    weight = torch.randn(width, generator=g).to(dtype)
    want_h = h.clone()
    want = torch_add_norm(want_h, delta, weight, 1e-5)
    got = cpu_ops.add_rms_norm(h, delta, weight, 1e-5)
    assert torch.equal(h, want_h)  # the residual add rounds as torch's
    # The sum of squares runs in another order: the factor may differ in its last place, and the
    # scaled values by a few (float32) or one rounding step (bfloat16).
    assert within_steps(got, want, 4 if dtype == torch.float32 else 2)
    if dtype == torch.bfloat16:  # a last-place difference in float32 rarely survives the rounding
        assert (got == want).float().mean() > 0.99
    no_delta = torch_add_norm(h.clone(), None, weight, 1e-5)
    torch.testing.assert_close(cpu_ops.add_rms_norm(h, None, weight, 1e-5), no_delta, atol=0, rtol=2 ** -6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul_is_the_models_silu_and_mul(dtype):
    _, torch_silu_mul = model_ops(dtype)
    g = torch.Generator().manual_seed(0)
    gate_up = (torch.randn(7, 2 * 200, generator=g) * 4).to(dtype)
    gate_up[0, :8] = torch.tensor([0.0, -0.0, 100.0, -100.0, 1e-30, -1e-30, 88.0, -88.0]).to(dtype)
    got, want = cpu_ops.silu_and_mul(gate_up), torch_silu_mul(gate_up)
    assert got.shape == (7, 200) and got.dtype == dtype
    assert within_steps(got, want, 2)  # another exponential: one step in silu, one in the product
    if dtype == torch.bfloat16:  # a last-place difference in float32 rarely survives the rounding
        assert (got == want).float().mean() > 0.99
    with pytest.raises(ValueError, match="silu_and_mul"):
        cpu_ops.silu_and_mul(gate_up[:, :-1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gelu_tanh_and_mul_is_torchs_gelu_tanh_and_mul(dtype):
    # Gemma's gate: torch's gelu(approximate="tanh"), within a few float32 steps (another tanh).
    g = torch.Generator().manual_seed(1)
    gate_up = (torch.randn(5, 2 * 200, generator=g) * 4).to(dtype)
    gate_up[0, :8] = torch.tensor([0.0, -0.0, 100.0, -100.0, 1e-30, -1e-30, 9.0, -9.0]).to(dtype)
    gate, up = gate_up.float().chunk(2, dim=-1)
    want = (torch.nn.functional.gelu(gate, approximate="tanh").to(dtype).float() * up).to(dtype)
    got = cpu_ops.silu_and_mul(gate_up, gelu=True)
    assert got.shape == (5, 200) and got.dtype == dtype
    # Where gelu nears 0 (gates below -3) both sides lose digits to 1 + tanh's cancellation: an
    # absolute bound there, a few float32 steps elsewhere.
    scale = (gate.abs() * up.abs()).clamp_min(1.0)
    step = 2 ** -23 if dtype == torch.float32 else 2 ** -7  # one unit in the last place at magnitude 1
    assert ((got.float() - want.float()).abs() <= 8 * step * scale).all()


@pytest.mark.parametrize("vocab", [1, 7, 16, 1000, 49152])
def test_greedy_and_logsumexp_are_torch_max_and_logsumexp(vocab):
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(9, vocab, generator=g) * 8
    logits[1] = logits[1].round()  # ties: the first maximum wins
    logits[2, vocab // 2] = float("nan")
    logits[3] = float("-inf")
    logits[4, -1] = float("inf")
    logits[5, vocab // 3:] = logits[5].max() + 1  # a tie of many, the first of them in the middle
    logits[6] = -1e30  # large but finite: exponents far below the float32 range
    index, log_total = cpu_ops.greedy_and_logsumexp(logits[:, :])
    assert torch.equal(index, logits.max(dim=-1).indices)
    torch.testing.assert_close(log_total, torch.logsumexp(logits, dim=-1, keepdim=True), rtol=2e-6, atol=0,
                               equal_nan=True)
    assert cpu_ops.greedy_and_logsumexp(logits.double()) is None  # float32 only: callers fall back


@settings(max_examples=40)
@given(ctx_and_new=contexts_and_new_tokens(max_ctx=200), block_size=st.sampled_from([1, 4, 16, 32]),
       heads=st.sampled_from(HEADS), head_dim=st.sampled_from([16, 64, 128]),
       cache_dtype=st.sampled_from([torch.float32, torch.bfloat16]), window=st.integers(1, 70))
def test_sliding_window_equals_reference_and_never_reads_before_it(ctx_and_new, block_size, heads, head_dim,
                                                                   cache_dtype, window):
    # Blocks wholly before a sequence's earliest window name a block past the cache: the kernel
    # neither checks nor reads them (a freed block of a windowed layer), nor does the reference.
    from paged_cases import poison_before_window

    cache, tables, query, starts, lens = prefill_case(ctx_and_new, block_size, heads, head_dim, cache_dtype)
    cache, tables = poison_before_window(cache, tables, [c for c, _ in ctx_and_new], [n for _, n in ctx_and_new],
                                         window, out_of_range=True)
    scale = head_dim ** -0.5
    got = cpu_ops.paged_attention_prefill(query, cache, 1, tables, starts, lens, scale, window=window)
    want = reference.paged_attention_prefill(query, cache, 1, tables, starts, lens, scale, window=window)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)
    # A decode row per sequence with new tokens: its last one.
    has_rows = [s for s, (_, n) in enumerate(ctx_and_new) if n]
    if has_rows:
        last = starts[1:][has_rows].long() - 1
        got = cpu_ops.paged_attention_decode(query[last], cache, 1, tables[has_rows], lens[has_rows], scale,
                                             window=window)
        want = reference.paged_attention_decode(query[last], cache, 1, tables[has_rows], lens[has_rows], scale,
                                                window=window)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("window", [1, 7, 16, 100])
def test_a_windowed_prompt_row_equals_the_same_row_decoded(attention_path, window):
    # What recompute after preemption needs, with a sliding window too: rows that share a job
    # start at different tiles, and each still computes alone.
    for cache_dtype in (torch.float32, torch.bfloat16):
        cache, tables, query, starts, lens = prefill_case([(300, 300), (45, 20)], 4, (9, 3), 64, cache_dtype)
        prompt = cpu_ops.paged_attention_prefill(query.bfloat16(), cache, 0, tables, starts, lens, 0.125,
                                                 window=window)
        seq = torch.tensor([0] * 300 + [1] * 20)
        row_ctx = torch.cat([torch.arange(1, 301), torch.arange(26, 46)]).int()
        decoded = cpu_ops.paged_attention_decode(query.bfloat16(), cache, 0, tables[seq], row_ctx, 0.125,
                                                 window=window)
        assert torch.equal(prompt, decoded)
        full = cpu_ops.paged_attention_prefill(query.bfloat16(), cache, 0, tables, starts, lens, 0.125)
        assert torch.equal(prompt[:window], full[:window])  # rows whose window holds all their context
        assert not torch.equal(prompt[window:300], full[window:300])
