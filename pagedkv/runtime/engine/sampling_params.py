"""Sampling parameters of one request, validated at construction (vLLM-style names).

Floats are checked in the precision they are used in: the sampler works in float32, so a
top_p that is positive as a Python float but 0 in float32 is refused here, not met in a step.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from pagedkv.runtime.engine.quote import quote
from pagedkv.runtime.engine.stop_strings import StopStrings

MAX_LOGPROBS = 20
# Stops are matched every token (stop_strings.py) and streams hold back the longest stop string
# less one character: both are bounded, as OpenAI bounds stop (to 4 strings).
MAX_STOP_STRINGS = 64
MAX_STOP_CHARS = 256
MAX_STOP_TOKEN_IDS = 1024  # matched through a set; beam search keeps (1 + this) * width candidates
MAX_LOGIT_BIAS = 1024  # entries of logit_bias (OpenAI's values are within +-100, and so are these)
MAX_PENALTY = 2.0  # presence and frequency penalties are within +-2, as in OpenAI's API and vLLM
MAX_REPETITION_PENALTY = 1000.0
# What a grammar may be: its JSON text (schemas) or its text (regexes, grammars, choices) is
# bounded, as stop strings are; the request body bounds it at the gateway too.
MAX_GRAMMAR_CHARS = 256 * 1024
# The kinds of structured output (vLLM's structured_outputs names); exactly one per request.
STRUCTURED_KINDS = ("json", "json_object", "regex", "choice", "grammar")
# Temperatures below this are treated as greedy: dividing by them overflows (vLLM does the same).
GREEDY_EPS = 1e-5
FLOAT32_MAX = 3.4028234663852886e38
FLOAT32_TINY = 1.1754943508222875e-38  # the smallest normal float32
# Beam search divides scores by generated_length ** length_penalty in float32. Keeping that
# factor within 1e±30 leaves room for the log-probability sums it scales.
MAX_LENGTH_FACTOR_LOG10 = 30.0


# Every integer is a signed 64-bit one, as in vLLM (its seed is a torch.long): what msgpack and
# JSON clients carry, numpy and torch hold, and the sampler's seed hash takes.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _check_int(name: str, value: Any, low: int, rule: str) -> None:
    # bool is an int subclass; True for max_tokens is a bug on the caller's side.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer {rule}, got {quote(value)}")
    if value < low:
        raise ValueError(f"{name} must be {rule}, got {quote(value)}")
    _check_int64(name, value)


def _check_int64(name: str, value: int) -> None:
    if not INT64_MIN <= value <= INT64_MAX:
        raise ValueError(f"{name} must be a 64-bit integer (from -2**63 to 2**63 - 1), got {quote(value)}")


def _as_float(name: str, value: Any, rule: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number {rule}, got {quote(value)}")
    try:
        value = float(value)
    except OverflowError:  # an int beyond any float
        value = math.inf
    if math.isnan(value) or math.isinf(value):
        raise ValueError(f"{name} must be a finite number {rule}, got {quote(value)}")
    return value


def _check_length_penalty(length_penalty: float, max_tokens: int) -> None:
    """Beam scores are cum_logprob / length ** length_penalty in float32, for length up to max_tokens."""
    if max_tokens == 1:
        return
    digits = math.log10(max_tokens)
    if abs(length_penalty) * digits > MAX_LENGTH_FACTOR_LOG10:
        bound = MAX_LENGTH_FACTOR_LOG10 / digits
        raise ValueError(f"length_penalty must be within +-{bound:.3g} with beam search and max_tokens "
                         f"{max_tokens} (beam scores are divided by length ** length_penalty in float32; "
                         f"{max_tokens} ** {abs(length_penalty):.4g} is beyond 1e30), got {length_penalty:.4g}")


@dataclass
class SamplingParams:
    """How to pick tokens for one request.

    temperature 0 is greedy. beam_width > 1 is beam search (deterministic, as transformers'
    num_beams without do_sample): temperature, top_k, top_p, min_p and seed are then ignored
    and n is how many of the best beams are returned.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0  # 0 or -1: off
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    n: int = 1
    beam_width: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False  # True, False or "never", as transformers
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top logprobs returned per token
    # vLLM's prompt_logprobs: each prompt token's logprob given the tokens before it (with its
    # rank), and this many of the likeliest tokens there; the first token has none.
    prompt_logprobs: int | None = None
    # Penalties as vLLM's (and OpenAI's): presence and frequency over the output's tokens,
    # repetition (divides positive logits, multiplies negative ones) over prompt and output.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit, within +-100
    min_tokens: int = 0  # no EOS, stop token or stop string ends the output before this many tokens
    include_stop_str_in_output: bool = False
    # One of {"json": schema}, {"json_object": true}, {"regex": str}, {"choice": [str, ...]},
    # {"grammar": str} (Lark or GBNF), with "strict" (bool, json only): the output follows it.
    structured_outputs: dict[str, Any] | None = None
    truncate_prompt_tokens: int | None = None  # keep only the prompt's last k tokens

    def __post_init__(self) -> None:
        _check_int("max_tokens", self.max_tokens, 1, ">= 1")
        self.temperature = _as_float("temperature", self.temperature, ">= 0")
        if not 0 <= self.temperature <= FLOAT32_MAX:
            raise ValueError(f"temperature must be >= 0 and at most {FLOAT32_MAX:.4g} (the largest float32, "
                             f"the sampler's precision), got {self.temperature:.4g}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"top_k must be -1 or 0 (off) or an integer >= 1, got {quote(self.top_k)}")
        _check_int64("top_k", self.top_k)
        self.top_p = _as_float("top_p", self.top_p, "in (0, 1]")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_p < FLOAT32_TINY:  # 0 (or a subnormal) in float32: every token would be cut
            raise ValueError(f"top_p must be in (0, 1] and at least {FLOAT32_TINY:.4g} (the smallest normal "
                             f"float32, the sampler's precision), got {self.top_p:.4g}")
        self.min_p = _as_float("min_p", self.min_p, "in [0, 1]")
        if not 0.0 <= self.min_p <= 1.0:  # in float32 too: rounding keeps it in [0, 1]
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.seed is not None:
            if isinstance(self.seed, bool) or not isinstance(self.seed, int):
                raise ValueError(f"seed must be an integer or None, got {quote(self.seed)}")
            _check_int64("seed", self.seed)
        _check_int("beam_width", self.beam_width, 1, ">= 1")
        _check_int("n", self.n, 1, ">= 1")
        if self.beam_width > 1 and self.n > self.beam_width:
            raise ValueError(f"n must be <= beam_width ({self.beam_width}) with beam search, got {self.n}")
        self.length_penalty = _as_float("length_penalty", self.length_penalty, "")
        if self.use_beam_search:
            _check_length_penalty(self.length_penalty, self.max_tokens)
        if self.early_stopping not in (True, False, "never") or not isinstance(self.early_stopping, (bool, str)):
            raise ValueError(f"early_stopping must be True, False or 'never', got {quote(self.early_stopping)}")
        if isinstance(self.stop, str):  # a single stop string is common enough to accept
            self.stop = [self.stop]
        if isinstance(self.stop, (list, tuple)) and len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop must be a list of at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}")
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {quote(self.stop)}")
        longest = max(self.stop, key=len, default="")
        if len(longest) > MAX_STOP_CHARS:
            raise ValueError(f"stop strings must be at most {MAX_STOP_CHARS} characters long, got one of "
                             f"{len(longest)}: {quote(longest, 60)}")
        self.stop = list(self.stop)
        # Matched from here on: the list is read once, at construction.
        self.stop_strings = StopStrings(self.stop)
        if isinstance(self.stop_token_ids, (list, tuple)) and len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(f"stop_token_ids must be a list of at most {MAX_STOP_TOKEN_IDS} token ids, got "
                             f"{len(self.stop_token_ids)}")
        if not isinstance(self.stop_token_ids, (list, tuple)) or not all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= INT64_MAX for t in self.stop_token_ids
        ):
            raise ValueError(f"stop_token_ids must be a list of integers >= 0 (64-bit), got "
                             f"{quote(self.stop_token_ids)}")
        self.stop_token_ids = list(self.stop_token_ids)
        self.stop_token_set = frozenset(self.stop_token_ids)  # read once, as stop_strings
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a boolean, got {quote(self.ignore_eos)}")
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, 0, f"in [0, {MAX_LOGPROBS}]")
            if self.logprobs > MAX_LOGPROBS:
                raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        if self.prompt_logprobs is not None:
            _check_int("prompt_logprobs", self.prompt_logprobs, 0, f"in [0, {MAX_LOGPROBS}]")
            if self.prompt_logprobs > MAX_LOGPROBS:
                raise ValueError(f"prompt_logprobs must be in [0, {MAX_LOGPROBS}], got {self.prompt_logprobs}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = _as_float(name, getattr(self, name), f"in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}]")
            if not -MAX_PENALTY <= value <= MAX_PENALTY:
                raise ValueError(f"{name} must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], got {value}")
            setattr(self, name, value)
        self.repetition_penalty = _as_float("repetition_penalty", self.repetition_penalty,
                                            f"in (0, {MAX_REPETITION_PENALTY:g}]")
        if not FLOAT32_TINY <= self.repetition_penalty <= MAX_REPETITION_PENALTY:
            raise ValueError(f"repetition_penalty must be in (0, {MAX_REPETITION_PENALTY:g}] (and a normal "
                             f"float32), got {self.repetition_penalty:.4g}")
        self._check_logit_bias()
        _check_int("min_tokens", self.min_tokens, 0, ">= 0")
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be at most max_tokens ({self.max_tokens}), got {self.min_tokens}")
        if not isinstance(self.include_stop_str_in_output, bool):
            raise ValueError(f"include_stop_str_in_output must be a boolean, got "
                             f"{quote(self.include_stop_str_in_output)}")
        if self.truncate_prompt_tokens is not None:
            _check_int("truncate_prompt_tokens", self.truncate_prompt_tokens, 1, ">= 1")
        if self.structured_outputs is not None:
            self.structured_outputs = check_structured_outputs(self.structured_outputs)
            if self.use_beam_search:
                raise ValueError("structured_outputs cannot be combined with beam search")

    def _check_logit_bias(self) -> None:
        if self.logit_bias is None:
            return
        if not isinstance(self.logit_bias, dict):
            raise ValueError(f"logit_bias must be a map of token ids to numbers, got {quote(self.logit_bias)}")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias must have at most {MAX_LOGIT_BIAS} entries, got {len(self.logit_bias)}")
        bias = {}
        for token, value in self.logit_bias.items():
            if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token <= INT64_MAX:
                raise ValueError(f"logit_bias keys must be token ids (integers >= 0), got {quote(token)}")
            value = _as_float("logit_bias values", value, "in [-100, 100]")
            if not -100.0 <= value <= 100.0:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {value} for token {token}")
            bias[token] = value
        self.logit_bias = bias or None

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @property
    def processes_logits(self) -> bool:
        """Whether anything changes the logits before sampling (penalties, bias, min_tokens,
        a grammar): such rows leave the sampler's all-greedy fast path."""
        return (self.has_penalties or self.logit_bias is not None or self.min_tokens > 0
                or self.structured_outputs is not None)

    @property
    def use_beam_search(self) -> bool:
        return self.beam_width > 1

    @property
    def is_greedy(self) -> bool:
        """Argmax decoding (beam search is decided by use_beam_search, not by this)."""
        return self.temperature < GREEDY_EPS

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SamplingParams":
        """From a protocol message; unknown keys are an error, not silently dropped."""
        if not isinstance(d, dict):
            raise ValueError(f"sampling parameters must be a map, got {type(d).__name__}")
        allowed = {f.name for f in fields(cls)}
        unknown = sorted(quote(k, 60) for k in d if k not in allowed)
        if unknown:
            raise ValueError(f"unknown sampling parameter(s) {', '.join(unknown[:5])}; "
                             f"allowed: {', '.join(sorted(allowed))}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_structured_outputs(spec: Any) -> dict[str, Any]:
    """A structured-output request in its one canonical shape: exactly one kind (json with an
    object or its JSON text, json_object true, regex, choice a non-empty list of strings,
    grammar), and "strict" (json only). Whether the grammar compiles is the engine's to say."""
    import json

    if not isinstance(spec, dict):
        raise ValueError(f"structured_outputs must be a map, got {quote(spec)}")
    unknown = sorted(quote(k, 60) for k in spec if k not in (*STRUCTURED_KINDS, "strict"))
    if unknown:
        raise ValueError(f"unknown structured_outputs field(s) {', '.join(unknown[:5])}; "
                         f"allowed: {', '.join(STRUCTURED_KINDS)}, strict")
    kinds = [k for k in STRUCTURED_KINDS if spec.get(k) not in (None, False)]
    if len(kinds) != 1:
        raise ValueError(f"structured_outputs must have exactly one of {', '.join(STRUCTURED_KINDS)}, "
                         f"got {kinds or 'none'}")
    kind, value = kinds[0], spec[kinds[0]]
    out: dict[str, Any] = {}
    if kind == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as e:
                raise ValueError(f"structured_outputs.json is not valid JSON: {e}") from None
        if not isinstance(value, (dict, bool)):
            raise ValueError(f"structured_outputs.json must be a JSON schema (an object), got {quote(value)}")
        size = len(json.dumps(value))
    elif kind == "json_object":
        if value is not True:
            raise ValueError(f"structured_outputs.json_object must be true, got {quote(value)}")
        size = 0
    elif kind == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
            raise ValueError(f"structured_outputs.choice must be a non-empty list of strings, got {quote(value)}")
        size = sum(len(c) for c in value)
    else:
        if not isinstance(value, str) or not value:
            raise ValueError(f"structured_outputs.{kind} must be a non-empty string, got {quote(value)}")
        size = len(value)
    if size > MAX_GRAMMAR_CHARS:
        raise ValueError(f"structured_outputs.{kind} must be at most {MAX_GRAMMAR_CHARS} characters, got {size}")
    out[kind] = value
    strict = spec.get("strict")
    if strict is not None:
        if not isinstance(strict, bool):
            raise ValueError(f"structured_outputs.strict must be a boolean, got {quote(strict)}")
        if kind != "json":
            raise ValueError("structured_outputs.strict applies to json only")
        out["strict"] = strict
    return out
