"""Writing small GGUF files with gguf.GGUFWriter, the way llama.cpp's converter does:
tensors renamed and q/k rows permuted, and tokenizer metadata of either kind."""
from __future__ import annotations

import json
import math

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize
from models import SPECIAL_TOKENS, make_tokenizer

BLOCK = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
         "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
         "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
         "mlp.down_proj": "ffn_down"}
GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
          "lm_head.weight": "output.weight"}
# One storage type per tensor kind, so every supported writer type is exercised.
QTYPES = {"token_embd": Q.Q8_0, "attn_norm": Q.F32, "ffn_norm": Q.F32, "output_norm": Q.F32,
          "attn_q": Q.F16, "attn_k": Q.Q8_0, "attn_v": Q.Q4_0, "attn_output": Q.BF16,
          "ffn_gate": Q.Q4_1, "ffn_up": Q.F16, "ffn_down": Q.F32, "output": Q.Q8_0}


def gguf_name(hf: str) -> str:
    if hf in GLOBAL:
        return GLOBAL[hf]
    _, _, layer, rest = hf.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{BLOCK[module]}.{kind}"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # As llama.cpp's convert_hf_to_gguf.py writes q_proj/k_proj.
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def stored(w: np.ndarray, qtype: Q) -> np.ndarray:
    """What a tensor reads back as after being stored with `qtype`."""
    return w if qtype == Q.F32 else dequantize(quantize(w, qtype), qtype).reshape(w.shape)


def write_gguf(path: str, weights: dict[str, np.ndarray], cfg, arch: str = "llama", metadata=None,
               extra_tensors: dict[str, np.ndarray] | None = None, qtypes: dict[str, Q] | None = None) -> str:
    """qtypes: storage type per tensor kind (default QTYPES)."""
    qtypes = qtypes or QTYPES
    w = gguf.GGUFWriter(path, arch)
    if cfg is not None:
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_block_count(cfg.num_hidden_layers)
        w.add_head_count(cfg.num_attention_heads)
        w.add_head_count_kv(cfg.num_key_value_heads)
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
        w.add_rope_dimension_count(cfg.head_dim)
    if metadata is not None:  # tokenizer or other extra keys
        metadata(w)
    for name, array in weights.items():
        gname = gguf_name(name)
        if name.endswith("q_proj.weight"):
            array = llama_cpp_permute(array, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            array = llama_cpp_permute(array, cfg.num_key_value_heads)
        qtype = qtypes[gname.split(".")[-2]]
        raw = qtype not in (Q.F32, Q.F16)  # the writer infers F32/F16 from the numpy dtype
        w.add_tensor(gname, quantize(array, qtype), raw_dtype=qtype if raw else None)
    for name, array in (extra_tensors or {}).items():
        w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def gpt2_vocab(pre: str | None, vocab_size: int | None = None):
    """The tiny byte-level tokenizer's metadata; with vocab_size, cut (merges that leave it
    dropped) or padded to the model's vocabulary, as the converter pads to it."""
    tok = make_tokenizer()
    model = json.loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    if vocab_size is not None:
        tokens = tokens[:vocab_size] + [f"[PAD{i}]" for i in range(len(tokens), vocab_size)]
        kept = set(tokens)
        merges = [m for m in merges if set(m.split(" ")) <= kept and m.replace(" ", "") in kept]

    def add(w: gguf.GGUFWriter) -> None:
        w.add_tokenizer_model("gpt2")
        if pre is not None:
            w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types([3 if t in SPECIAL_TOKENS else 1 for t in tokens])
        w.add_token_merges(merges)
        w.add_bos_token_id(0)
        w.add_eos_token_id(2)
        w.add_add_bos_token(False)
        w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                            "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                            "{% endif %}")
    return add


def sentencepiece_vocab(w: gguf.GGUFWriter) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    # An ASCII-only corpus: other characters in test texts must fall back to byte tokens.
    corpus = ["the quick brown fox jumps over the lazy dog", "hello world, return x ** 2 # square",
              "numbers 0 1 2 3 4 5 6 7 8 9 and whitespace runs"]
    trained.train_from_iterator(corpus * 3, trainers.BpeTrainer(vocab_size=120, show_progress=False))
    pieces = [t for t, _ in sorted(trained.get_vocab().items(), key=lambda kv: kv[1])]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces + ["<tool>"]
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces) + [4]
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(pieces))] + [0.0])
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)


# --- any family, as llama.cpp's converter writes it -----------------------------------------------

# Hugging Face architecture -> GGUF architecture.
GGUF_ARCH = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
             "Qwen3ForCausalLM": "qwen3", "Qwen3MoeForCausalLM": "qwen3moe", "Gemma3ForCausalLM": "gemma3",
             "Phi3ForCausalLM": "phi3", "SmolLM3ForCausalLM": "smollm3"}
FAMILY_BLOCK = {**BLOCK, "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
                "self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up", "mlp.gate": "ffn_gate_inp"}
GEMMA_BLOCK = {"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
               "post_feedforward_layernorm": "post_ffw_norm"}
F32_ONLY = {}  # every tensor stored as float32: the file's values are the safetensors' exactly


