"""Tensor parallelism when things go wrong or run elsewhere: a worker that dies fails the engine
within seconds, whether rank 0 spawned it or a launcher started it (the usual MASTER_ADDR,
MASTER_PORT, RANK, WORLD_SIZE variables); the server runs with two ranks.

Each test builds its own group, one after another (a process belongs to one group at a time)."""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from server_process import ROOT, running_server

from pagedkv.runtime.engine.distributed import WorkerFailure
from pagedkv.runtime.engine.llm import LLM
from pagedkv.runtime.engine.sampling_params import SamplingParams
from pagedkv.runtime.models.loader import load_model
from pagedkv.runtime.serving.client import Client

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("one_torch_thread")]

PROMPTS = [list(range(5, 12)), [3, 4], list(range(20, 41))]
LARGE = dict(block_size=4, num_device_blocks=256, swap_space_gib=0.01)
# Well under the 30 s collective timeout: the death itself is noticed, not a silence.
NOTICED_WITHIN_S = 10


def tokens(results):
    return [[c.token_ids for c in r.outputs] for r in results]


@pytest.fixture(scope="module")
def path(tiny_model):
    return tiny_model(num_layers=2, num_heads=4, num_kv_heads=2)


# -- losing a worker -------------------------------------------------------------------------------
def test_a_killed_spawned_worker_fails_the_engine_within_seconds(path):
    llm = LLM(path, tensor_parallel_size=2, **LARGE)
    try:
        params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
        llm.generate(PROMPTS[:2], params, use_tqdm=False)
        worker = llm.engine.executor.group.workers[0]
        os.kill(worker.pid, signal.SIGKILL)
        worker.join(10)
        started = time.monotonic()
        with pytest.raises(WorkerFailure, match=r"worker rank 1 exited with code -9"):
            llm.generate(PROMPTS[:2], params, use_tqdm=False)
        assert time.monotonic() - started < NOTICED_WITHIN_S
        with pytest.raises(WorkerFailure, match="cannot continue"):
            llm.engine.step()
    finally:
        llm.close()


def test_a_worker_that_fails_to_load_fails_the_engine(path, tmp_path):
    # Rank 0 has its model; the worker is sent to load a folder without weights.
    empty = tmp_path / "no-weights"
    empty.mkdir()
    (empty / "config.json").write_text(open(os.path.join(path, "config.json")).read())
    started = time.monotonic()
    with pytest.raises(WorkerFailure, match=r"worker rank 1 failed: FileNotFoundError: .*no \*\.safetensors"):
        LLM(str(empty), loaded=load_model(path), tensor_parallel_size=2, **LARGE)
    assert time.monotonic() - started < 60
    llm = LLM(path, tensor_parallel_size=2, **LARGE)  # the process can build a group again
    assert tokens(llm.generate(PROMPTS[:1], SamplingParams(max_tokens=3), use_tqdm=False))
    llm.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_launched_ranks_and_a_killed_one_fails_the_collective_within_seconds(path, monkeypatch, tmp_path):
    """Rank 1 is started as a launcher would (the usual variables), as a `pagedkv generate`
    with the same arguments; its death shows up as a failed collective on rank 0."""
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2"}
    args = ["--model", path, "--tensor-parallel-size", "2", "--block-size", "4", "--num-device-blocks", "256",
            "--swap-space-gib", "0.01"]
    log = open(tmp_path / "rank1.log", "w")
    rank1 = subprocess.Popen([sys.executable, "-m", "pagedkv", "generate", *args, "--prompt-ids", "1,2"],
                             cwd=ROOT, env={**os.environ, **env, "RANK": "1", "OMP_NUM_THREADS": "1"},
                             stdout=log, stderr=subprocess.STDOUT)
    for key, value in {**env, "RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    try:
        llm = LLM(path, tensor_parallel_size=2, **LARGE)
        try:
            # A long prompt: a step larger than one broadcast's buffer goes out in two.
            prompt = [(7 * i) % 500 + 3 for i in range(600)]
            params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
            expected = LLM(loaded=load_model(path), **LARGE).generate([prompt, PROMPTS[0]], params, use_tqdm=False)
            assert tokens(llm.generate([prompt, PROMPTS[0]], params, use_tqdm=False)) == tokens(expected)
            assert llm.engine.executor.broadcast_bytes > 8192
            rank1.kill()
            rank1.wait(10)
            started = time.monotonic()
            with pytest.raises(WorkerFailure, match="collective failed"):
                llm.generate(PROMPTS[:2], params, use_tqdm=False)
            assert time.monotonic() - started < NOTICED_WITHIN_S
        finally:
            llm.close()
    finally:
        if rank1.poll() is None:
            rank1.kill()
        rank1.wait(10)
        log.close()


def test_rank1_of_a_launcher_exits_0_when_rank0_closes(path, monkeypatch):
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2"}
    rank1 = subprocess.Popen([sys.executable, "-m", "pagedkv", "generate", "--model", path,
                              "--tensor-parallel-size", "2", "--prompt-ids", "1,2"],
                             cwd=ROOT, env={**os.environ, **env, "RANK": "1", "OMP_NUM_THREADS": "1"},
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for key, value in {**env, "RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    try:
        llm = LLM(path, tensor_parallel_size=2)
        llm.generate([[1, 2]], SamplingParams(max_tokens=3), use_tqdm=False)
        llm.close()
        output, _ = rank1.communicate(timeout=30)
        assert rank1.returncode == 0, output
        assert "prompt 0" not in output  # it served as a worker; only rank 0 prints outputs
    finally:
        if rank1.poll() is None:
            rank1.kill()
            rank1.wait(10)


# -- the server ----------------------------------------------------------------------------------
def test_server_with_two_ranks_answers(path, tmp_path):
    prompt = [5, 17, 42, 99, 7, 300, 12]
    expected = LLM(loaded=load_model(path), **LARGE).generate(
        [prompt], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), use_tqdm=False)
    with running_server(path, "--tensor-parallel-size", "2", "--num-device-blocks", "64", "--block-size", "4",
                        log_path=str(tmp_path / "server.log")) as server:
        with Client(server.address, timeout=60) as client:
            final = client.generate(prompt_ids=prompt, max_tokens=8, temperature=0.0, ignore_eos=True)
            assert [o["token_ids"] for o in final["outputs"]] == tokens(expected)[0]
            assert client.stats()["blocks"]["device"]["used"] == 0
        assert server.terminate() == 0, server.log()
