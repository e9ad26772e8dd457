"""KV events: what each KV tier of this engine stores and removes, published on a ZeroMQ PUB
socket (`--kv-events-endpoint`), in the spirit of vLLM's KV events, so that a router knows which
engine holds which prefix (docs/protocol.md, "KV events").

Every change of a tier's set of blocks is one event: the device's and the host's prefix caches
(a block indexed or dropped, however it is dropped), the disk tier's index (written, found,
evicted, damaged) and this engine's view of the remote tier (blocks it wrote or found there,
and those it found gone). Events are batched per engine step; each batch carries the engine's
instance id and a sequence number that grows by one per batch, so that a subscriber sees a gap
(or another instance: the engine restarted) and resynchronises from a snapshot (`kv_state`
on the engine's socket), which names the batch it follows. The first batch clears every tier
(AllBlocksCleared) and stores what the tiers held at start (the disk's files), so that a
subscriber that saw the stream from its start needs no snapshot.

Message: three frames, the topic `kv-events`, the sequence number (8 bytes, big-endian), and a
msgpack map {"engine", "seq", "ts", "block_size", "events": [{"type": "stored" | "removed" |
"cleared", "tier", "hashes": [32-byte chained hashes]}]}.
"""
from __future__ import annotations

import threading
import time
import uuid

import msgpack
import zmq

from pagedkv.kvcache.allocator import CachedBlock, Device

TOPIC = b"kv-events"
TIERS = ("device", "host", "disk", "remote")


class KVEvents:
    def __init__(self, endpoint: str, block_manager, stores: dict) -> None:
        self.engine = uuid.uuid4().hex
        self.block_size = block_manager.block_size
        self.context = zmq.Context.instance()
        self.socket = self.context.socket(zmq.PUB)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.SNDHWM, 100_000)
        try:
            self.socket.bind(endpoint)
        except zmq.ZMQError as e:
            self.socket.close()
            raise ValueError(f"cannot bind the KV events socket to {endpoint}: {e}") from None
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.seq = 0
        self._lock = threading.Lock()
        self._events: list[dict] = []
        self._sources = {"device": lambda: block_manager.pools[Device.DEVICE].hash_table().keys(),
                         "host": lambda: block_manager.pools[Device.CPU].hash_table().keys()}
        for tier, device in (("device", Device.DEVICE), ("host", Device.CPU)):
            block_manager.pools[device].listeners.append(self._pool_listener(tier))
        for name, tier in stores.items():
            if name in ("disk", "remote"):
                tier.listener = self._tier_listener(name)
                self._sources[name] = (lambda t=tier: list(t._index)) if name == "disk" else tier.held
        for tier in self._sources:
            self._events.append({"type": "cleared", "tier": tier, "hashes": []})
            held = list(self._sources[tier]())
            if held:
                self._events.append({"type": "stored", "tier": tier, "hashes": held})

    def _pool_listener(self, tier: str):
        def changed(stored: bool, block: int, entry: CachedBlock) -> None:
            self.record(tier, stored, [entry.block_hash])
        return changed

    def _tier_listener(self, tier: str):
        def changed(stored: bool, hashes: list[bytes]) -> None:
            self.record(tier, stored, hashes)
        return changed

    def record(self, tier: str, stored: bool, hashes: list[bytes]) -> None:
        kind = "stored" if stored else "removed"
        with self._lock:
            last = self._events[-1] if self._events else None
            if last is not None and last["type"] == kind and last["tier"] == tier:
                last["hashes"].extend(hashes)  # one event per run of the same change
            else:
                self._events.append({"type": kind, "tier": tier, "hashes": list(hashes)})

    def publish(self) -> None:
        """Sends the events recorded since the last batch (nothing when there are none)."""
        with self._lock:
            if not self._events:
                return
            events, self._events = self._events, []
            self.seq += 1
            batch = {"engine": self.engine, "seq": self.seq, "ts": time.time(), "block_size": self.block_size,
                     "events": events}
            try:
                self.socket.send_multipart([TOPIC, self.seq.to_bytes(8, "big"),
                                            msgpack.packb(batch, use_bin_type=True)], flags=zmq.NOBLOCK)
            except zmq.Again:
                pass  # no room for it: subscribers see the gap and take a snapshot

    def state(self) -> dict:
        """A snapshot of every tier's blocks after batch `seq` (recorded events are sent first)."""
        self.publish()
        with self._lock:
            return {"engine": self.engine, "seq": self.seq, "block_size": self.block_size,
                    "tiers": {tier: list(source()) for tier, source in self._sources.items()}}

    def describe(self) -> dict:
        return {"endpoint": self.endpoint, "engine": self.engine, "seq": self.seq, "block_size": self.block_size}

    def close(self) -> None:
        self.publish()
        self.socket.close()
