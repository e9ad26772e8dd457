"""Engine replies -> OpenAI response objects, whole or as server-sent-event chunks.

`CompletionFormat` and `ChatFormat` differ only where OpenAI's two APIs differ: the object
names, a choice's text (`text` vs `message` / `delta`), and the shape of `logprobs`
(completions: parallel lists `tokens`, `token_logprobs`, `top_logprobs`, `text_offset`;
chat: `content`, a list of `{token, logprob, bytes, top_logprobs}`). vLLM's `prompt_logprobs`
goes in each completions choice, and at the top of a chat response.
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Any

from pagedkv.runtime.serving import tool_calls
from pagedkv.runtime.serving.http.requests import Job

DONE = "data: [DONE]\n\n"


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def finish_reason(reason: str | None) -> str | None:
    # The engine ends outputs with "stop" (EOS, stop token or string) or "length".
    return None if reason is None else ("length" if reason == "length" else "stop")


def usage(finals: list[dict]) -> dict:
    prompt = sum(f["prompt_tokens"] for f in finals)
    completion = sum(len(o["token_ids"]) for f in finals for o in f["outputs"])
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _ranked(entry: list[list], texts: dict[int, str]) -> list[tuple[str, float]]:
    """One position's logprobs as (token text, logprob), likeliest first."""
    return [(texts.get(t, ""), lp) for t, lp in sorted(entry, key=lambda pair: (-pair[1], pair[0]))]


def _clamped(logprob: float) -> float:
    """-inf as OpenAI and vLLM write it in JSON, which has no infinities."""
    return max(logprob, -9999.0)


def _top(entry: list[list], k: int) -> list[list]:
    """An engine prompt-logprobs entry cut to the prompt token and the top k: the engine lists the
    prompt token first (with the rank of its place among the top ones when it is there) and
    the other top ones after it, perhaps more of them than k."""
    return entry[:1] + [item for item in entry[1:] if item[2] <= k]


def prompt_logprobs(reply: dict, k: int) -> list[dict | None]:
    """vLLM's `prompt_logprobs` from an engine reply: null for the first token, then per position
    {token id: {"logprob", "rank", "decoded_token"}}, the prompt token first and the top k after
    it (a prompt token among them keeps its place first, with the rank of its place there)."""
    texts = reply.get("prompt_token_texts", {})
    return [None if entry is None else {
        str(t): {"logprob": _clamped(lp), "rank": rank, "decoded_token": texts.get(t, "")}
        for t, lp, rank in _top(entry, k)} for entry in reply["prompt_logprobs"]]


def _by_text(ranked: list[tuple[str, float]]) -> dict[str, float]:
    """Completions key top logprobs by text: of tokens that read the same, the likeliest stays."""
    top: dict[str, float] = {}
    for text, logprob in ranked:
        top.setdefault(text, logprob)
    return top


