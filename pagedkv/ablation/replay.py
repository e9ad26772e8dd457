"""Replaying a workload against an LLMEngine in real time, recording per-request latencies.

Requests enter the engine when their arrival time has come; between arrivals an idle
engine sleeps until the next one. A closed loop (a chat's next turn) is a follow-up request
that arrives the moment the request before it finishes. Latencies follow the vLLM paper:
normalized latency is a request's end-to-end time divided by its output length.
"""
from __future__ import annotations

import bisect
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable

from tqdm import tqdm

from pagedkv import LLMEngine, RequestOutput, SamplingParams
from pagedkv.ablation.workload import WorkloadRequest


@dataclass
class RequestTiming:
    arrival: float
    first_token: float | None = None
    finished: float | None = None
    output_tokens: int = 0

    @property
    def latency(self) -> float:
        return self.finished - self.arrival

    @property
    def time_to_first_token(self) -> float:
        return self.first_token - self.arrival

    @property
    def normalized_latency(self) -> float:
        return self.latency / max(self.output_tokens, 1)


@dataclass
class ReplayResult:
    timings: dict[str, RequestTiming]
    outputs: dict[str, RequestOutput]
    elapsed: float
    generated_tokens: int
    stats: dict  # engine.stats() at the end
    samples: list = field(default_factory=list)  # whatever on_step returned, one per step

    @property
    def throughput(self) -> float:
        return self.generated_tokens / self.elapsed


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


class WallClock:
    """Seconds since the replay began; idle gaps are slept through."""

    def __init__(self) -> None:
        self.origin = time.monotonic()  # engine arrival times are on time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self.origin

    def wait_until(self, t: float) -> None:
        time.sleep(max(t - self.now(), 0.0))


class CpuClock:
    """A virtual clock that advances by this process's CPU time and jumps over idle gaps. On a
    machine that other work shares, wall-clock latencies measure the neighbours; these measure
    the engine as if it had its cores to itself. (CPU only: GPU work is not CPU time.)"""

    def __init__(self) -> None:
        self.origin = 0.0
        self.start, self.skipped = time.process_time(), 0.0

    def now(self) -> float:
        return time.process_time() - self.start + self.skipped

    def wait_until(self, t: float) -> None:
        self.skipped += max(t - self.now(), 0.0)


def replay(engine: LLMEngine, requests: list[WorkloadRequest],
           params_for: Callable[[WorkloadRequest], SamplingParams],
           on_step: Callable[[LLMEngine], object] | None = None, desc: str | None = None,
           clock: WallClock | CpuClock | None = None,
           follow_up: Callable[[WorkloadRequest, RequestOutput], WorkloadRequest | None] | None = None,
           ) -> ReplayResult:
    """Runs the workload to completion on `clock` (wall time by default); `desc` shows a
    progress bar with that label. `follow_up(request, output)` may return the request that
    the finished one leads to; it arrives at once."""
    clock = clock or WallClock()
    pending = sorted(requests, key=lambda r: r.arrival)
    sent: dict[str, WorkloadRequest] = {}
    timings: dict[str, RequestTiming] = {}
    outputs: dict[str, RequestOutput] = {}
    samples: list = []
    tokens_before = engine.generated_tokens
    bar = tqdm(total=len(requests), desc=desc, unit="req", leave=False, disable=desc is None)
    while pending or engine.has_unfinished():
        if pending and not engine.has_unfinished():
            clock.wait_until(pending[0].arrival)
        now = clock.now()
        while pending and pending[0].arrival <= now:
            request = pending.pop(0)
            sent[request.request_id] = request
            engine.add_request(request.request_id, request.prompt_ids, params_for(request),
                               arrival_time=clock.origin + request.arrival)
            timings[request.request_id] = RequestTiming(request.arrival)
        for output in engine.step():
            timing, now = timings[output.request_id], clock.now()
            if timing.first_token is None and (output.finished or any(c.new_token_ids for c in output.outputs)):
                timing.first_token = now
            if output.finished:
                timing.finished = now
                timing.output_tokens = max((len(c.token_ids) for c in output.outputs), default=0)
                outputs[output.request_id] = output
                bar.update(1)
                nxt = follow_up(sent[output.request_id], output) if follow_up else None
                if nxt is not None:
                    bisect.insort(pending, dataclasses.replace(nxt, arrival=now), key=lambda r: r.arrival)
                    bar.total += 1
        if on_step is not None:
            samples.append(on_step(engine))
    elapsed = clock.now()
    bar.close()
    return ReplayResult(timings, outputs, elapsed, engine.generated_tokens - tokens_before,
                        engine.stats(), samples)
