"""tools/bench_accuracy.py on a tiny GGUF file: every mode scores the same positions, the
reference agrees with itself, and the quantized modes stray by a measured, nonzero amount."""
import math

import pytest

from test_bench_cpu_peers import q4_with_vocab  # noqa: F401  (a fixture)
from tools import bench_accuracy

pytest.importorskip("transformers")


def test_modes_are_compared_with_the_float32_reference(q4_with_vocab, tmp_path, capsys):  # noqa: F811
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 12, encoding="utf-8")
    args = ["--model", q4_with_vocab, "--text", str(text), "--windows", "2", "--window", "24"]
    assert bench_accuracy.main(args) == 0
    table = [line.strip("|").split("|") for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    rows = {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in table[1:]}
    assert list(rows) == [label for label, _ in bench_accuracy.ENGINES]
    reference = rows["pagedkv, float32 (--quantization none)"]
    assert reference[1:] == ["+0.00%", "100.0%", "0.0000"]
    assert all(float(cells[0]) > 1 for cells in rows.values())  # perplexities
    default = rows["pagedkv, the file's quantization (default)"]
    assert float(default[3]) > 0  # the default mode's arithmetic is not float32's


def test_windows_keep_only_what_can_be_scored():
    assert bench_accuracy.windows_of(list(range(10)), 3, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert bench_accuracy.windows_of(list(range(9)), 5, 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]  # [8] scores nothing


def test_scores_compare_position_by_position():
    reference = [(-1.0, 5), (-2.0, 7)]
    perplexity, same_top, drift = bench_accuracy.compare(reference, [(-1.5, 5), (-2.0, 3)])
    assert perplexity == pytest.approx(math.exp(1.75))
    assert same_top == 0.5 and drift == pytest.approx(0.25)
