"""tools.bench_multiturn and its workload on a tiny model: the clients' round robin, turns that
repeat their conversation, what the tables count in every setting (not how fast), the restart's
second engine reading the first one's blocks, and that the docs are written only when asked."""
from __future__ import annotations

import json

import pytest

from pagedkv.ablation.report import BENCHMARKS
from tools import bench_multiturn as bm
from tools.multiturn_workloads import ChatClients, multi_turn

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small(seed: int = 0, conversations: int = 5, clients: int = 2, vocab_size: int = 512):
    return multi_turn(conversations, 3, vocab_size, clients=clients, system_tokens=24, context_mean=40,
                      context_range=(20, 60), message_mean=10, message_range=(4, 20), answer_mean=6,
                      answer_range=(2, 10), seed=seed)


def test_the_workload_and_its_clients():
    w = small()
    assert all(len(c.messages) == 3 and len(c.answer_lens) == 3 for c in w.conversations)
    assert all(20 + 4 <= len(c.messages[0]) <= 60 + 20 and all(4 <= len(m) <= 20 for m in c.messages[1:])
               for c in w.conversations)
    assert w.conversations_of(0) == [0, 2, 4] and w.conversations_of(1) == [1, 3]
    # Round robin: a conversation's next turn comes after each of its client's other conversations.
    assert w.schedule(0, range(3)) == [(0, 0), (2, 0), (4, 0), (0, 1), (2, 1), (4, 1), (0, 2), (2, 2), (4, 2)]
    assert w.schedule(1, range(1, 3)) == [(1, 1), (3, 1), (1, 2), (3, 2)]
    assert sorted(w.interleaved(range(3))) == sorted((c, t) for c in range(5) for t in range(3))
    assert w.interleaved(range(1))[:4] == [(0, 0), (1, 0), (2, 0), (3, 0)]
    with pytest.raises(ValueError, match="have not run"):
        ChatClients(w, range(1, 3)).first_requests()


def test_turns_repeat_their_conversation_across_engines(tiny_model):
    from pagedkv import EngineConfig, LLMEngine, load_model
    from pagedkv.ablation.replay import replay

    loaded = load_model(tiny_model())
    w = small(seed=3, conversations=3, clients=1)
    history: dict[int, list[int]] = {}
    outputs = {}
    for turns in (range(2), range(2, 3)):  # a fresh engine for the last turn, as after a restart
        clients = ChatClients(w, turns, history)
        engine = LLMEngine(EngineConfig(block_size=4, num_device_blocks=128), loaded)
        result = replay(engine, clients.first_requests(), bm.greedy, follow_up=clients.follow_up)
        outputs.update(result.outputs)
    assert sorted(outputs) == sorted(f"conv-{c}/{t}" for c in range(3) for t in range(3))
    for c, conv in enumerate(w.conversations):
        before = list(w.system)
        for t in range(3):
            out = outputs[f"conv-{c}/{t}"]
            assert out.prompt_token_ids == before + conv.messages[t]
            assert len(out.outputs[0].token_ids) == conv.answer_lens[t]
            before = out.prompt_token_ids + out.outputs[0].token_ids
        assert history[c] == before


