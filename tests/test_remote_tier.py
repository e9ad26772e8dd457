"""The shared remote tier on a real Redis server: one engine serves the prefixes another computed,
with the same tokens; missing, damaged and foreign values are misses; a Redis that dies or hangs
mid-workload costs hits, never a request or a stalled step, and its hits resume when it returns.
Every engine here runs the KV content checker (tests/conftest.py)."""
import logging
import random
import time

import pytest
from differential import assert_all_blocks_free
from redis_server import running_redis
from test_kv_tiers import generate, long_prompts

from pagedkv.kvcache.block_hash import ROOT, block_hash
from pagedkv.kvcache.remote_tier import RemoteTier
from pagedkv.runtime.engine.config import EngineConfig
from pagedkv.runtime.engine.llm_engine import LLMEngine
from pagedkv.runtime.engine.sampling_params import SamplingParams
from pagedkv.runtime.models.loader import load_model

pytestmark = [pytest.mark.timeout(600), pytest.mark.usefixtures("one_torch_thread", "always_load")]
BLOCK = 4


@pytest.fixture
def redis(tmp_path):
    with running_redis(tmp_path) as server:
        yield server


def remote(url: str, **kwargs) -> EngineConfig:
    args = dict(block_size=BLOCK, num_device_blocks=64, kv_remote_url=url, check_kv=True)
    args.update(kwargs)
    return EngineConfig(**args)


def settle(engine: LLMEngine) -> None:
    """The remote writes queued so far are done and counted."""
    tier = engine.executor.stores["remote"]
    tier.wait_idle(10)
    engine.block_manager.tiers.begin_step()


def tier_stats(engine: LLMEngine) -> dict:
    return engine.stats()["kv_tiers"]["remote"]


def test_engine_b_serves_the_prefix_engine_a_computed(loaded, redis):
    prompts = long_prompts(3, 41, seed=1)
    a = LLMEngine(remote(redis.url), loaded)
    expected = generate(a, prompts)
    settle(a)  # written through as A cached them: A still runs
    assert tier_stats(a)["stored_blocks"] >= 3 * 10
    b = LLMEngine(remote(redis.url), loaded)
    got = generate(b, prompts)
    stats = tier_stats(b)
    assert got == expected
    assert stats["hit_blocks"] == 3 * 10 and stats["errors"] == 0  # every full block but the last token's
    assert b.stats()["prefix_cache"]["prefill_tokens_computed"] == 3 * 1
    plain = LLMEngine(EngineConfig(block_size=BLOCK, num_device_blocks=64, enable_prefix_caching=False), loaded)
    assert generate(plain, prompts) == expected
    assert_all_blocks_free(b)
    for engine in (a, b, plain):
        engine.close()


def test_close_writes_what_the_cache_holds_and_keys_are_the_disk_tiers(loaded, redis, tmp_path):
    prompts = long_prompts(2, 17, seed=2)
    engine = LLMEngine(remote(redis.url, kv_disk_cache_dir=str(tmp_path / "kv"), kv_disk_cache_gb=0.05), loaded)
    generate(engine, prompts)
    assert list(engine.executor.stores) == ["disk", "remote"]  # looked up in this order
    engine.close()
    disk_names = {p.stem for p in (tmp_path / "kv").rglob("*.kvb")}
    keys = {k.decode().rsplit(":", 1)[1] for k in redis.client().keys("pagedkv:*")}
    first = block_hash(ROOT, tuple(prompts[0][:BLOCK])).hex()
    assert first in keys and first in disk_names
    assert disk_names <= keys  # the same names: fingerprint folder / key prefix + chained hash
    fingerprint = engine.executor.stores["disk"].fingerprint
    assert all(k.startswith(f"pagedkv:{fingerprint[:32]}:".encode()) for k in redis.client().keys("pagedkv:*"))


