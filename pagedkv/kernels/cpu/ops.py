"""CPU kernels, built with the C compiler at first use (gcc -O3 -march=native -fopenmp, a few
seconds) into a per-user cache folder and called through ctypes with the tensors' own pointers:
- pagedkv/kernels/cpu/cpu_kernels.c: paged attention (decode and prompts) and the cache write, which take
  the reference's arguments and fall back to the reference (pagedkv/kernels/reference.py) where the
  library cannot be built, for float16 caches, unsupported head sizes, and when
  PAGEDKV_CPU_KERNELS=0; and the CPU model's steps between its matrix products
  (`rotary_and_cache`, `add_rms_norm`, `silu_and_mul`) and the sampler's
  `greedy_and_logsumexp`, which their callers use where `library()` builds;
- pagedkv/kernels/cpu/cpu_int4.c: 4-bit weight-only matrix products (`int4_linear`), float32 activations;
- pagedkv/kernels/cpu/cpu_vnni.c: the same in exact integer products (AVX512-VNNI, AMX), which `int4_linear`
  hands float32 rows to where the CPU has them (`vnni_supported`);
- pagedkv/kernels/cpu/cpu_amx.c: the same with bfloat16 activations on AMX (`int4_linear` of bfloat16 rows),
  and AMX's availability (`amx_supported`), which the attention kernel uses too;
- pagedkv/kernels/cpu/cpu_bf16.c: bfloat16 matrix products of few rows (`bf16_linear`, AVX512-BF16), and
  bfloat16 rows through 4-bit weights where AMX is missing (`int4_linear` of bfloat16 rows);
- pagedkv/kernels/cpu/cpu_f32.c: float32 matrix products, each row the same whatever its batch (`f32_linear`, AVX-512);
- pagedkv/kernels/cpu/cpu_decode.c: a decode batch's decoder layers in one call (pagedkv/kernels/cpu/decode.py);
- pagedkv/kernels/cpu/cpu_q6k.c: float32 rows through GGUF's Q6_K blocks read in place (`q6k_linear`);
- pagedkv/kernels/cpu/cpu_q8.c: float32 rows through 8-bit codes (Q8_0) in exact integer products (`q8_linear`).
The library is found again by a hash of its sources, flags, compiler and CPU, so a cache folder
shared by machines holds one build per machine. PAGEDKV_CPU_CFLAGS adds compiler flags (a build of
its own), e.g. `-march=x86-64-v4` for a library that runs on every AVX-512 CPU.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import reference

__all__ = ["reshape_and_cache", "paged_attention_decode", "paged_attention_prefill", "paged_attention_supports",
           "rotary_and_cache", "add_rms_norm", "silu_and_mul", "model_kernels_usable", "greedy_and_logsumexp",
           "library", "BF16_LINEAR_ROWS", "bf16_linear", "bf16_linear_supported", "PackedInt4", "pack_int4",
           "int4_linear", "int4_bf16_supported", "amx_supported", "set_amx", "vnni_supported", "set_vnni",
           "F32_LINEAR_ROWS", "f32_linear", "f32_linear_preferred", "q6k_linear", "q6k_dequantize",
           "PackedQ8", "pack_q8", "q8_linear", "q8_supported"]

SOURCES = tuple(Path(__file__).resolve().with_name(name) for name in ("cpu_kernels.c", "cpu_int4.c", "cpu_bf16.c",
                                                                        "cpu_amx.c", "cpu_vnni.c", "cpu_f32.c",
                                                                        "cpu_decode.c", "cpu_q6k.c", "cpu_q8.c"))
HEADERS = tuple(Path(__file__).resolve().with_name(name) for name in ("cpu_api.h", "cpu_bfloat16.h", "cpu_int4.h",
                                                                        "cpu_digits.h"))
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-std=gnu11", "-shared", "-fPIC")
DTYPES = {torch.float32: 0, torch.bfloat16: 1}  # the kernels' `bf16` flag per torch dtype
ERRORS = {-1: "a block table entry or slot is outside the cache", -2: "out of memory for the kernel's buffers",
          -3: "a context is longer than its block table",
          -4: "query rows outside the batch, or a sequence with more new tokens than context",
          -5: "no AMX on this CPU or operating system"}
log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """$PAGEDKV_CACHE_DIR, else $XDG_CACHE_HOME/pagedkv, else ~/.cache/pagedkv."""
    if os.environ.get("PAGEDKV_CACHE_DIR"):
        return Path(os.environ["PAGEDKV_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pagedkv"


def _cpu_signature() -> str:
    """What -march=native compiles for: the CPU's model and flags."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            return "".join(line for line in f if line.startswith(("model name", "flags")))[:4096]
    except OSError:
        return os.uname().machine


