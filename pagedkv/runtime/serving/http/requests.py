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

import json

from pagedkv.runtime.engine.quote import quote
from pagedkv.runtime.engine.sampling_params import INT64_MAX, INT64_MIN, MAX_LOGPROBS, SamplingParams
from pagedkv.runtime.serving import tool_calls
from pagedkv.runtime.serving.http.errors import ApiError, bad_request

log = logging.getLogger("pagedkv.api")
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
# Fields that OpenAI (or vLLM) defines, that change nothing this server returns, and that are
# accepted and ignored (docs/openai_api.md). Any other field this server does not know is a 400
# naming it, as in OpenAI's API: a misspelt or unsupported parameter must not go unnoticed.
IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "reasoning_effort",
           "guided_decoding_backend", "request_id", "safety_identifier", "prompt_cache_key"}
# Known fields that this server honours only with their neutral value; another is a 400.
NEUTRAL = {"skip_special_tokens": True, "spaces_between_special_tokens": True,
           "suffix": "", "modalities": ["text"], "echo": False, "chat_template_kwargs": {}, "documents": None,
           "audio": None, "prediction": None, "web_search_options": None, "functions": None, "function_call": None}
# Structured outputs: OpenAI's response_format, vLLM's structured_outputs and its legacy names.
LEGACY_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                 "guided_grammar": "grammar"}
# Engine sequences one HTTP request may ask for: its prompts times n (or best_of, or beam_width).
# OpenAI's n goes up to 128.
MAX_SEQUENCES = 256
# The chat roles OpenAI's API defines, and vLLM's "function" (the older name of "tool").
ROLES = ("system", "developer", "user", "assistant", "tool", "function")
SAMPLING = ("temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids", "ignore_eos",
            "length_penalty", "early_stopping", "presence_penalty", "frequency_penalty", "repetition_penalty",
            "min_tokens", "include_stop_str_in_output", "truncate_prompt_tokens")


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
    structured_param: str = "structured_outputs"  # the field that asked for structured outputs
    chat_options: dict = field(default_factory=dict)  # protocol's "chat": tools, generation prompt
    tool_mode: str | None = None  # "auto", "required" or "named" (tool_choice), None: no tool calls
    tool_name: str | None = None  # named: the function
    tool_parser: str | None = None  # auto: the model's tool-call format (tool_calls.py)
    echo: bool = False  # completions: the prompt before each choice's text
    # vLLM's prompt_logprobs: how many of the likeliest tokens the response's `prompt_logprobs`
    # lists per prompt position (None: no such field). The engine computes at least as many
    # (params["prompt_logprobs"]): completions' echo with logprobs needs them too.
    prompt_logprobs: int | None = None


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


def _unsupported(body: dict, chat: bool) -> None:
    """Unknown fields, and known ones that ask for what this server cannot do: a 400 naming them."""
    unknown = sorted(body.keys() - _known(chat))
    if unknown:
        shown = ", ".join(quote(k, 60) for k in unknown[:10])
        more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
        raise bad_request(f"unknown field(s) {shown}{more}: this server does not know "
                          f"{'them' if len(unknown) > 1 else 'it'} (docs/openai_api.md lists what it takes)",
                          unknown[0])
    for name, neutral in NEUTRAL.items():
        if name in body and body[name] is not None and body[name] != neutral and not (
                name == "echo" and not chat):
            raise bad_request(f"'{name}' is not supported by this server (only {json.dumps(neutral)})", name)


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
        out.append(_message(m, i))
    return out


# A message's fields: OpenAI's, of which those a response carries (refusal, annotations, audio,
# function_call) are taken when null, as clients send a reply's message back in the next turn.
_MESSAGE_NULLS = {"refusal", "annotations", "audio", "function_call", "reasoning_content"}


