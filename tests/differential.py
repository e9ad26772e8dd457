"""Differential testing of the engine's exactness promise: a request returns under concurrency,
preemption (each mode), prefix hits, chunked prefill, async scheduling and other requests'
aborts exactly what it returns alone.

`random_workload(seed)` draws requests that share heads at and off block boundaries, with
greedy, beam search, seeded n-sampling and top-p parameters; `run_concurrently` keeps up to
`concurrency` of them live in one engine (arrivals staggered, some aborted part-way);
`LoneRuns` runs each request by itself in a roomy engine without prefix caching, once per
distinct request. Outputs are compared as token ids and, where a float32 model's matrix
products give each row the same bits whatever its batch (pagedkv/kernels/cpu/cpu_f32.c), as
cumulative log-probabilities bit for bit; prompt logprobs as tokens, ranks and values within
float tolerance.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from pagedkv.kernels.cpu import ops as cpu_ops
from pagedkv.runtime.engine.config import EngineConfig
from pagedkv.runtime.engine.llm_engine import LLMEngine
from pagedkv.runtime.engine.sampling_params import SamplingParams
from pagedkv.runtime.models.loader import LoadedModel


@dataclass(frozen=True)
class Request:
    prompt: tuple[int, ...]
    params: SamplingParams
    abort_after: int | None = None  # steps after its arrival; None: runs to the end

    @property
    def key(self) -> tuple:
        return self.prompt, repr(self.params)


def _params(rng: random.Random, stops: list[int] | None = None) -> SamplingParams:
    """`stops`: the sampled and greedy requests stop at these tokens (and EOS) instead of running
    to their length."""
    params = _running_params(rng)
    if stops is None or params.beam_width > 1:
        return params
    return _with(params, stop_token_ids=stops, ignore_eos=False)


def _running_params(rng: random.Random) -> SamplingParams:
    kind = rng.choice(["greedy", "greedy", "beam", "seeded_n", "top_p"])
    max_tokens = rng.randint(2, 12)
    if kind == "greedy":
        return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=rng.random() < 0.7)
    if kind == "beam":
        width = rng.randint(2, 3)
        return SamplingParams(max_tokens=max_tokens, beam_width=width, n=rng.randint(1, width))
    if kind == "seeded_n":
        return SamplingParams(max_tokens=max_tokens, n=rng.randint(2, 3), temperature=0.9,
                              seed=rng.randrange(1000), ignore_eos=True)
    return SamplingParams(max_tokens=max_tokens, temperature=1.0, top_p=0.9, seed=rng.randrange(1000),
                          ignore_eos=True)


SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                           "ok": {"type": "boolean"},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
          "required": ["ok", "name"], "additionalProperties": False}


def _constrained_params(rng: random.Random) -> SamplingParams:
    """Structured outputs (each kind, greedy, seeded and n samples) and the logits controls."""
    kind = rng.choice(["json", "regex", "choice", "controls", "json_n"])
    max_tokens = rng.randint(2, 16)
    sampled = dict(temperature=0.9, seed=rng.randrange(1000))
    if kind == "json":
        return SamplingParams(max_tokens=max_tokens, temperature=0, structured_outputs={"json": SCHEMA})
    if kind == "json_n":
        return SamplingParams(max_tokens=max_tokens, n=rng.randint(2, 3), structured_outputs={"json": SCHEMA},
                              **sampled)
    if kind == "regex":
        return SamplingParams(max_tokens=max_tokens, structured_outputs={"regex": r"[a-f]{1,5}(-[0-9]{2}){0,4}"},
                              **sampled)
    if kind == "choice":
        return SamplingParams(max_tokens=max_tokens, structured_outputs={"choice": ["alpha", "beta", "gamma"]},
                              **sampled)
    return SamplingParams(max_tokens=max_tokens, presence_penalty=0.5, frequency_penalty=0.4,
                          repetition_penalty=1.3, logit_bias={7: 2.0, 11: -5.0}, min_tokens=min(max_tokens, 3),
                          **rng.choice([sampled, {"temperature": 0}]))


def _with(params: SamplingParams, **changes) -> SamplingParams:
    fields = {k: v for k, v in vars(params).items() if k not in ("stop_strings", "stop_token_set")}
    return SamplingParams(**{**fields, **changes})


def random_workload(seed: int, vocab_size: int, num_requests: int = 40, abort_share: float = 0.1,
                    constrained: bool = False, prompt_logprobs: bool = False, stopping: bool = False) -> list[Request]:
    """Requests over a few shared heads (lengths at and off block boundaries for any block size
    up to 16), some identical to others, some aborted. `constrained`: half of the requests have
    grammars, penalties, logit_bias and min_tokens. `prompt_logprobs`: half ask for them.
    `stopping`: all but beam searches stop at a sixth of the vocabulary's tokens, so that
    samples of one request end at different steps."""
    rng = random.Random(seed)
    tokens = lambda n: tuple(rng.randrange(3, vocab_size) for _ in range(n))  # noqa: E731 (0-2: special)
    stops = sorted(rng.sample(range(3, vocab_size), vocab_size // 6)) if stopping else None
    heads = [(), tokens(16), tokens(23), tokens(33)]
    heads.append(heads[1] + tokens(9))  # a head that extends another
    distinct = []
    for _ in range(max(4, num_requests // 3)):
        prompt = rng.choice(heads) + tokens(rng.randint(1, 14))
        params = _constrained_params(rng) if constrained and rng.random() < 0.5 else _params(rng, stops)
        if prompt_logprobs and rng.random() < 0.5:
            params = _with(params, prompt_logprobs=rng.choice([0, 1, 5]))
        distinct.append(Request(prompt, params))
    requests = []
    for _ in range(num_requests):
        request = rng.choice(distinct)
        if rng.random() < abort_share:
            request = Request(request.prompt, request.params, abort_after=rng.randint(0, 6))
        requests.append(request)
    return requests


# Each row's bits independent of its batch: a request's log-probabilities are its lone run's.
BITWISE = cpu_ops.f32_linear_preferred()
Outputs = list[tuple[tuple[int, ...], float | None]]  # per completion: tokens, cumulative logprob


def outputs_of(output) -> Outputs:
    """Each completion's tokens, and its cumulative log-probability where BITWISE."""
    return [(tuple(c.token_ids), c.cumulative_logprob if BITWISE else None) for c in output.outputs]


