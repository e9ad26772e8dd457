"""CPU implementations of the decode attention and the cache write: kernels/cpu_kernels.c,
built with the C compiler at first use (gcc -O3 -march=native -fopenmp, about a second) into a
per-user cache folder and called through ctypes with the tensors' own pointers.

Each function takes the reference's arguments and falls back to the reference
(kernels/reference.py) where the library cannot be built, for float16 caches, and when
PAGEDKV_CPU_KERNELS=0. The library is found again by a hash of its source, flags, compiler
and CPU, so a cache folder shared by machines holds one build per machine.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from . import reference

__all__ = ["reshape_and_cache", "paged_attention_decode", "library"]

SOURCE = Path(__file__).resolve().with_name("cpu_kernels.c")
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-std=gnu11", "-shared", "-fPIC")
DTYPES = {torch.float32: 0, torch.bfloat16: 1}  # the kernels' `bf16` flag per torch dtype
ERRORS = {-1: "a block table entry or slot is outside the cache", -2: "out of memory for attention scores",
          -3: "a context is longer than its block table"}
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
    key = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(CFLAGS), version, _cpu_signature()]).encode())
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
            done = subprocess.run([compiler, *CFLAGS, str(SOURCE), "-o", partial, "-lm"],
                                  capture_output=True, text=True, timeout=300)
            if done.returncode:
                raise OSError(f"{compiler} failed: {done.stderr.strip().splitlines()[-1] if done.stderr else ''}")
            os.replace(partial, folder / name)
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
        return folder / name
    raise OSError("no writable folder for the compiled CPU kernels")


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
        log.warning("CPU attention kernels unavailable, using the torch reference: %s", e)
        return None
    i32, i64, ptr = ctypes.c_int, ctypes.c_int64, ctypes.c_void_p
    lib.paged_attention_decode.argtypes = [ptr, i64, i32, ptr, ptr, i32, i64, i32, i32, i32, i32, i32, i32,
                                           ptr, i64, i64, ptr, i32, ctypes.c_float, i32]
    lib.reshape_and_cache.argtypes = [ptr, i64, ptr, i64, i32, ptr, i32, i64, i32, i32, i32, i32, i32, ptr, i64]
    return lib


def _usable(*tensors: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" and t.dtype in DTYPES for t in tensors) and library() is not None


def _rows(t: torch.Tensor) -> torch.Tensor:
    """`t` ([N, H, D]) with heads and elements contiguous inside each row; rows may be strided."""
    if t.stride(2) == 1 and t.stride(1) == t.shape[2]:
        return t
    return t.contiguous()


def _int_array(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    t = t.to(dtype=dtype)
    return t if t.stride(-1) == 1 else t.contiguous()


def _layer(kv_cache: torch.Tensor, layer: int) -> int:
    """`layer` as an index from 0, checked as kv_cache[:, layer] would be."""
    num_layers = kv_cache.shape[1]
    if not -num_layers <= layer < num_layers:
        raise IndexError(f"layer {layer} is out of range for a cache of {num_layers} layers")
    return layer % num_layers


def _check(rc: int, what: str) -> None:
    if rc:
        raise IndexError(f"{what}: {ERRORS.get(rc, f'error {rc}')}")


def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, layer: int,
                      slot_mapping: torch.Tensor) -> None:
    if not _usable(key, value, kv_cache) or key.dtype != value.dtype or not kv_cache.is_contiguous():
        return reference.reshape_and_cache(key, value, kv_cache, layer, slot_mapping)
    key, value = _rows(key), _rows(value)
    slots = _int_array(slot_mapping.cpu(), torch.int64).contiguous()
    num_blocks, num_layers, _, block_size, num_kv_heads, head_dim = kv_cache.shape
    rc = library().reshape_and_cache(
        key.data_ptr(), key.stride(0), value.data_ptr(), value.stride(0), DTYPES[key.dtype],
        kv_cache.data_ptr(), DTYPES[kv_cache.dtype], num_blocks, num_layers, _layer(kv_cache, layer), block_size,
        num_kv_heads, head_dim, slots.data_ptr(), slots.numel())
    _check(rc, "reshape_and_cache")


def paged_attention_decode(query: torch.Tensor, kv_cache: torch.Tensor, layer: int, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    if not _usable(query, kv_cache) or not kv_cache.is_contiguous():
        return reference.paged_attention_decode(query, kv_cache, layer, block_tables, context_lens, scale)
    query = _rows(query)
    tables = _int_array(block_tables.cpu(), torch.int32)
    lens = _int_array(context_lens.cpu(), torch.int32).contiguous()
    num_seqs, num_heads, head_dim = query.shape
    num_blocks, num_layers, _, block_size, num_kv_heads, _ = kv_cache.shape
    if num_heads % num_kv_heads or lens.numel() != num_seqs or tables.shape[0] != num_seqs:
        raise ValueError(f"paged_attention_decode: {num_heads} query heads over {num_kv_heads} KV heads, "
                         f"{num_seqs} queries, {lens.numel()} context lengths, {tables.shape[0]} block tables")
    out = torch.empty((num_seqs, num_heads, head_dim), dtype=query.dtype)
    rc = library().paged_attention_decode(
        query.data_ptr(), query.stride(0), DTYPES[query.dtype], out.data_ptr(), kv_cache.data_ptr(),
        DTYPES[kv_cache.dtype], num_blocks, num_layers, _layer(kv_cache, layer), block_size, num_kv_heads, head_dim,
        num_heads,
        tables.data_ptr(), tables.stride(0), tables.shape[1], lens.data_ptr(), num_seqs, scale, torch.get_num_threads())
    _check(rc, "paged_attention_decode")
    return out
