"""The GPU throughput benchmark of tools.bench_throughput (its path when CUDA is used).

One workload, all requests arriving at t = 0: N requests (256 by default), long-tailed prompt
lengths (log-normal, median about 200, at most 1024 tokens), 128 new tokens each, greedy,
no EOS stop. Three ways on the same model and the same requests, in one run:

- pagedkv: LLMEngine (CUDA graphs for decode unless --enforce-eager), max_num_seqs 256;
- transformers `generate_batch`: its continuous batching over a paged cache;
- transformers `generate`: static left-padded batches of 64.

Then the decode step of the engine alone at batch 1, 32 and 256 (prompts of 200 tokens;
median over decode-only steps, synchronised), with the step profile at the largest batch.
The model is a named random shape built in memory (`--random-model llama-1b`, no downloads)
or a Hugging Face folder (`--model`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pagedkv import EngineConfig, LLMEngine, LoadedModel, SamplingParams
from pagedkv.runtime.models.families import hf_config
from pagedkv.ablation.report import markdown_table, write_section
from pagedkv.ablation.workload import WorkloadRequest, describe, make_workload

TITLE = "Throughput on a GPU: pagedkv vs transformers generate_batch and generate"
# Named random shapes (transformers LlamaConfig arguments).
SHAPES = {
    "llama-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=64, intermediate_size=8192, vocab_size=32000, max_position_embeddings=2048),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=16, intermediate_size=128, vocab_size=512, max_position_embeddings=1280),
}
PROMPT_MEDIAN, PROMPT_MAX, NEW_TOKENS, STATIC_BATCH = 200, 1024, 128, 64
SIGMA = 0.9  # the mean of a log-normal is its median * exp(sigma^2 / 2)
TARGET_TOKENS_PER_S, TARGET_VS_GENERATE_BATCH = 20000, 10.0


@dataclass
class Way:
    name: str
    tokens: int = 0
    seconds: float = 0.0
    error: str | None = None

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds if self.seconds and not self.error else float("nan")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_model(shape: str, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """(LoadedModel for the engine, transformers model) sharing one set of random weights."""
    import transformers

    config = transformers.LlamaConfig(**SHAPES[shape], bos_token_id=None, eos_token_id=None, pad_token_id=None,
                                      tie_word_embeddings=False)
    before = torch.get_default_dtype()
    torch.manual_seed(seed)
    try:
        torch.set_default_dtype(dtype)
        with torch.device(device):
            model = transformers.LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(before)
    model.generation_config.eos_token_id = None
    weights = {k: v.detach() for k, v in model.state_dict().items()}
    loaded = LoadedModel(hf_config({**config.to_dict(), "architectures": ["LlamaForCausalLM"]}), weights, None,
                         f"random {shape}")
    return loaded, model


def folder_model(path: str, device: torch.device, dtype: torch.dtype):
    import transformers

    from pagedkv import load_model

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    return load_model(path), model


def workload(num_requests: int, vocab: int, seed: int) -> list[WorkloadRequest]:
    mean = PROMPT_MEDIAN * math.exp(SIGMA ** 2 / 2)
    requests = make_workload(num_requests, vocab, seed=seed, prompt_mean=mean, max_prompt=PROMPT_MAX,
                             sigma=SIGMA)
    return [dataclasses.replace(r, output_len=NEW_TOKENS) for r in requests]


def new_engine(loaded: LoadedModel, device: torch.device, dtype: str, max_num_seqs: int, blocks: int,
               enforce_eager: bool, profile: bool = False, async_scheduling: bool = False) -> LLMEngine:
    return LLMEngine(EngineConfig(device=device.type, dtype=dtype, num_device_blocks=blocks, swap_space_gib=0.05,
                                  max_num_seqs=max_num_seqs, max_num_batched_tokens=8192,
                                  enforce_eager=enforce_eager, profile_steps=profile,
                                  async_scheduling=async_scheduling), loaded)


def blocks_for(requests: list[WorkloadRequest], block_size: int = 16) -> int:
    """Room for every request at once: nothing is preempted."""
    return sum(-(-(len(r.prompt_ids) + r.output_len) // block_size) + 1 for r in requests) + 16


def run_pagedkv(engine: LLMEngine, requests: list[WorkloadRequest], device: torch.device,
                name: str = "pagedkv") -> Way:
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    sync(device)
    start = time.perf_counter()
    for r in requests:
        engine.add_request(r.request_id, r.prompt_ids, params, stream=False)
    tokens = 0
    while engine.has_unfinished():
        tokens += sum(len(o.outputs[0].token_ids) for o in engine.step() if o.finished)
    sync(device)
    return Way(name, tokens, time.perf_counter() - start)


def run_generate_batch(model, requests: list[WorkloadRequest], device: torch.device) -> Way:
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
    way = Way("transformers generate_batch")
    try:
        model.generate_batch(inputs=[r.prompt_ids for r in requests[:4]], generation_config=config,
                             progress_bar=False)  # warm-up, untimed
        sync(device)
        start = time.perf_counter()
        out = model.generate_batch(inputs=[r.prompt_ids for r in requests], generation_config=config,
                                   progress_bar=False)
        sync(device)
        way.seconds = time.perf_counter() - start
        way.tokens = sum(len(o.generated_tokens) for o in out.values())
    except Exception as e:  # an API that moved between versions must not sink the other figures
        way.error = f"{type(e).__name__}: {e}"
    return way


def run_generate(model, requests: list[WorkloadRequest], device: torch.device, batch: int = STATIC_BATCH) -> Way:
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                              eos_token_id=None, pad_token_id=0)

    def one(chunk: list[WorkloadRequest]) -> int:
        width = max(len(r.prompt_ids) for r in chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, r in enumerate(chunk):
            ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids):] = 1
        with torch.inference_mode():
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
        return (out.shape[1] - width) * len(chunk)

    way = Way(f"transformers generate, static batches of {batch}")
    try:
        one(requests[:2])  # warm-up, untimed
        sync(device)
        start = time.perf_counter()
        for first in range(0, len(requests), batch):
            way.tokens += one(requests[first:first + batch])
        sync(device)
        way.seconds = time.perf_counter() - start
    except Exception as e:
        way.error = f"{type(e).__name__}: {e}"
    return way


def decode_step_ms(loaded: LoadedModel, device: torch.device, dtype: str, batch: int, steps: int, seed: int,
                   enforce_eager: bool, profile: bool = False) -> tuple[float, str | None]:
    """Median wall ms of the decode-only steps of `batch` requests (prompts of PROMPT_MEDIAN
    tokens); with `profile`, also the step profile's report."""
    gen = torch.Generator().manual_seed(seed)
    vocab = loaded.config.vocab_size
    prompts = torch.randint(100, vocab, (batch, PROMPT_MEDIAN), generator=gen).tolist()
    blocks = batch * (-(-(PROMPT_MEDIAN + steps + 2) // 16) + 1) + 16
    engine = new_engine(loaded, device, dtype, batch, blocks, enforce_eager, profile)
    params = SamplingParams(max_tokens=steps + 1, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params, stream=False)
    times = []
    while engine.has_unfinished():
        decode_only = not engine.scheduler.waiting and all(not g.is_prefilling for g in engine.scheduler.running)
        sync(device)
        start = time.perf_counter()
        engine.step()
        sync(device)
        if decode_only:
            times.append(time.perf_counter() - start)
    report = engine.profile.report() if profile else None
    del engine
    return 1e3 * statistics.median(times[1:] or times), report


def body(ways: list[Way], steps_ms: dict[int, float], profile: str | None, requests: list[WorkloadRequest],
         shape: str, device: torch.device, enforce_eager: bool) -> str:
    ours = ways[0]
    rows = [[w.name, w.tokens, f"{w.seconds:.2f}", f"**{w.rate:.0f}**" if not w.error else f"failed: {w.error[:120]}",
             f"{ours.rate / w.rate:.2f}x" if not w.error and not ours.error else ""] for w in ways]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    text = [f"Model: {shape}, bfloat16 on {name} (torch {torch.__version__}). Workload: {describe(requests)}; "
            f"all arrive at t = 0; greedy, no EOS stop. pagedkv: CUDA graphs for decode "
            f"{'off (--enforce-eager)' if enforce_eager else 'on'}, max_num_seqs 256. Throughput = generated "
            f"tokens / wall seconds (synchronised).", "",
            markdown_table(["way", "tokens", "seconds", "tokens/s", "pagedkv / this"], rows), "",
            markdown_table(["decode batch", "step ms (median)"], [[b, f"{ms:.2f}"] for b, ms in steps_ms.items()])]
    gb = ways[1]
    targets = [["pagedkv tokens/s", f"{ours.rate:.0f}", f">= {TARGET_TOKENS_PER_S}"],
               ["pagedkv / generate_batch", "" if gb.error else f"{ours.rate / gb.rate:.1f}x",
                f">= {TARGET_VS_GENERATE_BATCH:.0f}x"]]
    if 256 in steps_ms:
        targets.append(["decode step, batch 256", f"{steps_ms[256]:.2f} ms", "<= 4 ms"])
    if 1 in steps_ms:
        targets.append(["time per output token, batch 1", f"{steps_ms[1]:.2f} ms", "<= 3 ms"])
    text += ["", markdown_table(["target", "measured", "goal"], targets)]
    if profile:
        text += ["", f"Step profile at batch {max(steps_ms)} (`--profile-steps`: every phase synchronised, so "
                 f"the total exceeds the unprofiled step):", "", "```", profile, "```"]
    return "\n".join(text)


def main_gpu(args) -> None:
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype_name = "bfloat16" if dtype == torch.bfloat16 else "float32"
    started = time.monotonic()
    if args.model:
        loaded, model = folder_model(args.model, device, dtype)
        shape = args.model
    else:
        loaded, model = random_model(args.random_model, device, dtype, args.seed)
        shape = f"random {args.random_model}"
    num_requests = args.num_requests or (64 if args.quick else 256)
    requests = workload(num_requests, loaded.config.vocab_size, args.seed)
    print(describe(requests), flush=True)
    runs = []
    for async_scheduling in (False, True):  # the same requests with the host's work beside the GPU's
        engine = new_engine(loaded, device, dtype_name, 256, blocks_for(requests), args.enforce_eager,
                            async_scheduling=async_scheduling)
        run_pagedkv(engine, [dataclasses.replace(r, request_id=f"warm-{r.request_id}") for r in requests[:4]],
                    device)
        runs.append(run_pagedkv(engine, requests, device,
                                "pagedkv, --async-scheduling" if async_scheduling else "pagedkv"))
        engine.close()
        del engine
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"{runs[-1].name}: {runs[-1].rate:.0f} tokens/s", flush=True)
    ours, ours_async = runs
    skipped = "skipped (--no-transformers)" if args.no_transformers else "not run (out of time?)"
    batch_ways = Way("transformers generate_batch", error=skipped)
    static_requests = requests[:args.static_requests or len(requests)]
    static = Way(f"transformers generate, static batches of {STATIC_BATCH} (first {len(static_requests)} requests)",
                 error=skipped)
    steps_ms: dict[int, float] = {}
    profile = None

    def report() -> str:
        """Writes what is measured so far: a run cut short by a time limit keeps its figures."""
        text = body([ours, batch_ways, static, ours_async], steps_ms, profile, requests, shape, device, args.enforce_eager)
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "throughput.md").write_text(text + "\n")
            (out / "throughput.json").write_text(json.dumps({
                "ways": [dataclasses.asdict(w) | {"tokens_per_s": w.rate} for w in (ours, batch_ways, static, ours_async)],
                "decode_step_ms": steps_ms, "requests": len(requests), "model": shape}, indent=2) + "\n")
        return text

    report()
    sizes = [int(b) for b in args.decode_batches.split(",")]
    for b in sizes:
        steps_ms[b], _ = decode_step_ms(loaded, device, dtype_name, b, 24, args.seed, args.enforce_eager)
        print(f"decode step at batch {b}: {steps_ms[b]:.2f} ms", flush=True)
        report()
    _, profile = decode_step_ms(loaded, device, dtype_name, sizes[-1], 12, args.seed, args.enforce_eager, True)
    print(profile, flush=True)
    report()
    if not args.no_transformers:
        batch_ways = run_generate_batch(model, requests, device)
        print(f"generate_batch: {batch_ways.rate:.0f} tokens/s {batch_ways.error or ''}", flush=True)
        report()
        static = run_generate(model, static_requests, device)
        static.name = f"transformers generate, static batches of {STATIC_BATCH} (first {len(static_requests)} requests)"
        print(f"generate: {static.rate:.0f} tokens/s {static.error or ''}", flush=True)
    text = report()
    print("\n" + text + f"\n\ntotal {time.monotonic() - started:.0f} s", flush=True)
    if args.update_docs:
        write_section(TITLE, text)
