"""pagedkv's runtime: models/ (Llama family, loaders, tokenizers), engine/ (LLMEngine, executor,
sampler, offline LLM API), serving/ (ZeroMQ server and clients), cli/ (the `pagedkv` command).

`from runtime import LLM, SamplingParams` works; the names load on first use, so that importing a
light part (the client, the CLI's --help) does not import torch."""
from __future__ import annotations

import importlib

_EXPORTS = {
    "LLM": "runtime.engine.llm",
    "LLMEngine": "runtime.engine.llm_engine",
    "EngineConfig": "runtime.engine.config",
    "SamplingParams": "runtime.engine.sampling_params",
    "RequestOutput": "runtime.engine.outputs",
    "CompletionOutput": "runtime.engine.outputs",
    "LoadedModel": "runtime.models.loader",
    "load_model": "runtime.models.loader",
    "default_model_path": "runtime.models.loader",
    "Client": "runtime.serving.client",
    "AsyncClient": "runtime.serving.client",
    "ServerError": "runtime.serving.client",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'runtime' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
