"""pagedkv's CPU kernels with and without AMX, side by side in one run, on a model's shapes.

    python -m tools.bench_cpu_kernels [--rows 1,16,32,64,128,512,2900] [--threads 1]
        [--repeats 3] [--seqs 64] [--context 155] [--dense-rows 1,2,4,8,64,512] [--model PATH.gguf]
        [--no-amx] [--clock wall|cpu] [--out DIR] [--update-docs]

4-bit matrices: every quantized matrix of the model (its layers' fused q/k/v, o, gate/up and
down, and the lm_head), kept as the GGUF file stores them, multiplied by `rows` rows of float32
activations in float32 FMAs (pagedkv/kernels/cpu/cpu_int4.c) and in exact integer products
(pagedkv/kernels/cpu/cpu_vnni.c: AVX512-VNNI; AMX from 8 rows, or where AMX is missing register blocks
from 7), and of bfloat16 ones (pagedkv/kernels/cpu/cpu_amx.c on AMX, else AVX512-BF16's dot products,
pagedkv/kernels/cpu/cpu_bf16.c): ms for one pass over all of them, best of --repeats. Float32 matrices
(the same weights dequantized: a float32 model's decode steps and prompts): F.linear (the BLAS)
and oneDNN against pagedkv/kernels/cpu/cpu_f32.c, which gives each row the same bits whatever its
batch. Attention in the model's shape with float32 queries over a float32
and a bfloat16 cache (every layer, --seqs sequences of --context positions; none with --seqs 0). With
AMX, attention over a bfloat16 cache in the model's shape (every layer,
--seqs sequences of --context positions in blocks of 16 scattered over the cache, bfloat16
queries): a decode step, and prompts of the same length, with the query-key products on AMX and
in vector FMAs. --no-amx turns AMX off (`set_amx`), so that a CPU with AMX measures the paths
of one without; the section is then "... without AMX".
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from pagedkv.kernels.cpu import ops as cpu_ops
from pagedkv.ablation.report import add_output_arguments, markdown_table, output_folder, publish

TITLE = "CPU kernels with and without AMX, SmolLM2-135M"
TITLE_NO_AMX = "CPU kernels without AMX, SmolLM2-135M"
BLOCK = 16


def log(message: str) -> None:
    print(f"[bench_cpu_kernels] {message}", file=sys.stderr, flush=True)


def ms(t: float) -> str:
    return f"{t:.1f}" if t >= 1 else f"{t:.3g}"


CLOCK = time.perf_counter  # --clock cpu: time.process_time, this process's CPU time (a shared machine)


def best_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = CLOCK()
        fn()
        times.append(CLOCK() - start)
    return min(times) * 1e3


def dense_rows(weights: list[torch.Tensor], rows: list[int], repeats: int) -> list[list[object]]:
    """One row per batch size: F.linear and oneDNN (weights prepacked) against cpu_f32.c over
    the model's float32 matrices."""
    import torch.nn.functional as F

    from pagedkv.runtime.models.llama import _PACK_BATCH

    packed = [torch.ops.mkldnn._reorder_linear_weight(w, _PACK_BATCH) for w in weights]
    table = []
    for m in rows:
        x = {w.shape[1]: torch.randn(m, w.shape[1]) for w in weights}
        blas = best_ms(lambda: [F.linear(x[w.shape[1]], w) for w in weights], repeats)
        onednn = best_ms(lambda: [torch.ops.mkldnn._linear_pointwise(x[w.shape[1]], p, None, "none", [], "")
                                  for w, p in zip(weights, packed)], repeats)
        own = best_ms(lambda: [cpu_ops.f32_linear(x[w.shape[1]], w) for w in weights], repeats)
        table.append([m, ms(blas), ms(onednn), ms(own), f"{min(blas, onednn) / own:.2f}x"])
        log(f"float32, {m} rows: F.linear {ms(blas)} ms, oneDNN {ms(onednn)} ms, cpu_f32.c {ms(own)} ms")
    return table


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


