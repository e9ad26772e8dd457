"""OpenAI request bodies -> engine requests: what to send (one engine request per prompt) and
how to answer (how many choices, streamed or not, which logprobs). Every bad field is a 400
that names it (docs/openai_api.md lists what is supported).

Beam search takes vLLM's extra parameters: `use_beam_search: true` searches with a beam as wide
as `best_of` (default `n`) and returns the `n` best beams; `beam_width` sets the width directly.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields
from typing import Any

from pagedkv.runtime.engine.quote import quote
from pagedkv.runtime.engine.sampling_params import INT64_MAX, INT64_MIN, MAX_LOGPROBS, SamplingParams
from pagedkv.runtime.serving.http.errors import ApiError, bad_request

log = logging.getLogger("pagedkv.api")
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
# Fields that OpenAI (or vLLM) defines and that are accepted without effect.
IGNORED = {"model", "user", "metadata", "store", "service_tier", "parallel_tool_calls", "skip_special_tokens",
           "spaces_between_special_tokens", "add_generation_prompt", "echo", "min_tokens", "repetition_penalty",
           "presence_penalty", "frequency_penalty", "logit_bias", "suffix", "tools", "tool_choice",
           "response_format", "functions", "function_call", "reasoning_effort", "modalities"}
# Engine sequences one HTTP request may ask for: its prompts times n (or best_of, or beam_width).
# OpenAI's n goes up to 128.
MAX_SEQUENCES = 256
# The chat roles OpenAI's API defines, and vLLM's "function" (the older name of "tool").
ROLES = ("system", "developer", "user", "assistant", "tool", "function")
SAMPLING = ("temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids", "ignore_eos",
            "length_penalty", "early_stopping")


@dataclass
class Job:
    """One HTTP request's work: `sources` are the engine requests (one per prompt)."""

    chat: bool
    model: str | None
    sources: list[dict]           # {"prompt": str} | {"prompt_ids": [int]} | {"messages": [...]}
    params: dict                  # engine sampling parameters (SamplingParams names)
    n: int = 1                    # choices per prompt
    best_of: int | None = None    # sampled candidates per prompt; the n likeliest are returned
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False        # answer with logprobs (their count is params["logprobs"])
    # A max_tokens given (or completions' default) must fit in the context the prompt leaves, as
    # in OpenAI's API and vLLM's; a chat without one runs to the end of the context.
    clamp_max_tokens: bool = False
    max_tokens_param: str = "max_tokens"  # the name the client used, for errors
    unknown: list[str] = field(default_factory=list)


def _get(body: dict, name: str, kinds: tuple[type, ...], default: Any = None) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds:  # JSON true is not a number
        raise bad_request(f"'{name}' must be {_describe(kinds)}, got {value!r}", name)
    if not isinstance(value, kinds):
        raise bad_request(f"'{name}' must be {_describe(kinds)}, got {type(value).__name__}", name)
    if isinstance(value, int) and not isinstance(value, bool) and not INT64_MIN <= value <= INT64_MAX:
        raise bad_request(f"'{name}' must be a 64-bit integer (from -2**63 to 2**63 - 1), got {quote(value)}",
                          name)
    return value


def _describe(kinds: tuple[type, ...]) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
             dict: "an object"}
    return " or ".join(dict.fromkeys(names[k] for k in kinds if k in names))


def _unsupported(body: dict) -> None:
    """Fields we know but cannot honour: refused when they ask for something, as vLLM would not do it."""
    checks = [("suffix", body.get("suffix") not in (None, "")),
              ("echo", bool(body.get("echo"))),
              ("logit_bias", bool(body.get("logit_bias"))),
              ("presence_penalty", body.get("presence_penalty") not in (None, 0, 0.0)),
              ("frequency_penalty", body.get("frequency_penalty") not in (None, 0, 0.0)),
              ("repetition_penalty", body.get("repetition_penalty") not in (None, 1, 1.0)),
              ("min_tokens", body.get("min_tokens") not in (None, 0)),
              ("tools", bool(body.get("tools")) or bool(body.get("functions"))),
              ("tool_choice", body.get("tool_choice") not in (None, "none", "auto")),
              ("response_format", body.get("response_format") not in (None, {"type": "text"}))]
    for name, asked in checks:
        if asked:
            raise bad_request(f"'{name}' is not supported by this server", name)


