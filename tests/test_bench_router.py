"""tools.bench_router on a tiny model: two clusters of real engine processes behind the gateway
play the multi-turn workload; every answer runs its drawn length in both, prefix-aware routing
computes no more prefill than round-robin, and the killed engine leaves the rotation. What the
figures count, not how fast."""
from __future__ import annotations

import json
import subprocess
import sys
from argparse import Namespace

import pytest

from tools.bench_router import as_words, make_workload

pytestmark = pytest.mark.timeout(600)
SIZES = dict(conversations=3, clients=2, turns=2, system_tokens=16, context_mean=24, message_mean=8, answer_mean=4)


def test_the_workload_in_words():
    wl = make_workload(Namespace(**SIZES))
    assert len(wl.conversations) == 3 and wl.clients == 2 and wl.turns == 2
    assert all(len(c.messages[0]) >= 12 + 4 for c in wl.conversations)  # a context of its own, then the question
    text = as_words(wl.conversations[0].messages[1])
    assert len(text.split()) == len(wl.conversations[0].messages[1])


def test_both_routings_play_the_whole_workload(model_path, tmp_path):
    out = tmp_path / "router.json"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in SIZES.items()]
    done = subprocess.run([sys.executable, "-m", "tools.bench_router", "--engines", "2", *flags,
                           "--runs", "round-robin,prefix", "--model", model_path, "--json", str(out),
                           "--", "--block-size", "4", "--num-device-blocks", "256"],
                          capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    wl = make_workload(Namespace(**SIZES))
    answers = sum(sum(c.answer_lens) for c in wl.conversations)
    rr, prefix = results["round-robin"], results["prefix"]
    assert rr["generated_tokens"] == prefix["generated_tokens"] == answers  # EOS ignored: every drawn length
    # Sticky routing reaches the floor no routing goes below (nothing is shared between engines).
    assert 0 < prefix["prefill_tokens_computed"] <= rr["prefill_tokens_computed"]
    assert prefix["prefix_hit_tokens"] > 0
    assert prefix["kill_to_out_s"] < 2
    assert "prefill tokens computed, prefix / round-robin" in done.stdout
