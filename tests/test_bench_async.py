"""tools/bench_async.py on a tiny model: both modes in child processes, the same tokens, a table."""
import pytest

from tools import bench_async


def test_both_modes_run_side_by_side(tiny_model, tmp_path, capsys):
    args = ["--setups", "1/1", "--repeats", "1", "--new-tokens", "6", "--requests", "3", "--model",
            tiny_model(num_layers=2), "--out", str(tmp_path)]
    assert bench_async.main(args) == 0
    table = [line.strip("|").split("|") for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    cells = [c.strip() for c in table[-1]]
    assert cells[0] == "1 / 1" and min(float(cells[i]) for i in (1, 2, 4, 5)) > 0
    assert "Tokens equal in every run" in (tmp_path / "BENCHMARKS-section.md").read_text()


def test_bad_setups_are_refused(capsys):
    with pytest.raises(SystemExit):
        bench_async.main(["--setups", "1/999"])
    assert "--setups takes threads/cores" in capsys.readouterr().err
