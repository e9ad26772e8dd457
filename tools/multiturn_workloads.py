"""A multi-turn chat workload shaped like vLLM's benchmarks/multi_turn generator: many
conversations behind one shared system prompt, each opening with a long context of its own (a
document, log-normal length), then turns whose user messages and answers have log-normal
lengths. Clients play the conversations: each client has its own conversations and goes round
robin over them, sending a conversation's next turn, waiting for the answer, then moving to its
next conversation. A conversation's turns are thus far apart: every other conversation's turn
runs in between, and with enough of them its history leaves a small device pool before it is
asked for again.

Prompts are random token ids; answers run to their drawn length (greedy, ignore_eos), so runs
of different settings do the same work. A turn's prompt is the conversation so far (the system
prompt, every earlier message and answer) plus its new message, token for token, so the
history is a cached prefix.
"""
from __future__ import annotations

import hashlib
import random
from array import array
from dataclasses import dataclass

from pagedkv import RequestOutput
from pagedkv.ablation.workload import FIRST_PLAIN_TOKEN, WorkloadRequest, long_tailed


def _tokens(rng: random.Random, n: int, vocab_size: int) -> list[int]:
    return [rng.randrange(FIRST_PLAIN_TOKEN, vocab_size) for _ in range(n)]


@dataclass
class Conversation:
    name: str
    messages: list[list[int]]  # user messages; the first opens with the conversation's own context
    answer_lens: list[int]     # tokens of each turn's answer

    @property
    def turns(self) -> int:
        return len(self.messages)


@dataclass
class MultiTurn:
    system: list[int]                  # the system prompt every conversation starts with
    conversations: list[Conversation]
    clients: int                       # conversation c belongs to client c % clients

    def conversations_of(self, client: int) -> list[int]:
        return list(range(client, len(self.conversations), self.clients))

    @property
    def turns(self) -> int:
        return max(c.turns for c in self.conversations)

    def schedule(self, client: int, turns: range) -> list[tuple[int, int]]:
        """The client's (conversation, turn) order within `turns`: round robin over its
        conversations, turn by turn."""
        mine = self.conversations_of(client)
        return [(c, t) for t in turns for c in mine if t < self.conversations[c].turns]

    def interleaved(self, turns: range) -> list[tuple[int, int]]:
        """Every client's schedule, one step of each client in turn: the order a run with equal
        turn times would serve them in."""
        schedules = [self.schedule(k, turns) for k in range(self.clients)]
        return [s[i] for i in range(max(map(len, schedules), default=0)) for s in schedules if i < len(s)]


def multi_turn(num_conversations: int, turns: int, vocab_size: int, clients: int = 2, system_tokens: int = 512,
               context_mean: float = 1536, context_range: tuple[int, int] = (1024, 4096),
               message_mean: float = 96, message_range: tuple[int, int] = (16, 512),
               answer_mean: float = 48, answer_range: tuple[int, int] = (8, 192),
               sigma: float = 0.57, seed: int = 0) -> MultiTurn:
    """Log-normal lengths as vLLM's generator draws them (sigma 0.57: a median 0.85 of the mean),
    clipped to the ranges."""
    if vocab_size <= FIRST_PLAIN_TOKEN:
        raise ValueError(f"the vocabulary needs more than {FIRST_PLAIN_TOKEN} tokens, has {vocab_size}")
    rng = random.Random(seed)
    system = _tokens(rng, system_tokens, vocab_size)
    conversations = []
    for c in range(num_conversations):
        context = long_tailed(rng, context_mean, sigma, *context_range)
        messages = [_tokens(rng, context + long_tailed(rng, message_mean, sigma, *message_range), vocab_size)]
        messages += [_tokens(rng, long_tailed(rng, message_mean, sigma, *message_range), vocab_size)
                     for _ in range(turns - 1)]
        answers = [long_tailed(rng, answer_mean, sigma, *answer_range) for _ in range(turns)]
        conversations.append(Conversation(f"conv-{c}", messages, answers))
    return MultiTurn(system, conversations, clients)


class ChatClients:
    """Plays `turns` of every conversation against an engine, for pagedkv.ablation.replay: each
    client's first request arrives at t = 0, and each answer brings the client's next request
    (`follow_up`). The histories live in `history` (conversation -> its tokens so far, answers
    included), so that a later range of turns can continue them, on another engine too."""

    def __init__(self, workload: MultiTurn, turns: range, history: dict[int, list[int]] | None = None) -> None:
        self.workload, self.turns = workload, turns
        self.history = history if history is not None else {}
        self._next: dict[int, list[tuple[int, int]]] = {k: workload.schedule(k, turns)
                                                         for k in range(workload.clients)}
        self.new_tokens: dict[str, int] = {}  # request id -> tokens of its new message

    def request(self, conversation: int, turn: int) -> WorkloadRequest:
        conv = self.workload.conversations[conversation]
        before = self.history.get(conversation, self.workload.system)
        if turn and conversation not in self.history:
            raise ValueError(f"{conv.name} turn {turn}: its earlier turns have not run")
        rid = f"{conv.name}/{turn}"
        self.new_tokens[rid] = len(conv.messages[turn])
        return WorkloadRequest(rid, before + conv.messages[turn], conv.answer_lens[turn], 0.0)

    def _pop(self, client: int) -> WorkloadRequest | None:
        queue = self._next[client]
        return self.request(*queue.pop(0)) if queue else None

    def first_requests(self) -> list[WorkloadRequest]:
        firsts = [self._pop(k) for k in range(self.workload.clients)]
        return [r for r in firsts if r is not None]

    def follow_up(self, request: WorkloadRequest, output: RequestOutput) -> WorkloadRequest | None:
        name = request.request_id.rsplit("/", 1)[0]
        conversation = next(i for i, c in enumerate(self.workload.conversations) if c.name == name)
        if output.error:
            raise RuntimeError(f"{request.request_id} failed: {output.error}")
        self.history[conversation] = request.prompt_ids + output.outputs[0].token_ids
        return self._pop(conversation % self.workload.clients)


def to_trace(workload: MultiTurn, trace_block: int = 16, seed: int = 0) -> list[dict]:
    """The workload as a Mooncake-format trace (one dict a request: timestamp in ms,
    input_length, output_length, hash_ids of `trace_block`-token blocks), in the interleaved
    order, with answers of random tokens of their drawn lengths in the histories. Blocks with the
    same tokens after the same prefix get the same id; a prompt's partial last block gets an id
    of its own."""
    rng = random.Random(seed)
    ids: dict[bytes, int] = {}
    history: dict[int, list[int]] = {}
    trace = []
    for index, (c, turn) in enumerate(workload.interleaved(range(workload.turns))):
        conv = workload.conversations[c]
        prompt = history.get(c, workload.system) + conv.messages[turn]
        hashes, parent = [], b""
        for start in range(0, len(prompt), trace_block):
            parent = hashlib.sha256(parent + array("q", prompt[start:start + trace_block]).tobytes()).digest()
            hashes.append(ids.setdefault(parent, len(ids)))
        trace.append({"timestamp": index * 1000, "input_length": len(prompt), "output_length": conv.answer_lens[turn],
                      "hash_ids": hashes})
        history[c] = prompt + _tokens(rng, conv.answer_lens[turn], 1 << 15)
    return trace
