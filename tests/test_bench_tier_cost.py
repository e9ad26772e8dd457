"""tools.bench_tier_cost on a tiny model: every way runs on the same history and the forced ways
do what they say (not how fast); the summary judges each choice by the forced runs' medians."""
from __future__ import annotations

import json

import pytest

from pagedkv.ablation.report import BENCHMARKS
from tools import bench_tier_cost as tc

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_a_quick_run_without_the_throttled_disk(tiny_model, tmp_path):
    before = BENCHMARKS.read_text() if BENCHMARKS.exists() else None
    assert tc.main(["--model", tiny_model(), "--quick", "--throttle-mbps", "0", "--out", str(tmp_path)]) == 0
    assert (BENCHMARKS.read_text() if BENCHMARKS.exists() else None) == before
    runs = json.loads((tmp_path / "results.json").read_text())
    assert {(r["source"], r["length"], r["mode"]) for r in runs} == {
        (s, n, m) for s in (tc.PAGE_CACHE, tc.DISK) for n in (64, 128) for m in ("recompute", "load", "auto")}
    for r in runs:
        if r["mode"] == "recompute":
            assert r["loaded_blocks"] == 0
        if r["mode"] == "load":  # every full block of the history; the new tokens' block holds the last token
            assert r["loaded_blocks"] == r["length"] // 16
        if r["mode"] == "auto":
            assert r["loaded_blocks"] in (0, r["length"] // 16) and r["predicted_recompute"] > 0


def m(source: str, mode: str, ttft: float, loaded: int = 0) -> tc.Measurement:
    return tc.Measurement(source, 512, 0, mode, ttft, loaded)


def test_the_summary_judges_choices_by_the_forced_runs():
    rows, targets = tc.summarize([m("a", "recompute", 1.0), m("a", "load", 2.0, 32), m("a", "auto", 1.0),
                                  m("b", "recompute", 1.0), m("b", "load", 1.05, 32), m("b", "auto", 1.0, 32)])
    assert [r[4] for r in rows] == ["recompute", "recompute"] and [r[5] for r in rows] == ["1x recompute", "1x load"]
    assert [r[-1] for r in rows] == ["0%", "5%"] and targets[0][1:] == ["5%", "<= 10%", "yes"]
    _, targets = tc.summarize([m("a", "recompute", 1.0), m("a", "load", 2.0, 32), m("a", "auto", 2.0, 32)])
    assert targets[0][1:] == ["100%", "<= 10%", "no"]


def test_the_cost_model_learns_a_bursty_disks_bandwidth():
    """Per-block read times measured on tools.throttled_dir at 10 MB/s (readahead makes some reads
    free, the others wait): the estimate should be near the bytes over the seconds, not the mean of
    each block's bytes over its seconds."""
    from pagedkv.preemption.policy import CostModel

    block = 737_280  # SmolLM2-135M's 16-token block in float32
    seconds = [0.002, 0.144, 0.078, 0.0004] * 8
    cost = CostModel()
    for s in seconds:
        cost.observe_load("disk", block, s)
    aggregate = len(seconds) * block / sum(seconds)
    assert cost.load_bytes_per_s["disk"] <= 2 * aggregate
