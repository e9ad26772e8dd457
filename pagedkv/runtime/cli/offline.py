"""`pagedkv generate`: offline generation in this process, no server."""
from __future__ import annotations

import argparse
import json
import sys

from pagedkv.runtime.cli.args import sampling_params_from_args
from pagedkv.runtime.engine.config import EngineConfig


def cmd_generate(args: argparse.Namespace) -> int:
    from pagedkv.runtime.engine.llm import LLM

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
    llm.close()  # the disk tier, if any, keeps what the prefix cache holds
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
