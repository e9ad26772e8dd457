"""Tensor-parallel workers (ranks 1..N-1), and how rank 0 gets them.

A worker holds its shard of the weights and of every KV block and no scheduler: each step it
receives rank 0's broadcast, carries out the swaps and copies on its own pools and runs its
share of the model. It never samples; rank 0 gathers the logits.

Rank 0 starts the workers (`python -m pagedkv.runtime.engine.worker`, a fresh interpreter that
reads its orders from stdin, so the user's main module is never run twice and needs no
`if __name__ == "__main__":` guard) unless a launcher started every rank
(torchrun; or MASTER_ADDR, MASTER_PORT, RANK and WORLD_SIZE set on each host). Then every rank
runs the same program: on ranks other than 0, building the engine runs this worker loop until
rank 0 stops, and then ends the process.
"""
from __future__ import annotations

import dataclasses
import os
import pickle
import subprocess
import sys
from pathlib import Path

import torch

from pagedkv.runtime.engine.config import EngineConfig, build_executor
from pagedkv.runtime.engine.distributed import (REPORT, REPORT_WITH_POOLS, ParallelGroup, Rendezvous, WorkerProcess,
                                                host_store, join_group, launcher_rendezvous, reach_store,
                                                wait_for_workers)
from pagedkv.runtime.engine.step_message import StepMessage
from pagedkv.runtime.models.loader import LoadedModel, load_model_config
from pagedkv.runtime.models.parallel import check_tensor_parallel

START_TIMEOUT_S = 300.0  # spawned workers must reach the rendezvous (import torch) within this


def start_tensor_parallel(config: EngineConfig, loaded: LoadedModel | None = None) -> ParallelGroup | None:
    """Rank 0's group with its workers running, or None for one rank. On a launched rank other
    than 0 it serves as a worker until rank 0 stops, then exits the process."""
    size = config.tensor_parallel_size
    if size == 1:
        return None
    check_tensor_parallel(loaded.config if loaded is not None else load_model_config(config.model), size)
    rendezvous = launcher_rendezvous(size)
    if rendezvous is not None:
        if rendezvous.rank != 0:
            run_worker(config, rendezvous)
            raise SystemExit(0)
        return join_group(rendezvous, config.torch_device(), config.distributed_timeout_s)
    # Workers load the model from where rank 0's came from.
    worker_config = dataclasses.replace(config, model=config.model or (loaded.source if loaded else None))
    store = host_store(size)
    workers = []
    try:
        for rank in range(1, size):
            orders = (worker_config, Rendezvous(rank, size, rank, "127.0.0.1", store.port), torch.get_num_threads())
            workers.append(_start_worker(orders, f"pagedkv-tp-rank{rank}"))
        wait_for_workers(store, workers, START_TIMEOUT_S)
        group = join_group(Rendezvous(0, size), config.torch_device(), config.distributed_timeout_s, store)
    except BaseException:
        for process in workers:
            process.kill()
        raise
    group.workers = workers
    return group


def _start_worker(orders: tuple[EngineConfig, Rendezvous, int], name: str) -> WorkerProcess:
    """A worker process, given its orders (config, rendezvous, threads) on stdin. pagedkv's own
    folder goes first on its path, so that it imports this pagedkv, installed or not."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[3]),
                                                      env.get("PYTHONPATH")]))
    popen = subprocess.Popen([sys.executable, "-m", "pagedkv.runtime.engine.worker"], stdin=subprocess.PIPE, env=env)
    popen.stdin.write(pickle.dumps(orders))
    popen.stdin.close()
    return WorkerProcess(popen, name)


def _worker_main() -> None:
    config, rendezvous, num_threads = pickle.load(sys.stdin.buffer)
    torch.set_num_threads(num_threads)  # as many as rank 0 uses
    run_worker(config, rendezvous, reach_store(rendezvous))


def run_worker(config: EngineConfig, rendezvous: Rendezvous, store=None) -> None:
    """Joins the group, builds this rank's executor and runs steps until rank 0 says stop."""
    group = join_group(rendezvous, config.torch_device(), config.distributed_timeout_s, store)
    try:
        _, executor = build_executor(config, None, group)
        while payload := group.channel.receive():
            if payload in (REPORT, REPORT_WITH_POOLS):
                group.gather_reports(executor.cache, payload == REPORT_WITH_POOLS)
                continue
            message = StepMessage.decode(payload, group.device)
            executor.execute(message, message.batch)
    except Exception as e:
        group.leave_error(e)
        raise
    finally:
        group.close()


if __name__ == "__main__":
    _worker_main()