def _build(compiler: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    texts = [source.read_text() for source in SOURCES + HEADERS]
    flags = (*CFLAGS, *shlex.split(os.environ.get("PAGEDKV_CPU_CFLAGS", "")))
    key = hashlib.sha256("\0".join([*texts, " ".join(flags), version, _cpu_signature()]).encode())
    name = f"cpu_kernels-{key.hexdigest()[:16]}.so"
    for folder in (cache_dir(), Path(tempfile.gettempdir()) / f"pagedkv-{os.getuid()}"):
        if (folder / name).is_file():
            return folder / name
        try:
            folder.mkdir(parents=True, exist_ok=True)
            # Built under a unique name, then renamed: processes building at once never load half a file.
            fd, partial = tempfile.mkstemp(suffix=".so", dir=folder)
            os.close(fd)
        except OSError:
            continue  # not writable: try the next folder
        try:
            done = subprocess.run([compiler, *flags, *map(str, SOURCES), "-o", partial, "-lm"],
                                  capture_output=True, text=True, timeout=300)
            if done.returncode:
                lines = done.stderr.strip().splitlines() or [f"exit {done.returncode}"]
                raise OSError(f"{compiler} failed: {next((l for l in lines if 'error' in l), lines[-1]).strip()}")
            os.replace(partial, folder / name)
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
        return folder / name
    raise OSError("no writable folder for the compiled CPU kernels")


def build_name() -> str:
    """The compiled kernels' file name (a digest of their sources, flags, compiler and CPU), or
    "none" where the torch reference runs: which arithmetic computes here."""
    lib = library()
    return Path(lib._name).name if lib is not None else "none"


@functools.lru_cache(maxsize=None)
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None (with one warning) where they cannot be built."""
    if os.environ.get("PAGEDKV_CPU_KERNELS", "1") == "0":
        return None
    compiler = os.environ.get("CC", "gcc")
    try:
        if shutil.which(compiler) is None:
            raise OSError(f"no C compiler {compiler!r} on PATH")
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("CPU kernels unavailable, using the torch reference and torch's int4 kernel: %s", e)
        return None
    i32, i64, ptr = ctypes.c_int, ctypes.c_int64, ctypes.c_void_p
    lib.paged_attention.argtypes = [ptr, i64, i32, i64, ptr, ptr, i32, i64, i32, i32, i32, i32, i32, i32,
                                    ptr, i64, i64, ptr, ptr, i32, i64, ctypes.c_float, i32, i32]
    lib.paged_attention_supports.argtypes = [i32]
    lib.greedy_and_logsumexp.argtypes = [ptr, i64, i64, i64, ptr, ptr, i32]
    lib.add_rms_norm.argtypes = [ptr, ptr, ptr, ptr, i64, i64, ctypes.c_float, i32, i32]
    lib.silu_and_mul.argtypes = [ptr, ptr, i64, i64, i32, i32]
    lib.gelu_tanh_and_mul.argtypes = [ptr, ptr, i64, i64, i32, i32]
    lib.rotary_and_cache.argtypes = [ptr, i64, i32, i64, i32, i32, i32, ptr, ptr, ptr, i32, i64, i32, i32, i32, ptr]
    lib.reshape_and_cache.argtypes = [ptr, i64, ptr, i64, i32, ptr, i32, i64, i32, i32, i32, i32, i32, ptr, i64]
    lib.int4_linear.argtypes = [ptr, i64, i64, i64, ptr, i32, i64, i64, ptr, i32]
    lib.int4_linear_amx.argtypes = [ptr, i64, i64, i64, ptr, i32, i64, i64, ptr, i32]
    lib.int4_linear_bf16.argtypes = [ptr, i64, i64, i64, ptr, i32, i64, i64, ptr, i32]
    lib.amx_enable.argtypes = [i32]
    lib.vnni_enable.argtypes = [i32]
    lib.bf16_linear.argtypes = [ptr, i64, i32, i64, ptr, i64, ptr, ptr, i32]
    lib.f32_linear.argtypes = [ptr, i64, i32, i64, ptr, i64, ptr, ptr, i32]
    lib.decode_layers.argtypes = [ptr, ptr, i32, ptr, ptr]
    lib.q6k_linear.argtypes = [ptr, i64, i64, i64, ptr, i64, ptr, i32]
    lib.q6k_dequantize.argtypes = [ptr, i64, i64, ptr]
    lib.q8_linear.argtypes = [ptr, i64, i64, i64, ptr, i64, ptr, i32]
    return lib


def _usable(*tensors: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" and t.dtype in DTYPES for t in tensors) and library() is not None


def _rows(t: torch.Tensor) -> torch.Tensor:
    """`t` ([N, H, D]) with heads and elements contiguous inside each row; rows may be strided."""
    if t.stride(2) == 1 and t.stride(1) == t.shape[2]:
        return t
    return t.contiguous()


def int_array(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t` as `dtype` with unit stride along its last dimension, as the kernels read indices."""
    t = t.to(dtype=dtype)
    return t if t.stride(-1) == 1 else t.contiguous()


def _layer(kv_cache: torch.Tensor, layer: int) -> int:
    """`layer` as an index from 0, checked as kv_cache[:, layer] would be."""
    num_layers = kv_cache.shape[1]
    if not -num_layers <= layer < num_layers:
        raise IndexError(f"layer {layer} is out of range for a cache of {num_layers} layers")
    return layer % num_layers


def check_rc(rc: int, what: str) -> None:
    """Raises the error a kernel's return code names (ERRORS), if any."""
    if rc:
        kind = {-2: MemoryError, -4: ValueError, -5: RuntimeError}.get(rc, IndexError)
        raise kind(f"{what}: {ERRORS.get(rc, f'error {rc}')}")


def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, layer: int,
                      slot_mapping: torch.Tensor) -> None:
    if not _usable(key, value, kv_cache) or key.dtype != value.dtype or not kv_cache.is_contiguous():
        return reference.reshape_and_cache(key, value, kv_cache, layer, slot_mapping)
    key, value = _rows(key), _rows(value)
    slots = int_array(slot_mapping.cpu(), torch.int64).contiguous()
    num_blocks, num_layers, _, block_size, num_kv_heads, head_dim = kv_cache.shape
    if key.shape != value.shape or key.shape[1:] != (num_kv_heads, head_dim) or slots.numel() != key.shape[0]:
        raise ValueError(f"reshape_and_cache: keys {tuple(key.shape)}, values {tuple(value.shape)} and "
                         f"{slots.numel()} slots for a cache of {num_kv_heads} KV heads of {head_dim}")
    rc = library().reshape_and_cache(
        key.data_ptr(), key.stride(0), value.data_ptr(), value.stride(0), DTYPES[key.dtype],
        kv_cache.data_ptr(), DTYPES[kv_cache.dtype], num_blocks, num_layers, _layer(kv_cache, layer), block_size,
        num_kv_heads, head_dim, slots.data_ptr(), slots.numel())
    check_rc(rc, "reshape_and_cache")


