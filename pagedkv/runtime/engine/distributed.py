"""The process groups of a tensor-parallel engine, and rank 0's one broadcast per step.

Two groups over the same ranks:
- control: gloo, CPU tensors, no practical timeout. Rank 0 broadcasts each step's work there,
  and the workers wait there for as long as the engine idles. A rank that dies closes its
  connections, which its peers notice at once.
- compute: NCCL on CUDA, gloo on the CPU, with `timeout_s`. The model's all-reduces and the
  logits gather run there; a rank that hangs makes the others fail after `timeout_s`.

Ranks meet in one of two ways: the engine spawns its workers and hosts the rendezvous store
itself (and watches the workers' processes), or a launcher (torchrun, or MASTER_ADDR,
MASTER_PORT, RANK and WORLD_SIZE set by hand on several hosts) started every rank.
"""
from __future__ import annotations

import atexit
import os
import time
from dataclasses import dataclass, field
from datetime import timedelta
import subprocess

import numpy as np
import torch
import torch.distributed as dist

from pagedkv.kvcache.cache_engine import CacheEngine
from pagedkv.runtime.models.parallel import TensorParallel

FOREVER = timedelta(days=3650)
HEADER_BYTES = 8192  # one broadcast carries steps up to this size; larger ones take a second
REPORT, REPORT_WITH_POOLS = b"R", b"P"  # rank 0 asks every rank for gather_reports


class WorkerFailure(RuntimeError):
    """A tensor-parallel rank died or stopped answering: the engine cannot go on."""


class WorkerProcess:
    """A spawned worker: a child process running `python -m pagedkv.runtime.engine.worker`, with
    what rank 0 watches of it (multiprocessing.Process's names: pid, exitcode, is_alive, join,
    kill). A fresh interpreter, not multiprocessing's spawn, so that the user's main module is
    never imported again: a script that builds a tensor-parallel engine at module level, with no
    `if __name__ == "__main__":` guard, works."""

    def __init__(self, popen: subprocess.Popen, name: str):
        self.popen, self.name = popen, name

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def exitcode(self) -> int | None:
        return self.popen.poll()

    def is_alive(self) -> bool:
        return self.exitcode is None

    def join(self, timeout: float | None = None) -> None:
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def kill(self) -> None:
        self.popen.kill()


def dead_workers(workers: list[WorkerProcess]) -> str:
    """'rank 1 exited with code -9, ...' for the workers that are gone; '' otherwise."""
    return ", ".join(f"rank {i + 1} exited with code {p.exitcode}" for i, p in enumerate(workers)
                     if p.exitcode is not None)


@dataclass(frozen=True)
class Rendezvous:
    """Where and as whom a rank joins the group."""

    rank: int
    world_size: int
    local_rank: int = 0             # which CUDA device on its host
    master_addr: str = "127.0.0.1"
    master_port: int = 0            # 0 on rank 0 of a spawned group: the store picks a port
    launcher: bool = False          # env:// rendezvous (torchrun or the variables set by hand)


def launcher_rendezvous(world_size: int) -> Rendezvous | None:
    """The rendezvous a launcher set in the environment, or None when nothing launched us."""
    env = os.environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    size = int(env["WORLD_SIZE"])
    if size != world_size:
        raise ValueError(f"the launcher started {size} processes (WORLD_SIZE) but tensor_parallel_size "
                         f"is {world_size}: they must be equal")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in env:
            raise ValueError(f"RANK and WORLD_SIZE are set but {name} is not: set MASTER_ADDR and MASTER_PORT "
                             "to rank 0's host and a free port")
    rank = int(env["RANK"])
    return Rendezvous(rank, size, int(env.get("LOCAL_RANK", rank)), env["MASTER_ADDR"], int(env["MASTER_PORT"]),
                      launcher=True)


