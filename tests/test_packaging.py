"""What a user who installs pagedkv gets: a wheel whose only top-level import name is `pagedkv`,
installed (not editable) into a fresh virtual environment beside the newest transformers, which
brings Hugging Face's own `kernels` package; run from a folder outside the checkout. And a
script that builds a tensor-parallel engine at module level, with no main guard."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(900)

# The repository root must shadow no installed distribution: these names belong to others.
FOREIGN_NAMES = ("kernels", "runtime", "kvcache", "preemption", "ablation")


def run(command: list[str], cwd: Path, timeout: float = 600, env: dict | None = None) -> str:
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        cwd=out)
    (path,) = out.glob("pagedkv-*.whl")
    return path


@pytest.fixture(scope="module")
def fresh_env(wheel, tmp_path_factory) -> Path:
    """A new virtual environment: torch's CPU build first (as the Makefile does), then the wheel
    and the newest transformers with their dependencies. Returns its python."""
    venv = tmp_path_factory.mktemp("venv")
    run([sys.executable, "-m", "venv", str(venv)], cwd=venv)
    python = venv / "bin" / "python"
    import torch

    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    run([*pip, f"torch=={torch.__version__.split('+')[0]}"], cwd=venv)
    run([*pip, "--upgrade", str(wheel), "transformers"], cwd=venv)
    return python


def test_the_repository_root_shadows_no_installed_package():
    packages = {p.name for p in ROOT.iterdir() if p.is_dir() and any(p.glob("*.py"))}
    assert not packages & set(FOREIGN_NAMES), sorted(packages)
    assert "pagedkv" in packages


def test_the_wheel_installs_pagedkv_and_nothing_else(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"pagedkv"}, sorted(top)
    # the kernels' sources travel with it: they are compiled at first use
    for source in ("pagedkv/kernels/cpu/cpu_kernels.c", "pagedkv/kernels/cpu/cpu_api.h",
                   "pagedkv/kernels/cuda/paged_attention.cu", "pagedkv/kernels/cuda/common.cuh"):
        assert source in names, source
    assert not any(name.startswith(("tools/", "tests/")) for name in names)


def test_installed_beside_the_newest_transformers(fresh_env, tiny_model, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    code = ("import transformers, kernels; from pagedkv import LLM, SamplingParams, LLMEngine, EngineConfig, "
            "Client, AsyncClient; import pagedkv; print(pagedkv.__file__, kernels.__file__)")
    located = run([str(fresh_env), "-c", code], cwd=outside).split()
    site = fresh_env.parent.parent
    assert all(Path(p).is_relative_to(site) for p in located), located  # neither comes from the checkout
    model = tiny_model(num_layers=2, num_heads=4, num_kv_heads=2)
    out = run([str(fresh_env.parent / "pagedkv"), "generate", "--model", model, "--prompt-ids", "1,2,3",
               "--max-tokens", "4", "--json"], cwd=outside, env={"PAGEDKV_CACHE_DIR": str(tmp_path / "cache")})
    assert '"token_ids"' in out


def test_a_module_level_tensor_parallel_script_needs_no_main_guard(fresh_env, tiny_model, tmp_path):
    """multiprocessing's spawn would run this script again in each worker and fail; pagedkv's
    workers are fresh interpreters that never import the user's main module."""
    model = tiny_model(num_layers=2, num_heads=4, num_kv_heads=2)
    script = tmp_path / "tp_script.py"
    script.write_text(textwrap.dedent(f"""
        from pagedkv import LLM, SamplingParams

        llm = LLM({model!r}, tensor_parallel_size=2, block_size=4, num_device_blocks=64, swap_space_gib=0.01)
        out = llm.generate([[1, 2, 3], [4, 5]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True),
                           use_tqdm=False)
        print("TOKENS", [o.outputs[0].token_ids for o in out])
        llm.close()
        """))
    out = run([str(fresh_env), str(script)], cwd=tmp_path, env={"PAGEDKV_CACHE_DIR": str(tmp_path / "cache")})
    lines = [line for line in out.splitlines() if line.startswith("TOKENS")]
    assert len(lines) == 1 and lines[0].count(",") >= 7, out  # one print: the script ran once, 2 x 4 tokens
