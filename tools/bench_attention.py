"""Paged attention kernels on the GPU against torch's scaled_dot_product_attention (flash)
on contiguous K/V of the same shapes, in one run, plus swap bandwidth:

- decode (one query token per sequence): K/V bytes read / kernel time, as GB/s and % of the
  device's peak, and SDPA's time over the paged kernel's (1.0 = as fast);
- prefill (causal, the same tokens in both): TFLOP/s and the ratio to SDPA;
- swap_blocks between the device pool and a pinned CPU pool against a plain pinned `copy_`
  of the same bytes.

Both dtypes (float16, bfloat16) and block sizes 1, 16 and 128, 32 query heads over 8 KV heads
of dim 128 unless told otherwise.

    python -m tools.bench_attention [--quick] [--out DIR] [--update-docs] [--peak-gbs 4800]

Writes decode.csv, prefill.csv, results.json and summary.md into --out (a fresh folder unless
named); docs/BENCHMARKS.md only with --update-docs.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from pagedkv import kernels
from pagedkv.ablation.report import add_output_arguments, markdown_table, output_folder, write_section

TITLE = "Paged attention kernels (GPU)"
PEAK_GBS = {"H200": 4800.0, "H100 SXM": 3350.0, "H100 PCIE": 2000.0, "H100 NVL": 3900.0,
            "A100-SXM4-80GB": 2039.0, "A100 80GB PCIE": 1935.0, "A100-SXM4-40GB": 1555.0,
            "A100-PCIE-40GB": 1555.0, "L40S": 864.0, "L4": 300.0, "RTX 4090": 1008.0}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
BLOCK_SIZES = (1, 16, 128)
# (batch, context) for decode and (batch, prompt length) for prefill.
DECODE_SHAPES = {"quick": [(1, 512), (1, 32768), (16, 8192), (256, 2048)],
                 "full": [(1, 512), (1, 8192), (1, 32768), (4, 8192), (16, 1024), (16, 8192), (16, 32768),
                          (64, 4096), (256, 1024), (256, 4096)]}
PREFILL_SHAPES = {"quick": [(1, 4096), (8, 1024)],
                  "full": [(1, 1024), (1, 4096), (1, 16384), (8, 1024), (8, 4096), (32, 512)]}


@dataclass
class DecodeRow:
    dtype: str
    block_size: int
    batch: int
    context: int
    kv_mib: float
    paged_us: float
    paged_gbs: float
    of_peak: Optional[float]  # fraction of the peak bandwidth
    sdpa_us: float
    sdpa_gbs: float
    sdpa_time_over_paged: float  # >= 0.85 is the target where the GPU is full


@dataclass
class PrefillRow:
    dtype: str
    block_size: int
    batch: int
    tokens: int
    paged_us: float
    paged_tflops: float
    sdpa_us: float
    sdpa_tflops: float
    paged_over_sdpa: float  # throughput ratio; >= 0.7 is the target


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


SDPA_FALLBACKS: list[str] = []  # shapes where the flash backend refused and torch chose


def sdpa(q, k, v, causal: bool, scale: float) -> torch.Tensor:
    """q [B, Hq, L, D], k/v [B, Hkv, S, D] with the flash backend (GQA included) where it
    takes the shapes, else torch's own choice (recorded in SDPA_FALLBACKS)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gqa = q.shape[1] != k.shape[1]
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa)
    except RuntimeError:
        SDPA_FALLBACKS.append(f"{tuple(q.shape)} x {tuple(k.shape)} causal={causal}")
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa)


def paged_cache(batch: int, ctx: int, block_size: int, hkv: int, d: int, dtype: torch.dtype):
    """A one-layer pool holding `batch` sequences of `ctx` tokens in shuffled blocks."""
    per_seq = math.ceil(ctx / block_size)
    cache = torch.empty(batch * per_seq, 1, 2, block_size, hkv, d, dtype=dtype, device="cuda").normal_()
    tables = torch.randperm(cache.shape[0], device="cuda", dtype=torch.int32).view(batch, per_seq)
    return cache, tables