def rotary_and_cache(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor, layer: int,
                     slot_mapping: torch.Tensor, num_heads: int, num_kv_heads: int) -> None:
    """A layer's attention input in one call: rotates the query and key heads of the fused q/k/v
    rows `qkv` ([tokens, (num_heads + 2 * num_kv_heads) * head_dim]) in place by cos and sin
    ([tokens, head_dim], sin's first half negated), rounding as the model's torch ops do, and
    writes each token's K and V into its slot as `reshape_and_cache` does. For CPU tensors of
    one type (float32 or bfloat16) with contiguous rows; see `model_kernels_usable`."""
    head_dim = cos.shape[-1]
    if not (qkv.stride(-1) == 1 and cos.is_contiguous() and sin.is_contiguous()
            and qkv.dtype == cos.dtype == sin.dtype):
        raise ValueError("rotary_and_cache: needs rows of contiguous elements, contiguous cos and sin, one type")
    num_blocks, num_layers, _, block_size, cache_heads, cache_dim = kv_cache.shape
    slots = int_array(slot_mapping.cpu(), torch.int64).contiguous()
    if (qkv.shape[1] != (num_heads + 2 * num_kv_heads) * head_dim or cos.shape != (qkv.shape[0], head_dim)
            or sin.shape != cos.shape or (cache_heads, cache_dim) != (num_kv_heads, head_dim)
            or slots.numel() != qkv.shape[0] or head_dim % 2):
        raise ValueError(f"rotary_and_cache: rows {tuple(qkv.shape)}, cos/sin {tuple(cos.shape)}/{tuple(sin.shape)} "
                         f"and {slots.numel()} slots for {num_heads} + {num_kv_heads} heads and a cache of "
                         f"{cache_heads} KV heads of {cache_dim}")
    rc = library().rotary_and_cache(
        qkv.data_ptr(), qkv.stride(0), DTYPES[qkv.dtype], qkv.shape[0], num_heads, num_kv_heads, head_dim,
        cos.data_ptr(), sin.data_ptr(), kv_cache.data_ptr(), DTYPES[kv_cache.dtype], num_blocks, num_layers,
        _layer(kv_cache, layer), block_size, slots.data_ptr())
    check_rc(rc, "rotary_and_cache")


