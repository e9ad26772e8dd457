"""The wire protocol: msgpack maps in, msgpack maps out (docs/protocol.md).

Parsing is strict and never raises anything but ProtocolError, which carries the error
code, a readable message and the request id when one could be read.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import msgpack

from pagedkv.runtime.engine.outputs import RequestOutput
from pagedkv.runtime.engine.quote import quote
from pagedkv.runtime.engine.sampling_params import SamplingParams

# Stable error codes.
BAD_REQUEST, TOO_LONG, OVERLOADED, ABORTED, INTERNAL = "bad_request", "too_long", "overloaded", "aborted", "internal"

REQUEST_TYPES = ("generate", "abort", "stats", "health", "kv_state", "tokenize", "detokenize")
# Fields each message type accepts; anything else is a bad request.
FIELDS = {
    "generate": {"type", "id", "prompt", "prompt_ids", "messages", "chat", "params", "stream", "clamp_max_tokens"},
    "abort": {"type", "id"},
    "stats": {"type", "id"},
    "health": {"type", "id", "requests"},
    "kv_state": {"type", "id"},
    "tokenize": {"type", "id", "prompt", "messages", "chat", "add_special_tokens"},
    "detokenize": {"type", "id", "tokens"},
}
# A chat message's fields (OpenAI's: tool calls of an assistant, the call a tool answers, a name).
MESSAGE_FIELDS = {"role", "content", "name", "tool_calls", "tool_call_id"}
# How a chat is rendered: the tools the template shows the model, whether the assistant's turn
# is opened (add_generation_prompt) or the last message is continued (continue_final_message).
CHAT_FIELDS = {"tools": list, "add_generation_prompt": bool, "continue_final_message": bool}
MAX_DETOKENIZE = 1 << 20  # token ids one detokenize may carry
MAX_HEALTH_REQUESTS = 256  # request ids one `health` may ask about
MAX_ID_LENGTH = 256
MAX_ERROR_CHARS = 1000  # an error reply's message; quoted values are shorter still
# Text allowed per context token before tokenizing: generous for any tokenizer. A chat
# message costs at least one token (its role marker), so a chat has at most that many.
CHARS_PER_TOKEN = 32


class ProtocolError(Exception):
    def __init__(self, code: str, message: str, request_id: Any = None, param: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.request_id, self.param = code, message, request_id, param


@dataclass
class Message:
    type: str
    id: str | int
    prompt: str | None = None
    prompt_ids: list[int] | None = None
    messages: list[dict[str, Any]] | None = None
    chat: dict[str, Any] = field(default_factory=dict)  # CHAT_FIELDS
    params: SamplingParams = field(default_factory=SamplingParams)
    stream: bool = False
    # False: a max_tokens that the context cannot hold after the prompt is refused, as OpenAI's
    # API does; true: generation ends where the context does.
    clamp_max_tokens: bool = True
    requests: list[str | int] | None = None  # health: which of these ids are in flight
    add_special_tokens: bool = True  # tokenize: as the tokenizer adds them (a prompt's BOS)
    tokens: list[int] | None = None  # detokenize


def _valid_id(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return -(2**63) <= value < 2**64
    return isinstance(value, str) and 0 < len(value) <= MAX_ID_LENGTH


def decode_message(payload: bytes, max_prompt_chars: int) -> Message:
    try:
        data = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception as e:  # msgpack raises several unrelated types for bad bytes
        raise ProtocolError(BAD_REQUEST, f"the message is not valid msgpack ({type(e).__name__})")
    if not isinstance(data, dict):
        raise ProtocolError(BAD_REQUEST, f"a message must be a msgpack map, got {type(data).__name__}")
    request_id = data.get("id")
    if not _valid_id(request_id):
        raise ProtocolError(BAD_REQUEST, "the message needs an 'id': a non-empty string (at most "
                            f"{MAX_ID_LENGTH} characters) or an integer")
    kind = data.get("type")
    if kind not in REQUEST_TYPES:
        raise ProtocolError(BAD_REQUEST, f"unknown message type {quote(kind)}; expected one of "
                            f"{', '.join(REQUEST_TYPES)}", request_id)
    unknown = sorted(quote(k, 60) for k in data if k not in FIELDS[kind])
    if unknown:
        raise ProtocolError(BAD_REQUEST, f"unknown field(s) in a {kind} message: {', '.join(unknown[:5])}",
                            request_id)
    if kind == "health" and "requests" in data:
        requests = data["requests"]
        if not isinstance(requests, list) or len(requests) > MAX_HEALTH_REQUESTS or not all(
                _valid_id(i) for i in requests):
            raise ProtocolError(BAD_REQUEST, f"'requests' must be a list of at most {MAX_HEALTH_REQUESTS} request "
                                "ids", request_id)
        return Message(kind, request_id, requests=requests)
    if kind == "detokenize":
        tokens = data.get("tokens")
        if not isinstance(tokens, list) or len(tokens) > MAX_DETOKENIZE or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise ProtocolError(BAD_REQUEST, f"'tokens' must be a list of at most {MAX_DETOKENIZE} integers",
                                request_id)
        return Message(kind, request_id, tokens=tokens)
    if kind == "tokenize":
        msg = _prompt_source(data, request_id, max_prompt_chars, ("prompt", "messages"), Message(kind, request_id))
        msg.add_special_tokens = data.get("add_special_tokens", msg.messages is None)
        if not isinstance(msg.add_special_tokens, bool):
            raise ProtocolError(BAD_REQUEST, "'add_special_tokens' must be a boolean", request_id)
        return msg
    if kind != "generate":
        return Message(kind, request_id)
    return _generate(data, request_id, max_prompt_chars)


def _generate(data: dict, request_id: str | int, max_prompt_chars: int) -> Message:
    msg = Message("generate", request_id, stream=data.get("stream", False),
                  clamp_max_tokens=data.get("clamp_max_tokens", True))
    for name in ("stream", "clamp_max_tokens"):
        if not isinstance(getattr(msg, name), bool):
            raise ProtocolError(BAD_REQUEST, f"'{name}' must be a boolean, got {quote(getattr(msg, name))}",
                                request_id)
    _prompt_source(data, request_id, max_prompt_chars, ("prompt", "prompt_ids", "messages"), msg)
    try:
        msg.params = SamplingParams.from_dict(data.get("params", {}))
    except (TypeError, ValueError) as e:
        raise ProtocolError(BAD_REQUEST, f"invalid sampling parameters: {e}", request_id)
    return msg


def _text_size(value: Any, depth: int = 0) -> int:
    """Characters of the strings in a message's value (keys included), for the size bound."""
    if isinstance(value, str):
        return len(value)
    if depth > 32:
        raise ValueError("nested too deeply")
    if isinstance(value, dict):
        return sum(_text_size(k, depth + 1) + _text_size(v, depth + 1) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return sum(_text_size(v, depth + 1) for v in value)
    return 8


def _valid_chat_message(m: Any) -> bool:
    if not isinstance(m, dict) or not set(m) <= MESSAGE_FIELDS or not isinstance(m.get("role"), str):
        return False
    if not isinstance(m.get("content"), str) and not (m.get("content") is None and "content" in m):
        return False
    for name in ("name", "tool_call_id"):
        if name in m and not isinstance(m[name], str):
            return False
    calls = m.get("tool_calls")
    return calls is None or (isinstance(calls, list) and all(isinstance(c, dict) for c in calls))


def _prompt_source(data: dict, request_id: str | int, max_prompt_chars: int, kinds: tuple[str, ...],
                   msg: Message) -> Message:
    sources = [k for k in kinds if k in data]
    if len(sources) != 1:
        raise ProtocolError(BAD_REQUEST, f"a {msg.type} message needs exactly one of "
                            f"{', '.join(repr(k) for k in kinds)}, got {sources or 'none'}", request_id)
    if "chat" in data and "messages" not in data:
        raise ProtocolError(BAD_REQUEST, "'chat' goes with 'messages'", request_id)
    if "prompt" in data:
        msg.prompt = data["prompt"]
        if not isinstance(msg.prompt, str):
            raise ProtocolError(BAD_REQUEST, "'prompt' must be a string", request_id)
        _check_size(len(msg.prompt), max_prompt_chars, request_id)
    elif "prompt_ids" in data:
        msg.prompt_ids = data["prompt_ids"]
        if not isinstance(msg.prompt_ids, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in msg.prompt_ids):
            raise ProtocolError(BAD_REQUEST, "'prompt_ids' must be a list of integers", request_id)
    else:
        msg.messages = data["messages"]
        max_messages = max_prompt_chars // CHARS_PER_TOKEN
        if isinstance(msg.messages, list) and len(msg.messages) > max_messages:
            raise ProtocolError(TOO_LONG, f"the chat has {len(msg.messages)} messages, more than this server "
                                f"takes ({max_messages}: one per token of the model's context)", request_id)
        if not isinstance(msg.messages, list) or not msg.messages or not all(
                _valid_chat_message(m) for m in msg.messages):
            raise ProtocolError(BAD_REQUEST, "'messages' must be a non-empty list of maps with a string 'role', "
                                "a 'content' that is a string (or null), and optionally a string 'name' and "
                                "'tool_call_id' and a list of maps 'tool_calls'", request_id)
        msg.chat = data.get("chat", {})
        if not isinstance(msg.chat, dict) or not all(
                k in CHAT_FIELDS and isinstance(v, CHAT_FIELDS[k]) for k, v in msg.chat.items()):
            raise ProtocolError(BAD_REQUEST, "'chat' must be a map of 'tools' (a list), 'add_generation_prompt' and "
                                "'continue_final_message' (booleans)", request_id)
        if msg.chat.get("add_generation_prompt") and msg.chat.get("continue_final_message"):
            raise ProtocolError(BAD_REQUEST, "'add_generation_prompt' and 'continue_final_message' exclude each "
                                "other", request_id)
        # Everything the template renders counts: roles, contents, tool calls, the tools.
        try:
            size = sum(_text_size(v) for m in msg.messages for v in m.values() if v is not None)
            size += _text_size(msg.chat.get("tools", []))
        except ValueError:
            raise ProtocolError(BAD_REQUEST, "'messages' or 'chat.tools' are nested too deeply", request_id)
        _check_size(size, max_prompt_chars, request_id)
    return msg


def _check_size(num_chars: int, max_chars: int, request_id: str | int) -> None:
    # Checked before tokenizing, so that several MiB of text cost nothing.
    if num_chars > max_chars:
        raise ProtocolError(TOO_LONG, f"the prompt has {num_chars} characters, more than this "
                            f"server takes ({max_chars})", request_id)


def encode(reply: dict) -> bytes:
    return msgpack.packb(reply, use_bin_type=True)


def error_reply(request_id: Any, code: str, message: str, param: str | None = None) -> dict:
    """`param`, when given, names the parameter at fault."""
    if len(message) > MAX_ERROR_CHARS:
        message = message[: MAX_ERROR_CHARS - 3] + "..."
    reply = {"type": "error", "id": request_id, "code": code, "message": message}
    if param is not None:
        reply["param"] = param
    return reply


def final_reply(request_id: Any, output: RequestOutput, token_text: Callable[[int], str] | None = None) -> dict:
    """token_text (one token id -> its text) adds `token_texts` for the ids in the logprobs."""
    reply = {"type": "final", "id": request_id, "prompt_tokens": len(output.prompt_token_ids),
             "queue_s": output.queue_time,
             "outputs": [{"index": c.index, "token_ids": c.token_ids, "text": c.text,
                          "cumulative_logprob": c.cumulative_logprob, "finish_reason": c.finish_reason,
                          "logprobs": logprob_lists(c.logprobs)} for c in output.outputs]}
    if token_text is not None:
        for out, c in zip(reply["outputs"], output.outputs):
            if c.logprobs is not None:
                out["token_texts"] = token_texts(c.logprobs, token_text)
    reply.update(prompt_logprob_fields(output, token_text))
    return reply


def prompt_logprob_fields(output: RequestOutput, token_text: Callable[[int], str] | None = None) -> dict:
    """A reply's prompt logprobs, when the request asked for them and they are done:
    `prompt_token_ids`, `prompt_logprobs` (null for the first token, then per position
    [[token_id, logprob, rank], ...]: the prompt token first, then the top ones, likeliest
    first) and, with token_text, `prompt_token_texts` (the text of every id named there and
    of the first prompt token)."""
    if output.prompt_logprobs is None:
        return {}
    fields: dict[str, Any] = {
        "prompt_token_ids": output.prompt_token_ids,
        "prompt_logprobs": [None if entry is None else [[t, lp, rank] for t, (lp, rank) in entry.items()]
                            for entry in output.prompt_logprobs]}
    if token_text is not None:
        ids = dict.fromkeys(output.prompt_token_ids[:1])
        for entry in output.prompt_logprobs[1:]:
            ids.update(dict.fromkeys(entry))
        fields["prompt_token_texts"] = {t: token_text(t) for t in ids}
    return fields


def logprob_lists(logprobs: list[dict[int, float]] | None) -> list[list[tuple[int, float]]] | None:
    return None if logprobs is None else [sorted(d.items()) for d in logprobs]


def token_texts(logprobs: list[dict[int, float]], token_text: Callable[[int], str]) -> dict[int, str]:
    """The text of every token id that the logprobs name (each token decoded alone)."""
    return {t: token_text(t) for d in logprobs for t in d}
