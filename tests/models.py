"""Tiny random Llama-family models saved as Hugging Face folders, for tests.

`make_tiny_llama(path)` writes config.json, model.safetensors, tokenizer.json and
tokenizer_config.json (with a ChatML chat template). Weights are seeded; their scale is
larger than transformers' default so that logits are far from uniform and greedy
decoding picks varied tokens, while float32 stays well conditioned.
"""
from __future__ import annotations

import json
import os
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from pagedkv.runtime.engine.llm import LLM
from pagedkv.runtime.engine.sampling_params import SamplingParams

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2
BOS_TOKEN, EOS_TOKEN = "<|endoftext|>", "<|im_end|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A paged KV cache stores keys and values
in fixed-size blocks, so that memory is allocated on demand and shared between sequences.
Once upon a time there was a little model that wanted to generate text one token at a time.
def add(a, b):
    return a + b
for i in range(10):
    print(i, i * i)
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 3.14159
Hello, world! How are you today? I am fine, thank you very much.
Größe, café, naïve, 東京, Привет, emoji 🙂 and symbols like <, >, &, %, $, #, @.
user assistant system: Please answer the question in one short sentence.
"""

_MODEL_CLASSES = {"llama": ("LlamaConfig", "LlamaForCausalLM"),
                  "mistral": ("MistralConfig", "MistralForCausalLM"),
                  "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
                  "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
                  "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
                  "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
                  "phi3": ("Phi3Config", "Phi3ForCausalLM"),
                  "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM")}
# Families whose attention projections may carry biases through `attention_bias`.
_ATTENTION_BIAS = ("llama", "qwen3", "qwen3_moe", "gemma3_text", "smollm3")


def make_tokenizer(vocab_size: int = 512) -> Tokenizer:
    """A byte-level BPE tokenizer trained on a small built-in corpus (deterministic)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=1, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    return tok


def make_tiny_llama(
    path: str,
    *,
    vocab_size: int = 512,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int | None = None,
    tie_word_embeddings: bool = False,
    rope_theta: float = 10000.0,
    max_position_embeddings: int = 2048,
    rms_norm_eps: float = 1e-5,
    initializer_range: float = 0.2,
    attention_bias: bool = False,
    model_type: str = "llama",
    seed: int = 0,
    max_shard_size: str | int | None = None,
    with_tokenizer: bool = True,
    add_bos_token: bool = False,
    extra_config: dict[str, Any] | None = None,
) -> str:
    """Build and save a random model; returns `path`.

    model_type: a key of _MODEL_CLASSES (Qwen2 always has q/k/v biases); extra_config: more
    arguments of its config class (sliding_window, layer_types, rope_parameters, experts...).
    Biases and norm weights are randomized too, so that a loader mixing them up is caught
    (Gemma's norms, which scale by 1 + weight, around 0, the others around 1).
    """
    import transformers

    transformers.utils.logging.disable_progress_bar()  # keep test output quiet
    config_name, model_name = _MODEL_CLASSES[model_type]
    extra: dict[str, Any] = {"attention_bias": attention_bias} if model_type in _ATTENTION_BIAS else {}
    if head_dim is not None:
        extra["head_dim"] = head_dim
    extra.update(extra_config or {})
    config = getattr(transformers, config_name)(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads, tie_word_embeddings=tie_word_embeddings,
        rope_theta=rope_theta, max_position_embeddings=max_position_embeddings,
        rms_norm_eps=rms_norm_eps, initializer_range=initializer_range,
        bos_token_id=SPECIAL_TOKENS.index(BOS_TOKEN), eos_token_id=SPECIAL_TOKENS.index(EOS_TOKEN),
        pad_token_id=None, **extra,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, model_name)(config).float().eval()
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith(".bias"):
                    param.normal_(0.0, initializer_range)
                elif "norm" in name:
                    param.copy_((0.0 if model_type == "gemma3_text" else 1.0) + 0.1 * torch.randn_like(param))
    os.makedirs(path, exist_ok=True)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **kwargs)
    if with_tokenizer:
        write_tokenizer(path, vocab_size, add_bos_token=add_bos_token)
    return path


def write_tokenizer(path: str, vocab_size: int = 512, add_bos_token: bool = False) -> None:
    """tokenizer.json and tokenizer_config.json (ChatML template) into `path`."""
    tok = make_tokenizer(vocab_size)
    if add_bos_token:  # tokenizer.json's post-processor is what adds BOS, as in Llama 2's
        bos = (BOS_TOKEN, tok.token_to_id(BOS_TOKEN))
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B:1", special_tokens=[bos])
    tok.save(os.path.join(path, "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": BOS_TOKEN,
        "add_bos_token": add_bos_token,
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": 2048,
    }
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)


# Greedy, beam search, seeded n-sampling and top-p in one batch: the mix the preemption and
# prefix-cache tests run to show that neither changes any output.
MIXED_WORKLOAD = [
    SamplingParams(max_tokens=14, temperature=0, ignore_eos=True),
    SamplingParams(max_tokens=10, beam_width=3, n=3),
    SamplingParams(max_tokens=12, n=3, temperature=0.9, seed=7, ignore_eos=True),
    SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=11, ignore_eos=True),
    SamplingParams(max_tokens=9, temperature=0, ignore_eos=True),
]


def make_llm(loaded, **kwargs) -> LLM:
    """An offline LLM on an already loaded model, with small test defaults that kwargs override."""
    args = dict(block_size=4, num_device_blocks=256, swap_space_gib=0.01)
    args.update(kwargs)
    return LLM(loaded=loaded, **args)
