"""The tiers below the device pool, as the block manager sees them: where a prefix block that
the device does not hold can be found, where an evicted block goes, and what the executor must
copy for them this step.

- Host tier: the CPU pool, the one the preemption swap uses (one allocator, one accounting).
  It keeps a prefix cache of its own (hash -> block, least recently used first): a block the
  device evicts is copied there (demoted) instead of dropped, unless the disk (a store tier
  filled by evictions) holds it already: the two hold different blocks, so their sizes add up
  (a block read back from the disk and evicted again would otherwise take host room twice
  over). A swapped-out group's
  complete blocks stay there after it comes back. Its cached blocks count as free, so swapping
  takes them back when it needs the room, the least recently used first.
- Store tiers below the memory (the disk, DiskTier in disk_tier.py, and any other with its
  interface: `lookup`, `prepare_load`, `wants`, `prepare_store`, `poll`): a block that the lowest
  memory tier evicts is written to each of them that lacks it, and admission reads blocks back
  from them asynchronously, continuing a prefix from one store tier to the next.

Each step's work for the executor is plain data (`TierOps`), carried out before anything
else of the step, in this order: stores (blocks' bytes to the store tiers), demotions (device to
host copies), host loads (host to device copies), loads (bytes read to device blocks). A block
that a copy reads or writes is pinned (a reference held) until the step after, so that no
other plan of the same step can hand it out again. Whether a run of blocks is loaded or
recomputed is the cost model's call (`should_load`), the one that picks swap or recompute.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

from pagedkv.kvcache.allocator import BlockAllocator, CachedBlock, Device
from pagedkv.kvcache.disk_tier import FinishedWork, Loaded, TierStats

HOST = "host"


class StoreTier(Protocol):
    """A tier below the memory that keeps blocks as bytes (the disk tier is one). Its I/O runs
    on its own thread; the scheduler's thread calls these and collects finished work with `poll`."""

    name: str
    stats: TierStats
    # Write-through: every block the device caches is stored here too (in the next step, once
    # its K/V are written), so that other engines find it at once; otherwise only evicted blocks.
    write_through: bool
    finished: FinishedWork  # what its I/O has finished, taken in by `poll`; a waiter wakes on it

    def __contains__(self, block_hash: bytes) -> bool: ...  # held (as far as this engine knows)
    def lookup(self, hashes: list[bytes], parent: bytes = b"") -> int: ...  # leading blocks held
    def prepare_load(self, blocks: list[tuple[bytes, tuple[int, ...]]]) -> None: ...  # pins, starts reads
    def wants(self, block_hash: bytes) -> bool: ...  # a store would add the block
    def prepare_store(self, block_hash: bytes, token_ids: tuple[int, ...], payload: bytes, parent: bytes = b"",
                      extra: dict | None = None) -> list[bytes]: ...  # starts a write; returns what it evicts
    def poll(self) -> list[Loaded]: ...  # finished reads; finished writes become visible
    def describe(self) -> dict: ...  # statistics and what the tier holds
    def wait_idle(self, timeout: float | None = None) -> None: ...
    def close(self) -> None: ...


@dataclass
class StoreOp:
    """Copy a block's bytes out of its pool to store tiers (before the block is reused)."""

    device: Device
    block: int
    entry: CachedBlock  # what the block holds: hash, token ids, parent hash
    tiers: tuple[str, ...]  # the store tiers that take it


@dataclass
class LoadOp:
    """Copy a block read from a store tier into a device block."""

    block: int
    payload: bytes
    header: dict


@dataclass
class TierOps:
    stores: list[StoreOp] = field(default_factory=list)
    demotions: list[tuple[int, int]] = field(default_factory=list)   # (device block, host block)
    host_loads: list[tuple[int, int]] = field(default_factory=list)  # (host block, device block)
    loads: list[LoadOp] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.stores or self.demotions or self.host_loads or self.loads)


