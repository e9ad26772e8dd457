"""Tensor parallelism on the CPU: the decode step of two ranks (gloo) against one rank, on a
random model of SmolLM2-135M's shape, and what the ranks spend talking to each other per step.

    python -m tools.bench_tensor_parallel [--batch-sizes 1,8,32] [--prompt-len 128] [--steps 16]
        [--repeats 3] [--threads N] [--layers 30] [--out DIR] [--update-docs]

The model: SmolLM2-135M's hidden size (576), layers (30), intermediate size (1536), vocabulary
(49152) and tied embeddings, with 8 query heads and 2 KV heads of 72 dimensions instead of 9
and 3 of 64 (which 2 ranks cannot split); random float32 weights written once as safetensors
into a temporary folder, so that each rank reads only its slices.

Three ways, side by side in every repeat (alternating, so that the machine's load hits all
alike): one rank with N torch threads, two ranks with N/2 threads each (the same cores), and
one rank with N/2 threads (what each rank would take alone). Per batch size, B greedy requests
with random prompts; the median wall time of an engine step after the prefill. For two
ranks, per decode step and as rank 0 sees it: the step broadcast (bytes, ms) and the model's
collectives (count, bytes, ms: 2 all-reduces per layer, the embedding's all-reduce, the logits
gather). On the CPU, gloo's collectives are synchronous, so their time includes waiting for
the slower rank.

Writes results.json and summary.md to --out (default out/bench_tensor_parallel); with
--update-docs, also the section "Tensor parallelism (CPU, gloo)" of docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from pagedkv.ablation.report import markdown_table, write_section

TITLE = "Tensor parallelism (CPU, gloo)"
SHAPE = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=8, num_key_value_heads=2, head_dim=72,
             vocab_size=49152, tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=100000.0,
             max_position_embeddings=2048)


def log(message: str) -> None:
    print(f"[bench_tensor_parallel] {message}", file=sys.stderr, flush=True)


def write_model(folder: str, layers: int, seed: int = 0) -> str:
    """A random Llama folder of SmolLM2-135M's shape (config.json, model.safetensors)."""
    from safetensors.torch import save_file

    h, i, d = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["head_dim"]
    q, kv = SHAPE["num_attention_heads"] * d, SHAPE["num_key_value_heads"] * d
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * 0.05

    weights = {"model.embed_tokens.weight": randn(SHAPE["vocab_size"], h), "model.norm.weight": torch.ones(h)}
    for n in range(layers):
        p = f"model.layers.{n}."
        weights |= {p + "input_layernorm.weight": torch.ones(h), p + "post_attention_layernorm.weight": torch.ones(h),
                    p + "self_attn.q_proj.weight": randn(q, h), p + "self_attn.k_proj.weight": randn(kv, h),
                    p + "self_attn.v_proj.weight": randn(kv, h), p + "self_attn.o_proj.weight": randn(h, q),
                    p + "mlp.gate_proj.weight": randn(i, h), p + "mlp.up_proj.weight": randn(i, h),
                    p + "mlp.down_proj.weight": randn(h, i)}
    save_file(weights, os.path.join(folder, "model.safetensors"))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": layers,
              "hidden_act": "silu", **SHAPE}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    return folder


