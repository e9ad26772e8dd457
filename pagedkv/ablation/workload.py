"""Synthetic serving workloads: long-tailed prompt and output lengths, Poisson arrivals.

ShareGPT conversations have log-normal-like lengths: most are short, a few are very long
(the vLLM paper: inputs average 161 tokens, outputs 338). Real text is not needed to
exercise memory and scheduling, so prompts are random token ids, and outputs run to their
drawn length (ignore_eos) so that every run of a workload does the same work.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

# Token ids below this are left out of random prompts: special tokens live there.
FIRST_PLAIN_TOKEN = 100


@dataclass
class WorkloadRequest:
    request_id: str
    prompt_ids: list[int]
    output_len: int
    arrival: float  # seconds after the workload starts


def long_tailed(rng: random.Random, mean: float, sigma: float, low: int, high: int) -> int:
    """One log-normal draw with the given mean, clipped to [low, high]."""
    mu = math.log(mean) - sigma * sigma / 2
    return max(low, min(high, round(rng.lognormvariate(mu, sigma))))


def poisson_arrivals(rng: random.Random, n: int, rate: float) -> list[float]:
    """Arrival times of n requests at `rate` per second; all at 0 when rate is infinite."""
    if math.isinf(rate):
        return [0.0] * n
    t, times = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        times.append(t)
    return times


def make_workload(num_requests: int, vocab_size: int, seed: int = 0, prompt_mean: float = 161,
                  output_mean: float = 338, max_prompt: int = 1024, max_output: int = 1024,
                  sigma: float = 0.9, rate: float = math.inf) -> list[WorkloadRequest]:
    if vocab_size <= FIRST_PLAIN_TOKEN:
        raise ValueError(f"the vocabulary needs more than {FIRST_PLAIN_TOKEN} tokens, has {vocab_size}")
    rng = random.Random(seed)
    arrivals = poisson_arrivals(rng, num_requests, rate)
    requests = []
    for i, arrival in enumerate(arrivals):
        prompt_len = long_tailed(rng, prompt_mean, sigma, 4, max_prompt)
        output_len = long_tailed(rng, output_mean, sigma, 1, max_output)
        prompt = [rng.randrange(FIRST_PLAIN_TOKEN, vocab_size) for _ in range(prompt_len)]
        requests.append(WorkloadRequest(f"req-{i}", prompt, output_len, arrival))
    return requests


def describe(requests: list[WorkloadRequest]) -> str:
    prompts = sorted(len(r.prompt_ids) for r in requests)
    outputs = sorted(r.output_len for r in requests)

    def summary(xs: list[int]) -> str:
        return f"mean {sum(xs) / len(xs):.0f}, median {xs[len(xs) // 2]}, max {xs[-1]}"

    return f"{len(requests)} requests; prompt tokens {summary(prompts)}; output tokens {summary(outputs)}"
