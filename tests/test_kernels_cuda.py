"""Each CUDA kernel against its torch reference on a real device (skipped without one)."""

from __future__ import annotations

import pytest
import torch
from paged_cases import assert_close, random_paged_cache

from pagedkv import kernels
from pagedkv.kernels.cuda import ops as cuda_ops
from pagedkv.kernels import reference as ref

TOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 2.5e-2}

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not kernels.cuda_available(), reason="needs a CUDA device and cupy"),
]

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# (query heads, KV heads), head dim: MHA, GQA groups 3, 4, 16 and 32 (MQA: two CTAs share the
# group in decode), head dims 64, 96, 128, 256.
HEADS = [((8, 8), 128), ((32, 8), 128), ((9, 3), 64), ((8, 2), 96), ((16, 1), 128), ((32, 1), 64), ((4, 2), 256)]


@pytest.fixture
def launched(monkeypatch) -> list[str]:
    """Names of the kernels launched during the test."""
    names: list[str] = []
    real = cuda_ops._launcher
    monkeypatch.setattr(cuda_ops, "_launcher", lambda launch, dev: (names.append(launch.kernel), real(launch, dev)))
    return names


def check_path(launched: list[str], dtype: torch.dtype, split) -> None:
    """fp16/bf16 run on the tensor cores (sm_80+), fp32 on the scalar kernel; split-K
    launches the reduce kernel exactly when asked (None: either)."""
    tensor_cores = dtype != torch.float32 and torch.cuda.get_device_capability() >= (8, 0)
    want = "paged_attention_mma_kernel<" if tensor_cores else "paged_attention_kernel<"
    assert launched[0].startswith(want), launched
    if split is not None:
        assert any(k.startswith("paged_attention_reduce") for k in launched) == split, launched


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [1, 16, 32, 128])
@pytest.mark.parametrize("heads,head_dim", HEADS)
@pytest.mark.parametrize("split", [None, False, True])
def test_decode(launched, dtype, block_size, heads, head_dim, split):
    hq, hkv = heads
    g = torch.Generator().manual_seed(block_size + hq)
    ctx_lens = [1, 7, block_size, 513, 2049] + torch.randint(1, 8193, (3,), generator=g).tolist() + [8192]
    cache, tables, g = random_paged_cache(ctx_lens, block_size, hkv, head_dim, dtype, device="cuda")
    query = torch.randn(len(ctx_lens), hq, head_dim, generator=g).to("cuda", dtype)
    lens = torch.tensor(ctx_lens, dtype=torch.int32, device="cuda")
    scale = head_dim**-0.5
    got = cuda_ops.paged_attention_decode(query, cache, 1, tables, lens, scale, split=split)
    check_path(launched, dtype, split)
    assert_close(got, ref.paged_attention_decode(query, cache, 1, tables, lens, scale), TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch,ctx", [(1, 512), (16, 8192), (256, 1024)])
def test_decode_bench_shapes(launched, dtype, batch, ctx):
    """The benchmark's shapes (32 query heads, 8 KV heads, block size 16), automatic split."""
    cache, tables, g = random_paged_cache([ctx] * batch, 16, 8, 128, dtype, layers=1, device="cuda")
    query = torch.randn(batch, 32, 128, generator=g).to("cuda", dtype)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    got = kernels.paged_attention_decode(query, cache, 0, tables, lens, 0.088)
    check_path(launched, dtype, None)
    assert_close(got, ref.paged_attention_decode(query, cache, 0, tables, lens, 0.088), TOL[dtype])


def test_decode_small_batch_long_context_picks_split(launched):
    """The automatic choice takes the split-K path for one long sequence."""
    cache, tables, g = random_paged_cache([8192], 16, 8, 128, torch.float16, device="cuda")
    query = torch.randn(1, 32, 128, generator=g).to("cuda", torch.float16)
    lens = torch.tensor([8192], dtype=torch.int32, device="cuda")
    got = kernels.paged_attention_decode(query, cache, 0, tables, lens, 0.088)
    assert any(k.startswith("paged_attention_reduce") for k in launched)
    assert_close(got, ref.paged_attention_decode(query, cache, 0, tables, lens, 0.088), TOL[torch.float16])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [1, 16, 128, 256])
@pytest.mark.parametrize("heads,head_dim", [((16, 2), 128), ((8, 8), 64), ((12, 4), 96), ((32, 1), 128)])
@pytest.mark.parametrize("split", [None, False, True])
def test_prefill(launched, dtype, block_size, heads, head_dim, split):
    """Fresh prompts, chunked prefill after a long cached prefix, decode rows, an empty sequence."""
    hq, hkv = heads
    seqs = [(300, 300), (4100, 64), (1, 1), (0, 0), (900, 1), (37, 5), (2048, 2048)]  # (context, new)
    cache, tables, g = random_paged_cache([max(c, 1) for c, _ in seqs], block_size, hkv, head_dim, dtype,
                                          device="cuda")
    starts = [0]
    for _, q_len in seqs:
        starts.append(starts[-1] + q_len)
    query = torch.randn(starts[-1], hq, head_dim, generator=g).to("cuda", dtype)
    qsl = torch.tensor(starts, dtype=torch.int32, device="cuda")
    lens = torch.tensor([c for c, _ in seqs], dtype=torch.int32, device="cuda")
    got = cuda_ops.paged_attention_prefill(query, cache, 1, tables, qsl, lens, 0.1, split=split)
    check_path(launched, dtype, split)
    assert_close(got, ref.paged_attention_prefill(query, cache, 1, tables, qsl, lens, 0.1), TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [1, 16, 256])
