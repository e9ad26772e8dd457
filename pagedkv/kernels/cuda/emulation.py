"""Runs the CUDA C sources of this package on the CPU, for tests on machines without a GPU.

Each kernel instantiation is compiled by the host C++ compiler together with
host_emulation.h into a small shared library; CUDA threads become user-level contexts. It checks the kernels' indexing, masking, reductions and the launch planning of
cuda_ops (the same `Launch` objects the cupy launcher gets), not their speed; tensors
stay on the CPU and are passed by pointer, as on the GPU.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .ops import SOURCE_DIR, Launch

_CXX_FLAGS = ["-std=c++17", "-O1", "-shared", "-fPIC", "-w"]


def compiler() -> Optional[str]:
    """The host C++ compiler, if one that builds the emulation (C++17, _Float16, ucontext)."""
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")
    return cxx if cxx and _compiles(cxx) else None


@functools.lru_cache(maxsize=None)
def _compiles(cxx: str) -> bool:
    probe = "#include <ucontext.h>\nint main() { _Float16 h = 1; ucontext_t c; getcontext(&c); return (int)h - 1; }\n"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "probe.cpp")
        src.write_text(probe)
        result = subprocess.run(
            [cxx, "-std=c++17", str(src), "-o", str(Path(tmp, "probe"))],
            capture_output=True,
        )
        return result.returncode == 0


def _cache_dir() -> Path:
    path = Path(tempfile.gettempdir()) / f"pagedkv-emulation-{os.getuid()}"
    path.mkdir(exist_ok=True)
    return path


@functools.lru_cache(maxsize=None)
def _library(source: str, kernel: str) -> ctypes.CDLL:
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++17 compiler with _Float16 and ucontext support for the kernel emulation")
    code = (
        '#include "host_emulation.h"\n'
        f'#include "{source}"\n'
        'extern "C" int pagedkv_emulate(unsigned gx, unsigned gy, unsigned gz, unsigned bx, void** args) {\n'
        f"    return emu_launch(&{kernel}, emu_dim3{{gx, gy, gz}}, emu_dim3{{bx, 1, 1}}, args);\n"
        "}\n"
    )
    inputs = [code, (SOURCE_DIR / "host_emulation.h").read_text(), (SOURCE_DIR / "common.cuh").read_text(),
              (SOURCE_DIR / source).read_text(), cxx, *_CXX_FLAGS]
    digest = hashlib.sha256("\0".join(inputs).encode()).hexdigest()[:24]
    lib = _cache_dir() / f"{digest}.so"
    if not lib.exists():
        with tempfile.TemporaryDirectory(dir=_cache_dir()) as tmp:
            src = Path(tmp, "emulate.cpp")
            src.write_text(code)
            out = Path(tmp, "lib.so")
            cmd = [cxx, *_CXX_FLAGS, "-x", "c++", f"-I{SOURCE_DIR}", str(src), "-o", str(out)]
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"emulation build of {kernel} failed:\n{result.stderr[-4000:]}")
            os.replace(out, lib)  # atomic: concurrent test workers may race here
    return ctypes.CDLL(str(lib))


def launch(launch: Launch, device: torch.device) -> None:
    """Drop-in for cuda_ops._launcher: runs the launch on the CPU."""
    if launch.block[1:] != (1, 1) or launch.block[0] % 32:
        raise ValueError(f"emulation supports 1-D blocks of whole warps, got {launch.block}")
    lib = _library(launch.source, launch.kernel)
    buffers = [ctypes.create_string_buffer(np.asarray(a).tobytes()) for a in launch.args]
    pointers = (ctypes.c_void_p * len(buffers))(*(ctypes.addressof(b) for b in buffers))
    gx, gy, gz = (ctypes.c_uint(v) for v in launch.grid)
    if lib.pagedkv_emulate(gx, gy, gz, ctypes.c_uint(launch.block[0]), pointers) != 0:
        raise RuntimeError(f"{launch.kernel}: barrier or shuffle reached by only part of a block or warp")
