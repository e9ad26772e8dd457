"""Tensor parallelism inside the model, as Megatron-LM splits a transformer.

q/k/v and gate/up are column-parallel (each rank holds some heads, some intermediate
features), o and down are row-parallel (each rank holds the matching input columns and the
partial sums meet in one all-reduce per layer and projection). The embedding and lm_head are
split by vocabulary rows: a token's embedding comes from the rank that holds its row (one
all-reduce), and the logits of each rank's rows are gathered on rank 0, the rank that samples.

KV heads are split, never replicated: a model needs a number of attention heads, KV heads and
intermediate features that the number of ranks divides.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pagedkv.runtime.models.config import ModelConfig

_VOCAB = ("model.embed_tokens.weight", "lm_head.weight")
_COLUMN = tuple(f"self_attn.{x}_proj.{kind}" for x in "qkv" for kind in ("weight", "bias")) + (
    "mlp.gate_proj.weight", "mlp.up_proj.weight")
_ROW = ("self_attn.o_proj.weight", "mlp.down_proj.weight")


def check_tensor_parallel(config: ModelConfig, world_size: int) -> None:
    """A clear error when the model cannot be split evenly over `world_size` ranks."""
    if world_size < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {world_size}")
    if config.num_experts and world_size > 1:
        raise ValueError(f"a mixture-of-experts model ({config.architecture}) is not split over tensor-parallel "
                         "ranks: run it with tensor_parallel_size 1")
    if config.num_kv_heads < world_size:
        raise ValueError(f"tensor_parallel_size {world_size} is larger than the model's {config.num_kv_heads} "
                         "KV heads; KV heads are split across ranks, not replicated")
    for what, count in (("attention heads", config.num_heads), ("KV heads", config.num_kv_heads),
                        ("intermediate size", config.intermediate_size)):
        if count % world_size:
            raise ValueError(f"tensor_parallel_size {world_size} does not divide the model's {what} ({count}); "
                             f"it must divide {config.num_heads} attention heads, {config.num_kv_heads} KV heads "
                             f"and intermediate size {config.intermediate_size}")


@dataclass(frozen=True)
class WeightShard:
    """Which part of each weight rank `rank` of `world_size` holds."""

    rank: int
    world_size: int

    @staticmethod
    def split_dim(name: str) -> int | None:
        """The dimension `name` is split along; None: every rank holds all of it (norms)."""
        if name in _VOCAB or name.endswith(_COLUMN):
            return 0
        if name.endswith(_ROW):
            return 1
        return None

    def vocab_part(self, vocab_size: int) -> int:
        """Vocabulary rows per rank; the last rank's part is padded with zero rows."""
        return -(-vocab_size // self.world_size)

    def local_config(self, config: ModelConfig) -> ModelConfig:
        """The shapes of this rank's weights, as a config (for checking a loaded shard)."""
        n = self.world_size
        return dataclasses.replace(config, num_heads=config.num_heads // n, num_kv_heads=config.num_kv_heads // n,
                                   intermediate_size=config.intermediate_size // n,
                                   vocab_size=self.vocab_part(config.vocab_size), head_dim=config.head_dim)

    def load(self, name: str, shape: Sequence[int], read: Callable[[tuple[slice, ...]], torch.Tensor]) -> torch.Tensor:
        """This rank's part of the tensor `name` of full `shape`; `read(index)` reads a slice
        of it (a safetensors slice, or a tensor already in memory)."""
        dim = self.split_dim(name)
        index = [slice(None)] * len(shape)
        if dim is None or self.world_size == 1:
            return read(tuple(index))
        size = shape[dim]
        part = self.vocab_part(size) if name in _VOCAB else size // self.world_size
        start = self.rank * part
        index[dim] = slice(min(start, size), min(start + part, size))
        tensor = read(tuple(index))
        if tensor.shape[dim] < part:  # the vocabulary's tail: zero rows that no token id reaches
            pad = list(tensor.shape)
            pad[dim] = part - tensor.shape[dim]
            tensor = torch.cat([tensor, tensor.new_zeros(pad)], dim)
        return tensor.contiguous()

    def split(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's part of every weight of a model loaded whole (copies, so the whole can go)."""
        return {name: self.load(name, w.shape, lambda index, w=w: w[index]).clone() for name, w in weights.items()}


@dataclass
class TensorParallel:
    """The collectives of a forward pass; with one rank, plain local operations. Counts what
    they move and the time spent in them (on the CPU, where they are synchronous, that is
    their cost, waiting for the slowest rank included)."""

    rank: int = 0
    world_size: int = 1
    group: Any = None  # the torch.distributed process group of the model's collectives
    calls: int = 0
    bytes: int = 0
    seconds: float = 0.0

    def _count(self, x: torch.Tensor, started: float) -> None:
        self.calls += 1
        self.bytes += x.numel() * x.element_size()
        self.seconds += time.perf_counter() - started

    def embedding(self, token_ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Vocabulary-parallel lookup: each rank fills the rows of its ids, zeros elsewhere."""
        if self.world_size == 1:
            return F.embedding(token_ids, weight)
        local = token_ids - self.rank * weight.shape[0]
        outside = (local < 0) | (local >= weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), weight)
        return self.all_reduce(out.masked_fill_(outside[:, None], 0))

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sums the partial results of a row-parallel layer, in place."""
        if self.world_size > 1:
            started = time.perf_counter()
            dist.all_reduce(x, group=self.group)
            self._count(x, started)
        return x

    def gather_logits(self, logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """Rank 0 gets [rows, vocab_size]; the other ranks [rows, 0] (they do not sample)."""
        if self.world_size == 1:
            return logits
        logits, started = logits.contiguous(), time.perf_counter()
        if self.rank != 0:
            dist.gather(logits, None, dst=0, group=self.group)
            self._count(logits, started)
            return logits[:, :0]
        parts = [torch.empty_like(logits) for _ in range(self.world_size)]
        dist.gather(logits, parts, dst=0, group=self.group)
        self._count(logits, started)
        return torch.cat(parts, dim=1)[:, :vocab_size]