@dataclass
class ParallelGroup:
    """This process's membership of the tensor-parallel group."""

    rendezvous: Rendezvous
    device: torch.device
    compute: object                 # the torch.distributed group of the model's collectives
    control: object                 # the torch.distributed group of the step broadcast
    workers: list[WorkerProcess] = field(default_factory=list)  # rank 0 of a spawned group
    store: dist.Store | None = None  # a spawned group's rendezvous store: workers leave their errors there
    failed: str | None = None       # why the group broke; every later step fails with it

    def __post_init__(self) -> None:
        self.channel = StepChannel(self.control)
        self.closed = False

    @property
    def rank(self) -> int:
        return self.rendezvous.rank

    @property
    def world_size(self) -> int:
        return self.rendezvous.world_size

    def model_parallel(self) -> TensorParallel:
        return TensorParallel(self.rank, self.world_size, self.compute)

    def gather_reports(self, cache: CacheEngine, with_pools: bool) -> list[dict] | None:
        """Every rank's account of its KV pools, on rank 0 (None elsewhere): their sizes, the
        bytes it swapped and, `with_pools`, the pools themselves (to compare ranks in tests)."""
        report = {"rank": self.rank, "device_blocks": cache.num_device_blocks, "cpu_blocks": cache.num_cpu_blocks,
                  "bytes_swapped": cache.bytes_swapped}
        if with_pools:
            report["device_cache"] = cache.device_cache.cpu()
        reports = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(report, reports, dst=0, group=self.control)
        return reports

    def agree_min(self, *values: int) -> list[int]:
        """The smallest of each value over all ranks (block counts every rank can hold)."""
        t = torch.tensor(values, dtype=torch.int64)
        try:
            dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.control)
        except Exception as e:  # a rank that failed to load its shard
            raise self.fail(e) from e
        return t.tolist()

    # -- liveness ---------------------------------------------------------------------------------
    def dead_workers(self) -> str:
        """'rank 1 exited with code -9, ...' for spawned workers that are gone; '' otherwise."""
        return dead_workers(self.workers)

    def leave_error(self, error: BaseException) -> None:
        """A worker's last word before it fails: its error, for rank 0 to name."""
        if self.store is not None:
            try:
                self.store.set(f"error/{self.rank}", f"{type(error).__name__}: {error}"[:500])
            except Exception:
                pass  # rank 0 (the store's host) is gone too

    def worker_errors(self) -> str:
        """'rank 1 failed: FileNotFoundError: ...' for the workers that left an error."""
        if self.store is None:
            return ""
        keys = [f"error/{rank}" for rank in range(1, self.world_size)]
        return "; ".join(f"rank {key[6:]} failed: {self.store.get(key).decode()}" for key in keys
                         if self.store.check([key]))

    def check(self) -> None:
        """Raises WorkerFailure when the group broke before or a spawned worker is gone."""
        if self.failed is None:
            dead = self.dead_workers()
            if dead:
                self.failed = f"tensor-parallel worker {dead}"
        if self.failed is not None:
            raise WorkerFailure(f"{self.failed}; the engine cannot continue: restart it")

    def fail(self, error: BaseException) -> WorkerFailure:
        """Marks the group broken by `error` (raised in a collective) and says what happened."""
        deadline = time.monotonic() + 1.0  # a dying worker: give it a moment to be named
        while not self.dead_workers() and any(p.is_alive() for p in self.workers) and time.monotonic() < deadline:
            time.sleep(0.02)
        said, dead = self.worker_errors(), self.dead_workers()
        self.failed = (f"tensor-parallel worker {said}" if said else f"tensor-parallel worker {dead}" if dead else
                       f"a tensor-parallel collective failed ({type(error).__name__}: {str(error)[:300]})")
        return WorkerFailure(f"{self.failed}; the engine cannot continue: restart it")

    # -- teardown ---------------------------------------------------------------------------------
    def close(self, stop_workers: bool = True) -> None:
        """Rank 0 tells the workers to stop (an empty step) and waits a little for them; workers
        of a broken group, or told nothing (`stop_workers` False: they may be mid-collective),
        are killed at once. Then the process leaves the group."""
        atexit.unregister(self.close)
        if self.closed:
            return  # never leave a group that a later engine of this process has joined
        self.closed = True
        told = stop_workers and self.rank == 0 and self.failed is None and dist.is_initialized()
        if told:
            try:
                self.channel.send(b"")
            except Exception:
                told = False  # a worker already gone: nothing more to tell them
        for process in self.workers:
            if told:
                process.join(5)
            if process.exitcode is None:
                process.kill()
                process.join(5)
        self.workers = []
        self.failed = self.failed or "the tensor-parallel group was closed"
        if dist.is_initialized():
            dist.destroy_process_group()


