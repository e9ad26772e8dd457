"""KV events: the stream an engine publishes, replayed into a fresh subscriber, reproduces each
tier's set of blocks exactly (device, host, disk and remote, under eviction, demotion and
preemption); a subscriber that joins late sees the gap, loads a snapshot and follows from it;
over the wire, the server answers `kv_state` and names its events endpoint in `health`."""
import random
import time

import pytest
import zmq
from redis_server import running_redis
from test_kv_tiers import generate, long_prompts

from pagedkv.runtime.engine.config import EngineConfig
from pagedkv.runtime.engine.llm_engine import LLMEngine
from pagedkv.runtime.engine.sampling_params import SamplingParams
from pagedkv.runtime.serving.kv_index import KVIndex, decode_batch

pytestmark = [pytest.mark.timeout(600), pytest.mark.usefixtures("one_torch_thread", "always_load")]


class Subscriber:
    def __init__(self, endpoint: str) -> None:
        self.socket = zmq.Context.instance().socket(zmq.SUB)
        self.socket.setsockopt(zmq.SUBSCRIBE, b"kv-events")
        self.socket.connect(endpoint)
        self.batches: list[dict] = []

    def drain(self, wait: float = 0.2) -> list[dict]:
        """Every batch received so far (a new list)."""
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if self.socket.poll(20):
                self.batches.append(decode_batch(self.socket.recv_multipart()))
                deadline = time.monotonic() + wait
        return list(self.batches)


def snapshot_sets(engine: LLMEngine) -> dict[str, set[bytes]]:
    return {tier: set(hashes) for tier, hashes in engine.kv_events.state()["tiers"].items()}


def truth(engine: LLMEngine) -> dict[str, set[bytes]]:
    """What each tier holds, read from the tiers themselves."""
    from pagedkv.kvcache.allocator import Device

    bm = engine.block_manager
    sets = {"device": set(bm.pools[Device.DEVICE].hash_table()), "host": set(bm.pools[Device.CPU].hash_table())}
    stores = engine.executor.stores
    if "disk" in stores:
        sets["disk"] = set(stores["disk"]._index)
    if "remote" in stores:
        sets["remote"] = set(stores["remote"].held())
    return sets


def workload(engine: LLMEngine, rounds: int, seed: int) -> None:
    rng = random.Random(seed)
    heads = long_prompts(6, 20, seed=seed)
    for r in range(rounds):
        prompts = [rng.choice(heads) + [rng.randrange(3, 500) for _ in range(rng.randint(1, 14))] for _ in range(5)]
        generate(engine, prompts, SamplingParams(max_tokens=rng.randint(1, 8), temperature=0, ignore_eos=True))
        engine.executor.stores.get("remote") and engine.executor.stores["remote"].wait_idle(10)
        engine.executor.stores.get("disk") and engine.executor.stores["disk"].wait_idle(10)


def test_the_replayed_stream_reproduces_every_tier(loaded, tmp_path):
    with running_redis(tmp_path) as redis:
        config = EngineConfig(block_size=4, num_device_blocks=30, swap_space_gib=0.00002, kv_host_cache_gb=0.00004,
                              kv_disk_cache_dir=str(tmp_path / "kv"), kv_disk_cache_gb=0.00008,
                              kv_remote_url=redis.url, kv_events_endpoint="tcp://127.0.0.1:*", check_kv=True,
                              max_num_batched_tokens=32)
        engine = LLMEngine(config, loaded)
        sub = Subscriber(engine.kv_events.endpoint)
        time.sleep(0.3)  # the subscription reaches the publisher before the first batch
        workload(engine, 6, seed=1)
        engine.step() if engine.has_unfinished() else engine.kv_events.publish()
        late = Subscriber(engine.kv_events.endpoint)  # joins now: it sees a gap first
        time.sleep(0.3)
        workload(engine, 4, seed=2)
        engine.kv_events.publish()
        replay = KVIndex()
        batches = sub.drain()
        assert batches[0]["seq"] == 1 and [b["seq"] for b in batches] == list(range(1, len(batches) + 1))
        for batch in batches:
            assert replay.apply(batch)
        expected = truth(engine)
        assert all(expected[t] for t in ("device", "host", "disk", "remote")), {t: len(s) for t, s in expected.items()}
        assert replay.tiers == expected
        assert snapshot_sets(engine) == expected
        kinds = {(e["type"], e["tier"]) for b in batches for e in b["events"]}
        assert {("removed", "device"), ("removed", "host"), ("removed", "disk")} <= kinds  # evictions happened

        # The late subscriber: the first batch it sees does not follow, so it loads a snapshot
        # (taken after some of its batches) and skips what the snapshot covers.
        follower = KVIndex()
        late_batches = late.drain()
        assert late_batches and late_batches[0]["seq"] > 1
        assert not follower.apply(late_batches[0]) and follower.stale
        follower.load(engine.kv_events.state())
        for batch in late_batches:
            assert follower.apply(batch)
        workload(engine, 2, seed=3)
        engine.kv_events.publish()
        new = late.drain()[len(late_batches):]
        assert new and new[0]["seq"] == follower.seq + 1
        for batch in new:
            assert follower.apply(batch)
        assert follower.tiers == truth(engine) and not follower.gaps
        engine.close()


def test_the_server_answers_kv_state_and_names_its_endpoint(model_path, tmp_path):
    from server_process import running_server

    from pagedkv.runtime.serving.client import Client

    with running_server(model_path, "--block-size", "4", "--num-device-blocks", "64", "--kv-events-endpoint",
                        "tcp://127.0.0.1:*", log_path=str(tmp_path / "server.log")) as server:
        with Client(server.address, 30) as client:
            endpoint = client.health()["kv_events"]["endpoint"]
            sub = Subscriber(endpoint)
            time.sleep(0.3)
            client.generate(prompt_ids=list(range(3, 40)), max_tokens=4, temperature=0)
            batches = sub.drain(0.5)
            state = client.kv_state()
        index = KVIndex()
        index.load(state)
        assert len(index.tiers["device"]) == (37 + 4 - 1) // 4  # the prompt's and the answer's full blocks
        assert batches and batches[-1]["seq"] == state["seq"]
        assert server.terminate() == 0
