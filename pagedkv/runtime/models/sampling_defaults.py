"""The sampling settings a model ships with: generation_config.json (Hugging Face) or the
`general.sampling.*` metadata of a GGUF file. Clients such as `pagedkv chat` start from them."""
from __future__ import annotations

from typing import Any

from gguf import GGUFReader

from pagedkv.runtime.models.gguf_loader import gguf_value

_GGUF_KEYS = {"general.sampling.temp": "temperature", "general.sampling.top_p": "top_p",
              "general.sampling.top_k": "top_k", "general.sampling.min_p": "min_p"}
_NAMES = ("temperature", "top_p", "top_k", "min_p")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def from_generation_config(gen: dict[str, Any]) -> dict[str, float]:
    """transformers samples only with do_sample true; its settings then, else none (greedy)."""
    if gen.get("do_sample") is not True:
        return {}
    found = {name: gen[name] for name in _NAMES if _number(gen.get(name))}
    return {"temperature": 1.0, **found}  # transformers' temperature when the file names none


def from_gguf(reader: GGUFReader) -> dict[str, float]:
    return {name: value for key, name in _GGUF_KEYS.items() if _number(value := gguf_value(reader, key))}
