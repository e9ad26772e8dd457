"""pagedkv: a paged KV-cache LLM inference engine. The public API, re-exported from runtime/:

    from pagedkv import LLM, SamplingParams, LLMEngine, EngineConfig, Client, AsyncClient
"""
from __future__ import annotations

import runtime
from runtime import __all__  # noqa: F401  (the same names, loaded on first use)

__version__ = "0.1.0"


def __getattr__(name: str):
    return getattr(runtime, name)
