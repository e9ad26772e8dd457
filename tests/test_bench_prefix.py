"""tools.bench_prefix and its workloads on a tiny model: what the tables count, the chat's
closed loop, and that the docs are written only when asked."""
from __future__ import annotations

import json

import pytest

from tools import bench_prefix as bp
from tools.prefix_workloads import multi_turn_chats, no_shared_prefix, shared_system_prompt
from pagedkv.ablation.report import BENCHMARKS

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_workloads_share_what_they_should():
    shared = shared_system_prompt(5, 1000, system_tokens=40, seed=1)
    assert all(r.prompt_ids[:40] == shared[0].prompt_ids[:40] for r in shared)
    assert len({tuple(r.prompt_ids[40:]) for r in shared}) == 5
    plain = no_shared_prefix(6, 1000, prompt_mean=20, seed=1)
    assert len({r.prompt_ids[0] for r in plain}) > 1 and all(r.output_len == 32 for r in plain)
    chats = multi_turn_chats(2, 3, 1000, seed=1)
    assert chats.num_requests == 6 and [r.request_id for r in chats.first_turns] == ["chat-0/0", "chat-1/0"]


def test_chat_turn_repeats_the_conversation(tiny_model):
    from pagedkv import LLMEngine, load_model

    chats = multi_turn_chats(1, 3, 512, message_tokens=(3, 5), output_len=4, seed=2)
    engine = LLMEngine(bp.EngineConfig(block_size=4, num_device_blocks=64), load_model(tiny_model()))
    result = bp.replay(engine, chats.first_turns, bp.greedy, follow_up=chats.follow_up)
    assert sorted(result.outputs) == ["chat-0/0", "chat-0/1", "chat-0/2"]
    messages = chats.messages["chat-0"]
    history: list[int] = []
    for turn in range(3):
        out = result.outputs[f"chat-0/{turn}"]
        assert out.prompt_token_ids == history + messages[turn]
        history = out.prompt_token_ids + out.outputs[0].token_ids
    assert result.stats["prefix_cache"]["hit_tokens"] > 0  # later turns find the earlier ones


def test_quick_run_on_a_tiny_model(tiny_model, tmp_path):
    before = BENCHMARKS.read_text() if BENCHMARKS.exists() else None
    assert bp.main(["--model", tiny_model(), "--quick", "--clock", "cpu", "--out", str(tmp_path)]) == 0
    runs = json.loads((tmp_path / "results.json").read_text())
    by = {(r["workload"], r["caching"]): r for r in runs}
    assert {w for w, _ in by} == {bp.SHARED, bp.CHAT, bp.NONE}
    for workload in (bp.SHARED, bp.CHAT, bp.NONE):
        off, on = by[(workload, False)], by[(workload, True)]
        assert off["prompt_tokens"] == on["prompt_tokens"] == off["prefill_tokens"]  # off computes all
        assert off["hit_rate"] == 0.0
    shared_on = by[(bp.SHARED, True)]
    # 12 requests behind a 64-token system prompt (4 blocks of 16): only the first computes it.
    assert shared_on["prefill_tokens"] == shared_on["prompt_tokens"] - 11 * 64
    assert by[(bp.NONE, True)]["prefill_tokens"] == by[(bp.NONE, False)]["prefill_tokens"]
    assert by[(bp.CHAT, True)]["prefill_tokens"] < by[(bp.CHAT, False)]["prefill_tokens"]
    assert (BENCHMARKS.read_text() if BENCHMARKS.exists() else None) == before


def test_summary_flags_different_outputs_and_missed_targets():
    def run(workload, caching, prefill, ttft, throughput, outputs):
        return bp.Run(workload, caching, 2, 100, prefill, 0.0, ttft, ttft, throughput, 1.0, outputs)

    rows, targets = bp.summarize([run(bp.SHARED, False, 100, 4.0, 10.0, {"a": [1]}),
                                  run(bp.SHARED, True, 50, 1.0, 30.0, {"a": [2]})])
    assert [r[-1] for r in rows] == ["NO", "NO"]
    assert [(t[1], t[3]) for t in targets] == [("2.00x", "no"), ("3.00x", "yes"), ("4.00x", "yes")]
