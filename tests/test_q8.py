"""cpu_q8.c: float32 rows through 8-bit codes (Q8_0, Q5_0) in exact integer sums, against a
float64 reference, an exact case, and the promise that keeps preemption invisible: a row's
result is the same bits alone, in any batch, and on any number of threads."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize
from test_quant import integer_bound

from pagedkv.kernels.cpu import ops as cpu_ops
from pagedkv.runtime.models.quant import Int4Linear, from_gguf_blocks

pytestmark = pytest.mark.skipif(not cpu_ops.q8_supported(), reason="no AVX512-VNNI on this CPU")


def random_q8(g: torch.Generator, n: int, k: int, code_range: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes q (int32 [n, k], -code_range .. code_range - 1) and float16-exact scales [n, k / 32]."""
    q = torch.randint(-code_range, code_range, (n, k), generator=g, dtype=torch.int32)
    d = torch.rand(n, k // 32, generator=g).mul(0.02).add(1e-3).half().float()
    return q, d


def dense(q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    return q.double() * d.double().repeat_interleave(32, 1)


def test_float64_reference_and_the_bound_is_tight():
    g = torch.Generator().manual_seed(0)
    q, d = random_q8(g, 48, 320)
    packed = cpu_ops.pack_q8((q + 128).to(torch.uint8), d)
    assert packed.shape == (48, 320) and packed.data.shape == (3, 10 * 544)
    x = torch.randn(9, 320, generator=g)
    error = (cpu_ops.q8_linear(x, packed).double() - x.double() @ dense(q, d).T).abs()
    allowed = integer_bound(x, dense(q, d).abs())
    assert bool((error <= allowed).all())
    assert float((error / allowed).max()) > 1e-2  # bytes, not float32's 24 bits: the bound is the one that applies


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8, 9, 17])
def test_integers_that_fit_come_out_exact(rows):
    # Activations that are integers with each group's largest +-127 are their own bytes, and
    # scales that are powers of two keep every sum exact in float32: the output must equal the
    # float64 product exactly (any slip in the bytes, their signs or the code offset shows).
    g = torch.Generator().manual_seed(rows)
    n, k = 32, 128
    q = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int32)
    d = torch.randint(-6, -2, (n, k // 32), generator=g).float().exp2()
    x = torch.randint(-126, 127, (rows, k), generator=g).float()
    x.view(rows, -1, 32)[:, :, 5] = 127
    x.view(rows, -1, 32)[:, ::2, 5] *= -1
    out = cpu_ops.q8_linear(x, cpu_ops.pack_q8((q + 128).to(torch.uint8), d))
    assert torch.equal(out.double(), x.double() @ dense(q, d).T)


@settings(max_examples=30, deadline=None)
@given(tiles=st.integers(1, 5), groups=st.integers(1, 30), rows=st.integers(1, 300), seed=st.integers(0, 2 ** 16))
def test_rows_do_not_depend_on_their_batch(tiles, groups, rows, seed):
    # What keeps preemption invisible: each row the bits it has alone, in any slice of the batch
    # (register blocks of 8, tails of 1 to 7, panels of rows) and on one or two threads.
    g = torch.Generator().manual_seed(seed)
    q, d = random_q8(g, 16 * tiles, 32 * groups)
    packed = cpu_ops.pack_q8((q + 128).to(torch.uint8), d)
    x = torch.randn(rows, 32 * groups, generator=g) * torch.rand(rows, 1, generator=g).mul(16).sub(8).exp2()
    out = cpu_ops.q8_linear(x, packed)
    allowed = integer_bound(x, dense(q, d).abs())
    assert bool(((out.double() - x.double() @ dense(q, d).T).abs() <= allowed).all())
    alone = torch.cat([cpu_ops.q8_linear(x[i:i + 1], packed) for i in range(0, rows, max(1, rows // 20))])
    assert torch.equal(alone, out[::max(1, rows // 20)])
    for start, stop in ((1, rows), (rows // 3, rows), (0, min(rows, 9)), (max(0, rows - 7), rows)):
        assert torch.equal(cpu_ops.q8_linear(x[start:stop], packed), out[start:stop]), (start, stop)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2 if before == 1 else 1)
        assert torch.equal(cpu_ops.q8_linear(x, packed), out)
    finally:
        torch.set_num_threads(before)


def test_nans_infinities_and_zeros_stay_in_their_row():
    g = torch.Generator().manual_seed(3)
    q, d = random_q8(g, 32, 96)
    packed = cpu_ops.pack_q8((q + 128).to(torch.uint8), d)
    x = torch.randn(6, 96, generator=g)
    x[1, 40], x[3, 0], x[4] = float("nan"), float("inf"), 0
    x[5, :32] = 1e-40  # a group of subnormals counts as zeros
    out = cpu_ops.q8_linear(x, packed)
    assert bool(out[1].isnan().all()) and bool(out[3].isnan().all()) and bool((out[4] == 0).all())
    clean = [0, 2, 5]
    assert torch.equal(out[clean], cpu_ops.q8_linear(x[clean], packed)) and bool(out[clean].isfinite().all())
    assert cpu_ops.q8_linear(torch.zeros(0, 96), packed).shape == (0, 32)
    with pytest.raises(ValueError, match="q8_linear: input"):
        cpu_ops.q8_linear(torch.zeros(2, 64), packed)
    with pytest.raises(ValueError, match="cannot pack 8-bit codes"):
        cpu_ops.pack_q8((q + 128).to(torch.uint8), d + 1e-4)  # not a float16 scale


@pytest.mark.parametrize("fmt", ["Q8_0", "Q5_0"])
def test_files_q8_and_q5_codes_run_whole(fmt):
    # A float32 model's Q8_0 and Q5_0 matrices take these codes whole where AMX is missing (the
    # halves where it is there, or for a bfloat16 model): the file's weights, within the bound.
    rng = np.random.default_rng(4)
    w = (rng.standard_normal((48, 256)) * 0.05).astype(np.float32)
    raw = quantize(w, Q[fmt])
    weight = from_gguf_blocks(raw, fmt, 48, 256)
    whole, halves = Int4Linear(weight, kernel="pagedkv"), Int4Linear(weight, kernel="pagedkv", eight_bit=False)
    assert isinstance(whole.packed, cpu_ops.PackedQ8) != cpu_ops.amx_supported()
    assert isinstance(halves.packed, cpu_ops.PackedInt4)
    file_weights = torch.from_numpy(dequantize(raw, Q[fmt]).reshape(48, 256).astype(np.float64))
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(5))
    out = whole(x)
    allowed = integer_bound(x, file_weights.abs())
    assert bool(((out.double() - x.double() @ file_weights.T).abs() <= allowed).all())
    # The halves (cpu_vnni.c): the same bytes and exact sums, added up in float32 another way.
    float32_roundings = 2 ** -19 * (x.abs().double() @ file_weights.abs().T)
    assert bool(((halves(x).double() - out.double()).abs() <= float32_roundings).all())
    rows = x.bfloat16()
    if isinstance(whole.packed, cpu_ops.PackedQ8):  # bfloat16 rows: computed in float32
        assert torch.equal(whole(rows), whole(rows.float()).bfloat16())
    else:  # on AMX's tiles (cpu_amx.c): the weights in bfloat16, float32 sums, one rounding
        reference = rows.double() @ weight.dequantize().bfloat16().double().T
        bound = 2 ** -8 * reference.abs() + 2 ** -18 * (rows.double().abs() @ file_weights.abs().T)
        assert bool(((whole(rows).double() - reference).abs() <= bound).all())
