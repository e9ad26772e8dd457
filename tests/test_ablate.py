"""The swap-vs-recompute ablation tool: a tiny end-to-end run that writes well-formed CSV,
JSON, PNG and markdown; the preemption cost model's choices on synthetic measurements where
the right answer is known; and the tool's verdict logic on synthetic results."""
from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import pytest

from pagedkv.kvcache.sequence import Sequence, SequenceGroup
from pagedkv.preemption.policy import CostModel, PreemptionMode, PreemptionPolicy, tokens_to_recompute
from pagedkv.ablation import main as ablation
from pagedkv.ablation.e2e import E2ERow, WorkloadSpec, build_workload, params_for
from pagedkv.ablation.micro import MicroRow, policy_gap
from pagedkv.ablation.summary import verdict_table, verdicts

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# -- the tool, end to end, on a tiny model ------------------------------------------------------
TINY = ["--block-sizes", "1,4,16", "--contexts", "16,48", "--repeats", "2", "--rates", "50,inf",
        "--num-requests", "7", "--prompt-mean", "12", "--output-mean", "8", "--max-prompt", "40",
        "--max-output", "20", "--e2e-block-size", "4", "--clock", "cpu", "--threads", "1",
        "--memory-requests", "4", "--memory-scale", "0.1", "--e2e-repeats", "2", "--no-progress"]


