"""Decode step time of the engine on the CPU against transformers' `generate`, same model,
same weights (float32), same batch, side by side in one run.

    python -m tools.bench_decode [--batch-sizes 1,8,32] [--prompt-len 128] [--steps 32]
                                 [--repeats 3] [--threads N] [--model PATH.gguf] [--out DIR] [--update-docs]

Ours: an LLMEngine with B greedy requests (ignore_eos), random prompts of the same length;
every engine step after the prefill step is one decode step, timed with time.perf_counter
(median over all decode steps of all repeats), and split into scheduler, executor (inputs,
cache operations, outputs), model forward and sampling. transformers: generate(max_new_tokens=T,
min_new_tokens=T, do_sample=False, eos_token_id=None) on the same prompts; one decode step =
(time for T new tokens - time for 1 new token) / (T - 1), medians over repeats. Both run under
torch.inference_mode() with the same torch thread count, one after the other in every repeat,
and their greedy tokens are compared.

Writes the table into --out (a fresh folder unless named), and with --update-docs into
docs/BENCHMARKS.md, section "Decode step, SmolLM2-135M (CPU)".
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from pagedkv.ablation.report import add_output_arguments, markdown_table, output_folder, publish

TITLE = "Decode step, SmolLM2-135M (CPU)"
LINEAR_KINDS = {"onednn": "oneDNN with weights prepacked at load", "mm": "torch.mm on transposed weights",
                "linear": "F.linear"}


def log(message: str) -> None:
    print(f"[bench_decode] {message}", file=sys.stderr, flush=True)


def prompts(batch: int, prompt_len: int, vocab: int, seed: int) -> torch.Tensor:
    """[batch, prompt_len] random token ids, avoiding the first 16 ids (special tokens)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(16, vocab, (batch, prompt_len), generator=gen)


# -- ours -------------------------------------------------------------------------------------------

def engine_for(loaded, batch: int, prompt_len: int, steps: int):
    from pagedkv import EngineConfig, LLMEngine

    block_size = 16
    per_seq = -(-(prompt_len + steps + 1) // block_size) + 1
    config = EngineConfig(device="cpu", dtype="float32", block_size=block_size,
                          num_device_blocks=batch * per_seq + 8, swap_space_gib=0.0,
                          max_num_seqs=max(batch, 1), max_num_batched_tokens=max(4096, batch * prompt_len))
    return LLMEngine(config, loaded)


def run_ours(engine, ids: torch.Tensor, steps: int) -> tuple[dict[str, list[float]], torch.Tensor]:
    """One generation of `steps` tokens per request: per-decode-step timings (seconds) and the
    generated tokens [B, steps]."""
    from pagedkv import SamplingParams

    params = SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True)
    tag = f"r{time.monotonic_ns()}"
    order = [f"{tag}-{b}" for b in range(len(ids))]
    for rid, row in zip(order, ids.tolist()):
        engine.add_request(rid, row, params)
    tokens: dict[str, list[int]] = {}
    executor = engine.executor
    forward = executor.model.forward
    forward_s: list[float] = []

    def timed_forward(*args, **kwargs):
        start = time.perf_counter()
        result = forward(*args, **kwargs)
        forward_s.append(time.perf_counter() - start)
        return result

    executor.model.forward = timed_forward
    times: dict[str, list[float]] = {"step": [], "schedule": [], "execute": [], "forward": [], "sample": []}
    try:
        first = True
        while engine.has_unfinished():
            t0 = time.perf_counter()
            out = engine.scheduler.schedule()
            t1 = time.perf_counter()
            logits = executor.execute(out)
            t2 = time.perf_counter()
            outputs = engine.process(out, logits)
            t3 = time.perf_counter()
            tokens.update((o.request_id, o.outputs[0].token_ids) for o in outputs if o.finished)
            if out.is_empty:  # finished groups leave the running queue
                continue
            if first:  # the prefill step
                first = False
                if out.decodes or len(out.prefills) != len(ids):
                    raise RuntimeError("the first step was expected to prefill every request at once")
                continue
            if out.prefills or len(out.decodes) != len(ids):
                raise RuntimeError("a decode step was expected to run every request")
            times["step"].append(t3 - t0)
            times["schedule"].append(t1 - t0)
            times["execute"].append(t2 - t1)
            times["forward"].append(forward_s[-1])
            times["sample"].append(t3 - t2)
    finally:
        del executor.model.forward
    if len(times["step"]) != steps - 1:
        raise RuntimeError(f"expected {steps - 1} decode steps, timed {len(times['step'])}")
    return times, torch.tensor([tokens[rid] for rid in order])


# -- transformers -----------------------------------------------------------------------------------

def load_transformers(path: str):
    """transformers' own model from the GGUF file (its own dequantization), float32."""
    import transformers
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder, name = os.path.split(path)
    config = transformers.AutoConfig.from_pretrained(folder, gguf_file=name)
    # from_pretrained(gguf_file=...) needs accelerate; this is what it does without it.
    with torch.device("meta"):
        skeleton = transformers.AutoModelForCausalLM.from_config(config)
    tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=skeleton)["tensors"]
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"transformers model: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def time_generate(model, ids: torch.Tensor, new_tokens: int) -> tuple[float, torch.Tensor]:
    mask = torch.ones_like(ids)
    start = time.perf_counter()
    # eos_token_id=None: EOS neither stops the rows nor is masked out by min_new_tokens, like
    # our requests with ignore_eos, so that both pick the same greedy tokens.
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, eos_token_id=None, pad_token_id=0)
    return time.perf_counter() - start, out[:, ids.shape[1]:]


# -- main -------------------------------------------------------------------------------------------

