"""LLMEngine: requests in, one scheduler iteration and one model call per step, outputs out."""
from __future__ import annotations

import itertools
import logging
import os
import time
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import numpy as np
import torch

from pagedkv.kvcache.sequence import Sequence, SequenceGroup, SequenceStatus
from pagedkv.preemption.scheduler import SchedulerOutput
from pagedkv.runtime.engine.beam_search import BeamSearch
from pagedkv.runtime.engine.config import EngineConfig, build_engine_parts
from pagedkv.runtime.engine.outputs import FAILED, REJECTED, CompletionOutput, RequestOutput
from pagedkv.runtime.engine.overlap import Drawn, Prepared, prepare
from pagedkv.runtime.engine.prompt_logprobs import PromptLogprobs, compute as compute_prompt_logprobs
from pagedkv.runtime.engine.quote import quote
from pagedkv.runtime.engine.sampler import Controls, SampledToken, sample_batch
from pagedkv.runtime.engine.sampling_params import SamplingParams
from pagedkv.runtime.engine.stopping import StopChecker
from pagedkv.runtime.engine.structured import Grammars, Matcher
from pagedkv.runtime.engine.worker import start_tensor_parallel
from pagedkv.runtime.models.loader import LoadedModel

log = logging.getLogger("pagedkv.engine")


class RequestTooLong(ValueError):
    """A prompt longer than the model's context, or a request that can never fit in the KV cache."""


_BESIDE = os.environ.get("PAGEDKV_MASKS_BESIDE", "1") != "0"
# A step with nothing to run but requests whose blocks are being read from a store tier waits
# this long at most for a read to land, rather than returning at once to be called again.
READ_WAIT_S = 0.01


def _same_rows(a: list, b: list) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


