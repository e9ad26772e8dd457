"""The `pagedkv` command line: offline generate; serve, client, chat, stats and keys over ZeroMQ;
and `ablate`, the swap-vs-recompute ablation tool (pagedkv/ablation)."""
from __future__ import annotations

import argparse
import importlib.metadata
import sys
import traceback

from pagedkv.ablation import main as ablation
from pagedkv.runtime.cli import api, offline, remote
from pagedkv.runtime.cli.args import HelpFormatter, add_connection_arguments, add_sampling_arguments, parse_ids
from pagedkv.runtime.engine.config import EngineConfig
from pagedkv.runtime.serving.client import ServerError

def _add_serve(sub) -> None:
    serve = sub.add_parser("serve", help="serve the model on a ZeroMQ socket (docs/protocol.md)")
    EngineConfig.add_arguments(serve)
    add = serve.add_argument
    add("--bind", default="tcp://127.0.0.1:5555", help="address to bind; tcp://127.0.0.1:* picks a free port")
    add("--max-queued", type=int, default=1024, help="waiting requests beyond this get 'overloaded'")
    add("--max-message-mib", type=float, default=16.0, help="largest message accepted (MiB)")
    add("--curve-keys", help="key directory from `pagedkv keys`: accept only its authorized clients "
        "(default: none; loopback or ipc:// only)")
    add("--insecure", action="store_true", help="allow a non-loopback bind without CurveZMQ")
    add("--log-level", default="info", choices=["debug", "info", "warning", "error"], help="server log on stderr")
    api.add_serve_arguments(serve)
    serve.set_defaults(func=remote.cmd_serve)


def _add_remote(sub) -> None:
    client = sub.add_parser("client", help="one-shot requests to a running server")
    client_sub = client.add_subparsers(dest="client_command", required=True)
    gen = client_sub.add_parser("generate", help="generate from a prompt")
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="prompt text")
    source.add_argument("--prompt-ids", type=parse_ids, help="token ids, e.g. 1,2,3")
    source.add_argument("--message", help="a user message, sent with the chat template")
    gen.add_argument("--system", help="a system message before --message")
    gen.add_argument("--stream", action="store_true", help="print the text as it is generated")
    gen.add_argument("--json", action="store_true", help="print the final reply as JSON")
    add_sampling_arguments(gen)
    stats_help = "a table of the server's memory and queues"
    for parser, func in ((gen, remote.cmd_client_generate),
                         (client_sub.add_parser("stats", help=stats_help), remote.cmd_stats),
                         (sub.add_parser("stats", help=stats_help), remote.cmd_stats),
                         (client_sub.add_parser("health", help="is the server up"), remote.cmd_health)):
        add_connection_arguments(parser)
        parser.set_defaults(func=func)
        if func is remote.cmd_stats:
            parser.add_argument("--json", action="store_true", help="the raw numbers as JSON")

    chat = sub.add_parser("chat", help="an interactive chat with a running server, streamed")
    add_connection_arguments(chat)
    chat.add_argument("--system", help="a system message for the conversation")
    add_sampling_arguments(chat, model_defaults=True)
    chat.set_defaults(func=remote.cmd_chat, max_tokens=512)

    keys = sub.add_parser("keys", help="write CurveZMQ key pairs for the server and its clients")
    keys.add_argument("directory")
    keys.add_argument("--client", action="append", help="client key pair name (repeatable; default: 'client')")
    keys.set_defaults(func=remote.cmd_keys)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagedkv", description="A paged KV-cache LLM inference engine.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate from one or more prompts, offline")
    EngineConfig.add_arguments(gen)
    source = gen.add_argument_group("prompts (at least one)")
    source.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    source.add_argument("--prompt-ids", action="append", type=parse_ids, help="token ids, e.g. 1,2,3 (repeatable)")
    gen.add_argument("--chat", action="store_true", help="apply the model's chat template to each prompt")
    gen.add_argument("--json", action="store_true", help="print outputs and engine stats as JSON")
    add_sampling_arguments(gen)
    gen.set_defaults(func=offline.cmd_generate)
    _add_serve(sub)
    api.add_api_parser(sub)
    _add_remote(sub)
    ablation.register(sub)
    parser.add_argument("--version", action="version", version=f"pagedkv {_version()}")
    _for_every_parser(parser)
    return parser


def _version() -> str:
    try:
        return importlib.metadata.version("pagedkv")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that is not installed
        return "(not installed)"


def _for_every_parser(parser: argparse.ArgumentParser, top: bool = True) -> None:
    """Defaults in every --help, and --debug before or after the subcommand's name."""
    parser.formatter_class = HelpFormatter
    parser.add_argument("--debug", action="store_true", default=False if top else argparse.SUPPRESS,
                        help="show the traceback of an error")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                _for_every_parser(child, top=False)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "generate" and not (args.prompt or args.prompt_ids):
        parser.error("generate needs --prompt or --prompt-ids")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # one line for the user; the traceback with --debug
        if args.debug:
            traceback.print_exc()
        status, text = _explain(e)
        print(f"pagedkv: error: {text}", file=sys.stderr)
        return status


def _explain(e: Exception) -> tuple[int, str]:
    """(exit status, message): 2 for what the user can fix (flags, files, no server), 1 for an
    error the server sent back or a timeout, 1 with a pointer to --debug for anything else."""
    text = " ".join(str(e).split())
    if isinstance(e, (ServerError, TimeoutError)):
        return 1, text
    if isinstance(e, (ValueError, OSError)):  # OSError: files, and NoServer (a ConnectionError)
        return 2, text
    return 1, f"{type(e).__name__}: {text} (a bug; --debug shows the traceback)"


if __name__ == "__main__":
    sys.exit(main())
