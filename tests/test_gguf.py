"""GGUF loading: the SmolLM2 file against transformers' GGUF loader, and small GGUF files
written here with gguf.GGUFWriter whose expected contents are known exactly."""
from __future__ import annotations

import os

import gguf
import numpy as np
import pytest
import torch
from gguf_files import QTYPES, gguf_name, gpt2_vocab, sentencepiece_vocab, stored, write_gguf
from models import make_tiny_llama

from pagedkv.runtime.models.gguf_loader import llama3_rope_factors
from pagedkv.runtime.models.loader import default_model_path, load_model
from pagedkv.runtime.models.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

TEXTS = [
    "Hello world",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "Größe, café, naïve — 東京 Привет 🙂👍🏽",
    "def f(x):\n    return x ** 2  # square\n\tprint(f(3))",
    "   leading, trailing   \n\n\n  whitespace runs\t\t ",
    "Numbers 1234567 and 3.14159, year 2024",
    "<|endoftext|>text<file_sep>more <tool>call",
    "Hello</s> <s>world<unk>",
    "",
]
CHATS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3?"}],
]


def hf_tokenizer(path: str):
    return transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


# --- the SmolLM2 GGUF file --------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm():
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = default_model_path()
    folder, name = os.path.split(path)
    config = transformers.AutoConfig.from_pretrained(folder, gguf_file=name)
    # from_pretrained(gguf_file=...) would need accelerate; this is the function it calls.
    with torch.device("meta"):
        skeleton = transformers.AutoModelForCausalLM.from_config(config)
    tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=skeleton)["tensors"]
    return load_model(path), config, tensors, hf_tokenizer(path)


def test_smollm_tensors_equal_transformers(smollm):
    ours, _, theirs, _ = smollm
    assert sorted(ours.weights) == sorted(theirs)  # tied: no lm_head.weight
    sample = ["model.embed_tokens.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight",
              "model.layers.7.post_attention_layernorm.weight"]
    sample += [f"model.layers.{i}.self_attn.{p}_proj.weight" for i in (0, 29) for p in "qkvo"]
    sample += [f"model.layers.13.mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
    for name in sample:
        torch.testing.assert_close(ours.weights[name], theirs[name], atol=1e-6, rtol=0, msg=name)
    for name, tensor in theirs.items():  # and the rest, exactly
        assert torch.equal(ours.weights[name], tensor), name


def test_smollm_config(smollm):
    ours, hf, _, _ = smollm
    c = ours.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads) == (30, 576, 9, 3)
    assert (c.vocab_size, c.tie_word_embeddings, c.head_dim) == (49152, True, 64)
    assert c.num_layers == hf.num_hidden_layers and c.intermediate_size == hf.intermediate_size
    assert c.num_kv_heads == hf.num_key_value_heads and c.vocab_size == hf.vocab_size
    assert c.rope_theta == hf.rope_parameters["rope_theta"] and c.rope_scaling is None
    assert c.rms_norm_eps == pytest.approx(hf.rms_norm_eps)
    assert c.max_position_embeddings == hf.max_position_embeddings
    assert c.bos_token_id == hf.bos_token_id and c.eos_token_ids == [hf.eos_token_id]
    assert ours.source == default_model_path()


def test_smollm_tokenizer_equals_transformers(smollm):
    tok, theirs = smollm[0].tokenizer, smollm[3]
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == theirs(text)["input_ids"], text
        assert tok.decode(ids) == theirs.decode(ids, skip_special_tokens=True), text
        assert tok.decode(ids, skip_special_tokens=False) == theirs.decode(ids), text
    assert tok.encode("<|im_start|>user\nHi<|im_end|>") == [1, 4093, 198, 26843, 2]
    assert (tok.bos_token_id, tok.eos_token_ids, tok.vocab_size) == (1, [2], 49152)
    assert tok.id_to_piece(2) == "<|im_end|>"


