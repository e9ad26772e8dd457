"""Iteration-level scheduling (continuous batching) with FCFS all-or-nothing preemption.

Every call to `schedule()` forms one ragged batch: running groups decode (or continue a
chunked prefill), the latest arrivals are preempted whole when the cache cannot hold
everyone's next token, swapped groups come back first, then waiting groups are admitted in
arrival order while the cache and the budgets allow.
"""
from __future__ import annotations

import bisect
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from pagedkv.kvcache.block_manager import AllocStatus, BlockManager
from pagedkv.kvcache.sequence import Sequence, SequenceGroup, SequenceStatus
from pagedkv.kvcache.tiering import LoadOp, StoreOp
from pagedkv.preemption.policy import PreemptionMode, PreemptionPolicy


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 4096
    preemption_mode: str = "auto"

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")


@dataclass
class ScheduledSeq:
    """Compute positions start..end-1 of `seq` this iteration; sample after `end` if `sample`."""

    seq: Sequence
    group: SequenceGroup
    start: int
    end: int
    sample: bool
    block_table: list[int]
    # Prompt logprobs: positions a..b-1 (within start..end-1) whose next-token logits are
    # computed too, each that of the prompt token after it.
    prompt_logits: tuple[int, int] | None = None


@dataclass
class SchedulerOutput:
    """One iteration's plan. The cache operations are carried out in this order: stores to the
    disk tier (blocks' bytes read out), swap out (device -> CPU pool, demotions to the host tier
    included), swap in (CPU pool -> device, host-tier loads included), loads from the disk
    tier, copies. Block moves are lists of (src, dst) pairs: a list cannot drop a pair, and
    `check_plan` refuses a plan that writes a block twice."""

    prefills: list[ScheduledSeq] = field(default_factory=list)
    decodes: list[ScheduledSeq] = field(default_factory=list)
    blocks_to_store: list[StoreOp] = field(default_factory=list)
    blocks_to_swap_out: list[tuple[int, int]] = field(default_factory=list)
    blocks_to_swap_in: list[tuple[int, int]] = field(default_factory=list)
    blocks_to_load: list[LoadOp] = field(default_factory=list)
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)
    preempted: list[tuple[SequenceGroup, PreemptionMode]] = field(default_factory=list)
    rejected: list[SequenceGroup] = field(default_factory=list)  # finished with an error
    num_batched_tokens: int = 0
    num_prompt_logits: int = 0  # positions whose logits the rows' prompt_logits ask for
    waiting_for_reads: bool = False  # a group waits for its blocks read from a store tier

    @property
    def scheduled(self) -> list[ScheduledSeq]:
        """Prefill rows first, decode rows after: the order of the model's batch."""
        return self.prefills + self.decodes

    @property
    def is_empty(self) -> bool:
        return not self.prefills and not self.decodes

    @property
    def has_cache_ops(self) -> bool:
        return bool(self.blocks_to_store or self.blocks_to_swap_out or self.blocks_to_swap_in
                    or self.blocks_to_load or self.blocks_to_copy)

    def check_plan(self) -> None:
        """Raises if a block is written twice in this step (CPU pool: swap-outs; device:
        swap-ins, loads and copies)."""
        cpu = [dst for _, dst in self.blocks_to_swap_out]
        device = ([dst for _, dst in self.blocks_to_swap_in] + [op.block for op in self.blocks_to_load]
                  + [dst for _, dst in self.blocks_to_copy])
        for pool, written in (("CPU", cpu), ("device", device)):
            if len(set(written)) != len(written):
                raise RuntimeError(f"a step writes a {pool} block twice: {sorted(written)}")


def _arrival(group: SequenceGroup) -> float:
    return group.arrival_time