def _message(m: dict, i: int) -> dict:
    role = m["role"]
    for key, value in m.items():
        if key not in ("role", "content", "name", "tool_calls", "tool_call_id") and not (
                key in _MESSAGE_NULLS and value is None):
            raise bad_request(f"messages[{i}].{quote(key, 60)} is not a field this server takes", "messages")
    calls = m.get("tool_calls")
    content = m.get("content")
    if content is None and (calls or role == "assistant"):
        content = ""  # an assistant's turn that only calls tools
    out: dict[str, Any] = {"role": role, "content": _content(content, i)}
    for key in ("name", "tool_call_id"):
        if m.get(key) is not None:
            if not isinstance(m[key], str):
                raise bad_request(f"messages[{i}].{key} must be a string", "messages")
            out[key] = m[key]
    if calls:
        if role != "assistant" or not isinstance(calls, list):
            raise bad_request(f"messages[{i}].tool_calls must be a list, on an assistant's message", "messages")
        out["tool_calls"] = [_tool_call(c, i) for c in calls]
    return out


def _tool_call(call: Any, i: int) -> dict:
    """An assistant's tool call, its arguments parsed from JSON text into an object: what chat
    templates expect (as vLLM and transformers give them)."""
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or call.get("type", "function") != "function":
        raise bad_request(f"messages[{i}].tool_calls must be {{\"id\", \"type\": \"function\", \"function\": "
                          "{\"name\", \"arguments\"}}", "messages")
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            raise bad_request(f"messages[{i}].tool_calls: the arguments of {quote(fn['name'], 60)} are not JSON",
                              "messages") from None
    out = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
    if isinstance(call.get("id"), str):
        out["id"] = call["id"]
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


def parse(body: Any, chat: bool, max_model_len: int | None, defaults: dict | None = None,
          tool_parser: str | None = None) -> Job:
    """The request's job. `defaults`: the sampling settings the model ships, which fields the
    request leaves out take (as vLLM applies a model's generation_config); OpenAI's otherwise.
    `tool_parser`: the chat template's tool-call format (tool_calls.py)."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    _unsupported(body, chat)
    _check_fan_out(body, chat, max_model_len)
    model = _get(body, "model", (str,))
    sources = [{"messages": _messages(body)}] if chat else _prompts(body)
    echo = False if chat else _get(body, "echo", (bool,), False)
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
    bias = _logit_bias(body)
    if bias:
        params["logit_bias"] = bias
    structured, structured_param = _structured(body)
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
              include_usage, clamp_max_tokens=clamp, max_tokens_param=max_tokens_param, echo=echo)
    if chat:
        structured, structured_param = _chat_options(body, job, structured, structured_param, tool_parser)
    if structured is not None:
        params["structured_outputs"] = structured
        job.structured_param = structured_param
    _logprobs(body, job)
    _prompt_logprobs(body, job)
    checked = _validate(params)
    # What the engine gets is what was checked: 10**30 as a temperature is valid, but an integer
    # that size cannot travel.
    job.params = {name: getattr(checked, name) for name in params}
    return job


def _logit_bias(body: dict) -> dict[int, float] | None:
    """OpenAI's logit_bias: token ids as JSON object keys (strings) -> -100..100."""
    bias = _get(body, "logit_bias", (dict,))
    if not bias:
        return None
    out = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise bad_request(f"'logit_bias' keys must be token ids, got {quote(key, 60)}", "logit_bias") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad_request(f"'logit_bias' values must be numbers, got {quote(value, 60)}", "logit_bias")
        out[token] = value
    return out


