"""tools.bench_attention without a GPU: the refusal, and the files a run writes."""

from __future__ import annotations

import csv
import json

import pytest

from pagedkv import kernels
from tools import bench_attention as bench


def test_refuses_without_cuda_in_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(kernels, "cuda_available", lambda: False)
    assert bench.main(["--quick", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "CUDA" in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("name,peak", [("NVIDIA H200", 4800.0), ("NVIDIA H100 80GB HBM3", 3350.0),
                                       ("NVIDIA H100 PCIe", 2000.0), ("Some GPU", None)])
def test_detect_peak(name, peak):
    assert bench.detect_peak(name) == peak


def test_results_folder(tmp_path):
    meta = {"device": "X", "peak_gbs": 4800.0, "heads": 32, "kv_heads": 8, "head_dim": 128, "repeats": 5}
    decode = [bench.DecodeRow("float16", 16, 16, 8192, 256.0, 60.0, 4474, 0.932, 58.0, 4628, 0.97)]
    prefill = [bench.PrefillRow("bfloat16", 128, 1, 4096, 900.0, 305.5, 700.0, 392.8, 0.78)]
    swap = {"blocks": 32, "block_mib": 2.0, "mib": 64, "swap_out_gbs": 50.1, "swap_in_gbs": 51.0,
            "copy_out_gbs": 52.3, "copy_in_gbs": 53.0}
    text = bench.summary(meta, decode, prefill, swap)
    assert "| float16 | 16 | 16 | 8192 | 256.0 | 60.0 | 4474 | 93% |" in text
    assert "| bfloat16 | 128 | 1 | 4096 | 900.0 | 305.5 | 700.0 | 392.8 | 0.78 |" in text
    assert "plain pinned copy_ of the same bytes 52.3 GB/s out, 53.0 GB/s in" in text
    bench.write_results(tmp_path, meta, decode, prefill, swap, text)
    rows = list(csv.DictReader(open(tmp_path / "decode.csv")))
    assert rows[0]["paged_gbs"] == "4474" and rows[0]["block_size"] == "16"
    assert json.loads((tmp_path / "results.json").read_text())["prefill"][0]["paged_over_sdpa"] == 0.78
    assert (tmp_path / "summary.md").read_text().strip() == text.strip()
