"""Llama-family model, its config, loaders (safetensors, GGUF) and tokenizers."""
