"""Tool calls in a model's text, for the chat families pagedkv runs: which format a chat
template teaches (`detect`), and the calls in a whole output (`parse`) or in one that grows
(`ToolStream`). Pure Python: the engine names the format, the gateway parses.

- "hermes" (Qwen2 and 2.5, Hermes, SmolLM3 and others whose template writes `<tool_call>`):
  each call is `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`; text before the
  first call is content.
- "llama3_json" (Llama 3.1 to 3.3, whose template speaks of `<|python_tag|>` and ipython): the
  output is one JSON object `{"name": ..., "parameters": {...}}` (or several, separated by
  `;`), optionally after `<|python_tag|>`; any other output is content.

A call is {"name": str, "arguments": str (JSON text)}, as OpenAI's `function` objects.
"""
from __future__ import annotations

import json
import re
from typing import Any

HERMES, LLAMA3_JSON = "hermes", "llama3_json"
PARSERS = (HERMES, LLAMA3_JSON)
_OPEN, _CLOSE = "<tool_call>", "</tool_call>"
_PYTHON_TAG = "<|python_tag|>"
_HERMES_CALL = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)\Z", re.DOTALL)


def detect(template: str | None) -> str | None:
    """The tool-call format a chat template teaches, or None."""
    if not template:
        return None
    if _OPEN in template:
        return HERMES
    if _PYTHON_TAG in template or ("ipython" in template and "<|eot_id|>" in template):
        return LLAMA3_JSON
    return None


def _call(obj: Any, arguments_key: str) -> dict | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(arguments_key, obj.get("arguments", obj.get("parameters", {})))
    return {"name": obj["name"], "arguments": args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)}


def parse(text: str, parser: str | None) -> tuple[str | None, list[dict]]:
    """(content, calls); content is None where the output is all calls. Text that does not
    parse as calls is content."""
    if parser == HERMES and _OPEN in text:
        calls = []
        for closed, open_ in _HERMES_CALL.findall(text):
            try:
                call = _call(json.loads(closed or open_), "arguments")
            except ValueError:
                return text, []
            if call is None:
                return text, []
            calls.append(call)
        content = text[:text.find(_OPEN)]
        return (content if content.strip() else None), calls
    if parser == LLAMA3_JSON:
        calls = _llama3_calls(text)
        if calls:
            return None, calls
    return text, []


def _llama3_calls(text: str) -> list[dict]:
    body = text.strip()
    if body.startswith(_PYTHON_TAG):
        body = body[len(_PYTHON_TAG):].strip()
    if not body.startswith("{"):
        return []
    decoder, calls, at = json.JSONDecoder(), [], 0
    while at < len(body):
        try:
            obj, end = decoder.raw_decode(body, at)
        except ValueError:
            return []
        call = _call(obj, "parameters")
        if call is None:
            return []
        calls.append(call)
        at = end
        while at < len(body) and body[at] in " \t\r\n;":
            at += 1
    return calls


def schema_for_required(tools: list[dict]) -> dict:
    """tool_choice "required": a JSON array of at least one call of the given tools, each
    `{"name": ..., "parameters": {...}}` with that tool's parameters (vLLM's shape)."""
    items = [{"type": "object",
              "properties": {"name": {"type": "string", "enum": [t["function"]["name"]]},
                             "parameters": t["function"].get("parameters") or {"type": "object"}},
              "required": ["name", "parameters"], "additionalProperties": False} for t in tools]
    return {"type": "array", "minItems": 1, "items": items[0] if len(items) == 1 else {"anyOf": items}}


def parse_required(text: str) -> list[dict] | None:
    """The calls of a tool_choice "required" output (schema_for_required's shape), or None."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, list):
        return None
    calls = [_call(item, "parameters") for item in value]
    return None if any(c is None for c in calls) else calls


class ToolStream:
    """Tool calls as an output grows (auto tool choice): `push(delta)` returns (content
    delta, complete calls found); `finish()` the rest. Content that may begin a call is held
    back until it cannot."""

    def __init__(self, parser: str | None) -> None:
        self.parser = parser
        self.text = ""
        self.sent = 0        # characters of content sent
        self.calls = 0       # calls sent
        self.in_calls = False
        self.json_mode: bool | None = None  # llama3_json: whether the output is calls

    def push(self, delta: str) -> tuple[str, list[dict]]:
        self.text += delta
        if self.parser == HERMES:
            return self._hermes(final=False)
        if self.parser == LLAMA3_JSON:
            if self.json_mode is None:
                head = self.text.lstrip()
                if not head:
                    return "", []
                if head.startswith("{") or head.startswith(_PYTHON_TAG):
                    self.json_mode = True
                elif _PYTHON_TAG.startswith(head):
                    return "", []
                else:
                    self.json_mode = False
            if self.json_mode:
                return "", []
        return self._content(len(self.text)), []

    def finish(self) -> tuple[str, list[dict]]:
        if self.parser == HERMES:
            return self._hermes(final=True)
        if self.parser == LLAMA3_JSON and self.json_mode is not False:
            calls = _llama3_calls(self.text)
            if calls:
                self.in_calls, self.calls = True, len(calls)
                return "", calls
        return self._content(len(self.text)), []

    def _content(self, end: int) -> str:
        out = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        return out

    def _hermes(self, final: bool) -> tuple[str, list[dict]]:
        content = ""
        start = self.text.find(_OPEN)
        if start < 0:
            if final:
                return self._content(len(self.text)), []
            # Hold back a tail that could be the beginning of "<tool_call>".
            keep = next((k for k in range(min(len(_OPEN) - 1, len(self.text)), 0, -1)
                         if _OPEN.startswith(self.text[-k:])), 0)
            return self._content(len(self.text) - keep), []
        if not self.in_calls:
            content = self._content(start)
            self.in_calls = True
        found = [m for m in _HERMES_CALL.finditer(self.text) if m.group(1) is not None or final]
        calls = []
        for m in found[self.calls:]:
            try:
                call = _call(json.loads(m.group(1) if m.group(1) is not None else m.group(2)), "arguments")
            except ValueError:
                call = None
            if call is not None:
                calls.append(call)
            self.calls += 1
        return content, calls