@pytest.fixture(scope="module")
def tiny_run(tiny_model, tmp_path_factory):
    model = tiny_model(num_layers=2, num_heads=4, num_kv_heads=2)
    docs = tmp_path_factory.mktemp("docs")
    out = docs / "ablation"
    benchmarks = docs / "BENCHMARKS.md"
    benchmarks.write_text("# Benchmarks\n\n## Other section\n\nkept as it is\n")
    calls = []

    def write_section(title, body):
        calls.append(title)
        from pagedkv.ablation.report import write_section as real

        real(title, body, path=benchmarks)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ablation, "BENCHMARKS", benchmarks)
        mp.setattr(ablation, "write_section", write_section)
        assert ablation.main(["--model", model, "--out", str(out), "--update-docs", *TINY]) == 0
    return out, benchmarks, calls


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_micro_csv(tiny_run):
    out, _, _ = tiny_run
    rows = read_csv(out / "micro.csv")
    assert {"block_size", "context", "num_blocks", "bytes_moved", "swap_s", "recompute_s", "faster",
            "policy"} <= rows[0].keys()
    assert sorted((int(r["block_size"]), int(r["context"])) for r in rows) == \
        [(bs, c) for bs in (1, 4, 16) for c in (16, 48)]
    per_block = {}
    for r in rows:
        bs, context = int(r["block_size"]), int(r["context"])
        assert int(r["num_blocks"]) == -(-context // bs)   # the group's blocks, each moved once
        per_block.setdefault(bs, set()).add(int(r["bytes_moved"]) // int(r["num_blocks"]))
        swap, recompute = float(r["swap_s"]), float(r["recompute_s"])
        assert swap > 0 and recompute > 0
        assert r["faster"] == ("swap" if swap < recompute else "recompute")
        assert r["policy"] in ("swap", "recompute")
    # Bytes per block: layers x K,V x block size x KV heads x head dim x 4 bytes (float32).
    assert per_block == {bs: {2 * 2 * bs * 2 * 16 * 4} for bs in (1, 4, 16)}


def test_e2e_csv_and_preemption_invisible(tiny_run):
    out, _, _ = tiny_run
    rows = read_csv(out / "e2e.csv")
    assert {"rate", "mode", "mean_norm_latency", "p50_norm_latency", "p99_norm_latency", "throughput",
            "preempt_swap", "preempt_recompute", "bytes_swapped", "tokens_recomputed", "mismatches"} <= rows[0].keys()
    assert sorted((r["rate"], r["mode"]) for r in rows) == \
        sorted((rate, m) for rate in ("50.0", "inf") for m in ("swap", "recompute", "auto"))
    by = {(r["rate"], r["mode"]): r for r in rows}
    for rate in ("50.0", "inf"):
        swap, recompute = by[(rate, "swap")], by[(rate, "recompute")]
        assert int(recompute["preempt_swap"]) == 0 and int(recompute["bytes_swapped"]) == 0
        assert (int(swap["preempt_swap"]) > 0) == (int(swap["bytes_swapped"]) > 0)
        assert (int(recompute["preempt_recompute"]) > 0) == (int(recompute["tokens_recomputed"]) > 0)
        for mode in ("swap", "recompute", "auto"):
            row = by[(rate, mode)]
            assert int(row["requests"]) == 2 * 7  # two replays of the 7 requests, pooled
            assert int(row["errors"]) == 0
            assert int(row["mismatches"]) == 0  # preemption never shows in the tokens
            assert float(row["p50_norm_latency"]) <= float(row["p99_norm_latency"])
    # Everything at once into a cache that only holds the largest request alone: it preempts.
    assert int(by[("inf", "swap")]["preempt_swap"]) > 0
    assert int(by[("inf", "recompute")]["preempt_recompute"]) > 0


def test_json_summary_and_plots(tiny_run):
    out, _, _ = tiny_run
    doc = json.loads((out / "results.json").read_text())
    assert {"meta", "micro", "e2e", "verdict", "memory", "warnings"} <= doc.keys()
    assert len(doc["micro"]) == 6 and len(doc["e2e"]) == 6 and len(doc["verdict"]) == 2
    assert [v["rate"] for v in doc["verdict"]] == [50.0, "inf"]
    for v in doc["verdict"]:
        assert v["fastest"] in ("swap", "recompute", "auto") and v["best_fixed"] in ("swap", "recompute")
        assert v["met"] == (v["gap"] <= 0.10)
    assert doc["warnings"] == []
    assert {(m["kind"], m["width"]) for m in doc["memory"]} == \
        {(k, w) for k in ("parallel sampling", "beam search") for w in (2, 4, 6)}
    text = (out / "summary.md").read_text()
    assert "| rate (req/s) | swap ms/tok | recompute ms/tok | auto ms/tok | fastest | auto chose |" in text
    assert "![swap vs recompute per block size](micro.png)" in text
    assert re.search(r"Swapping was faster at [0-6] of 6 points; recomputing took [0-9.]+x to [0-9.]+x", text)
    matplotlib_image = pytest.importorskip("matplotlib.image")
    for name in ("micro.png", "e2e.png", "memory.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE)
        image = matplotlib_image.imread(out / name)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_benchmarks_section(tiny_run):
    _, benchmarks, calls = tiny_run
    assert calls == ["Swap vs recompute ablation"]
    text = benchmarks.read_text()
    assert "## Other section\n\nkept as it is" in text
    assert "![swap vs recompute per block size](ablation/micro.png)" in text
    assert "![normalized latency vs request rate](ablation/e2e.png)" in text
    assert "| rate (req/s) | swap ms/tok |" in text


def test_without_update_docs_the_repository_is_left_alone(tiny_model, monkeypatch, capsys):
    """`pagedkv ablate --quick` from the README overwrote docs/BENCHMARKS.md and the README's
    own figure: without --update-docs results go to a fresh folder that the tool names."""
    def fail(*_):
        raise AssertionError("without --update-docs, docs/BENCHMARKS.md must not be written")

    monkeypatch.setattr(ablation, "write_section", fail)
    model = tiny_model(num_layers=2, num_heads=4, num_kv_heads=2)
    args = ["--model", model, "--skip", "e2e", "--skip", "memory", "--block-sizes", "2", "--contexts", "8",
            "--repeats", "1", "--no-progress"]
    assert ablation.main(args) == 0
    named = capsys.readouterr().err.split("results go to ", 1)[1].splitlines()[0]
    out = Path(named)
    root = Path(ablation.__file__).resolve().parents[2]
    assert out.is_dir() and root not in out.resolve().parents
    assert (out / "micro.csv").exists() and not (out / "e2e.csv").exists()
    assert "### Verdict" not in (out / "summary.md").read_text()
    assert ablation.main(args) == 0  # a second run gets a folder of its own
    assert capsys.readouterr().err.split("results go to ", 1)[1].splitlines()[0] != named


def test_clock_choice():
    resolve = ablation.resolve_clock
    assert resolve("auto", "cpu") == "cpu" and resolve("wall", "cpu") == "wall"
    assert resolve("auto", "cuda") == "wall" and resolve("wall", "cuda") == "wall"
    with pytest.raises(SystemExit, match="GPU work is not CPU time"):
        resolve("cpu", "cuda")


def test_workload_is_the_same_at_every_rate():
    spec = WorkloadSpec(num_requests=20)
    slow, fast, burst = (build_workload(spec, 1000, rate, seed=3) for rate in (0.5, 8.0, math.inf))
    assert [r.prompt_ids for r in slow] == [r.prompt_ids for r in fast] == [r.prompt_ids for r in burst]
    assert [r.output_len for r in slow] == [r.output_len for r in burst]
    assert slow[-1].arrival > fast[-1].arrival > 0 and all(r.arrival == 0 for r in burst)
    params = params_for(spec, seed=0)
    kinds = [(params(r).n, params(r).beam_width) for r in slow]
    assert kinds[4] == (2, 1) and kinds[6] == (2, 2) and kinds[0] == (1, 1)   # every 5th, every 7th


# -- the cost model on synthetic measurements ---------------------------------------------------
BYTES_PER_BLOCK = 1 << 20  # 1 MiB


def decoding_group(prompt_len: int = 100, generated: int = 28, width: int = 1) -> SequenceGroup:
    seqs = [Sequence.from_prompt(list(range(prompt_len))) for _ in range(width)]
    for seq in seqs:
        seq.token_ids += [7] * generated
    group = SequenceGroup("g", seqs)
    group.is_prefilling = False
    return group


def measured(prefill_tokens_per_s: float, swap_bytes_per_s: float, steps: int = 60) -> CostModel:
    """A cost model that has watched the executor for a while: its priors are forgotten."""
    cost = CostModel()
    for _ in range(steps):
        cost.observe_prefill(512, 512 / prefill_tokens_per_s)
        cost.observe_swap(64 << 20, (64 << 20) / swap_bytes_per_s)
    return cost


def test_a_prior_stands_only_until_the_first_measurement():
    cost = CostModel()
    cost.observe_prefill(300, 1.0)
    cost.observe_load("disk", 10**7, 1.0)
    assert cost.prefill_tokens_per_s == pytest.approx(300.0) and cost.load_bytes_per_s["disk"] == pytest.approx(1e7)
    assert cost.load_bytes_per_s["remote"] == CostModel().load_bytes_per_s["remote"]  # not measured yet
    cost.observe_prefill(600, 1.0)  # then a moving average of the seconds per token
    assert cost.prefill_tokens_per_s == pytest.approx(1 / (0.7 / 300 + 0.3 / 600))


def test_cost_model_learns_the_measured_throughputs():
    cost = measured(prefill_tokens_per_s=300.0, swap_bytes_per_s=5e9)
    assert cost.prefill_tokens_per_s == pytest.approx(300.0, rel=1e-6)
    assert cost.swap_bytes_per_s == pytest.approx(5e9, rel=1e-6)
    assert cost.recompute_seconds(600) == pytest.approx(2.0, rel=1e-6)
    assert cost.swap_seconds(5 * 10**9) == pytest.approx(2.0, rel=1e-6)  # out and back in


@pytest.mark.parametrize("prefill,bandwidth,expected", [
    (100.0, 10e9, PreemptionMode.SWAP),           # slow prefill (a big model on a CPU), fast copies
    (1e6, 1e6, PreemptionMode.RECOMPUTE),         # fast prefill, slow copies (a congested bus)
])
def test_auto_picks_the_cheaper_way(prefill, bandwidth, expected):
    policy = PreemptionPolicy("auto", measured(prefill, bandwidth), BYTES_PER_BLOCK)
    assert policy.choose(decoding_group(), num_unique_blocks=8, can_swap=True) is expected


def test_auto_follows_the_break_even_point():
    # 128 tokens to recompute, 8 blocks of 1 MiB to move out and back: swap costs 16 MiB of
    # copying. Prefill speeds on either side of the break-even 128 / (16 MiB / bandwidth).
    bandwidth = 1e9
    group = decoding_group(100, 28)
    assert tokens_to_recompute(group) == 128
    break_even = 128 / (2 * 8 * BYTES_PER_BLOCK / bandwidth)
    for factor, expected in ((0.8, PreemptionMode.SWAP), (1.25, PreemptionMode.RECOMPUTE)):
        policy = PreemptionPolicy("auto", measured(break_even * factor, bandwidth), BYTES_PER_BLOCK)
        assert policy.choose(group, num_unique_blocks=8, can_swap=True) is expected


def test_shared_prompt_counts_once():
    # A beam of 4 over a 1000-token prompt, 10 tokens each: recomputing is 1040 tokens, not 4040.
    group = decoding_group(1000, 10, width=4)
    assert tokens_to_recompute(group) == 1040
    # Swapping 66 unique blocks out and back costs 2 * 66 MiB / 1e9 B/s = 0.138 s. Recomputing
    # 1040 tokens costs 0.208 s at 5000 tokens/s (swap wins) and 0.130 s at 8000 (recompute wins);
    # counting the prompt once per beam (4040 tokens) would pick swap at both speeds.
    policy = PreemptionPolicy("auto", measured(5000.0, 1e9), BYTES_PER_BLOCK)
    assert policy.choose(group, num_unique_blocks=66, can_swap=True) is PreemptionMode.SWAP
    policy = PreemptionPolicy("auto", measured(8000.0, 1e9), BYTES_PER_BLOCK)
    assert policy.choose(group, num_unique_blocks=66, can_swap=True) is PreemptionMode.RECOMPUTE


def test_no_cpu_room_means_recompute():
    policy = PreemptionPolicy("auto", measured(10.0, 100e9), BYTES_PER_BLOCK)  # swapping is far cheaper
    assert policy.choose(decoding_group(), 8, can_swap=True) is PreemptionMode.SWAP
    assert policy.choose(decoding_group(), 8, can_swap=False) is PreemptionMode.RECOMPUTE
    assert PreemptionPolicy("swap", measured(10.0, 100e9), BYTES_PER_BLOCK).choose(
        decoding_group(), 8, can_swap=False) is PreemptionMode.RECOMPUTE


def test_fixed_modes_and_prefilling_groups():
    cheap_swap = measured(10.0, 100e9)
    cheap_recompute = measured(1e7, 1e3)
    assert PreemptionPolicy("swap", cheap_recompute, BYTES_PER_BLOCK).choose(
        decoding_group(), 8, True) is PreemptionMode.SWAP
    assert PreemptionPolicy("recompute", cheap_swap, BYTES_PER_BLOCK).choose(
        decoding_group(), 8, True) is PreemptionMode.RECOMPUTE
    prefilling = decoding_group()
    prefilling.is_prefilling = True  # nothing decoded yet to keep: always recomputed
    assert PreemptionPolicy("auto", cheap_swap, BYTES_PER_BLOCK).choose(
        prefilling, 8, True) is PreemptionMode.RECOMPUTE


# -- the tool's verdict on synthetic results ----------------------------------------------------
def e2e(rate, mode, latency, swaps=0, recomputes=0):
    return E2ERow(rate=rate, mode=mode, requests=10, mean_norm_latency=latency, p50_norm_latency=latency,
                  p99_norm_latency=latency, throughput=1.0, elapsed_s=1.0, preempt_swap=swaps,
                  preempt_recompute=recomputes, bytes_swapped=0, tokens_recomputed=0, errors=0)


def test_verdicts():
    rows = [
        e2e(1.0, "swap", 0.010), e2e(1.0, "recompute", 0.020), e2e(1.0, "auto", 0.0105, swaps=5),
        e2e(2.0, "swap", 0.030), e2e(2.0, "recompute", 0.020), e2e(2.0, "auto", 0.025, swaps=3, recomputes=2),
        e2e(4.0, "swap", 0.010), e2e(4.0, "recompute", 0.012), e2e(4.0, "auto", 0.009, recomputes=1),
        e2e(math.inf, "swap", 0.010), e2e(math.inf, "auto", 0.010),  # incomplete: no verdict
        e2e(8.0, "swap", 0.010), e2e(8.0, "recompute", 0.010), e2e(8.0, "auto", 0.0109),
    ]
    v = {x.rate: x for x in verdicts(rows)}
    assert sorted(v) == [1.0, 2.0, 4.0, 8.0]
    assert (v[1.0].fastest, v[1.0].best_fixed, v[1.0].met) == ("swap", "swap", True)
    assert v[1.0].gap == pytest.approx(0.05) and v[1.0].auto_chose == "swap 5, recompute 0 (as swap mode)"
    assert (v[2.0].fastest, v[2.0].best_fixed, v[2.0].met) == ("recompute", "recompute", False)
    assert v[2.0].gap == pytest.approx(0.25) and v[2.0].auto_chose == "swap 3, recompute 2"
    assert v[1.0].same_choices and not v[2.0].same_choices and not v[4.0].same_choices
    assert (v[4.0].fastest, v[4.0].best_fixed, v[4.0].met) == ("auto", "swap", True)
    assert v[4.0].gap == pytest.approx(-0.1)
    assert v[8.0].met and v[8.0].gap == pytest.approx(0.09) and v[8.0].auto_chose == "no preemption"
    noisy = verdicts([e2e(1.0, "swap", 0.010), e2e(1.0, "recompute", 0.020), e2e(1.0, "auto", 0.012, swaps=4)])[0]
    assert not noisy.met and noisy.same_choices  # auto swapped every victim, as swap mode: variation
    assert "| +20.0% | no, variation (same choices as swap) |" in verdict_table([noisy])
    table = verdict_table(list(v.values()))
    assert "| 2 | 30.0 | 20.0 | 25.0 | recompute | swap 3, recompute 2 | +25.0% | **no** |" in table
    assert "| 1 | 10.0 | 20.0 | 10.5 | swap | swap 5, recompute 0 (as swap mode) | +5.0% | yes |" in table


def test_policy_gap():
    def row(swap, recompute, policy):
        return MicroRow(16, 256, 16, 1, swap / 2, swap / 2, swap, recompute,
                        "swap" if swap < recompute else "recompute", policy)

    assert policy_gap(row(1.0, 3.0, "swap")) == 0.0
    assert policy_gap(row(1.0, 3.0, "recompute")) == pytest.approx(2.0)
    assert policy_gap(row(4.0, 2.0, "swap")) == pytest.approx(1.0)
    assert row(1.0, 3.0, "swap").ratio == pytest.approx(3.0)


def test_cpu_clock_replay_jumps_over_idle_time(tiny_model):
    from pagedkv.runtime.engine.config import EngineConfig
    from pagedkv.runtime.engine.llm_engine import LLMEngine
    from pagedkv.runtime.models.loader import load_model
    from pagedkv.ablation.replay import CpuClock, replay
    from pagedkv.ablation.workload import WorkloadRequest

    loaded = load_model(tiny_model(num_layers=2, num_heads=4, num_kv_heads=2))
    engine = LLMEngine(EngineConfig(num_device_blocks=64, block_size=4, swap_space_gib=0.0), loaded)
    requests = [WorkloadRequest("req-0", list(range(100, 110)), 5, 0.0),
                WorkloadRequest("req-1", list(range(200, 212)), 6, 500.0)]
    result = replay(engine, requests, params_for(WorkloadSpec(), seed=0), clock=CpuClock())
    first, second = result.timings["req-0"], result.timings["req-1"]
    # The engine sat idle until the second arrival: the clock jumped there instead of sleeping.
    assert first.finished < 500.0 <= second.first_token <= second.finished <= result.elapsed
    assert second.latency < 500.0 and second.output_tokens == 6 and first.output_tokens == 5
    assert result.generated_tokens == 11
    assert [len(o.outputs[0].token_ids) for o in result.outputs.values()] == [5, 6]
