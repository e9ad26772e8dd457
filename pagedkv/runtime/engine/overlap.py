"""Async scheduling's plain data: what passes from one step to the next when the host's work
runs beside the model's.

While step N computes, a second thread finishes step N-1 (gives its sampled tokens to their
sequences, checks stops, builds outputs) and schedules step N+1. Step N's tokens are not
known then, so each sequence that samples in step N holds a pending token
(`Sequence.reserve_token`) and step N+1 is scheduled as if that token were there; its input
ids take the tokens when step N has drawn them (`Prepared.fill`). A sequence whose token from
step N is its last by length is not scheduled again; one that the token stops (a stop token or
string) has computed one row of step N+1 for nothing, and that row's results are dropped.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pagedkv.kvcache.sequence import PENDING_TOKEN
from pagedkv.preemption.scheduler import ScheduledSeq, SchedulerOutput
from pagedkv.runtime.engine.inputs import HostInputs, host_inputs
from pagedkv.runtime.engine.sampler import SampledToken


@dataclass
class Prepared:
    """A scheduled step with its inputs built (None for an empty step). The input ids at
    `pending_at` are the tokens that the step before draws in its sampling rows `pending_from`."""

    out: SchedulerOutput
    inputs: HostInputs | None
    pending_at: np.ndarray
    pending_from: np.ndarray

    def fill(self, drawn: np.ndarray) -> None:
        """Puts the step before's drawn token ids (one per sampling row) in their places."""
        if len(self.pending_at):
            self.inputs.token_ids[self.pending_at] = drawn[self.pending_from]


@dataclass
class Drawn:
    """A step's tokens, drawn, not yet given to their sequences. `picked[k]` belongs to sampling
    row `rows[k]`: a token, or the exception that its group's draw raised."""

    out: SchedulerOutput
    rows: list[ScheduledSeq]
    picked: list[SampledToken | Exception]

    @property
    def token_ids(self) -> np.ndarray:
        """One id per row; 0 where the draw failed (the next step's row of it is dropped)."""
        return np.array([t.token_id if isinstance(t, SampledToken) else 0 for t in self.picked], dtype=np.int64)


def prepare(out: SchedulerOutput, block_size: int, sources: dict[int, int]) -> Prepared:
    """Builds a step's inputs. `sources`: id(sequence) -> the sampling row of the step before
    that draws the sequence's pending token."""
    if out.is_empty:
        return Prepared(out, None, np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
    inputs = host_inputs(out, block_size)
    at: list[int] = []
    source: list[int] = []
    first = 0
    for row in out.scheduled:
        if row.seq.has_pending_token and row.end == len(row.seq):
            at.append(first + row.end - 1 - row.start)
            source.append(sources[id(row.seq)])
        first += row.end - row.start
    if np.count_nonzero(inputs.token_ids == PENDING_TOKEN) != len(at):
        raise RuntimeError("a step was scheduled with a pending token that is not its rows' last")
    return Prepared(out, inputs, np.array(at, dtype=np.int64), np.array(source, dtype=np.int64))
