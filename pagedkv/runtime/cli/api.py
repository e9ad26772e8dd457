"""`pagedkv api`: the OpenAI-compatible HTTP gateway in front of a running engine, and the flags
with which `pagedkv serve --http-port PORT` starts it next to the engine, as a process of its own.

The gateway's imports (Starlette, uvicorn, prometheus-client) load only when it runs, so that
`pagedkv --help` stays light.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import subprocess
import sys

from pagedkv.runtime.cli.args import add_connection_arguments
from pagedkv.runtime.serving.http.router import LOAD_SLACK

API_KEY_ENV = "PAGEDKV_API_KEY"  # read when --api-key is not given (keeps the key out of `ps`)
TRY_PROMPT = "The capital of France is"


def add_api_parser(sub) -> None:
    api = sub.add_parser("api", help="an OpenAI-compatible HTTP API (and /metrics) in front of a running server")
    add_connection_arguments(api, timeout_help="seconds the engine may stay silent on a request before it is asked "
                             "whether it still holds it; no answer within as long again is a 503 (default 120)",
                             several=True)
    add = api.add_argument
    add("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    add("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    _add_common(api, insecure=True)
    add("--max-body-mib", type=float, default=4.0, help="largest request body accepted (MiB, default 4)")
    add("--health-timeout", type=float, default=5.0,
        help="seconds the engine has to answer /health and /metrics (default 5)")
    add("--routing", default="prefix", choices=["prefix", "round-robin"],
        help="with several --address: send each request to the engine that holds most of its prefix (by the "
             "engines' KV events), balanced against load, chats back to their engine; or round-robin")
    add("--load-slack", type=int, default=LOAD_SLACK, help="prefix routing: requests in flight beyond the least "
        f"loaded engine's that an engine holding most of the prompt may have and still get it (default {LOAD_SLACK})")
    add("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    add("--exit-with-parent", action="store_true", help=argparse.SUPPRESS)  # set by `pagedkv serve`
    api.set_defaults(func=cmd_api)


def add_serve_arguments(serve: argparse.ArgumentParser) -> None:
    """`serve --http-port`: the gateway next to the engine (its other settings at their defaults)."""
    group = serve.add_argument_group("HTTP API (OpenAI-compatible; see `pagedkv api --help`)")
    group.add_argument("--http-port", type=int, help="also serve the HTTP API on this port (0: a free one)")
    group.add_argument("--http-host", default="127.0.0.1", help="address of the HTTP API (default 127.0.0.1)")
    _add_common(group, insecure=False)  # serve's own --insecure covers both sockets


def _add_common(parser, insecure: bool) -> None:
    parser.add_argument("--api-key", help=f"require 'Authorization: Bearer KEY' on /v1 (or set ${API_KEY_ENV}); "
                        "needed to listen beyond loopback")
    parser.add_argument("--served-model-name", help="the model's name in the API (default: its file or folder name)")
    if insecure:
        parser.add_argument("--insecure", action="store_true", help="allow a non-loopback address without a key")


def api_key(args: argparse.Namespace) -> str | None:
    return args.api_key or os.environ.get(API_KEY_ENV) or None


def cmd_api(args: argparse.Namespace) -> int:
    from pagedkv.runtime.serving.client import DEFAULT_ADDRESS
    from pagedkv.runtime.serving.http.app import ApiConfig, run

    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.max_body_mib <= 0 or args.health_timeout <= 0 or args.timeout <= 0:
        raise ValueError("--max-body-mib, --health-timeout and --timeout must be > 0")
    addresses = args.address or [DEFAULT_ADDRESS]
    config = ApiConfig(address=addresses[0], addresses=addresses, routing=args.routing, load_slack=args.load_slack,
                       host=args.host, port=args.port, api_key=api_key(args),
                       insecure=args.insecure, served_model_name=args.served_model_name,
                       max_body_bytes=int(args.max_body_mib * 2**20), engine_timeout=args.timeout,
                       health_timeout=args.health_timeout, curve_keys=args.curve_keys,
                       client_name=args.client_name, exit_with_parent=args.exit_with_parent)

    def announce(url: str) -> None:
        print(try_lines(url, _model_name(config), bool(config.api_key)), flush=True)

    run(config, announce, args.log_level)
    return 0


def _model_name(config) -> str:
    """The name the API will serve, asked of the engine now (for the lines to try)."""
    from pagedkv.runtime.serving.client import Client
    from pagedkv.runtime.serving.http.app import model_name

    if config.served_model_name:
        return config.served_model_name
    try:
        with Client(config.address, config.health_timeout, config.curve_keys, config.client_name) as client:
            return model_name(str(client.health()["model"]))
    except Exception:  # the engine is not up yet: the lines still say where to look
        return "MODEL"


def try_lines(url: str, model: str, with_key: bool) -> str:
    auth = f" -H 'Authorization: Bearer '${API_KEY_ENV}" if with_key else ""
    body = json.dumps({"model": model, "prompt": TRY_PROMPT, "max_tokens": 8, "temperature": 0})
    key = f"os.environ['{API_KEY_ENV}']" if with_key else "'EMPTY'"
    python = (f"import os; from openai import OpenAI; c = OpenAI(base_url='{url}/v1', api_key={key}); "
              f"print(c.chat.completions.create(model='{model}', messages=[{{'role': 'user', 'content': "
              f"'Name three rivers.'}}], max_tokens=32).choices[0].message.content)")
    return (f"pagedkv: HTTP API on {url} (OpenAI-compatible, /v1; metrics on /metrics)\n"
            f"try:     curl {url}/v1/completions -H 'Content-Type: application/json'{auth} -d {shlex.quote(body)}\n"
            f"         python -c {shlex.quote(python)}")


def start_gateway(args: argparse.Namespace, engine_address: str) -> subprocess.Popen | None:
    """For `serve --http-port`: `pagedkv api` as a child process that leaves with its parent."""
    if args.http_port is None:
        return None
    command = [sys.executable, "-m", "pagedkv", "api", "--address", engine_address,
               "--host", args.http_host, "--port", str(args.http_port), "--log-level", args.log_level,
               "--exit-with-parent"]
    for flag, value in (("--served-model-name", args.served_model_name), ("--curve-keys", args.curve_keys)):
        if value:
            command += [flag, value]
    if args.insecure:
        command.append("--insecure")
    key = api_key(args)
    env = {**os.environ, **({API_KEY_ENV: key} if key else {})}  # not on the command line, where ps shows it
    return subprocess.Popen(command, env=env)


def check_serve_arguments(args: argparse.Namespace) -> None:
    """Before the model loads: a bad HTTP bind fails at once."""
    from pagedkv.runtime.serving.http.guard import check_http_bind

    if args.http_port is not None:
        check_http_bind(args.http_host, api_key(args), args.insecure)


def stop_gateway(process: subprocess.Popen | None) -> None:
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
