"""The KV tiers below the device pool, built from the engine's settings: how large the host
tier is, and the disk tier under the model's fingerprint.

The fingerprint names everything that decides a block's bytes besides its tokens: the weights
(a digest of the model's files), the model's configuration, the cache's and the activations'
dtypes, the block size and layout, the rank's share of the KV heads, the device kind (GPU and
CPU kernels round differently), on the CPU the weights' mode (quantized or dequantized) and the
compiled kernels (a digest of their sources, flags and CPU: a change to their arithmetic is
another computation), and pagedkv's version. It is computed the same way in every process, so
that a restarted engine, or another engine with the same model, finds the blocks; any
difference is a different folder, never a wrong block.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
from pathlib import Path

import torch

from pagedkv.kernels.cpu.ops import build_name, cache_dir
from pagedkv.kvcache.cache_engine import GIB, CacheSpec
from pagedkv.kvcache.disk_tier import DiskTier
from pagedkv.kvcache.remote_tier import RemoteTier, redacted
from pagedkv.runtime.models.loader import LoadedModel

LAYOUT = "block-major-v1"  # [layers, K/V, block_size, kv_heads, head_dim] per block
log = logging.getLogger(__name__)


def _files_of(source: str) -> list[Path]:
    path = Path(source)
    if path.is_file():
        return [path]
    return sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf") or p.name == "config.json")


def files_digest(source: str) -> str:
    """A digest of the model's weight files, remembered per (path, size, mtime) in the user's
    cache folder so that it is computed once per file."""
    parts = []
    memo_path = cache_dir() / "file-digests.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    changed = False
    for path in _files_of(source):
        st = path.stat()
        key = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
        if key not in memo:
            h = hashlib.blake2b(digest_size=32)
            with open(path, "rb") as f:
                while chunk := f.read(1 << 23):
                    h.update(chunk)
            memo[key], changed = h.hexdigest(), True
        parts.append(memo[key])
    if changed:
        try:
            memo_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = memo_path.with_name(f".{memo_path.name}.{os.getpid()}")
            tmp.write_text(json.dumps(memo))
            os.replace(tmp, memo_path)
        except OSError:
            pass  # a cache of digests only: computed again next time
    return hashlib.blake2b("".join(parts).encode(), digest_size=32).hexdigest()


def model_fingerprint(loaded: LoadedModel, spec: CacheSpec, activations: torch.dtype, device: torch.device,
                      quantized: bool, rank: int = 0, world_size: int = 1) -> str:
    try:  # another version's kernels may round differently
        version = importlib.metadata.version("pagedkv")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    facts = {"weights": files_digest(loaded.source), "config": repr(loaded.config), "dtype": str(spec.dtype),
             "block_size": spec.block_size, "layout": LAYOUT, "kv_heads": spec.num_kv_heads,
             "head_dim": spec.head_dim, "layers": spec.num_layers, "rank": rank, "world_size": world_size,
             "device": device.type, "quantized": quantized, "pagedkv": version, "activations": str(activations),
             "cpu_kernels": build_name() if device.type == "cpu" else None}
    return hashlib.blake2b(json.dumps(facts, sort_keys=True).encode(), digest_size=32).hexdigest()


def available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def host_cache_bytes(gib: float | None, device: torch.device) -> int:
    """The host tier's size: `gib` when set; by default on a GPU a quarter of the free RAM (at
    most 64 GiB), and none on the CPU, where the device pool is host memory already."""
    if gib is not None:
        return int(gib * GIB)
    if device.type != "cuda":
        return 0
    return int(min(available_ram() / 4, 64 * GIB))


def build_disk_tier(directory: str, gib: float, loaded: LoadedModel, spec: CacheSpec, activations: torch.dtype,
                    device: torch.device, quantized: bool) -> DiskTier:
    tier = DiskTier(directory, int(gib * GIB), model_fingerprint(loaded, spec, activations, device, quantized),
                    block_bytes=spec.bytes_per_block)
    log.info("KV disk cache %s: %d blocks of this model found (%.2f of %.1f GiB)", directory, tier.num_blocks,
             tier.used_bytes / GIB, gib)
    return tier


def build_remote_tier(url: str, timeout_s: float, loaded: LoadedModel, spec: CacheSpec, activations: torch.dtype,
                      device: torch.device, quantized: bool) -> RemoteTier:
    tier = RemoteTier(url, model_fingerprint(loaded, spec, activations, device, quantized),
                      block_bytes=spec.bytes_per_block,
                      timeout_s=timeout_s)
    tier.lookup([b"\0" * 32])  # asks once now: an unreachable server is said at start
    log.info("KV remote tier %s (%s)", redacted(url), "answers" if tier.available else "does not answer yet")
    return tier
