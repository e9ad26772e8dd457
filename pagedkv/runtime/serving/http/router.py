"""The gateway's router over several engines (`pagedkv api --address A --address B ...`).

Each request goes to the engine whose cached prefix for it is longest, balanced against load:

- what each engine holds comes from its KV events (docs/protocol.md): a SUB socket per engine,
  replayed into a `KVIndex`, with a `kv_state` snapshot whenever a batch does not follow;
- the request's prompt is tokenized as the server tokenizes it (the model's tokenizer, a chat
  rendered with its template) and hashed into chained block hashes as the engine hashes them;
- the engine whose device or host tier holds the most leading blocks of the prompt gets it when
  that is at least half of the prompt's blocks and its load (requests in flight there: the larger
  of the gateway's count and the engine's own, from its health reply) is within LOAD_SLACK of the
  least loaded engine's (a prefix shared by every prompt, such as a chat template's head, does
  not pull everything to one engine);
- else a chat goes back to the engine its session last went to, within the same slack (a chat's
  session is its messages up to the first user message: a returning chat whose blocks the events
  do not show, or no longer show, still goes home);
- else the least loaded engine, ties round-robin.

Health, two ways:
- the connection: ZeroMQ heartbeats on each engine's socket (a ping every HEARTBEAT_S seconds,
  answered by the engine's I/O thread even in the middle of a long step; none for 4 intervals
  drops the connection). A dropped connection (the process died: at once; it hangs or cannot be
  reached: within 1 s) takes the engine out: no request is sent there, and those in flight there
  end at once with a 503 (`engine_unavailable`);
- the engine loop: `health` every HEALTH_INTERVAL_S seconds, each with HEALTH_TIMEOUT_S to answer
  (it answers between steps). An engine that leaves MISSED_PROBES in a row unanswered (a loop
  stuck for about 6 s) gets no new requests; those in flight there keep their own timeout.
An engine comes back with the first answered probe, and its index is rebuilt from a snapshot.
"""
from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import time
from dataclasses import dataclass, field

import zmq
import zmq.asyncio
from zmq.utils.monitor import recv_monitor_message

from pagedkv.runtime.serving.client import AsyncClient, ServerError
from pagedkv.runtime.serving.kv_index import TOPIC, KVIndex, decode_batch, load_tokenizer, prompt_hashes

log = logging.getLogger("pagedkv.router")

HEARTBEAT_S = 0.25         # ZeroMQ pings on each engine's socket; 4 unanswered drop the connection
HEALTH_INTERVAL_S = 0.5
HEALTH_TIMEOUT_S = 2.0
MISSED_PROBES = 3          # unanswered probes in a row that stop new requests to an engine
# Requests in flight beyond the least loaded engine's that a prefix hit is worth. A request joins
# a running batch (continuous batching), so a few more in flight cost a little per step, while a
# miss recomputes the whole history: on tools/bench_router's multi-turn workload (3 engines, 4
# clients) a slack of 1 computed 14,062 prefill tokens, 4 computed 8,606 and 1,000 8,590 (the
# floor), returning turns' TTFT p50 0.84 s, 0.36 s and 0.43 s. SGLang's router waits for a
# larger imbalance still (32 requests) before it balances instead.
LOAD_SLACK = 4
MAX_SESSIONS = 100_000


@dataclass
class Engine:
    address: str
    client: AsyncClient
    healthy: bool = False
    missed: int = 0
    in_flight: int = 0           # this gateway's requests there
    reported_in_flight: int = 0  # the engine's own count (all its clients)
    index: KVIndex = field(default_factory=KVIndex)
    events_endpoint: str | None = None
    routed: int = 0              # requests sent there
    routed_prefix_blocks: int = 0  # blocks the index said it held for them
    failed_requests: int = 0     # requests in flight there when it was taken out
    downs: int = 0
    down_since: float | None = None
    tasks: list[asyncio.Task] = field(default_factory=list)

    @property
    def load(self) -> int:
        return max(self.in_flight, self.reported_in_flight)


