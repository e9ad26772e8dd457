"""Decode steps as CUDA graphs: one graph per batch-size bucket, replayed instead of
launching a forward's few hundred kernels from Python.

Each graph reads static input buffers and writes a static output. The inputs of all buckets
are views into one device buffer mirrored by one pinned host buffer, so a step is: numpy
writes into the host buffer, one copy up, one replay. A batch is padded to its bucket; the
padded rows write no K/V (slot -1) and read one token of block 0, and their logits are
dropped. The CuPy kernels launch on torch's current stream, which is the capture stream
while a graph is captured, so they are part of the graphs.
"""
from __future__ import annotations

import numpy as np
import torch

from pagedkv.runtime.engine.inputs import HostInputs
from pagedkv.runtime.models.llama import LlamaModel, ModelInput

_FIELDS = (("token_ids", np.int64), ("positions", np.int64), ("slot_mapping", np.int64),
           ("context_lens", np.int32))


def batch_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then steps of 16, up to the first bucket that holds max_num_seqs."""
    buckets = [b for b in (1, 2, 4, 8) if b < max_num_seqs] or [1]
    while buckets[-1] < max_num_seqs:
        buckets.append(buckets[-1] * 2 if buckets[-1] < 8 else buckets[-1] + 16 - buckets[-1] % 16)
    return buckets


class DecodeGraphs:
    def __init__(self, model: LlamaModel, kv_cache: torch.Tensor, max_num_seqs: int, max_blocks: int) -> None:
        self.model, self.kv_cache = model, kv_cache
        self.buckets = batch_buckets(max_num_seqs)
        self.max_batch, self.max_blocks = self.buckets[-1], max_blocks
        device = kv_cache.device
        # One byte buffer on each side: the per-token fields, then the block tables.
        self.offsets, size = {}, 0
        for name, dtype in _FIELDS:
            self.offsets[name] = size
            size += -(-self.max_batch * np.dtype(dtype).itemsize // 16) * 16
        self.offsets["block_tables"] = size
        size += self.max_batch * max_blocks * 4
        self.host = torch.zeros(size, dtype=torch.uint8, pin_memory=True)
        self.device_buf = torch.zeros(size, dtype=torch.uint8, device=device)
        self.host_views = {name: self._view(self.host.numpy(), name, dtype) for name, dtype in _FIELDS}
        self.host_tables = self.host.numpy()[size - self.max_batch * max_blocks * 4:].view(np.int32).reshape(
            self.max_batch, max_blocks)
        self.copied: torch.cuda.Event | None = None
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    def _view(self, buf: np.ndarray, name: str, dtype) -> np.ndarray:
        start = self.offsets[name]
        return buf[start:start + self.max_batch * np.dtype(dtype).itemsize].view(dtype)

    def _input(self, batch: int) -> ModelInput:
        dev = self.device_buf

        def field(name: str, dtype: torch.dtype, count: int) -> torch.Tensor:
            start = self.offsets[name]
            return dev[start:start + count * torch.empty(0, dtype=dtype).element_size()].view(dtype)

        tables = dev[self.offsets["block_tables"]:].view(torch.int32).view(self.max_batch, self.max_blocks)
        empty = torch.empty(0, dtype=torch.int32, device=dev.device)
        return ModelInput(
            token_ids=field("token_ids", torch.int64, batch), positions=field("positions", torch.int64, batch),
            slot_mapping=field("slot_mapping", torch.int64, batch), num_prefill_tokens=0,
            prefill_block_tables=empty.view(0, 0), prefill_query_start_loc=empty, prefill_context_lens=empty,
            decode_block_tables=tables[:batch], decode_context_lens=field("context_lens", torch.int32, batch),
            logits_indices=None)

    def capture(self) -> None:
        """Captures every bucket, largest first, into one memory pool. Each is run once
        eagerly first, which compiles its kernels and lets torch settle its workspaces."""
        self.host_views["slot_mapping"][:] = -1  # the capture runs must not write the cache
        self.host_views["context_lens"][:] = 1
        self.device_buf.copy_(self.host)
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device_buf.device)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for batch in reversed(self.buckets):
                inputs = self._input(batch)
                self.model.forward(inputs, self.kv_cache)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    self.outputs[batch] = self.model.forward(inputs, self.kv_cache)
                self.graphs[batch] = graph
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize(self.device_buf.device)

    def fits(self, inputs: HostInputs) -> bool:
        rows = len(inputs.decode_context_lens)
        return (inputs.num_prefill_tokens == 0 and 0 < rows <= self.max_batch
                and inputs.decode_block_tables.shape[1] <= self.max_blocks)

    def run(self, inputs: HostInputs) -> torch.Tensor:
        """Float32 logits of the rows `inputs.logits_indices` names."""
        rows = len(inputs.decode_context_lens)
        batch = next(b for b in self.buckets if b >= rows)
        if self.copied is not None:
            self.copied.synchronize()  # the last copy has read the host buffer
        views = self.host_views
        views["token_ids"][:rows] = inputs.token_ids
        views["positions"][:rows] = inputs.positions
        views["slot_mapping"][:rows] = inputs.slot_mapping
        views["context_lens"][:rows] = inputs.decode_context_lens
        views["token_ids"][rows:batch] = 0
        views["positions"][rows:batch] = 0
        views["slot_mapping"][rows:batch] = -1  # padded rows write nothing
        views["context_lens"][rows:batch] = 1
        width = inputs.decode_block_tables.shape[1]
        self.host_tables[:rows, :width] = inputs.decode_block_tables
        self.host_tables[rows:batch, 0] = 0
        # Entries past a row's own blocks are never read: they need no clearing.
        end = self.offsets["block_tables"] + batch * self.max_blocks * 4
        self.device_buf[:end].copy_(self.host[:end], non_blocking=True)
        self.copied = torch.cuda.Event()
        self.copied.record()
        self.graphs[batch].replay()
        logits = self.outputs[batch]
        if len(inputs.logits_indices) == rows and not inputs.num_prompt_logits:  # every row samples, in order
            return logits[:rows]
        return logits[torch.from_numpy(inputs.logits_indices).to(logits.device)]
