"""Sequences and sequence groups: the plain data the block manager and scheduler work on."""
from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import Any


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    SWAPPED = "swapped"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "aborted"
    FINISHED_ERROR = "error"

    @property
    def is_finished(self) -> bool:
        return self in _FINISHED


# A set lookup, not a name test: the scheduler asks this of every sequence every step.
_FINISHED = frozenset(s for s in SequenceStatus if s.name.startswith("FINISHED"))

_seq_ids = itertools.count()

# The last token of a sequence whose next token is being sampled while the step after it is
# scheduled already (async scheduling): it holds the token's place until the token is known.
PENDING_TOKEN = -1


def next_seq_id() -> int:
    return next(_seq_ids)


@dataclass(eq=False)
class Sequence:
    """One token stream: the prompt followed by what has been generated for it."""

    seq_id: int
    token_ids: list[int]
    prompt_len: int
    status: SequenceStatus = SequenceStatus.WAITING
    # Tokens whose K/V are already in the cache; the rest are computed by the next prefill.
    num_computed_tokens: int = 0
    cumulative_logprob: float = 0.0
    output_logprobs: list[Any] = field(default_factory=list)
    # The text before the stop string that ended the sequence, if one did.
    output_text: str | None = None
    # Output text already searched for stop strings (the search looks only past it).
    searched_text: str = ""
    # Chained content hashes of the leading full blocks (prefix caching), filled as needed.
    block_hashes: list[bytes] = field(default_factory=list)

    @classmethod
    def from_prompt(cls, prompt_ids: list[int]) -> "Sequence":
        return cls(next_seq_id(), list(prompt_ids), len(prompt_ids))

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len:]

    @property
    def is_finished(self) -> bool:
        return self.status in _FINISHED

    @property
    def has_pending_token(self) -> bool:
        return bool(self.token_ids) and self.token_ids[-1] == PENDING_TOKEN

    @property
    def num_known_tokens(self) -> int:
        """Tokens whose ids are known: all but a pending last one."""
        return len(self.token_ids) - self.has_pending_token

    def reserve_token(self) -> None:
        """Holds the place of a token that a step in flight samples; `append` fills it."""
        self.token_ids.append(PENDING_TOKEN)

    def drop_pending_token(self) -> None:
        """Gives up the place `reserve_token` held: its token will never come (failed, aborted)."""
        if self.has_pending_token:
            self.token_ids.pop()

    def append(self, token_id: int, logprob: float = 0.0) -> None:
        """Adds a sampled token, in the place `reserve_token` held for it if there is one."""
        if self.has_pending_token:
            self.token_ids[-1] = token_id
        else:
            self.token_ids.append(token_id)
        self.cumulative_logprob += logprob

    def fork(self) -> "Sequence":
        """A copy with a fresh id: same tokens, same computed state (the blocks are shared)."""
        return Sequence(next_seq_id(), list(self.token_ids), self.prompt_len, self.status,
                        self.num_computed_tokens, self.cumulative_logprob,
                        list(self.output_logprobs), self.output_text, self.searched_text,
                        list(self.block_hashes))


@dataclass(eq=False)
class SequenceGroup:
    """One request: a single sequence, n parallel samples, or a beam of width k."""

    request_id: str
    seqs: list[Sequence]
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None  # set once, when it first runs: its queue time ends
    sampling_params: Any = None
    # Sequences that left the group (finished beams, pruned candidates) keep their results here.
    finished_seqs: list[Sequence] = field(default_factory=list)
    error: str | None = None
    # Scheduler state: prefill still under way, and the leading tokens that the group's
    # first sequence computes for all of them (its blocks are shared).
    is_prefilling: bool = True
    shared_tokens: int = 0
    # Preempted by recompute and not yet back: the cache hits it then finds are its own
    # blocks, not prefix-cache hits.
    recomputing: bool = False
    # Admitted, and waiting for blocks being read from the disk tier before its prefill.
    loading: bool = False
    # Prompt logprobs: the first prompt position whose logits no step has computed yet (None:
    # not asked for, or all scheduled). While it is set, admission takes nothing from the
    # prefix cache or the tiers below it: a position found there is not computed, and has no
    # logits.
    prompt_logits_from: int | None = None

    def unfinished_seqs(self) -> list[Sequence]:
        return [s for s in self.seqs if not s.is_finished]

    def seqs_with_status(self, status: SequenceStatus) -> list[Sequence]:
        return [s for s in self.seqs if s.status is status]

    @property
    def is_finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)

    @property
    def prompt_len(self) -> int:
        return self.seqs[0].prompt_len