def fits(nbytes: int) -> bool:
    return nbytes * 1.3 < torch.cuda.mem_get_info()[0]


def bench_decode(args, dtype_name: str, batch: int, ctx: int) -> list[DecodeRow]:
    dtype, hq, hkv, d = DTYPES[dtype_name], args.heads, args.kv_heads, args.head_dim
    kv_bytes = batch * ctx * hkv * d * 2 * torch.finfo(dtype).bits // 8
    if not fits(kv_bytes):
        return []
    query = torch.randn(batch, hq, d, dtype=dtype, device="cuda")
    scale = d**-0.5
    k = torch.randn(batch, hkv, ctx, d, dtype=dtype, device="cuda")
    v = torch.randn_like(k)
    q4 = query.unsqueeze(2)
    sdpa_us = time_us(lambda: sdpa(q4, k, v, False, scale), args.repeats)
    del k, v
    rows = []
    for bs in BLOCK_SIZES:
        cache, tables = paged_cache(batch, ctx, bs, hkv, d, dtype)
        lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
        paged_us = time_us(lambda: kernels.paged_attention_decode(query, cache, 0, tables, lens, scale), args.repeats)
        del cache, tables
        gbs = kv_bytes / paged_us / 1e3
        rows.append(DecodeRow(dtype_name, bs, batch, ctx, round(kv_bytes / 2**20, 1), round(paged_us, 1),
                              round(gbs), round(gbs / args.peak_gbs, 3) if args.peak_gbs else None,
                              round(sdpa_us, 1), round(kv_bytes / sdpa_us / 1e3), round(sdpa_us / paged_us, 2)))
        print(f"decode  {dtype_name:8} bs={bs:<3} batch={batch:<3} ctx={ctx:<5} paged {paged_us:8.1f} us "
              f"{gbs:6.0f} GB/s | SDPA {sdpa_us:8.1f} us | SDPA/paged time {sdpa_us / paged_us:.2f}", flush=True)
    torch.cuda.empty_cache()
    return rows


