"""The networked subcommands of `pagedkv`: serve, client, chat, stats, keys."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from pagedkv.runtime.cli import api
from pagedkv.runtime.cli.args import CHAT_SAMPLING, CONNECT_TIMEOUT, sampling_params_from_args
from pagedkv.runtime.serving.address import check_free
from pagedkv.runtime.serving.client import Client, NoServer, ServerError
from pagedkv.runtime.serving.security import check_bind, write_keys


def cmd_serve(args: argparse.Namespace) -> int:
    from pagedkv.runtime.engine.config import EngineConfig
    from pagedkv.runtime.engine.llm_engine import LLMEngine
    from pagedkv.runtime.serving.server import Server, ServerConfig

    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = ServerConfig(args.bind, args.max_queued, args.max_message_mib, args.curve_keys, args.insecure)
    check_bind(config.bind, config.curve_keys, config.insecure)  # before spending seconds on the model
    api.check_serve_arguments(args)
    check_free(config.bind)
    print("pagedkv: loading the model ...", file=sys.stderr, flush=True)
    server = Server(LLMEngine(EngineConfig.from_args(args)), config)
    keys = f" --curve-keys {args.curve_keys}" if args.curve_keys else ""
    print(f"pagedkv: serving {server.engine.model_source} on {server.endpoint}\n"
          f"try:     pagedkv client generate --address {server.endpoint}{keys} "
          f"--prompt 'The capital of France is' --max-tokens 8", flush=True)
    gateway = api.start_gateway(args, server.endpoint)
    try:
        server.serve_forever()
    finally:
        api.stop_gateway(gateway)
        server.engine.close()  # the disk tier keeps what the prefix cache holds
    print("pagedkv: stopped", file=sys.stderr)
    return 0


def connect(args: argparse.Namespace) -> Client:
    try:
        return Client(args.address, args.timeout, args.curve_keys, args.client_name, connect_timeout=CONNECT_TIMEOUT)
    except NoServer as e:
        hint = "" if "handshake" in str(e) else (
            f"; start one with `pagedkv serve --bind {args.address}` (or `make serve` for the default address), "
            "or point --address at a running one")
        raise NoServer(f"{e}{hint}") from None


def cmd_client_generate(args: argparse.Namespace) -> int:
    params = sampling_params_from_args(args).to_dict()
    source = {"prompt": args.prompt} if args.prompt is not None else {"prompt_ids": args.prompt_ids}
    if args.message:
        source = {"messages": [{"role": "user", "content": args.message}]}
        if args.system:
            source["messages"].insert(0, {"role": "system", "content": args.system})
    with connect(args) as client:
        if args.stream:
            final = None
            for reply in client.stream(**source, **params):
                if reply["type"] == "token":
                    print("".join(o["text"] for o in reply["outputs"] if o["index"] == 0), end="", flush=True)
                else:
                    final = reply
            print()
        else:
            final = client.generate(**source, **params)
    if args.json:
        print(json.dumps(final, indent=2))
    elif not args.stream:
        for out in final["outputs"]:
            if len(final["outputs"]) > 1:
                print(f"[output {out['index']}] ({out['finish_reason']}, {len(out['token_ids'])} tokens)")
            print(out["text"])
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """An interactive chat: each answer streams in; /reset forgets the conversation, /exit leaves.
    Unset sampling flags take the model's own settings (from the server), else CHAT_SAMPLING."""
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    with connect(args) as client:
        shipped = client.health().get("sampling_defaults") or {}
        params = sampling_params_from_args(args, shipped or CHAT_SAMPLING).to_dict()
        print("pagedkv chat: type a message; /reset starts over, /exit (or Ctrl-D) leaves.", file=sys.stderr)
        while True:
            try:
                line = input("you> ").strip()
            except (EOFError, KeyboardInterrupt):
                print(file=sys.stderr)
                return 0
            if line in ("/exit", "/quit"):
                return 0
            if line == "/reset":
                del history[int(bool(args.system)):]
                continue
            if not line:
                continue
            history.append({"role": "user", "content": line})
            answer = _stream_answer(client, history, params)
            if answer is None:
                history.pop()
            else:
                history.append({"role": "assistant", "content": answer})