def _structured(body: dict) -> tuple[dict | None, str]:
    """The structured-output request, from whichever field asked (at most one may)."""
    asked: list[tuple[str, dict]] = []
    fmt = _get(body, "response_format", (dict,))
    if fmt is not None:
        kind = fmt.get("type")
        if kind == "json_object":
            asked.append(("response_format", {"json_object": True}))
        elif kind == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
                raise bad_request("'response_format.json_schema' must be an object with a 'name' and a "
                                  "'schema'", "response_format")
            structured = {"json": spec.get("schema", {})}
            if spec.get("strict") is not None:
                structured["strict"] = spec["strict"]
            asked.append(("response_format", structured))
        elif kind != "text":
            raise bad_request(f"'response_format.type' must be text, json_object or json_schema, got "
                              f"{quote(kind, 60)}", "response_format")
    so = _get(body, "structured_outputs", (dict,))
    if so is not None:
        asked.append(("structured_outputs", dict(so)))
    for name, kind in LEGACY_GUIDED.items():
        if body.get(name) is not None:
            asked.append((name, {kind: body[name]}))
    if body.get("guided_whitespace_pattern") is not None:
        raise bad_request("'guided_whitespace_pattern' is not supported by this server", "guided_whitespace_pattern")
    if len(asked) > 1:
        raise bad_request(f"give at most one of {', '.join(name for name, _ in asked)}", asked[1][0])
    if not asked:
        return None, "structured_outputs"
    name, spec = asked[0]
    try:
        from pagedkv.runtime.engine.sampling_params import check_structured_outputs

        return check_structured_outputs(spec), name
    except ValueError as e:
        raise bad_request(str(e).replace("structured_outputs", name, 1), name) from None


def _check_tools(tools: Any) -> list[dict]:
    if not isinstance(tools, list) or not all(
            isinstance(t, dict) and t.get("type") == "function" and isinstance(t.get("function"), dict)
            and isinstance(t["function"].get("name"), str) and t["function"]["name"]
            and isinstance(t["function"].get("parameters", {}), dict) for t in tools):
        raise bad_request("'tools' must be a list of {\"type\": \"function\", \"function\": {\"name\", "
                          "\"description\", \"parameters\"}}", "tools")
    return tools


def _chat_options(body: dict, job: Job, structured: dict | None, structured_param: str,
                  tool_parser: str | None) -> tuple[dict | None, str]:
    """Tools, tool_choice and the template's options; tool_choice required or named becomes a
    JSON schema (structured outputs)."""
    options: dict[str, Any] = {}
    cont = _get(body, "continue_final_message", (bool,), False)
    gen = _get(body, "add_generation_prompt", (bool,))
    if cont and gen:
        raise bad_request("'continue_final_message' and 'add_generation_prompt' cannot both be true",
                          "continue_final_message")
    if cont:
        if job.sources[0]["messages"][-1]["role"] != "assistant":
            raise bad_request("'continue_final_message' needs the last message to be the assistant's",
                              "continue_final_message")
        options["continue_final_message"] = True
        options["add_generation_prompt"] = False
    elif gen is not None:
        options["add_generation_prompt"] = gen
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if tools is None or tools == []:
        if choice not in (None, "none"):
            raise bad_request("'tool_choice' needs 'tools'", "tool_choice")
        job.chat_options = options
        return structured, structured_param
    tools = _check_tools(tools)
    names = [t["function"]["name"] for t in tools]
    choice = "auto" if choice is None else choice
    if choice != "none":
        options["tools"] = tools
    job.chat_options = options
    if choice == "none":
        return structured, structured_param
    if choice == "auto":
        if tool_parser is None:
            raise bad_request("this model's chat template has no tool-call format this server can read "
                              "(Hermes <tool_call> or Llama 3 JSON): tool_choice \"auto\" is not available; "
                              "name a tool or use \"required\"", "tool_choice")
        job.tool_mode, job.tool_parser = "auto", tool_parser
        return structured, structured_param
    if structured is not None:
        raise bad_request(f"'{structured_param}' cannot be combined with tool_choice {quote(choice, 60)}",
                          structured_param)
    if choice == "required":
        job.tool_mode = "required"
        return {"json": tool_calls.schema_for_required(tools)}, "tool_choice"
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if not (isinstance(choice, dict) and choice.get("type") == "function" and name in names):
        raise bad_request(f"'tool_choice' must be \"none\", \"auto\", \"required\" or "
                          f"{{\"type\": \"function\", \"function\": {{\"name\": ...}}}} naming one of the tools "
                          f"({', '.join(names[:10])}), got {quote(choice, 100)}", "tool_choice")
    job.tool_mode, job.tool_name = "named", name
    fn = tools[names.index(name)]["function"]
    spec = {"json": fn.get("parameters") or {"type": "object"}}
    if isinstance(fn.get("strict"), bool):
        spec["strict"] = fn["strict"]
    return spec, "tool_choice"


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


