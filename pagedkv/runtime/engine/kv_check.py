"""A debug check of the KV cache's contents that does not depend on the model's numbers.

K and V at position p of a sequence are a function of its tokens 0..p, nothing else. So the
checker keeps, for every slot of every pool, an id of the prefix whose last token was written
there (a 64-bit chained hash of the token ids up to and including it), and follows the step's
cache operations (swap out, swap in, copy) as the executor carries them out. Before each model
call it applies the step's writes (the slot of every new token) and then verifies that every
slot each scheduled row reads, positions 0..end-1 through its block table, holds that row's
own prefix at that position. A slot that holds another request's prefix, a stale block, or
nothing at all fails the step with `KVContentError`, naming the request, position and slot.

On with `EngineConfig.check_kv` (`--check-kv`), whose default is the environment variable
PAGEDKV_CHECK_KV; the test suite turns it on for every engine it builds. It costs a pass over
each row's context per step (numpy), so it stays off in service.
"""
from __future__ import annotations

from collections import defaultdict, deque

import numpy as np

from pagedkv.preemption.scheduler import ScheduledSeq, SchedulerOutput
from pagedkv.runtime.engine.inputs import HostInputs

_MASK = (1 << 64) - 1
EMPTY = 0  # a slot never written
UNKNOWN = _MASK  # a slot loaded from a disk block written without the check: not verifiable


class KVContentError(RuntimeError):
    """A sequence was about to read K/V that is not its own."""


def extend_prefix_ids(ids: list[int], tokens: list[int]) -> None:
    """Appends the prefix id of each further token (splitmix64 over the chained value)."""
    h = ids[-1] if ids else 0
    for t in tokens[len(ids):]:
        x = (h + (t + 1) * 0x9E3779B97F4A7C15) & _MASK
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
        h = (x ^ (x >> 31)) or 1  # never EMPTY
        ids.append(h if h != UNKNOWN else UNKNOWN - 1)


