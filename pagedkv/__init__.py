"""pagedkv: a paged KV-cache LLM inference engine.

    from pagedkv import LLM, SamplingParams, LLMEngine, EngineConfig, Client, AsyncClient

The names load on first use, so that importing a light part (the client, the CLI's --help)
does not import torch. Components: pagedkv/kvcache/ (the memory manager), pagedkv/preemption/ (the scheduler
and its cost model), pagedkv/kernels/ (CPU and CUDA kernels, torch references), pagedkv/runtime/ (models,
engine, serving, cli), ablation/ (`pagedkv ablate`)."""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "LLM": "pagedkv.runtime.engine.llm",
    "LLMEngine": "pagedkv.runtime.engine.llm_engine",
    "EngineConfig": "pagedkv.runtime.engine.config",
    "SamplingParams": "pagedkv.runtime.engine.sampling_params",
    "RequestOutput": "pagedkv.runtime.engine.outputs",
    "CompletionOutput": "pagedkv.runtime.engine.outputs",
    "LoadedModel": "pagedkv.runtime.models.loader",
    "load_model": "pagedkv.runtime.models.loader",
    "default_model_path": "pagedkv.runtime.models.loader",
    "model_path": "pagedkv.runtime.models.loader",
    "Client": "pagedkv.runtime.serving.client",
    "AsyncClient": "pagedkv.runtime.serving.client",
    "ServerError": "pagedkv.runtime.serving.client",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pagedkv' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
