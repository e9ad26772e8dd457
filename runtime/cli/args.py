"""Arguments shared by the `pagedkv` subcommands, and the SamplingParams they describe."""
from __future__ import annotations

import argparse

from runtime.engine.sampling_params import SamplingParams
from runtime.serving.client import DEFAULT_ADDRESS


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


def parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--prompt-ids takes comma-separated integers, got {text!r}")


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default=DEFAULT_ADDRESS, help=f"server address (default {DEFAULT_ADDRESS})")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for each reply")
    parser.add_argument("--curve-keys", help="key directory from `pagedkv keys` (CurveZMQ)")
    parser.add_argument("--client-name", default="client", help="which client key pair in --curve-keys")
