"""Structured outputs: the one module that knows the grammar library (llguidance).

A request's `structured_outputs` (SamplingParams) is compiled once per distinct spec into a
grammar for the model's tokenizer; each sequence of the request holds a `Matcher`, which
consumes the sequence's tokens and says which tokens may come next as a bitmask (one bit per
vocabulary entry, 32 to an int32 word, llguidance's layout). The sampler turns the masks of a
batch into -inf logits on the device, before anything else touches them.

What the engine relies on:
- `Grammars.compile(spec)` raises `GrammarError` (a ValueError) naming the error, before the
  request is admitted;
- `Matcher.copy()` for forks (n samples), so that each sample goes on from the same state;
- a matcher's state is its tokens: preemption (swap or recompute) keeps the sequence and so
  its matcher, and nothing is replayed;
- `Grammars.fill(...)` computes many masks at once, in the library's threads, without the
  GIL: the engine runs it while the model's step computes;
- EOS is in the mask only where the grammar accepts; `Matcher.done` says the grammar can take
  nothing more, and the sequence then ends with "stop".
"""
from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from typing import Any, Sequence

import numpy as np

# JSON under a grammar is written compactly (no free whitespace: a random or weak model could
# otherwise fill its budget with spaces), with OpenAI's separators.
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
_CACHED_GRAMMARS = 256


class GrammarError(ValueError):
    """A structured-output spec that does not compile (a bad schema, regex or grammar)."""


def _grammar_text(spec: dict[str, Any]) -> str:
    """The llguidance grammar of a checked spec (SamplingParams.structured_outputs)."""
    from llguidance import LLMatcher, grammar_from

    if "json" in spec or "json_object" in spec:
        schema = spec.get("json", {"type": "object"})
        if schema is True:
            schema = {}
        # strict: every keyword must be enforced, and one that cannot be is an error; otherwise
        # keywords the compiler does not implement are left out (best effort, as OpenAI's
        # non-strict mode).
        options = {**_JSON_OPTIONS, "lenient": not spec.get("strict", False)}
        try:
            return LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=options)
        except ValueError as e:
            raise GrammarError(f"the JSON schema does not compile: {e}") from None
    if "regex" in spec:
        return LLMatcher.grammar_from_regex(spec["regex"])
    if "choice" in spec:
        return grammar_from("choice", json.dumps(spec["choice"]))
    try:
        return grammar_from("grammar", spec["grammar"])  # Lark, or GBNF converted to Lark
    except ValueError as e:
        raise GrammarError(str(e)) from None


class Matcher:
    """One sequence's place in its grammar."""

    __slots__ = ("m",)

    def __init__(self, m) -> None:
        self.m = m

    def consume(self, token_id: int) -> None:
        """Advances by one sampled token; a token the mask did not allow is an error."""
        if not self.m.consume_token(token_id):
            raise GrammarError(f"the grammar cannot take token {token_id}: {self.m.get_error()}")

    def copy(self) -> "Matcher":
        return Matcher(self.m.deep_copy())

    @property
    def done(self) -> bool:
        """Nothing but EOS can follow: the output is complete."""
        return self.m.is_stopped()

    @property
    def accepting(self) -> bool:
        return self.m.is_accepting()


class Grammars:
    """The grammars of one model's tokenizer: compiled specs (cached) and their matchers."""

    def __init__(self, backend_json: str, vocab_size: int, eos_token_ids: Sequence[int]) -> None:
        # The tokenizer is built on first use: a second or so for a large vocabulary, paid only
        # by engines that get a structured request.
        self.backend_json, self.vocab_size, self.eos = backend_json, vocab_size, list(eos_token_ids)
        self._tokenizer = None
        self._executor = None
        self._lock = threading.Lock()
        self._compiled: OrderedDict[str, str] = OrderedDict()
        # The library's thread pool computes masks in parallel, and its threads spin between
        # tasks: on a few cores they take them from the model's OpenMP team, whose step then
        # waits at every barrier (a decode step of SmolLM2 at batch 32 on 2 cores took twice as
        # long). There the masks are computed one after another on the thread that runs beside
        # the step. PAGEDKV_GRAMMAR_THREADS=1 or 0 decides it.
        choice = os.environ.get("PAGEDKV_GRAMMAR_THREADS")
        self.parallel = len(os.sched_getaffinity(0)) >= 8 if choice is None else choice != "0"

    @classmethod
    def for_tokenizer(cls, tokenizer, vocab_size: int, eos_token_ids: Sequence[int]) -> "Grammars":
        """`tokenizer`: pagedkv's Tokenizer (a tokenizer.json, or one built from GGUF metadata)."""
        return cls(tokenizer.backend.to_str(), vocab_size, eos_token_ids)

    @property
    def words(self) -> int:
        """int32 words of one row's bitmask."""
        return (self.vocab_size + 31) // 32

    def _ll(self):
        with self._lock:
            if self._tokenizer is None:
                from llguidance import LLExecutor, LLTokenizer

                eos = self.eos or None
                self._tokenizer = LLTokenizer(self.backend_json, n_vocab=self.vocab_size, eos_token=eos)
                self._executor = LLExecutor()
            return self._tokenizer

    def compile(self, spec: dict[str, Any]) -> str:
        """The grammar of a spec, checked against the tokenizer; GrammarError names what is wrong."""
        from llguidance import LLMatcher

        key = json.dumps(spec, sort_keys=True)
        with self._lock:
            if key in self._compiled:
                self._compiled.move_to_end(key)
                return self._compiled[key]
        grammar = _grammar_text(spec)
        tokenizer = self._ll()
        is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
        if is_error:
            kind = next(k for k in spec if k != "strict")
            raise GrammarError(f"structured_outputs.{kind} does not compile: {messages[0] if messages else ''}")
        with self._lock:
            self._compiled[key] = grammar
            while len(self._compiled) > _CACHED_GRAMMARS:
                self._compiled.popitem(last=False)
        return grammar

    def matcher(self, spec: dict[str, Any]) -> Matcher:
        from llguidance import LLMatcher

        m = LLMatcher(self._ll(), self.compile(spec), log_level=0)
        if m.is_error():
            raise GrammarError(f"structured_outputs does not compile: {m.get_error()}")
        return Matcher(m)

    def fill(self, matchers: Sequence[tuple[Matcher, int]], rows: int) -> np.ndarray:
        """int32 [rows, words]: the listed rows hold their matchers' masks, the others allow
        every token (-1). Computed in the library's threads, without the GIL."""
        mask = np.full((rows, self.words), -1, dtype=np.int32)
        if matchers:
            self._ll()
            if self.parallel:
                from llguidance.numpy import fill_next_token_bitmask_par

                fill_next_token_bitmask_par(self._executor, [(m.m, row) for m, row in matchers], mask)
            else:
                size = self.words * 4
                for m, row in matchers:
                    m.m.unsafe_compute_mask_ptr(mask[row].ctypes.data, size)
        return mask
