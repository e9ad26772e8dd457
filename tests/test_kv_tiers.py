"""The KV tiers below the device pool, in the engine: outputs never show them (every request
equals its lone run under eviction, demotion, reload, preemption and restart, with the KV
content checker on), a restarted engine or another process serves earlier prefixes from the
disk, damaged and foreign blocks are misses, the cost model can refuse a load, and every pool
is free afterwards."""
import json
import os
import random
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
from differential import LoneRuns, assert_all_blocks_free, random_workload, run_concurrently

from pagedkv.kvcache.disk_tier import DiskTier, FinishedWork
from pagedkv.runtime.engine.config import EngineConfig
from pagedkv.runtime.engine.llm_engine import READ_WAIT_S, LLMEngine
from pagedkv.runtime.engine.sampling_params import SamplingParams
from pagedkv.runtime.models.loader import load_model

transformers = pytest.importorskip("transformers")
pytestmark = [pytest.mark.timeout(600), pytest.mark.usefixtures("one_torch_thread")]
GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def lone(loaded):
    return LoneRuns(loaded)


def generate(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams = GREEDY) -> list[list[int]]:
    for i, prompt in enumerate(prompts):
        engine.add_request(f"q{i}-{random.random()}", prompt, params, stream=False)
    done = {}
    order = list(engine.groups)[-len(prompts):]
    while engine.has_unfinished():
        for output in engine.step():
            if output.finished:
                done[output.request_id] = output.outputs[0].token_ids
    return [done[r] for r in order]


def long_prompts(n: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(length)] for _ in range(n)]


def tiered(tmp_path, **kwargs) -> EngineConfig:
    args = dict(block_size=4, num_device_blocks=40, swap_space_gib=0.001, kv_disk_cache_dir=str(tmp_path / "kv"),
                kv_disk_cache_gb=0.05, check_kv=True)
    args.update(kwargs)
    return EngineConfig(**args)


