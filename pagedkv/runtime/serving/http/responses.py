"""Engine replies -> OpenAI response objects, whole or as server-sent-event chunks.

`CompletionFormat` and `ChatFormat` differ only where OpenAI's two APIs differ: the object
names, a choice's text (`text` vs `message` / `delta`), and the shape of `logprobs`
(completions: parallel lists `tokens`, `token_logprobs`, `top_logprobs`, `text_offset`;
chat: `content`, a list of `{token, logprob, bytes, top_logprobs}`).
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Any

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

    def response(self, finals: list[dict]) -> dict:
        choices = []
        for p, final in enumerate(finals):
            outputs = final["outputs"]
            if self.job.best_of:  # the n likeliest of best_of samples
                outputs = sorted(outputs, key=lambda o: -o["cumulative_logprob"])[: self.job.n]
            choices += [self.choice(p * self.job.n + j, out) for j, out in enumerate(outputs)]
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": choices, "usage": usage(finals), "system_fingerprint": None}

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
    def finish(self, index: int, reason: str | None) -> list[dict]: ...
    def logprobs(self, index: int, token_ids: list[int], logprobs: list, texts: dict) -> dict: ...


class CompletionFormat(_Format):
    object = chunk_object = "text_completion"
    id_prefix = "cmpl-"

    def choice(self, index: int, out: dict) -> dict:
        return {"index": index, "text": out["text"], "logprobs": self._logprobs(index, out),
                "finish_reason": finish_reason(out["finish_reason"])}

    def delta(self, index: int, out: dict) -> list[dict]:
        return [{"index": index, "text": out["text"], "logprobs": self._logprobs(index, out), "finish_reason": None}]

    def finish(self, index: int, reason: str | None) -> list[dict]:
        return [{"index": index, "text": "", "logprobs": None, "finish_reason": finish_reason(reason)}]

    def logprobs(self, index: int, token_ids: list[int], logprobs: list, texts: dict) -> dict:
        tokens = [texts.get(t, "") for t in token_ids]
        offsets, offset = [], self.offsets.get(index, 0)
        for token in tokens:
            offsets.append(offset)
            offset += len(token)
        self.offsets[index] = offset  # a stream's next chunk goes on from here
        return {"tokens": tokens,
                "token_logprobs": [dict(map(tuple, entry))[t] for entry, t in zip(logprobs, token_ids)],
                "top_logprobs": [_by_text(_ranked(entry, texts)) for entry in logprobs],
                "text_offset": offsets}


class ChatFormat(_Format):
    object, chunk_object = "chat.completion", "chat.completion.chunk"
    id_prefix = "chatcmpl-"

    def choice(self, index: int, out: dict) -> dict:
        return {"index": index, "message": {"role": "assistant", "content": out["text"], "refusal": None},
                "logprobs": self._logprobs(index, out), "finish_reason": finish_reason(out["finish_reason"])}

    def delta(self, index: int, out: dict) -> list[dict]:
        return [*self._role(index), {"index": index, "delta": {"content": out["text"]},
                                     "logprobs": self._logprobs(index, out), "finish_reason": None}]

    def finish(self, index: int, reason: str | None) -> list[dict]:
        return [*self._role(index), {"index": index, "delta": {}, "logprobs": None,
                                     "finish_reason": finish_reason(reason)}]

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
