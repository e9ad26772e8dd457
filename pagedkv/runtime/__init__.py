"""pagedkv's runtime: models/ (model families, loaders, tokenizers), engine/ (LLMEngine,
executor, sampler, offline LLM API), serving/ (ZeroMQ server and clients, the HTTP gateway),
cli/ (the `pagedkv` command). The public names are re-exported by `pagedkv`."""
