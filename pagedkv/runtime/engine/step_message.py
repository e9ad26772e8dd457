"""What rank 0 sends its tensor-parallel workers each step: the cache operations of the block
manager's plan and the model's batch, in one compact byte string.

Every rank runs the same plan on its own pools (its KV heads of every block), so the block
tables, slots, swaps and copies are the scheduler's, unchanged. Tensors travel as their raw
bytes (pickle frames them); the encoding never reaches outside the group's own processes.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass, fields
from typing import Any

import torch

from pagedkv.preemption.scheduler import SchedulerOutput
from pagedkv.runtime.models.llama import ModelInput

STEP = b"S"  # the first byte of an encoded step


@dataclass
class StepMessage:
    """The part of a SchedulerOutput a worker needs (ModelExecutor.execute reads these names)."""

    blocks_to_swap_out: list[tuple[int, int]]
    blocks_to_swap_in: list[tuple[int, int]]
    blocks_to_copy: list[tuple[int, int]]
    batch: ModelInput | None  # None: cache operations only
    # The disk tier's operations: never in a tensor-parallel plan (the tier runs with one rank).
    blocks_to_store: tuple = ()
    blocks_to_load: tuple = ()

    @classmethod
    def of(cls, out: SchedulerOutput, batch: ModelInput | None) -> "StepMessage":
        if out.blocks_to_store or out.blocks_to_load:
            raise ValueError("a tensor-parallel step cannot carry disk-tier operations")
        return cls(out.blocks_to_swap_out, out.blocks_to_swap_in, out.blocks_to_copy, batch)

    @property
    def is_empty(self) -> bool:
        return self.batch is None

    @property
    def has_work(self) -> bool:
        return bool(self.batch is not None or self.blocks_to_swap_out or self.blocks_to_swap_in
                    or self.blocks_to_copy)

    def encode(self) -> bytes:
        batch = None if self.batch is None else {f.name: _pack(getattr(self.batch, f.name))
                                                 for f in fields(self.batch)}
        return STEP + pickle.dumps((self.blocks_to_swap_out, self.blocks_to_swap_in, self.blocks_to_copy, batch),
                                   protocol=pickle.HIGHEST_PROTOCOL)

    @classmethod
    def decode(cls, data: bytes, device: torch.device) -> "StepMessage":
        if data[:1] != STEP:
            raise ValueError(f"not a step message: {data[:8]!r}")
        swap_out, swap_in, copies, packed = pickle.loads(data[1:])
        batch = None if packed is None else ModelInput(**{k: _unpack(v, device) for k, v in packed.items()})
        return cls(swap_out, swap_in, copies, batch)


def _pack(value: Any) -> Any:
    if not isinstance(value, torch.Tensor):
        return value
    t = value.detach().cpu().contiguous()
    raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""  # empty views may have stride 0
    return (str(t.dtype).removeprefix("torch."), tuple(t.shape), raw)


def _unpack(value: Any, device: torch.device) -> Any:
    if not isinstance(value, tuple):
        return value
    dtype_name, shape, raw = value
    dtype = getattr(torch, dtype_name)
    flat = torch.frombuffer(bytearray(raw), dtype=dtype) if raw else torch.empty(0, dtype=dtype)
    return flat.view(shape).to(device)