class KVContentChecker:
    def __init__(self, num_device_blocks: int, num_cpu_blocks: int, block_size: int,
                 sliding_window: int | None = None) -> None:
        """sliding_window: the block manager's (every layer sees at most that many positions):
        a row's slots are checked from its first position's window on, the ones it reads, and
        the blocks before it, released, must not be."""
        self.block_size = block_size
        self.sliding_window = sliding_window
        self.device = np.zeros(num_device_blocks * block_size, dtype=np.uint64)
        self.cpu = np.zeros(num_cpu_blocks * block_size, dtype=np.uint64)
        # id(sequence) -> (tokens, their prefix ids), for the rows of the last step: most rows
        # extend what they had by a token.
        self._known: dict[int, tuple[list[int], list[int]]] = {}
        self.steps_checked = 0
        self.slots_checked = 0
        self.slots_unverifiable = 0  # reads of UNKNOWN slots
        # The last things that happened to each device block, for the error message.
        self._history: defaultdict[int, deque] = defaultdict(lambda: deque(maxlen=6))

    def _note(self, block: int, what: str) -> None:
        self._history[block].append(f"step {self.steps_checked + 1}: {what}")

    # -- cache operations ---------------------------------------------------------------------
    def _block_slots(self, blocks: list[int]) -> np.ndarray:
        bs = self.block_size
        return (np.asarray(blocks, dtype=np.int64)[:, None] * bs + np.arange(bs)).reshape(-1)

    def _copy(self, pairs: list[tuple[int, int]], src: np.ndarray, dst: np.ndarray) -> None:
        if pairs:
            from_blocks, to_blocks = zip(*pairs)
            dst[self._block_slots(list(to_blocks))] = src[self._block_slots(list(from_blocks))]

    def stored(self, from_cpu_pool: bool, block: int) -> dict:
        """A block's slots as it goes to the disk tier: the block file carries them, so that a
        load (in this process or a later one) brings them back."""
        pool = self.cpu if from_cpu_pool else self.device
        return {"check": pool[self._block_slots([block])].tolist()}

    def apply_cache_ops(self, out: SchedulerOutput) -> None:
        """The step's swaps, loads and copies, in the executor's order (stores were recorded
        as they happened: `stored`)."""
        self._copy(out.blocks_to_swap_out, self.device, self.cpu)
        self._copy(out.blocks_to_swap_in, self.cpu, self.device)
        for src, dst in out.blocks_to_swap_in:
            self._note(dst, f"swapped in from CPU block {src}")
        for src, dst in out.blocks_to_copy:
            self._note(dst, f"copied from block {src}")
        for op in out.blocks_to_load:
            self._note(op.block, f"loaded from disk block {op.header.get('hash', '?')[:12]}")
            ids = op.header.get("check")
            slots = self._block_slots([op.block])
            self.device[slots] = np.array(ids, dtype=np.uint64) if ids and len(ids) == len(slots) else np.uint64(UNKNOWN)
        self._copy(out.blocks_to_copy, self.device, self.device)

    # -- a step -------------------------------------------------------------------------------
    def _prefix_ids(self, row: ScheduledSeq, new_tokens: np.ndarray) -> tuple[list[int], list[int]]:
        """Tokens and prefix ids of the row's positions 0..end-1. Its tokens before `start` are known; the
        new ones come from the step's inputs (a pending token has its id there, not yet in
        the sequence)."""
        tokens = row.seq.token_ids[:row.start] + new_tokens.tolist()
        known = self._known.get(id(row.seq))
        if known is not None and known[0] == tokens[:len(known[0])]:
            ids = known[1][:len(tokens)]
        else:
            ids = []
        extend_prefix_ids(ids, tokens)
        return tokens, ids

    def check_step(self, out: SchedulerOutput, inputs: HostInputs) -> None:
        rows = out.scheduled
        bs = self.block_size
        counts = [row.end - row.start for row in rows]
        firsts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        known: dict[int, tuple[list[int], list[int]]] = {}
        ids_of: list[np.ndarray] = []
        writes: dict[int, int] = {}
        for k, row in enumerate(rows):
            tokens, ids = self._prefix_ids(row, inputs.token_ids[firsts[k]:firsts[k + 1]])
            known[id(row.seq)] = (tokens, ids)
            arr = np.array(ids, dtype=np.uint64)
            ids_of.append(arr)
            slots = inputs.slot_mapping[firsts[k]:firsts[k + 1]]
            for block in sorted(set((slots // bs).tolist())):
                self._note(block, f"written by request {row.group.request_id} (sequence {row.seq.seq_id}), "
                                  f"positions {row.start}..{row.end - 1}")
            for slot, value in zip(slots.tolist(), arr[row.start:row.end].tolist()):
                if writes.setdefault(slot, value) != value:
                    raise KVContentError(f"step writes two different tokens to slot {slot} "
                                         f"(request {row.group.request_id}, position {row.start})")
        self._known = known
        if writes:
            self.device[np.fromiter(writes, dtype=np.int64, count=len(writes))] = \
                np.fromiter(writes.values(), dtype=np.uint64, count=len(writes))
        num_prefills = len(out.prefills)
        for k, row in enumerate(rows):
            table = (inputs.prefill_block_tables[k] if k < num_prefills
                     else inputs.decode_block_tables[k - num_prefills])
            first = max(0, row.start - self.sliding_window + 1) if self.sliding_window else 0
            positions = np.arange(first, row.end, dtype=np.int64)
            if first // bs and (table[:first // bs] >= 0).any():
                raise KVContentError(f"request {row.group.request_id} (sequence {row.seq.seq_id}) still holds blocks "
                                     f"wholly before its window, which starts at position {first}")
            blocks = table[positions // bs].astype(np.int64)
            if len(blocks) and blocks.min() < 0:
                p = int(positions[np.argmax(blocks < 0)])
                raise KVContentError(f"request {row.group.request_id} (sequence {row.seq.seq_id}) would read a "
                                     f"released block at position {p} of {row.end} (its window starts at {first})")
            slots = blocks * bs + positions % bs
            found = self.device[slots]
            unknown = found == np.uint64(UNKNOWN)
            self.slots_unverifiable += int(np.count_nonzero(unknown))
            wrong = np.flatnonzero((found != ids_of[k][first:]) & ~unknown)
            if len(wrong):
                p = int(wrong[0]) + first
                slot = int(slots[p - first])
                what = "nothing (never written)" if found[p - first] == EMPTY else "another prefix's K/V"
                block = slot // bs
                raise KVContentError(
                    f"request {row.group.request_id} (sequence {row.seq.seq_id}) would read {what} at position "
                    f"{p} of {row.end}: slot {slot} (block {block}); {len(wrong)} of its {row.end - first} slots "
                    f"are wrong; the block's last events: {'; '.join(self._history[block]) or 'none'}")
            self.slots_checked += row.end - first
        self.steps_checked += 1