def attention_steps(config, seqs: int, context: int, cache_dtype: torch.dtype, query_dtype: torch.dtype) -> dict:
    """A decode step and prompts of --context rows, every layer, over a cache of `seqs` sequences
    whose blocks lie scattered (as a pool that has served a while leaves them)."""
    g = torch.Generator().manual_seed(0)
    per_seq = -(-context // BLOCK)
    heads, kv_heads, head_dim = config.num_heads, config.num_kv_heads, config.head_dim
    cache = torch.randn(seqs * per_seq + 1, config.num_layers, 2, BLOCK, kv_heads, head_dim, generator=g)
    cache = cache.to(cache_dtype)
    tables = torch.randperm(seqs * per_seq, generator=g).view(seqs, per_seq).int()
    lens = torch.full((seqs,), context, dtype=torch.int32)
    decode_q = torch.randn(seqs, heads, head_dim, generator=g).to(query_dtype)
    prompt_q = torch.randn(seqs * context, heads, head_dim, generator=g).to(query_dtype)
    starts = torch.arange(0, seqs * context + 1, context, dtype=torch.int32)
    scale = head_dim ** -0.5
    return {
        "decode step": lambda: [cpu_ops.paged_attention_decode(decode_q, cache, layer, tables, lens, scale)
                                for layer in range(config.num_layers)],
        "prompts": lambda: [cpu_ops.paged_attention_prefill(prompt_q, cache, layer, tables, starts, lens, scale)
                            for layer in range(config.num_layers)]}


def attention_rows(config, seqs: int, context: int, repeats: int) -> list[list[object]]:
    """Attention over a bfloat16 cache with bfloat16 queries, AMX's query-key products against FMAs."""
    table = []
    for what, fn in attention_steps(config, seqs, context, torch.bfloat16, torch.bfloat16).items():
        times = {}
        for amx in (False, True):
            cpu_ops.set_amx(amx)
            times[amx] = best_ms(fn, repeats)
        cpu_ops.set_amx(True)
        table.append([what, ms(times[False]), ms(times[True]), f"{times[False] / times[True]:.2f}x"])
        log(f"attention, {what}: vectors {ms(times[False])} ms, AMX {ms(times[True])} ms")
    return table


def cache_rows(config, seqs: int, context: int, repeats: int) -> list[list[object]]:
    """Float32 queries (a float32 model's) over a float32 cache and a bfloat16 one (the default
    for a model whose matrices stay quantized): the bytes every step reads, halved."""
    times: dict[str, dict[torch.dtype, float]] = {}
    for dtype in (torch.float32, torch.bfloat16):
        for what, fn in attention_steps(config, seqs, context, dtype, torch.float32).items():
            times.setdefault(what, {})[dtype] = best_ms(fn, repeats)
    table = []
    for what, t in times.items():
        table.append([what, ms(t[torch.float32]), ms(t[torch.bfloat16]),
                      f"{t[torch.float32] / t[torch.bfloat16]:.2f}x"])
        log(f"attention, float32 queries, {what}: float32 cache {ms(t[torch.float32])} ms, "
            f"bfloat16 cache {ms(t[torch.bfloat16])} ms")
    return table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="1,16,32,64,128,512,2900", help="batch sizes for the 4-bit matrices")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seqs", type=int, default=64, help="sequences for attention (0: no attention)")
    p.add_argument("--context", type=int, default=155, help="positions per sequence for attention")
    p.add_argument("--dense-rows", default="1,2,4,8,64,512",
                   help="batch sizes for the float32 matrices (F.linear, oneDNN, cpu_f32.c); empty: none")
    p.add_argument("--model", help="a GGUF file (default: the default model)")
    p.add_argument("--no-amx", action="store_true",
                   help="turn AMX off, so that a CPU with AMX measures the paths of one without")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: this process's CPU time (all its threads), steadier on a machine shared with other work")
    add_output_arguments(p)
    args = p.parse_args(argv)
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    rows = [int(r) for r in args.rows.split(",") if r.strip()]
    dense = [int(r) for r in args.dense_rows.split(",") if r.strip()]
    if (not rows or min(rows + dense) < 1 or args.threads < 1 or args.repeats < 1 or args.seqs < 0
            or args.context < 1):
        p.error("need batch sizes, threads, repeats and context of at least 1, and sequences of at least 0")
    if cpu_ops.library() is None:
        print("bench_cpu_kernels: the CPU kernels do not build here (no C compiler?)", file=sys.stderr)
        return 2
    if not cpu_ops.vnni_supported():
        print("bench_cpu_kernels: no AVX512-VNNI on this CPU; nothing to compare", file=sys.stderr)
        return 2
    had_amx = cpu_ops.amx_supported()
    if args.no_amx:
        cpu_ops.set_amx(False)
    try:
        return run(args, rows, dense, had_amx)
    finally:
        cpu_ops.set_amx(True)


