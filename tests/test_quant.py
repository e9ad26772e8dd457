"""Quantized linear layers (GGUF Q4_0/Q4_1/Q4_K/Q8_0 kept as they are) against the gguf
package's dequantization, and the engine running them: same memory accounting, preemption
that outputs never show."""
from __future__ import annotations

import mmap

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize
from gguf_files import QTYPES, write_gguf
from memory_maps import vm_flags
from models import MIXED_WORKLOAD, make_tiny_llama

from pagedkv.kernels.cpu import ops as cpu_ops
from pagedkv.runtime.engine.config import EngineConfig
from pagedkv.runtime.engine.llm import LLM
from pagedkv.runtime.models.llama import LlamaModel
from pagedkv.runtime.models.loader import load_model
from pagedkv.runtime.models.quant import GroupQuantized, Int4Linear, from_gguf_blocks, int4_cpu_available

transformers = pytest.importorskip("transformers")
needs_int4 = pytest.mark.skipif(not int4_cpu_available(), reason="this torch has no int4 CPU kernel")

ROWS, COLS = 48, 512  # 512: two Q4_K super-blocks per row


def raw_blocks(fmt: str, rng: np.random.Generator) -> np.ndarray:
    """A [ROWS, COLS] weight stored in `fmt`, as the file's bytes."""
    if fmt != "Q4_K":  # the gguf package quantizes these itself
        w = rng.standard_normal((ROWS, COLS)).astype(np.float32) * 0.05 + rng.uniform(-0.02, 0.02, (ROWS, 1))
        return quantize(w.astype(np.float32), Q[fmt])
    # Q4_K blocks with random contents: d and dmin small positive halves, random 6-bit scales and codes.
    blocks = ROWS * COLS // 256
    raw = rng.integers(0, 256, (blocks, 144), dtype=np.uint8)
    raw[:, 0:2] = rng.uniform(1e-4, 1e-3, (blocks, 1)).astype(np.float16).view(np.uint8)
    raw[:, 2:4] = rng.uniform(1e-4, 1e-3, (blocks, 1)).astype(np.float16).view(np.uint8)
    return raw.reshape(ROWS, -1)


@pytest.mark.parametrize("fmt", ["Q4_0", "Q4_1", "Q4_K", "Q8_0"])
def test_formats_dequantize_like_gguf(fmt):
    raw = raw_blocks(fmt, np.random.default_rng(0))
    expected = torch.from_numpy(dequantize(raw, Q[fmt]).reshape(ROWS, COLS).astype(np.float32))
    weight = from_gguf_blocks(raw, fmt, ROWS, COLS)
    assert weight.shape == (ROWS, COLS) and weight.codes.dtype == torch.uint8 and int(weight.codes.max()) <= 15
    # Codes and scales are the file's: only the float32 rounding of scale * (q - 8) + zero differs.
    torch.testing.assert_close(weight.dequantize(), expected, atol=1e-6 * float(expected.abs().max()), rtol=0)


needs_kernels = pytest.mark.skipif(cpu_ops.library() is None, reason="no C compiler to build the CPU kernels")


def terms_of(weight: GroupQuantized) -> torch.Tensor:
    """|scale * (code - 8)| + |zero| per weight [N, K] (a split code's two halves added)."""
    halves = weight.codes.float().sub(8).abs() * weight.scales.repeat_interleave(32, 1).abs()
    halves += weight.zeros.repeat_interleave(32, 1).abs()
    n, k = weight.shape
    return halves.view(n, 2, k).sum(1) if weight.split8 else halves


def magnitude_of(weight: GroupQuantized, x: torch.Tensor) -> torch.Tensor:
    """|x| @ |terms|^T: the scale of each output's rounding errors."""
    return x.abs() @ terms_of(weight).T


