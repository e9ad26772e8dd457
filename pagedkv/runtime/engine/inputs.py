"""A step's model inputs built on the host with numpy: no per-token Python loops."""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from pagedkv.preemption.scheduler import ScheduledSeq, SchedulerOutput


@dataclass
class HostInputs:
    token_ids: np.ndarray            # int64 [T]
    positions: np.ndarray            # int64 [T]
    slot_mapping: np.ndarray         # int64 [T]
    prefill_block_tables: np.ndarray  # int32 [S_p, blocks the longest prefill row reads]
    prefill_query_start_loc: np.ndarray  # int32 [S_p + 1]
    prefill_context_lens: np.ndarray  # int32 [S_p]
    decode_block_tables: np.ndarray  # int32 [S_d, blocks the longest decode row reads]
    decode_context_lens: np.ndarray  # int32 [S_d]
    # int64: the tokens whose next-token logits are wanted, the sampling rows' first (one per
    # row that samples, in row order), then the positions the rows' prompt_logits name
    logits_indices: np.ndarray
    num_prefill_tokens: int
    num_prompt_logits: int = 0  # the last entries of logits_indices that are prompt positions

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: v for k, v in vars(self).items() if isinstance(v, np.ndarray)}


def _tables(rows: list[ScheduledSeq], ends: np.ndarray, block_size: int) -> np.ndarray:
    """Padded int32 block tables [rows, blocks], each row cut to the blocks it reads."""
    used = -(-ends // block_size)
    width = int(used.max()) if len(rows) else 0
    flat = np.fromiter(itertools.chain.from_iterable(r.block_table[:u] for r, u in zip(rows, used.tolist())),
                       dtype=np.int64, count=int(used.sum()))
    tables = np.zeros((len(rows), width), dtype=np.int32)
    row_of = np.repeat(np.arange(len(rows)), used)
    col = np.arange(len(flat)) - np.repeat(np.cumsum(used) - used, used)
    tables[row_of, col] = flat
    return tables


def host_inputs(out: SchedulerOutput, block_size: int) -> HostInputs:
    rows = out.scheduled
    num_prefills = len(out.prefills)
    starts = np.fromiter((r.start for r in rows), dtype=np.int64, count=len(rows))
    ends = np.fromiter((r.end for r in rows), dtype=np.int64, count=len(rows))
    counts = ends - starts
    total = int(counts.sum())
    token_ids = np.fromiter(itertools.chain.from_iterable(
        r.seq.token_ids[r.start:r.end] for r in rows), dtype=np.int64, count=total)
    first_token = np.cumsum(counts) - counts
    row_of_token = np.repeat(np.arange(len(rows)), counts)
    positions = np.arange(total, dtype=np.int64) - first_token[row_of_token] + starts[row_of_token]
    prefill_tables = _tables(out.prefills, ends[:num_prefills], block_size)
    decode_tables = _tables(out.decodes, ends[num_prefills:], block_size)
    # Slot of each token: its block (from its row's table) and the offset in the block.
    blocks = np.empty(total, dtype=np.int64)
    num_prefill_tokens = int(counts[:num_prefills].sum())
    pre = slice(0, num_prefill_tokens)
    if num_prefills:
        blocks[pre] = prefill_tables[row_of_token[pre], positions[pre] // block_size]
    if num_prefill_tokens < total:
        dec = slice(num_prefill_tokens, total)
        blocks[dec] = decode_tables[row_of_token[dec] - num_prefills, positions[dec] // block_size]
    slots = blocks * block_size + positions % block_size
    sample = np.fromiter((r.sample for r in rows), dtype=bool, count=len(rows))
    query_start = np.zeros(num_prefills + 1, dtype=np.int32)
    query_start[1:] = np.cumsum(counts[:num_prefills])
    logits_indices = (first_token + counts - 1)[sample]
    if out.num_prompt_logits:
        logits_indices = np.concatenate([logits_indices, _prompt_indices(rows, first_token)])
    return HostInputs(
        token_ids=token_ids, positions=positions, slot_mapping=slots,
        prefill_block_tables=prefill_tables, prefill_query_start_loc=query_start,
        prefill_context_lens=ends[:num_prefills].astype(np.int32),
        decode_block_tables=decode_tables, decode_context_lens=ends[num_prefills:].astype(np.int32),
        logits_indices=logits_indices, num_prefill_tokens=num_prefill_tokens,
        num_prompt_logits=out.num_prompt_logits)


def _prompt_indices(rows: list[ScheduledSeq], first_token: np.ndarray) -> np.ndarray:
    """The batch indices of the positions the rows' prompt_logits name, row by row."""
    asked = [(k, row.prompt_logits[0] - row.start, row.prompt_logits[1] - row.start)
             for k, row in enumerate(rows) if row.prompt_logits is not None]
    offsets = np.array(asked, dtype=np.int64).reshape(-1, 3)
    lengths = offsets[:, 2] - offsets[:, 1]
    starts = first_token[offsets[:, 0]] + offsets[:, 1]
    # Each row's run start..start + length - 1, without a loop over the positions.
    return np.repeat(starts - np.cumsum(lengths) + lengths, lengths) + np.arange(int(lengths.sum()))