def test_smollm_chat_template(smollm):
    tok, theirs = smollm[0].tokenizer, smollm[3]
    for chat in CHATS:
        for gen in (True, False):
            expected = theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
            assert tok.apply_chat_template(chat, add_generation_prompt=gen) == expected


# --- GGUF files written here ---------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    folder = make_tiny_llama(str(tmp_path_factory.mktemp("hf")), with_tokenizer=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    return model.config, {k: v.numpy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("tied", [False, True])
def test_written_gguf_loads_expected_values(tiny_hf, tmp_path, tied):
    cfg, state = tiny_hf
    weights = {k: v for k, v in state.items() if not (tied and k == "lm_head.weight")}
    path = write_gguf(str(tmp_path / "tiny.gguf"), weights, cfg, metadata=gpt2_vocab(None))
    loaded = load_model(path)
    assert sorted(loaded.weights) == sorted(weights)
    for name, array in weights.items():
        expected = torch.from_numpy(stored(array, QTYPES[gguf_name(name).split(".")[-2]]))
        assert torch.equal(loaded.weights[name], expected), name
    c = loaded.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == (2, 64, 4, 2, 16)
    assert (c.intermediate_size, c.vocab_size, c.tie_word_embeddings) == (128, 512, tied)
    assert (c.bos_token_id, c.eos_token_ids) == (0, [2])
    half = load_model(path, dtype=torch.float16).weights
    assert all(t.dtype == torch.float16 for t in half.values())


@pytest.mark.parametrize("pre", [None, "smollm", "llama-bpe", "qwen2"])
def test_written_gguf_byte_level_tokenizer(tiny_hf, tmp_path, pre):
    path = write_gguf(str(tmp_path / "tok.gguf"), {}, tiny_hf[0], metadata=gpt2_vocab(pre))
    ours, theirs = Tokenizer.from_gguf(gguf.GGUFReader(path)), hf_tokenizer(path)
    for text in TEXTS:
        assert ours.encode(text) == theirs(text)["input_ids"], (pre, text)
    for chat in CHATS:
        expected = theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        assert ours.apply_chat_template(chat) == expected


def test_written_gguf_sentencepiece_tokenizer(tiny_hf, tmp_path):
    path = write_gguf(str(tmp_path / "sp.gguf"), {}, tiny_hf[0], metadata=sentencepiece_vocab)
    tok = Tokenizer.from_gguf(gguf.GGUFReader(path))
    theirs = hf_tokenizer(path)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == theirs(text)["input_ids"], text
        assert tok.decode(ids) == theirs.decode(ids, skip_special_tokens=True), text
    assert tok.encode("the fox")[0] == tok.bos_token_id == 1
    assert tok.token_to_id("<0xE6>") in tok.encode("東")  # byte fallback
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template(CHATS[0])


def test_llama3_rope_scaling_from_rope_freqs(tiny_hf, tmp_path):
    cfg, state = tiny_hf
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    # With head_dim 16 and base 10^4 the factors cover all three regions (1, smooth, 8).
    factors = llama3_rope_factors(scaling, cfg.head_dim, cfg.rope_parameters["rope_theta"])
    path = write_gguf(str(tmp_path / "l3.gguf"), state, cfg,
                      extra_tensors={"rope_freqs.weight": factors.astype(np.float32)})
    assert load_model(path).config.rope_scaling == scaling


def test_linear_rope_scaling(tiny_hf, tmp_path):
    def linear(w: gguf.GGUFWriter) -> None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(4.0)

    path = write_gguf(str(tmp_path / "lin.gguf"), tiny_hf[1], tiny_hf[0], metadata=linear)
    assert load_model(path).config.rope_scaling == {"rope_type": "linear", "factor": 4.0}


def test_non_llama_architecture_is_a_clear_error(tmp_path):
    path = str(tmp_path / "gpt2.gguf")
    write_gguf(path, {}, None, arch="gpt2", extra_tensors={"token_embd.weight": np.zeros((4, 8), np.float32)})
    with pytest.raises(ValueError, match=r"gpt2.*not supported") as err:
        load_model(path)
    assert path in str(err.value)