def integer_bound(x: torch.Tensor, terms: torch.Tensor) -> torch.Tensor:
    """The error each output of the integer kernels (cpu_vnni.c, cpu_q8.c) may have: each
    activation rounded to a signed byte, its group's largest +-127 (half a unit: 1/254 of that
    largest), then a few float32 roundings per term. terms: |w| per weight, [N, K]."""
    rows, groups = x.shape[0], x.shape[1] // 32
    largest = x.abs().double().view(rows, groups, 32).amax(2)
    per_group = terms.double().view(terms.shape[0], groups, 32).sum(2)
    return (0.5 / 127 * (1 + 2 ** -20) * largest @ per_group.T + 2 ** -20 * (x.abs().double() @ terms.double().T)
            + 1e-30)


@needs_int4
@pytest.mark.parametrize("fmt", ["Q4_0", "Q4_1", "Q4_K", "Q8_0"])
@pytest.mark.parametrize("rows", [1, 5, 33])
def test_torch_int4_linear_against_float32_reference(fmt, rows):
    weight = from_gguf_blocks(raw_blocks(fmt, np.random.default_rng(1)), fmt, ROWS, COLS)
    x = torch.randn(rows, COLS, generator=torch.Generator().manual_seed(2))
    out = Int4Linear(weight, kernel="torch")(x)
    assert out.dtype == torch.float32 and out.shape == (rows, ROWS)
    reference = x @ weight.dequantize().T
    # Activations, scales, offsets and outputs in bfloat16 (relative error 2^-9 each): every
    # term x * (scale * (q - 8) + zero) errs by at most about 4 * 2^-9 of its magnitude.
    assert bool(((out - reference).abs() <= 2 ** -7 * magnitude_of(weight, x) + 1e-6).all())
    assert float((out - reference).abs().max()) > 0  # it did run in bfloat16: the bound is the one that applies


@pytest.fixture(params=["integers", "floats"])
def float32_kernel(request):
    """Float32 rows through 4-bit weights by exact integer products (pagedkv/kernels/cpu/cpu_vnni.c, where
    the CPU has AVX512-VNNI), or by float32 FMAs (pagedkv/kernels/cpu/cpu_int4.c)."""
    if cpu_ops.library() is None:
        pytest.skip("no C compiler to build the CPU kernels")
    if request.param == "integers" and not cpu_ops.vnni_supported():
        pytest.skip("no AVX512-VNNI on this CPU")
    cpu_ops.set_vnni(request.param == "integers")
    yield request.param
    cpu_ops.set_vnni(True)


@needs_kernels
@pytest.mark.parametrize("fmt", ["Q4_0", "Q4_1", "Q4_K", "Q8_0"])
# floats: the fused path (up to 6 rows) and the buffered one; integers: vectors up to 7, AMX from 8
@pytest.mark.parametrize("rows", [1, 5, 7, 8, 33])
def test_pagedkv_int4_linear_is_float32_accurate(fmt, rows, float32_kernel):
    weight = from_gguf_blocks(raw_blocks(fmt, np.random.default_rng(1)), fmt, ROWS, COLS)
    x = torch.randn(rows, COLS, generator=torch.Generator().manual_seed(2))
    lin = Int4Linear(weight, kernel="pagedkv", eight_bit=False)
    out = lin(x)
    assert out.dtype == torch.float32 and out.shape == (rows, ROWS)
    # The file's scales as they are: float16 where it stores them, float32 for Q4_K's products.
    assert lin.packed.half == (fmt != "Q4_K")
    reference = x.double() @ weight.dequantize().double().T
    # float32 weights and sums: a few float32 roundings per term; integer products: the
    # activations' bytes as well.
    bound = (integer_bound(x, terms_of(weight)) if float32_kernel == "integers"
             else 2 ** -20 * magnitude_of(weight, x).double())
    assert bool(((out.double() - reference).abs() <= bound).all())
    # bfloat16 rows and a bias: weights (and outputs) rounded to bfloat16, float32 sums.
    xb, bias = x.bfloat16(), torch.randn(ROWS).bfloat16()
    got = lin(xb, bias)
    want = xb.double() @ weight.dequantize().double().T + bias.double()
    assert got.dtype == torch.bfloat16
    allowed = 2 ** -7 * (magnitude_of(weight, xb.float()).double() + bias.double().abs()) + 1e-6
    assert bool(((got.double() - want).abs() <= allowed).all())


