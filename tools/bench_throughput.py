"""Throughput of continuous batching against static batching and transformers' `generate`,
KV-cache waste, and the memory that block sharing saves (CPU, default model).

    python -m tools.bench_throughput [--quick] [--update-docs] [--num-requests 200] [--seed 0]
                                     [--batch 32] [--threads N] [--clock wall|cpu]

On CUDA (`--device cuda`, the default where CUDA is) it runs the GPU benchmark of
tools/throughput_gpu.py instead: pagedkv against transformers' `generate_batch` and static
`generate` on a random model of a named shape, plus decode-step times:

    python -m tools.bench_throughput --device cuda --random-model llama-1b [--quick]
                                     [--num-requests 256] [--enforce-eager] [--out DIR] [--update-docs]

One fixed-seed workload, every request arriving at t = 0, with ShareGPT-shaped (log-normal,
long-tailed) prompt and output lengths, scaled down so that the whole run takes minutes on
a small CPU. Every request generates exactly its drawn output length (ignore_eos). It runs
four ways, each with at most B sequences in a batch:

- continuous: the engine with max_num_seqs = B, all requests submitted at once; a finished
  sequence's place is taken by the next request at the very next iteration;
- static: the same engine, B requests at a time in arrival order, each batch run to
  completion before the next is admitted; a batch keeps its shape, every request in it
  decoding until the batch's longest is done (as in `generate` and request-level serving);
- static, finished rows leave (for reference): the same batches, but a finished request
  leaves its batch at once, which is half of iteration-level scheduling;
- transformers: `generate` on left-padded batches of B (max_new_tokens = the batch's
  longest output; only each request's own tokens count).

Throughput is useful generated tokens per second of wall time (`--clock cpu`: per second
of this process's CPU time, which stays steady while other work shares the machine; use it
with `--threads 1`). Each way also records how much CPU other processes took meanwhile. The
engine runs time the executor per step, which separates the model from the engine's own
work and gives the step-cost model that explains the ratios. The continuous run samples the
block manager after every step (KV waste). Sharing: `pagedkv.ablation.sharing` on a smaller workload.

Writes two sections (see TITLE_THROUGHPUT and TITLE_MEMORY) into --out (a fresh folder unless
named), and with --update-docs into docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm import tqdm

from pagedkv.kernels.reference import decode_chunks
from pagedkv import EngineConfig, LLMEngine, LoadedModel, SamplingParams, default_model_path, load_model
from pagedkv.runtime.models.config import ModelConfig
from tools.bench_decode import load_transformers
from pagedkv.ablation.replay import replay
from pagedkv.ablation.report import add_output_arguments, markdown_table, output_folder, publish
from pagedkv.ablation.sharing import measure_sharing, sharing_table
from tools.throughput_gpu import SHAPES, main_gpu
from pagedkv.ablation.workload import WorkloadRequest, describe, make_workload

TITLE_THROUGHPUT = "Throughput: continuous vs static batching vs transformers (CPU)"
TITLE_MEMORY = "Memory: KV waste and sharing savings (CPU)"
TARGET_VS_STATIC = 3.0
TARGET_VS_TRANSFORMERS = 2.0
TARGET_WASTE = 0.04
QUIET_CORES = 0.15
TIMERS = {"wall": time.perf_counter, "cpu": time.process_time}  # other processes' CPU use above which a run is reported as disturbed
SHAREGPT_PROMPT_MEAN, SHAREGPT_OUTPUT_MEAN = 161, 338  # the vLLM paper's ShareGPT means


@dataclass
class Preset:
    num_requests: int
    batch: int                 # B: max_num_seqs, the static batch size, transformers' batch size
    prompt_mean: float
    output_mean: float
    max_prompt: int
    max_output: int
    sharing_requests: int
    sharing_prompt_mean: float
    sharing_output_mean: float
    sharing_max_output: int


# ShareGPT's shape (log-normal, sigma 0.9, output about twice the prompt) at 0.2x its mean
# lengths, so that the three ways and the sharing runs take about 10 minutes of one core
# (transformers' padded batches take half of it).
FULL = Preset(200, 32, 32, 68, 256, 256, 12, 32, 68, 256)
QUICK = Preset(24, 8, 24, 24, 64, 96, 3, 24, 16, 32)


@dataclass
class StepLog:
    """Per engine step: decode rows, prefill tokens and the executor's seconds (cache
    operations and the model), on the benchmark's clock."""

    timer: Callable[[], float] = time.perf_counter
    rows: list[int] = field(default_factory=list)
    prefill_tokens: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    # Decode attention: K/V tokens the decode rows hold, and what the CPU attention path
    # gathers (whole blocks, in the chunks of `reference.decode_chunks`).
    context_tokens: int = 0
    read_tokens: int = 0

    def instrument(self, engine: LLMEngine) -> None:
        execute = engine.executor.execute
        block_size = engine.block_manager.block_size

        def timed(out):
            start = self.timer()
            logits = execute(out)
            if not out.is_empty:
                self.seconds.append(self.timer() - start)
                self.rows.append(len(out.decodes))
                self.prefill_tokens.append(sum(r.end - r.start for r in out.prefills))
                if out.decodes:
                    lens = [r.end for r in out.decodes]
                    blocks = tuple(sorted((-(-n // block_size) for n in lens), reverse=True))
                    self.context_tokens += sum(lens)
                    self.read_tokens += block_size * sum(
                        n * (b1 - b0) for n, b0, b1 in decode_chunks(blocks, block_size))
            return logits

        engine.executor.execute = timed


class Stopwatch:
    """Wall time, this process's CPU time, and the CPU time other processes took meanwhile
    (from /proc/stat, in cores): the machine is shared, and figures taken beside other work
    are not comparable. With one torch thread the CPU clock stays steady under such load."""

    def __init__(self) -> None:
        self.start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float | None]:
        busy = None
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
            busy = (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # not idle, not iowait
        except (OSError, ValueError):
            pass
        return time.monotonic(), time.process_time(), busy

    def stop(self) -> tuple[float, float, float | None]:
        """(wall seconds, CPU seconds, cores that other processes used)."""
        end = self._sample()
        wall, cpu = end[0] - self.start[0], end[1] - self.start[1]
        other = None
        if end[2] is not None and self.start[2] is not None and wall > 0:
            other = max(0.0, (end[2] - self.start[2]) - cpu) / wall
        return wall, cpu, other


@dataclass
class WayResult:
    name: str
    tokens: int
    wall_s: float
    cpu_s: float
    other_load: float | None  # cores other processes used meanwhile
    steps: int = 0
    log: StepLog | None = None
    preemptions: int = 0

    def seconds(self, clock: str) -> float:
        return self.cpu_s if clock == "cpu" else self.wall_s

    def throughput(self, clock: str) -> float:
        return self.tokens / self.seconds(clock)

    def executor_share(self, clock: str) -> float | None:
        return sum(self.log.seconds) / self.seconds(clock) if self.log else None

    @property
    def padding(self) -> float | None:
        """K/V the CPU decode attention gathers over the K/V the decode rows hold."""
        return self.log.read_tokens / self.log.context_tokens if self.log and self.log.context_tokens else None

    @property
    def mean_decode_rows(self) -> float | None:
        rows = [r for r in self.log.rows if r] if self.log else []
        return statistics.fmean(rows) if rows else None


def useful_tokens(requests: list[WorkloadRequest]) -> int:
    return sum(r.output_len for r in requests)


def engine_params(request: WorkloadRequest) -> SamplingParams:
    return SamplingParams(max_tokens=request.output_len, ignore_eos=True)


def new_engine(loaded: LoadedModel, batch: int) -> LLMEngine:
    return LLMEngine(EngineConfig(max_num_seqs=batch), loaded)


def warm_up(loaded: LoadedModel, requests: list[WorkloadRequest]) -> None:
    engine = new_engine(loaded, 2)
    for r in requests[:2]:
        engine.add_request(f"warm-{r.request_id}", r.prompt_ids, SamplingParams(max_tokens=4, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()


# -- the three ways --------------------------------------------------------------------------

def run_continuous(loaded: LoadedModel, requests: list[WorkloadRequest], batch: int, clock: str):
    """All requests submitted at t = 0; returns the result and per-step block statistics."""
    engine = new_engine(loaded, batch)
    log = StepLog(TIMERS[clock])
    log.instrument(engine)

    def sample(e: LLMEngine) -> tuple[float, int, int]:
        s = e.block_manager.stats()
        return s.waste, s.slots_allocated, e.scheduler.num_running_seqs()

    watch = Stopwatch()
    result = replay(engine, requests, engine_params, on_step=sample, desc="continuous batching")
    wall, cpu, other = watch.stop()
    tokens = sum(len(o.outputs[0].token_ids) for o in result.outputs.values())
    if tokens != useful_tokens(requests):
        raise RuntimeError(f"continuous batching generated {tokens} tokens, expected {useful_tokens(requests)}")
    pre = result.stats["preemptions"]
    way = WayResult("continuous batching", tokens, wall, cpu, other, result.stats["steps"], log,
                    pre["swap"] + pre["recompute"])
    return way, [s for s in result.samples if s[1] > 0]


def run_static(loaded: LoadedModel, requests: list[WorkloadRequest], batch: int, clock: str,
               shed_finished: bool = False) -> WayResult:
    """B requests at a time, each batch run to completion. Every request of a batch decodes
    until the batch's longest is done, and only its own output length counts; shed_finished:
    a request leaves the batch once it has its own length instead."""
    engine = new_engine(loaded, batch)
    log = StepLog(TIMERS[clock])
    log.instrument(engine)
    own = {r.request_id: r.output_len for r in requests}
    tokens = 0
    name = "static batching, finished rows leave" if shed_finished else "static batching"
    bar = tqdm(total=len(requests), desc=name, unit="req", leave=False)
    watch = Stopwatch()
    for first in range(0, len(requests), batch):
        chunk = requests[first:first + batch]
        longest = max(r.output_len for r in chunk)
        for r in chunk:
            params = engine_params(r)
            if not shed_finished:
                params = dataclasses.replace(params, max_tokens=longest)
            engine.add_request(r.request_id, r.prompt_ids, params)
        while engine.has_unfinished():
            for output in engine.step():
                if output.finished:
                    tokens += min(len(output.outputs[0].token_ids), own[output.request_id])
                    bar.update(1)
    wall, cpu, other = watch.stop()
    bar.close()
    if tokens != useful_tokens(requests):
        raise RuntimeError(f"{name} generated {tokens} useful tokens, expected {useful_tokens(requests)}")
    pre = engine.scheduler.preemptions
    return WayResult(name, tokens, wall, cpu, other, engine.steps, log, pre["swap"] + pre["recompute"])


def transformers_generate(model, chunk: list[WorkloadRequest], pad_id: int) -> int:
    """One left-padded batch; returns the useful tokens (each request's own output length)."""
    from transformers import GenerationConfig

    width = max(len(r.prompt_ids) for r in chunk)
    ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(chunk), width), dtype=torch.long)
    for i, r in enumerate(chunk):
        ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
        mask[i, width - len(r.prompt_ids):] = 1
    new = max(r.output_len for r in chunk)
    # The engine's sampling: temperature 1, no top-k / top-p, no EOS stop.
    config = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new,
                              min_new_tokens=new, eos_token_id=None, pad_token_id=pad_id)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    if out.shape[1] != width + new:
        raise RuntimeError(f"transformers generated {out.shape[1] - width} tokens, expected {new}")
    return sum(r.output_len for r in chunk)


def run_transformers(model, requests: list[WorkloadRequest], batch: int, seed: int, pad_id: int) -> WayResult:
    transformers_generate(model, requests[:2], pad_id)  # warm-up, untimed
    torch.manual_seed(seed)
    tokens = 0
    bar = tqdm(total=len(requests), desc="transformers generate", unit="req", leave=False)
    watch = Stopwatch()
    for first in range(0, len(requests), batch):
        chunk = requests[first:first + batch]
        tokens += transformers_generate(model, chunk, pad_id)
        bar.update(len(chunk))
    wall, cpu, other = watch.stop()
    bar.close()
    return WayResult("transformers generate", tokens, wall, cpu, other)


# -- analysis ---------------------------------------------------------------------------------

def fit_step_cost(logs: list[StepLog]) -> tuple[float, float] | None:
    """Least squares seconds = a + b * rows over the decode-only steps: (a, b)."""
    xs, ys = [], []
    for log in logs:
        for rows, pre, s in zip(log.rows, log.prefill_tokens, log.seconds):
            if pre == 0 and rows > 0:
                xs.append(rows)
                ys.append(s)
    if len(set(xs)) < 2:
        return None
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def static_model_ratio(requests: list[WorkloadRequest], batch: int, a: float, b: float,
                       shed_finished: bool = True) -> float:
    """Continuous / static throughput that step cost a + b * rows predicts (decode only):
    static batches that shed finished rows, or (shed_finished=False) keep their shape."""
    static = 0.0
    for first in range(0, len(requests), batch):
        lens = sorted(r.output_len for r in requests[first:first + batch])
        if not shed_finished:
            static += lens[-1] * (a + b * len(lens))
            continue
        previous = 0
        for i, n in enumerate(lens):  # while lens[i] is the shortest unfinished, len - i rows run
            static += (n - previous) * (a + b * (len(lens) - i))
            previous = n
    total = useful_tokens(requests)
    continuous = total / batch * (a + b * batch)
    return static / continuous


def simulated_waste(loaded: LoadedModel, num_requests: int, batch: int, seed: int) -> tuple[float, float]:
    """KV waste (time average, peak) at ShareGPT's own lengths, the model replaced by a stub
    that returns one-column logits (every sampled token is id 0): the scheduler and block
    manager do exactly what they would do, in seconds instead of hours."""
    engine = new_engine(loaded, batch)
    requests = make_workload(num_requests, loaded.config.vocab_size, seed=seed)

    def stub(out):
        return torch.zeros(sum(1 for row in out.scheduled if row.sample), 1)

    engine.executor.execute = stub
    result = replay(engine, requests, engine_params, on_step=lambda e: e.block_manager.stats(),
                    desc="KV waste, ShareGPT lengths (model stubbed)")
    waste = [s.waste for s in result.samples if s.slots_allocated]
    return statistics.fmean(waste), max(waste)


# -- report -------------------------------------------------------------------------------------

def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def matmul_flops_per_token(config: ModelConfig) -> int:
    """Multiply-adds x 2 of the linear layers and the LM head for one token."""
    h, d = config.hidden_size, config.head_dim
    per_layer = h * (config.num_heads + 2 * config.num_kv_heads) * d + config.num_heads * d * h \
        + 3 * h * config.intermediate_size
    return 2 * (config.num_layers * per_layer + config.vocab_size * h)


def per_sequence_cost_for(ratio: float, requests: list[WorkloadRequest], batch: int, a: float) -> float:
    """The per-sequence step cost b at which a + b * rows predicts continuous / static = ratio
    (0 when even b = 0 falls short); bisection, the prediction falls as b grows."""
    if static_model_ratio(requests, batch, a, 0.0) < ratio:
        return 0.0
    low, high = 0.0, a
    for _ in range(50):
        mid = (low + high) / 2
        low, high = (mid, high) if static_model_ratio(requests, batch, a, mid) >= ratio else (low, mid)
    return low


def throughput_body(ways: list[WayResult], requests: list[WorkloadRequest], preset: Preset, seed: int,
                    clock: str, fit: tuple[float, float] | None, config: ModelConfig) -> str:
    cont, static, shed, hf = ways
    rate = {w.name: w.throughput(clock) for w in ways}
    vs = {w.name: rate[cont.name] / rate[w.name] for w in ways}
    unit = "tokens per CPU second" if clock == "cpu" else "tokens/s"
    rows = []
    for w in ways:
        share = w.executor_share(clock)
        decode_rows = w.mean_decode_rows
        rows.append([w.name, w.tokens, f"{w.wall_s:.1f}", f"{w.cpu_s:.1f}", f"**{rate[w.name]:.1f}**",
                     f"{vs[w.name]:.2f}x", w.steps or "",
                     "" if decode_rows is None else f"{decode_rows:.1f}",
                     "" if w.padding is None else f"{w.padding:.2f}x", "" if share is None else pct(share),
                     "" if w.log is None else w.preemptions,
                     "?" if w.other_load is None else f"{w.other_load:.2f}"])
    table = markdown_table(["way", "useful tokens", "wall s", "CPU s", unit, "continuous / this",
                            "engine steps", "sequences per decode step (mean)",
                            "decode K/V read / held", "executor share",
                            "preemptions", "other processes (cores)"], rows)

    def met(ratio: float, target: float) -> str:
        return "yes" if ratio >= target else "no"

    targets = markdown_table(["ratio", "measured", "target", "met"], [
        ["continuous / static", f"{vs[static.name]:.2f}x", f">= {TARGET_VS_STATIC:.0f}x",
         met(vs[static.name], TARGET_VS_STATIC)],
        ["continuous / transformers", f"{vs[hf.name]:.2f}x", f">= {TARGET_VS_TRANSFORMERS:.0f}x",
         met(vs[hf.name], TARGET_VS_TRANSFORMERS)],
        ["continuous / static, finished rows leave (for reference)", f"{vs[shed.name]:.2f}x", "", ""]])
    clock_text = ("wall time" if clock == "wall" else
                  "this process's CPU time (`--clock cpu`: steady while other work shares the machine)")
    text = [f"Workload: {describe(requests)} (log-normal, sigma 0.9, seed {seed}: ShareGPT's shape at "
            f"prompt mean {preset.prompt_mean:g} / output mean {preset.output_mean:g}, capped at "
            f"{preset.max_prompt} / {preset.max_output}); all arrive at t = 0; every request generates "
            f"exactly its drawn length (ignore_eos), sampling at temperature 1. Model: SmolLM2-135M-Instruct, "
            f"float32, {torch.get_num_threads()} torch thread(s). Batch bound B = {preset.batch} in every "
            f"way. Continuous: max_num_seqs = B. Static: the same engine, B requests per batch in arrival "
            f"order, each batch run to completion before the next starts; a batch keeps its shape, every "
            f"request in it decoding until the batch's longest is done, as in `generate` and in "
            f"request-level serving systems; only each request's own tokens count. Static, finished rows "
            f"leave: the same batches, but a request leaves its batch as soon as it has its own length, "
            f"which is half of iteration-level scheduling (shown for reference). Transformers: left-padded "
            f"batches of B, max_new_tokens = the batch's longest output, only each request's own tokens "
            f"counted.",
            "",
            f"Throughput = useful generated tokens / {clock_text}. Executor share: the part of that time "
            f"spent in the executor (cache operations and the model); the rest is scheduling, sampling and "
            f"bookkeeping. Decode K/V read / held: what the CPU attention path gathers (whole blocks, rows "
            f"sorted by length and cut into a few chunks) over what the decode rows hold. Other processes: "
            f"the CPU time other work took meanwhile, in cores of the machine's {os.cpu_count()}.",
            "", table, "", targets]
    busiest = max((w.other_load or 0.0) for w in ways)
    if busiest > QUIET_CORES and clock == "wall":
        text += ["", f"**Disturbed run:** other processes used up to {busiest:.2f} cores during it; "
                 f"the wall-time ratios are not to be trusted (rerun on a quiet machine, or with "
                 f"`--threads 1 --clock cpu`)."]
    if fit is not None and fit[1] > 0:
        a, b = fit
        predicted = {name: static_model_ratio(requests, preset.batch, a, b, shed_finished=shed_rows)
                     for name, shed_rows in ((static.name, False), (shed.name, True))}
        text += ["", f"Step cost (least squares over the decode-only steps of the three engine runs): "
                 f"executor = {1e3 * a:.1f} ms + {1e3 * b:.2f} ms per sequence in the batch. With that "
                 f"cost, this workload's output lengths predict continuous / static = "
                 f"{predicted[static.name]:.2f}x, and {predicted[shed.name]:.2f}x when finished rows leave, "
                 f"for the decode steps alone."]
        if vs[shed.name] < TARGET_VS_STATIC:
            text += ["", why_shedding_comes_close(a, b, predicted[shed.name], requests, preset.batch, config)]
    return "\n".join(text)


def why_shedding_comes_close(a: float, b: float, predicted: float, requests: list[WorkloadRequest],
                             batch: int, config: ModelConfig) -> str:
    ceiling = static_model_ratio(requests, batch, a, 0.0)
    text = (f"Why static batches that shed finished rows come this close on a CPU: a decode step here "
            f"grows with the batch, {1e3 * a:.1f} ms plus {1e3 * b:.2f} ms for every sequence in it, so "
            f"the tail of such a batch, where few sequences are left, runs cheap steps: an idle slot "
            f"costs little. On a GPU a step costs about the same at any batch size and an idle slot is "
            f"lost throughput; with b = 0 these output lengths would allow {ceiling:.2f}x over them too. "
            f"From the measured cost they allow {predicted:.2f}x.")
    needed = per_sequence_cost_for(TARGET_VS_STATIC, requests, batch, a)
    if needed > 0:
        flops = matmul_flops_per_token(config)
        text += (f" {TARGET_VS_STATIC:.0f}x over them would need at most {1e3 * needed:.2f} ms per "
                 f"sequence: the matrix products alone ({flops / 1e9:.2f} GFLOP per token) at "
                 f"{flops / needed / 1e9:.0f} GFLOP/s on {torch.get_num_threads()} thread(s), before any "
                 f"attention, against the {flops / b / 1e9:.0f} GFLOP/s that the whole measured "
                 f"per-sequence cost amounts to.")
    return text


def memory_body(waste: list[tuple[float, int, int]], batch: int, sim: tuple[float, float] | None,
                sim_requests: int, rows, sharing_requests: list[WorkloadRequest]) -> str:
    avg = statistics.fmean(w for w, _, _ in waste)
    peak_at = max(range(len(waste)), key=lambda i: waste[i][0])
    full = [w for w, _, running in waste if running >= batch]
    table_rows = [["throughput workload, continuous run", f"{100 * avg:.2f}%",
                   f"{100 * waste[peak_at][0]:.2f}% ({waste[peak_at][2]} sequences running)",
                   f"{100 * statistics.fmean(full):.2f}%" if full else "n/a",
                   "yes" if avg < TARGET_WASTE else "no"]]
    if sim is not None:
        table_rows.append([f"{sim_requests} requests at ShareGPT's lengths (means {SHAREGPT_PROMPT_MEAN} / "
                           f"{SHAREGPT_OUTPUT_MEAN}, model stubbed)", f"{100 * sim[0]:.2f}%",
                           f"{100 * sim[1]:.2f}%", "", "yes" if sim[0] < TARGET_WASTE else "no"])
    waste_table = markdown_table(["KV cache (block size 16)", "waste, time average over steps", "peak",
                                  f"average while {batch} sequences run", f"< {100 * TARGET_WASTE:.0f}%"],
                                 table_rows)
    text = ["KV waste is the share of the slots in allocated device blocks that hold no token "
            "(`BlockStats.waste`), sampled after every engine step. It is about half a block per sequence "
            "divided by the sequence's length, so shorter sequences waste more; the second row runs the "
            "same scheduler and block manager at ShareGPT's own lengths with the model replaced by a stub "
            "that returns a fixed token.", "", waste_table, "",
            f"Sharing: {describe(sharing_requests)} (same shape as the throughput workload, fewer and "
            f"shorter to keep it to minutes), each run with n = width parallel samples (temperature 0.8, "
            f"fixed seeds) and with beam search of that width (ignore_eos; beams end at the length limit). "
            f"Memory saved = 1 - (device blocks in use, summed over steps) / (blocks the same sequences "
            f"would hold with a private copy each, summed over steps); the cache is large enough that "
            f"nothing is preempted.", "", sharing_table(rows)]
    return "\n".join(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few dozen short requests (about 2 minutes)")
    add_output_arguments(parser)
    parser.add_argument("--num-requests", type=int, help="requests in the throughput workload")
    parser.add_argument("--seed", type=int, default=0, help="workload and sampling seed")
    parser.add_argument("--batch", type=int, help="B: the batch bound of all three ways")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--clock", choices=list(TIMERS), default="wall",
                        help="time throughput by wall time (default) or by this process's CPU time, which "
                             "stays steady when other work shares the machine (use it with --threads 1)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda runs the GPU benchmark (tools/throughput_gpu.py)")
    parser.add_argument("--random-model", choices=sorted(SHAPES), default="llama-1b",
                        help="GPU benchmark: a random model of this shape, built in memory")
    parser.add_argument("--model", help="GPU benchmark: a Hugging Face folder instead of a random model")
    parser.add_argument("--enforce-eager", action="store_true", help="GPU benchmark: no CUDA graphs")
    parser.add_argument("--no-transformers", action="store_true", help="GPU benchmark: pagedkv figures only")
    parser.add_argument("--static-requests", type=int, default=128,
                        help="GPU benchmark: requests for transformers' static generate (default 128; 0: all)")
    parser.add_argument("--decode-batches", default="1,32,256", help="GPU benchmark: batch sizes of the decode-step "
                        "times (default 1,32,256)")
    args = parser.parse_args()
    if args.device == "cuda":
        args.out = output_folder(args, "bench_throughput")  # throughput.md and throughput.json go there
        main_gpu(args)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = QUICK if args.quick else FULL
    if args.num_requests:
        preset = dataclasses.replace(preset, num_requests=args.num_requests)
    if args.batch:
        preset = dataclasses.replace(preset, batch=args.batch)
    torch.manual_seed(args.seed)

    started = time.monotonic()
    loaded = load_model(None)
    vocab = loaded.config.vocab_size
    requests = make_workload(preset.num_requests, vocab, seed=args.seed, prompt_mean=preset.prompt_mean,
                             output_mean=preset.output_mean, max_prompt=preset.max_prompt,
                             max_output=preset.max_output)
    print(describe(requests), flush=True)
    warm_up(loaded, requests)
    cont, waste = run_continuous(loaded, requests, preset.batch, args.clock)
    print(f"continuous: {cont.throughput(args.clock):.1f} tokens/s ({args.clock})", flush=True)
    static = run_static(loaded, requests, preset.batch, args.clock)
    print(f"static: {static.throughput(args.clock):.1f} tokens/s ({args.clock})", flush=True)
    shed = run_static(loaded, requests, preset.batch, args.clock, shed_finished=True)
    print(f"static, finished rows leave: {shed.throughput(args.clock):.1f} tokens/s ({args.clock})", flush=True)
    model = load_transformers(str(default_model_path()))
    pad_id = loaded.config.eos_token_ids[0]
    hf = run_transformers(model, requests, preset.batch, args.seed, pad_id)
    del model
    print(f"transformers: {hf.throughput(args.clock):.1f} tokens/s ({args.clock})", flush=True)
    fit = fit_step_cost([cont.log, static.log, shed.log])
    body = throughput_body([cont, static, shed, hf], requests, preset, args.seed, args.clock, fit, loaded.config)
    print("\n" + body + "\n", flush=True)

    sim_requests = 40 if args.quick else 200
    sim = simulated_waste(loaded, sim_requests, preset.batch, args.seed)
    sharing_requests = make_workload(preset.sharing_requests, vocab, seed=args.seed + 1,
                                     prompt_mean=preset.sharing_prompt_mean,
                                     output_mean=preset.sharing_output_mean, max_prompt=preset.max_prompt,
                                     max_output=preset.sharing_max_output)
    rows = measure_sharing(loaded, sharing_requests)
    memory = memory_body(waste, preset.batch, sim, sim_requests, rows, sharing_requests)
    print(memory, flush=True)
    print(f"\ntotal {time.monotonic() - started:.0f} s", flush=True)
    out = output_folder(args, "bench_throughput")
    publish(TITLE_THROUGHPUT, body, out, args.update_docs)
    publish(TITLE_MEMORY, memory, out, args.update_docs)


if __name__ == "__main__":
    main()