def fmt(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", default="1,8,32", help="comma-separated batch sizes (default 1,8,32)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=32, help="new tokens per request (>= 2)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    p.add_argument("--model", default=None, help="GGUF file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--seed", type=int, default=0)
    add_output_arguments(p)
    args = p.parse_args(argv)
    batches = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    if args.steps < 2 or args.prompt_len < 1 or args.repeats < 1 or not batches or min(batches) < 1:
        p.error("need --steps >= 2, --prompt-len >= 1, --repeats >= 1 and batch sizes >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()

    from pagedkv import default_model_path, load_model

    path = args.model or default_model_path()
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    log(f"loading {os.path.basename(path)} (ours and transformers'), {threads} torch threads")
    loaded = load_model(path)
    hf = load_transformers(path)
    vocab = loaded.config.vocab_size

    try:
        from tqdm import tqdm
    except ImportError:  # progress lines instead
        tqdm = None
    total = len(batches) * args.repeats * 2
    bar = tqdm(total=total, desc="bench_decode", file=sys.stderr) if tqdm else None

    def progress(what: str) -> None:
        if bar is not None:
            bar.set_postfix_str(what)
            bar.update(1)
        else:
            log(what)

    rows, breakdown, mismatches = [], [], []
    with torch.inference_mode():
        for batch in batches:
            ids = prompts(batch, args.prompt_len, vocab, args.seed + batch)
            engine = engine_for(loaded, batch, args.prompt_len, args.steps)
            run_ours(engine, ids[:, :8], 3)  # warm-ups
            time_generate(hf, ids[:, :8], 2)
            # Alternate the two so that a change in the machine's load hits both alike.
            ours: dict[str, list[float]] = {}
            one, full = [], []
            ours_tokens = theirs_tokens = None
            for r in range(args.repeats):
                times, ours_tokens = run_ours(engine, ids, args.steps)
                for key, values in times.items():
                    ours.setdefault(key, []).extend(values)
                progress(f"batch {batch}: ours, repeat {r + 1}/{args.repeats}")
                t1, _ = time_generate(hf, ids, 1)
                tn, theirs_tokens = time_generate(hf, ids, args.steps)
                one.append(t1)
                full.append(tn)
                progress(f"batch {batch}: transformers, repeat {r + 1}/{args.repeats}")
            if not torch.equal(ours_tokens, theirs_tokens):
                row, step_index = (ours_tokens != theirs_tokens).nonzero()[0].tolist()
                mismatches.append(f"batch {batch} (first at row {row}, token {step_index})")
            hf_step = (statistics.median(full) - statistics.median(one)) / (args.steps - 1)
            step = statistics.median(ours["step"])
            rows.append([batch, fmt(step), fmt(hf_step), f"{hf_step / step:.2f}", f"{batch / step:.0f}",
                         f"{batch / hf_step:.0f}"])
            breakdown.append([batch, fmt(statistics.median(ours["schedule"])),
                              fmt(statistics.median(ours["execute"]) - statistics.median(ours["forward"])),
                              fmt(statistics.median(ours["forward"])), fmt(statistics.median(ours["sample"]))])
            log(f"batch {batch}: ours {fmt(step)} ms/step, transformers {fmt(hf_step)} ms/step, "
                f"ratio {hf_step / step:.2f}")
            linear_kind = LINEAR_KINDS.get(engine.executor.model.linear_kind, engine.executor.model.linear_kind)
            del engine
    if bar is not None:
        bar.close()

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    by_batch = {row[0]: float(row[3]) for row in rows}
    verdicts = []
    if 1 in by_batch:
        verdicts.append(f"batch 1 at least as fast as transformers: {'met' if by_batch[1] >= 1.0 else 'NOT met'} "
                        f"(ratio {by_batch[1]:.2f})")
    if 32 in by_batch:
        verdicts.append(f"batch 32 faster than transformers: {'met' if by_batch[32] > 1.0 else 'NOT met'} "
                        f"(ratio {by_batch[32]:.2f})")
    import transformers

    body = (f"SmolLM2-135M-Instruct ({os.path.basename(path)}, dequantized to float32 by each side), "
            f"B random prompts of {args.prompt_len} tokens, {args.steps} greedy new tokens each, "
            f"{args.repeats} repeats; {threads} torch threads for both; torch {torch.__version__}, "
            f"transformers {transformers.__version__}.\n\n"
            f"- Ours: median wall time of an engine step after the prefill (scheduler, executor, model, "
            f"sampling); linear layers through {linear_kind}, paged attention by the torch reference.\n"
            f"- transformers: (generate of T tokens - generate of 1 token) / (T - 1), medians over repeats; "
            f"its defaults (nn.Linear, attention {hf.config._attn_implementation}, dynamic cache).\n"
            "- Ratio = transformers / ours (> 1: we are faster).\n\n"
            + markdown_table(["batch", "ours ms/step", "transformers ms/step", "ratio", "ours tokens/s",
                              "transformers tokens/s"], rows)
            + "\n\nWhere our step goes (medians, ms):\n\n"
            + markdown_table(["batch", "scheduler", "executor (inputs, cache ops, outputs)", "model forward",
                              "sampling + bookkeeping"], breakdown)
            + "\n\nTargets (CPU): " + ("; ".join(verdicts) if verdicts else "batch 1 and 32 not measured") + ".  \n"
            + ("Greedy tokens equal transformers' at every batch size." if not mismatches else
               f"Greedy tokens differ from transformers' at {'; '.join(mismatches)}.") + "  \n"
            + f"Load average (1 min) at the start {load_start:.2f}, at the end {load:.2f}.\n")
    print(body)
    publish(TITLE, body, output_folder(args, "bench_decode"), args.update_docs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