def _family_tensors(state: dict[str, np.ndarray], cfg: dict, arch: str) -> dict[str, np.ndarray]:
    """GGUF name -> array, converted as llama.cpp's converter converts: q/k rows permuted for the
    NORM-rotary architectures, Gemma's norms stored as 1 + w, experts stacked per projection."""
    heads, kv_heads = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    out: dict[str, np.ndarray] = {}
    experts: dict[tuple[int, str], dict[int, np.ndarray]] = {}
    for name, array in state.items():
        if name in GLOBAL:
            gname = GLOBAL[name]
        else:
            _, _, layer, rest = name.split(".", 3)
            module, kind = rest.rsplit(".", 1)
            if module.startswith("mlp.experts."):
                _, _, e, proj = module.split(".")
                experts.setdefault((int(layer), proj), {})[int(e)] = array
                continue
            block = {**FAMILY_BLOCK, **GEMMA_BLOCK} if arch == "gemma3" else FAMILY_BLOCK
            gname = f"blk.{layer}.{block[module]}.{kind}"
        if arch in ("llama", "smollm3") and name.endswith(("q_proj.weight", "q_proj.bias")):
            array = llama_cpp_permute(array, heads)
        elif arch in ("llama", "smollm3") and name.endswith(("k_proj.weight", "k_proj.bias")):
            array = llama_cpp_permute(array, kv_heads)
        if arch == "gemma3" and name.endswith("norm.weight"):
            array = array + np.float32(1)
        out[gname] = np.ascontiguousarray(array, dtype=np.float32)
    for (layer, proj), by_expert in experts.items():
        stacked = np.stack([by_expert[e] for e in sorted(by_expert)])
        out[f"blk.{layer}.ffn_{proj.removesuffix('_proj')}_exps.weight"] = stacked
    return out


def write_family_gguf(path: str, folder: str, metadata=None, qtypes: dict[str, Q] | None = None) -> str:
    """The Hugging Face folder `folder` (config.json, model.safetensors) as a GGUF file, with
    the metadata llama.cpp's converter writes for its architecture. qtypes: storage type per
    tensor kind (the part after the layer number); float32 for kinds it does not name."""
    from safetensors.numpy import load_file

    with open(f"{folder}/config.json", encoding="utf-8") as f:
        cfg = json.load(f)
    arch = GGUF_ARCH[cfg["architectures"][0]]
    state = load_file(f"{folder}/model.safetensors")
    if cfg.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    tensors = _family_tensors(state, cfg, arch)
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    rope = cfg.get("rope_parameters") or {}
    full = rope.get("full_attention", rope)
    w = gguf.GGUFWriter(path, arch)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_head_count(heads)
    w.add_head_count_kv(cfg.get("num_key_value_heads") or heads)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(full.get("rope_theta", 10000.0))
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    partial = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    w.add_rope_dimension_count(int(head_dim * partial))
    if full.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(full["factor"])
    if cfg.get("sliding_window") and (arch in ("gemma3", "phi3", "llama")):
        w.add_sliding_window(cfg["sliding_window"])
    elif arch == "phi3":
        w.add_sliding_window(0)  # the converter's "no window" (Phi-4)
    if arch == "qwen3moe":
        w.add_expert_count(cfg.get("num_experts") or cfg["num_local_experts"])
        w.add_expert_used_count(cfg["num_experts_per_tok"])
        w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
    if arch == "phi3" and rope.get("rope_type") == "longrope":
        original = rope["original_max_position_embeddings"]
        scale = cfg["max_position_embeddings"] / original
        w.add_rope_scaling_orig_ctx_len(original)
        w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0)
        tensors["rope_factors_long.weight"] = np.array(rope["long_factor"], dtype=np.float32)
        tensors["rope_factors_short.weight"] = np.array(rope["short_factor"], dtype=np.float32)
    (metadata or gpt2_vocab(None, cfg["vocab_size"]))(w)
    for gname, array in tensors.items():
        kind = gname.split(".")[-2]
        qtype = (qtypes or F32_ONLY).get(kind, Q.F32) if array.ndim > 1 else Q.F32  # 1-D stays float32
        raw = qtype not in (Q.F32, Q.F16)
        w.add_tensor(gname, quantize(array, qtype) if qtype != Q.F32 else array, raw_dtype=qtype if raw else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def gemma_vocab(vocab_size: int, sampling: dict[str, float] | None = None):
    """A SentencePiece vocabulary as Gemma's files hold it (control tokens <pad> <eos> <bos>
    <unk> <start_of_turn> <end_of_turn>, byte tokens, pieces, no merges, no prefix space, no
    chat template), padded to `vocab_size`; `sampling`: general.sampling.* settings."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    corpus = ["the quick brown fox jumps over the lazy dog", "hello world, say something nice",
              "name three rivers and a sea"]
    trained.train_from_iterator(corpus * 3, trainers.BpeTrainer(vocab_size=120, show_progress=False))
    pieces = [t for t, _ in sorted(trained.get_vocab().items(), key=lambda kv: kv[1])]
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    tokens = specials + [f"<0x{b:02X}>" for b in range(256)] + pieces
    tokens += [f"<unused{i}>" for i in range(vocab_size - len(tokens))]
    types = [3, 3, 3, 2, 3, 3] + [6] * 256 + [1] * (len(tokens) - 262)

    def add(w: gguf.GGUFWriter) -> None:
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores([0.0] * len(tokens))
        w.add_token_types(types)
        w.add_bos_token_id(2)
        w.add_eos_token_id(1)
        w.add_unk_token_id(3)
        w.add_pad_token_id(0)
        w.add_add_bos_token(True)
        w.add_add_space_prefix(False)
        for key, value in (sampling or {}).items():
            w.add_float32(f"general.sampling.{key}", value) if isinstance(value, float) \
                else w.add_int32(f"general.sampling.{key}", value)
    return add
