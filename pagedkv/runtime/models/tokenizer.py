"""Text <-> token ids, and chat templates, for Hugging Face folders and GGUF files.

A thin wrapper around a `tokenizers.Tokenizer`. Encoding and decoding match what
Hugging Face transformers produces for the same files; the chat template is rendered
with a sandboxed Jinja2 environment configured as transformers configures it.
"""
from __future__ import annotations

import json
import os
from datetime import datetime
from typing import TYPE_CHECKING, Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Tokenizer as BackendTokenizer

if TYPE_CHECKING:
    from gguf import GGUFReader


class Tokenizer:
    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        special_tokens: dict[str, str | None] | None = None,
        eos_tokens: list[str] | None = None,
        chat_template: str | None = None,
        source: str = "",
    ) -> None:
        # special_tokens: the named tokens a chat template may use (bos_token, eos_token, ...).
        self.backend = backend
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self.chat_template = chat_template
        self.source = source
        self.bos_token_id = self.token_to_id(self.special_tokens.get("bos_token"))
        eos = eos_tokens if eos_tokens is not None else [self.special_tokens.get("eos_token")]
        ids = (self.token_to_id(t) for t in eos)
        self.eos_token_ids: list[int] = list(dict.fromkeys(i for i in ids if i is not None))
        self._template: jinja2.Template | None = None

    # --- construction -------------------------------------------------------------

    @classmethod
    def from_folder(cls, path: str) -> "Tokenizer":
        """From a Hugging Face folder: tokenizer.json and, if present, tokenizer_config.json."""
        tok_file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tok_file):
            raise FileNotFoundError(f"{path}: no tokenizer.json")
        backend = BackendTokenizer.from_file(tok_file)
        cfg: dict[str, Any] = {}
        cfg_file = os.path.join(path, "tokenizer_config.json")
        if os.path.isfile(cfg_file):
            with open(cfg_file, encoding="utf-8") as f:
                cfg = json.load(f)
        special = {k: _token_content(cfg.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        missing = [t for t in special.values() if t is not None and backend.token_to_id(t) is None]
        if missing:
            backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
        # Whether BOS/EOS are added is up to tokenizer.json's post-processor; like transformers,
        # we ignore the config's add_bos_token/add_eos_token when that file is there.
        return cls(backend, special_tokens=special, chat_template=_folder_chat_template(path, cfg),
                   source=path)

    @classmethod
    def from_gguf(cls, reader: "GGUFReader", source: str = "") -> "Tokenizer":
        """Built from a GGUF file's tokenizer.ggml.* metadata (no tokenizer.json needed)."""
        from pagedkv.runtime.models.gguf_tokenizer import build_gguf_tokenizer

        backend, special, eos_tokens, template = build_gguf_tokenizer(reader, source)
        return cls(backend, special_tokens=special, eos_tokens=eos_tokens, chat_template=template,
                   source=source)

    # --- encoding -------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_piece(self, token_id: int) -> str | None:
        """The vocabulary string of one id (byte-level or '▁' spelling), None if unknown."""
        return self.backend.id_to_token(token_id)

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    # --- chat -----------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            continue_final_message: bool = False, **kwargs: Any) -> str:
        """The prompt text for a conversation, as transformers' apply_chat_template(tokenize=False).
        continue_final_message: the text ends where the last message's content does, so that
        the model continues that message (as transformers)."""
        if self.chat_template is None:
            raise ValueError(f"{self.source or 'this model'}: the model has no chat template")
        if self._template is None:
            self._template = _compile(self.chat_template)
        context = {**self.special_tokens, **kwargs}
        text = self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     **context)
        if continue_final_message:
            final = messages[-1].get("content") or ""
            for part in (final, final.strip()):
                if part and part in text:
                    return text[:text.rindex(part) + len(part)]
            raise ValueError("continue_final_message: the final message's content is not in the rendered chat")
        return text


def _token_content(value: Any) -> str | None:
    # Older tokenizer_config.json files store special tokens as AddedToken dictionaries.
    if isinstance(value, dict):
        return value.get("content")
    return value


def _folder_chat_template(path: str, cfg: dict[str, Any]) -> str | None:
    # Newer transformers write the template to its own file; older ones into the config,
    # sometimes as a list of named templates.
    jinja_file = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            return f.read()
    template = cfg.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default", next(iter(named.values()), None))
    return template


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters, which chat templates do not expect.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _compile(template: str) -> jinja2.Template:
    # Chat templates come with downloaded models: untrusted code, hence the sandbox.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)
