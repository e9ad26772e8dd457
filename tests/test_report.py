"""Where benchmark results go: a fresh folder the tool names; the repository's docs only with
--update-docs."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from tools import bench_blocks

from pagedkv.ablation import report

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def docs(tmp_path, monkeypatch):
    """A stand-in for docs/: pagedkv.ablation.report writes there instead of the repository."""
    folder = tmp_path / "docs"
    folder.mkdir()
    monkeypatch.setattr(report, "BENCHMARKS", folder / "BENCHMARKS.md")
    return folder


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    report.add_output_arguments(parser, "things")
    return parser.parse_args(argv)


def test_output_folder_is_fresh_and_outside_the_repository_unless_told(docs, tmp_path, capsys):
    first, second = (report.output_folder(_args(), "tool", "things") for _ in range(2))
    assert first != second and first.is_dir() and second.is_dir()
    assert ROOT not in first.resolve().parents and docs not in first.resolve().parents
    assert f"results go to {first}" in capsys.readouterr().err
    assert report.output_folder(_args("--update-docs"), "tool", "things") == docs / "things"
    assert report.output_folder(_args("--out", str(tmp_path / "mine"), "--update-docs"), "tool") == tmp_path / "mine"


def test_publish_touches_the_docs_only_with_update_docs(docs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    report.publish("Some benchmark", "| a |\n|---|\n| 1 |", out, update_docs=False)
    assert not (docs / "BENCHMARKS.md").exists()
    assert "## Some benchmark" in (out / "BENCHMARKS-section.md").read_text()
    report.publish("Some benchmark", "figure: out.png", out, update_docs=True, docs_body="figure: docs/out.png")
    assert "figure: docs/out.png" in (docs / "BENCHMARKS.md").read_text()
    assert "figure: out.png" in (out / "BENCHMARKS-section.md").read_text()


def test_a_benchmark_run_end_to_end_writes_the_docs_only_when_asked(docs, capsys):
    bench_blocks.main(["--steps", "2"])
    named = Path(capsys.readouterr().err.split("results go to ", 1)[1].splitlines()[0])
    assert "## Block manager (CPU)" in (named / "BENCHMARKS-section.md").read_text()
    assert not (docs / "BENCHMARKS.md").exists()
    bench_blocks.main(["--steps", "2", "--update-docs"])
    assert "## Block manager (CPU)" in (docs / "BENCHMARKS.md").read_text()