def engine_config(path: str, ranks: int, batch: int, prompt_len: int, steps: int):
    from pagedkv import EngineConfig

    per_seq = -(-(prompt_len + steps + 1) // 16) + 1
    return EngineConfig(model=path, device="cpu", dtype="float32", block_size=16,
                        num_device_blocks=batch * per_seq + 8, swap_space_gib=0.0, max_num_seqs=batch,
                        max_num_batched_tokens=max(4096, batch * prompt_len), tensor_parallel_size=ranks)


def counters(engine) -> dict[str, float]:
    """Rank 0's communication so far (zeros with one rank)."""
    executor, tp = engine.executor, engine.executor.model.tp
    return {"broadcast_bytes": getattr(executor, "broadcast_bytes", 0),
            "broadcast_s": getattr(executor, "broadcast_seconds", 0.0),
            "collectives": tp.calls, "collective_bytes": tp.bytes, "collective_s": tp.seconds}


def run(engine, ids: list[list[int]], steps: int) -> tuple[list[float], dict[str, float], list[list[int]]]:
    """Decode step times (s), communication per decode step, and the greedy tokens."""
    from pagedkv import SamplingParams

    params = SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True)
    tag = f"r{time.monotonic_ns()}"
    order = [f"{tag}-{b}" for b in range(len(ids))]
    for rid, row in zip(order, ids):
        engine.add_request(rid, row, params)
    tokens: dict[str, list[int]] = {}
    times: list[float] = []
    first, before = True, None
    while engine.has_unfinished():
        started = time.perf_counter()
        outputs = engine.step()
        elapsed = time.perf_counter() - started
        tokens.update((o.request_id, o.outputs[0].token_ids) for o in outputs if o.finished)
        if first:  # the prefill step
            first, before = False, counters(engine)
        else:
            times.append(elapsed)
    after = counters(engine)
    per_step = {k: (after[k] - before[k]) / max(len(times), 1) for k in after}
    return times, per_step, [tokens[rid] for rid in order]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=16, help="new tokens per request (>= 3)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads of one rank (default: torch's)")
    p.add_argument("--layers", type=int, default=30, help="fewer for a quick look (SmolLM2-135M: 30)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("out/bench_tensor_parallel"))
    p.add_argument("--update-docs", action="store_true", help="write the section of docs/BENCHMARKS.md")
    args = p.parse_args(argv)
    batches = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    if args.steps < 3 or args.prompt_len < 1 or args.repeats < 1 or not batches or min(batches) < 1:
        p.error("need --steps >= 3, --prompt-len >= 1, --repeats >= 1 and batch sizes >= 1")
    threads = args.threads or torch.get_num_threads()
    half = max(threads // 2, 1)
    ways = [("1 rank", 1, threads), ("2 ranks", 2, half), ("1 rank", 1, half)]
    if half == threads:
        ways = ways[:2]

    from pagedkv import LLMEngine

    load_start = os.getloadavg()[0]
    rows, comm_rows, results, mismatches = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="pagedkv-tp-") as folder:
        log(f"writing a random {args.layers}-layer model of SmolLM2-135M's shape")
        path = write_model(folder, args.layers, args.seed)
        gen = torch.Generator().manual_seed(args.seed)
        for batch in batches:
            ids = torch.randint(16, SHAPE["vocab_size"], (batch, args.prompt_len), generator=gen).tolist()
            engines = []
            for name, ranks, n in ways:
                torch.set_num_threads(n)  # a spawned worker takes rank 0's count
                engines.append(LLMEngine(engine_config(path, ranks, batch, args.prompt_len, args.steps)))
            try:
                step_times: list[list[float]] = [[] for _ in ways]
                comm: list[dict[str, float]] = [{} for _ in ways]
                outputs: list[list[list[int]]] = [[] for _ in ways]
                for engine, (_, _, n) in zip(engines, ways):  # warm-up
                    torch.set_num_threads(n)
                    run(engine, [row[:8] for row in ids], 3)
                for r in range(args.repeats):
                    for w, (engine, (name, ranks, n)) in enumerate(zip(engines, ways)):
                        torch.set_num_threads(n)
                        times, comm[w], outputs[w] = run(engine, ids, args.steps)
                        step_times[w] += times
                    log(f"batch {batch}: repeat {r + 1}/{args.repeats}: "
                        + ", ".join(f"{name} x {n} threads {statistics.median(t) * 1e3:.1f} ms"
                                    for (name, _, n), t in zip(ways, step_times)))
            finally:
                for engine in engines:
                    engine.close()
            medians = [statistics.median(t) for t in step_times]
            if outputs[1] != outputs[0]:
                mismatches.append(batch)
            c = comm[1]
            comm_ms = (c["broadcast_s"] + c["collective_s"]) * 1e3
            rows.append([batch] + [f"{m * 1e3:.2f}" for m in medians] + [f"{medians[0] / medians[1]:.2f}"])
            comm_rows.append([batch, f"{c['broadcast_bytes']:.0f}", f"{c['broadcast_s'] * 1e3:.3f}",
                              f"{c['collectives']:.0f}", f"{c['collective_bytes'] / 2**20:.2f}",
                              f"{c['collective_s'] * 1e3:.2f}", f"{comm_ms / (medians[1] * 1e3):.0%}"])
            results.append({"batch": batch, "step_ms": {f"{name} x {n}": m * 1e3 for (name, _, n), m in
                                                         zip(ways, medians)}, "tp2_comm_per_step": c})
    load_end = os.getloadavg()[0]
    header = ["batch"] + [f"{name}, {n} thread{'s' if n > 1 else ''} (ms)" for name, _, n in ways]
    body = (f"A random {args.layers}-layer model of SmolLM2-135M's shape (hidden 576, intermediate 1536, "
            f"vocabulary 49152, tied embeddings; 8 query and 2 KV heads of 72 dimensions, as 9 and 3 do not "
            f"split over 2 ranks), float32; B random prompts of {args.prompt_len} tokens, {args.steps} greedy "
            f"tokens each, {args.repeats} repeats; median wall time of an engine step after the prefill. "
            f"Two ranks: rank 0 in the benchmark's process, one spawned worker, gloo over loopback; "
            f"torch {torch.__version__}.\n\n"
            + markdown_table(header + ["2 ranks vs 1 rank (speed-up)"], rows)
            + "\n\nCommunication of two ranks per decode step, as rank 0 sees it (gloo collectives are "
              "synchronous on the CPU: their time includes waiting for the slower rank):\n\n"
            + markdown_table(["batch", "step broadcast bytes", "broadcast ms", "collectives", "collective MiB",
                              "collective ms", "share of the step"], comm_rows)
            + "\n\n" + ("Greedy tokens of two ranks equal one rank's at every batch size." if not mismatches else
                        f"Greedy tokens of two ranks differ from one rank's at batch {mismatches} (float sums "
                        "in another order on a random model whose logits are close).")
            + f"  \nLoad average (1 min) at the start {load_start:.2f}, at the end {load_end:.2f}.\n")
    print(body)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    (args.out / "summary.md").write_text(f"## {TITLE}\n\n{body}")
    log(f"wrote {args.out}/results.json and summary.md")
    if args.update_docs:
        write_section(TITLE, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