def _check_fan_out(body: dict, chat: bool, max_model_len: int | None) -> None:
    """Before anything else is looked at: how many engine requests (one per prompt) and
    sequences (n, best_of or beam_width per prompt) the request asks for, how long a token-id
    prompt is and how many messages a chat has. 20,000 prompts once meant 20,000 engine requests, which held up every
    other client for 20 s before most of them were refused as overloaded."""
    prompt = None if chat else body.get("prompt")
    several = isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], (str, list))
    prompts = len(prompt) if several else 1
    widths = {name: _get(body, name, (int,)) for name in ("n", "best_of", "beam_width")}
    width = max([1, *(w for w in widths.values() if w is not None)])
    if prompts * width > MAX_SEQUENCES:
        param = "prompt" if width == 1 else max(widths, key=lambda k: widths[k] or 0)
        raise bad_request(f"the request asks for {prompts} prompt(s) of {width} sequence(s) each, "
                          f"{prompts * width} in all; this server takes at most {MAX_SEQUENCES} per request "
                          "(a prompt list times n, best_of or beam_width)", param)
    token_lists = prompt if several else [prompt]
    if max_model_len and isinstance(prompt, list) and any(
            isinstance(p, list) and len(p) >= max_model_len for p in token_lists):
        longest = max(len(p) for p in token_lists if isinstance(p, list))
        raise ApiError(413, f"the prompt has {longest} tokens; the model's context is {max_model_len}",
                       code="context_length_exceeded")
    messages = body.get("messages") if chat else None
    if max_model_len and isinstance(messages, list) and len(messages) > max_model_len:
        # Each message costs at least one token (its role marker); the engine counts so too.
        raise ApiError(413, f"the chat has {len(messages)} messages, more than the model's context holds "
                       f"({max_model_len} tokens)", code="context_length_exceeded")


def _prompts(body: dict) -> list[dict]:
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [{"prompt": prompt}]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return [{"prompt": p} for p in prompt]
        if _token_ids(prompt):
            return [{"prompt_ids": prompt}]
        if all(isinstance(p, list) and p and _token_ids(p) for p in prompt):
            return [{"prompt_ids": p} for p in prompt]
    raise bad_request("'prompt' must be a string, a list of strings, a list of token ids (integers from 0 to "
                      "2**63 - 1) or a list of such lists (none empty)", "prompt")


def _token_ids(ids: list) -> bool:
    return all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= INT64_MAX for t in ids)


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad_request(f"messages[{i}] must be an object with a string 'role'", "messages")
        if m["role"] not in ROLES:
            # The template renders a role verbatim: another one could carry control tokens.
            raise bad_request(f"messages[{i}].role {quote(m['role'], 60)} is not one of the roles of the "
                              f"API: {', '.join(ROLES)}", "messages")
        out.append({"role": m["role"], "content": _content(m.get("content"), i)})
    return out