@pytest.mark.parametrize("damage", ["flip", "truncate", "foreign", "missing"])
def test_damaged_foreign_and_missing_values_are_misses(loaded, tiny_model, redis, damage):
    prompts = long_prompts(2, 33, seed=3)
    a = LLMEngine(remote(redis.url), loaded)
    expected = generate(a, prompts)
    a.close()
    client = redis.client()
    keys = sorted(client.keys("pagedkv:*"))
    assert keys
    if damage == "foreign":  # another model's engine finds nothing of this one's
        other = LLMEngine(remote(redis.url), load_model(tiny_model(num_layers=2, num_heads=4, num_kv_heads=2,
                                                                      seed=1)))
        generate(other, prompts)
        assert tier_stats(other)["hit_blocks"] == 0
        other.close()
        # and this model's key holding another model's value is a miss, not a load
        other_keys = set(client.keys("pagedkv:*")) - set(keys)
        foreign = client.get(sorted(other_keys)[0])
        for key in keys:
            client.set(key, foreign)
    for key in keys[::2] if damage != "foreign" else []:
        data = client.get(key)
        if damage == "missing":
            client.delete(key)
        else:
            client.set(key, data[: len(data) // 2] if damage == "truncate" else data[:-1] + bytes([data[-1] ^ 1]))
    b = LLMEngine(remote(redis.url), loaded)
    assert generate(b, prompts) == expected
    stats = tier_stats(b)
    if damage in ("flip", "truncate", "foreign"):
        assert stats["errors"] >= 1
    assert_all_blocks_free(b)
    settle(b)
    b.close()
    if damage in ("flip", "truncate"):  # recomputed and written again: whole from now on
        c = LLMEngine(remote(redis.url), loaded)
        assert generate(c, prompts) == expected and tier_stats(c)["errors"] == 0 and tier_stats(c)["hit_blocks"] > 0
        c.close()


def test_redis_killed_mid_workload_and_restarted(loaded, redis, caplog):
    """Every request finishes with the tokens of a run without the tier, one warning says Redis
    is gone, no step waits past the lookup bound, and hits resume once it is back."""
    rng = random.Random(7)
    heads = long_prompts(8, 24, seed=11)  # pairs of requests share a head, each on both engines;
    # after the restart (an empty Redis) the heads are new ones
    prompts = [heads[(i // 2) % 4 + (4 if i >= 16 else 0)] + [rng.randrange(3, 500) for _ in range(rng.randint(4, 12))] for i in range(24)]
    plain = LLMEngine(EngineConfig(block_size=BLOCK, num_device_blocks=64, enable_prefix_caching=False), loaded)
    expected = generate(plain, prompts)
    plain.close()
    engines = [LLMEngine(remote(redis.url, num_device_blocks=40), loaded) for _ in range(2)]
    got, steps = [], []
    caplog.set_level(logging.WARNING, logger="pagedkv.kvcache.remote_tier")
    for i, prompt in enumerate(prompts):
        if i == 8:
            redis.stop()
        if i == 16:
            redis.start()
            time.sleep(2.1)  # the breaker's retry interval
        engine = engines[i % 2]
        engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True), stream=False)
        while engine.has_unfinished():
            started = time.monotonic()
            for output in engine.step():
                if output.finished:
                    got.append(output.outputs[0].token_ids)
            steps.append(time.monotonic() - started)
        settle(engine)  # its writes are in before the other engine looks
        if i in (7, 15, 23):
            if i == 7:
                hits_before = sum(tier_stats(e)["hit_blocks"] for e in engines)
            if i == 15:
                hits_down = sum(tier_stats(e)["hit_blocks"] for e in engines)
    assert got == expected
    warnings = [r for r in caplog.records if "does not answer" in r.getMessage()]
    assert len(warnings) == 2, [r.getMessage() for r in caplog.records]  # one per engine
    assert any("answers again" in r.getMessage() for r in caplog.records)
    hits_after = sum(tier_stats(e)["hit_blocks"] for e in engines)
    assert hits_before > 0 and hits_down == hits_before and hits_after > hits_down
    assert max(steps) < 60.0  # no step hung on the lost server (its bound is a benchmark's figure)
    for engine in engines:
        assert_all_blocks_free(engine)
        engine.close()


def test_a_hung_redis_bounds_the_lookup(redis):
    """SIGSTOP: connections open, no answers. A lookup returns within twice its timeout, a miss,
    and the next ones do not ask for a while."""
    tier = RemoteTier(redis.url, "f" * 64, timeout_s=0.05, retry_s=0.5)
    hashes = [bytes([i]) * 32 for i in range(4)]
    assert tier.lookup(hashes) == 0 and tier.available
    redis.pause()
    try:
        assert tier.lookup(hashes[1:]) == 0  # a miss when the socket's timeout runs out
        assert not tier.available
        asked = []
        real_pipeline = tier._lookups.pipeline
        tier._lookups.pipeline = lambda *args, **kwargs: asked.append(1) or real_pipeline(*args, **kwargs)
        assert tier.lookup(hashes) == 0 and not asked  # the breaker is open: the server is not asked
        tier._lookups.pipeline = real_pipeline
        assert not tier.wants(hashes[0])
    finally:
        redis.resume()
    time.sleep(0.6)
    tier.prepare_store(hashes[0], (1, 2, 3, 4), b"x" * 16)
    tier.wait_idle(5)
    tier.poll()
    assert tier.lookup(hashes) == 1 and tier.available
    tier.close()


def test_config_checks_the_url():
    with pytest.raises(ValueError, match="redis://"):
        EngineConfig(kv_remote_url="http://localhost:6379")
    with pytest.raises(ValueError, match="prefix caching"):
        EngineConfig(kv_remote_url="redis://127.0.0.1:6379/0", enable_prefix_caching=False)
