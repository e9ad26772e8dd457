"""Tensor parallelism over NCCL: two GPUs give the tokens of one, with preemption by swap, and a
worker that dies fails the engine (skipped without two CUDA devices)."""
import os
import signal
import time

import pytest
import torch

from pagedkv import kernels
from pagedkv.runtime.engine.distributed import WorkerFailure
from pagedkv.runtime.engine.llm import LLM
from pagedkv.runtime.engine.sampling_params import SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.timeout(600),
    pytest.mark.skipif(not kernels.cuda_available() or torch.cuda.device_count() < 2,
                       reason="needs two CUDA devices and cupy"),
]
PROMPTS = [list(range(5, 12)), [3, 4], list(range(20, 41)), [7, 8, 9, 10, 11, 12, 13, 14, 15], [42] * 5]
ARGS = dict(device="cuda", dtype="float32", block_size=4, num_device_blocks=24, max_num_batched_tokens=12,
            swap_space_gib=0.01, preemption_mode="swap")


def tokens(results):
    return [[c.token_ids for c in r.outputs] for r in results]


def test_two_gpus_equal_one_and_a_dead_worker_fails_the_engine(tiny_model):
    path = tiny_model(num_layers=2, num_heads=4, num_kv_heads=2)
    greedy = SamplingParams(max_tokens=14, temperature=0, ignore_eos=True)
    beams = SamplingParams(max_tokens=8, beam_width=3, n=3)
    expected = tokens(LLM(path, **ARGS).generate(PROMPTS, [greedy, beams] * 2 + [greedy], use_tqdm=False))
    llm = LLM(path, tensor_parallel_size=2, **ARGS)
    try:
        assert llm.engine.executor.group.compute is not None
        results = llm.generate(PROMPTS, [greedy, beams] * 2 + [greedy], use_tqdm=False)
        assert tokens(results) == expected
        assert llm.engine.stats()["preemptions"]["swap"] >= 1
        bm = llm.engine.block_manager
        assert bm.num_free_device_blocks == bm.num_device_blocks
        worker = llm.engine.executor.group.workers[0]
        os.kill(worker.pid, signal.SIGKILL)
        worker.join(10)
        started = time.monotonic()
        with pytest.raises(WorkerFailure, match="rank 1 exited with code -9"):
            llm.generate(PROMPTS[:1], greedy, use_tqdm=False)
        assert time.monotonic() - started < 10
    finally:
        llm.close()