def add_rms_norm(h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The residual stream h ([rows, width], contiguous) += delta in place, then transformers'
    LlamaRMSNorm of it with `weight`: normalised in float32, rounded to h's type, then scaled.
    The float32 sum of squares runs in another order than torch's, so results may differ from
    torch's in the last place. For CPU tensors of one type (float32 or bfloat16)."""
    if delta is not None and not delta.is_contiguous():
        delta = delta.contiguous()
    if (h.dim() != 2 or not h.is_contiguous() or weight.shape != h.shape[1:] or not weight.is_contiguous()
            or h.dtype != weight.dtype or (delta is not None and (delta.shape != h.shape or delta.dtype != h.dtype))):
        raise ValueError(f"add_rms_norm: a contiguous residual {tuple(h.shape)} {h.dtype}, weight "
                         f"{tuple(weight.shape)} {weight.dtype}"
                         + ("" if delta is None else f", delta {tuple(delta.shape)} {delta.dtype}"))
    out = torch.empty_like(h)
    library().add_rms_norm(h.data_ptr(), None if delta is None else delta.data_ptr(), weight.data_ptr(),
                           out.data_ptr(), h.shape[0], h.shape[1], eps, DTYPES[h.dtype], torch.get_num_threads())
    return out


def silu_and_mul(gate_up: torch.Tensor, gelu: bool = False) -> torch.Tensor:
    """silu(gate) * up for rows [gate | up] ([rows, 2 * width]), silu rounded to the row type
    before the product, as torch's two operations round; with `gelu`, GELU's tanh form instead
    of silu (within a few float32 rounding steps of torch's). For CPU tensors, float32 or
    bfloat16."""
    if not gate_up.is_contiguous():
        gate_up = gate_up.contiguous()
    if gate_up.dim() != 2 or gate_up.shape[1] % 2:
        raise ValueError(f"silu_and_mul: rows of gate and up halves, got {tuple(gate_up.shape)}")
    out = torch.empty((gate_up.shape[0], gate_up.shape[1] // 2), dtype=gate_up.dtype)
    kernel = library().gelu_tanh_and_mul if gelu else library().silu_and_mul
    kernel(gate_up.data_ptr(), out.data_ptr(), out.shape[0], out.shape[1], DTYPES[gate_up.dtype],
           torch.get_num_threads())
    return out


def greedy_and_logsumexp(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """For float32 CPU logits [rows, vocab]: each row's first maximum's index (int64 [rows], as
    logits.max(dim=-1).indices) and its log-sum-exp (float32 [rows, 1], as torch.logsumexp with
    keepdim), in one kernel call; None where the kernels are not built or the logits differ."""
    if (logits.device.type != "cpu" or logits.dtype != torch.float32 or logits.dim() != 2 or logits.stride(-1) != 1
            or logits.shape[1] == 0 or library() is None):
        return None
    rows = logits.shape[0]
    index, log_total = torch.empty(rows, dtype=torch.int64), torch.empty(rows, 1, dtype=torch.float32)
    library().greedy_and_logsumexp(logits.data_ptr(), logits.stride(0), rows, logits.shape[1], index.data_ptr(),
                                   log_total.data_ptr(), torch.get_num_threads())
    return index, log_total


def model_kernels_usable(dtype: torch.dtype, kv_cache: torch.Tensor) -> bool:
    """Whether the model's CPU kernels (`rotary_and_cache`, `add_rms_norm`, `silu_and_mul`) take
    rows of `dtype` with this cache."""
    return (dtype in DTYPES and kv_cache.device.type == "cpu" and kv_cache.dtype in DTYPES
            and kv_cache.is_contiguous() and library() is not None)


def paged_attention_decode(query: torch.Tensor, kv_cache: torch.Tensor, layer: int, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, scale: float, window: int = 0) -> torch.Tensor:
    if not _attention_usable(query, kv_cache):
        return reference.paged_attention_decode(query, kv_cache, layer, block_tables, context_lens, scale, window)
    return _attention("paged_attention_decode", query, kv_cache, layer, block_tables, None, context_lens, scale,
                      window)


def paged_attention_prefill(query: torch.Tensor, kv_cache: torch.Tensor, layer: int, block_tables: torch.Tensor,
                            query_start_loc: torch.Tensor, context_lens: torch.Tensor, scale: float,
                            window: int = 0) -> torch.Tensor:
    """The kernel for prompts of every length: each row's arithmetic is a decode row's, which is
    what keeps recompute after preemption (and chunked prefill) invisible in the outputs. torch's
    SDPA computes long prompts faster (float32 from about 300 rows, bfloat16 with AMX from about
    700: 1.6 and 1.4 times at 1,024), but in another order, and it took long prompts here until
    a recomputed sequence of 480 prompt tokens came out different."""
    if not _attention_usable(query, kv_cache):
        return reference.paged_attention_prefill(query, kv_cache, layer, block_tables, query_start_loc, context_lens,
                                                 scale, window)
    starts = int_array(query_start_loc.cpu(), torch.int32).contiguous()
    if starts.numel() != context_lens.numel() + 1:
        raise ValueError(f"paged_attention_prefill: {starts.numel()} query start offsets for "
                         f"{context_lens.numel()} sequences")
    return _attention("paged_attention_prefill", query, kv_cache, layer, block_tables, starts, context_lens, scale,
                      window)


def _attention_usable(query: torch.Tensor, kv_cache: torch.Tensor) -> bool:
    return _usable(query, kv_cache) and kv_cache.is_contiguous() and paged_attention_supports(kv_cache.shape[5])


@functools.lru_cache(maxsize=None)
def paged_attention_supports(head_dim: int) -> bool:
    """Whether the attention kernel takes this head size (else the reference runs)."""
    return library().paged_attention_supports(head_dim) == 1


def _attention(what: str, query: torch.Tensor, kv_cache: torch.Tensor, layer: int, block_tables: torch.Tensor,
               starts: torch.Tensor | None, context_lens: torch.Tensor, scale: float, window: int = 0) -> torch.Tensor:
    """The kernel on every sequence's rows (a row each where `starts` is None); `window` > 0:
    each row sees only the last `window` positions up to its own."""
    query = _rows(query)
    tables = int_array(block_tables.cpu(), torch.int32)
    lens = int_array(context_lens.cpu(), torch.int32).contiguous()
    num_rows, num_heads, head_dim = query.shape
    num_blocks, num_layers, _, block_size, num_kv_heads, _ = kv_cache.shape
    num_seqs = lens.numel()
    if (num_heads % num_kv_heads or head_dim != kv_cache.shape[5] or tables.shape[0] != num_seqs
            or (starts is None and num_rows != num_seqs)):
        raise ValueError(f"{what}: {num_heads} query heads of {head_dim} over {num_kv_heads} KV heads of "
                         f"{kv_cache.shape[5]}, {num_rows} query rows, {num_seqs} context lengths, "
                         f"{tables.shape[0]} block tables")
    out = torch.empty((num_rows, num_heads, head_dim), dtype=query.dtype)
    rc = library().paged_attention(
        query.data_ptr(), query.stride(0), DTYPES[query.dtype], num_rows, out.data_ptr(), kv_cache.data_ptr(),
        DTYPES[kv_cache.dtype], num_blocks, num_layers, _layer(kv_cache, layer), block_size, num_kv_heads, head_dim,
        num_heads, tables.data_ptr(), tables.stride(0), tables.shape[1], None if starts is None else starts.data_ptr(),
        lens.data_ptr(), num_seqs, max(num_rows, 1), scale, max(int(window), 0), torch.get_num_threads())
    check_rc(rc, what)
    return out


INT4_TILE = 16  # output rows per tile of cpu_int4.c


@dataclass(frozen=True)
class PackedInt4:
    """A 4-bit weight in cpu_int4.c's layout: uint8 [N/16, K/32, group bytes], per tile of 16
    rows and group of 32 columns the codes (two columns a byte, [16 pairs, 16 rows]), then the
    rows' scales and offsets (zero - 8 * scale), float16 when `half` else float32."""
    data: torch.Tensor
    half: bool

    @property
    def shape(self) -> tuple[int, int]:
        return self.data.shape[0] * INT4_TILE, self.data.shape[1] * 32


def pack_int4(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> PackedInt4:
    """4-bit codes (uint8 [N, K], values 0..15) with per-32-column scales and zeros (float32
    [N, K / 32]; w = scale * (code - 8) + zero). Scales and offsets are kept in float16 when
    that changes none of them (GGUF's Q4_0, Q4_1, Q8_0), else in float32 (Q4_K's products)."""
    n, k = codes.shape
    if n % INT4_TILE or k % 32 or scales.shape != (n, k // 32) or zeros.shape != scales.shape:
        raise ValueError(f"cannot pack 4-bit codes {tuple(codes.shape)} with scales {tuple(scales.shape)}")
    tiles, groups = n // INT4_TILE, k // 32
    pairs = codes.to(torch.uint8).view(tiles, INT4_TILE, groups, 16, 2)
    packed = (pairs[..., 0] | (pairs[..., 1] << 4)).permute(0, 2, 3, 1).reshape(tiles, groups, 256)
    scales, offsets = scales.float(), zeros.float() - 8 * scales.float()
    half = all(torch.equal(t.half().float(), t) for t in (scales, offsets))
    kind = torch.float16 if half else torch.float32

    def tiled(t: torch.Tensor) -> torch.Tensor:  # [N, groups] -> [tiles, groups, 16 values as bytes]
        return t.to(kind).view(tiles, INT4_TILE, groups).transpose(1, 2).contiguous().view(torch.uint8)

    return PackedInt4(torch.cat([packed, tiled(scales), tiled(offsets)], dim=2).contiguous(), half)


@functools.lru_cache(maxsize=None)
def amx_supported() -> bool:
    """Whether the kernels use AMX: bfloat16 rows through 4-bit weights (cpu_amx.c) and
    attention's query-key products over bfloat16 caches (cpu_kernels.c). The library builds
    for a CPU with AMX and the operating system lets the process use AMX's tiles."""
    return library() is not None and library().amx_supported() == 1


def set_amx(enabled: bool) -> None:
    """Turns the kernels' AMX paths off (or on again, where supported), so that their other
    paths can be tested on a CPU with AMX. Models built before keep the plans they made."""
    if library() is not None:
        library().amx_enable(int(enabled))
    amx_supported.cache_clear()


@functools.lru_cache(maxsize=None)
def vnni_supported() -> bool:
    """Whether float32 rows through 4-bit weights take integer products (cpu_vnni.c: the library
    builds for a CPU with AVX512-VNNI and VBMI), else float32 ones (cpu_int4.c)."""
    return library() is not None and library().vnni_supported() == 1


def set_vnni(enabled: bool) -> None:
    """Hands float32 rows to cpu_int4.c (or back to cpu_vnni.c, where supported), so that both
    can be tested on one CPU. Models built before keep the plans they made."""
    if library() is not None:
        library().vnni_enable(int(enabled))
    vnni_supported.cache_clear()


@functools.lru_cache(maxsize=None)
def int4_bf16_supported() -> bool:
    """Whether bfloat16 rows through 4-bit weights take AVX512-BF16 dot products where AMX is
    missing (cpu_bf16.c's `int4_linear_bf16`: the library builds for a CPU with AVX512-BF16)."""
    return library() is not None and library().int4_bf16_supported() == 1


def int4_linear(x: torch.Tensor, packed: PackedInt4, repeat_x: bool = False) -> torch.Tensor:
    """x @ W^T for a W packed by `pack_int4` (K columns of W; with repeat_x, W has 2 * x's
    columns: Q8_0's codes split into high and low halves, w = d * q), in x's type. Float32 rows
    (and bfloat16 ones where neither AMX nor AVX512-BF16 is there, converted): each group's 32
    activations as signed bytes (the largest +-127, as llama.cpp's), exact integer sums with
    the codes, float32 from there (cpu_vnni.c, where the CPU has AVX512-VNNI); else
    float32 weights and sums (cpu_int4.c). Bfloat16 rows: the weights rounded to bfloat16,
    float32 sums, one rounding of each output, on AMX's tiles (cpu_amx.c) or else by
    AVX512-BF16's dot products (cpu_bf16.c; another summation order, so other last bits). Each
    way each row's result is the same whatever the other rows."""
    dtype = x.dtype
    amx = dtype == torch.bfloat16 and amx_supported()
    dots = dtype == torch.bfloat16 and not amx and int4_bf16_supported()
    x = x if amx or dots else x.float()
    if x.stride(-1) != 1:
        x = x.contiguous()
    n_out, w_cols = packed.shape
    if x.dim() != 2 or x.shape[1] * (2 if repeat_x else 1) != w_cols:
        raise ValueError(f"int4_linear: input {tuple(x.shape)} for a weight of {w_cols} columns")
    kernel = (library().int4_linear_amx if amx else library().int4_linear_bf16 if dots
              else library().int4_linear)
    out = torch.empty((x.shape[0], n_out), dtype=x.dtype)
    rc = kernel(x.data_ptr(), x.stride(0), x.shape[0], x.shape[1], packed.data.data_ptr(), int(packed.half), n_out,
                w_cols, out.data_ptr(), torch.get_num_threads())
    check_rc(rc, "int4_linear")
    return out.to(dtype)


Q8_CODES, Q8_SCALES = 512, 32  # bytes per tile (16 rows) and group (32 columns): codes, float16 scales


@dataclass(frozen=True)
class PackedQ8:
    """An 8-bit weight in cpu_q8.c's layout: uint8 [N/16, K/32 * (Q8_CODES + Q8_SCALES)], per tile of 16 rows the
    codes q + 128 of each group of 32 columns (512 bytes, in VPDPBUSD's order), then the groups'
    float16 scales (w = d * q)."""
    data: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return self.data.shape[0] * INT4_TILE, self.data.shape[1] // (Q8_CODES + Q8_SCALES) * 32


@functools.lru_cache(maxsize=None)
def q8_supported() -> bool:
    """Whether `q8_linear` runs here: the library builds for a CPU with AVX512-VNNI."""
    return library() is not None and library().q8_linear_supported() == 1


def pack_q8(codes: torch.Tensor, scales: torch.Tensor) -> PackedQ8:
    """8-bit codes q + 128 (uint8 [N, K]) with one float16-exact scale d per 32 columns
    (float32 [N, K / 32]): w = d * q."""
    n, k = codes.shape
    if n % INT4_TILE or k % 32 or scales.shape != (n, k // 32) or not torch.equal(scales.half().float(), scales):
        raise ValueError(f"cannot pack 8-bit codes {tuple(codes.shape)} with scales {tuple(scales.shape)}")
    tiles, groups = n // INT4_TILE, k // 32
    # [tile, row n, group, vector kk, column c] -> [tile, group, kk, n, c]: vector kk holds row n's
    # codes of columns 4kk .. 4kk + 3 in bytes 4n .. 4n + 3.
    ordered = codes.to(torch.uint8).view(tiles, INT4_TILE, groups, 8, 4).permute(0, 2, 3, 1, 4)
    halves = scales.half().view(tiles, INT4_TILE, groups).transpose(1, 2).contiguous().view(torch.uint8)
    codes = ordered.reshape(tiles, groups * Q8_CODES)
    return PackedQ8(torch.cat([codes, halves.reshape(tiles, groups * Q8_SCALES)], dim=1).contiguous())


def q8_linear(x: torch.Tensor, packed: PackedQ8) -> torch.Tensor:
    """x @ W^T for a W packed by `pack_q8`, in x's type (computed from float32 rows): each group
    of 32 activations as signed bytes (the largest +-127, as int4_linear's), exact integer sums
    with the codes, float32 from there (cpu_q8.c). Each row's result is the same
    whatever the other rows."""
    dtype = x.dtype
    x = x.float()
    if x.stride(-1) != 1:
        x = x.contiguous()
    n_out, k = packed.shape
    if x.dim() != 2 or x.shape[1] != k or not q8_supported():
        raise ValueError(f"q8_linear: input {tuple(x.shape)} for a weight of {k} columns"
                         + ("" if q8_supported() else ", on a CPU without AVX512-VNNI"))
    out = torch.empty((x.shape[0], n_out), dtype=torch.float32)
    rc = library().q8_linear(x.data_ptr(), x.stride(0), x.shape[0], k, packed.data.data_ptr(), n_out,
                             out.data_ptr(), torch.get_num_threads())
    check_rc(rc, "q8_linear")
    return out.to(dtype)


BF16_LINEAR_ROWS = 4  # the most rows bf16_linear takes (MAX_ROWS of cpu_bf16.c)


@functools.lru_cache(maxsize=None)
def bf16_linear_supported() -> bool:
    """Whether `bf16_linear` runs here: the library builds and the CPU has AVX512-BF16."""
    return library() is not None and library().bf16_linear_supported() == 1


def bf16_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight^T (+ bias) for 1 to BF16_LINEAR_ROWS bfloat16 rows (cpu_bf16.c): weight
    [N, K] contiguous with K a multiple of 32, sums in float32, each row's result the same
    whatever the other rows."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    n, k = weight.shape
    if (x.dim() != 2 or x.shape[1] != k or x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16
            or not weight.is_contiguous()
            or (bias is not None and (bias.shape != (n,) or bias.dtype != torch.bfloat16))):
        raise ValueError(f"bf16_linear: input {tuple(x.shape)} {x.dtype} for a weight {tuple(weight.shape)} "
                         f"{weight.dtype}" + ("" if bias is None else f" and bias {tuple(bias.shape)} {bias.dtype}"))
    bias = None if bias is None else bias.contiguous()
    out = torch.empty((x.shape[0], n), dtype=torch.bfloat16)
    if not x.shape[0]:  # a step none of whose tokens wants logits hands the lm_head no rows
        return out
    rc = library().bf16_linear(x.data_ptr(), x.stride(0), x.shape[0], k, weight.data_ptr(), n,
                               None if bias is None else bias.data_ptr(), out.data_ptr(), torch.get_num_threads())
    if rc:
        raise ValueError(f"bf16_linear: {x.shape[0]} rows and {k} columns: it takes 1 to {BF16_LINEAR_ROWS} rows, "
                         f"columns in multiples of 32, and a CPU with AVX512-BF16")
    return out


Q6K_WEIGHTS, Q6K_BYTES = 256, 210  # weights and bytes of one Q6_K block


def q6k_linear(x: torch.Tensor, blocks: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """x @ W^T for W [n, k] stored as GGUF's Q6_K blocks (uint8 [n, k / 256 * 210], rows
    contiguous), in x's type; float32 arithmetic, each row's result the same whatever the
    other rows (cpu_q6k.c)."""
    dtype = x.dtype
    x = x.float()
    if x.stride(-1) != 1:
        x = x.contiguous()
    if x.dim() != 2 or x.shape[1] != k or k % Q6K_WEIGHTS or blocks.shape != (n, k // Q6K_WEIGHTS * Q6K_BYTES):
        raise ValueError(f"q6k_linear: input {tuple(x.shape)} for a Q6_K weight [{n}, {k}] of "
                         f"{tuple(blocks.shape)} bytes")
    out = torch.empty((x.shape[0], n), dtype=torch.float32)
    rc = library().q6k_linear(x.data_ptr(), x.stride(0), x.shape[0], k, blocks.data_ptr(), n, out.data_ptr(),
                              torch.get_num_threads())
    check_rc(rc, "q6k_linear")
    return out.to(dtype)


def q6k_dequantize(blocks: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The float32 weights [n, k] the kernel multiplies by (as the gguf package dequantizes)."""
    out = torch.empty((n, k), dtype=torch.float32)
    check_rc(library().q6k_dequantize(blocks.contiguous().data_ptr(), n, k, out.data_ptr()), "q6k_dequantize")
    return out


F32_LINEAR_ROWS = 8  # the most rows f32_linear streams the weights for (MAX_ROWS of cpu_f32.c); a GEMM from there


def f32_linear_preferred() -> bool:
    """Whether a float32 model's matrix products take `f32_linear` at every size: where the
    library builds and the CPU has AVX-512. Each row's result is then the same whatever its
    batch (oneDNN's and the BLAS's GEMMs change kernels, and the last bits, with the number of
    rows), which keeps preemption, chunked prefill and prefix hits exact in a float32 model's
    outputs. Few rows stream the weights at the memory's pace (MKL's sgemm, which F.linear calls,
    takes about half of it on AMD CPUs); batches and prompts at 0.95-1.07x oneDNN's speed
    (tools/bench_cpu_kernels, docs/BENCHMARKS.md)."""
    return library() is not None and library().f32_linear_supported() == 1


def f32_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight^T (+ bias) for float32 rows (cpu_f32.c): weight [N, K] contiguous, each output
    one float32 sum in one order, so each row's result is the same whatever the other rows. No rows (a step none of whose tokens wants logits): an empty
    result, as F.linear gives."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    n, k = weight.shape
    if (x.dim() != 2 or x.shape[1] != k or x.dtype != torch.float32 or weight.dtype != torch.float32
            or not weight.is_contiguous()
            or (bias is not None and (bias.shape != (n,) or bias.dtype != torch.float32))):
        raise ValueError(f"f32_linear: input {tuple(x.shape)} {x.dtype} for a weight {tuple(weight.shape)} "
                         f"{weight.dtype}" + ("" if bias is None else f" and bias {tuple(bias.shape)} {bias.dtype}"))
    bias = None if bias is None else bias.contiguous()
    out = torch.empty((x.shape[0], n), dtype=torch.float32)
    if not x.shape[0]:
        return out
    rc = library().f32_linear(x.data_ptr(), x.stride(0), x.shape[0], k, weight.data_ptr(), n,
                              None if bias is None else bias.data_ptr(), out.data_ptr(), torch.get_num_threads())
    if rc:
        raise ValueError("f32_linear needs a CPU with AVX-512")
    return out
