"""A real `pagedkv serve` process for tests: started on a free loopback port, stopped after."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class ServerProcess:
    process: subprocess.Popen
    address: str
    log_path: str

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def terminate(self, timeout: float = 30) -> int:
        """SIGTERM, then the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)


def launch(model_path: str, *args: str, log_path: str, bind: str = "tcp://127.0.0.1:*") -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with open(log_path, "w") as log:
        return subprocess.Popen([sys.executable, "-m", "pagedkv", "serve", "--model", model_path,
                                 "--bind", bind, *args], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=log, text=True)


@contextmanager
def running_server(model_path: str, *args: str, log_path: str, bind: str = "tcp://127.0.0.1:*",
                   startup_timeout: float = 120):
    """Yields a ServerProcess once it prints its address; kills it if the test leaves it running."""
    process = launch(model_path, *args, log_path=log_path, bind=bind)
    try:
        address = None
        deadline = time.monotonic() + startup_timeout
        while address is None and time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break  # exited
            match = re.search(r"serving .* on (\S+)", line)
            address = match.group(1) if match else None
        if address is None:
            process.kill()
            raise RuntimeError(f"the server did not start:\n{open(log_path).read()}")
        yield ServerProcess(process, address, log_path)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def read_http_url(process: subprocess.Popen, log_path: str, timeout: float = 120) -> str:
    """The base URL that `pagedkv api` (alone or started by `serve --http-port`) prints."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        match = re.search(r"HTTP API on (\S+)", line)
        if match:
            return match.group(1)
    process.kill()
    raise RuntimeError(f"the HTTP API did not start:\n{open(log_path).read()}")


@contextmanager
def running_http_server(model_path: str, *args: str, log_path: str):
    """`pagedkv serve --http-port 0`: yields (ServerProcess, the HTTP API's base URL)."""
    with running_server(model_path, "--http-port", "0", *args, log_path=log_path) as server:
        yield server, read_http_url(server.process, log_path)


@contextmanager
def running_gateway(address: str, *args: str, log_path: str):
    """`pagedkv api` alone, in front of the engine at `address`: yields (process, base URL)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "pagedkv", "api", "--address", address,
                                    "--port", "0", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                   stderr=log, text=True)
    try:
        yield process, read_http_url(process, log_path)
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