def test_reshape_and_cache(dtype, block_size):
    num_tokens, hkv, d = 300, 4, 128
    cache = torch.randn(2 * num_tokens // block_size + 2, 3, 2, block_size, hkv, d, device="cuda").to(dtype)
    want = cache.clone()
    slots = torch.randperm(cache.shape[0] * block_size, device="cuda")[:num_tokens]
    slots[::7] = -1
    qkv = torch.randn(num_tokens, (8 + 2 * hkv) * d, device="cuda").to(dtype)  # fused projection
    key = qkv[:, 8 * d : (8 + hkv) * d].view(num_tokens, hkv, d)
    value = qkv[:, (8 + hkv) * d :].view(num_tokens, hkv, d)
    kernels.reshape_and_cache(key, value, cache, 2, slots)
    ref.reshape_and_cache(key, value, want, 2, slots)
    assert torch.equal(cache, want)


def test_copy_blocks():
    cache = torch.randn(64, 4, 2, 16, 8, 128, device="cuda").half()
    want = cache.clone()
    pairs = torch.tensor([[1, 40], [1, 41], [63, 0], [7, 8]])
    kernels.copy_blocks(cache, pairs)
    ref.copy_blocks(want, pairs)
    assert torch.equal(cache, want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_swap_with_pinned_cpu_pool(dtype):
    gpu = torch.randn(50, 3, 2, 16, 4, 64, device="cuda").to(dtype)
    cpu = torch.randn(20, 3, 2, 16, 4, 64).to(dtype).pin_memory()
    gpu_before, cpu_want = gpu.clone(), cpu.clone()
    out_map = torch.tensor([[49, 0], [3, 19], [10, 5], [11, 6]])
    kernels.swap_blocks(gpu, cpu, out_map)
    torch.cuda.synchronize()
    ref.swap_blocks(gpu_before.cpu(), cpu_want, out_map)
    assert torch.equal(cpu, cpu_want)
    gpu_want = gpu.clone()
    in_map = torch.tensor([[0, 1], [19, 2], [5, 30], [6, 31]])
    kernels.swap_blocks(cpu, gpu, in_map)
    ref.swap_blocks(cpu, gpu_want, in_map)
    assert torch.equal(gpu, gpu_want)
    # Pageable host memory is not addressable by kernels: the staged fallback still works.
    pageable = cpu.clone()
    kernels.swap_blocks(gpu, pageable, out_map)
    ref.swap_blocks(gpu.cpu(), cpu_want, out_map)
    assert torch.equal(pageable, cpu_want)


def test_runs_on_current_stream():
    """A kernel launched under torch.cuda.stream(side) waits for the work queued there."""
    cache, tables, g = random_paged_cache([5000], 16, 8, 128, torch.float16, device="cuda")
    query = torch.randn(1, 8, 128, generator=g).to("cuda", torch.float16)
    lens = torch.tensor([5000], dtype=torch.int32, device="cuda")
    want = ref.paged_attention_decode(query, cache, 0, tables, lens, 0.1)
    late_query = torch.zeros_like(query)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # on another stream the kernel would read zeros
        late_query.copy_(query)
        got = kernels.paged_attention_decode(late_query, cache, 0, tables, lens, 0.1)
    torch.cuda.current_stream().wait_stream(side)
    assert_close(got, want, TOL[torch.float16])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [1, 16, 128])
@pytest.mark.parametrize("window", [1, 100, 4096])
@pytest.mark.parametrize("split", [False, True])
def test_sliding_window(launched, dtype, block_size, window, split):
    """Long prompts, cached prefixes and decode rows with a sliding window; the blocks wholly
    before each sequence's earliest window hold NaNs, which reach the output if read."""
    from paged_cases import poison_before_window

    seqs = [(3000, 3000), (5000, 37), (700, 1), (8192, 1), (90, 90)]
    cache, tables, g = random_paged_cache([c for c, _ in seqs], block_size, 2, 128, dtype, device="cuda")
    cache, tables = poison_before_window(cache.cpu(), tables.cpu(), [c for c, _ in seqs], [n for _, n in seqs],
                                         window)
    cache, tables = cache.cuda(), tables.cuda()
    starts = [0]
    for _, n in seqs:
        starts.append(starts[-1] + n)
    query = torch.randn(starts[-1], 8, 128, generator=g).to("cuda", dtype)
    lens = torch.tensor([c for c, _ in seqs], dtype=torch.int32, device="cuda")
    qsl = torch.tensor(starts, dtype=torch.int32, device="cuda")
    got = cuda_ops.paged_attention_prefill(query, cache, 0, tables, qsl, lens, 0.1, window=window, split=split)
    check_path(launched, dtype, split)
    want = ref.paged_attention_prefill(query, cache, 0, tables, qsl, lens, 0.1, window=window)
    assert not want.isnan().any()
    assert_close(got, want, TOL[dtype])
    last = torch.tensor(starts[1:], device="cuda") - 1
    got = cuda_ops.paged_attention_decode(query[last], cache, 0, tables, lens, 0.1, window=window, split=split)
    assert_close(got, ref.paged_attention_decode(query[last], cache, 0, tables, lens, 0.1, window=window),
                 TOL[dtype])