def bench_prefill(args, dtype_name: str, batch: int, length: int) -> list[PrefillRow]:
    """Fresh prompts: the paged kernel reads the prompt's K/V back from the cache (written
    there first, as the engine does) and SDPA takes the same Q, K, V contiguous, causal."""
    dtype, hq, hkv, d = DTYPES[dtype_name], args.heads, args.kv_heads, args.head_dim
    if not fits(batch * length * (hq + 4 * hkv) * d * 2 * 3):
        return []
    scale = d**-0.5
    q = torch.randn(batch, hq, length, d, dtype=dtype, device="cuda")
    k = torch.randn(batch, hkv, length, d, dtype=dtype, device="cuda")
    v = torch.randn_like(k)
    flops = 4 * batch * hq * d * length * (length + 1) / 2  # QK^T and PV over the causal half
    sdpa_us = time_us(lambda: sdpa(q, k, v, True, scale), args.repeats, inner=3)
    query = q.transpose(1, 2).reshape(batch * length, hq, d)
    starts = torch.arange(0, batch * length + 1, length, dtype=torch.int32, device="cuda")
    lens = torch.full((batch,), length, dtype=torch.int32, device="cuda")
    rows = []
    for bs in BLOCK_SIZES:
        cache, tables = paged_cache(batch, length, bs, hkv, d, dtype)
        pos = torch.arange(length, device="cuda")
        slots = (tables.long()[:, pos // bs] * bs + pos % bs).reshape(-1)
        kernels.reshape_and_cache(k.transpose(1, 2).reshape(-1, hkv, d), v.transpose(1, 2).reshape(-1, hkv, d),
                                  cache, 0, slots)
        paged_us = time_us(lambda: kernels.paged_attention_prefill(query, cache, 0, tables, starts, lens, scale),
                           args.repeats, inner=3)
        del cache, tables
        tf, sdpa_tf = flops / paged_us / 1e6, flops / sdpa_us / 1e6
        rows.append(PrefillRow(dtype_name, bs, batch, length, round(paged_us, 1), round(tf, 1),
                               round(sdpa_us, 1), round(sdpa_tf, 1), round(tf / sdpa_tf, 2)))
        print(f"prefill {dtype_name:8} bs={bs:<3} batch={batch:<3} len={length:<5} paged {paged_us:9.1f} us "
              f"{tf:6.1f} TFLOP/s | SDPA {sdpa_us:9.1f} us {sdpa_tf:6.1f} TFLOP/s | ratio {tf / sdpa_tf:.2f}",
              flush=True)
    torch.cuda.empty_cache()
    return rows


def bench_swap(args, dtype: torch.dtype) -> dict:
    """swap_blocks (one kernel per direction, every other block: a gather) against a plain
    `copy_` of the same number of bytes between contiguous device and pinned buffers."""
    shape = (args.swap_blocks, args.layers, 2, 16, args.kv_heads, args.head_dim)
    device_pool = torch.randn(shape, device="cuda").to(dtype)
    cpu_pool = torch.empty(shape, dtype=dtype).pin_memory()
    n = args.swap_blocks // 2
    pairs = torch.stack([torch.arange(0, 2 * n, 2), torch.randperm(args.swap_blocks)[:n]], dim=1).cuda()
    back = pairs.flip(1).contiguous()
    moved = n * device_pool[0].numel() * device_pool.element_size()
    flat_dev, flat_cpu = device_pool[:n].reshape(-1), cpu_pool[:n].reshape(-1)
    reps = max(3, args.repeats // 2)
    out_us = time_us(lambda: kernels.swap_blocks(device_pool, cpu_pool, pairs), reps, inner=2)
    in_us = time_us(lambda: kernels.swap_blocks(cpu_pool, device_pool, back), reps, inner=2)
    copy_out_us = time_us(lambda: flat_cpu.copy_(flat_dev, non_blocking=True), reps, inner=2)
    copy_in_us = time_us(lambda: flat_dev.copy_(flat_cpu, non_blocking=True), reps, inner=2)
    gbs = lambda us: round(moved / us / 1e3, 1)  # noqa: E731
    return {"blocks": n, "block_mib": round(device_pool[0].numel() * device_pool.element_size() / 2**20, 2),
            "mib": round(moved / 2**20), "swap_out_gbs": gbs(out_us), "swap_in_gbs": gbs(in_us),
            "copy_out_gbs": gbs(copy_out_us), "copy_in_gbs": gbs(copy_in_us)}


def summary(meta: dict, decode: list[DecodeRow], prefill: list[PrefillRow], swap: dict) -> str:
    peak = f"{meta['peak_gbs']:.0f} GB/s" if meta["peak_gbs"] else "unknown (pass --peak-gbs)"
    dec = [[r.dtype, r.block_size, r.batch, r.context, r.kv_mib, r.paged_us, r.paged_gbs,
            f"{100 * r.of_peak:.0f}%" if r.of_peak is not None else "n/a", r.sdpa_us, r.sdpa_gbs,
            r.sdpa_time_over_paged] for r in decode]
    pre = [[r.dtype, r.block_size, r.batch, r.tokens, r.paged_us, r.paged_tflops, r.sdpa_us, r.sdpa_tflops,
            r.paged_over_sdpa] for r in prefill]
    return (f"{meta['heads']} query heads, {meta['kv_heads']} KV heads, head dim {meta['head_dim']}; median of "
            f"{meta['repeats']} CUDA-event timings. SDPA: torch scaled_dot_product_attention, flash backend, on "
            f"contiguous K/V of the same shapes, measured in the same run"
            + (f" (torch's own backend where flash refused: {'; '.join(meta['sdpa_not_flash'])})"
               if meta.get("sdpa_not_flash") else "") + ".\n\n"
            f"Decode, one query token per sequence; bandwidth = bytes of K and V read / kernel time; "
            f"peak {peak}. Targets (batch >= 16 or context >= 8k): >= 80% of peak and SDPA time / paged "
            f">= 0.85.\n\n"
            + markdown_table(["dtype", "block", "batch", "context", "K/V MiB", "paged us", "paged GB/s", "of peak",
                              "SDPA us", "SDPA GB/s", "SDPA time / paged"], dec)
            + "\n\nPrefill, fresh causal prompts, K/V read back from the paged cache; FLOPs of the causal half. "
              "Target: paged / SDPA >= 0.7.\n\n"
            + markdown_table(["dtype", "block", "batch", "tokens", "paged us", "paged TFLOP/s", "SDPA us",
                              "SDPA TFLOP/s", "paged / SDPA"], pre)
            + f"\n\nSwap, {swap['blocks']} blocks of {swap['block_mib']} MiB ({swap['mib']} MiB, every other block) "
              f"between the device pool and pinned CPU memory: swap_blocks {swap['swap_out_gbs']} GB/s out, "
              f"{swap['swap_in_gbs']} GB/s in; plain pinned copy_ of the same bytes {swap['copy_out_gbs']} GB/s "
              f"out, {swap['copy_in_gbs']} GB/s in.")


def write_results(out: Path, meta: dict, decode: list[DecodeRow], prefill: list[PrefillRow], swap: dict,
                  text: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, rows, cls in (("decode.csv", decode, DecodeRow), ("prefill.csv", prefill, PrefillRow)):
        with open(out / name, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(cls.__dataclass_fields__))
            writer.writeheader()
            writer.writerows(asdict(r) for r in rows)
    results = {"meta": meta, "decode": [asdict(r) for r in decode], "prefill": [asdict(r) for r in prefill],
               "swap": swap}
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "summary.md").write_text(text + "\n")


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer shapes and repeats (about a minute on an H200)")
    add_output_arguments(p)
    p.add_argument("--peak-gbs", type=float, default=None, help="device peak bandwidth, GB/s (default: from its name)")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=sorted(DTYPES), action="append", help="repeatable (default: both)")
    p.add_argument("--layers", type=int, default=32, help="layers per block, for the swap test")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--swap-blocks", type=int, default=None, help="blocks in each pool for the swap test")
    args = p.parse_args(argv)
    if not kernels.cuda_available():
        print("bench_attention: needs a CUDA device and cupy (pip install -e '.[gpu]'); none found", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name()
    args.peak_gbs = args.peak_gbs or detect_peak(name)
    args.repeats = args.repeats or (5 if args.quick else 20)
    args.swap_blocks = args.swap_blocks or (64 if args.quick else 256)
    mode = "quick" if args.quick else "full"
    dtypes = args.dtype or list(DTYPES)
    torch.manual_seed(0)
    started = datetime.datetime.now()
    decode = [r for dt in dtypes for b, c in DECODE_SHAPES[mode] for r in bench_decode(args, dt, b, c)]
    prefill = [r for dt in dtypes for b, n in PREFILL_SHAPES[mode] for r in bench_prefill(args, dt, b, n)]
    swap = bench_swap(args, DTYPES[dtypes[0]])
    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    meta = {"device": name, "memory_gib": round(total), "torch": torch.__version__, "peak_gbs": args.peak_gbs,
            "mode": mode, "heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim,
            "repeats": args.repeats, "date": started.date().isoformat(),
            "sdpa_not_flash": sorted(set(SDPA_FALLBACKS)),
            "seconds": round((datetime.datetime.now() - started).total_seconds(), 1)}
    text = summary(meta, decode, prefill, swap)
    print(text)
    out = output_folder(args, "bench_attention")
    write_results(out, meta, decode, prefill, swap, text)
    print(f"wrote {out}/ (decode.csv, prefill.csv, results.json, summary.md) in {meta['seconds']} s")
    if args.update_docs:
        write_section(TITLE, text, machine=f"{name}, {total:.0f} GiB, torch {torch.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
