"""Which way to preempt a victim: swap its blocks to the CPU pool, or free them and recompute;
and at admission, whether to load cached blocks from a tier below the device or recompute them.

One cost model decides both, with throughputs measured as the engine runs: recompute costs a
prefill of the tokens (at the measured prefill rate); swap costs moving the group's unique
blocks out and back (at the measured copy bandwidth); a load costs the blocks' bytes at the
tier's measured read bandwidth (the host tier's is the copy bandwidth).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from pagedkv.kvcache.sequence import SequenceGroup


class PreemptionMode(enum.Enum):
    SWAP = "swap"
    RECOMPUTE = "recompute"


MODES = ("auto", "swap", "recompute")


@dataclass
class CostModel:
    """Running estimates (exponential moving averages of the time per unit), each a prior until
    its first measurement replaces it."""

    prefill_tokens_per_s: float = 2_000.0
    swap_bytes_per_s: float = 2e9
    smoothing: float = 0.3
    # Read bandwidth of the tiers below the host (the disk, a shared remote tier).
    load_bytes_per_s: dict[str, float] = field(default_factory=lambda: {"disk": 1e9, "remote": 5e8})
    measured: set[str] = field(default_factory=set)  # the estimates that are no longer priors

    def _blend(self, name: str, rate: float, units: int, seconds: float) -> float:
        """The new rate after `units` took `seconds`. Seconds per unit are averaged, not units per
        second: a disk whose readahead serves some blocks at once while others wait would
        otherwise look many times faster than it is."""
        if name not in self.measured:
            self.measured.add(name)
            return units / seconds
        return 1 / ((1 - self.smoothing) / rate + self.smoothing * seconds / units)

    def observe_prefill(self, num_tokens: int, seconds: float) -> None:
        if num_tokens > 0 and seconds > 0:
            self.prefill_tokens_per_s = self._blend("prefill", self.prefill_tokens_per_s, num_tokens, seconds)

    def observe_swap(self, num_bytes: int, seconds: float) -> None:
        if num_bytes > 0 and seconds > 0:
            self.swap_bytes_per_s = self._blend("swap", self.swap_bytes_per_s, num_bytes, seconds)

    def observe_load(self, tier: str, num_bytes: int, seconds: float) -> None:
        if num_bytes > 0 and seconds > 0:
            rate = self.load_bytes_per_s.get(tier, num_bytes / seconds)
            self.load_bytes_per_s[tier] = self._blend(f"load:{tier}", rate, num_bytes, seconds)

    def load_seconds(self, tier: str, num_bytes: int) -> float:
        """Seconds to bring `num_bytes` from `tier` to the device: the host tier's blocks come
        with the swap kernel, at the copy bandwidth."""
        rate = self.swap_bytes_per_s if tier == "host" else self.load_bytes_per_s.get(tier, 1e9)
        return num_bytes / rate

    def recompute_seconds(self, num_tokens: int) -> float:
        return num_tokens / self.prefill_tokens_per_s

    def swap_seconds(self, num_bytes: int) -> float:
        return 2 * num_bytes / self.swap_bytes_per_s  # out now, back in later


def tokens_to_recompute(group: SequenceGroup) -> int:
    """The prompt once, then every sequence's own tokens after it."""
    seqs = group.unfinished_seqs()
    return group.prompt_len + sum(len(s) - s.prompt_len for s in seqs)


class PreemptionPolicy:
    def __init__(self, mode: str, cost: CostModel, bytes_per_block: int) -> None:
        if mode not in MODES:
            raise ValueError(f"preemption_mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.mode, self.cost, self.bytes_per_block = mode, cost, bytes_per_block

    def choose(self, group: SequenceGroup, num_unique_blocks: int, can_swap: bool,
               cached_tokens: int = 0) -> PreemptionMode:
        """`cached_tokens`: leading tokens that stay cached after the group frees its blocks
        (other requests hold them), which recompute does not compute again."""
        # A group still in prefill has little to lose and no decode state to restore.
        if group.is_prefilling or not can_swap or self.mode == "recompute":
            return PreemptionMode.RECOMPUTE
        if self.mode == "swap":
            return PreemptionMode.SWAP
        swap = self.cost.swap_seconds(num_unique_blocks * self.bytes_per_block)
        recompute = self.cost.recompute_seconds(max(tokens_to_recompute(group) - cached_tokens, 0))
        return PreemptionMode.SWAP if swap < recompute else PreemptionMode.RECOMPUTE

    def should_load(self, tier: str, num_blocks: int, block_size: int) -> bool:
        """Whether `num_blocks` cached in `tier` come back faster loaded than recomputed."""
        load = self.cost.load_seconds(tier, num_blocks * self.bytes_per_block)
        return load <= self.cost.recompute_seconds(num_blocks * block_size)