@pytest.mark.usefixtures("always_load")
@pytest.mark.parametrize("tiers", ["host", "disk", "host+disk"])
@pytest.mark.parametrize("mode", ["swap", "recompute"])
@pytest.mark.parametrize("seed", range(4))
def test_every_request_equals_its_lone_run_with_tiers(loaded, lone, tmp_path, tiers, mode, seed):
    requests = random_workload(seed, loaded.config.vocab_size, num_requests=48)
    rng = random.Random(seed)
    block_size = rng.choice([2, 4, 8])
    need = max((-(-(len(r.prompt) + r.params.max_tokens) // block_size) + 1) * max(r.params.n, r.params.beam_width)
               for r in requests)
    config = EngineConfig(block_size=block_size, num_device_blocks=need + rng.randint(0, need // 2),
                          swap_space_gib=0.0002, preemption_mode=mode, max_num_batched_tokens=rng.choice([16, 64]),
                          kv_host_cache_gb=0.0005 if "host" in tiers else None,
                          kv_disk_cache_dir=str(tmp_path / "kv") if "disk" in tiers else None,
                          kv_disk_cache_gb=0.02, check_kv=True, async_scheduling=bool(seed % 2))
    engine = LLMEngine(config, loaded)
    results = run_concurrently(engine, requests, concurrency=12, seed=seed)
    results.update({len(requests) + i: r for i, r in
                    run_concurrently(engine, requests[: len(requests) // 2], concurrency=12, seed=seed + 1).items()})
    differ = [i for i in results if results[i] != lone(requests[i % len(requests)])]
    stats = engine.stats()["kv_tiers"]
    assert differ == [], f"{len(differ)} of {len(results)} differ; tiers {stats}"
    assert sum(t["hit_blocks"] for t in stats.values()) > 0, stats
    assert engine.executor.checker.slots_unverifiable == 0
    assert_all_blocks_free(engine)
    engine.close()


@pytest.mark.usefixtures("always_load")
def test_greedy_from_the_disk_after_a_restart_equals_transformers(loaded, model_path, tmp_path):
    prompts = long_prompts(4, 37)
    first = LLMEngine(tiered(tmp_path), loaded)
    assert generate(first, prompts) and first.stats()["kv_tiers"]["disk"]["hit_blocks"] == 0
    first.close()  # the device's cached blocks go to the disk
    second = LLMEngine(tiered(tmp_path, num_device_blocks=200), loaded)  # room for all: nothing is preempted
    assert second.stats()["kv_tiers"]["disk"]["cached_blocks"] >= 4 * 9
    got = generate(second, prompts)
    disk = second.stats()["kv_tiers"]["disk"]
    assert disk["hit_blocks"] == 4 * 9 and disk["errors"] == 0  # every full block but the last token's
    assert second.stats()["prefix_cache"]["prefill_tokens_computed"] == 4 * 1
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_path).eval()
    for prompt, tokens in zip(prompts, got):
        ref = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=6, min_new_tokens=6, pad_token_id=0)
        assert tokens == ref[0, len(prompt):].tolist()
    second.close()


@pytest.mark.usefixtures("always_load")
@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_a_step_with_only_reads_in_flight_waits_for_them(loaded, tmp_path, monkeypatch, async_scheduling):
    """Nothing to run but a prompt whose blocks are being read from the disk: each step sleeps
    until a read lands (READ_WAIT_S at most) instead of returning at once to a caller that
    would spin, and the request then finishes as without the wait."""
    prompts = long_prompts(1, 37, seed=3)
    first = LLMEngine(tiered(tmp_path), loaded)
    expected = generate(first, prompts)
    first.close()
    gate = threading.Event()
    read = DiskTier._read_all
    monkeypatch.setattr(DiskTier, "_read_all", lambda self, blocks: gate.wait(60) and read(self, blocks))
    engine = LLMEngine(tiered(tmp_path, num_device_blocks=200, async_scheduling=async_scheduling), loaded)
    waits = []
    wait = engine.block_manager.wait_for_reads
    monkeypatch.setattr(engine.block_manager, "wait_for_reads", lambda timeout: waits.append(timeout) or wait(timeout))
    engine.add_request("r", prompts[0], GREEDY, stream=False)
    for _ in range(3):
        assert engine.step() == []
    assert waits == [READ_WAIT_S] * 3
    gate.set()
    outputs = []
    while engine.has_unfinished():
        outputs += [o for o in engine.step() if o.finished]
    assert outputs[0].outputs[0].token_ids == expected[0]
    assert engine.stats()["kv_tiers"]["disk"]["hit_blocks"] == 9
    assert_all_blocks_free(engine)
    engine.close()


def test_finished_work_wakes_a_waiter():
    work = FinishedWork()
    assert not work.wait(0)
    work.put(("load", 1))
    assert work.wait(0) and work.take() == [("load", 1)] and not work.wait(0)
    later = threading.Timer(0.05, work.put, [("store", 2)])
    later.start()
    assert work.wait(60)  # woken by the put, not by the timeout
    later.join()
    assert work.take() == [("store", 2)]


def test_another_process_serves_what_this_one_stored(loaded, model_path, tmp_path):
    prompts = long_prompts(3, 30, seed=5)
    engine = LLMEngine(tiered(tmp_path), loaded)
    expected = generate(engine, prompts)
    engine.close()
    script = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_kv_tiers import generate, tiered
        from pathlib import Path
        from pagedkv.runtime.engine.llm_engine import LLMEngine
        from pagedkv.runtime.models.loader import load_model
        engine = LLMEngine(tiered(Path({str(tmp_path)!r})), load_model({model_path!r}))
        tokens = generate(engine, {prompts!r})
        print(json.dumps([tokens, engine.stats()["kv_tiers"]["disk"]["hit_blocks"]]))
        """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    tokens, hits = json.loads(out.stdout.strip().splitlines()[-1])
    assert tokens == expected and hits == 3 * 7


@pytest.mark.usefixtures("always_load")
@pytest.mark.parametrize("damage", ["flip", "truncate", "foreign"])
def test_damaged_and_foreign_blocks_are_misses(loaded, tiny_model, tmp_path, damage):
    prompts = long_prompts(2, 33, seed=3)
    engine = LLMEngine(tiered(tmp_path), loaded)
    expected = generate(engine, prompts)
    engine.close()
    files = sorted((tmp_path / "kv").rglob("*.kvb"))
    assert files
    if damage == "foreign":  # another model in the same directory finds nothing of this one
        other = LLMEngine(tiered(tmp_path), load_model(tiny_model(num_layers=2, num_heads=4, num_kv_heads=2,
                                                                     seed=1)))
        generate(other, prompts)
        assert other.stats()["kv_tiers"]["disk"]["hit_blocks"] == 0
        other.close()
    else:
        for path in files[::2]:
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2] if damage == "truncate" else data[:-1] + bytes([data[-1] ^ 1]))
    engine = LLMEngine(tiered(tmp_path), loaded)
    assert generate(engine, prompts) == expected
    disk = engine.stats()["kv_tiers"]["disk"]
    if damage != "foreign":
        assert disk["errors"] >= 1
    assert_all_blocks_free(engine)
    engine.close()


def test_the_cost_model_recomputes_when_the_disk_is_slow(loaded, tmp_path):
    prompts = long_prompts(2, 41, seed=9)
    engine = LLMEngine(tiered(tmp_path), loaded)
    expected = generate(engine, prompts)
    engine.close()
    slow = LLMEngine(tiered(tmp_path), loaded)
    slow.cost.load_bytes_per_s["disk"] = 1.0  # one byte a second: recompute is faster
    assert generate(slow, prompts) == expected
    assert slow.stats()["kv_tiers"]["disk"]["hit_blocks"] == 0
    slow.close()
    fast = LLMEngine(tiered(tmp_path), loaded)
    assert generate(fast, prompts) == expected and fast.stats()["kv_tiers"]["disk"]["hit_blocks"] > 0
    fast.close()


def test_tiers_need_prefix_caching_and_one_rank():
    with pytest.raises(ValueError, match="prefix caching"):
        EngineConfig(kv_disk_cache_dir="/tmp/x", enable_prefix_caching=False)
    with pytest.raises(ValueError, match="one rank"):
        EngineConfig(kv_disk_cache_dir="/tmp/x", tensor_parallel_size=2)
    with pytest.raises(ValueError, match="kv_disk_cache_gb"):
        EngineConfig(kv_disk_cache_gb=0)


def test_a_restarted_server_serves_the_first_turn_from_disk(model_path, tmp_path):
    """A chat's second turn after a restart: its history comes from the disk tier (the hit count
    in /metrics and in `pagedkv stats`), and the answer equals an engine's without tiers."""
    from openai import OpenAI
    from server_process import running_http_server
    from test_openai_api import scrape

    args = ["--block-size", "4", "--num-device-blocks", "64", "--kv-disk-cache-dir", str(tmp_path / "kv"),
            "--kv-disk-cache-gb", "0.05"]
    history = [{"role": "user", "content": "The quick brown fox jumps over the lazy dog, twice or more."}]
    with running_http_server(model_path, *args, log_path=str(tmp_path / "first.log")) as (server, url):
        api = OpenAI(base_url=f"{url}/v1", api_key="none")
        model = api.models.list().data[0].id
        first = api.chat.completions.create(model=model, messages=history, max_tokens=12, temperature=0)
        assert server.terminate() == 0  # SIGTERM: the engine keeps its cached blocks on disk
    history += [{"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": "Once more, please."}]
    with running_http_server(model_path, *args, log_path=str(tmp_path / "second.log")) as (server, url):
        api = OpenAI(base_url=f"{url}/v1", api_key="none")
        second = api.chat.completions.create(model=model, messages=history, max_tokens=8, temperature=0)
        metrics = scrape(url)
        hits = metrics["pagedkv:kv_tier_hit_blocks_total"][(("model_name", model), ("tier", "disk"))]
        stats = subprocess.run([sys.executable, "-m", "pagedkv", "stats", "--address", server.address],
                               capture_output=True, text=True, timeout=60)
        assert server.terminate() == 0
    loaded = load_model(model_path)
    encode = lambda messages: loaded.tokenizer.encode(  # noqa: E731
        loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True), add_special_tokens=False)
    assert hits >= len(encode(history[:1])) // 4  # every full block of the first turn's prompt
    assert metrics["pagedkv:prefix_cache_hits_total"][(("model_name", model),)] >= 4 * hits
    assert "disk tier" in stats.stdout and f"{int(hits)} hits" in stats.stdout
    engine = LLMEngine(EngineConfig(block_size=4, num_device_blocks=64, enable_prefix_caching=False), loaded)
    prompt = encode(history)
    assert loaded.tokenizer.decode(generate(engine, [prompt], SamplingParams(max_tokens=8, temperature=0))[0]) \
        == second.choices[0].message.content
