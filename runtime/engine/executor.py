"""The model executor: carries out the scheduler's cache operations, runs the model once on
the whole ragged batch, and measures the throughputs the preemption cost model needs."""
from __future__ import annotations

import time

import torch

from kvcache.cache_engine import CacheEngine
from preemption.policy import CostModel
from preemption.scheduler import ScheduledSeq, SchedulerOutput
from runtime.models.llama import LlamaModel, ModelInput


def _block_tables(rows: list[ScheduledSeq], block_size: int, device: torch.device) -> torch.Tensor:
    """Padded [len(rows), max_blocks] int32 table, each row cut to the blocks it reads."""
    tables = [row.block_table[: -(-row.end // block_size)] for row in rows]
    width = max((len(t) for t in tables), default=0)
    padded = [t + [0] * (width - len(t)) for t in tables]
    return torch.tensor(padded, dtype=torch.int32, device=device).view(len(rows), width)


class ModelExecutor:
    def __init__(self, model: LlamaModel, cache: CacheEngine, cost: CostModel) -> None:
        self.model, self.cache, self.cost = model, cache, cost
        self.device = model.device
        self.block_size = cache.spec.block_size

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def apply_cache_ops(self, out: SchedulerOutput) -> None:
        # Swap out before anything can overwrite the freed blocks; swap in and copies before
        # attention reads them.
        before_bytes, before_s = self.cache.bytes_swapped, self.cache.swap_seconds
        self.cache.swap_out(out.blocks_to_swap_out)
        self.cache.swap_in(out.blocks_to_swap_in)
        self.cost.observe_swap(self.cache.bytes_swapped - before_bytes, self.cache.swap_seconds - before_s)
        self.cache.copy(out.blocks_to_copy)

    def prepare(self, out: SchedulerOutput) -> ModelInput:
        rows, bs, dev = out.scheduled, self.block_size, self.device
        token_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logits_indices: list[int] = []
        for row in rows:
            table = row.block_table
            token_ids += row.seq.token_ids[row.start:row.end]
            span = range(row.start, row.end)
            positions += span
            slots += [table[p // bs] * bs + p % bs for p in span]
            if row.sample:
                logits_indices.append(len(token_ids) - 1)
        prefills, decodes = out.prefills, out.decodes
        starts = [0]
        for row in prefills:
            starts.append(starts[-1] + row.end - row.start)

        def ints(values: list[int], dtype: torch.dtype = torch.int64) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=dev)

        return ModelInput(
            token_ids=ints(token_ids), positions=ints(positions), slot_mapping=ints(slots),
            num_prefill_tokens=starts[-1],
            prefill_block_tables=_block_tables(prefills, bs, dev),
            prefill_query_start_loc=ints(starts, torch.int32),
            prefill_context_lens=ints([r.end for r in prefills], torch.int32),
            decode_block_tables=_block_tables(decodes, bs, dev),
            decode_context_lens=ints([r.end for r in decodes], torch.int32),
            logits_indices=ints(logits_indices))

    def execute(self, out: SchedulerOutput) -> torch.Tensor:
        """Float32 logits, one row per scheduled sequence that samples, in `out.scheduled` order."""
        self.apply_cache_ops(out)
        if out.is_empty:
            return torch.empty(0, self.model.config.vocab_size)
        batch = self.prepare(out)
        start = time.perf_counter()
        logits = self.model.forward(batch, self.cache.device_cache)
        self._sync()
        seconds = time.perf_counter() - start
        if batch.num_prefill_tokens:
            # Charge the prefill its share of the step (decode rows ride along).
            share = batch.num_prefill_tokens / batch.token_ids.shape[0]
            self.cost.observe_prefill(batch.num_prefill_tokens, seconds * share)
        return logits.cpu()
