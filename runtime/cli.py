"""The `pagedkv` command line: offline generate; serve, client, chat, stats and keys over ZeroMQ."""
from __future__ import annotations

import argparse
import json
import sys

from runtime.client import ServerError
from runtime.engine_config import EngineConfig
from runtime.sampling_params import SamplingParams


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--max-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    add("--temperature", type=float, default=0.0, help="0 is greedy (the default here)")
    add("--top-p", type=float, default=1.0)
    add("--top-k", type=int, default=0)
    add("--min-p", type=float, default=0.0)
    add("--seed", type=int)
    add("--n", type=int, default=1, help="parallel samples per prompt")
    add("--beam-width", type=int, default=1, help="beam search when > 1")
    add("--length-penalty", type=float, default=1.0)
    add("--early-stopping", choices=["true", "false", "never"], default="false")
    add("--stop", action="append", default=[], help="stop string (repeatable)")
    add("--ignore-eos", action="store_true")


def sampling_params_from_args(args: argparse.Namespace) -> SamplingParams:
    early = {"true": True, "false": False, "never": "never"}[args.early_stopping]
    n = args.n if args.beam_width == 1 or args.n > 1 else args.beam_width
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, min_p=args.min_p, seed=args.seed, n=n,
                          beam_width=args.beam_width, length_penalty=args.length_penalty,
                          early_stopping=early, stop=args.stop, ignore_eos=args.ignore_eos)


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--prompt-ids takes comma-separated integers, got {text!r}")


def cmd_generate(args: argparse.Namespace) -> int:
    from runtime.llm import LLM

    params = sampling_params_from_args(args)
    llm = LLM(**vars(EngineConfig.from_args(args)))
    prompts: list[str | list[int]] = list(args.prompt_ids or []) + list(args.prompt or [])
    if args.chat:
        if llm.tokenizer is None:
            raise ValueError("--chat needs a model with a tokenizer and a chat template")
        prompts = [llm.tokenizer.encode(llm.tokenizer.apply_chat_template([{"role": "user", "content": p}]),
                                        add_special_tokens=False) if isinstance(p, str) else p
                   for p in prompts]
    results = llm.generate(prompts, params, use_tqdm=not args.json and sys.stderr.isatty())
    if args.json:
        outputs = [{"prompt_index": i, "index": c.index, "token_ids": c.token_ids, "text": c.text,
                    "finish_reason": c.finish_reason, "cumulative_logprob": c.cumulative_logprob}
                   for i, r in enumerate(results) for c in r.outputs]
        print(json.dumps({"outputs": outputs, "stats": llm.engine.stats()}, indent=2))
        return 0
    for i, result in enumerate(results):
        for c in result.outputs:
            label = f"[prompt {i}" + (f", output {c.index}]" if len(result.outputs) > 1 else "]")
            print(f"{label} ({c.finish_reason}, {len(c.token_ids)} tokens)")
            print(c.text)
    return 0


def _add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    from runtime.client import DEFAULT_ADDRESS

    parser.add_argument("--address", default=DEFAULT_ADDRESS, help=f"server address (default {DEFAULT_ADDRESS})")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for each reply")
    parser.add_argument("--curve-keys", help="key directory from `pagedkv keys` (CurveZMQ)")
    parser.add_argument("--client-name", default="client", help="which client key pair in --curve-keys")


def _add_serve(sub) -> None:
    from runtime import commands

    serve = sub.add_parser("serve", help="serve the model on a ZeroMQ socket (docs/protocol.md)")
    EngineConfig.add_arguments(serve)
    add = serve.add_argument
    add("--bind", default="tcp://127.0.0.1:5555", help="address to bind; tcp://127.0.0.1:* picks a free port")
    add("--max-queued", type=int, default=1024, help="waiting requests beyond this get 'overloaded'")
    add("--max-message-mib", type=float, default=16.0, help="largest message accepted (MiB)")
    add("--curve-keys", help="key directory from `pagedkv keys`: accept only its authorized clients")
    add("--insecure", action="store_true", help="allow a non-loopback bind without CurveZMQ")
    add("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.set_defaults(func=commands.cmd_serve)


def _add_remote(sub) -> None:
    from runtime import commands

    client = sub.add_parser("client", help="one-shot requests to a running server")
    client_sub = client.add_subparsers(dest="client_command", required=True)
    gen = client_sub.add_parser("generate", help="generate from a prompt")
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="prompt text")
    source.add_argument("--prompt-ids", type=_parse_ids, help="token ids, e.g. 1,2,3")
    source.add_argument("--message", help="a user message, sent with the chat template")
    gen.add_argument("--system", help="a system message before --message")
    gen.add_argument("--stream", action="store_true", help="print the text as it is generated")
    gen.add_argument("--json", action="store_true", help="print the final reply as JSON")
    add_sampling_arguments(gen)
    stats_help = "a table of the server's memory and queues"
    for parser, func in ((gen, commands.cmd_client_generate),
                         (client_sub.add_parser("stats", help=stats_help), commands.cmd_stats),
                         (sub.add_parser("stats", help=stats_help), commands.cmd_stats),
                         (client_sub.add_parser("health", help="is the server up"), commands.cmd_health)):
        _add_connection_arguments(parser)
        parser.set_defaults(func=func)
        if func is commands.cmd_stats:
            parser.add_argument("--json", action="store_true", help="the raw numbers as JSON")

    chat = sub.add_parser("chat", help="an interactive chat with a running server, streamed")
    _add_connection_arguments(chat)
    chat.add_argument("--system", help="a system message for the conversation")
    add_sampling_arguments(chat)
    chat.set_defaults(func=commands.cmd_chat, max_tokens=512)

    keys = sub.add_parser("keys", help="write CurveZMQ key pairs for the server and its clients")
    keys.add_argument("directory")
    keys.add_argument("--client", action="append", help="client key pair name (repeatable; default 'client')")
    keys.set_defaults(func=commands.cmd_keys)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagedkv", description="A paged KV-cache LLM inference engine.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate from one or more prompts, offline")
    EngineConfig.add_arguments(gen)
    source = gen.add_argument_group("prompts (at least one)")
    source.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    source.add_argument("--prompt-ids", action="append", type=_parse_ids, help="token ids, e.g. 1,2,3 (repeatable)")
    gen.add_argument("--chat", action="store_true", help="apply the model's chat template to each prompt")
    gen.add_argument("--json", action="store_true", help="print outputs and engine stats as JSON")
    add_sampling_arguments(gen)
    gen.set_defaults(func=cmd_generate)
    _add_serve(sub)
    _add_remote(sub)
    _add_ablate(sub)
    return parser


def _add_ablate(sub) -> None:
    from tools import ablate_preemption  # the CLI is the top layer: it may reach the tools

    ablate = sub.add_parser("ablate", help="swap vs recompute: when each wins, and whether auto chooses well")
    ablate_preemption.add_arguments(ablate)
    ablate.set_defaults(func=ablate_preemption.run)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "generate" and not (args.prompt or args.prompt_ids):
        parser.error("generate needs --prompt or --prompt-ids")
    try:
        return args.func(args)
    except ValueError as e:
        print(f"pagedkv: error: {e}", file=sys.stderr)
        return 2
    except (ServerError, TimeoutError) as e:
        print(f"pagedkv: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