def _content(content: Any, i: int) -> str:
    """A message's text: a string, or a list of text parts (joined), as OpenAI allows."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        if all(p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            return "".join(p["text"] for p in content)
        raise bad_request(f"messages[{i}].content: only text parts are supported", "messages")
    raise bad_request(f"messages[{i}].content must be a string or a list of text parts", "messages")


SHIPPED = ("temperature", "top_p", "top_k", "min_p")  # the settings a model may ship (generation_config.json, GGUF)


def parse(body: Any, chat: bool, max_model_len: int | None, defaults: dict | None = None) -> Job:
    """The request's job. `defaults`: the sampling settings the model ships, which fields the
    request leaves out take (as vLLM applies a model's generation_config); OpenAI's otherwise."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    _unsupported(body)
    _check_fan_out(body, chat, max_model_len)
    model = _get(body, "model", (str,))
    sources = [{"messages": _messages(body)}] if chat else _prompts(body)
    stream = _get(body, "stream", (bool,), False)
    options = _get(body, "stream_options", (dict,))
    if options is not None and not stream:
        raise bad_request("'stream_options' needs 'stream': true", "stream_options")
    include_usage = bool((options or {}).get("include_usage", False))

    params: dict[str, Any] = {}
    max_tokens_param, clamp = "max_tokens", False
    if chat:  # max_completion_tokens replaces max_tokens in OpenAI's chat API
        max_tokens = _get(body, "max_completion_tokens", (int,))
        if max_tokens is not None:
            max_tokens_param = "max_completion_tokens"
        max_tokens = _get(body, "max_tokens", (int,)) if max_tokens is None else max_tokens
        # Unset: as many as the context leaves (the engine stops at the model's context).
        clamp = max_tokens is None
        params["max_tokens"] = max_tokens if max_tokens is not None else max_model_len or COMPLETION_DEFAULT_MAX_TOKENS
    else:
        params["max_tokens"] = _get(body, "max_tokens", (int,), COMPLETION_DEFAULT_MAX_TOKENS)
    for name in SAMPLING:
        if body.get(name) is not None:
            params[name] = body[name]
    for name, value in (defaults or {}).items():
        if name in SHIPPED and body.get(name) is None:
            params[name] = value
    params.setdefault("temperature", 1.0)  # OpenAI's default (SamplingParams' too, said here for clarity)
    if isinstance(params.get("early_stopping"), str) and params["early_stopping"] != "never":
        raise bad_request("'early_stopping' must be true, false or \"never\"", "early_stopping")

    n = _get(body, "n", (int,), 1)
    best_of = _get(body, "best_of", (int,))
    beam_width = _get(body, "beam_width", (int,))
    if n < 1:
        raise bad_request(f"'n' must be >= 1, got {n}", "n")
    if best_of is not None and best_of < n:
        raise bad_request(f"'best_of' must be >= n ({n}), got {best_of}", "best_of")
    if _get(body, "use_beam_search", (bool,), False):
        beam_width = best_of or n
        if beam_width == 1:  # a beam of one is greedy decoding
            params["temperature"] = 0.0
    if beam_width is not None and beam_width > 1:
        if chat and body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
            # Beams end at max_tokens, not at the end of the model's context.
            raise bad_request("beam search needs 'max_tokens' (or 'max_completion_tokens')", "max_tokens")
        params.update(beam_width=beam_width, n=n)
        best_of = None
    else:
        params["n"] = best_of or n
        if best_of is not None and best_of > n and stream:
            raise bad_request("'best_of' larger than 'n' cannot be streamed", "best_of")
    job = Job(chat, model, sources, params, n, best_of if best_of and best_of > n else None, stream,
              include_usage, clamp_max_tokens=clamp, max_tokens_param=max_tokens_param,
              unknown=sorted(body.keys() - _known(chat)))
    _logprobs(body, job)
    checked = _validate(params)
    # What the engine gets is what was checked: 10**30 as a temperature is valid, but an integer
    # that size cannot travel.
    job.params = {name: getattr(checked, name) for name in params}
    if job.unknown:
        shown = ", ".join(quote(k, 60) for k in job.unknown[:10])
        more = f" and {len(job.unknown) - 10} more" if len(job.unknown) > 10 else ""
        log.warning("ignoring unknown request field(s): %s%s", shown, more)
    return job


def _logprobs(body: dict, job: Job) -> None:
    if job.chat:
        wanted = _get(body, "logprobs", (bool,), False)
        top = _get(body, "top_logprobs", (int,))
        if top is not None and not wanted:
            raise bad_request("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        count, name = (top or 0) if wanted else None, "top_logprobs"
    else:
        count, name = _get(body, "logprobs", (int,)), "logprobs"
    if count is None:
        return
    if not 0 <= count <= MAX_LOGPROBS:
        raise bad_request(f"'{name}' must be in [0, {MAX_LOGPROBS}], got {count}", name)
    if job.params.get("beam_width", 1) > 1:
        raise bad_request("logprobs are not available with beam search", name)
    job.logprobs, job.params["logprobs"] = True, count


def _validate(params: dict) -> SamplingParams:
    """SamplingParams' own checks, here too, so that the error names the field."""
    try:
        return SamplingParams.from_dict(params)
    except (TypeError, ValueError) as e:
        message = str(e)
        name = message.split(" ", 1)[0]
        raise bad_request(message, name if name in {f.name for f in fields(SamplingParams)} else None)


def _known(chat: bool) -> set[str]:
    common = {"stream", "stream_options", "n", "best_of", "use_beam_search", "beam_width", "logprobs",
              "max_tokens", *SAMPLING, *IGNORED}
    return common | ({"messages", "top_logprobs", "max_completion_tokens"} if chat else {"prompt"})
