"""Building a `tokenizers` tokenizer from a GGUF file's tokenizer.ggml.* metadata.

A GGUF file has no tokenizer.json: it stores the vocabulary, merges (or scores) and
special token ids. We rebuild the tokenizer the way Hugging Face transformers does for
the same file, so that both give the same ids:
- "gpt2": byte-level BPE; the split regex is chosen by tokenizer.ggml.pre, GPT-2's
  own when the pre-tokenizer is not one with a known different regex.
- "llama": SentencePiece-style BPE with byte fallback, merges from the file or
  recovered from the token scores; Gemma's (no prefix space, merges in the vocabulary's
  order, runs of spaces spelled with "▁") and Phi-3's (the prefix space from a normalizer)
  as transformers builds them for those architectures.
A file without a chat template gets its architecture's (Gemma's turns), and the end-of-turn
tokens of chat templates count as end of generation, as llama.cpp counts them.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from tokenizers import AddedToken, Regex, Tokenizer as BackendTokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from pagedkv.runtime.models.gguf_loader import gguf_value

if TYPE_CHECKING:
    from gguf import GGUFReader

CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types

_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> split regex; any other value keeps GPT-2's regex.
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral",
                     "midm-2.0", "lfm2", "dbrx", "smaug-bpe"], _LLAMA3),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "megrez"], _QWEN2),
    **dict.fromkeys(["gpt-4o", "llama4"], _GPT4O),
    "tekken": _TEKKEN,
}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable spelling of each byte, used by byte-level vocabularies."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, map(chr, chars)))


# Chat templates for architectures whose files may come without one (llama.cpp detects these
# formats by name). Gemma: turns of `<start_of_turn>{user|model}\n...<end_of_turn>\n`, a system
# message joined to the first user turn.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% set system = messages[0]['content'] + '\n\n' if messages and messages[0]['role'] == 'system' else '' %}"
    "{% for message in messages if message['role'] != 'system' %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n' }}"
    "{{ (system if loop.first else '') + message['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
DEFAULT_CHAT_TEMPLATES = {"gemma3": GEMMA_CHAT_TEMPLATE}
# End-of-turn tokens: a generation ends there too, where the vocabulary has them as control tokens.
END_OF_TURN = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|end|>")


def build_gguf_tokenizer(reader: "GGUFReader", source: str = ""
                         ) -> tuple[BackendTokenizer, dict[str, str | None], list[str], str | None]:
    """(backend, named special tokens, end-of-generation tokens, chat template)."""
    tokens: list[str] | None = gguf_value(reader, "tokenizer.ggml.tokens")
    if not tokens:
        raise ValueError(f"{source}: GGUF file has no tokenizer (tokenizer.ggml.tokens)")
    arch = gguf_value(reader, "general.architecture")
    kind = gguf_value(reader, "tokenizer.ggml.model")
    types: list[int] = gguf_value(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = gguf_value(reader, "tokenizer.ggml.merges")
    if kind == "gpt2":
        backend = _byte_level(tokens, merges, gguf_value(reader, "tokenizer.ggml.pre"))
        alphabet = set(bytes_to_unicode().values())
        # llama.cpp sometimes marks a token CONTROL that is no byte-level token at all; adding
        # it would grow the vocabulary past the model's, so (like transformers) we skip it.
        control = [t for t, ty in zip(tokens, types) if ty == CONTROL and set(t) <= alphabet]
    elif kind == "llama":
        scores = gguf_value(reader, "tokenizer.ggml.scores")
        if arch in ("gemma", "gemma2", "gemma3"):
            tokens = ["▁" * len(t) if " " in t and not t.strip() else t for t in tokens]
            backend = _sentencepiece(tokens, merges, [-float(i) for i in range(len(tokens))], source, style="gemma")
        else:
            backend = _sentencepiece(tokens, merges, scores, source, style="phi3" if arch == "phi3" else "llama")
        control = [t for t, ty in zip(tokens, types) if ty == CONTROL]
    else:
        raise ValueError(f"{source}: GGUF tokenizer model {kind!r} is not supported "
                         "(supported: gpt2, llama)")

    def token(key: str) -> str | None:
        index = gguf_value(reader, f"tokenizer.ggml.{key}")
        return tokens[index] if index is not None and 0 <= index < len(tokens) else None

    special = {"bos_token": token("bos_token_id"), "eos_token": token("eos_token_id"),
               "unk_token": token("unknown_token_id"), "pad_token": token("padding_token_id")}
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    vocab = backend.get_vocab(with_added_tokens=True)
    user = [t for t, ty in zip(tokens, types) if ty == USER_DEFINED and t in vocab]
    # llama.cpp always matches user-defined tokens whole, so they are added (not special).
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    named = [t for t in special.values() if t is not None and t not in control]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in named])

    # llama.cpp adds BOS to SentencePiece vocabularies unless the file says otherwise.
    add_bos = gguf_value(reader, "tokenizer.ggml.add_bos_token", kind == "llama")
    add_eos = gguf_value(reader, "tokenizer.ggml.add_eos_token", False)
    set_bos_eos(backend, special["bos_token"] if add_bos else None,
                special["eos_token"] if add_eos else None)
    eos_tokens = [t for t in (special["eos_token"], token("eot_token_id")) if t is not None]
    eos_tokens += [t for t in END_OF_TURN if t in control and t not in eos_tokens]
    template = gguf_value(reader, "tokenizer.chat_template") or DEFAULT_CHAT_TEMPLATES.get(arch)
    return backend, special, eos_tokens, template


def set_bos_eos(backend: BackendTokenizer, bos: str | None, eos: str | None) -> None:
    """A post-processor that adds BOS and/or EOS around every encoded text."""
    single = f"{bos + ':0 ' if bos else ''}$A:0{' ' + eos + ':0' if eos else ''}"
    pair = f"{single}{' ' + bos + ':1' if bos else ''} $B:1{' ' + eos + ':1' if eos else ''}"
    special = [(t, backend.token_to_id(t)) for t in (bos, eos) if t]
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                           special_tokens=special)


def _byte_level(tokens: list[str], merges: list[str] | None, pre: str | None) -> BackendTokenizer:
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    # Tokens written outside the byte alphabet are respelled byte by byte.
    spelled = [t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))
               for t in tokens]
    vocab = {t: i for i, t in enumerate(spelled)}
    pairs = [tuple(m.split(" ", 1)) for m in merges or []]
    backend = BackendTokenizer(BPE(vocab=vocab, merges=pairs, dropout=None, continuing_subword_prefix="",
                                   end_of_word_suffix="", fuse_unk=False))
    split = PRE_TOKENIZER_SPLITS.get(pre or "")
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece(tokens: list[str], merges: list[str] | None, scores: list[float] | None,
                   source: str, style: str = "llama") -> BackendTokenizer:
    """style "llama": Metaspace with a prefix space; "gemma": spaces replaced by "▁", no prefix
    space; "phi3": the prefix space and the replacement by a normalizer (so a text's leading
    spaces stay as many)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    if merges:
        pairs = [tuple(m.split(" ", 1)) for m in merges]
    elif scores is not None:
        pairs = merges_from_scores(tokens, scores)
    else:
        raise ValueError(f"{source}: SentencePiece GGUF tokenizer has neither merges nor scores")
    backend = BackendTokenizer(BPE(vocab=vocab, merges=pairs, fuse_unk=True, byte_fallback=True,
                                   dropout=None))
    if style == "gemma":
        backend.normalizer = normalizers.Replace(" ", "▁")
        backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
        backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
        return backend
    if style == "phi3":
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    else:
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first",
                                                         split=False)
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(content=" ", left=1)])
    return backend


def merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a token into two
    tokens, best-scored merged first (the order transformers derives them in)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    found: list[tuple[str, str, float]] = []
    for piece, score in dict(zip(tokens, scores)).items():
        local = [(piece[:k], piece[k:], score) for k in range(1, len(piece))
                 if piece[:k] in vocab and piece[k:] in vocab]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        found.extend(local)
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in found]
