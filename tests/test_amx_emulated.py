"""The CPU kernels' AMX paths on CPUs without AMX: the kernels built once more with
tests/amx_emulation.h, which does AMX's tile instructions in plain C (and aborts where the hardware
would fault), and the kernel tests run on that build in a child process, where `amx_supported()`
is true. They hold AMX's paths to the same references and the same bits as the paths without
AMX. On a CPU with AMX the suite tests the real instructions instead."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from pagedkv.kernels.cpu import ops as cpu_ops

HERE = Path(__file__).resolve().parent
# The kernel tests that take AMX's paths where AMX is there: 4-bit and 8-bit matrices of float32
# and bfloat16 rows, attention over bfloat16 caches, a whole decode step.
FILES = ("test_quant.py", "test_q8.py", "test_kernels_cpu.py", "test_native_decode.py", "test_bench_cpu_kernels.py")

pytestmark = pytest.mark.skipif(cpu_ops.library() is None or cpu_ops.amx_supported(),
                                reason="AMX is there (the suite tests it), or no CPU kernels")


def test_amx_paths_pass_the_kernel_tests(tmp_path):
    flags = f"-mamx-tile -mamx-int8 -mamx-bf16 -include {shlex.quote(str(HERE / 'amx_emulation.h'))}"
    env = {**os.environ, "PAGEDKV_CPU_CFLAGS": flags, "PAGEDKV_CACHE_DIR": str(tmp_path / "kernels")}
    probe = subprocess.run([sys.executable, "-c", "from pagedkv.kernels.cpu import ops\n"
                            "print(ops.library() is not None and ops.amx_supported())"],
                           env=env, capture_output=True, text=True, timeout=600)
    assert probe.returncode == 0, probe.stderr[-2000:]
    if probe.stdout.strip() != "True":  # cpu_amx.c's tiles need AVX512-BF16 beside them
        pytest.skip("the emulated AMX build needs gcc with AMX intrinsics and a CPU with AVX512-BF16 and VNNI")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-m", "not gpu",
                          *(str(HERE / name) for name in FILES)],
                         env=env, cwd=HERE.parent, capture_output=True, text=True, timeout=1800)
    failures = "\n".join(line for line in run.stdout.splitlines() if line.startswith(("FAILED", "ERROR")))
    assert run.returncode == 0, failures + "\n" + run.stdout[-4000:] + run.stderr[-2000:]
    assert "AMX" not in "".join(line for line in run.stdout.splitlines() if line.startswith("SKIPPED"))