@dataclass
class LowerHit:
    """A block that a tier below the device holds: the host block, or None for a store tier."""

    tier: str
    block_hash: bytes
    token_ids: tuple[int, ...]
    host_block: int | None = None


@dataclass
class _PendingLoad:
    hit: LowerHit
    device_block: int
    payload: bytes | None = None
    header: dict | None = None
    done: bool = False


class Tiers:
    def __init__(self, device_pool: BlockAllocator, host_pool: BlockAllocator, host_caching: bool,
                 stores: list[StoreTier], release: Callable[[Device, int], None], block_bytes: int = 0) -> None:
        self.device_pool, self.host_pool = device_pool, host_pool
        self.release = release  # drops a reference the way the block manager does (twins included)
        self.host_caching = host_caching
        self.stores = {tier.name: tier for tier in stores}  # in lookup order: nearest first
        self.block_bytes = block_bytes
        # The cost model's call: load `num_blocks` from `tier`, or recompute them? Set by the
        # scheduler; loading is taken while nothing says otherwise.
        self.should_load: Callable[[str, int], bool] = lambda tier, num_blocks: True
        self.host_stats = TierStats()
        self.ops = TierOps()
        self._pins: list[tuple[Device, int]] = []
        self._demoted: list[int] = []  # host blocks copied into this step, pinned like the others
        self._loading: dict[int, list[_PendingLoad]] = {}  # sequence id -> its reads
        self._reads: dict[tuple[str, bytes], list[_PendingLoad]] = {}  # (tier, hash) -> reads waiting
        self._misses: dict[str, int] = {}  # per tier, the last lookup's blocks not found there
        self._write_through = [tier.name for tier in stores if tier.write_through]
        self._filled_by_evictions = [tier for tier in stores if not tier.write_through]  # the disk tier
        self._fresh: list[tuple[int, CachedBlock]] = []  # blocks the device cached since the last step
        if self._write_through:
            device_pool.listeners.append(self._cached)
        if host_caching or stores:
            device_pool.on_evict = self._device_evicted
        if stores:
            host_pool.on_evict = self._host_evicted

    @property
    def enabled(self) -> bool:
        return self.host_caching or bool(self.stores)

    def _stats(self, tier: str) -> TierStats:
        return self.host_stats if tier == HOST else self.stores[tier].stats

    # -- finding blocks below the device ------------------------------------------------------
    def lower_hits(self, blocks: list[tuple[bytes, tuple[int, ...], bytes]]) -> list[LowerHit]:
        """The leading `blocks` (hash, token ids, parent hash) that the tiers below hold, in order, up
        to the first that none holds: a run from the host, then each store tier continuing where the
        one before stopped, and again from the host (a prefix can alternate: the host leaves to the
        disk what it holds); cut where the cost model would rather recompute a run of them."""
        hits: list[LowerHit] = []
        self._misses = {}
        while len(hits) < len(blocks):
            start = len(hits)
            if self.host_caching:
                for block_hash, tokens, _ in blocks[len(hits):]:
                    host = self.host_pool.lookup(block_hash, tokens)
                    if host is None:
                        break
                    hits.append(LowerHit(HOST, block_hash, tokens, host))
                self._misses[HOST] = len(blocks) - len(hits)
            for tier in self.stores.values():
                rest = blocks[len(hits):]
                if not rest:
                    break
                held = tier.lookup([h for h, _, _ in rest], rest[0][2])
                hits += [LowerHit(tier.name, h, tokens) for h, tokens, _ in rest[:held]]
                self._misses[tier.name] = len(rest) - held
            if len(hits) == start:
                break
        # Runs of one tier, each loaded only if that beats recomputing it.
        kept = 0
        while kept < len(hits):
            end = kept
            while end < len(hits) and hits[end].tier == hits[kept].tier:
                end += 1
            if not self.should_load(hits[kept].tier, end - kept):
                break
            kept = end
        return hits[:kept]

    def count_misses(self) -> None:
        """Counts the last lookup's misses (admission's, not a check of whether it fits)."""
        for tier, num_blocks in self._misses.items():
            self._stats(tier).miss_blocks += num_blocks

    # -- loads ------------------------------------------------------------------------------------
    def hold(self, hits: list[LowerHit]) -> None:
        """Pins the host blocks among `hits` before the device blocks for them are taken, so
        that a demotion those allocations cause cannot evict them."""
        for hit in hits:
            if hit.tier == HOST:
                self.host_pool.acquire(hit.host_block)
                self._pins.append((Device.CPU, hit.host_block))

    def load(self, seq_id: int, hits: list[LowerHit], device_blocks: list[int]) -> int:
        """Plans the loads of `hits` (held) into `device_blocks`; host loads are copied this
        step, reads from store tiers start now and finish in a later step (`finish_loads`). Returns how
        many blocks are in place this step: the host run at the head (a host block after a read
        counts once the reads before it are good)."""
        ready = 0
        waiting: list[_PendingLoad] = []
        for hit, block in zip(hits, device_blocks):
            self._stats(hit.tier).hit_blocks += 1
            if hit.tier == HOST:
                self.ops.host_loads.append((hit.host_block, block))
                self.host_stats.loaded_bytes += self.block_bytes
                if waiting:
                    waiting.append(_PendingLoad(hit, block, done=True))
                else:
                    ready += 1
            else:
                pending = _PendingLoad(hit, block)
                waiting.append(pending)
                self._reads.setdefault((hit.tier, hit.block_hash), []).append(pending)
        if waiting:
            self._loading[seq_id] = waiting
            for tier in self.stores.values():
                mine = [(p.hit.block_hash, p.hit.token_ids) for p in waiting if p.hit.tier == tier.name]
                if mine:
                    tier.prepare_load(mine)
        return ready

    def wait_for_reads(self, timeout: float) -> None:
        """Sleeps until a store tier with reads in flight has finished something (or `timeout`
        seconds have passed)."""
        busy = {p.hit.tier for reads in self._loading.values() for p in reads if not p.done}
        for name in busy:
            if self.stores[name].finished.wait(timeout / len(busy)):
                return

    def is_loading(self, seq_id: int) -> bool:
        reads = self._loading.get(seq_id)
        return reads is not None and not all(p.done for p in reads)

    def finish_loads(self, seq_id: int) -> int:
        """Once every read of the sequence is done: plans the copies of the blocks read well,
        up to the first that failed (the rest are recomputed). Returns how many blocks are in
        place, host blocks between the reads included."""
        good = 0
        for pending in self._loading.pop(seq_id, []):
            if pending.hit.tier != HOST:
                if pending.payload is None:
                    break
                self.ops.loads.append(LoadOp(pending.device_block, pending.payload, pending.header or {}))
            good += 1
        return good

    def pin(self, device: Device, block: int) -> None:
        """Hands the caller's reference on `block` to the tiers, which drop it at the next step."""
        self._pins.append((device, block))

    def cancel_loads(self, seq_id: int) -> None:
        """The sequence let go of its blocks: reads still in flight are dropped when they land."""
        for pending in self._loading.pop(seq_id, []):
            pending.done = True
            pending.payload = None

    # -- demotion ---------------------------------------------------------------------------------
    def _device_evicted(self, block: int, entry: CachedBlock) -> None:
        """A cached device block is about to hold other contents: keep a copy below."""
        host = self.host_pool
        if self.host_caching:
            if host.lookup(entry.block_hash, entry.token_ids) is not None:
                return  # the host holds it already
            if any(entry.block_hash in tier for tier in self._filled_by_evictions):
                return  # a store tier filled by evictions holds it: the host's room goes to blocks it lacks
            if host.num_free_blocks > 0:
                target = host.allocate()  # may evict a host block to the store tiers
                host.cache(target, *entry)
                self._demoted.append(target)
                self.ops.demotions.append((block, target))
                self.host_stats.stored_blocks += 1
                self.host_stats.stored_bytes += self.block_bytes
                return
        self._store(Device.DEVICE, block, entry)

    def _host_evicted(self, block: int, entry: CachedBlock) -> None:
        self.host_stats.evicted_blocks += 1
        self._store(Device.CPU, block, entry)

    def _store(self, device: Device, block: int, entry: CachedBlock) -> None:
        takers = tuple(name for name, tier in self.stores.items() if tier.wants(entry.block_hash))
        if takers:
            self.ops.stores.append(StoreOp(device, block, entry, takers))

    def flush(self) -> None:
        """Plans stores of every cached block of both pools that the store tiers lack: what a
        restarted engine then finds (on shutdown)."""
        for device, pool in ((Device.DEVICE, self.device_pool), (Device.CPU, self.host_pool)):
            for block, entry in pool.cached.items():
                self._store(device, block, entry)

    # -- steps ------------------------------------------------------------------------------------
    def release_pins(self) -> None:
        """The last planned step's copies are done: its pinned blocks go back."""
        # Demotion targets in the device's eviction order, the others in reverse of the prefix
        # order they were taken in: either way a prefix's tail goes back first and leaves first.
        for block in self._demoted:
            self.release(Device.CPU, block)
        for device, block in reversed(self._pins):
            self.release(device, block)
        self._demoted.clear()
        self._pins.clear()

    def begin_step(self) -> list[tuple[str, int, float]]:
        """Releases the last step's pins and takes in the store tiers' finished work. Returns what was read
        since the last step as (tier, bytes, seconds), for the cost model."""
        self.release_pins()
        self._write_fresh()
        measured = []
        for tier in self.stores.values():
            for loaded in tier.poll():
                measured += self._landed(tier.name, loaded)
        return measured

    def _landed(self, tier: str, loaded: Loaded) -> list[tuple[str, int, float]]:
        """A finished read: to the first sequence waiting for it (none if it was cancelled)."""
        waiting = self._reads.get((tier, loaded.block_hash))
        if not waiting:
            return []
        pending = waiting.pop(0)
        if not waiting:
            del self._reads[(tier, loaded.block_hash)]
        if not pending.done:  # not cancelled while in flight
            pending.done, pending.payload, pending.header = True, loaded.payload, loaded.header
        return [(tier, len(loaded.payload), loaded.seconds)] if loaded.payload is not None else []

    def idle(self) -> list[StoreOp]:
        """No step follows: the last one's pins go, and the blocks it cached are stored in the
        write-through tiers now (the step has written them)."""
        self.release_pins()
        self._write_fresh()
        stores, self.ops.stores = self.ops.stores, []
        return stores

    # -- write-through ---------------------------------------------------------------------------
    def _cached(self, stored: bool, block: int, entry: CachedBlock) -> None:
        if stored:
            self._fresh.append((block, entry))

    def _write_fresh(self) -> None:
        """Stores the blocks the device cached in the last step (their K/V are written now) in
        the write-through tiers that lack them, before this step can write the blocks again."""
        for block, entry in self._fresh:
            if self.device_pool.cached.get(block) != entry:
                continue  # evicted since: the eviction stored it where the tiers wanted it
            takers = tuple(name for name in self._write_through if self.stores[name].wants(entry.block_hash))
            if takers:
                self.ops.stores.append(StoreOp(Device.DEVICE, block, entry, takers))
        self._fresh.clear()

    def take_ops(self) -> TierOps:
        ops, self.ops = self.ops, TierOps()
        return ops

    def stats(self) -> dict[str, dict]:
        out = {}
        if self.host_caching:
            out[HOST] = {**self.host_stats.as_dict(), "cached_blocks": len(self.host_pool.cached)}
        for name, tier in self.stores.items():
            out[name] = tier.describe()
        return out