@needs_kernels
@pytest.mark.parametrize("fmt", ["Q4_0", "Q4_1", "Q4_K", "Q8_0"])
def test_pagedkv_int4_rows_do_not_depend_on_their_batch(fmt, float32_kernel):
    # What keeps preemption invisible: a row's output is the same alone or in any batch.
    weight = from_gguf_blocks(raw_blocks(fmt, np.random.default_rng(5)), fmt, ROWS, COLS)
    lin = Int4Linear(weight, kernel="pagedkv", eight_bit=False)
    x = torch.randn(1100, COLS, generator=torch.Generator().manual_seed(6))  # 1,024 rows on: tile groups
    assert_rows_independent(lin, x, [(0, 1), (3, 5), (0, 7), (0, 8), (10, 16), (20, 27), (0, 64), (69, 70),
                                     (100, 227), (1, 1030)])


needs_vnni = pytest.mark.skipif(not cpu_ops.vnni_supported(), reason="no AVX512-VNNI on this CPU")


@needs_vnni
@pytest.mark.parametrize("fmt", ["Q4_0", "Q4_1", "Q4_K", "Q8_0"])
def test_integer_products_are_the_same_with_and_without_amx(fmt):
    # The sums are exact integers, so AMX's tile products and the vectors' give the same bits.
    weight = from_gguf_blocks(raw_blocks(fmt, np.random.default_rng(8)), fmt, ROWS, COLS)
    lin = Int4Linear(weight, kernel="pagedkv", eight_bit=False)
    x = torch.randn(40, COLS, generator=torch.Generator().manual_seed(9))
    with_amx = lin(x)
    made_with_amx = cpu_ops.amx_supported()
    try:
        cpu_ops.set_amx(False)
        assert torch.equal(lin(x), with_amx)
    finally:
        cpu_ops.set_amx(made_with_amx)


@needs_vnni
def test_integer_products_follow_each_groups_scale():
    weight = odd_weight()
    lin = Int4Linear(weight, kernel="pagedkv", eight_bit=False)
    g = torch.Generator().manual_seed(10)
    x = torch.randn(12, 576, generator=g)
    # Groups of very different sizes within a row, and an outlier within a group: each group
    # keeps its own scale, its largest activation 127 units.
    x[:, 32:64] *= 1e-12
    x[:, 64:96] *= 1e12
    x[:, 100] = 3e4
    out = lin(x)
    reference = x.double() @ weight.dequantize().double().T
    assert bool(((out.double() - reference).abs() <= integer_bound(x, terms_of(weight))).all())
    # Powers of two only move exponents: the same integers, results scaled exactly.
    for k in (-60, -1, 3, 70):
        assert torch.equal(lin(x * 2.0 ** k), out * 2.0 ** k)
    # Rows of zeros give zeros; a group that holds a NaN or an infinity makes its row NaN and no other.
    x[3] = 0
    x[5, 40] = float("nan")
    x[7, 500] = float("inf")
    got = lin(x)
    assert torch.equal(got[3], torch.zeros(48))
    assert bool(got[5].isnan().all() and got[7].isnan().all())
    rest = [i for i in range(12) if i not in (3, 5, 7)]
    assert torch.equal(got[rest], lin(x[rest]))
    # Rows further apart than their width (a view into a wider tensor).
    wide = torch.randn(9, 700, generator=g)
    assert torch.equal(lin(wide[:, :576]), lin(wide[:, :576].contiguous()))


