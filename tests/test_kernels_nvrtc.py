"""Every kernel instantiation that cuda_ops plans for the shapes of the GPU tests, compiled
by NVRTC for sm_90 and sm_80 as cupy.RawModule compiles it (one source string, the same
options, name expressions). Needs no GPU, only the NVRTC library (the `nvidia-cuda-nvrtc`
wheel, or a CUDA toolkit); skipped without it."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import itertools
import os
import sys
from pathlib import Path

import pytest
import torch

from pagedkv.kernels.cuda import ops as cuda_ops

HEADS = [(8, 8, 128), (32, 8, 128), (9, 3, 64), (8, 2, 96), (16, 1, 128), (32, 1, 64), (4, 2, 256),
         (16, 2, 128), (12, 4, 96), (8, 8, 64), (32, 1, 128)]


def _nvrtc_path() -> str | None:
    for site in map(Path, sys.path):
        for lib in sorted((site / "nvidia").glob("cu*/lib/libnvrtc.so*")):
            if lib.name.count(".") == 2:  # libnvrtc.so.N, not the builtins or .alt variants
                return str(lib)
    return ctypes.util.find_library("nvrtc")


@functools.lru_cache(maxsize=None)
def _nvrtc():
    path = _nvrtc_path()
    if path is None:
        return None
    try:  # the builtins library sits beside it and is opened by name
        ctypes.CDLL(str(Path(path).parent / f"libnvrtc-builtins.so.{Path(path).name.split('.so.')[1]}.0"),
                    mode=os.RTLD_GLOBAL if hasattr(os, "RTLD_GLOBAL") else 0)
    except OSError:
        pass
    return ctypes.CDLL(path)


def planned_kernels() -> set[tuple[str, str]]:
    """(source, kernel) of every launch cuda_ops plans for the tests' shapes (nothing runs)."""
    planned: set[tuple[str, str]] = set()
    saved = cuda_ops._launcher, cuda_ops._sm_count, cuda_ops._mma_capable
    cuda_ops._launcher = lambda launch, device: planned.add((launch.source, launch.kernel))
    cuda_ops._sm_count = lambda device: 132
    cuda_ops._mma_capable = lambda device: True
    try:
        for dtype, (hq, hkv, d) in itertools.product(cuda_ops.DTYPE_NAMES, HEADS):
            cache = torch.zeros(4, 1, 2, 16, hkv, d, dtype=dtype)
            tables, lens = torch.zeros(2, 200, dtype=torch.int32), torch.tensor([5, 9])
            for split in (None, True, False):
                cuda_ops.paged_attention_decode(torch.zeros(2, hq, d, dtype=dtype), cache, 0, tables, lens, 0.1,
                                                split=split)
                cuda_ops.paged_attention_prefill(torch.zeros(4, hq, d, dtype=dtype), cache, 0, tables,
                                                 torch.tensor([0, 2, 4]), lens, 0.1, split=split)
    finally:
        cuda_ops._launcher, cuda_ops._sm_count, cuda_ops._mma_capable = saved
    for unit in cuda_ops.UNIT_NAMES.values():
        planned |= {("cache_ops.cu", f"reshape_and_cache_kernel<{unit}>"), ("cache_ops.cu", f"copy_chunks_kernel<{unit}>")}
    return planned


@pytest.mark.skipif(_nvrtc() is None, reason="no NVRTC library")
@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
def test_every_planned_kernel_compiles(arch):
    lib, failures = _nvrtc(), []
    for source, kernel in sorted(planned_kernels()):
        prog = ctypes.c_void_p()
        assert lib.nvrtcCreateProgram(ctypes.byref(prog), cuda_ops.source_text(source).encode(), source.encode(),
                                      0, None, None) == 0
        lib.nvrtcAddNameExpression(prog, kernel.encode())
        options = (ctypes.c_char_p * 2)(b"-std=c++17", f"--gpu-architecture={arch}".encode())
        rc = lib.nvrtcCompileProgram(prog, 2, options)
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        lib.nvrtcDestroyProgram(ctypes.byref(prog))
        if rc != 0 or log.value.strip():
            failures.append(f"{kernel}: {log.value.decode()[:1000]}")
    assert not failures, "\n".join(failures)
