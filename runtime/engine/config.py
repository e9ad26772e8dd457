"""Engine settings, their command-line flags, and building the engine's parts from them."""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, fields

import torch

from kvcache.block_manager import BlockManager
from kvcache.cache_engine import GIB, CacheEngine, CacheSpec
from preemption.policy import MODES, CostModel, PreemptionPolicy
from preemption.scheduler import Scheduler, SchedulerConfig
from runtime.engine.executor import ModelExecutor
from runtime.models.llama import LlamaModel, cpu_has_bfloat16
from runtime.models.loader import QUANTIZATION, LoadedModel, load_model

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
log = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    model: str | None = None              # HF folder or .gguf file; None = SmolLM2-135M-Instruct
    device: str | None = None             # "cuda" or "cpu"; None = cuda when available
    dtype: str | None = None              # None = bfloat16 on CUDA, float32 on CPU
    quantization: str = "auto"            # auto: a GGUF file's 4/8-bit matrices stay so on the CPU
    block_size: int = 16
    num_device_blocks: int | None = None  # overrides the memory budget below
    kv_cache_gib: float = 1.0             # KV cache size on the CPU
    gpu_memory_utilization: float = 0.9
    swap_space_gib: float = 4.0
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 4096
    preemption_mode: str = "auto"
    watermark: float = 0.01

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size > 256:
            raise ValueError(f"block_size must be in 1..256, got {self.block_size}")
        if self.preemption_mode not in MODES:
            raise ValueError(f"preemption_mode must be one of {', '.join(MODES)}, got {self.preemption_mode!r}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.quantization not in QUANTIZATION:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION)}, got {self.quantization!r}")
        if self.num_device_blocks is not None and self.num_device_blocks < 1:
            raise ValueError(f"num_device_blocks must be >= 1, got {self.num_device_blocks}")
        if self.kv_cache_gib <= 0 or self.swap_space_gib < 0:
            raise ValueError("kv_cache_gib must be > 0 and swap_space_gib >= 0")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")

    def torch_device(self) -> torch.device:
        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def keeps_quantized(self) -> bool:
        """Whether quantized GGUF matrices run quantized: auto on the CPU (torch's kernels are CPU ones)."""
        return self.quantization == "auto" and self.torch_device().type == "cpu"

    def torch_dtype(self) -> torch.dtype:
        if self.dtype:
            return DTYPES[self.dtype]
        return torch.bfloat16 if self.torch_device().type == "cuda" else torch.float32

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        add = parser.add_argument
        add("--model", help="Hugging Face folder or .gguf file (default: SmolLM2-135M-Instruct)")
        add("--device", choices=["cuda", "cpu"])
        add("--dtype", choices=list(DTYPES),
            help="default: bfloat16 on CUDA, float32 on the CPU; bfloat16 on a CPU needs native support")
        add("--quantization", choices=list(QUANTIZATION), default="auto",
            help="auto (default): on the CPU a GGUF file's Q4_0/Q4_1/Q4_K/Q8_0 matrices stay quantized; "
                 "none: dequantize them to the dtype (the exactness reference)")
        add("--block-size", type=int, default=16, help="tokens per KV block (default 16)")
        group = parser.add_mutually_exclusive_group()
        group.add_argument("--num-device-blocks", type=int, help="KV blocks in the device pool")
        group.add_argument("--kv-cache-gib", type=float, default=1.0, help="KV cache size on the CPU (GiB)")
        add("--gpu-memory-utilization", type=float, default=0.9)
        add("--swap-space-gib", type=float, default=4.0, help="CPU swap pool for preemption (GiB)")
        add("--max-num-seqs", type=int, default=256)
        add("--max-num-batched-tokens", type=int, default=4096)
        add("--preemption-mode", choices=list(MODES), default="auto")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "EngineConfig":
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})


@dataclass
class EngineParts:
    loaded: LoadedModel
    block_manager: BlockManager
    cache: CacheEngine
    scheduler: Scheduler
    executor: ModelExecutor
    cost: CostModel


def _num_device_blocks(config: EngineConfig, spec: CacheSpec, device: torch.device) -> int:
    if config.num_device_blocks:
        return config.num_device_blocks
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = free - (1 - config.gpu_memory_utilization) * total
        return max(spec.blocks_for_bytes(budget), 0)
    return spec.blocks_for_bytes(config.kv_cache_gib * GIB)


def build_engine_parts(config: EngineConfig, loaded: LoadedModel | None = None) -> EngineParts:
    device, dtype = config.torch_device(), config.torch_dtype()
    if device.type == "cpu" and dtype == torch.bfloat16 and not cpu_has_bfloat16():
        raise ValueError("dtype bfloat16 needs a CPU with native bfloat16 (avx512_bf16 or amx_bf16); "
                         "this one has none: use float32")
    keep = config.keeps_quantized()
    loaded = loaded or load_model(config.model, quantization="auto" if keep else "none")
    cfg = loaded.config
    model = LlamaModel(cfg, loaded.weights, device, dtype, keep_quantized=keep)
    log.info("model %s on %s: %s", loaded.source, device, model.describe())
    spec = CacheSpec(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, config.block_size, dtype)
    num_device = _num_device_blocks(config, spec, device)
    if num_device < 1:
        raise ValueError("no memory is left for the KV cache: lower the model size or raise the budget")
    num_cpu = spec.blocks_for_bytes(config.swap_space_gib * GIB)
    cache = CacheEngine(spec, num_device, num_cpu, device)
    bm = BlockManager(config.block_size, num_device, num_cpu, config.watermark)
    cost = CostModel()
    policy = PreemptionPolicy(config.preemption_mode, cost, spec.bytes_per_block)
    scheduler = Scheduler(SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens,
                                          config.preemption_mode), bm, policy)
    return EngineParts(loaded, bm, cache, scheduler, ModelExecutor(model, cache, cost), cost)
