"""Paged attention decode kernel on the GPU: achieved K/V bandwidth against the device's
peak and against torch's scaled_dot_product_attention on contiguous K/V of the same size,
plus the bandwidth of swap_blocks between the device pool and a pinned CPU pool.

    python -m tools.bench_attention [--quick] [--peak-gbs 3350] [--out DIR] [--update-docs]

Writes the table into --out (a fresh folder unless named), and with --update-docs into
docs/BENCHMARKS.md, section "Paged attention kernel (GPU)".
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import kernels
from tools.report import add_output_arguments, markdown_table, output_folder, publish

TITLE = "Paged attention kernel (GPU)"
PEAK_GBS = {"H200": 4800.0, "H100 SXM": 3350.0, "H100 PCIE": 2000.0, "H100 NVL": 3900.0,
            "A100-SXM4-80GB": 2039.0, "A100 80GB PCIE": 1935.0, "A100-SXM4-40GB": 1555.0,
            "A100-PCIE-40GB": 1555.0, "L40S": 864.0, "L4": 300.0, "RTX 4090": 1008.0}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def detect_peak(name: str) -> Optional[float]:
    """Peak DRAM bandwidth (GB/s) from the device name; a bare "H100" is the SXM part."""
    upper = name.upper()
    for key, gbs in PEAK_GBS.items():
        if key.upper() in upper:
            return gbs
    return PEAK_GBS["H100 SXM"] if "H100" in upper else None


def time_us(fn: Callable[[], object], repeats: int, inner: int = 10) -> float:
    """Median GPU time of one call, CUDA events around `inner` back-to-back calls. A sleep
    kernel first lets the host queue them all, so launch overhead does not leave gaps."""
    for _ in range(3):
        fn()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(5_000_000)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1000.0 / inner)
    return statistics.median(samples)


def bench_decode(args, batch: int, ctx: int, dtype: torch.dtype) -> Optional[list[object]]:
    hq, hkv, d, bs = args.heads, args.kv_heads, args.head_dim, args.block_size
    es = torch.tensor([], dtype=dtype).element_size()
    kv_bytes = batch * ctx * hkv * d * 2 * es
    blocks_per_seq = math.ceil(ctx / bs)
    if kv_bytes * 1.15 > torch.cuda.mem_get_info()[0]:
        return None  # does not fit (the SDPA baseline needs the same again, freed in between)
    gen = torch.Generator(device="cuda").manual_seed(0)
    cache = torch.empty(batch * blocks_per_seq, 1, 2, bs, hkv, d, dtype=dtype, device="cuda")
    cache.normal_(generator=gen)
    tables = torch.randperm(cache.shape[0], device="cuda", dtype=torch.int32).view(batch, blocks_per_seq)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    query = torch.randn(batch, hq, d, dtype=dtype, device="cuda", generator=gen)
    scale = d**-0.5
    paged = time_us(lambda: kernels.paged_attention_decode(query, cache, 0, tables, lens, scale), args.repeats)
    del cache, tables
    torch.cuda.empty_cache()
    k = torch.randn(batch, hkv, ctx, d, dtype=dtype, device="cuda", generator=gen)
    v = torch.randn_like(k)
    q4 = query.unsqueeze(2)
    sdpa = time_us(lambda: F.scaled_dot_product_attention(q4, k, v, scale=scale, enable_gqa=hq != hkv), args.repeats)
    del k, v
    torch.cuda.empty_cache()
    gbs, sdpa_gbs = kv_bytes / paged / 1e3, kv_bytes / sdpa / 1e3
    peak = f"{100 * gbs / args.peak_gbs:.0f}%" if args.peak_gbs else "n/a"
    return [ctx, batch, f"{kv_bytes / 2**20:.1f}", f"{paged:.1f}", f"{gbs:.0f}", peak,
            f"{sdpa:.1f}", f"{sdpa_gbs:.0f}", f"{sdpa / paged:.2f}"]


def bench_swap(args, dtype: torch.dtype) -> str:
    """Device -> pinned CPU and back through swap_blocks: one kernel per direction."""
    shape = (args.swap_blocks, args.layers, 2, args.block_size, args.kv_heads, args.head_dim)
    device_pool = torch.randn(shape, device="cuda").to(dtype)
    cpu_pool = torch.empty(shape, dtype=dtype).pin_memory()
    n = args.swap_blocks // 2  # every other block: a gather, not one contiguous range
    pairs = torch.stack([torch.arange(0, 2 * n, 2), torch.randperm(args.swap_blocks)[:n]], dim=1).cuda()
    back = pairs.flip(1).contiguous()
    moved = n * device_pool[0].numel() * device_pool.element_size()
    out_us = time_us(lambda: kernels.swap_blocks(device_pool, cpu_pool, pairs), max(3, args.repeats // 4), inner=2)
    in_us = time_us(lambda: kernels.swap_blocks(cpu_pool, device_pool, back), max(3, args.repeats // 4), inner=2)
    block_mib = device_pool[0].numel() * device_pool.element_size() / 2**20
    return (f"swap_blocks, {n} blocks of {block_mib:.2f} MiB ({moved / 2**20:.0f} MiB): "
            f"device -> pinned CPU {moved / out_us / 1e3:.1f} GB/s, "
            f"pinned CPU -> device {moved / in_us / 1e3:.1f} GB/s")


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    p.add_argument("--peak-gbs", type=float, default=None, help="device peak bandwidth, GB/s (default: from the device name)")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--layers", type=int, default=32, help="layers per block, for the swap test")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float16")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--swap-blocks", type=int, default=None, help="blocks in each pool for the swap test")
    add_output_arguments(p)
    args = p.parse_args(argv)
    if not kernels.cuda_available():
        print("bench_attention: no CUDA device (or cupy is not installed): nothing to measure, skipped.")
        return 0
    name = torch.cuda.get_device_name()
    args.peak_gbs = args.peak_gbs or detect_peak(name)
    args.repeats = args.repeats or (5 if args.quick else 20)
    args.swap_blocks = args.swap_blocks or (64 if args.quick else 256)
    dtype = DTYPES[args.dtype]
    contexts = [512, 4096, 32768] if args.quick else [512, 1024, 2048, 4096, 8192, 16384, 32768]
    batches = [1, 16, 256] if args.quick else [1, 4, 16, 64, 256]
    rows, skipped = [], []
    for ctx in contexts:
        for batch in batches:
            row = bench_decode(args, batch, ctx, dtype)
            if row is None:
                skipped.append(f"{batch}x{ctx}")
                continue
            rows.append(row)
            print(" | ".join(str(c) for c in row), flush=True)
    header = ["context", "batch", "K/V MiB", "paged us", "paged GB/s", "of peak",
              "SDPA us", "SDPA GB/s", "SDPA time / paged"]
    peak = f"{args.peak_gbs:.0f} GB/s" if args.peak_gbs else "unknown (pass --peak-gbs)"
    body = (f"Decode, one query token per sequence: {args.heads} query heads, {args.kv_heads} KV heads, "
            f"head dim {args.head_dim}, {args.dtype}, block size {args.block_size}; bandwidth = bytes of K and V "
            f"read / kernel time (median of {args.repeats} CUDA-event timings). Peak: {peak}. SDPA: "
            f"torch scaled_dot_product_attention on contiguous K/V of the same size.\n\n"
            + markdown_table(header, rows)
            + (f"\n\nSkipped (do not fit in GPU memory): {', '.join(skipped)}." if skipped else "")
            + "\n\n" + bench_swap(args, dtype) + ".")
    print(body)
    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    publish(TITLE, body, output_folder(args, "bench_attention"), args.update_docs,
            machine=f"{name}, {total:.0f} GiB, torch {torch.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