class Router:
    def __init__(self, addresses: list[str], timeout: float, curve_keys: str | None, client_name: str,
                 load_slack: int = LOAD_SLACK, prefix_aware: bool = True) -> None:
        self.engines = [Engine(a, AsyncClient(a, timeout, curve_keys, client_name, heartbeat_s=HEARTBEAT_S))
                        for a in addresses]
        self.load_slack, self.prefix_aware = load_slack, prefix_aware
        self.context = zmq.asyncio.Context.instance()
        self.tokenizer = None
        self.model: str | None = None
        self.block_size: int | None = None
        self.health: dict | None = None  # the last health reply of any engine
        self.sessions: dict[bytes, str] = {}
        self._turn = itertools.count()
        self._ready = asyncio.Event()

    # -- lifecycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        for engine in self.engines:
            engine.tasks = [asyncio.ensure_future(self._probe_loop(engine)),
                            asyncio.ensure_future(self._watch_connection(engine))]

    async def stop(self) -> None:
        for engine in self.engines:
            for task in engine.tasks:
                task.cancel()
            await asyncio.gather(*engine.tasks, return_exceptions=True)
            await engine.client.close()

    async def wait_ready(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except TimeoutError:
            return False
        return True

    # -- health -----------------------------------------------------------------------------------
    async def _probe_loop(self, engine: Engine) -> None:
        while True:
            started = time.monotonic()
            try:
                health = await engine.client.health(timeout=HEALTH_TIMEOUT_S)
                ok = health.get("status") == "ok"
            except (TimeoutError, ServerError):
                health, ok = None, False
            if ok:
                engine.missed = 0
                engine.reported_in_flight = int(health.get("in_flight", 0))
                if not engine.healthy:
                    await self._up(engine, health)
            else:
                engine.missed += 1
                if engine.healthy and health is not None:  # stopping: what is in flight ends with its reply
                    self._down(engine, f"it is {health.get('status')}", fail=False)
                elif engine.healthy and engine.missed >= MISSED_PROBES:
                    self._down(engine, f"it left {engine.missed} health probes unanswered", fail=False)
            await asyncio.sleep(max(HEALTH_INTERVAL_S - (time.monotonic() - started), 0.0))

    async def _watch_connection(self, engine: Engine) -> None:
        """A dropped connection (the engine's process died) takes the engine out at once."""
        monitor = engine.client.socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        try:
            while True:
                event = await recv_monitor_message(monitor)
                if event["event"] == zmq.EVENT_DISCONNECTED and engine.healthy:
                    self._down(engine, "its connection dropped")
        finally:
            engine.client.socket.disable_monitor()
            monitor.close()

    async def _up(self, engine: Engine, health: dict) -> None:
        self.health = health
        if self.model is None:
            self.model = str(health.get("model"))
            self.tokenizer = await asyncio.to_thread(load_tokenizer, self.model)
            if self.tokenizer is None:
                log.warning("the router cannot load the tokenizer of %s: it routes by load and session only",
                            self.model)
        events = health.get("kv_events")
        if events and self.prefix_aware:
            self.block_size = events.get("block_size", self.block_size)
            endpoint = _reachable(events["endpoint"], engine.address)
            if endpoint != engine.events_endpoint:
                if engine.events_endpoint is not None:
                    engine.tasks[2].cancel()
                    engine.tasks.pop(2)
                engine.events_endpoint = endpoint
                engine.tasks.append(asyncio.ensure_future(self._follow_events(engine)))
            engine.index.seq = None  # rebuilt from a snapshot
            await self._resync(engine)
        engine.healthy, engine.down_since = True, None
        log.info("engine %s is in service", engine.address)
        self._ready.set()

    def _down(self, engine: Engine, why: str, fail: bool = True) -> None:
        """Out of rotation; with `fail`, what is in flight there ends now with a 503."""
        engine.healthy, engine.down_since = False, time.monotonic()
        engine.downs += 1
        engine.reported_in_flight = 0
        failed = 0
        if fail:
            engine.client.fail_all("unavailable", f"the engine at {engine.address} was taken out of service: {why}")
            failed = engine.in_flight  # the generate requests among those (not the health probe)
            engine.failed_requests += failed
        log.warning("engine %s taken out of service (%s); %d request(s) in flight there end with 503", engine.address,
                    why, failed)

    # -- events -----------------------------------------------------------------------------------
    async def _follow_events(self, engine: Engine) -> None:
        socket = self.context.socket(zmq.SUB)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.RCVHWM, 100_000)
        socket.setsockopt(zmq.SUBSCRIBE, TOPIC)
        socket.connect(engine.events_endpoint)
        try:
            while True:
                try:
                    batch = decode_batch(await socket.recv_multipart())
                except ValueError:
                    continue
                if not engine.index.apply(batch):
                    await self._resync(engine)
        finally:
            socket.close()

    async def _resync(self, engine: Engine) -> None:
        try:
            engine.index.load(await engine.client.kv_state(timeout=HEALTH_TIMEOUT_S * 4))
        except (TimeoutError, ServerError) as e:
            log.info("no KV snapshot from %s (%s); it is asked again on the next gap", engine.address, e)

    # -- routing ----------------------------------------------------------------------------------
    async def choose(self, source: dict) -> tuple[Engine, int]:
        """The engine for one engine request, and the prompt blocks it holds."""
        healthy = [e for e in self.engines if e.healthy]
        if not healthy:
            raise LookupError("no engine is in service")
        hashes: list[bytes] = []
        if self.prefix_aware and self.block_size and (self.tokenizer is not None or "prompt_ids" in source):
            try:
                hashes = await asyncio.to_thread(prompt_hashes, self.tokenizer, source, self.block_size)
            except Exception:  # a chat the template cannot render: the engine says so
                hashes = []
        session = _session(source)
        last = self.sessions.get(session) if session else None
        turn = next(self._turn)
        rotated = healthy[turn % len(healthy):] + healthy[:turn % len(healthy)]  # ties: round-robin
        least = min(e.load for e in healthy)
        idle = [e for e in rotated if e.load == least]
        best, best_blocks = idle[0], 0
        if not self.prefix_aware:
            best = rotated[0]  # plain round-robin, the baseline
        else:
            blocks = {e.address: e.index.prefix_blocks(hashes) if hashes and not e.index.stale else 0 for e in rotated}
            holder = max(rotated, key=lambda e: (blocks[e.address], -e.load))
            returning = next((e for e in rotated if e.address == last), None)
            if blocks[holder.address] * 2 >= len(hashes) > 0 and holder.load <= least + self.load_slack:
                best = holder  # holds most of the prompt: worth a little queueing
            elif returning is not None and returning.load <= least + self.load_slack:
                best = returning  # a chat whose blocks the events do not show (yet)
            best_blocks = blocks[best.address]
        if session:
            self.sessions[session] = best.address
            if len(self.sessions) > MAX_SESSIONS:
                self.sessions.pop(next(iter(self.sessions)))
        best.routed += 1
        best.routed_prefix_blocks += best_blocks
        return best, best_blocks

    def describe(self) -> list[dict]:
        now = time.monotonic()
        return [{"address": e.address, "healthy": e.healthy, "in_flight": e.in_flight, "load": e.load,
                 "routed": e.routed, "routed_prefix_blocks": e.routed_prefix_blocks,
                 "failed_requests": e.failed_requests, "downs": e.downs,
                 "down_for_s": None if e.down_since is None else now - e.down_since,
                 "indexed_blocks": {t: len(s) for t, s in e.index.tiers.items()}, "index_gaps": e.index.gaps}
                for e in self.engines]


def _session(source: dict) -> bytes | None:
    """A chat's session: its messages up to and including the first user message."""
    messages = source.get("messages")
    if not messages:
        return None
    h = hashlib.blake2b(digest_size=16)
    for message in messages:
        h.update(str(message.get("role")).encode() + b"\0" + str(message.get("content")).encode() + b"\0")
        if message.get("role") == "user":
            return h.digest()
    return None


def _reachable(endpoint: str, engine_address: str) -> str:
    """An events endpoint bound to every interface, as reachable from here: the engine's host."""
    for wildcard in ("0.0.0.0", "[::]", "*"):
        if f"//{wildcard}:" in endpoint:
            host = engine_address.split("//", 1)[1].rsplit(":", 1)[0]
            return endpoint.replace(wildcard, host, 1)
    return endpoint
