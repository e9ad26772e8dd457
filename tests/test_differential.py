"""The exactness promise, tested differentially: random workloads (heads shared at and off block
boundaries; greedy, beam search, seeded n-sampling, top-p; aborts; chunked prefill) on random
pool and block sizes, in every preemption mode, with prefix caching on and async scheduling
on and off: every request that finishes returns exactly what it returns alone, every block is
free afterwards, and the KV content checker (on in the whole suite) saw every step.

These would have caught the swap bug of prefix caching: two groups that shared a cached block
and were swapped out in one step kept one CPU copy between them in a plan keyed by block, and
the other came back with garbage."""
import random

import pytest
from differential import LoneRuns, assert_all_blocks_free, random_workload, run_concurrently, same_prompt_logprobs

from pagedkv.runtime.engine.config import EngineConfig
from pagedkv.runtime.engine.llm_engine import LLMEngine
from pagedkv.runtime.models.loader import load_model

pytestmark = [pytest.mark.timeout(600), pytest.mark.usefixtures("one_torch_thread")]
SEEDS = range(6)


@pytest.fixture(scope="module")
def loaded(tiny_model):
    return load_model(tiny_model(num_layers=2, num_heads=4, num_kv_heads=2))


@pytest.fixture(scope="module")
def lone(loaded):
    return LoneRuns(loaded)


