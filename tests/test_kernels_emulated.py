"""The CUDA C kernels and cuda_ops' launch planning, run on the CPU by pagedkv.kernels.cuda.emulation
(g++; CUDA threads become user-level contexts) and compared with the torch reference. This is how the
kernels' logic is tested where no GPU is at hand; tests/test_kernels_cuda.py runs the
same comparisons on a real device."""

from __future__ import annotations

import pytest
import torch
from paged_cases import assert_close, random_paged_cache

from pagedkv.kernels.cuda import ops as cuda_ops

from pagedkv.kernels.cuda import emulation

from pagedkv.kernels import reference as ref

pytestmark = pytest.mark.skipif(emulation.compiler() is None, reason="no C++17 compiler for the emulation")
TOL = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}


LAUNCHED: list[str] = []


def _record_and_emulate(launch, device):
    LAUNCHED.append(launch.kernel)
    emulation.launch(launch, device)


@pytest.fixture(autouse=True)
def emulated(monkeypatch):
    LAUNCHED.clear()
    monkeypatch.setattr(cuda_ops, "_launcher", _record_and_emulate)
    monkeypatch.setattr(cuda_ops, "_sm_count", lambda device: 2)
    monkeypatch.setattr(cuda_ops, "_mma_capable", lambda device: True)  # an sm_80+ device
    monkeypatch.setattr(cuda_ops, "_device_pointer", lambda t: t.data_ptr())
    monkeypatch.setattr(cuda_ops, "PART_SIZE", 32)  # many partitions from short contexts


def kernel_path(monkeypatch, dtype, mma: bool) -> str:
    """Selects the tensor-core kernel (fp16/bf16 on sm_80+) or the scalar one, and names
    the kernel that the launches must show."""
    if not mma:
        monkeypatch.setattr(cuda_ops, "_mma_capable", lambda device: False)
    return "paged_attention_mma_kernel<" if mma else "paged_attention_kernel<"


def check_launches(kernel: str, split: bool) -> None:
    assert LAUNCHED[0].startswith(kernel), LAUNCHED
    assert any(k.startswith("paged_attention_reduce") for k in LAUNCHED) == split, LAUNCHED


@pytest.mark.parametrize(
    "dtype,block_size,heads,head_dim",
    [
        (torch.float16, 16, (4, 2), 128),
        (torch.bfloat16, 1, (6, 3), 64),
        (torch.float32, 32, (8, 1), 64),
        (torch.float16, 8, (3, 3), 96),
        (torch.bfloat16, 4, (4, 1), 256),
        (torch.float16, 128, (16, 1), 64),
        (torch.bfloat16, 2, (32, 1), 32),
    ],
)
@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("mma", [True, False])
def test_decode(monkeypatch, dtype, block_size, heads, head_dim, split, mma):
    if mma and dtype == torch.float32:
        pytest.skip("fp32 has no tensor-core path")
    kernel = kernel_path(monkeypatch, dtype, mma)
    hq, hkv = heads
    ctx_lens = [1, 2 * block_size, 75, 130]
    cache, tables, g = random_paged_cache(ctx_lens, block_size, hkv, head_dim, dtype)
    query = torch.randn(len(ctx_lens), hq, head_dim, generator=g).to(dtype)
    lens = torch.tensor(ctx_lens, dtype=torch.int32)
    got = cuda_ops.paged_attention_decode(query, cache, 1, tables, lens, head_dim**-0.5, split=split)
    check_launches(kernel, split)
    assert_close(got, ref.paged_attention_decode(query, cache, 1, tables, lens, head_dim**-0.5), TOL[dtype])


