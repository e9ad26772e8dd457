"""tools.bench_throughput: the step-cost model behind its explanation, and its static ways
on a tiny model (steps, rows per step and counted tokens)."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from pagedkv.runtime.models.loader import load_model
from tools import bench_throughput as bt
from pagedkv.ablation.workload import WorkloadRequest, make_workload

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def requests_with(output_lens: list[int]) -> list[WorkloadRequest]:
    return [WorkloadRequest(f"r{i}", [5, 6, 7], n, 0.0) for i, n in enumerate(output_lens)]


def test_static_model_ratio_by_hand():
    # Batch of 2 with outputs 1 and 3: static runs 2 rows once, then 1 row twice; continuous
    # runs 4 tokens / 2 = 2 full steps. Cost a + b * rows.
    reqs = requests_with([1, 3])
    for a, b in [(1.0, 1.0), (2.0, 0.5), (1.0, 0.0)]:
        assert bt.static_model_ratio(reqs, 2, a, b) == pytest.approx((3 * a + 4 * b) / (2 * a + 4 * b))
        # A batch that keeps its shape runs both rows for all three steps.
        assert bt.static_model_ratio(reqs, 2, a, b, shed_finished=False) == pytest.approx(1.5)


def test_static_model_ratio_without_per_sequence_cost_is_longest_over_mean():
    reqs = make_workload(40, 1000, seed=2, prompt_mean=8, output_mean=20, max_prompt=30, max_output=90)
    batch = 8
    longest = sum(max(r.output_len for r in reqs[i:i + batch]) for i in range(0, len(reqs), batch))
    total = sum(r.output_len for r in reqs)
    assert bt.static_model_ratio(reqs, batch, 0.02, 0.0) == pytest.approx(longest / (total / batch))


def test_per_sequence_cost_for_inverts_the_prediction():
    reqs = make_workload(40, 1000, seed=4, prompt_mean=8, output_mean=20, max_prompt=30, max_output=90)
    for b in [1e-4, 1e-3, 5e-3]:
        ratio = bt.static_model_ratio(reqs, 8, 0.02, b)
        assert bt.per_sequence_cost_for(ratio, reqs, 8, 0.02) == pytest.approx(b, rel=1e-6)
    unreachable = bt.static_model_ratio(reqs, 8, 0.02, 0.0) * 1.01
    assert bt.per_sequence_cost_for(unreachable, reqs, 8, 0.02) == 0.0


@pytest.mark.parametrize("tied", [False, True])
def test_matmul_flops_count_every_linear_weight(tiny_model, tied):
    path = tiny_model(tie_word_embeddings=tied, num_heads=4, num_kv_heads=2)
    hf = AutoModelForCausalLM.from_pretrained(path)
    weights = sum(m.weight.numel() for m in hf.modules() if isinstance(m, torch.nn.Linear))
    assert bt.matmul_flops_per_token(load_model(path).config) == 2 * weights


def test_static_ways_on_a_tiny_model(tiny_model):
    loaded = load_model(tiny_model())
    batch = 4
    reqs = make_workload(10, loaded.config.vocab_size, seed=1, prompt_mean=6, output_mean=8,
                         max_prompt=20, max_output=24)
    lens = [r.output_len for r in reqs]
    assert len(set(lens)) > 2  # the batches are ragged
    static = bt.run_static(loaded, reqs, batch, "cpu", shed_finished=True)
    fixed = bt.run_static(loaded, reqs, batch, "cpu")
    useful = sum(lens)
    assert static.tokens == fixed.tokens == useful
    # Either way a batch runs until its longest request is done, one token per step.
    longest = sum(max(lens[i:i + batch]) for i in range(0, len(lens), batch))
    assert static.steps == fixed.steps == longest
    # A static batch keeps every row to the end, unless it sheds finished ones.
    decode_rows = [sum(rows) for rows in (static.log.rows, fixed.log.rows)]
    full = sum(len(lens[i:i + batch]) * (max(lens[i:i + batch]) - 1) for i in range(0, len(lens), batch))
    assert decode_rows[1] == full
    assert decode_rows[0] == useful - len(reqs)  # every token after the first is one decode row
    assert static.preemptions == fixed.preemptions == 0


def test_gpu_benchmark_path_runs_on_the_cpu(tmp_path):
    """The GPU benchmark's code (random model of a named shape, the engine run, decode-step
    times, the profile, the results folder), on the CPU with a tiny shape."""
    import argparse
    import json

    from tools.throughput_gpu import NEW_TOKENS, main_gpu, random_model, workload

    loaded, model = random_model("tiny", torch.device("cpu"), torch.float32)
    assert loaded.config.num_kv_heads == 2 and loaded.weights["lm_head.weight"].shape == (512, 64)
    assert all(r.output_len == NEW_TOKENS for r in workload(5, 512, 0))
    args = argparse.Namespace(device="cpu", model=None, random_model="tiny", seed=0, num_requests=3, quick=False,
                              enforce_eager=False, out=str(tmp_path), update_docs=False, no_transformers=True,
                              decode_batches="1,2", static_requests=0)
    main_gpu(args)
    result = json.loads((tmp_path / "throughput.json").read_text())
    assert result["ways"][0]["tokens"] == 3 * NEW_TOKENS
    assert result["ways"][3]["name"] == "pagedkv, --async-scheduling" and result["ways"][3]["tokens"] == 3 * NEW_TOKENS
    assert set(result["decode_step_ms"]) == {"1", "2"}
    text = (tmp_path / "throughput.md").read_text()
    assert "skipped (--no-transformers)" in text and "forward" in text