def join_group(rendezvous: Rendezvous, device: torch.device, timeout_s: float,
               store: dist.Store | None = None) -> ParallelGroup:
    """Joins the default (control) group and the compute group. `store`: the spawned group's
    rendezvous store (rank 0 hosts it); None: the launcher's environment (env://)."""
    if dist.is_initialized():
        raise ValueError("this process already belongs to a process group: one tensor-parallel engine "
                         "per process at a time (close the other with LLMEngine.close())")
    r = rendezvous
    if device.type == "cuda":
        device = torch.device("cuda", r.local_rank)
        torch.cuda.set_device(device)
    if store is None:
        dist.init_process_group("gloo", init_method="env://", rank=r.rank, world_size=r.world_size, timeout=FOREVER)
    else:
        dist.init_process_group("gloo", store=store, rank=r.rank, world_size=r.world_size, timeout=FOREVER)
    try:
        compute = dist.new_group(backend="nccl" if device.type == "cuda" else "gloo",
                                 timeout=timedelta(seconds=timeout_s))
    except BaseException:
        dist.destroy_process_group()
        raise
    group = ParallelGroup(r, device, compute, dist.group.WORLD, store=store)
    atexit.register(group.close)  # workers stop with the program even if nobody closes the engine
    return group


def host_store(world_size: int) -> dist.TCPStore:
    """Rank 0's rendezvous store for spawned workers, on a free loopback port."""
    return dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, timeout=FOREVER, wait_for_workers=False)


def wait_for_workers(store: dist.Store, workers: list[WorkerProcess], timeout_s: float) -> None:
    """Waits until every spawned worker has reached the store; a clear error if one died first."""
    deadline = time.monotonic() + timeout_s
    while store.add("joined", 0) < len(workers):
        dead = dead_workers(workers)
        if dead:
            raise WorkerFailure(f"tensor-parallel worker {dead} while starting (its error is above)")
        if time.monotonic() > deadline:
            raise WorkerFailure(f"tensor-parallel workers did not start within {timeout_s:.0f} s")
        time.sleep(0.02)


def reach_store(rendezvous: Rendezvous) -> dist.TCPStore:
    """A spawned worker's connection to rank 0's store; it counts itself in."""
    store = dist.TCPStore(rendezvous.master_addr, rendezvous.master_port, rendezvous.world_size,
                          is_master=False, timeout=timedelta(seconds=60))
    store.add("joined", 1)
    return store


class StepChannel:
    """Rank 0 -> all ranks, one broadcast per step: a fixed buffer whose first 8 bytes give the
    payload's length; a payload larger than the buffer sends its tail in a second broadcast.
    An empty payload means stop."""

    def __init__(self, group: object, capacity: int = HEADER_BYTES) -> None:
        self.group = group
        self.buffer = torch.zeros(capacity, dtype=torch.uint8)
        self.view = self.buffer.numpy()

    def send(self, payload: bytes) -> None:
        head = len(self.view) - 8
        self.view[:8] = np.frombuffer(len(payload).to_bytes(8, "little"), np.uint8)
        first = min(len(payload), head)
        self.view[8:8 + first] = np.frombuffer(payload, np.uint8, count=first)
        dist.broadcast(self.buffer, 0, group=self.group)
        if len(payload) > head:
            dist.broadcast(torch.frombuffer(bytearray(payload[head:]), dtype=torch.uint8), 0, group=self.group)

    def receive(self) -> bytes:
        dist.broadcast(self.buffer, 0, group=self.group)
        size = int.from_bytes(self.view[:8].tobytes(), "little")
        head = len(self.view) - 8
        payload = self.view[8:8 + min(size, head)].tobytes()
        if size > head:
            tail = torch.empty(size - head, dtype=torch.uint8)
            dist.broadcast(tail, 0, group=self.group)
            payload += tail.numpy().tobytes()
        return payload
