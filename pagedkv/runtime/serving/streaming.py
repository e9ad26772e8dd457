"""Text deltas for streamed outputs.

The engine decodes text once, when a sequence ends. A stream needs the text as it grows:
each output's ids are decoded in full every step (cheap next to a model step) and the part
not sent yet goes out, except for what may still change: an incomplete UTF-8 character
(decoded as U+FFFD) and, with stop strings, the last characters that could begin one (the
stop string itself is never returned). The final delta completes the final text exactly.
"""
from __future__ import annotations

from typing import Callable

from pagedkv.runtime.engine.outputs import RequestOutput
from pagedkv.runtime.serving.protocol import logprob_lists, prompt_logprob_fields, token_texts

REPLACEMENT = "\ufffd"


class TextStream:
    def __init__(self, decode: Callable[[list[int]], str], stop: list[str]) -> None:
        self.decode = decode
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.token_ids: list[int] = []
        self.sent = ""

    def push(self, new_ids: list[int]) -> str:
        """Adds a step's new tokens; returns the text that can be sent now."""
        self.token_ids += new_ids
        text = self.decode(self.token_ids)
        if text.endswith(REPLACEMENT) or not text.startswith(self.sent):
            return ""
        safe = text[: max(len(text) - self.holdback, 0)]
        delta = safe[len(self.sent):]
        self.sent += delta
        return delta

    def finish(self, final_text: str) -> str:
        """The rest of the final text; its concatenation with all deltas is final_text."""
        if final_text.startswith(self.sent):
            delta = final_text[len(self.sent):]
            self.sent = final_text
            return delta
        return ""  # cannot happen with prefix-stable decoding; the final message is authoritative


class RequestStream:
    """The text streams of one request's outputs (samples or beams), by output index."""

    def __init__(self, decode: Callable[[list[int]], str], stop: list[str],
                 token_text: Callable[[int], str] | None = None) -> None:
        self.decode, self.stop = decode, stop
        self.token_text = token_text  # with logprobs: adds them, and their tokens' texts, to each delta
        self.texts: dict[int, TextStream] = {}
        self.prompt_sent = False  # prompt logprobs go out once, with the first reply after the prompt

    def prompt_fields(self, output: RequestOutput) -> dict:
        """The prompt logprobs' fields for this reply: the first time they are there, else none."""
        if self.prompt_sent or output.prompt_logprobs is None:
            return {}
        self.prompt_sent = True
        return prompt_logprob_fields(output, self.token_text)

    def deltas(self, output: RequestOutput) -> list[dict]:
        """What this step adds to each output: {"index", "token_ids", "text"}, changed ones only."""
        deltas = []
        for c in output.outputs:
            text = self.texts.setdefault(c.index, TextStream(self.decode, self.stop))
            if c.finish_reason:  # beam search sends its tokens only here, at the end
                new_ids = c.token_ids[len(text.token_ids):]
                text.token_ids += new_ids
                delta = text.finish(c.text)
            else:
                new_ids, delta = c.new_token_ids, text.push(c.new_token_ids)
            if new_ids or delta:
                deltas.append({"index": c.index, "token_ids": new_ids, "text": delta})
                if c.logprobs is not None and self.token_text is not None:
                    end = len(text.token_ids)
                    new = c.logprobs[end - len(new_ids):end]
                    deltas[-1].update(logprobs=logprob_lists(new), token_texts=token_texts(new, self.token_text))
        return deltas
