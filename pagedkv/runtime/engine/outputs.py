"""What the engine hands back: per request, its outputs so far."""
from __future__ import annotations

from dataclasses import dataclass, field

# Why a request ended with an error (the wire protocol's codes of the same name):
REJECTED = "too_long"   # it can never run: longer than the model's context, or than the KV cache holds
FAILED = "internal"     # it failed in a step (its sampling or beam search raised); the others went on


@dataclass
class CompletionOutput:
    index: int
    token_ids: list[int]
    text: str
    cumulative_logprob: float
    finish_reason: str | None = None           # "stop", "length", "aborted", "error" or None
    logprobs: list[dict[int, float]] | None = None
    new_token_ids: list[int] = field(default_factory=list)  # added by the last step
    new_text: str = ""                                       # text added by the last step


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    error: str | None = None
    queue_time: float | None = None  # seconds from arrival to first scheduling, once scheduled
    error_code: str | None = None  # REJECTED or FAILED when error is set
    # Asked for with SamplingParams.prompt_logprobs, once every prompt position has them: None
    # for the first token, then {token id: (logprob, rank)}, the prompt token first and the
    # top prompt_logprobs after it (vLLM's shape, with (logprob, rank) for its Logprob).
    prompt_logprobs: list[dict[int, tuple[float, int]] | None] | None = None