@pytest.mark.parametrize(
    "dtype,block_size,heads,head_dim",
    [(torch.float16, 16, (4, 2), 64), (torch.float32, 1, (2, 2), 128), (torch.bfloat16, 32, (6, 3), 64),
     (torch.float16, 1, (8, 8), 128), (torch.bfloat16, 128, (32, 2), 32)],
)
@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("mma", [True, False])
def test_prefill_ragged(monkeypatch, dtype, block_size, heads, head_dim, split, mma):
    """Fresh prompts, cached prefixes, decode tokens and an empty sequence in one batch."""
    if mma and dtype == torch.float32:
        pytest.skip("fp32 has no tensor-core path")
    kernel = kernel_path(monkeypatch, dtype, mma)
    hq, hkv = heads
    seqs = [(1, 1), (40, 40), (70, 11), (0, 0), (9, 1), (33, 2), (5, 5)]  # (context, new tokens)
    cache, tables, g = random_paged_cache([max(c, 1) for c, _ in seqs], block_size, hkv, head_dim, dtype)
    starts = [0]
    for _, q_len in seqs:
        starts.append(starts[-1] + q_len)
    query = torch.randn(starts[-1], hq, head_dim, generator=g).to(dtype)
    # A strided view, as when q is sliced out of a fused projection.
    wide = torch.randn(starts[-1], hq, head_dim * 2, generator=g).to(dtype)
    wide[..., :head_dim] = query
    args = (cache, 0, tables, torch.tensor(starts, dtype=torch.int32), torch.tensor([c for c, _ in seqs], dtype=torch.int32), 0.2)
    got = cuda_ops.paged_attention_prefill(wide[..., :head_dim], *args, split=split)
    check_launches(kernel, split)
    assert_close(got, ref.paged_attention_prefill(query, *args), TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("strided", [False, True])
def test_reshape_and_cache(dtype, strided):
    bs, layers, hkv, d, n = 4, 3, 2, 64, 9
    cache = torch.randn(8, layers, 2, bs, hkv, d).to(dtype)
    want = cache.clone()
    slots = torch.tensor([0, 31, -1, 5, 6, 7, 12, -3, 20])
    qkv = torch.randn(n, 3 * hkv * d + (2 if strided else 0)).to(dtype)  # odd row stride: narrow units
    key = qkv[:, hkv * d : 2 * hkv * d].view(n, hkv, d)
    value = qkv[:, 2 * hkv * d : 3 * hkv * d].view(n, hkv, d)
    cuda_ops.reshape_and_cache(key, value, cache, 2, slots)
    ref.reshape_and_cache(key, value, want, 2, slots)
    assert torch.equal(cache, want)


def test_copy_blocks():
    cache = torch.randn(10, 2, 2, 8, 2, 32).half()
    want = cache.clone()
    pairs = torch.tensor([[1, 4], [1, 5], [9, 0], [3, 2]])
    cuda_ops.copy_blocks(cache, pairs)
    ref.copy_blocks(want, pairs)
    assert torch.equal(cache, want)


def test_swap_blocks_kernel():
    device_pool = torch.randn(12, 3, 2, 16, 1, 32)
    cpu_pool = torch.randn(5, 3, 2, 16, 1, 32)
    want_cpu = cpu_pool.clone()
    out_map = torch.tensor([[11, 0], [3, 4], [7, 2]])
    cuda_ops.swap_blocks(device_pool, cpu_pool, out_map)
    ref.swap_blocks(device_pool, want_cpu, out_map)
    assert torch.equal(cpu_pool, want_cpu)
    want_dev = device_pool.clone()
    in_map = torch.tensor([[0, 1], [4, 2], [2, 10]])
    cuda_ops.swap_blocks(cpu_pool, device_pool, in_map)
    ref.swap_blocks(cpu_pool, want_dev, in_map)
    assert torch.equal(device_pool, want_dev)


@pytest.mark.parametrize(
    "dtype,block_size,heads,head_dim,window",
    [(torch.float16, 16, (4, 2), 64, 20), (torch.float32, 4, (2, 2), 64, 7), (torch.bfloat16, 2, (6, 3), 64, 33),
     (torch.float16, 1, (8, 8), 128, 1)],
)
@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("mma", [True, False])
def test_sliding_window(monkeypatch, dtype, block_size, heads, head_dim, window, split, mma):
    """Prompts, cached prefixes and decode rows with a sliding window; the blocks wholly before
    a sequence's earliest window hold NaNs, which reach the output if the kernel reads them."""
    from paged_cases import poison_before_window

    if mma and dtype == torch.float32:
        mma = False  # fp32 has no tensor-core path: the scalar kernel twice
    kernel = kernel_path(monkeypatch, dtype, mma)
    hq, hkv = heads
    seqs = [(70, 70), (90, 11), (9, 1), (50, 1), (5, 5)]  # (context, new tokens)
    cache, tables, g = random_paged_cache([c for c, _ in seqs], block_size, hkv, head_dim, dtype)
    cache, tables = poison_before_window(cache, tables, [c for c, _ in seqs], [n for _, n in seqs], window)
    starts = [0]
    for _, q_len in seqs:
        starts.append(starts[-1] + q_len)
    query = torch.randn(starts[-1], hq, head_dim, generator=g).to(dtype)
    lens = torch.tensor([c for c, _ in seqs], dtype=torch.int32)
    args = (cache, 0, tables, torch.tensor(starts, dtype=torch.int32), lens, 0.2)
    got = cuda_ops.paged_attention_prefill(query, *args, window=window, split=split)
    check_launches(kernel, split)
    want = ref.paged_attention_prefill(query, *args, window=window)
    assert not want.isnan().any()
    assert_close(got, want, TOL[dtype])
    LAUNCHED.clear()
    last = torch.tensor(starts[1:]) - 1
    got = cuda_ops.paged_attention_decode(query[last], cache, 0, tables, lens, 0.2, window=window, split=split)
    check_launches(kernel, split)
    assert_close(got, ref.paged_attention_decode(query[last], cache, 0, tables, lens, 0.2, window=window), TOL[dtype])