def _settle_shared(group: SequenceGroup) -> None:
    """Before a group still in prefill lets go of its blocks. Its other sequences count the
    shared head as computed from the start, since the lead computes it for all of them; but
    only what the lead has computed so far is written, and freeing offers each sequence's
    computed blocks to the prefix cache, which must not take the rest."""
    seqs = group.unfinished_seqs()
    if group.is_prefilling and seqs and seqs[0].num_computed_tokens < group.shared_tokens:
        for seq in seqs[1:]:
            seq.num_computed_tokens = min(seq.num_computed_tokens, seqs[0].num_computed_tokens)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, policy: PreemptionPolicy) -> None:
        self.config, self.bm, self.policy = config, block_manager, policy
        # Blocks a tier below the device holds: loaded, or recomputed where that is faster.
        block_manager.tiers.should_load = lambda tier, n: policy.should_load(tier, n, block_manager.block_size)
        self.waiting: list[SequenceGroup] = []   # all three queues in arrival order
        self.running: list[SequenceGroup] = []
        self.swapped: list[SequenceGroup] = []
        self.preemptions: Counter[str] = Counter()
        self.tokens_recomputed = 0      # computed tokens that preemption by recompute dropped
        # Prefix cache, counted on a request's first admission only: prompt tokens looked up
        # and found cached. What a recomputed group finds again is counted apart.
        self.prefix_queried_tokens = 0
        self.prefix_hit_tokens = 0
        self.recompute_cached_tokens = 0
        self.prefill_tokens_computed = 0  # tokens of prompts (and recomputed outputs) run through the model

    # -- queues ---------------------------------------------------------------------------------
    def add(self, group: SequenceGroup) -> None:
        bisect.insort(self.waiting, group, key=_arrival)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def free_finished(self, preempted_too: bool = False) -> None:
        """Drops the running groups that finished in the last step (their blocks are free); with
        `preempted_too` the waiting and swapped ones as well (async scheduling: a group's token
        can arrive after the group was preempted, and end it)."""
        self.running = [g for g in self.running if not g.is_finished]
        if preempted_too:
            self.swapped = [g for g in self.swapped if not g.is_finished]
            self.waiting = [g for g in self.waiting if not g.is_finished]

    def num_running_seqs(self) -> int:
        return sum(len(g.unfinished_seqs()) for g in self.running)

    def abort(self, request_id: str) -> SequenceGroup | None:
        for queue in (self.waiting, self.running, self.swapped):
            for group in queue:
                if group.request_id == request_id:
                    queue.remove(group)
                    self.finish(group, SequenceStatus.FINISHED_ABORTED)
                    return group
        return None

    def finish(self, group: SequenceGroup, status: SequenceStatus, error: str | None = None) -> None:
        """Ends every unfinished sequence of the group and frees its blocks."""
        _settle_shared(group)
        for seq in group.unfinished_seqs():
            self.free_seq(seq, status)
        group.error = error or group.error

    def free_seq(self, seq: Sequence, status: SequenceStatus) -> None:
        if self.bm.has_blocks(seq):
            self.bm.free(seq)
        seq.status = status

    # -- one iteration ----------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        for tier, num_bytes, seconds in self.bm.begin_step():
            self.policy.cost.observe_load(tier, num_bytes, seconds)
        todo = [g for g in self.running if not g.is_finished]
        kept: list[SequenceGroup] = []
        preempted = False
        while todo:
            group = todo.pop(0)
            if group.is_prefilling:
                self._schedule_prefill(group, out)
                kept.append(group)
                continue
            for seq in group.unfinished_seqs():  # blocks out of a sliding window go before new ones come
                self.bm.drop_out_of_window(seq, seq.num_computed_tokens)
            while not self.bm.can_append_slots(group):
                if todo:
                    self._preempt(todo.pop(), out)  # the latest arrival goes first
                elif kept:
                    self._preempt(group, out)       # never an earlier arrival
                    break
                else:
                    self._reject(group, out, "it outgrew the KV cache: alone, it needs more blocks "
                                             f"than the {self.bm.num_device_blocks} the cache has")
                    break
                preempted = True
            else:
                self._schedule_decode(group, out)
                kept.append(group)
        self.running = kept
        if not preempted:
            self._swap_in(out)
            if not self.swapped:
                self._admit(out)
        ops = self.bm.take_tier_ops()
        if ops:
            out.blocks_to_store = ops.stores
            out.blocks_to_swap_out = ops.demotions + out.blocks_to_swap_out
            out.blocks_to_swap_in += ops.host_loads
            out.blocks_to_load = ops.loads
        if out.has_cache_ops:
            out.check_plan()
        return out

    def _room(self, group: SequenceGroup, out: SchedulerOutput) -> bool:
        return (self.num_running_seqs() + len(group.unfinished_seqs()) <= self.config.max_num_seqs
                and out.num_batched_tokens < self.config.max_num_batched_tokens)

    def _schedule_decode(self, group: SequenceGroup, out: SchedulerOutput) -> None:
        for seq in group.unfinished_seqs():
            out.blocks_to_copy += self.bm.append_slots(seq)
            self._add(out, seq, group, len(seq))

    def _add(self, out: SchedulerOutput, seq: Sequence, group: SequenceGroup, end: int) -> None:
        """Schedules positions num_computed_tokens..end-1 of the sequence."""
        start = seq.num_computed_tokens
        self.bm.drop_out_of_window(seq, start)  # what no position from `start` on reads
        # One new token is a decode row, whatever led to it (the attention is the same).
        rows = out.decodes if end - start == 1 else out.prefills
        rows.append(ScheduledSeq(seq, group, start, end, end == len(seq), self.bm.get_block_table(seq)))
        if group.prompt_logits_from is not None:
            self._prompt_logits(rows[-1], out)
        seq.num_computed_tokens = end
        if group.is_prefilling:
            # Written by the end of this step: later requests (even in this step) may share
            # them. Decoded blocks are offered when the sequence frees them.
            self.bm.cache_computed(seq)
        out.num_batched_tokens += end - start

    @staticmethod
    def _prompt_logits(row: ScheduledSeq, out: SchedulerOutput) -> None:
        """Asks for the logits of the row's prompt positions that no earlier step computed:
        once each, whatever preemption recomputes (the scheduled positions count as computed:
        a step that is scheduled runs)."""
        group = row.group
        first, stop = group.prompt_logits_from, min(row.end, row.seq.prompt_len - 1)
        if row.start > first:  # admission reads no cached blocks for these groups
            raise RuntimeError(f"request {group.request_id}: prompt positions {first}..{row.start - 1} were "
                               "skipped, and have no logits for the prompt logprobs")
        if first < stop:
            row.prompt_logits = (first, stop)
            out.num_prompt_logits += stop - first
            first = stop
        group.prompt_logits_from = first if first < row.seq.prompt_len - 1 else None

    def _schedule_prefill(self, group: SequenceGroup, out: SchedulerOutput) -> None:
        if group.loading:
            if self.bm.is_loading(group):
                out.waiting_for_reads = True
                return  # its blocks are still being read from disk; the others go on
            self._finish_loads(group)
        before = out.num_batched_tokens
        self._schedule_prefill_rows(group, out)
        self.prefill_tokens_computed += out.num_batched_tokens - before

    def _schedule_prefill_rows(self, group: SequenceGroup, out: SchedulerOutput) -> None:
        budget = self.config.max_num_batched_tokens - out.num_batched_tokens
        seqs = group.unfinished_seqs()
        lead = seqs[0]
        if len(seqs) == 1 or lead.num_computed_tokens < group.shared_tokens:
            # One sequence, or the shared prefix that the lead computes for the whole group:
            # split into chunks as the token budget allows.
            target = len(lead) if len(seqs) == 1 else group.shared_tokens
            if budget > 0:
                self._add(out, lead, group, min(target, lead.num_computed_tokens + budget))
        else:
            # Every sequence's own tokens in one iteration, so a beam's members sample together.
            remaining = sum(len(s) - s.num_computed_tokens for s in seqs)
            if remaining <= budget or out.num_batched_tokens == 0:
                for seq in seqs:
                    self._add(out, seq, group, len(seq))
        group.is_prefilling = any(s.num_computed_tokens < len(s) for s in seqs)

    # -- admission, swapping, preemption ----------------------------------------------------------
    def _admit(self, out: SchedulerOutput) -> None:
        # A group that needs prompt logits computes its whole prompt: nothing comes from the cache.
        can = lambda group: self.bm.can_allocate(group, group.prompt_logits_from is None)  # noqa: E731
        self._bring_in(self.waiting, can, self._start, out, lambda group: (
            f"the prompt cannot fit in the KV cache ({len(group.seqs[0])} tokens; the cache holds "
            f"{self.bm.num_device_blocks} blocks of {self.bm.block_size} tokens)"))

    def _swap_in(self, out: SchedulerOutput) -> None:
        self._bring_in(self.swapped, self.bm.can_swap_in, self._resume, out,
                       lambda group: "it cannot be swapped back into the KV cache")

    def _bring_in(self, queue: list[SequenceGroup], can: Callable[[SequenceGroup], AllocStatus],
                  place: Callable[[SequenceGroup, SchedulerOutput], None], out: SchedulerOutput,
                  never: Callable[[SequenceGroup], str]) -> None:
        """Moves groups from the head of `queue` to running, in arrival order, while they fit."""
        while queue and self._room(queue[0], out):
            group = queue[0]
            status = can(group)
            if status is AllocStatus.LATER:
                break
            queue.pop(0)
            if status is AllocStatus.NEVER:
                self._reject(group, out, never(group))
                continue
            for seq in group.unfinished_seqs():
                seq.status = SequenceStatus.RUNNING
            bisect.insort(self.running, group, key=_arrival)
            place(group, out)

    def _start(self, group: SequenceGroup, out: SchedulerOutput) -> None:
        seqs = group.unfinished_seqs()
        if group.first_scheduled_time is None:
            group.first_scheduled_time = time.monotonic()
        reads_cache = group.prompt_logits_from is None
        alloc = self.bm.allocate(group, reads_cache)
        # The lead computes the shared prefix; the others start after it. Identical
        # sequences still compute their last token each, to get logits of their own.
        # Whatever the prefix cache holds is not computed again.
        group.shared_tokens = min(alloc.shared_tokens, min(len(s) for s in seqs) - 1) if len(seqs) > 1 else 0
        saved = 0
        for i, (seq, cached) in enumerate(zip(seqs, alloc.computed_tokens)):
            base = 0 if i == 0 else group.shared_tokens
            seq.num_computed_tokens = max(base, cached)
            saved += seq.num_computed_tokens - base
        if group.recomputing:
            self.recompute_cached_tokens += saved
        elif reads_cache:  # a request whose prompt logits are computed asks the cache nothing
            self.prefix_queried_tokens += len(seqs[0])
            self.prefix_hit_tokens += alloc.computed_tokens[0]
        group.is_prefilling, group.loading = True, alloc.loading
        self._schedule_prefill(group, out)
        group.recomputing = group.recomputing and group.loading  # counted apart until its loads are in

    def _finish_loads(self, group: SequenceGroup) -> None:
        """The group's disk reads are in: the blocks read well count as computed (their copies
        are in this step's plan), the rest are prefilled."""
        lead = group.unfinished_seqs()[0]
        loaded = self.bm.finish_loads(group) - lead.num_computed_tokens
        lead.num_computed_tokens += loaded
        if group.recomputing:
            self.recompute_cached_tokens += loaded
        else:
            self.prefix_hit_tokens += loaded
        group.loading = group.recomputing = False

    def _resume(self, group: SequenceGroup, out: SchedulerOutput) -> None:
        out.blocks_to_swap_in += self.bm.swap_in(group)
        self._schedule_decode(group, out)

    def _preempt(self, group: SequenceGroup, out: SchedulerOutput) -> None:
        num_blocks = self.bm.num_group_blocks(group)
        mode = self.policy.choose(group, num_blocks, self.bm.can_swap_out(group), self.bm.num_kept_tokens(group))
        if mode is PreemptionMode.SWAP:
            out.blocks_to_swap_out += self.bm.swap_out(group)
            for seq in group.unfinished_seqs():
                seq.status = SequenceStatus.SWAPPED
            bisect.insort(self.swapped, group, key=_arrival)
        else:
            _settle_shared(group)
            for seq in group.unfinished_seqs():
                self.tokens_recomputed += seq.num_computed_tokens
                self.bm.free(seq)
                seq.status, seq.num_computed_tokens = SequenceStatus.WAITING, 0
            group.is_prefilling, group.recomputing, group.loading = True, True, False
            bisect.insort(self.waiting, group, key=_arrival)
        self.preemptions[mode.value] += 1
        out.preempted.append((group, mode))

    def _reject(self, group: SequenceGroup, out: SchedulerOutput, reason: str) -> None:
        self.finish(group, SequenceStatus.FINISHED_ERROR, f"request {group.request_id}: {reason}")
        out.rejected.append(group)