def _prompt_logprobs(body: dict, job: Job) -> None:
    """vLLM's prompt_logprobs, and completions' echo with logprobs, which lists the prompt's
    tokens with their logprobs first (OpenAI's legacy behaviour): the engine computes the
    prompt's logprobs for either. As in vLLM, echo with logprobs reports them in
    `prompt_logprobs` too, with `logprobs` alternatives, unless prompt_logprobs says how many."""
    asked = _get(body, "prompt_logprobs", (int,))
    if asked is not None:
        if not 0 <= asked <= MAX_LOGPROBS:
            raise bad_request(f"'prompt_logprobs' must be in [0, {MAX_LOGPROBS}], got {asked}", "prompt_logprobs")
        if job.stream:
            raise bad_request("'prompt_logprobs' are not available with 'stream': true", "prompt_logprobs")
    echoed = job.params.get("logprobs") if job.echo and job.logprobs else None
    job.prompt_logprobs = asked if asked is not None or job.stream else echoed
    wanted = [k for k in (asked, echoed) if k is not None]
    if wanted:
        job.params["prompt_logprobs"] = max(wanted)


def _validate(params: dict) -> SamplingParams:
    """SamplingParams' own checks, here too, so that the error names the field."""
    try:
        return SamplingParams.from_dict(params)
    except (TypeError, ValueError) as e:
        message = str(e)
        name = message.split(" ", 1)[0].split(".", 1)[0]
        raise bad_request(message, name if name in {f.name for f in fields(SamplingParams)} else None)


def _known(chat: bool) -> set[str]:
    common = {"model", "stream", "stream_options", "n", "best_of", "use_beam_search", "beam_width", "logprobs",
              "prompt_logprobs", "max_tokens", "response_format", "structured_outputs", "logit_bias",
              "guided_whitespace_pattern", *LEGACY_GUIDED, *SAMPLING, *IGNORED, *NEUTRAL}
    return common | ({"messages", "top_logprobs", "max_completion_tokens", "tools", "tool_choice",
                      "add_generation_prompt", "continue_final_message"} if chat else {"prompt"})


def parse_tokenize(body: Any) -> dict:
    """/tokenize (vLLM's): {"prompt"} or {"messages", "add_generation_prompt", "continue_final_message",
    "tools"}, with "add_special_tokens" and "return_token_strs" -> the protocol's tokenize fields."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    chat = "messages" in body
    known = {"model", "add_special_tokens", "return_token_strs"} | (
        {"messages", "add_generation_prompt", "continue_final_message", "tools"} if chat else {"prompt"})
    unknown = sorted(body.keys() - known)
    if unknown:
        raise bad_request(f"unknown field(s) {', '.join(quote(k, 60) for k in unknown[:10])}", unknown[0])
    _get(body, "model", (str,))
    _get(body, "return_token_strs", (bool,))
    fields_: dict[str, Any] = {}
    special = _get(body, "add_special_tokens", (bool,))
    if special is not None:
        fields_["add_special_tokens"] = special
    if not chat:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise bad_request("'prompt' must be a string (or send 'messages')", "prompt")
        return {**fields_, "prompt": prompt}
    job = Job(True, None, [{"messages": _messages(body)}], {})
    _chat_options({k: v for k, v in body.items() if k not in ("tool_choice", "tools")}, job, None, "", None)
    if "tools" in body and body["tools"]:
        job.chat_options["tools"] = _check_tools(body["tools"])
    out = {**fields_, "messages": job.sources[0]["messages"]}
    if job.chat_options:
        out["chat"] = job.chat_options
    return out


def parse_detokenize(body: Any) -> list[int]:
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    unknown = sorted(body.keys() - {"model", "tokens"})
    if unknown:
        raise bad_request(f"unknown field(s) {', '.join(quote(k, 60) for k in unknown[:10])}", unknown[0])
    _get(body, "model", (str,))
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not _token_ids(tokens):
        raise bad_request("'tokens' must be a list of token ids (integers from 0 to 2**63 - 1)", "tokens")
    return tokens
