"""pagedkv's CPU kernels with and without AMX, side by side in one run, on a model's shapes.

    python -m tools.bench_cpu_kernels [--rows 1,16,32,64,128,512,2900] [--threads 1]
        [--repeats 3] [--seqs 64] [--context 155] [--model PATH.gguf] [--out DIR] [--update-docs]

4-bit matrices: every quantized matrix of the model (its layers' fused q/k/v, o, gate/up and
down, and the lm_head), kept as the GGUF file stores them, multiplied by `rows` rows of float32
activations in float32 FMAs (pagedkv/kernels/cpu/cpu_int4.c) and in exact integer products (pagedkv/kernels/cpu/cpu_vnni.c:
AVX512-VNNI, and AMX from 8 rows), and of bfloat16 ones (pagedkv/kernels/cpu/cpu_amx.c on AMX): ms for one
pass over all of them, best of --repeats. Attention over a bfloat16 cache in the model's shape
(every layer, --seqs sequences of --context positions in blocks of 16 scattered over the cache,
bfloat16 queries): a decode step, and prompts of the same length, with the query-key products
on AMX and in vector FMAs.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from pagedkv.kernels.cpu import ops as cpu_ops
from pagedkv.ablation.report import add_output_arguments, markdown_table, output_folder, publish

TITLE = "CPU kernels with and without AMX, SmolLM2-135M"
BLOCK = 16


def log(message: str) -> None:
    print(f"[bench_cpu_kernels] {message}", file=sys.stderr, flush=True)


def ms(t: float) -> str:
    return f"{t:.1f}" if t >= 1 else f"{t:.3g}"


def best_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def matrix_rows(linears: list, rows: list[int], repeats: int) -> list[list[object]]:
    """One row per batch size: the three 4-bit kernels over the model's quantized matrices."""
    table = []
    for m in rows:
        x = {w.in_features: torch.randn(m, w.in_features) for w in linears}
        times = {}
        for name, dtype, integers in (("floats", torch.float32, False), ("integers", torch.float32, True),
                                      ("bfloat16", torch.bfloat16, True)):
            inputs = {k: v.to(dtype) for k, v in x.items()}
            cpu_ops.set_vnni(integers)
            try:
                times[name] = best_ms(lambda: [w(inputs[w.in_features]) for w in linears], repeats)
            finally:
                cpu_ops.set_vnni(True)
        table.append([m, ms(times["floats"]), ms(times["integers"]), ms(times["bfloat16"]),
                      f"{times['floats'] / times['integers']:.2f}x", f"{times['floats'] / times['bfloat16']:.2f}x"])
        log(f"{m} rows: float32 FMAs {ms(times['floats'])} ms, integer products {ms(times['integers'])} ms, "
            f"bfloat16 {ms(times['bfloat16'])} ms")
    return table


def attention_rows(config, seqs: int, context: int, repeats: int) -> list[list[object]]:
    """Decode and prompt attention over every layer, AMX's query-key products against FMAs."""
    g = torch.Generator().manual_seed(0)
    per_seq = -(-context // BLOCK)
    heads, kv_heads, head_dim = config.num_heads, config.num_kv_heads, config.head_dim
    cache = torch.randn(seqs * per_seq + 1, config.num_layers, 2, BLOCK, kv_heads, head_dim, generator=g)
    cache = cache.bfloat16()
    tables = torch.randperm(seqs * per_seq, generator=g).view(seqs, per_seq).int()  # blocks scattered
    lens = torch.full((seqs,), context, dtype=torch.int32)
    decode_q = torch.randn(seqs, heads, head_dim, generator=g).bfloat16()
    prompt_q = torch.randn(seqs * context, heads, head_dim, generator=g).bfloat16()
    starts = torch.arange(0, seqs * context + 1, context, dtype=torch.int32)
    scale = head_dim ** -0.5
    steps = {
        "decode step": lambda: [cpu_ops.paged_attention_decode(decode_q, cache, layer, tables, lens, scale)
                                for layer in range(config.num_layers)],
        "prompts": lambda: [cpu_ops.paged_attention_prefill(prompt_q, cache, layer, tables, starts, lens, scale)
                            for layer in range(config.num_layers)]}
    table = []
    for what, fn in steps.items():
        times = {}
        for amx in (False, True):
            cpu_ops.set_amx(amx)
            times[amx] = best_ms(fn, repeats)
        cpu_ops.set_amx(True)
        table.append([what, ms(times[False]), ms(times[True]), f"{times[False] / times[True]:.2f}x"])
        log(f"attention, {what}: vectors {ms(times[False])} ms, AMX {ms(times[True])} ms")
    return table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="1,16,32,64,128,512,2900", help="batch sizes for the 4-bit matrices")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seqs", type=int, default=64, help="sequences for attention")
    p.add_argument("--context", type=int, default=155, help="positions per sequence for attention")
    p.add_argument("--model", help="a GGUF file (default: the default model)")
    add_output_arguments(p)
    args = p.parse_args(argv)
    rows = [int(r) for r in args.rows.split(",") if r.strip()]
    if not rows or min(rows) < 1 or args.threads < 1 or args.repeats < 1 or args.seqs < 1 or args.context < 1:
        p.error("need batch sizes, threads, repeats, sequences and context of at least 1")
    if cpu_ops.library() is None:
        print("bench_cpu_kernels: the CPU kernels do not build here (no C compiler?)", file=sys.stderr)
        return 2
    if not cpu_ops.amx_supported() or not cpu_ops.vnni_supported():
        print("bench_cpu_kernels: no AMX or AVX512-VNNI on this CPU or operating system; nothing to compare",
              file=sys.stderr)
        return 2
    out = output_folder(args, "bench_cpu_kernels")
    torch.set_num_threads(args.threads)

    from pagedkv import default_model_path, load_model
    from pagedkv.runtime.models.llama import LlamaModel
    from pagedkv.runtime.models.quant import Int4Linear

    path = args.model or default_model_path()
    loaded = load_model(path, quantization="auto")
    model = LlamaModel(loaded.config, loaded.weights, torch.device("cpu"), torch.float32)
    linears = [w for w in model.linear_weights() if isinstance(w, Int4Linear)]
    with torch.inference_mode():
        matrices = matrix_rows(linears, rows, args.repeats)
        attention = attention_rows(loaded.config, args.seqs, args.context, args.repeats)
    formats = ", ".join(sorted({w.fmt for w in linears}))
    body = (f"Model {path.rsplit('/', 1)[-1]} ({formats} kept as stored), {args.threads} thread(s), best of "
            f"{args.repeats}; torch {torch.__version__}.\n\n"
            "4-bit matrices, one pass over all of them (ms):\n\n"
            + markdown_table(["rows", "float32 FMAs (cpu_int4.c)", "float32, integer products (cpu_vnni.c)",
                              "bfloat16 on AMX (cpu_amx.c)", "integer products' speed", "bfloat16's speed"],
                             matrices)
            + f"\n\nAttention over a bfloat16 cache, every layer, {args.seqs} sequences of {args.context} "
              f"positions in blocks of {BLOCK}, bfloat16 queries (ms):\n\n"
            + markdown_table(["step", "vector FMAs", "query-key products on AMX", "AMX's speed"], attention))
    print(body)
    publish(TITLE, body, out, args.update_docs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
