"""The engine: LLMEngine loop, executor, sampler, beam search, stopping, parameters, outputs, config, the offline LLM API."""