class _Format:
    object = chunk_object = id_prefix = ""

    def __init__(self, job: Job, model: str) -> None:
        self.job, self.model = job, model
        self.id = f"{self.id_prefix}{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.top = job.params.get("logprobs") or 0
        self.started: set[int] = set()         # choices whose first chunk went out
        self.offsets: dict[int, int] = {}      # completions' text_offset, per choice
        self.echo: list[str] | None = None     # completions' echo: each prompt's text
        self.prompts: dict[int, dict] = {}     # by prompt: the reply that carried its prompt logprobs

    def take(self, p: int, reply: dict) -> None:
        """Keeps prompt p's prompt logprobs when this reply of its engine request carries them."""
        if "prompt_logprobs" in reply and p not in self.prompts:
            self.prompts[p] = reply

    def response(self, finals: list[dict]) -> dict:
        choices = []
        for p, final in enumerate(finals):
            self.take(p, final)
            outputs = final["outputs"]
            if self.job.best_of:  # the n likeliest of best_of samples
                outputs = sorted(outputs, key=lambda o: -o["cumulative_logprob"])[: self.job.n]
            choices += [self.choice(p * self.job.n + j, out) for j, out in enumerate(outputs)]
        body = {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": choices, "usage": usage(finals), "system_fingerprint": None}
        return self.with_prompt_logprobs(body)

    def _prompt_logprobs(self, p: int) -> list[dict | None] | None:
        """vLLM's `prompt_logprobs` of prompt p, as the request asked (None: not asked)."""
        if self.job.prompt_logprobs is None or p not in self.prompts:
            return None
        return prompt_logprobs(self.prompts[p], self.job.prompt_logprobs)

    def with_prompt_logprobs(self, body: dict) -> dict:
        """Where the API puts vLLM's `prompt_logprobs` (completions: in each choice)."""
        return body

    def chunk(self, choices: list[dict], usage_: dict | None = None) -> str:
        body = {"id": self.id, "object": self.chunk_object, "created": self.created, "model": self.model,
                "choices": choices, "system_fingerprint": None}
        if self.job.include_usage:
            body["usage"] = usage_
        return sse(body)

    def _logprobs(self, index: int, out: dict) -> dict | None:
        if not self.job.logprobs or out.get("logprobs") is None:
            return None
        return self.logprobs(index, out["token_ids"], out["logprobs"], out.get("token_texts", {}))

    # Implemented by each API.
    def choice(self, index: int, out: dict) -> dict: ...
    def delta(self, index: int, out: dict) -> list[dict]: ...
    def finish(self, index: int, reason: str | None, out: dict | None = None) -> list[dict]: ...
    def logprobs(self, index: int, token_ids: list[int], logprobs: list, texts: dict) -> dict: ...


# One position of completions' logprobs: its token's text, the token's logprob and the top
# ones by text (both None for the first token of an echoed prompt).
Position = tuple[str, float | None, dict[str, float] | None]


class CompletionFormat(_Format):
    object = chunk_object = "text_completion"
    id_prefix = "cmpl-"

    def _echo(self, index: int) -> tuple[str, list[Position]]:
        """With echo, before a choice's first text: the prompt's text, and with logprobs its
        positions (OpenAI's legacy echo: the first token's logprob is null)."""
        if self.echo is None or index in self.started:
            return "", []
        self.started.add(index)
        p = index // self.job.n
        reply = self.prompts.get(p)
        if not self.job.logprobs or reply is None:
            return self.echo[p], []
        texts, ids, k = reply.get("prompt_token_texts", {}), reply["prompt_token_ids"], self.top
        positions: list[Position] = [(texts.get(ids[0], ""), None, None)]
        for t, entry in zip(ids[1:], reply["prompt_logprobs"][1:]):
            pairs = [(i, _clamped(lp)) for i, lp, _ in _top(entry, k)]
            positions.append((texts.get(t, ""), pairs[0][1], _by_text(_ranked(pairs, texts))))
        return self.echo[p], positions

    def _text_and_logprobs(self, index: int, out: dict) -> tuple[str, dict | None]:
        text, positions = self._echo(index)
        if not self.job.logprobs or (out.get("logprobs") is None and not positions):
            return text + out["text"], None
        if out.get("logprobs") is not None:
            texts = out.get("token_texts", {})
            positions += [(texts.get(t, ""), dict(map(tuple, entry))[t], _by_text(_ranked(entry, texts)))
                          for t, entry in zip(out["token_ids"], out["logprobs"])]
        return text + out["text"], self._completion_logprobs(index, positions)

    def choice(self, index: int, out: dict) -> dict:
        text, logprobs = self._text_and_logprobs(index, out)
        choice = {"index": index, "text": text, "logprobs": logprobs,
                  "finish_reason": finish_reason(out["finish_reason"])}
        if self.job.prompt_logprobs is not None:
            choice["prompt_logprobs"] = self._prompt_logprobs(index // self.job.n)
        return choice

    def delta(self, index: int, out: dict) -> list[dict]:
        text, logprobs = self._text_and_logprobs(index, out)
        return [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": None}]

    def finish(self, index: int, reason: str | None, out: dict | None = None) -> list[dict]:
        text, positions = self._echo(index)
        logprobs = self._completion_logprobs(index, positions) if positions else None
        return [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason(reason)}]

    def _completion_logprobs(self, index: int, positions: list[Position]) -> dict:
        offsets, offset = [], self.offsets.get(index, 0)
        for token, _, _ in positions:
            offsets.append(offset)
            offset += len(token)
        self.offsets[index] = offset  # a stream's next chunk goes on from here
        return {"tokens": [token for token, _, _ in positions],
                "token_logprobs": [logprob for _, logprob, _ in positions],
                "top_logprobs": [top for _, _, top in positions],
                "text_offset": offsets}


class ChatFormat(_Format):
    object, chunk_object = "chat.completion", "chat.completion.chunk"
    id_prefix = "chatcmpl-"

    def __init__(self, job: Job, model: str) -> None:
        super().__init__(job, model)
        self.tools: dict[int, tool_calls.ToolStream] = {}  # auto: each choice's parse so far
        self.buffers: dict[int, str] = {}                  # required: each choice's text so far
        self.called: set[int] = set()                      # choices that made a tool call

    def _calls(self, text: str) -> tuple[str | None, list[dict]]:
        """A whole output as (content, calls), by the request's tool_choice."""
        mode = self.job.tool_mode
        if mode == "auto":
            return tool_calls.parse(text, self.job.tool_parser)
        if mode == "required":
            calls = tool_calls.parse_required(text)
            return (text, []) if calls is None else (None, calls)
        if mode == "named":
            return None, [{"name": self.job.tool_name, "arguments": text}]
        return text, []

    def _reason(self, reason: str | None, called: bool) -> str | None:
        """"tool_calls" where the model called tools by itself or as required (named: "stop", as vLLM)."""
        if called and reason == "stop" and self.job.tool_mode in ("auto", "required"):
            return "tool_calls"
        return finish_reason(reason)

    @staticmethod
    def _call_object(call: dict, k: int | None = None) -> dict:
        obj = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
               "function": {"name": call["name"], "arguments": call["arguments"]}}
        return obj if k is None else {"index": k, **obj}

    def choice(self, index: int, out: dict) -> dict:
        content, calls = self._calls(out["text"])
        message = {"role": "assistant", "content": content, "refusal": None}
        if calls:
            message["tool_calls"] = [self._call_object(c) for c in calls]
        return {"index": index, "message": message, "logprobs": self._logprobs(index, out),
                "finish_reason": self._reason(out["finish_reason"], bool(calls))}

    def delta(self, index: int, out: dict) -> list[dict]:
        mode, text = self.job.tool_mode, out["text"]
        logprobs = self._logprobs(index, out)
        if mode is None:
            return [*self._role(index), {"index": index, "delta": {"content": text}, "logprobs": logprobs,
                                         "finish_reason": None}]
        deltas: list[dict] = []
        if mode == "auto":
            content, calls = self.tools.setdefault(index, tool_calls.ToolStream(self.job.tool_parser)).push(text)
            deltas = self._tool_deltas(index, content, calls)
        elif mode == "named":
            if index not in self.called:  # the call is announced once, its arguments stream
                self.called.add(index)
                deltas.append({"tool_calls": [{"index": 0, **self._call_object(
                    {"name": self.job.tool_name, "arguments": ""})}]})
            if text:
                deltas.append({"tool_calls": [{"index": 0, "function": {"arguments": text}}]})
        else:
            self.buffers[index] = self.buffers.get(index, "") + text
        if logprobs is not None and not deltas:
            deltas.append({"content": ""})
        chunks = [{"index": index, "delta": d, "logprobs": None, "finish_reason": None} for d in deltas]
        if chunks:
            chunks[0]["logprobs"] = logprobs
        return [*self._role(index), *chunks]

    def _tool_deltas(self, index: int, content: str | None, calls: list[dict]) -> list[dict]:
        deltas = [{"content": content}] if content else []
        for call in calls:
            k = self._next_call(index)
            deltas.append({"tool_calls": [self._call_object(call, k)]})
        return deltas

    def _next_call(self, index: int) -> int:
        """The index of a choice's next tool call in its stream."""
        self.called.add(index)
        count = self.offsets.get(index, 0)
        self.offsets[index] = count + 1
        return count

    def finish(self, index: int, reason: str | None, out: dict | None = None) -> list[dict]:
        deltas: list[dict] = []
        if self.job.tool_mode == "auto" and index in self.tools:
            deltas = self._tool_deltas(index, *self.tools[index].finish())
        elif self.job.tool_mode == "required":
            content, calls = self._calls(self.buffers.pop(index, ""))
            deltas = self._tool_deltas(index, content, calls)
        chunks = [{"index": index, "delta": d, "logprobs": None, "finish_reason": None} for d in deltas]
        return [*self._role(index), *chunks, {"index": index, "delta": {}, "logprobs": None,
                                              "finish_reason": self._reason(reason, index in self.called)}]

    def with_prompt_logprobs(self, body: dict) -> dict:
        if self.job.prompt_logprobs is not None:  # vLLM's place: the response's, as a chat has one prompt
            body["prompt_logprobs"] = self._prompt_logprobs(0)
        return body

    def _role(self, index: int) -> list[dict]:
        """OpenAI's first chunk of each choice names the role, with empty content."""
        if index in self.started:
            return []
        self.started.add(index)
        return [{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                 "finish_reason": None}]

    def logprobs(self, index: int, token_ids: list[int], logprobs: list, texts: dict) -> dict:
        content = []
        for t, entry in zip(token_ids, logprobs):
            token = texts.get(t, "")
            content.append({"token": token, "logprob": dict(map(tuple, entry))[t], "bytes": list(token.encode()),
                            "top_logprobs": [{"token": s, "logprob": lp, "bytes": list(s.encode())}
                                             for s, lp in _ranked(entry, texts)[: self.top]]})
        return {"content": content, "refusal": None}


def format_for(job: Job, model: str) -> _Format:
    return (ChatFormat if job.chat else CompletionFormat)(job, model)