def _cores_all_compute(device: torch.device | str) -> bool:
    return torch.device(device).type == "cpu" and torch.get_num_threads() >= len(os.sched_getaffinity(0))


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, loaded: LoadedModel | None = None) -> None:
        self.config = config or EngineConfig()
        group = start_tensor_parallel(self.config, loaded)  # None for one rank
        try:
            parts = build_engine_parts(self.config, loaded, group)
        except BaseException:
            if group is not None:
                group.close(stop_workers=False)  # they may be waiting in a collective
            raise
        self.model_config = parts.loaded.config
        self.model_source = parts.loaded.source
        self.tokenizer = parts.loaded.tokenizer
        self.sampling_defaults = parts.loaded.sampling_defaults  # what the model ships, for clients
        self.block_manager, self.cache = parts.block_manager, parts.cache
        self.scheduler, self.executor, self.cost = parts.scheduler, parts.executor, parts.cost
        self.profile = self.executor.profile
        self.groups: dict[str, SequenceGroup] = {}
        self.beams: dict[str, BeamSearch] = {}
        self.beam_results: dict[str, list] = {}  # request id -> best hypotheses, once done
        self.failed: set[str] = set()  # requests that failed in a step (not rejected at admission)
        self.streaming: set[str] = set()  # requests that get an output every step, not only the last
        self.prompt_logprobs: dict[str, PromptLogprobs] = {}  # of the requests that asked for them
        self.stopping = StopChecker(self.tokenizer, self.model_config)
        self.started = time.monotonic()
        self.closed = False
        self.generated_tokens = 0
        self.steps = 0
        # Async scheduling: the host's work beside the model's runs on this thread. Only host
        # work goes there (no torch operations that start threads), so that the compute
        # threads keep the machine's cores.
        self.host = (ThreadPoolExecutor(1, thread_name_prefix="pagedkv-host")
                     if self.config.async_scheduling else None)
        if self.host is not None and _cores_all_compute(self.executor.device):
            log.warning("async scheduling: the model's threads use every core this process may run on, so the "
                        "host thread takes one from them; on a CPU it rarely pays (python -m tools.bench_async)")
        self.prepared: Prepared | None = None  # the next step, scheduled while this one computed
        self.kv_events = None  # the KV events' publisher (kv_events.py), with --kv-events-endpoint
        if self.config.kv_events_endpoint:
            from pagedkv.runtime.engine.kv_events import KVEvents

            self.kv_events = KVEvents(self.config.kv_events_endpoint, self.block_manager, self.executor.stores)
        self.drawn: Drawn | None = None        # the last step's tokens, not yet given to their sequences
        # Structured outputs: each constrained sequence's matcher (by seq_id), and the masks of
        # a step's sampling rows, computed while the step's model work runs.
        self.grammars: Grammars | None = None
        self.matchers: dict[int, Matcher] = {}
        self.masks: tuple[SchedulerOutput, Future | np.ndarray] | None = None
        self.mask_thread: ThreadPoolExecutor | None = None
        self.step_masks: np.ndarray | None = None  # the masks of the rows being drawn now

    # -- requests ---------------------------------------------------------------------------------
    def encode(self, prompt: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: send prompt token ids")
        return self.tokenizer.encode(prompt)

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    arrival_time: float | None = None, stream: bool = True) -> None:
        """`stream`: `step` returns this request's output whenever it changes; otherwise only
        once, when it finishes."""
        params = params or SamplingParams()
        if request_id in self.groups:
            raise ValueError(f"request id {request_id!r} is already in use")
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if params.truncate_prompt_tokens is not None and len(ids) > params.truncate_prompt_tokens:
            ids = ids[-params.truncate_prompt_tokens:]  # the last k tokens, as vLLM
        self._check_prompt(ids, params)
        matcher = self._matcher(params)
        group = SequenceGroup(request_id, [Sequence.from_prompt(ids)], sampling_params=params)
        if matcher is not None:
            self.matchers[group.seqs[0].seq_id] = matcher
        if arrival_time is not None:
            group.arrival_time = arrival_time
        if params.use_beam_search:
            eos = [] if params.ignore_eos else self.model_config.eos_token_ids
            self.beams[request_id] = BeamSearch(params, len(ids), eos + params.stop_token_ids)
        if params.prompt_logprobs is not None:
            self.prompt_logprobs[request_id] = PromptLogprobs(ids, min(params.prompt_logprobs,
                                                                       self.model_config.vocab_size))
            group.prompt_logits_from = 0 if len(ids) > 1 else None
        self.groups[request_id] = group
        if stream:
            self.streaming.add(request_id)
        self.scheduler.add(group)

    def _matcher(self, params: SamplingParams) -> Matcher | None:
        """The grammar's matcher of a structured request (GrammarError, a ValueError, if its spec
        does not compile), None for the others."""
        if params.structured_outputs is None:
            return None
        if self.tokenizer is None:
            raise ValueError("structured_outputs need the model's tokenizer, and this model has none")
        if self.grammars is None:
            self.grammars = Grammars.for_tokenizer(self.tokenizer, self.model_config.vocab_size,
                                                   self.model_config.eos_token_ids)
        return self.grammars.matcher(params.structured_outputs)

    def _check_prompt(self, ids: list[int], params: SamplingParams) -> None:
        if not ids:
            raise ValueError("the prompt is empty")
        limit = self.model_config.max_position_embeddings
        if len(ids) >= limit:
            raise RequestTooLong(f"the prompt has {len(ids)} tokens; the model's context is {limit}")
        vocab = self.model_config.vocab_size
        bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids must be integers in [0, {vocab}); got {bad[:5]}")
        bad = sorted(t for t in params.logit_bias or {} if t >= vocab)
        if bad:
            raise ValueError(f"logit_bias token ids must be in [0, {vocab}); got {bad[:5]}")
        bm = self.block_manager
        width = max(params.n, params.beam_width)
        # Room for the prompt once plus a block per sequence to grow into.
        need = -(-len(ids) // bm.block_size) + width
        if need > bm.num_device_blocks - bm.watermark_blocks:
            raise RequestTooLong(f"the request can never fit in the KV cache: {len(ids)} prompt tokens and "
                             f"{width} sequences need {need} blocks of {bm.block_size} tokens, "
                             f"the cache has {bm.num_device_blocks - bm.watermark_blocks}")

    def abort(self, request_id: str) -> RequestOutput | None:
        group = self.groups.pop(request_id, None)
        if group is None:
            return None
        self.scheduler.abort(request_id)
        for seq in group.seqs:
            seq.drop_pending_token()  # a step in flight draws it; the request is gone first
            self.matchers.pop(seq.seq_id, None)
        self.beams.pop(request_id, None)
        self.beam_results.pop(request_id, None)
        self.streaming.discard(request_id)
        output = self._output(group, {})
        self.prompt_logprobs.pop(request_id, None)
        return output

    def has_unfinished(self) -> bool:
        # A step scheduled ahead for requests that have all finished since is left for the next
        # call: it runs before any step that could read the blocks it writes.
        return self.scheduler.has_unfinished() or self.drawn is not None

    def close(self) -> None:
        """Keeps what the prefix cache holds in the store tiers (the disk), if any, and stops the
        tensor-parallel workers, if any; the engine cannot step afterwards."""
        if self.host is not None:
            self.host.shutdown()
        stores = self.executor.stores.values()
        if stores and not self.closed:
            self.executor.store(self.block_manager.flush_to_stores().stores)
            for tier in stores:
                tier.close()
        if self.kv_events is not None and not self.closed:
            self.kv_events.close()
        self.closed = True
        self.executor.close()

    # -- one iteration --------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Runs one step. With async scheduling, the outputs are those of the step before (the
        last call's tokens reach their sequences while this step computes). The step's KV events
        go out as one batch."""
        outputs = self._step_overlapped() if self.host is not None else self._step_once()
        if self.kv_events is not None:
            self.kv_events.publish()
        return outputs

    def _step_once(self) -> list[RequestOutput]:
        self.profile.begin()
        out = self.scheduler.schedule()
        self.profile.mark("schedule")
        # The grammar masks of this step's rows are computed while its model work runs (the
        # tensor-parallel executor says nothing of when that starts: there they come after).
        if self.matchers and _BESIDE and self.config.tensor_parallel_size == 1:
            logits = self.executor.execute(out, started=lambda: self._masks_beside(out))
        else:
            logits = self.executor.execute(out)
        outputs = self.process(out, logits)
        self.profile.end("prefill" if out.prefills else "decode")
        self._release_if_idle()
        self._wait_for_reads(out, outputs)
        return outputs

    def _release_if_idle(self) -> None:
        """With no step to follow, the blocks the last step's copies pinned go back now, so that
        an idle engine holds nothing (the next step's planning would release them); and the
        blocks it cached go to the tiers that take them as they are cached (the remote one)."""
        if self.prepared is None and not self.has_unfinished():
            stores = self.block_manager.idle()
            if stores:
                self.executor.store(stores)

    def _step_overlapped(self) -> list[RequestOutput]:
        self.profile.begin()
        step = self.prepared or prepare(self.scheduler.schedule(), self.executor.block_size, {})
        last, self.prepared, self.drawn = self.drawn, None, None
        if last is not None:
            step.fill(last.token_ids)
        self.profile.mark("schedule")
        host: list[Future] = []

        def start() -> None:
            host.append(self.host.submit(self._host_work, last, step.out))

        try:
            logits = self.executor.execute(step.out, inputs=step.inputs, started=start)
        finally:  # the host's work must be over before this thread touches requests again
            if not host:  # the step failed before its model work began
                start()
            outputs, self.prepared, seconds = host[0].result()
        self.profile.mark("schedule")
        self.profile.overlapped(seconds)
        if self.prepared is None:  # this step forks sequences: its tokens reach them now
            outputs += self.process(step.out, logits)
        else:
            logits = self._take_prompt_logits(step.out, logits)
            rows = [row for row in step.out.scheduled if row.sample]
            draws = [(row.seq, k) for k, row in enumerate(rows)]
            self.steps += 1
            if rows or step.out.rejected:
                self.drawn = Drawn(step.out, rows, self._draw_rows(rows, draws, logits) if rows else [])
            self.profile.mark("sample")
        self.profile.end("prefill" if step.out.prefills else "decode")
        self._release_if_idle()
        self._wait_for_reads(self.prepared.out if self.prepared is not None else step.out, outputs)
        return outputs

    def _wait_for_reads(self, upcoming: SchedulerOutput, outputs: list[RequestOutput]) -> None:
        """Nothing to return, nothing in flight, and the step to come has nothing to run but
        requests waiting for blocks read from a store tier: sleeps until a read lands (at most
        READ_WAIT_S), so that the caller's loop does not spin."""
        if upcoming.is_empty and upcoming.waiting_for_reads and not outputs and self.drawn is None:
            self.block_manager.wait_for_reads(READ_WAIT_S)

    def _host_work(self, last: Drawn | None, out: SchedulerOutput) -> tuple[list[RequestOutput], Prepared | None,
                                                                          float]:
        """Beside the model's step `out`: the step before's tokens go to their sequences, and the
        step after is scheduled, unless sampling `out` forks sequences (beam search, n samples)."""
        started = time.perf_counter()
        outputs = self._resolve(last) if last is not None else []
        if self.matchers:  # the masks of this step's rows, now that the step before's tokens are in
            self.masks = (out, self._grammar_masks([row for row in out.scheduled if row.sample]))
        prepared = None if self._forks(out) else self._schedule_after(out)
        return outputs, prepared, time.perf_counter() - started

    def _forks(self, out: SchedulerOutput) -> bool:
        """Whether sampling `out` changes which sequences run next: beam search forks and prunes
        them, a fresh group of n samples forks them off its prompt."""
        for row in out.scheduled:
            group = row.group
            if row.sample and (group.request_id in self.beams or (
                    group.sampling_params.n > 1 and len(group.seqs) == 1 and not row.seq.output_ids)):
                return True
        return False

    def _schedule_after(self, out: SchedulerOutput) -> Prepared:
        """Schedules the step after `out` before `out`'s tokens are known: each sequence that
        samples holds a pending token, and one that this token ends by length is not scheduled."""
        sources: dict[int, int] = {}
        for k, row in enumerate(row for row in out.scheduled if row.sample):
            seq, group = row.seq, row.group
            if seq.is_finished or not self._live(group):
                continue
            seq.reserve_token()
            sources[id(seq)] = k
            if self.stopping.length_reached(seq, group.sampling_params):
                # Freed now; the status is settled when the token comes (EOS would say "stop").
                self.scheduler.free_seq(seq, SequenceStatus.FINISHED_LENGTH)
        self.scheduler.free_finished()
        return prepare(self.scheduler.schedule(), self.executor.block_size, sources)

    def _resolve(self, drawn: Drawn) -> list[RequestOutput]:
        """Gives a step's drawn tokens to the sequences still waiting for them."""
        live = [k for k, row in enumerate(drawn.rows) if row.seq.has_pending_token and self._live(row.group)]
        seqs = [drawn.rows[k].seq for k in live]
        preempted = False
        for seq in seqs:
            if seq.status is SequenceStatus.FINISHED_LENGTH:  # freed ahead (_schedule_after): not ended yet
                seq.status = SequenceStatus.RUNNING
            preempted |= seq.status in (SequenceStatus.SWAPPED, SequenceStatus.WAITING)
        new_tokens: dict[str, dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
        self._append_drawn(drawn.rows, list(zip(seqs, live)), [drawn.picked[k] for k in live], new_tokens)
        for seq in seqs:
            seq.drop_pending_token()  # still there: its group failed
        changed = {drawn.rows[k].group.request_id: drawn.rows[k].group for k in live}
        changed.update({g.request_id: g for g in drawn.out.rejected if self._live(g)})
        outputs = self._outputs(changed, new_tokens)
        if preempted:
            self.scheduler.free_finished(preempted_too=True)
        return outputs

    def _live(self, group: SequenceGroup) -> bool:
        """Whether the group is still this engine's request (not finished and forgotten, not aborted)."""
        return self.groups.get(group.request_id) is group

    def process(self, out: SchedulerOutput, logits: torch.Tensor) -> list[RequestOutput]:
        """Samples from one iteration's logits; returns the outputs of the requests it changed
        that stream or finished."""
        self.steps += 1
        new_tokens: dict[str, dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
        logits = self._take_prompt_logits(out, logits)
        self._sample(out, logits, new_tokens)
        self.profile.mark("sample")
        changed = {row.group.request_id: row.group for row in out.scheduled if row.sample and self._live(row.group)}
        changed.update({g.request_id: g for g in out.rejected if self._live(g)})
        outputs = self._outputs(changed, new_tokens)
        self.profile.mark("outputs")
        return outputs

    def _outputs(self, changed: dict[str, SequenceGroup],
                 new_tokens: dict[str, dict[int, list[int]]]) -> list[RequestOutput]:
        """The outputs of the changed requests that stream or finished; the finished ones are
        forgotten."""
        outputs = [self._output(g, new_tokens.get(rid, {})) for rid, g in changed.items()
                   if g.is_finished or rid in self.streaming]
        for group in changed.values():
            if group.is_finished:
                for seq in group.seqs:
                    self.matchers.pop(seq.seq_id, None)
                self.groups.pop(group.request_id, None)
                self.beams.pop(group.request_id, None)
                self.beam_results.pop(group.request_id, None)
                self.failed.discard(group.request_id)
                self.streaming.discard(group.request_id)
                self.prompt_logprobs.pop(group.request_id, None)
        self.scheduler.free_finished()
        return outputs

    def _take_prompt_logits(self, out: SchedulerOutput, logits: torch.Tensor) -> torch.Tensor:
        """Reduces the step's prompt-logprob rows (the last `out.num_prompt_logits` of `logits`)
        into their requests' prompt logprobs, all rows at once; returns the sampling rows. A
        failure here is the step's, as the model's would be."""
        num = out.num_prompt_logits
        if not num:
            return logits
        split = logits.shape[0] - num
        rows = [row for row in out.scheduled if row.prompt_logits is not None]
        # Requests aborted since the step was scheduled (async scheduling) keep nothing.
        live = [self.prompt_logprobs.get(row.group.request_id) if self._live(row.group) else None for row in rows]
        if any(state is not None for state in live):
            width = max(state.k for state in live if state is not None)
            # Position p's logits predict prompt token p + 1.
            targets = np.fromiter(itertools.chain.from_iterable(
                row.seq.token_ids[row.prompt_logits[0] + 1:row.prompt_logits[1] + 1] for row in rows),
                dtype=np.int64, count=num)
            values = compute_prompt_logprobs(logits[split:], targets, width)
            first = 0
            for row, state in zip(rows, live):
                a, b = row.prompt_logits
                if state is not None:
                    state.put(a, values[first:first + b - a], values.shape[1] // 2 - 1)
                first += b - a
        return logits[:split]  # the profile counts this work in the "sample" phase

    def _sample(self, out: SchedulerOutput, logits: torch.Tensor,
                new_tokens: dict[str, dict[int, list[int]]]) -> None:
        sampling = [row for row in out.scheduled if row.sample]
        self._settle_masks()  # no matcher may change (forks copy them) while its mask is computed
        beam_rows: dict[str, list[int]] = defaultdict(list)
        plain_rows: list[int] = []
        for i, row in enumerate(sampling):
            if row.seq.is_finished or not self._live(row.group):
                continue  # async scheduling: ended by the step before's token, or aborted, since scheduled
            (beam_rows[row.group.request_id] if row.group.request_id in self.beams else plain_rows).append(i)
        # Parallel samples: a fresh group forks its n sequences off the prompt's logits.
        draws: list[tuple[Sequence, int]] = []
        for i in plain_rows:
            seq, group = sampling[i].seq, sampling[i].group
            params: SamplingParams = group.sampling_params
            if len(group.seqs) == 1 and params.n > 1 and not seq.output_ids:
                matcher = self.matchers.get(seq.seq_id)
                for _ in range(params.n - 1):
                    child = seq.fork()
                    self.block_manager.fork(seq, child)
                    group.seqs.append(child)
                    if matcher is not None:  # each sample goes on from the prompt's grammar state
                        self.matchers[child.seq_id] = matcher.copy()
                draws += [(s, i) for s in group.seqs]
            else:
                draws.append((seq, i))
        if draws:
            self._sample_plain(sampling, draws, logits, new_tokens)
        if beam_rows:
            self._beam_steps([sampling[rows[0]].group for rows in beam_rows.values()], beam_rows, sampling, logits)

    def _sample_plain(self, sampling: list, draws: list[tuple[Sequence, int]], logits: torch.Tensor,
                      new_tokens: dict[str, dict[int, list[int]]]) -> None:
        self._append_drawn(sampling, draws, self._draw_rows(sampling, draws, logits), new_tokens)

    @staticmethod
    def _by_group(sampling: list, draws: list[tuple[Sequence, int]]) -> list[list[int]]:
        """Positions in `draws`, group by group."""
        by_group: dict[int, list[int]] = defaultdict(list)
        for k, (_, i) in enumerate(draws):
            by_group[id(sampling[i].group)].append(k)
        return list(by_group.values())

    def _draw_rows(self, sampling: list, draws: list[tuple[Sequence, int]],
                   logits: torch.Tensor) -> list[SampledToken | Exception]:
        """All plain draws in one batch; if that fails, group by group, so that the group whose
        data broke it ends alone (seeded draws do not depend on the batch)."""
        self.step_masks = None
        try:
            return self._draw(sampling, draws, logits)
        except Exception:
            pass
        picked: list[SampledToken | Exception] = [ValueError("not drawn")] * len(draws)
        for positions in self._by_group(sampling, draws):
            try:
                tokens: list = self._draw(sampling, [draws[k] for k in positions], logits)
            except Exception as e:
                tokens = [e] * len(positions)
            for k, token in zip(positions, tokens):
                picked[k] = token
        return picked

    def _append_drawn(self, sampling: list, draws: list[tuple[Sequence, int]],
                      picked: list[SampledToken | Exception], new_tokens: dict[str, dict[int, list[int]]]) -> None:
        """Appends each draw's token, group by group; a group whose draw failed ends with its error."""
        def finish(positions: list[int]) -> None:
            for k in positions:
                if isinstance(picked[k], Exception):
                    raise picked[k]
            for k in positions:
                seq, i = draws[k]
                self._append(sampling[i].group, seq, picked[k], new_tokens)

        for positions in self._by_group(sampling, draws):
            self._guarded(sampling[draws[positions[0]][1]].group, lambda: finish(positions))

    def _masks_beside(self, out: SchedulerOutput) -> None:
        """Starts computing the grammar masks of `out`'s sampling rows on another thread, while
        the model computes `out` (the matchers have all their tokens: no step is in flight)."""
        if self.mask_thread is None:
            self.mask_thread = ThreadPoolExecutor(1, thread_name_prefix="pagedkv-masks")
        rows = [row for row in out.scheduled if row.sample]
        self.masks = (out, self.mask_thread.submit(self._grammar_masks, rows))

    def _grammar_masks(self, rows: list) -> np.ndarray | None:
        """int32 [len(rows), words]: each sampling row's grammar mask (all ones without one);
        the n samples of a fresh group share their prompt row's. None if no row has a grammar."""
        matchers = [(self.matchers[row.seq.seq_id], i) for i, row in enumerate(rows)
                    if row.seq.seq_id in self.matchers]
        return self.grammars.fill(matchers, len(rows)) if matchers else None

    def _settle_masks(self) -> None:
        """Waits for the masks computed beside the model's step, if any are under way."""
        if self.masks is not None and isinstance(self.masks[1], Future):
            try:
                self.masks = (self.masks[0], self.masks[1].result())
            except Exception:  # a matcher that fails there fails its group when its token comes
                log.exception("computing grammar masks failed; they are computed again")
                self.masks = None

    def _step_masks(self, sampling: list) -> np.ndarray | None:
        """The masks of this step's sampling rows: computed beside the model's work, or now."""
        self._settle_masks()
        ahead, self.masks = self.masks, None
        if ahead is not None and _same_rows([r for r in ahead[0].scheduled if r.sample], sampling):
            return ahead[1]
        return self._grammar_masks(sampling)

    def _controls(self, sampling: list, draws: list[tuple[Sequence, int]]) -> Controls | None:
        params = [sampling[i].group.sampling_params for _, i in draws]
        if not any(p.processes_logits for p in params):
            return None
        history = None
        if any(p.has_penalties or p.min_tokens for p in params):
            # The row's context ends at its `end` (a pending token may follow it).
            history = [(s.token_ids[:sampling[i].end], s.prompt_len) for s, i in draws]
        mask = None
        if any(p.structured_outputs is not None for p in params):
            if self.step_masks is None:
                self.step_masks = self._step_masks(sampling)
            if self.step_masks is not None:
                mask = self.step_masks[[i for _, i in draws]]
        return Controls(history, mask, self.model_config.eos_token_ids)

    def _draw(self, sampling: list, draws: list[tuple[Sequence, int]], logits: torch.Tensor) -> list[SampledToken]:
        rows = [i for _, i in draws]
        picked = sample_batch(logits if rows == list(range(len(logits))) else logits[rows],
                              [sampling[i].group.sampling_params for _, i in draws],
                              # The position is the row's end: async scheduling may have added a
                              # pending token to the sequence since.
                              [(sampling[i].group.seqs.index(s), sampling[i].end) for s, i in draws],
                              self.executor.staging, self._controls(sampling, draws))
        vocab = logits.shape[-1]
        bad = [t.token_id for t in picked if not 0 <= t.token_id < vocab]
        if bad:  # what bad parameters (or logits) give instead of an exception
            raise ValueError(f"the sampler picked token id {bad[0]}, outside the vocabulary [0, {vocab})")
        return picked

    def _guarded(self, group: SequenceGroup, work: Callable[[], None]) -> None:
        """Runs one group's part of a step; an exception there ends that group alone, with an error."""
        try:
            work()
        except Exception as e:
            log.exception("request %s failed in this step; the others go on", quote(group.request_id))
            self.failed.add(group.request_id)
            self.scheduler.finish(group, SequenceStatus.FINISHED_ERROR,
                                  f"the request failed while sampling: {type(e).__name__}: {quote(str(e))}")

    def _beam_steps(self, groups: list[SequenceGroup], beam_rows: dict[str, list[int]],
                    sampling: list, logits: torch.Tensor) -> None:
        """Every beam group's top-k on the device, from one log-softmax; one copy brings the
        candidates of all groups to the host. Each group's halves run guarded."""
        ordered: list[int] = []
        for group in groups:
            row_of = {id(sampling[i].seq): i for i in beam_rows[group.request_id]}
            ordered += [row_of[id(seq)] for seq in group.unfinished_seqs()]
        logprobs = torch.log_softmax(logits[ordered].float(), dim=-1)
        parts: list[tuple[SequenceGroup, torch.Tensor]] = []
        start = 0
        for group in groups:
            count = len(group.unfinished_seqs())
            rows = logprobs[start:start + count]
            start += count

            def candidates(group: SequenceGroup = group, rows: torch.Tensor = rows) -> None:
                scores, idx, lps = self.beams[group.request_id].candidates(rows)
                parts.append((group, torch.stack([scores.double(), idx.double(), lps.double()])))

            self._guarded(group, candidates)
        if not parts:
            return
        host = torch.cat([part for _, part in parts], dim=1).cpu()
        start = 0
        for group, part in parts:
            scores, idx, lps = host[:, start:start + part.shape[1]]
            start += part.shape[1]
            self._guarded(group, lambda: self._beam_step(group, scores.float(), idx.long().tolist(), lps.tolist(),
                                                         logits.shape[-1]))

    def _append(self, group: SequenceGroup, seq: Sequence, token: SampledToken,
                new_tokens: dict[str, dict[int, list[int]]]) -> None:
        matcher = self.matchers.get(seq.seq_id)
        if matcher is not None:
            matcher.consume(token.token_id)  # a token the grammar refuses fails the group
        seq.append(token.token_id, token.logprob)
        if group.sampling_params.logprobs is not None:
            # The sampled token's own logprob is always there, as in vLLM: up to logprobs + 1 entries.
            seq.output_logprobs.append({**(token.top_logprobs or {}), token.token_id: token.logprob})
        self.generated_tokens += 1
        new_tokens[group.request_id][group.seqs.index(seq)].append(token.token_id)
        status = self.stopping.check(seq, group.sampling_params)
        if status is None and matcher is not None and matcher.done:
            status = SequenceStatus.FINISHED_STOPPED  # the grammar takes nothing more: complete
        if status is not None:
            self.scheduler.free_seq(seq, status)

    def _beam_step(self, group: SequenceGroup, scores: torch.Tensor, idx: list[int], lps: list[float],
                   vocab: int) -> None:
        search = self.beams[group.request_id]
        parents = group.unfinished_seqs()
        choices = search.advance(scores, idx, lps, vocab)
        if search.done:
            self.beam_results[group.request_id] = search.finalize()
            for seq in parents:
                self.scheduler.free_seq(seq, SequenceStatus.FINISHED_STOPPED)
            return
        # New beam i continues parents[choices[i].parent]. The first child of a parent takes
        # the parent's sequence over; the others fork from it before it changes.
        first_child: dict[int, int] = {}
        for i, choice in enumerate(choices):
            first_child.setdefault(choice.parent, i)
        beams: list[Sequence] = []
        for i, choice in enumerate(choices):
            parent = parents[choice.parent]
            if first_child[choice.parent] == i:
                beams.append(parent)
            else:
                child = parent.fork()
                self.block_manager.fork(parent, child)
                beams.append(child)
        for index, parent in enumerate(parents):
            if index not in first_child:
                self.block_manager.free(parent)  # pruned; its prefix lives on in other beams
        for beam, choice in zip(beams, choices):
            beam.token_ids.append(choice.token_id)
            beam.cumulative_logprob = choice.cum_logprob
        group.seqs = beams  # the order of the next step's logits rows
        self.generated_tokens += len(choices)

    # -- outputs and statistics -----------------------------------------------------------------
    def _output(self, group: SequenceGroup, new_tokens: dict[int, list[int]]) -> RequestOutput:
        prompt = group.seqs[0].token_ids[: group.prompt_len] if group.seqs else []
        if group.request_id in self.beams:
            outputs = self._beam_outputs(group)
        else:
            outputs = [self.stopping.completion(i, seq, new_tokens.get(i, []), group.sampling_params)
                       for i, seq in enumerate(group.seqs)]
        queued = None if group.first_scheduled_time is None else group.first_scheduled_time - group.arrival_time
        code = (FAILED if group.request_id in self.failed else REJECTED) if group.error else None
        state = self.prompt_logprobs.get(group.request_id)
        return RequestOutput(group.request_id, prompt, outputs, group.is_finished, group.error,
                             queue_time=queued, error_code=code,
                             prompt_logprobs=state.result() if state is not None and state.done else None)

    def _beam_outputs(self, group: SequenceGroup) -> list[CompletionOutput]:
        hypotheses = self.beam_results.get(group.request_id)
        if not group.is_finished or not hypotheses:  # running, aborted or failed
            return []
        return [CompletionOutput(i, h.token_ids, self.stopping.decode(h.token_ids), h.cum_logprob, h.finish_reason)
                for i, h in enumerate(hypotheses)]

    def _prefix_cache_stats(self, s) -> dict:
        sched = self.scheduler
        queried, hit = sched.prefix_queried_tokens, sched.prefix_hit_tokens
        return {"enabled": self.block_manager.enable_prefix_caching,
                "queried_tokens": queried, "hit_tokens": hit, "hit_rate": hit / queried if queried else 0.0,
                "cached_blocks": s.cached_blocks, "evictable_blocks": s.evictable_blocks,
                "evicted_blocks": s.evicted_blocks, "recompute_cached_tokens": sched.recompute_cached_tokens,
                "prefill_tokens_computed": sched.prefill_tokens_computed}

    def stats(self) -> dict:
        s = self.block_manager.stats()
        sched = self.scheduler
        elapsed = max(time.monotonic() - self.started, 1e-9)
        return {
            "queues": {"waiting": len(sched.waiting), "running": len(sched.running), "swapped": len(sched.swapped)},
            "blocks": {"block_size": s.block_size,
                       "device": {"total": s.device_blocks_total, "used": s.device_blocks_used},
                       "cpu": {"total": s.cpu_blocks_total, "used": s.cpu_blocks_used}},
            "kv_waste": s.waste, "sharing_saved_blocks": s.sharing_saved_blocks, "sharing_saved": s.sharing_saved,
            "copy_on_write_copies": s.copy_on_write_copies,
            "preemptions": {"swap": sched.preemptions["swap"], "recompute": sched.preemptions["recompute"]},
            "blocks_swapped_out": s.blocks_swapped_out, "blocks_swapped_in": s.blocks_swapped_in,
            "swap_copies_saved": s.swap_copies_saved,
            "tokens_recomputed": sched.tokens_recomputed,
            "prefix_cache": self._prefix_cache_stats(s),
            "kv_tiers": self.block_manager.tiers.stats(),
            **({"kv_events": self.kv_events.describe()} if self.kv_events is not None else {}),
            "generated_tokens": self.generated_tokens, "steps": self.steps,
            "throughput_tokens_per_s": self.generated_tokens / elapsed,
            "prefill_tokens_per_s": self.cost.prefill_tokens_per_s,
            "swap_bytes_per_s": self.cost.swap_bytes_per_s,
            **({"step_profile_ms": self.profile.summary()} if self.profile.enabled else {}),
        }
