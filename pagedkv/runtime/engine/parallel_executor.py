"""Rank 0's executor in a tensor-parallel group: each step it sends the workers the cache
operations and the batch (one broadcast), then runs its own share of the model, whose
collectives meet the workers' and gather the logits here, where sampling happens."""
from __future__ import annotations

import time

import torch

from pagedkv.kvcache.cache_engine import CacheEngine
from pagedkv.preemption.policy import CostModel
from pagedkv.preemption.scheduler import SchedulerOutput
from pagedkv.runtime.engine.distributed import REPORT, REPORT_WITH_POOLS, ParallelGroup, WorkerFailure
from pagedkv.runtime.engine.executor import ModelExecutor
from pagedkv.runtime.engine.kv_check import KVContentChecker
from pagedkv.runtime.engine.profile import StepProfile
from pagedkv.runtime.engine.step_message import StepMessage
from pagedkv.runtime.models.llama import LlamaModel, ModelInput


class TensorParallelExecutor(ModelExecutor):
    def __init__(self, model: LlamaModel, cache: CacheEngine, cost: CostModel, group: ParallelGroup,
                 max_num_seqs: int = 256, profile: StepProfile | None = None,
                 checker: KVContentChecker | None = None) -> None:
        # Decode graphs capture no collectives: a tensor-parallel group runs eagerly.
        super().__init__(model, cache, cost, max_num_seqs, enforce_eager=True, profile=profile, checker=checker)
        self.group = group
        self.broadcasts = 0
        self.broadcast_bytes = 0
        self.broadcast_seconds = 0.0

    def execute(self, out: SchedulerOutput, batch: ModelInput | None = None) -> torch.Tensor:
        self.group.check()  # a spawned worker that is gone fails the step before it starts
        try:
            batch = None if out.is_empty else batch or self.prepare(out)
            message = StepMessage.of(out, batch)
            if message.has_work:
                started = time.perf_counter()
                payload = message.encode()
                self.group.channel.send(payload)
                self.broadcasts += 1
                self.broadcast_bytes += len(payload)
                self.broadcast_seconds += time.perf_counter() - started
            return super().execute(out, batch)
        except WorkerFailure:
            raise
        except Exception as e:  # the ranks are out of step now, whatever the cause
            raise self.group.fail(e) from e

    def rank_reports(self, with_pools: bool = False) -> list[dict]:
        """Each rank's account of its KV pools (ParallelGroup.gather_reports), rank 0 first."""
        self.group.check()
        try:
            self.group.channel.send(REPORT_WITH_POOLS if with_pools else REPORT)
            return self.group.gather_reports(self.cache, with_pools)
        except Exception as e:
            raise self.group.fail(e) from e

    def close(self) -> None:
        self.group.close()