def random_config(seed: int, mode: str, async_scheduling: bool, requests, tight: bool = False) -> EngineConfig:
    """A pool barely larger than the largest request needs, so that preemption is frequent
    (`tight`: no larger at all)."""
    rng = random.Random(seed)
    block_size = rng.choice([1, 2, 3, 4, 8, 16])
    need = max((-(-(len(r.prompt) + r.params.max_tokens) // block_size) + 1)
               * max(r.params.n, r.params.beam_width) for r in requests)
    return EngineConfig(block_size=block_size, num_device_blocks=need + (0 if tight else rng.randint(0, need)),
                        swap_space_gib=rng.choice([0.01, 0.01, 0.00003]),  # sometimes a CPU pool that fills
                        max_num_batched_tokens=rng.choice([8, 16, 64, 4096]), preemption_mode=mode,
                        enable_prefix_caching=True, async_scheduling=async_scheduling, check_kv=True)


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("mode", ["swap", "recompute", "auto"])
@pytest.mark.parametrize("seed", SEEDS)
def test_every_request_equals_its_lone_run(loaded, lone, seed, mode, async_scheduling):
    requests = random_workload(seed, loaded.config.vocab_size)
    config = random_config(seed, mode, async_scheduling, requests)
    engine = LLMEngine(config, loaded)
    results = run_concurrently(engine, requests, concurrency=random.Random(seed).randint(6, 24), seed=seed)
    finished = [i for i, r in enumerate(requests) if r.abort_after is None]
    assert set(finished) <= set(results)
    differ = [i for i in results if results[i] != lone(requests[i])]
    stats = engine.stats()
    assert differ == [], f"{len(differ)} of {len(results)} differ; preemptions {stats['preemptions']}"
    assert engine.executor.checker.steps_checked > 0
    assert_all_blocks_free(engine)


def test_the_workloads_preempt_in_each_mode_and_share_swapped_prefixes(loaded):
    """What the test above relies on: its workloads preempt, hit the prefix cache, and swap out
    groups whose blocks other groups hold too (which then move once)."""
    totals = {"swap": 0, "recompute": 0, "hit_tokens": 0, "swap_copies_saved": 0}
    for seed in SEEDS:
        for mode in ("swap", "recompute"):
            requests = random_workload(seed, loaded.config.vocab_size)
            engine = LLMEngine(random_config(seed, mode, False, requests), loaded)
            run_concurrently(engine, requests, concurrency=16, seed=seed)
            stats = engine.stats()
            totals[mode] += stats["preemptions"][mode]
            totals["hit_tokens"] += stats["prefix_cache"]["hit_tokens"]
            totals["swap_copies_saved"] += stats["swap_copies_saved"]
    assert min(totals.values()) > 0 and totals["swap"] >= 20, totals


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("mode", ["swap", "recompute"])
@pytest.mark.parametrize("seed", [0, 3, 6])  # workloads that preempt in both modes
def test_constrained_requests_equal_their_lone_runs(loaded, lone, seed, mode, async_scheduling):
    """Grammars (their matchers live through swaps and recomputes, and forks copy them),
    penalties over the prompt and the output, logit_bias and min_tokens: preemption stays
    invisible."""
    requests = random_workload(100 + seed, loaded.config.vocab_size, constrained=True)
    config = random_config(seed, mode, async_scheduling, requests, tight=True)
    engine = LLMEngine(config, loaded)
    results = run_concurrently(engine, requests, concurrency=24, seed=seed)
    differ = [i for i in results if results[i] != lone(requests[i])]
    stats = engine.stats()
    assert differ == [], f"{len(differ)} of {len(results)} differ; preemptions {stats['preemptions']}"
    assert stats["preemptions"][mode] > 0
    assert any(r.params.structured_outputs for r in requests)
    assert not engine.matchers  # every finished or aborted sequence's matcher is gone
    assert_all_blocks_free(engine)


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("mode", ["swap", "recompute"])
@pytest.mark.parametrize("seed", [3, 5, 6])  # workloads that preempt in both modes (5: mid-prefill too)
def test_prompt_logprobs_equal_their_lone_runs(loaded, lone, seed, mode, async_scheduling):
    """Half of the requests ask for prompt logprobs: those are computed once per position
    through chunks, preemption mid-prefill and prefix-cache hits (which such requests skip),
    and equal the lone run's; every request's tokens stay its lone run's."""
    requests = random_workload(200 + seed, loaded.config.vocab_size, prompt_logprobs=True)
    config = random_config(seed, mode, async_scheduling, requests, tight=True)
    engine = LLMEngine(config, loaded)
    got: dict[int, list | None] = {}
    results = run_concurrently(engine, requests, concurrency=24, seed=seed, prompt_logprobs=got)
    differ = [i for i in results if results[i] != lone(requests[i])]
    assert differ == [], f"{len(differ)} of {len(results)} differ"
    asked = [i for i in results if requests[i].params.prompt_logprobs is not None]
    assert asked and all(got[i] is not None and len(got[i]) == len(requests[i].prompt) for i in asked)
    assert all(got[i] is None for i in results if i not in asked)
    wrong = [i for i in asked if not same_prompt_logprobs(got[i], lone.prompt_logprobs[requests[i].key], 1e-5)]
    assert wrong == [], f"{len(wrong)} of {len(asked)} differ"
    assert engine.stats()["preemptions"][mode] > 0
    assert not engine.prompt_logprobs
    assert_all_blocks_free(engine)


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("mode", ["swap", "recompute"])
@pytest.mark.parametrize("seed", range(12))
def test_samples_that_stop_at_different_steps_equal_their_lone_runs(loaded, lone, seed, mode, async_scheduling):
    """Samples of one request that stop at different steps (stop tokens) while other requests'
    prompts fork samples and beams, and aborts: with async scheduling a step scheduled ahead
    holds rows of samples that the step before's tokens end, and of requests aborted since.
    They get nothing more (an extra token after a stop token was the bug) and fork nothing."""
    requests = random_workload(300 + seed, loaded.config.vocab_size, abort_share=0.2, stopping=True)
    config = random_config(seed, mode, async_scheduling, requests)
    engine = LLMEngine(config, loaded)
    results = run_concurrently(engine, requests, concurrency=random.Random(seed).randint(6, 24), seed=seed)
    differ = [i for i in results if results[i] != lone(requests[i])]
    assert differ == [], f"{len(differ)} of {len(results)} differ"
    stopped = [i for i in results if requests[i].params.n > 1 and len({len(t) for t, _ in results[i]}) > 1]
    assert stopped  # samples of one request that ended at different steps
    assert_all_blocks_free(engine)
