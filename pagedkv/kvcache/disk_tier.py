"""The disk tier: KV blocks as files in a directory, kept across restarts and shared between
engines that point at the same directory.

A block's file is named by its chained hash (the same in every process: kvcache/block_hash.py)
under a folder named by the model's fingerprint (weights, dtype, block size, layout, rank), so
another model's blocks are never even looked at. Each file carries a header (fingerprint, hash,
the block's token ids, payload length, CRC-32 of the payload) and the block's bytes; a file
that does not match in every field is a miss and is removed, never loaded. Writes go to a
temporary file that is renamed into place, so a reader sees a whole file or none.

All file work runs on one I/O thread; the scheduler's thread only touches the in-memory index
(`lookup`, `prepare_load`, `prepare_store`) and collects finished work with `poll`. A block is
visible once its write completed; a block being read is pinned (not evicted). When the tier is
full, the least recently used unpinned block that no other block continues (a leaf: the index
knows each block's parent) goes first, so that a prefix's tail leaves before its head. A full
disk stops writes with one warning.

Pure Python: the payload is bytes, the caller moves them in and out of its pools.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import queue
import struct
import threading
import time
import zlib
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

MAGIC = b"PKVB"
VERSION = 1
_PREFIX = struct.Struct("<4sII")  # magic, version, header length
SUFFIX = ".kvb"


class BlockFileError(ValueError):
    """A block file that is damaged, truncated or not the block asked for."""


@dataclass
class TierStats:
    """What one tier did. Blocks and bytes; seconds spent by its I/O (loads and stores)."""

    hit_blocks: int = 0          # blocks admission took from this tier
    miss_blocks: int = 0         # blocks admission looked up here and did not find
    loaded_bytes: int = 0
    load_seconds: float = 0.0
    stored_blocks: int = 0
    stored_bytes: int = 0
    store_seconds: float = 0.0
    evicted_blocks: int = 0
    errors: int = 0              # damaged, truncated or foreign entries found (each a miss)
    dropped_stores: int = 0      # stores given up (full disk, or a write that failed)

    def as_dict(self) -> dict:
        return dict(vars(self))


def encode_block(fingerprint: str, block_hash: bytes, token_ids: tuple[int, ...], payload: bytes,
                 parent: bytes = b"", extra: dict | None = None) -> bytes:
    header = {"fingerprint": fingerprint, "hash": block_hash.hex(), "parent": parent.hex(), "tokens": list(token_ids),
              "payload_bytes": len(payload), "crc32": zlib.crc32(payload), **(extra or {})}
    raw = json.dumps(header, separators=(",", ":")).encode()
    return _PREFIX.pack(MAGIC, VERSION, len(raw)) + raw + payload


def _header(data: bytes) -> tuple[dict, int]:
    """A block file's header and where its payload starts."""
    if len(data) < _PREFIX.size:
        raise BlockFileError("truncated before its header")
    magic, version, header_len = _PREFIX.unpack_from(data)
    if magic != MAGIC or version != VERSION:
        raise BlockFileError(f"not a block file of version {VERSION}")
    start = _PREFIX.size + header_len
    try:
        header = json.loads(data[_PREFIX.size:start])
    except (ValueError, UnicodeDecodeError) as e:
        raise BlockFileError(f"unreadable header: {e}") from None
    if not isinstance(header, dict):
        raise BlockFileError("unreadable header")
    return header, start


def decode_block(data: bytes, fingerprint: str, block_hash: bytes,
                 token_ids: tuple[int, ...] | None = None) -> tuple[bytes, dict]:
    """(payload, header) of a block file's bytes; BlockFileError unless it is whole and is
    this model's block `block_hash` (with these token ids, when given)."""
    header, start = _header(data)
    if header.get("fingerprint") != fingerprint:
        raise BlockFileError("another model's block")
    if header.get("hash") != block_hash.hex():
        raise BlockFileError("another block's file")
    if token_ids is not None and header.get("tokens") != list(token_ids):
        raise BlockFileError("the block's tokens differ")
    payload = data[start:]
    if len(payload) != header.get("payload_bytes"):
        raise BlockFileError(f"truncated: {len(payload)} of {header.get('payload_bytes')} payload bytes")
    if zlib.crc32(payload) != header.get("crc32"):
        raise BlockFileError("checksum mismatch")
    return payload, header