def _stream_answer(client: Client, history: list[dict], params: dict) -> str | None:
    print("model> ", end="", flush=True)
    parts: list[str] = []
    try:
        for reply in client.stream(messages=history, **params):
            for out in reply.get("outputs", []) if reply["type"] == "token" else []:
                print(out["text"], end="", flush=True)
                parts.append(out["text"])
    except (ServerError, TimeoutError) as e:
        print(f"\n[error] {e}", file=sys.stderr)
        return None
    except KeyboardInterrupt:  # Ctrl-C stops this answer (the request is aborted), not the chat
        print(" [stopped]")
        return "".join(parts)
    print()
    return "".join(parts)


def cmd_stats(args: argparse.Namespace) -> int:
    with connect(args) as client:
        stats = client.stats()
    print(json.dumps(stats, indent=2) if args.json else format_stats(stats))
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    with connect(args) as client:
        print(json.dumps(client.health(), indent=2))
    return 0


def _prefix_cache(p: dict | None) -> str:
    if not p or not p["enabled"]:
        return "off"
    return (f"{100 * p['hit_rate']:.1f}% hit rate ({p['hit_tokens']} of {p['queried_tokens']} prompt tokens), "
            f"{p['cached_blocks']} blocks cached ({p['evictable_blocks']} evictable), {p['evicted_blocks']} evicted")


def _tier(name: str, t: dict) -> str:
    held = f"{t['cached_blocks']} blocks held"
    if "capacity_bytes" in t:
        held += f" ({t['used_bytes'] / 2**30:.2f} of {t['capacity_bytes'] / 2**30:.1f} GiB)"
    loads = f", {t['load_seconds'] / t['hit_blocks'] * 1e3:.2f} ms per block loaded" if t["hit_blocks"] else ""
    return (f"{held}; {t['hit_blocks']} hits, {t['miss_blocks']} misses{loads}; {t['stored_blocks']} stored, "
            f"{t['evicted_blocks']} evicted, {t['errors']} damaged")


def format_stats(s: dict) -> str:
    blocks, server = s["blocks"], s.get("server", {})

    def pool(name: str) -> str:
        p = blocks[name]
        share = 100 * p["used"] / p["total"] if p["total"] else 0.0
        return f"{p['used']:>8} / {p['total']:<8} blocks used ({share:.1f}%)"

    q, pre = s["queues"], s["preemptions"]
    rows = [
        ("queues", f"{q['running']} running, {q['waiting']} waiting, {q['swapped']} swapped"),
        ("device pool", pool("device")),
        ("cpu swap pool", pool("cpu")),
        ("block size", f"{blocks['block_size']} tokens"),
        ("KV waste", f"{100 * s['kv_waste']:.2f}% of allocated slots hold no token"),
        ("sharing saves", f"{s['sharing_saved_blocks']} blocks ({100 * s['sharing_saved']:.1f}%)"),
        ("copy-on-write", f"{s['copy_on_write_copies']} block copies"),
        ("preemptions", f"{pre['swap']} by swap, {pre['recompute']} by recompute"),
        ("blocks swapped", f"{s['blocks_swapped_out']} out, {s['blocks_swapped_in']} in"),
        ("tokens recomputed", str(s["tokens_recomputed"])),
        ("prefix cache", _prefix_cache(s.get("prefix_cache"))),
        *((f"{name} tier", _tier(name, t)) for name, t in (s.get("kv_tiers") or {}).items()),
        ("generated", f"{s['generated_tokens']} tokens in {s['steps']} steps "
                      f"({s['throughput_tokens_per_s']:.1f} tokens/s since start)"),
    ]
    if server:
        rows += [("requests in flight", f"{server['in_flight']} (at most {server['max_queued']} waiting)"),
                 ("runtime overhead", f"{server['handle_ms_per_message']:.3f} ms per message received "
                                      f"(its replies included), engine step {server['step_ms']:.2f} ms"),
                 ("uptime", f"{server['uptime_s']:.0f} s")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def cmd_keys(args: argparse.Namespace) -> int:
    written = write_keys(args.directory, args.client or ["client"])
    for path in written:
        print(path)
    print(f"\nserver:  pagedkv serve --bind tcp://0.0.0.0:5555 --curve-keys {args.directory}\n"
          f"client:  pagedkv client generate --address tcp://HOST:5555 --curve-keys {args.directory} "
          f"--client-name {(args.client or ['client'])[0]} --prompt Hi\n"
          f"Give a client its NAME.key_secret and server.key only; server.key_secret stays on the server.")
    return 0
