"""tools/bench_cpu_kernels.py on a tiny GGUF file: the three 4-bit kernels, attention over each
cache type and both attention paths timed side by side, the paths without AMX (--no-amx), and a
one-line refusal where there is no AVX512-VNNI to compare."""
import pytest

from pagedkv.kernels.cpu import ops as cpu_ops
from test_quant import q4_gguf  # noqa: F401 (a fixture)
from tools import bench_cpu_kernels


@pytest.mark.skipif(not cpu_ops.amx_supported(), reason="no AMX on this CPU or operating system")
def test_kernels_side_by_side(q4_gguf, capsys, tmp_path):
    args = ["--rows", "1,33", "--dense-rows", "", "--repeats", "1", "--seqs", "2", "--context", "20",
            "--model", q4_gguf, "--out", str(tmp_path / "out")]
    assert bench_cpu_kernels.main(args) == 0
    lines = [line.strip("|").split("|") for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    cells = {row[0].strip(): [c.strip() for c in row[1:]] for row in lines}
    for key in ("1", "33"):  # three kernels' timings and two ratios
        assert min(float(c) for c in cells[key][:3]) > 0 and all(c.endswith("x") for c in cells[key][3:]), key
    for key in ("decode step", "prompts"):  # two timings and their ratio
        assert min(float(c) for c in cells[key][:2]) > 0 and cells[key][2].endswith("x"), key
    assert (tmp_path / "out" / "BENCHMARKS-section.md").exists()
    assert cpu_ops.amx_supported() and cpu_ops.vnni_supported()  # the runs turned both back on


@pytest.mark.skipif(not cpu_ops.vnni_supported(), reason="no AVX512-VNNI on this CPU")
def test_kernels_without_amx(q4_gguf, capsys, tmp_path):
    # A CPU without AMX, or one whose AMX --no-amx switches off: the 4-bit kernels (integer
    # products in register blocks, bfloat16 by AVX512-BF16's dot products), float32's few rows
    # and a prompt's (F.linear and oneDNN against cpu_f32.c) and attention over each cache type;
    # no AMX attention table; AMX on again after.
    made_with_amx = cpu_ops.amx_supported()
    args = ["--rows", "1,9", "--dense-rows", "1,3,40", "--repeats", "1", "--seqs", "3", "--context", "40",
            "--model", q4_gguf, "--no-amx", "--clock", "cpu", "--out", str(tmp_path / "out")]
    assert bench_cpu_kernels.main(args) == 0
    out = capsys.readouterr().out
    lines = [line.strip("|").split("|") for line in out.splitlines() if line.startswith("| ")]
    cells = {row[0].strip(): [c.strip() for c in row[1:]] for row in lines}
    assert min(float(c) for c in cells["9"][:3]) > 0 and all(c.endswith("x") for c in cells["9"][3:])
    if cpu_ops.library().f32_linear_supported():
        assert "cpu_f32.c" in out and min(float(c) for c in cells["3"][:3]) > 0 and cells["3"][3].endswith("x")
        assert min(float(c) for c in cells["40"][:3]) > 0 and cells["40"][3].endswith("x")
    assert "query-key products" not in out
    assert "over each cache type" in out
    for key in ("decode step", "prompts"):  # float32 and bfloat16 caches, and their ratio
        assert min(float(c) for c in cells[key][:2]) > 0 and cells[key][2].endswith("x"), key
    assert bench_cpu_kernels.TITLE_NO_AMX in (tmp_path / "out" / "BENCHMARKS-section.md").read_text()
    assert cpu_ops.amx_supported() == made_with_amx


def test_refuses_without_vnni_in_one_line(q4_gguf, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_ops, "vnni_supported", lambda: False)
    assert bench_cpu_kernels.main(["--model", q4_gguf, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no AVX512-VNNI" in err
    assert not (tmp_path / "out").exists()