@dataclass
class _Entry:
    size: int
    parent: bytes | None = None  # None: not known (a file another engine wrote)
    pins: int = 0
    children: int = 0  # blocks in the index that continue this one


@dataclass
class Loaded:
    """A finished read: the payload (None if the block could not be read), its header, and
    the seconds the read took."""

    block_hash: bytes
    payload: bytes | None
    header: dict = field(default_factory=dict)
    seconds: float = 0.0


class FinishedWork:
    """What a tier's I/O threads have finished, for the scheduler's thread to take in (`poll`),
    and a wait for it: an engine with nothing to run but reads in flight sleeps until one
    lands instead of stepping again at once."""

    def __init__(self) -> None:
        self._items: queue.SimpleQueue = queue.SimpleQueue()
        self._ready = threading.Event()

    def put(self, item: tuple) -> None:
        self._items.put(item)
        self._ready.set()

    def take(self) -> list[tuple]:
        self._ready.clear()  # before taking: an item put meanwhile sets it again
        items = []
        while True:
            try:
                items.append(self._items.get_nowait())
            except queue.Empty:
                return items

    def wait(self, timeout: float) -> bool:
        """Whether something was put since the last `take` (waiting up to `timeout` seconds)."""
        return self._ready.wait(timeout)


class DiskTier:
    name = "disk"
    write_through = False  # blocks come when the memory tiers evict them, and at shutdown

    def __init__(self, directory: str | os.PathLike, capacity_bytes: int, fingerprint: str,
                 block_bytes: int | None = None) -> None:
        if capacity_bytes <= 0:
            raise ValueError(f"the disk tier needs a positive capacity, got {capacity_bytes} bytes")
        self.fingerprint = fingerprint
        self.root = Path(directory)
        self.folder = self.root / fingerprint[:32]
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"cannot use {directory} for the KV disk cache: {e.strerror or e}") from None
        self.capacity_bytes = capacity_bytes
        self.block_bytes = block_bytes  # a payload of another size is a miss
        self.stats = TierStats()
        self._index: OrderedDict[bytes, _Entry] = OrderedDict()  # least recently used first
        self._orphans: dict[bytes, int] = {}  # a hash not in the index -> blocks in it that continue it
        self._used = 0
        self._storing: dict[bytes, bytes] = {}  # blocks being written -> their parents
        self.finished = FinishedWork()  # the I/O thread's results, for `poll`
        self._io = ThreadPoolExecutor(1, thread_name_prefix="pagedkv-disk")
        self._writes_stopped = False
        self._counter = 0
        # (stored, block hashes) whenever a block enters or leaves the index: the KV events.
        self.listener = None
        self._rebuild()

    # -- the index --------------------------------------------------------------------------
    def path(self, block_hash: bytes) -> Path:
        name = block_hash.hex()
        return self.folder / name[:2] / (name + SUFFIX)

    def _rebuild(self) -> None:
        """The index from the files a previous run (or another engine) left, oldest first, with
        each block's parent read from its header."""
        found = []
        for sub in self.folder.iterdir() if self.folder.is_dir() else ():
            if not sub.is_dir():
                continue
            for entry in os.scandir(sub):
                if not entry.name.endswith(SUFFIX):
                    continue  # a temporary file of a write that never finished
                try:
                    block_hash = bytes.fromhex(entry.name[:-len(SUFFIX)])
                    st = entry.stat()
                    with open(entry.path, "rb") as f:
                        parent = bytes.fromhex(_header(f.read(4096))[0].get("parent", ""))
                except (ValueError, OSError):
                    continue  # unreadable: a miss when asked for, and removed then
                found.append((st.st_mtime_ns, block_hash, st.st_size, parent))
        for _, block_hash, size, parent in sorted(found):
            self._add(block_hash, size, parent)

    def _add(self, block_hash: bytes, size: int, parent: bytes | None) -> None:
        old = self._index.get(block_hash)
        if old is not None:
            self._used -= old.size
            parent = old.parent if parent is None else parent
            self._index[block_hash] = _Entry(size, parent, old.pins, old.children)
        else:
            # Blocks stored before their parent (a prefix demoted tail first) count once it comes.
            self._index[block_hash] = _Entry(size, parent, children=self._orphans.pop(block_hash, 0))
            self._count_child(parent, +1)
            if self.listener is not None:
                self.listener(True, [block_hash])
        self._index.move_to_end(block_hash)
        self._used += size

    def _count_child(self, parent: bytes | None, delta: int) -> None:
        if not parent:
            return
        holder = self._index.get(parent)
        if holder is not None:
            holder.children += delta
        elif self._orphans.get(parent, 0) + delta > 0:
            self._orphans[parent] = self._orphans.get(parent, 0) + delta
        else:
            self._orphans.pop(parent, None)

    def _forget(self, block_hash: bytes) -> None:
        entry = self._index.pop(block_hash, None)
        if entry is None:
            return
        self._used -= entry.size
        self._count_child(entry.parent, -1)
        if entry.children:
            self._orphans[block_hash] = entry.children
        if self.listener is not None:
            self.listener(False, [block_hash])

    def __contains__(self, block_hash: bytes) -> bool:
        return block_hash in self._index

    @property
    def num_blocks(self) -> int:
        return len(self._index)

    @property
    def used_bytes(self) -> int:
        return self._used

    def lookup(self, hashes: list[bytes], parent: bytes = b"") -> int:
        """How many leading blocks of the chain `hashes` (the first one's parent: `parent`) the
        tier holds. A file another engine wrote since the index was built counts too (one stat
        per block not in the index)."""
        held = 0
        for block_hash in hashes:
            if block_hash not in self._index:
                try:
                    size = self.path(block_hash).stat().st_size
                except OSError:
                    break
                self._add(block_hash, size, parent)
            parent = block_hash
            held += 1
        return held

    def touch(self, hashes: list[bytes]) -> None:
        """Marks a prefix's blocks used, tail first: its head then outlives its tail."""
        for block_hash in reversed(hashes):
            if block_hash in self._index:
                self._index.move_to_end(block_hash)

    # -- loads ------------------------------------------------------------------------------
    def prepare_load(self, blocks: list[tuple[bytes, tuple[int, ...]]]) -> None:
        """Pins the blocks (hash, token ids) and starts reading them; `poll` returns each as a
        `Loaded`. The caller looked them up first."""
        for block_hash, _ in blocks:
            self._index[block_hash].pins += 1
        self.touch([h for h, _ in blocks])
        self._io.submit(self._read_all, list(blocks))

    def _read_all(self, blocks: list[tuple[bytes, tuple[int, ...]]]) -> None:
        for block_hash, token_ids in blocks:
            started = time.perf_counter()
            try:
                data = self.path(block_hash).read_bytes()
                payload, header = decode_block(data, self.fingerprint, block_hash, token_ids)
                if self.block_bytes is not None and len(payload) != self.block_bytes:
                    raise BlockFileError(f"a block of {len(payload)} bytes, not {self.block_bytes}")
            except (OSError, BlockFileError) as e:
                self.finished.put(("load", block_hash, None, {"error": str(e)}, time.perf_counter() - started))
                continue
            self.finished.put(("load", block_hash, payload, header, time.perf_counter() - started))

    def complete_load(self, block_hash: bytes) -> None:
        entry = self._index.get(block_hash)
        if entry is not None and entry.pins > 0:
            entry.pins -= 1

    # -- stores -----------------------------------------------------------------------------
    def wants(self, block_hash: bytes) -> bool:
        """Whether a store of this block would add anything (not held, not being written)."""
        return not self._writes_stopped and block_hash not in self._index and block_hash not in self._storing

    def prepare_store(self, block_hash: bytes, token_ids: tuple[int, ...], payload: bytes,
                      parent: bytes = b"", extra: dict | None = None) -> list[bytes]:
        """Starts writing one block (whose prefix's block before it is `parent`); returns the
        blocks evicted to make room. The block becomes visible (lookup finds it) once `poll`
        has seen its write complete."""
        if not self.wants(block_hash):
            return []
        data = encode_block(self.fingerprint, block_hash, token_ids, payload, parent, extra)
        evicted = self._make_room(len(data))
        if self._used + len(data) > self.capacity_bytes:
            self.stats.dropped_stores += 1  # every block is pinned: nothing can make room now
            return evicted
        self._storing[block_hash] = parent
        self._used += len(data)  # reserved now, so that stores in flight cannot overfill the tier
        self._counter += 1
        self._io.submit(self._write, block_hash, data, evicted, self._counter)
        return evicted

    def _make_room(self, size: int) -> list[bytes]:
        """Forgets least recently used leaves (unpinned blocks no other block continues) until
        `size` more bytes fit; a leaf's removal can make its parent a leaf, taken in turn."""
        evicted: list[bytes] = []
        while self._used + size > self.capacity_bytes:
            victim = next((h for h, e in self._index.items() if not e.pins and not e.children), None)
            if victim is None:
                break
            self._forget(victim)
            evicted.append(victim)
        self.stats.evicted_blocks += len(evicted)
        return evicted

    def _write(self, block_hash: bytes, data: bytes, evicted: list[bytes], counter: int) -> None:
        for victim in evicted:
            try:
                self.path(victim).unlink()
            except OSError:
                pass  # another engine removed it already
        started = time.perf_counter()
        path = self.path(block_hash)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{counter}.tmp")
        ok, error = True, None
        try:
            path.parent.mkdir(exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError as e:
            ok, error = False, e
            try:
                tmp.unlink()
            except OSError:
                pass
        self.finished.put(("store", block_hash, ok, error, time.perf_counter() - started, len(data)))

    def complete_store(self, block_hash: bytes, ok: bool, size: int, error: OSError | None = None) -> None:
        parent = self._storing.pop(block_hash, b"")
        self._used -= size
        if ok:
            self._add(block_hash, size, parent)
            self.stats.stored_blocks += 1
            self.stats.stored_bytes += size
            return
        self.stats.dropped_stores += 1
        if error is not None and error.errno in (errno.ENOSPC, errno.EDQUOT) and not self._writes_stopped:
            self._writes_stopped = True
            log.warning("the KV disk cache %s is full (%s): it stops storing blocks, and keeps serving the "
                        "ones it has", self.root, error.strerror)
        elif error is not None:
            log.debug("a KV block could not be written to %s: %s", self.root, error)

    # -- results ----------------------------------------------------------------------------
    def poll(self) -> list[Loaded]:
        """Takes in the I/O thread's finished work: completed stores become visible; finished
        reads are returned (a damaged or missing file's block with payload None, its file
        removed from the index)."""
        loaded = []
        for item in self.finished.take():
            if item[0] == "store":
                _, block_hash, ok, error, seconds, size = item
                self.stats.store_seconds += seconds
                self.complete_store(block_hash, ok, size, error)
                continue
            _, block_hash, payload, header, seconds = item
            self.complete_load(block_hash)
            self.stats.load_seconds += seconds
            if payload is None:
                self.stats.errors += 1
                self._forget(block_hash)
                self._io.submit(self._remove_if_damaged, block_hash)
            else:
                self.stats.loaded_bytes += len(payload)
            loaded.append(Loaded(block_hash, payload, header, seconds))
        return loaded

    def _remove_if_damaged(self, block_hash: bytes) -> None:
        path = self.path(block_hash)
        try:
            decode_block(path.read_bytes(), self.fingerprint, block_hash)
        except BlockFileError:
            try:
                path.unlink()
            except OSError:
                pass
        except OSError:
            pass

    def describe(self) -> dict:
        """Statistics and what the tier holds, for the engine's stats."""
        return {**self.stats.as_dict(), "cached_blocks": self.num_blocks, "used_bytes": self.used_bytes,
                "capacity_bytes": self.capacity_bytes}

    def wait_idle(self, timeout: float | None = None) -> None:
        """Blocks until the I/O thread has finished what was submitted so far (tests, shutdown)."""
        self._io.submit(lambda: None).result(timeout)

    def close(self) -> None:
        self._io.shutdown(wait=True)
        self.poll()