def run(args, rows: list[int], dense: list[int], had_amx: bool) -> int:
    amx = cpu_ops.amx_supported()
    out = output_folder(args, "bench_cpu_kernels")
    torch.set_num_threads(args.threads)

    from pagedkv import default_model_path, load_model
    from pagedkv.runtime.models.llama import DualWeight, LlamaModel
    from pagedkv.runtime.models.quant import GroupQuantized, Int4Linear

    path = args.model or default_model_path()
    loaded = load_model(path, quantization="auto")
    model = LlamaModel(loaded.config, loaded.weights, torch.device("cpu"), torch.float32)
    # The matrices the 4-bit kernels take (a Q8_0 lm_head where AMX is missing takes cpu_q8.c).
    linears = [w for w in model.linear_weights()
               if isinstance(w, Int4Linear) and isinstance(w.packed, cpu_ops.PackedInt4)]
    whole = sum(isinstance(w, Int4Linear) and isinstance(w.packed, cpu_ops.PackedQ8) for w in model.linear_weights())
    with torch.inference_mode():
        matrices = matrix_rows(linears, rows, args.repeats)
        attention = attention_rows(loaded.config, args.seqs, args.context, args.repeats) if amx and args.seqs else None
        caches = cache_rows(loaded.config, args.seqs, args.context, args.repeats) if args.seqs else None
        float32 = None
        if dense and cpu_ops.library().f32_linear_supported():
            # A float32 model's few-row weights (plain, in huge pages), fused as the model runs them.
            linears.clear()
            del model
            dense_model = LlamaModel(loaded.config, loaded.weights, torch.device("cpu"), torch.float32,
                                     keep_quantized=False)
            weights = [w.plain for w in dense_model.linear_weights() if isinstance(w, DualWeight)]
            float32 = dense_rows(weights, dense, args.repeats)
    formats = ", ".join(sorted({w.fmt for w in loaded.weights.values() if isinstance(w, GroupQuantized)}))
    bf16 = ("on AMX (cpu_amx.c)" if amx else "AVX512-BF16 dot products (cpu_bf16.c)" if cpu_ops.int4_bf16_supported()
            else "rows converted to float32 (cpu_vnni.c)")
    where = ("with AMX" if amx else "AMX switched off (--no-amx)" if had_amx else "a CPU without AMX")
    clock = "CPU time of this process" if args.clock == "cpu" else "wall time"
    left_out = f" ({whole} with 8-bit codes whole, cpu_q8.c, left out)" if whole else ""
    body = (f"Model {path.rsplit('/', 1)[-1]} ({formats} kept as stored), {args.threads} thread(s), best of "
            f"{args.repeats} ({clock}), {where}; torch {torch.__version__}.\n\n"
            f"4-bit matrices, one pass over all of them{left_out} (ms):\n\n"
            + markdown_table(["rows", "float32 FMAs (cpu_int4.c)", "float32, integer products (cpu_vnni.c)",
                              f"bfloat16 {bf16}", "integer products' speed", "bfloat16's speed"], matrices))
    if float32:
        body += ("\n\nFloat32 matrices (the same weights dequantized: a float32 model's layers and lm_head, "
                 "in huge pages; cpu_f32.c gives each row the same bits whatever its batch) (ms):\n\n"
                 + markdown_table(["rows", "F.linear (the BLAS)", "oneDNN, prepacked", "cpu_f32.c",
                                   "cpu_f32.c's speed against the faster"], float32))
    if caches:
        body += (f"\n\nAttention with float32 queries over each cache type, every layer, {args.seqs} sequences of "
                 f"{args.context} positions in blocks of {BLOCK} scattered over the cache (ms):\n\n"
                 + markdown_table(["step", "float32 cache", "bfloat16 cache", "bfloat16's speed"], caches))
    if attention:
        body += (f"\n\nAttention over a bfloat16 cache, every layer, {args.seqs} sequences of {args.context} "
                 f"positions in blocks of {BLOCK}, bfloat16 queries (ms):\n\n"
                 + markdown_table(["step", "vector FMAs", "query-key products on AMX", "AMX's speed"], attention))
    print(body)
    publish(TITLE if amx else TITLE_NO_AMX, body, out, args.update_docs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