@pytest.fixture(scope="module")
def quick_run(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_multiturn")
    before = BENCHMARKS.read_text() if BENCHMARKS.exists() else None
    # The tiny model recomputes a block faster than the disk returns it: the cost model would
    # rightly recompute; what the tables count needs the blocks loaded (conftest's always_load).
    from pagedkv.preemption.policy import PreemptionPolicy
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(PreemptionPolicy, "should_load", lambda self, tier, num_blocks, block_size: True)
        assert bm.main(["--model", tiny_model(), "--quick", "--clock", "cpu", "--out", str(out),
                        "--disk-dir", str(out / "disk"), "--trace-out", str(out / "trace.jsonl")]) == 0
    assert (BENCHMARKS.read_text() if BENCHMARKS.exists() else None) == before
    assert (out / "BENCHMARKS-section.md").exists() and (out / "trace.jsonl").exists()
    assert not any((out / "disk").iterdir())  # every disk tier's folder is removed
    return json.loads((out / "results.json").read_text())


def test_what_the_chat_table_counts(quick_run):
    runs = {r["config"]: r for r in quick_run["chat"]}
    assert list(runs) == list(bm.CONFIGS.values())
    first = runs[bm.NONE]
    outputs = {t["request_id"]: t["output"] for t in first["turns"]}
    prompt = sum(t["prompt_tokens"] for t in first["turns"])
    assert len(first["turns"]) == 8 * 4
    assert first["prefill_tokens"] == prompt and all(sum(t["hits"].values()) == 0 for t in first["turns"])
    for name, run in runs.items():
        turns = run["turns"]
        assert {t["request_id"]: t["output"] for t in turns} == outputs, name  # tiers never change a token
        assert sum(t["prompt_tokens"] for t in turns) == prompt
        hits = {tier: sum(t["hits"][tier] for t in turns) for tier in bm.TIERS}
        if run["preemptions"] == {"swap": 0, "recompute": 0}:
            assert run["prefill_tokens"] == prompt - sum(hits.values()), name
        for t in turns:  # a turn's new message is never cached; the history's last block may not be
            assert sum(t["hits"].values()) <= t["history_tokens"], (name, t)
        assert (hits["host"] > 0) == (name in (bm.HOST, bm.HOST_DISK)), name
        assert (hits["disk"] > 0) == (name in (bm.DISK, bm.RESTART)), name
    # The device pool is too small for the history: the tiers below it find more.
    device = sum(sum(t["hits"].values()) for t in runs[bm.DEVICE]["turns"])
    for name in (bm.HOST, bm.DISK, bm.HOST_DISK, bm.UNBOUNDED):
        assert sum(sum(t["hits"].values()) for t in runs[name]["turns"]) > device, name
    unbounded = sum(t["hits"]["device"] for t in runs[bm.UNBOUNDED]["turns"])
    assert all(sum(sum(t["hits"].values()) for t in run["turns"]) <= unbounded for run in runs.values())


def test_the_restart_reads_the_first_engines_blocks(quick_run):
    run = next(r for r in quick_run["chat"] if r["config"] == bm.RESTART)
    assert run["restart_after_turn"] == 1 and len(run["tier_stats"]) == 2
    first_engine, second_engine = (s["disk"] for s in run["tier_stats"])
    assert first_engine["cached_blocks"] > 0  # it closed with its blocks on disk
    assert second_engine["hit_blocks"] > 0 and second_engine["errors"] == 0
    after = [t for t in run["turns"] if t["turn"] == 2]
    assert len(after) == 8 and after[0]["hits"]["device"] == 0  # an empty device at first
    share = quick_run["restart_share"]
    assert share["history_tokens"] == sum(t["history_tokens"] for t in after)
    assert share["disk"] == sum(t["hits"]["disk"] for t in after) / share["history_tokens"] > 0.5


def test_what_the_no_reuse_table_counts(quick_run):
    runs = quick_run["no_reuse"]
    assert [r["config"] for r in runs] == ["tiers off", "disk", "host + disk"]
    assert len({r["prefill_tokens"] for r in runs}) == 1
    assert all(sum(t["hits"][tier] for t in r["turns"] for tier in bm.TIERS) == 0 for r in runs)
    off, disk, both = ({k: sum(s.get("stored_blocks", 0) for s in r["tier_stats"][0].values())} for r in runs
                       for k in ["stores"])
    assert off["stores"] == 0 and disk["stores"] > 0 and both["stores"] > 0  # the tiers did their work
    assert len({json.dumps([t["output"] for t in r["turns"]]) for r in runs}) == 1


def turn(rid: str, number: int, history: int, hits: dict, ttft: float) -> bm.Turn:
    return bm.Turn(rid, number, history + 10, history, {"device": 0, "host": 0, "disk": 0, **hits}, ttft, ttft, [1])


def run(config: str, turns: list[bm.Turn], restart: int | None = None) -> bm.Run:
    return bm.Run(config, "cpu", turns, 0, 10, 1.0, 1.0, 1.0, [{}], {"swap": 0, "recompute": 0}, restart)


def test_targets_from_the_turns():
    runs = {bm.DEVICE: run(bm.DEVICE, [turn("a/0", 0, 0, {}, 1.0), turn("a/1", 1, 3000, {"device": 512}, 10.0),
                                       turn("b/1", 1, 1000, {"device": 0}, 4.0),
                                       turn("c/1", 1, 3000, {"device": 2900}, 0.5)]),
            bm.DISK: run(bm.DISK, [turn("a/0", 0, 0, {}, 1.0), turn("a/1", 1, 3000, {"disk": 2900}, 1.0),
                                   turn("b/1", 1, 1000, {"disk": 900}, 1.0),
                                   turn("c/1", 1, 3000, {"device": 2900}, 0.5)]),
            bm.RESTART: run(bm.RESTART, [turn("a/1", 1, 2000, {"disk": 1000}, 1.0),
                                         turn("b/1", 1, 2000, {"device": 500, "disk": 1400}, 1.0),
                                         turn("a/2", 2, 2000, {"device": 2000}, 1.0)], restart=0)}
    assert bm.left_the_device(runs) == {"a/1", "b/1"}  # c's history stayed on the device
    rows, _ = bm.chat_rows(runs, 2048)
    assert rows[0][10] == "10.00 (1)" and rows[1][10] == "1.00 (1)"  # only a/1: history >= 2048, left
    targets = bm.chat_targets(runs, 2048)
    assert targets[0][1:] == ["10.0x", ">= 5x", "yes"]
    assert targets[1][1] == "60.0% (72.5%)" and targets[1][3] == "no (no)"
    assert bm.restart_share(runs[bm.RESTART])["turns"] == 2
    on = run("disk", [turn("x", 0, 0, {}, 1.0)])
    on.generated_tokens = 9  # 10% slower than off
    rows, targets = bm.no_reuse_rows([run("tiers off", [turn("x", 0, 0, {}, 1.0)]), on])
    assert targets == [["no reuse: throughput cost of disk", "10.0%", "<= 5%", "no"]]
