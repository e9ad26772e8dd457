"""tools.bench_serving end to end: it starts a server on a tiny model, sends a handful of
streamed requests at two rates, and writes well-formed CSV, JSON and PNG files."""
from __future__ import annotations

import csv
import json
import math

import pytest

from tools import bench_serving

from pagedkv.ablation import report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RATES = (10.0, 40.0)
NUM_REQUESTS = 6


@pytest.fixture(scope="module")
def run(tiny_model, tmp_path_factory):
    model = tiny_model()
    docs = tmp_path_factory.mktemp("docs")
    out = docs / "serving"

    benchmarks = docs / "BENCHMARKS.md"  # stands in for the repository's; without --update-docs, untouched
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(report, "BENCHMARKS", benchmarks)
        code = bench_serving.main([
            "--model", model, "--threads", "1", "--rates", ",".join(f"{r:g}" for r in RATES),
            "--num-requests", str(NUM_REQUESTS), "--prompt-mean", "8", "--output-mean", "6", "--max-prompt", "24",
            "--max-output", "16", "--seed", "3", "--out", str(out), "--no-progress"])
    assert code == 0 and not benchmarks.exists()
    return docs, out


@pytest.mark.timeout(180)
def test_csv(run):
    _, out = run
    with open(out / "serving.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["rate"]) for r in rows] == list(RATES)
    for r in rows:
        assert int(r["num_requests"]) == int(r["completed"]) == NUM_REQUESTS and int(r["errors"]) == 0
        for key in ("requests_per_s", "output_tokens_per_s", "ttft_p50_s", "ttft_p99_s", "tpot_p50_s",
                    "norm_latency_p50_s", "norm_latency_p99_s", "step_ms", "runtime_ms_per_request",
                    "runtime_ms_per_message", "health_rtt_p50_ms"):
            value = float(r[key])
            assert math.isfinite(value) and value > 0, (key, r[key])
        assert float(r["ttft_p50_s"]) <= float(r["ttft_p99_s"])
        assert float(r["norm_latency_p50_s"]) <= float(r["norm_latency_p99_s"])
        assert 0 < float(r["runtime_share"]) < 1
        assert int(r["steps"]) > 0


@pytest.mark.timeout(180)
def test_json(run):
    _, out = run
    doc = json.loads((out / "serving.json").read_text())
    assert [r["rate"] for r in doc["rates"]] == list(RATES)
    assert doc["num_requests"] == NUM_REQUESTS and doc["seed"] == 3
    assert doc["idle_health_rtt_ms"]["p50"] > 0
    for rate in RATES:
        requests = doc["requests"][f"{rate:g}"]
        assert len(requests) == NUM_REQUESTS
        for r in requests:
            assert r["error"] is None and r["output_tokens"] >= 1 and r["ttft_s"] > 0
            assert r["normalized_latency_s"] > 0
    # The same requests at every rate: only their arrival times differ.
    first, second = (doc["requests"][f"{rate:g}"] for rate in RATES)
    assert [(a["prompt_tokens"], a["output_tokens"]) for a in first] == \
        [(b["prompt_tokens"], b["output_tokens"]) for b in second]


@pytest.mark.timeout(180)
def test_png_and_section(run):
    docs, out = run
    png = out / "serving.png"
    assert png.read_bytes()[:8] == PNG_SIGNATURE and png.stat().st_size > 10_000
    # The section for docs/BENCHMARKS.md: the table, and the plot linked relative to docs/.
    with open(out / "serving.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    counts = ("num_requests", "completed", "errors", "steps", "preemptions")
    results = [bench_serving.RateResult(**{k: v if k == "path" else int(v) if k in counts else float(v)
                                           for k, v in r.items()}) for r in rows]
    meta = json.loads((out / "serving.json").read_text())
    body = bench_serving.section_body(results, meta, png, docs)
    assert "![serving latency against request rate](serving/serving.png)" in body
    # the copy in the results folder links its own figure
    assert "![serving latency against request rate](serving.png)" in (out / "BENCHMARKS-section.md").read_text()
    assert body.count("\n| ") == 1 + len(RATES) and "0 request(s) failed" in body


@pytest.mark.timeout(240)
def test_http_mode_runs_both_paths_in_one_run(tiny_model, tmp_path):
    """--http: one server with its gateway; each rate through ZeroMQ and then over HTTP, same requests."""
    out = tmp_path / "serving"
    code = bench_serving.main([
        "--model", tiny_model(), "--threads", "1", "--rates", "20", "--num-requests", "5", "--prompt-mean", "8",
        "--output-mean", "6", "--max-prompt", "24", "--max-output", "16", "--seed", "3", "--out", str(out),
        "--no-progress", "--http"])
    assert code == 0
    assert "Serving latency: HTTP gateway vs ZeroMQ" in (out / "BENCHMARKS-section.md").read_text()
    with open(out / "serving_http.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["path"] for r in rows] == ["zmq", "http"]
    for r in rows:
        assert int(r["completed"]) == 5 and int(r["errors"]) == 0
        assert math.isfinite(float(r["tpot_p50_s"])) and float(r["tpot_p50_s"]) > 0
    doc = json.loads((out / "serving_http.json").read_text())
    zmq, http = doc["requests"]["20"], doc["requests"]["http 20"]
    assert [r["output_tokens"] for r in zmq] == [r["output_tokens"] for r in http]  # the same work
    results = [bench_serving.RateResult(**{k: v if k == "path" else int(v) if k in ("num_requests", "completed",
               "errors", "steps", "preemptions") else float(v) for k, v in r.items()}) for r in rows]
    assert "- 20 req/s: p50 TPOT" in bench_serving.gateway_overhead(results)
