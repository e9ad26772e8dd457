"""Workloads for prefix caching: many requests behind one system prompt, multi-turn chats
whose every turn repeats the conversation so far, and prompts that share nothing.

Prompts are random token ids (real text is not needed to exercise the cache), and every
request generates exactly its output length (greedy, ignore_eos), so that runs with caching
on and off do the same work.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from pagedkv import RequestOutput
from pagedkv.ablation.workload import FIRST_PLAIN_TOKEN, WorkloadRequest, make_workload


def _tokens(rng: random.Random, n: int, vocab_size: int) -> list[int]:
    return [rng.randrange(FIRST_PLAIN_TOKEN, vocab_size) for _ in range(n)]


def shared_system_prompt(num_requests: int, vocab_size: int, system_tokens: int = 512,
                         user_tokens: tuple[int, int] = (8, 64), output_len: int = 32,
                         seed: int = 0) -> list[WorkloadRequest]:
    """One system prompt, then a short user turn of its own for every request; all at t = 0."""
    rng = random.Random(seed)
    system = _tokens(rng, system_tokens, vocab_size)
    return [WorkloadRequest(f"sys-{i}", system + _tokens(rng, rng.randint(*user_tokens), vocab_size), output_len, 0.0)
            for i in range(num_requests)]


def no_shared_prefix(num_requests: int, vocab_size: int, prompt_mean: float = 128, output_len: int = 32,
                     seed: int = 0) -> list[WorkloadRequest]:
    """Random prompts (long-tailed lengths): nothing for the cache to find; all at t = 0."""
    requests = make_workload(num_requests, vocab_size, seed=seed, prompt_mean=prompt_mean,
                             output_mean=output_len, max_prompt=4 * int(prompt_mean))
    return [WorkloadRequest(r.request_id, r.prompt_ids, output_len, 0.0) for r in requests]


@dataclass
class Chats:
    """Conversations of several turns. The first turns arrive at t = 0; each later turn's
    prompt is the previous prompt, the answer to it and a new message, and it arrives when
    that answer is complete (`follow_up`, for pagedkv.ablation.replay)."""

    messages: dict[str, list[list[int]]]  # conversation -> its user messages in order
    output_len: int

    @property
    def first_turns(self) -> list[WorkloadRequest]:
        return [WorkloadRequest(f"{chat}/0", msgs[0], self.output_len, 0.0) for chat, msgs in self.messages.items()]

    @property
    def num_requests(self) -> int:
        return sum(len(msgs) for msgs in self.messages.values())

    def follow_up(self, request: WorkloadRequest, output: RequestOutput) -> WorkloadRequest | None:
        chat, turn = request.request_id.rsplit("/", 1)
        nxt = int(turn) + 1
        if nxt == len(self.messages[chat]) or output.error:
            return None
        history = request.prompt_ids + output.outputs[0].token_ids
        return WorkloadRequest(f"{chat}/{nxt}", history + self.messages[chat][nxt], self.output_len, 0.0)


def multi_turn_chats(num_chats: int, turns: int, vocab_size: int, message_tokens: tuple[int, int] = (16, 64),
                     output_len: int = 32, seed: int = 0) -> Chats:
    rng = random.Random(seed)
    return Chats({f"chat-{c}": [_tokens(rng, rng.randint(*message_tokens), vocab_size) for _ in range(turns)]
                  for c in range(num_chats)}, output_len)
