"""Structured outputs' cost: the same batch of chat requests with and without a JSON schema.

    python -m tools.bench_structured [--batch 32] [--new-tokens 96] [--repeats 3] [--model PATH]
                                     [--async-scheduling]

One engine (the default model unless --model), `--batch` requests at once, each `--new-tokens`
tokens long: unconstrained (ignore_eos) and every request under one JSON schema, the two modes
alternating, `--repeats` times; medians of generated tokens per second over the whole run
(prefill included). The schema asks for more array items than the budget holds, so that every
constrained request also runs to its last token and both modes decode the same batch for the
same number of steps: the difference is the grammar's (matchers, masks, their application).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

SCHEMA = {"type": "object", "properties": {
    "title": {"type": "string", "maxLength": 40},
    "items": {"type": "array", "minItems": 200, "items": {
        "type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                         "count": {"type": "integer", "minimum": 0, "maximum": 999},
                                         "kind": {"enum": ["fruit", "tool", "animal"]}},
        "required": ["name", "count", "kind"], "additionalProperties": False}}},
    "required": ["title", "items"], "additionalProperties": False}
TOPICS = ["a grocery list", "a toolbox", "a zoo", "a farm", "a kitchen", "a garden", "a workshop", "a market"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default=None)
    ap.add_argument("--async-scheduling", action="store_true")
    args = ap.parse_args()

    import torch

    from pagedkv import EngineConfig, LLMEngine, SamplingParams

    engine = LLMEngine(EngineConfig(model=args.model, device="cpu", swap_space_gib=0.0,
                                    async_scheduling=args.async_scheduling))
    tok = engine.tokenizer
    prompts = [tok.encode(tok.apply_chat_template(
        [{"role": "user", "content": f"Describe {TOPICS[i % len(TOPICS)]} as JSON, item {i}."}]),
        add_special_tokens=False) for i in range(args.batch)]

    def run(structured: bool) -> tuple[float, int, list[str]]:
        for i, prompt in enumerate(prompts):
            params = SamplingParams(max_tokens=args.new_tokens, temperature=0.7, seed=i,
                                    **({"structured_outputs": {"json": SCHEMA}} if structured else {"ignore_eos": True}))
            engine.add_request(str(i), prompt, params, stream=False)
        started, done = time.perf_counter(), {}
        while engine.has_unfinished():
            done.update({o.request_id: o.outputs[0] for o in engine.step()})
        seconds = time.perf_counter() - started
        outs = [done[str(i)] for i in range(len(prompts))]
        return seconds, sum(len(o.token_ids) for o in outs), [o.text for o in outs]

    run(True)  # warm-up: the grammar's tokenizer and the compiled schema are built once per engine
    rates: dict[str, list[float]] = {"unconstrained": [], "json_schema": []}
    for _ in range(args.repeats):
        for mode in rates:
            seconds, tokens, texts = run(mode == "json_schema")
            assert tokens == args.batch * args.new_tokens, (mode, tokens)
            rates[mode].append(tokens / seconds)
    sample = texts[0][:120]
    plain, constrained = statistics.median(rates["unconstrained"]), statistics.median(rates["json_schema"])
    print(json.dumps({"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
                      "batch": args.batch, "new_tokens": args.new_tokens, "repeats": args.repeats,
                      "async_scheduling": args.async_scheduling,
                      "unconstrained_tok_s": round(plain, 1), "json_schema_tok_s": round(constrained, 1),
                      "ratio": round(constrained / plain, 3), "all_runs": {k: [round(r, 1) for r in v]
                                                                           for k, v in rates.items()},
                      "sample_output": sample}, indent=1))


if __name__ == "__main__":
    main()
