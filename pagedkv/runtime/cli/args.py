"""Arguments shared by the `pagedkv` subcommands, and the SamplingParams they describe."""
from __future__ import annotations

import argparse

from pagedkv.runtime.engine.sampling_params import SamplingParams
from pagedkv.runtime.serving.client import DEFAULT_ADDRESS

# Chat samples: greedy decoding of a small model loops. These are llama.cpp's defaults, used
# when the model ships no sampling settings of its own.
CHAT_SAMPLING = {"temperature": 0.8, "top_p": 0.95, "top_k": 40, "min_p": 0.05}
# What SamplingParams does when a setting is not given at all.
NEUTRAL_SAMPLING = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0}
CONNECT_TIMEOUT = 3.0  # seconds to wait for a server's handshake before saying none answers


class HelpFormatter(argparse.HelpFormatter):
    """Every option's default in its help: "(default: X)", unless the text already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        flag = action.nargs == 0  # --json, --help, --version: on or off
        if flag or not action.option_strings or action.default is argparse.SUPPRESS or "default" in text:
            return text
        return f"{text} (default: {'none' if action.default is None else '%(default)s'})".lstrip()


def add_sampling_arguments(parser: argparse.ArgumentParser, model_defaults: bool = False) -> None:
    """model_defaults: temperature, top-p, top-k and min-p default to the model's own sampling
    settings (chat), else to greedy decoding."""
    add = parser.add_argument
    add("--max-tokens", type=int, default=64, help="tokens to generate at most")
    if model_defaults:
        ours = ", ".join(f"{k} {v}" for k, v in CHAT_SAMPLING.items())
        shipped = ("(default: the model's own, from its generation_config.json or GGUF metadata; "
                   f"for a model that ships none, {ours})")
        add("--temperature", type=float, help=f"0 is greedy {shipped}")
        add("--top-p", type=float, help="(default: as --temperature says)")
        add("--top-k", type=int, help="0 is off (default: as --temperature says)")
        add("--min-p", type=float, help="(default: as --temperature says)")
    else:
        add("--temperature", type=float, default=0.0, help="0 is greedy")
        add("--top-p", type=float, default=1.0, help="nucleus sampling: keep the smallest set of this mass")
        add("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 is off")
        add("--min-p", type=float, default=0.0, help="drop tokens below this share of the most likely one")
    add("--seed", type=int, help="seed of a reproducible draw (default: none, a fresh draw each time)")
    add("--n", type=int, default=1, help="parallel samples per prompt")
    add("--beam-width", type=int, default=1, help="beam search when > 1")
    add("--length-penalty", type=float, default=1.0, help="beam search: scores are divided by length ** this")
    add("--early-stopping", choices=["true", "false", "never"], default="false", help="beam search: when to stop")
    add("--stop", action="append", default=[], help="stop string (repeatable; default: none)")
    add("--ignore-eos", action="store_true", help="go on after the end-of-sequence token")


def sampling_params_from_args(args: argparse.Namespace, defaults: dict | None = None) -> SamplingParams:
    """defaults fill in the sampling settings the command line left unset (None)."""
    early = {"true": True, "false": False, "never": "never"}[args.early_stopping]
    # Beam search returns every beam unless --n says fewer.
    n = args.beam_width if args.beam_width > 1 and args.n == 1 else args.n
    unset = {**NEUTRAL_SAMPLING, **(defaults or {})}
    chosen = {k: unset[k] if getattr(args, k) is None else getattr(args, k) for k in NEUTRAL_SAMPLING}
    return SamplingParams(max_tokens=args.max_tokens, **chosen, seed=args.seed, n=n,
                          beam_width=args.beam_width, length_penalty=args.length_penalty,
                          early_stopping=early, stop=args.stop, ignore_eos=args.ignore_eos)


def parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--prompt-ids takes comma-separated integers, got {text!r}")


def add_connection_arguments(parser: argparse.ArgumentParser,
                             timeout_help: str = "seconds to wait for each reply", several: bool = False) -> None:
    if several:
        parser.add_argument("--address", action="append", help="server address; repeat it for several engines, "
                            f"and each request goes to the one that holds most of its prefix (default: {DEFAULT_ADDRESS})")
    else:
        parser.add_argument("--address", default=DEFAULT_ADDRESS, help="server address")
    parser.add_argument("--timeout", type=float, default=120.0, help=timeout_help)
    parser.add_argument("--curve-keys", help="key directory from `pagedkv keys` (CurveZMQ; default: none, plain)")
    parser.add_argument("--client-name", default="client", help="which client key pair in --curve-keys")
