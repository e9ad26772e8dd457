"""What the engine hands back: per request, its outputs so far."""
from __future__ import annotations

from dataclasses import dataclass, field


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