@needs_vnni
@pytest.mark.parametrize("rows", [1, 3, 6, 7, 8, 9, 17])  # the 4-row passes, register blocks and their tails
def test_integer_products_of_integers_that_fit_are_exact(rows):
    # Activations that are integers with each group's largest +-127 are their own bytes, and
    # power-of-two scales keep every sum exact in float32: the outputs must equal the float64
    # product exactly (a slip in the bytes, their signs or the codes' offset shows).
    g = torch.Generator().manual_seed(rows)
    n, k = 32, 128
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    scales = torch.randint(-6, -2, (n, k // 32), generator=g).float().exp2()
    weight = GroupQuantized(codes, scales, torch.zeros_like(scales), False, "Q4_0")  # w = scale * (code - 8)
    x = torch.randint(-126, 127, (rows, k), generator=g).float()
    x.view(rows, -1, 32)[:, :, 5] = 127
    x.view(rows, -1, 32)[:, ::2, 5] *= -1
    made_with_amx = cpu_ops.amx_supported()
    try:
        cpu_ops.set_amx(False)
        out = Int4Linear(weight, kernel="pagedkv", eight_bit=False)(x)
    finally:
        cpu_ops.set_amx(made_with_amx)
    assert torch.equal(out.double(), x.double() @ weight.dequantize().double().T)


def assert_rows_independent(lin: Int4Linear, x: torch.Tensor, slices: list[tuple[int, int]]) -> torch.Tensor:
    """Each slice of x's rows gives the rows of the whole batch's result, and so does the other
    thread count; returns that result."""
    full = lin(x)
    for start, stop in slices:
        assert torch.equal(lin(x[start:stop]), full[start:stop]), (start, stop)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2 if before == 1 else 1)
        assert torch.equal(lin(x), full)
    finally:
        torch.set_num_threads(before)
    return full


needs_amx = pytest.mark.skipif(not cpu_ops.amx_supported(), reason="no AMX on this CPU or operating system")
needs_bf16_dots = pytest.mark.skipif(not cpu_ops.int4_bf16_supported(), reason="no AVX512-BF16 on this CPU")
# bfloat16 rows through 4-bit weights in bfloat16: on AMX, or by AVX512-BF16's dot products
needs_bf16_int4 = pytest.mark.skipif(not (cpu_ops.amx_supported() or cpu_ops.int4_bf16_supported()),
                                     reason="no AMX or AVX512-BF16 on this CPU")


@needs_amx
@pytest.mark.parametrize("fmt", ["Q4_0", "Q4_1", "Q4_K", "Q8_0"])
@pytest.mark.parametrize("rows", [1, 17, 33, 300])  # one A tile, two, a buffered block, blocks and a padded tail
def test_amx_int4_linear_holds_a_bfloat16_models_weights(fmt, rows):
    weight = from_gguf_blocks(raw_blocks(fmt, np.random.default_rng(1)), fmt, ROWS, COLS)
    x = torch.randn(rows, COLS, generator=torch.Generator().manual_seed(2)).bfloat16()
    lin = Int4Linear(weight, kernel="pagedkv", eight_bit=False)
    out = lin(x)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, ROWS)
    # The weights a bfloat16 model dequantized from the file holds, exact products, float32
    # sums, one rounding to bfloat16 (relative 2^-9) at the end.
    reference = x.double() @ weight.dequantize().bfloat16().double().T
    error = (out.double() - reference).abs()
    assert bool((error <= 2 ** -8 * reference.abs() + 2 ** -18 * magnitude_of(weight, x.float()).double()).all())
    # Not float32 weights: their sums differ from these by more than the bound allows somewhere.
    float32_weights = x.double() @ weight.dequantize().double().T
    assert float((float32_weights - reference).abs().max()) > 2 ** -18 * float(magnitude_of(weight, x.float()).max())


def odd_weight() -> GroupQuantized:
    """48 rows (three tiles: a pair and one alone) by 576 columns (18 groups: uneven chunks)."""
    g = torch.Generator().manual_seed(7)
    scales = torch.rand(48, 18, generator=g).mul(0.01).add(0.001).half().float()
    zeros = torch.randn(48, 18, generator=g).mul(0.01).half().float()
    return GroupQuantized(torch.randint(0, 16, (48, 576), generator=g, dtype=torch.uint8), scales, zeros, False,
                          "Q4_1")


