"""The remote tier: KV blocks in a Redis server that many engines share.

A block is one Redis string under `pagedkv:<fingerprint>:<chained hash>`, the key the disk tier
uses for its file (the model's fingerprint and the block's hash are the same in every process),
holding the disk tier's encoding (`encode_block`: a header with fingerprint, hash, parent, token
ids, payload length and CRC-32, then the block's bytes). A value that is missing, truncated,
damaged or another model's is a miss; a damaged one is overwritten when the block is stored
again. Redis evicts by its own `maxmemory-policy` (allkeys-lru suits it): the tier never deletes.

When blocks are written: every block the device caches (a full block whose K/V a step computed)
is written through, once per engine (`wants` says no for a block this engine stored or found
there lately), so that another engine finds a prefix while the engine that computed it still
runs; and, as for the disk, every block a memory tier evicts and every cached block at close
that the tier lacks.

Bounded waits. `lookup` runs on the scheduler's thread, so it is one pipelined round trip of
EXISTS for the blocks the tier's memory cannot answer (a block found or stored in the last
`PRESENT_TTL_S` seconds counts as held, one missed in the last `ABSENT_TTL_S` as missing), on a
connection whose connect and read timeouts are `timeout_s` (50 ms by default): a lookup never
waits longer than twice that. Reads and writes run on two threads of their own, with
`io_timeout_s` (2 s) per round trip, and poll() collects them without waiting. Any failure
(refused, timed out, an error reply) opens a circuit breaker: for `retry_s` seconds every lookup
is a miss without asking, stores are dropped and reads fail at once; one warning is logged when
the server is lost and one line when it answers again. After `retry_s` the next lookup asks
again (and closes the breaker when it is answered).
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from typing import Callable

from pagedkv.kvcache.disk_tier import BlockFileError, FinishedWork, Loaded, TierStats, decode_block, encode_block

log = logging.getLogger(__name__)

PRESENT_TTL_S = 10.0   # a block stored or found this recently is taken as held without asking
ABSENT_TTL_S = 0.25    # a block missed this recently is taken as missing without asking
MEMO_BLOCKS = 200_000  # at most this many hashes remembered as held
MAX_LOOKUP_BLOCKS = 512  # a lookup asks about at most this many blocks in one round trip
MAX_PENDING_STORES = 256  # writes queued beyond this are dropped (counted in dropped_stores)
STORE_BATCH = 32  # writes sent in one pipeline


def redacted(url: str) -> str:
    """The URL without a password."""
    head, sep, tail = url.partition("://")
    if "@" in tail:
        tail = "***@" + tail.split("@", 1)[1]
    return head + sep + tail


class RemoteTier:
    name = "remote"
    write_through = True  # every block the device caches: other engines find it at once

    def __init__(self, url: str, fingerprint: str, block_bytes: int | None = None, timeout_s: float = 0.05,
                 io_timeout_s: float = 2.0, retry_s: float = 2.0, connect: Callable | None = None) -> None:
        """`connect(timeout)` makes a redis-py client (tests pass their own); by default one for
        `url` with the given socket timeouts and no retries."""
        self.url, self.fingerprint, self.block_bytes = url, fingerprint, block_bytes
        self.timeout_s, self.io_timeout_s, self.retry_s = timeout_s, io_timeout_s, retry_s
        self.prefix = f"pagedkv:{fingerprint[:32]}:".encode()
        self.stats = TierStats()
        self.failures = 0
        # (stored, block hashes): blocks this engine saw stored there, or found missing when it
        # had believed them held (Redis evicted them). The KV events listen here.
        self.listener: Callable[[bool, list[bytes]], None] | None = None
        self._connect = connect or self._redis
        self._lookups = self._connect(timeout_s)
        self._present: OrderedDict[bytes, float] = OrderedDict()  # hash -> when it was last known held
        self._absent: dict[bytes, float] = {}  # hash -> when it was last missed
        self._storing: set[bytes] = set()
        self._lock = threading.Lock()  # the breaker's state, shared with the I/O threads
        self._down_until = 0.0
        self._down = False
        self.finished = FinishedWork()  # the I/O threads' results, for `poll`
        self._loads: queue.SimpleQueue = queue.SimpleQueue()
        self._stores: queue.SimpleQueue = queue.SimpleQueue()
        self._pending_stores = 0  # queued writes poll() has not taken in
        self._in_io = 0  # reads and writes queued that the I/O threads have not finished
        self._threads = [threading.Thread(target=self._load_loop, name="pagedkv-remote-load", daemon=True),
                         threading.Thread(target=self._store_loop, name="pagedkv-remote-store", daemon=True)]
        for thread in self._threads:
            thread.start()
        self._closed = False

    def _redis(self, timeout: float):
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        return redis.Redis.from_url(self.url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                    retry=Retry(NoBackoff(), 0), retry_on_timeout=False, health_check_interval=0)

    def key(self, block_hash: bytes) -> bytes:
        return self.prefix + block_hash.hex().encode()

    # -- the breaker ------------------------------------------------------------------------------
    @property
    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _failed(self, error: Exception) -> None:
        with self._lock:
            self.failures += 1
            self._down_until = time.monotonic() + self.retry_s
            if not self._down:
                self._down = True
                log.warning("the KV remote tier %s does not answer (%s: %s): its lookups count as misses and "
                            "nothing is stored there; asking again every %g s", redacted(self.url),
                            type(error).__name__, error, self.retry_s)

    def _answered(self) -> None:
        if self._down:
            with self._lock:
                if self._down:
                    self._down = False
                    log.warning("the KV remote tier %s answers again", redacted(self.url))

    # -- lookups ----------------------------------------------------------------------------------
    def lookup(self, hashes: list[bytes], parent: bytes = b"") -> int:
        """How many leading blocks of the chain `hashes` the server holds (as far as one bounded
        round trip, or this tier's memory of recent answers, can tell)."""
        if not hashes or not self.available:
            return 0
        now = time.monotonic()
        held = 0
        for block_hash in hashes:
            seen = self._present.get(block_hash)
            if seen is None or now - seen > PRESENT_TTL_S:
                break
            held += 1
        rest = hashes[held:held + MAX_LOOKUP_BLOCKS]
        if not rest:
            return held
        missed = self._absent.get(rest[0])
        if missed is not None and now - missed < ABSENT_TTL_S:
            return held
        try:
            pipe = self._lookups.pipeline(transaction=False)
            for block_hash in rest:
                pipe.exists(self.key(block_hash))
            found = pipe.execute()
        except Exception as e:  # redis-py's ConnectionError, TimeoutError, ResponseError, ...
            self._failed(e)
            return 0
        self._answered()
        for block_hash, exists in zip(rest, found):
            if not exists:
                self._absent[block_hash] = now
                if len(self._absent) > MEMO_BLOCKS:
                    self._absent.clear()
                self._forget([block_hash])
                break
            self._remember(block_hash, now)
            held += 1
        return held

    def _remember(self, block_hash: bytes, now: float) -> None:
        new = block_hash not in self._present
        self._present[block_hash] = now
        self._present.move_to_end(block_hash)
        self._absent.pop(block_hash, None)
        if new and self.listener is not None:
            self.listener(True, [block_hash])
        while len(self._present) > MEMO_BLOCKS:
            old, _ = self._present.popitem(last=False)
            if self.listener is not None:
                self.listener(False, [old])

    def _forget(self, hashes: list[bytes]) -> None:
        gone = [h for h in hashes if self._present.pop(h, None) is not None]
        if gone and self.listener is not None:
            self.listener(False, gone)

    def __contains__(self, block_hash: bytes) -> bool:
        return block_hash in self._present

    # -- loads ------------------------------------------------------------------------------------
    def prepare_load(self, blocks: list[tuple[bytes, tuple[int, ...]]]) -> None:
        """Starts reading the blocks (hash, token ids) in one round trip; `poll` returns each."""
        with self._lock:
            self._in_io += 1
        self._loads.put(list(blocks))

    def _load_loop(self) -> None:
        client = None
        while (blocks := self._loads.get()) is not None:
            started = time.perf_counter()
            if not self.available:
                values, error = [None] * len(blocks), "the server does not answer"
            else:
                try:
                    client = client or self._connect(self.io_timeout_s)
                    values, error = client.mget([self.key(h) for h, _ in blocks]), None
                    self._answered()
                except Exception as e:
                    self._failed(e)
                    client, values, error = None, [None] * len(blocks), f"{type(e).__name__}: {e}"
            each = (time.perf_counter() - started) / max(len(blocks), 1)
            for (block_hash, token_ids), value in zip(blocks, values):
                self.finished.put(("load", *self._decode(block_hash, token_ids, value, error), each))
            with self._lock:
                self._in_io -= 1

    def _decode(self, block_hash: bytes, token_ids: tuple[int, ...], value: bytes | None,
                error: str | None) -> tuple[bytes, bytes | None, dict]:
        if value is None:
            return block_hash, None, {"missing": True, "error": error or "not there (evicted)"}
        try:
            payload, header = decode_block(value, self.fingerprint, block_hash, token_ids)
            if self.block_bytes is not None and len(payload) != self.block_bytes:
                raise BlockFileError(f"a block of {len(payload)} bytes, not {self.block_bytes}")
        except BlockFileError as e:
            return block_hash, None, {"error": str(e)}
        return block_hash, payload, header

    # -- stores -----------------------------------------------------------------------------------
    def wants(self, block_hash: bytes) -> bool:
        """Whether a store of this block would add anything: the server answers, this engine
        neither stored nor found it lately, it is not being written, and the queue has room."""
        if not self.available or block_hash in self._storing or self._pending_stores >= MAX_PENDING_STORES:
            return False
        seen = self._present.get(block_hash)
        return seen is None or time.monotonic() - seen > PRESENT_TTL_S

    def prepare_store(self, block_hash: bytes, token_ids: tuple[int, ...], payload: bytes,
                      parent: bytes = b"", extra: dict | None = None) -> list[bytes]:
        """Queues one block's write; it counts as held once `poll` has seen it done. Returns the
        blocks evicted to make room: none, Redis evicts by itself."""
        if not self.wants(block_hash):
            if self.available and self._pending_stores >= MAX_PENDING_STORES:
                self.stats.dropped_stores += 1
            return []
        self._storing.add(block_hash)
        self._pending_stores += 1
        with self._lock:
            self._in_io += 1
        self._stores.put((block_hash, encode_block(self.fingerprint, block_hash, token_ids, payload, parent, extra)))
        return []

    def _store_loop(self) -> None:
        client = None
        while True:
            item = self._stores.get()
            if item is None:
                return
            batch = [item]
            while len(batch) < STORE_BATCH:
                try:
                    item = self._stores.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._stores.put(None)  # seen after this batch
                    break
                batch.append(item)
            started = time.perf_counter()
            ok = False
            if self.available:
                try:
                    client = client or self._connect(self.io_timeout_s)
                    pipe = client.pipeline(transaction=False)
                    for block_hash, data in batch:
                        pipe.set(self.key(block_hash), data)
                    pipe.execute()
                    ok = True
                    self._answered()
                except Exception as e:
                    self._failed(e)
                    client = None
            each = (time.perf_counter() - started) / len(batch)
            for block_hash, data in batch:
                self.finished.put(("store", block_hash, ok, len(data), each))
            with self._lock:
                self._in_io -= len(batch)

    # -- results ----------------------------------------------------------------------------------
    def poll(self) -> list[Loaded]:
        """Takes in the I/O threads' finished work: writes done count as held, reads are returned
        (a missing or bad value's block with payload None)."""
        loaded = []
        now = time.monotonic()
        for item in self.finished.take():
            if item[0] == "store":
                _, block_hash, ok, size, seconds = item
                self._storing.discard(block_hash)
                self._pending_stores -= 1
                self.stats.store_seconds += seconds
                if ok:
                    self.stats.stored_blocks += 1
                    self.stats.stored_bytes += size
                    self._remember(block_hash, now)
                else:
                    self.stats.dropped_stores += 1
                continue
            _, block_hash, payload, header, seconds = item
            self.stats.load_seconds += seconds
            if payload is None:
                if not header.get("missing"):
                    self.stats.errors += 1  # damaged, truncated or another model's
                self._forget([block_hash])
            else:
                self.stats.loaded_bytes += len(payload)
            loaded.append(Loaded(block_hash, payload, header, seconds))
        return loaded

    def describe(self) -> dict:
        return {**self.stats.as_dict(), "cached_blocks": len(self._present), "available": self.available,
                "failures": self.failures}

    def held(self) -> list[bytes]:
        """The blocks this engine knows the server held lately (its part of the shared tier)."""
        return list(self._present)

    def wait_idle(self, timeout: float | None = None) -> None:
        """Blocks until the writes and reads queued so far are done (tests, shutdown); poll()
        then takes them in."""
        deadline = time.monotonic() + (timeout if timeout is not None else 3600)
        while self._in_io > 0 and time.monotonic() < deadline:
            time.sleep(0.002)

    def close(self) -> None:
        """Finishes the queued writes (each bounded by the I/O timeout), then stops."""
        if self._closed:
            return
        self._closed = True
        self._loads.put(None)
        self._stores.put(None)
        for thread in self._threads:
            thread.join(timeout=max(self.io_timeout_s * 4, 5.0))
        self.poll()
        for client in (self._lookups,):
            try:
                client.close()
            except Exception:
                pass