def run_concurrently(engine: LLMEngine, requests: list[Request], concurrency: int,
                     seed: int = 0, prompt_logprobs: dict | None = None) -> dict[int, Outputs]:
    """Feeds the requests in order, keeping at most `concurrency` live (a random number joins
    each step); returns each finished, not aborted, request's outputs by its index (and puts
    its prompt logprobs in `prompt_logprobs`, when given, by its index too)."""
    rng = random.Random(seed)
    pending = list(enumerate(requests))
    live: dict[str, tuple[int, int]] = {}  # request id -> (index, steps since arrival)
    results: dict[int, Outputs] = {}
    step = 0
    while pending or engine.has_unfinished():
        for _ in range(rng.randint(0, concurrency)):
            if not pending or len(live) >= concurrency:
                break
            index, request = pending.pop(0)
            request_id = f"req{index}"
            engine.add_request(request_id, list(request.prompt), request.params, stream=False)
            live[request_id] = (index, 0)
        for request_id, (index, age) in list(live.items()):
            limit = requests[index].abort_after
            if limit is not None and age >= limit:
                engine.abort(request_id)
                del live[request_id]
            else:
                live[request_id] = (index, age + 1)
        for output in engine.step():
            if output.finished and output.request_id in live:
                index, _ = live.pop(output.request_id)
                results[index] = outputs_of(output)
                if prompt_logprobs is not None:
                    prompt_logprobs[index] = output.prompt_logprobs
        step += 1
        if step > 20000:
            raise AssertionError("the workload did not finish")
    return results


class LoneRuns:
    """Each distinct request run by itself, once, in an engine that never preempts and has no
    prefix cache: what the request returns alone."""

    def __init__(self, loaded: LoadedModel, block_size: int = 16):
        self.engine = LLMEngine(EngineConfig(block_size=block_size, num_device_blocks=1024, swap_space_gib=0.01,
                                             enable_prefix_caching=False), loaded)
        self.known: dict[tuple, Outputs] = {}
        self.prompt_logprobs: dict[tuple, list | None] = {}  # what each returned as its prompt logprobs

    def __call__(self, request: Request) -> Outputs:
        if request.key not in self.known:
            self.engine.add_request("alone", list(request.prompt), request.params, stream=False)
            while self.engine.has_unfinished():
                for output in self.engine.step():
                    if output.finished:
                        self.known[request.key] = outputs_of(output)
                        self.prompt_logprobs[request.key] = output.prompt_logprobs
        return self.known[request.key]


def same_prompt_logprobs(a: list | None, b: list | None, tolerance: float) -> bool:
    """The same tokens in the same order at every position, the same ranks, and logprobs
    within `tolerance` (float32 products may round differently in another batch)."""
    if a is None or b is None or len(a) != len(b):
        return a is b
    for x, y in zip(a, b):
        if (x is None) != (y is None):
            return False
        if x is not None and (list(x) != list(y) or any(
                x[t][1] != y[t][1] or abs(x[t][0] - y[t][0]) > tolerance for t in x)):
            return False
    return True


def assert_all_blocks_free(engine: LLMEngine) -> None:
    """Exact accounting: after the workload every block of every pool is free or cached."""
    bm = engine.block_manager
    for pool in bm.pools.values():
        assert pool.num_free_blocks == pool.num_blocks, (pool.device, pool.num_free_blocks, pool.num_blocks)
        assert not any(pool.ref_counts)