@needs_amx
@pytest.mark.parametrize("fmt", ["Q4_1", "Q8_0", "odd"])
def test_amx_int4_rows_do_not_depend_on_their_batch(fmt):
    weight = odd_weight() if fmt == "odd" else from_gguf_blocks(raw_blocks(fmt, np.random.default_rng(5)), fmt,
                                                                  ROWS, COLS)
    lin = Int4Linear(weight, kernel="pagedkv", eight_bit=False)
    x = torch.randn(600, weight.shape[1], generator=torch.Generator().manual_seed(6)).bfloat16()  # blocks of 256
    full = assert_rows_independent(lin, x, [(0, 1), (3, 5), (10, 16), (15, 33), (0, 64), (250, 260), (255, 300),
                                            (1, 600)])
    reference = x.double() @ weight.dequantize().bfloat16().double().T
    assert bool(((full.double() - reference).abs() <= 2 ** -8 * reference.abs() + 1e-6).all())


@needs_bf16_dots
@settings(max_examples=25, deadline=None)
@given(tiles=st.integers(1, 5), groups=st.integers(1, 40), rows=st.integers(1, 300),
       kind=st.sampled_from(["offsets", "symmetric", "split"]), seed=st.integers(0, 2 ** 16))
def test_bf16_dot_products_on_any_shape(tiles, groups, rows, kind, seed):
    # Where AMX is missing, bfloat16 rows through 4-bit weights by AVX512-BF16's dot products
    # (cpu_bf16.c): the weights a bfloat16 model dequantized from the file holds, exact products,
    # float32 sums, one rounding of each output; register blocks of 8 rows by 2 tiles (an odd
    # tile alone), blocks of rows that fill 512 KB, fewer rows in C: each row the bits it has
    # alone or in any other batch, on either thread count.
    g = torch.Generator().manual_seed(seed)
    weight = random_weight(g, tiles, groups, kind)
    lin = Int4Linear(weight, kernel="pagedkv", eight_bit=False)
    x = (torch.randn(rows, 32 * groups, generator=g) * torch.rand(rows, 1, generator=g).mul(8).exp2()).bfloat16()
    made_with_amx = cpu_ops.amx_supported()
    try:
        cpu_ops.set_amx(False)
        out = lin(x)
        assert out.dtype == torch.bfloat16 and out.shape == (rows, 16 * tiles)
        alone = torch.cat([lin(x[i:i + 1]) for i in range(rows)])
        assert torch.equal(out, alone)
        for start, stop in ((1, rows), (rows // 3, rows), (0, min(rows, 9))):
            assert torch.equal(lin(x[start:stop]), out[start:stop]), (start, stop)
        before = torch.get_num_threads()
        try:
            torch.set_num_threads(2 if before == 1 else 1)
            assert torch.equal(lin(x), out)
        finally:
            torch.set_num_threads(before)
    finally:
        cpu_ops.set_amx(made_with_amx)
    dense = weight.dequantize().bfloat16().double()
    reference = x.double() @ dense.T
    magnitude = x.abs().double() @ dense.abs().T
    error = (out.double() - reference).abs()
    # One rounding to bfloat16 (half a step: 2^-9 relative), a float32 sum of 32 * groups terms.
    assert bool((error <= 2 ** -8 * reference.abs() + 2 ** -24 * (32 * groups + 2) * magnitude + 1e-30).all())


@needs_bf16_dots
def test_bf16_dot_products_hold_a_bfloat16_models_weights():
    weight = from_gguf_blocks(raw_blocks("Q8_0", np.random.default_rng(1)), "Q8_0", ROWS, COLS)
    x = torch.randn(40, COLS, generator=torch.Generator().manual_seed(2)).bfloat16()
    lin = Int4Linear(weight, kernel="pagedkv", eight_bit=False)
    made_with_amx = cpu_ops.amx_supported()
    try:
        cpu_ops.set_amx(False)
        out = lin(x)
    finally:
        cpu_ops.set_amx(made_with_amx)
    reference = x.double() @ weight.dequantize().bfloat16().double().T
    assert bool(((out.double() - reference).abs() <= 2 ** -8 * reference.abs() + 2 ** -18 * magnitude_of(
        weight, x.float()).double()).all())
    # Not float32 weights: their sums differ from these by more than the bound allows somewhere.
    float32_weights = x.double() @ weight.dequantize().double().T
    assert float((float32_weights - reference).abs().max()) > 2 ** -18 * float(magnitude_of(weight, x.float()).max())


def random_weight(g: torch.Generator, tiles: int, groups: int, kind: str) -> GroupQuantized:
    """16 * tiles rows by 32 * groups columns: Q4_1-like offsets, Q4_0-like symmetric codes, or
    Q8_0's split halves."""
    n, k = 16 * tiles, 32 * groups
    width = 2 * k if kind == "split" else k
    scales = torch.rand(n, width // 32, generator=g).mul(0.02).add(0.001).half().float()
    zeros = torch.randn(n, width // 32, generator=g).mul(0.02).half().float()
    if kind == "symmetric":
        zeros = torch.zeros_like(scales)
    elif kind == "split":  # high halves 16 d, low halves d: w = d * q (Q8_0)
        scales[:, groups:] = scales[:, :groups] / 16
        zeros = torch.cat([torch.zeros_like(scales[:, :groups]), 8 * scales[:, groups:]], dim=1)
    codes = torch.randint(0, 16, (n, width), generator=g, dtype=torch.uint8)
    return GroupQuantized(codes, scales, zeros, kind == "split", "test")


@needs_vnni
@settings(max_examples=30, deadline=None)
@given(tiles=st.integers(1, 5), groups=st.integers(1, 40), rows=st.integers(1, 40),
       kind=st.sampled_from(["offsets", "symmetric", "split"]), seed=st.integers(0, 2 ** 16))
def test_integer_products_on_any_shape(tiles, groups, rows, kind, seed):
    # Other models' shapes: any number of 16-row tiles and 32-column groups, Q4_1-like offsets,
    # Q4_0-like symmetric codes, or Q8_0's split halves; float32-accurate, rows independent.
    g = torch.Generator().manual_seed(seed)
    weight = random_weight(g, tiles, groups, kind)
    lin = Int4Linear(weight, kernel="pagedkv", eight_bit=False)
    x = torch.randn(rows, 32 * groups, generator=g) * torch.rand(rows, 1, generator=g).mul(8).exp2()
    out = lin(x)
    dense = weight.dequantize().double()
    error = (out.double() - x.double() @ dense.T).abs()
    assert bool((error <= integer_bound(x, terms_of(weight))).all())
    assert torch.equal(lin(x[rows // 2:]), out[rows // 2:]) and torch.equal(lin(x[:1]), out[:1])


@needs_vnni
@settings(max_examples=25, deadline=None)
@given(tiles=st.integers(1, 4), groups=st.integers(1, 40), rows=st.integers(7, 500),
       kind=st.sampled_from(["offsets", "symmetric", "split"]), seed=st.integers(0, 2 ** 16))
def test_integer_register_blocks_on_any_shape(tiles, groups, rows, kind, seed):
    # Where AMX is missing, batches from 7 rows take register blocks of 8 rows (a tail of 4),
    # blocks of rows that fill 512 KB of activation bytes (408 rows at 40 groups): float32-accurate, and
    # each row the bits it has alone (the vector path) or in any other batch.
    g = torch.Generator().manual_seed(seed)
    weight = random_weight(g, tiles, groups, kind)
    lin = Int4Linear(weight, kernel="pagedkv", eight_bit=False)
    x = torch.randn(rows, 32 * groups, generator=g) * torch.rand(rows, 1, generator=g).mul(8).exp2()
    made_with_amx = cpu_ops.amx_supported()
    try:
        cpu_ops.set_amx(False)
        out = lin(x)
        alone = torch.cat([lin(x[i:i + 1]) for i in range(rows)])
        assert torch.equal(out, alone)
        for start, stop in ((1, rows), (rows // 3, rows), (0, 9), (rows - 7, rows)):
            assert torch.equal(lin(x[start:stop]), out[start:stop]), (start, stop)
        before = torch.get_num_threads()
        try:
            torch.set_num_threads(2 if before == 1 else 1)
            assert torch.equal(lin(x), out)
        finally:
            torch.set_num_threads(before)
    finally:
        cpu_ops.set_amx(made_with_amx)
    dense = weight.dequantize().double()
    error = (out.double() - x.double() @ dense.T).abs()
    assert bool((error <= integer_bound(x, terms_of(weight))).all())
    assert torch.equal(lin(x), out)  # with AMX where there is one: the same exact sums


def test_rows_and_cat_follow_the_dense_weight():
    weight = from_gguf_blocks(raw_blocks("Q4_1", np.random.default_rng(3)), "Q4_1", ROWS, COLS)
    order = torch.randperm(ROWS, generator=torch.Generator().manual_seed(0))
    assert torch.equal(weight.rows(order).dequantize(), weight.dequantize()[order])
    both = GroupQuantized.cat([weight, weight.rows(order)])
    assert torch.equal(both.dequantize(), torch.cat([weight.dequantize(), weight.dequantize()[order]]))
    eight = from_gguf_blocks(raw_blocks("Q8_0", np.random.default_rng(4)), "Q8_0", ROWS, COLS)
    with pytest.raises(ValueError, match="different formats"):
        GroupQuantized.cat([weight, eight])


# -- a GGUF file quantized like the default model: Q4_1 matrices, a Q8_0 embedding --------------------

Q4_1_FILE = {**QTYPES, **{k: Q.Q4_1 for k in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up",
                                            "ffn_down")}, "token_embd": Q.Q8_0}


@pytest.fixture(scope="module")
def q4_gguf(tmp_path_factory):
    folder = make_tiny_llama(str(tmp_path_factory.mktemp("q4hf")), with_tokenizer=False, tie_word_embeddings=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    weights = {k: v.numpy() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    return write_gguf(str(tmp_path_factory.mktemp("q4") / "q4.gguf"), weights, model.config, qtypes=Q4_1_FILE)


def test_kept_matrices_equal_the_dequantized_ones(q4_gguf):
    kept, dense = load_model(q4_gguf, quantization="auto"), load_model(q4_gguf)
    assert sorted(kept.weights) == sorted(dense.weights)
    quantized = {k for k, v in kept.weights.items() if isinstance(v, GroupQuantized)}
    assert len(quantized) == 1 + 7 * kept.config.num_layers  # embedding and every matrix; norms stay F32
    for name, weight in kept.weights.items():  # q/k rows unpermuted alike
        got = weight.dequantize() if name in quantized else weight
        torch.testing.assert_close(got, dense.weights[name], atol=1e-6, rtol=0, msg=name)


@needs_int4
def test_engine_runs_quantized_layers_and_none_is_dense(q4_gguf):
    loaded = load_model(q4_gguf, quantization="auto")
    model = LlamaModel(loaded.config, loaded.weights, torch.device("cpu"), torch.float32)
    assert all(isinstance(lin, Int4Linear) for lin in model.linear_weights())
    assert "Q4_1, Q8_0" in model.describe()
    if hasattr(mmap, "MADV_HUGEPAGE"):  # the 4-bit matrices are streamed from huge pages
        assert all("hg" in vm_flags(lin.packed.data.data_ptr()) for lin in model.linear_weights())
    dense = LlamaModel(loaded.config, loaded.weights, torch.device("cpu"), torch.float32, keep_quantized=False)
    assert not any(isinstance(lin, Int4Linear) for lin in dense.linear_weights())
    assert EngineConfig(device="cpu").keeps_quantized() and not EngineConfig(device="cpu", quantization="none").keeps_quantized()
    with pytest.raises(ValueError, match="quantization must be one of"):
        EngineConfig(quantization="int3")


def test_kv_cache_dtype_auto_is_bfloat16_for_a_float32_model_kept_quantized_on_the_cpu(q4_gguf):
    config = EngineConfig(device="cpu")
    assert config.kv_cache_torch_dtype(torch.float32, quantized_weights=True) == torch.bfloat16
    assert config.kv_cache_torch_dtype(torch.float32, quantized_weights=False) == torch.float32  # dense files
    assert config.kv_cache_torch_dtype(torch.bfloat16, quantized_weights=True) == torch.bfloat16
    explicit = EngineConfig(device="cpu", kv_cache_dtype="float32")
    assert explicit.kv_cache_torch_dtype(torch.float32, quantized_weights=True) == torch.float32
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, float32, bfloat16"):
        EngineConfig(kv_cache_dtype="fp8")
    loaded = load_model(q4_gguf, quantization="auto")
    common = dict(loaded=loaded, device="cpu", num_device_blocks=8, swap_space_gib=0.0)
    assert LLM(**common).engine.cache.spec.dtype == torch.bfloat16  # the default model's default
    assert LLM(quantization="none", **common).engine.cache.spec.dtype == torch.float32  # the reference


PROMPTS = [list(range(5, 12)), [3, 4], list(range(20, 41)), [7, 8, 9, 10, 11, 12, 13, 14, 15], [42] * 5]
WORKLOAD = MIXED_WORKLOAD


@needs_int4
@pytest.mark.parametrize("mode", ["swap", "recompute"])
@pytest.mark.parametrize("dtype", ["float32", pytest.param("bfloat16", marks=needs_bf16_int4)])
def test_preemption_is_invisible_quantized(q4_gguf, mode, dtype):
    loaded = load_model(q4_gguf, quantization="auto", dtype=getattr(torch, dtype))
    common = dict(loaded=loaded, block_size=4, swap_space_gib=0.01, device="cpu", dtype=dtype)
    reference = LLM(num_device_blocks=256, **common).generate(PROMPTS, WORKLOAD, use_tqdm=False)
    llm = LLM(num_device_blocks=20, preemption_mode=mode, max_num_batched_tokens=12, **common)
    results = llm.generate(PROMPTS, WORKLOAD, use_tqdm=False)
    stats = llm.engine.stats()
    assert stats["preemptions"][mode] >= 2, stats["preemptions"]
    assert [[c.token_ids for c in r.outputs] for r in results] == [[c.token_ids for c in r.outputs]
                                                                   for r in reference]
    bm = llm.engine.block_manager
    assert bm.num_free_device_blocks == bm.num_device_blocks and bm.num_free_cpu_blocks == bm.num_cpu_blocks


@needs_amx
def test_amx_int4_takes_no_rows_and_says_when_amx_is_off():
    lin = Int4Linear(odd_weight(), kernel="pagedkv", eight_bit=False)
    assert lin(torch.zeros(0, 576).bfloat16()).shape == (0, 48)
    model_made_with_amx = cpu_ops.amx_supported()
    try:
        cpu_ops.set_amx(False)  # bfloat16 rows now take the AVX512-BF16 kernel (every CPU with AMX has it)
        x = torch.randn(3, 576, generator=torch.Generator().manual_seed(1)).bfloat16()
        want = torch.empty(3, 48, dtype=torch.bfloat16)
        assert cpu_ops.library().int4_linear_bf16(x.data_ptr(), 576, 3, 576, lin.packed.data.data_ptr(),
                                                  int(lin.packed.half), 48, 576, want.data_ptr(), 1) == 0
        assert torch.equal(lin(x), want)
        with pytest.raises(RuntimeError, match="no AMX"):  # what a plan made with AMX then meets
            cpu_ops.check_rc(cpu_ops.library().int4_linear_amx(None, 0, 1, 32, None, 1, 16, 32, None, 1), "x")
    finally:
        cpu_ops.set_amx(model_made_with_amx)
