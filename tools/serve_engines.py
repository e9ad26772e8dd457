"""Several engines behind one gateway on this machine, in one command (`make serve ENGINES=N`):
N `pagedkv serve` processes on free loopback ports, each publishing its KV events, optionally a
Redis server they share as the remote KV tier, and `pagedkv api` routing over them.

    python -m tools.serve_engines --engines 2 [--redis] [--routing prefix|round-robin] [--port 8000]
        [-- ENGINE FLAGS...]

Ctrl-C stops everything it started. tools/bench_router.py starts the same cluster.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read_line(process: subprocess.Popen, pattern: str, timeout: float, what: str, log: str) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        match = re.search(pattern, line)
        if match:
            return match.group(1)
    process.kill()
    raise RuntimeError(f"{what} did not start; its log: {log}")


@dataclass
class Cluster:
    url: str
    engines: list[subprocess.Popen] = field(default_factory=list)
    addresses: list[str] = field(default_factory=list)
    redis_url: str | None = None
    gateway: subprocess.Popen | None = None


@contextmanager
def redis_server(folder: str):
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not os.path.exists(binary):
        raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                                "no", "--dir", folder, "--maxmemory", "4gb", "--maxmemory-policy", "allkeys-lru"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.kill()
        process.wait(10)


@contextmanager
def running_cluster(engines: int, engine_args: list[str], routing: str = "prefix", redis: bool = False,
                    port: int = 0, log_dir: str | None = None, threads: int = 1, gateway_args: list[str] = ()):
    log_dir = log_dir or tempfile.mkdtemp(prefix="pagedkv-cluster-")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    with ExitStack() as stack:
        redis_url = stack.enter_context(redis_server(log_dir)) if redis else None
        procs: list[subprocess.Popen] = []

        def stop_all() -> None:
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()

        stack.callback(stop_all)
        cluster = Cluster(url="", redis_url=redis_url)
        for i in range(engines):
            log = os.path.join(log_dir, f"engine{i}.log")
            args = [sys.executable, "-m", "pagedkv", "serve", "--bind", "tcp://127.0.0.1:*",
                    "--kv-events-endpoint", "tcp://127.0.0.1:*", *engine_args]
            if redis_url:
                args += ["--kv-remote-url", redis_url]
            p = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=open(log, "w"), text=True)
            procs.append(p)
            cluster.engines.append(p)
        for i, p in enumerate(cluster.engines):
            cluster.addresses.append(_read_line(p, r"serving .* on (\S+)", 300, f"engine {i}",
                                                os.path.join(log_dir, f"engine{i}.log")))
        log = os.path.join(log_dir, "gateway.log")
        args = [sys.executable, "-m", "pagedkv", "api", "--port", str(port), "--routing", routing,
                "--log-level", "warning", *gateway_args]
        for address in cluster.addresses:
            args += ["--address", address]
        gateway = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=open(log, "w"), text=True)
        procs.append(gateway)
        cluster.gateway = gateway
        cluster.url = _read_line(gateway, r"HTTP API on (\S+)", 120, "the gateway", log)
        yield cluster


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", type=int, default=2)
    parser.add_argument("--redis", action="store_true", help="a Redis server the engines share as their remote tier")
    parser.add_argument("--routing", default="prefix", choices=["prefix", "round-robin"])
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("engine_args", nargs=argparse.REMAINDER, help="flags for every `pagedkv serve`, after --")
    args = parser.parse_args()
    extra = args.engine_args[1:] if args.engine_args[:1] == ["--"] else args.engine_args
    with running_cluster(args.engines, extra, args.routing, args.redis, args.port) as cluster:
        print(f"{args.engines} engines ({', '.join(cluster.addresses)}){' sharing ' + cluster.redis_url if cluster.redis_url else ''}"
              f" behind {cluster.url} (routing: {args.routing}); /health and /metrics there; Ctrl-C stops", flush=True)
        try:
            while all(p.poll() is None for p in [*cluster.engines, cluster.gateway]):
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
