"""The model executor: carries out the scheduler's cache operations, runs the model once on
the whole ragged batch, and measures the throughputs the preemption cost model needs.

Inputs are built with numpy and go up in one copy; decode steps replay a CUDA graph on
CUDA (unless enforce_eager); the logits stay on the device for the sampler."""
from __future__ import annotations

import logging
import time
from typing import Callable

import torch

from pagedkv.kvcache.allocator import Device
from pagedkv.kvcache.cache_engine import CacheEngine
from pagedkv.kvcache.tiering import StoreOp, StoreTier
from pagedkv.preemption.policy import CostModel
from pagedkv.preemption.scheduler import SchedulerOutput
from pagedkv.runtime.engine.cuda_graphs import DecodeGraphs
from pagedkv.runtime.engine.inputs import HostInputs, host_inputs
from pagedkv.runtime.engine.kv_check import KVContentChecker
from pagedkv.runtime.engine.profile import StepProfile
from pagedkv.runtime.engine.staging import Staging
from pagedkv.runtime.models.llama import LlamaModel, ModelInput

log = logging.getLogger(__name__)


class ModelExecutor:
    def __init__(self, model: LlamaModel, cache: CacheEngine, cost: CostModel, max_num_seqs: int = 256,
                 enforce_eager: bool = False, profile: StepProfile | None = None,
                 checker: KVContentChecker | None = None, stores: list[StoreTier] | None = None) -> None:
        self.model, self.cache, self.cost = model, cache, cost
        self.checker = checker  # the debug check of every slot's contents (kv_check.py), or None
        self.stores = {tier.name: tier for tier in stores or []}  # the store tiers below the memory
        self.device = model.device
        self.block_size = cache.spec.block_size
        self.staging = Staging(self.device)
        self.profile = profile or StepProfile(False, self.device)
        self.graphs: DecodeGraphs | None = None
        if torch.device(self.device).type == "cuda" and not enforce_eager:
            max_blocks = min(-(-model.config.max_position_embeddings // self.block_size), cache.num_device_blocks)
            self.graphs = DecodeGraphs(model, cache.device_cache, max_num_seqs, max_blocks)
            started = time.perf_counter()
            try:
                self.graphs.capture()
            except Exception as e:  # a kernel that cannot be captured costs speed, not correctness
                log.warning("decode CUDA graphs could not be captured, running eagerly: %s", e)
                self.graphs = None
            else:
                log.info("captured %d decode graphs (batch %s) in %.1f s", len(self.graphs.buckets),
                         self.graphs.buckets, time.perf_counter() - started)

    def _sync(self) -> None:
        if torch.device(self.device).type == "cuda":
            torch.cuda.synchronize(self.device)

    def apply_cache_ops(self, out: SchedulerOutput) -> None:
        # Stores and swap-outs read blocks before anything can overwrite them; swap-ins, loads
        # and copies write blocks before attention reads them.
        if out.blocks_to_store:
            self.store(out.blocks_to_store)
        before_bytes, before_s = self.cache.bytes_swapped, self.cache.swap_seconds
        self.cache.swap_out(out.blocks_to_swap_out)
        self.cache.swap_in(out.blocks_to_swap_in)
        self.cost.observe_swap(self.cache.bytes_swapped - before_bytes, self.cache.swap_seconds - before_s)
        if out.blocks_to_load:
            self.cache.write_blocks([op.block for op in out.blocks_to_load], [op.payload for op in out.blocks_to_load])
        self.cache.copy(out.blocks_to_copy)
        if self.checker is not None:
            self.checker.apply_cache_ops(out)

    def store(self, ops: list[StoreOp]) -> None:
        """Hands the blocks' bytes to the store tiers that take them, which write them on their own
        threads."""
        for on_cpu in (False, True):
            chosen = [op for op in ops if (op.device is Device.CPU) == on_cpu]
            if not chosen:
                continue
            payloads = self.cache.read_blocks(on_cpu, [op.block for op in chosen])
            for op, payload in zip(chosen, payloads):
                extra = self.checker.stored(op.device is Device.CPU, op.block) if self.checker is not None else None
                for name in op.tiers:
                    self.stores[name].prepare_store(op.entry.block_hash, op.entry.token_ids, payload,
                                                    op.entry.parent, extra)

    def upload(self, inputs: HostInputs) -> ModelInput:
        t = self.staging.upload(inputs.arrays())
        return ModelInput(
            token_ids=t["token_ids"], positions=t["positions"], slot_mapping=t["slot_mapping"],
            num_prefill_tokens=inputs.num_prefill_tokens, prefill_block_tables=t["prefill_block_tables"],
            prefill_query_start_loc=t["prefill_query_start_loc"], prefill_context_lens=t["prefill_context_lens"],
            decode_block_tables=t["decode_block_tables"], decode_context_lens=t["decode_context_lens"],
            logits_indices=t["logits_indices"], num_prompt_logits=inputs.num_prompt_logits)

    def prepare(self, out: SchedulerOutput) -> ModelInput:
        return self.upload(host_inputs(out, self.block_size))

    def execute(self, out: SchedulerOutput, batch: ModelInput | None = None,
                inputs: HostInputs | None = None, started: Callable[[], None] | None = None) -> torch.Tensor:
        """Float32 logits on the model's device, one row per scheduled sequence that samples,
        in `out.scheduled` order, then one per position that the rows' `prompt_logits` name
        (`out.num_prompt_logits`, row by row). `batch` (`prepare(out)`) or `inputs` (`host_inputs(out)`):
        what the caller made already. `started` is called once, when the model's work is under
        way (LlamaModel.forward says when), or at once for an empty step."""
        self.apply_cache_ops(out)
        self.profile.mark("cache ops")
        if out.is_empty:
            if started is not None:
                started()
            return torch.empty(0, self.model.config.vocab_size)
        if self.checker is not None:
            inputs = inputs if inputs is not None else host_inputs(out, self.block_size)
            self.checker.check_step(out, inputs)
        if batch is None:
            inputs = inputs if inputs is not None else host_inputs(out, self.block_size)
            if self.graphs is not None and self.graphs.fits(inputs):
                self.profile.mark("prepare")
                logits = self.graphs.run(inputs)
                if started is not None:
                    started()
                self.profile.mark("forward")
                return logits
            batch = self.upload(inputs)
        self.profile.mark("prepare")
        start = time.perf_counter()
        logits = self.model.forward(batch, self.cache.device_cache, started)
        if batch.num_prefill_tokens:
            self._sync()
            seconds = time.perf_counter() - start
            # Charge the prefill its share of the step (decode rows ride along).
            share = batch.num_prefill_tokens / batch.token_ids.shape[0]
            self.cost.observe_prefill(batch.num_prefill_tokens, seconds * share)
        self.profile.mark("forward")
        return logits

    def close(self) -> None:
        """Releases what the executor holds beyond memory (tensor-parallel workers); idempotent."""
