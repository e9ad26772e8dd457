"""GGUF's Q6_K matrices read in place (pagedkv/kernels/cpu/cpu_q6k.c): the weights the gguf
package dequantizes, bit for bit; products at float32 accuracy; each row's result the same
whatever its batch and the thread count."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize

from pagedkv.kernels.cpu import ops as cpu_ops
from pagedkv.runtime.models.quant import BlockLinear, BlockQuantized, from_gguf_raw

pytestmark = pytest.mark.skipif(cpu_ops.library() is None, reason="no C compiler to build the CPU kernels")


def q6k_matrix(n: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(raw Q6_K bytes [n, k / 256 * 210], the float32 weights they hold). The gguf package
    cannot quantize to Q6_K, so the blocks are random: 6-bit codes, 8-bit scales, and float16
    super-block scales of varied size."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (n * k // 256, 210), dtype=np.uint8)
    d = (rng.uniform(1e-4, 1e-2, n * k // 256) * rng.choice([-1, 1], n * k // 256)).astype(np.float16)
    blocks[:, 208:] = d.view(np.uint8).reshape(-1, 2)
    raw = blocks.reshape(n, -1)
    return raw, dequantize(raw, Q.Q6_K).reshape(n, k).astype(np.float32)


@pytest.mark.parametrize("n,k", [(16, 256), (48, 768), (7, 2048)])
def test_weights_are_the_gguf_packages_bit_for_bit(n, k):
    raw, want = q6k_matrix(n, k, seed=n)
    got = cpu_ops.q6k_dequantize(torch.from_numpy(raw), n, k)
    assert torch.equal(got, torch.from_numpy(want))
    kept = from_gguf_raw(raw, "Q6_K", n, k)
    assert isinstance(kept, BlockQuantized) and kept.shape == (n, k)
    assert torch.equal(kept.dequantize(), torch.from_numpy(want))
    assert torch.equal(kept.rows([2, 0]).dequantize(), torch.from_numpy(want[[2, 0]]))


@pytest.mark.parametrize("rows", [1, 3, 9, 33])
def test_products_are_float32_accurate_and_rows_ignore_their_batch(rows):
    n, k = 40, 1024
    raw, w = q6k_matrix(n, k, seed=rows)
    layer = BlockLinear(from_gguf_raw(raw, "Q6_K", n, k))
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
    got = layer(x)
    want = (x.double() @ torch.from_numpy(w).double().T).float()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    alone = torch.cat([layer(x[i:i + 1]) for i in range(rows)])
    assert torch.equal(got, alone)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert torch.equal(layer(x), got)
    finally:
        torch.set_num_threads(before)
    bias = torch.randn(n)
    assert torch.equal(layer(x, bias), got + bias)
    assert layer(x.bfloat16()).dtype == torch.bfloat16


def test_shapes_are_checked():
    raw, _ = q6k_matrix(16, 256)
    with pytest.raises(ValueError, match="q6k_linear"):
        cpu_ops.q6k_linear(torch.randn(2, 128), torch.from_numpy(raw), 16, 256)
