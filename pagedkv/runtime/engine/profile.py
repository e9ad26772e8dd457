"""Where a step's time goes: schedule, cache ops, prepare, forward, sample, outputs.

Off by default (each mark is then one attribute test). On (`--profile-steps`), every mark
synchronises the device first, so that GPU work is charged to the phase that queued it, and
the seconds are summed per phase, separately for decode-only steps and steps with prefill.

With async scheduling the host's scheduling, input preparation and outputs run beside the
forward: `schedule` is then what the step still waited for them, and `overlapped` (not part
of the total) their time in all.
"""
from __future__ import annotations

import time
from collections import defaultdict

import torch

PHASES = ("schedule", "cache ops", "prepare", "forward", "sample", "outputs")


class StepProfile:
    def __init__(self, enabled: bool, device: torch.device | str) -> None:
        self.enabled = enabled
        self.cuda = torch.device(device).type == "cuda"
        self.seconds: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.steps: dict[str, int] = defaultdict(int)
        self._step: dict[str, float] = {}
        self._last = 0.0
        self._overlapped = 0.0
        self.overlapped_seconds: dict[str, float] = defaultdict(float)

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def begin(self) -> None:
        if self.enabled:
            self._step = {}
            self._overlapped = 0.0
            self._last = self._now()

    def mark(self, phase: str) -> None:
        """Charges the time since the last mark to `phase`."""
        if self.enabled:
            now = self._now()
            self._step[phase] = self._step.get(phase, 0.0) + now - self._last
            self._last = now

    def overlapped(self, seconds: float) -> None:
        """Host work of this step that ran on another thread beside the forward."""
        self._overlapped += seconds

    def end(self, kind: str) -> None:
        """Ends a step of `kind` ("decode" or "prefill"), its time charged by the marks."""
        if self.enabled and self._step:
            for phase, s in self._step.items():
                self.seconds[kind][phase] += s
            self.overlapped_seconds[kind] += self._overlapped
            self.steps[kind] += 1
            self._step = {}

    def summary(self) -> dict[str, dict[str, float]]:
        """Per kind of step: the steps, and milliseconds per step of each phase and in all."""
        out = {}
        for kind, phases in self.seconds.items():
            n = self.steps[kind]
            row = {phase: 1e3 * phases.get(phase, 0.0) / n for phase in PHASES}
            row.update({"steps": n, "total": sum(row.values())})
            if self.overlapped_seconds[kind]:
                row["overlapped"] = 1e3 * self.overlapped_seconds[kind] / n
            out[kind] = row
        return out

    def report(self) -> str:
        """A small table, one line per kind of step, milliseconds per step."""
        summary = self.summary()
        if not summary:
            return "step profile: no steps recorded"
        beside = any("overlapped" in row for row in summary.values())
        head = f"{'step (ms)':<10}{'steps':>7}" + "".join(f"{p:>11}" for p in PHASES) + f"{'total':>9}"
        lines = [head + (f"{'overlapped':>12}" if beside else "")]
        for kind, row in sorted(summary.items()):
            lines.append(f"{kind:<10}{row['steps']:>7}" + "".join(f"{row[p]:>11.3f}" for p in PHASES)
                         + f"{row['total']:>9.3f}" + (f"{row.get('overlapped', 0.0):>12.3f}" if beside else ""))
        return "\n".join(lines)
