"""pagedkv/kernels/cpu/cpu_decode.c runs a small decode batch's layers in one call: it must give the
model's Python loop's outputs bit for bit (float32, the file's 4-bit codes, bfloat16), and
the same errors."""
import pytest
import torch

from pagedkv.kernels.cpu import decode as cpu_decode

from pagedkv.kernels.cpu import ops as cpu_ops
from pagedkv.runtime.engine.config import EngineConfig
from pagedkv.runtime.engine.llm_engine import LLMEngine
from pagedkv.runtime.models.llama import LlamaModel
from pagedkv.runtime.models.loader import load_model
from gguf_files import QTYPES, write_gguf
from gguf.constants import GGMLQuantizationType as Q
from models import make_tiny_llama
from test_model import PROMPTS, run_greedy
from test_quant import Q4_1_FILE, needs_int4

MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
FILES = {  # storage per tensor kind: the default model's, Q8_0, a mix
    "q4_1": Q4_1_FILE,
    "q8_0": {**QTYPES, **{k: Q.Q8_0 for k in MATRICES}},
    "mixed": {**QTYPES, "attn_q": Q.Q4_1, "attn_k": Q.Q4_1, "attn_v": Q.Q4_1, "attn_output": Q.Q8_0,
              "ffn_gate": Q.Q4_0, "ffn_up": Q.Q4_0, "ffn_down": Q.F32},
}

needs_library = pytest.mark.skipif(cpu_ops.library() is None, reason="the CPU kernels do not build here")


def greedy_both_ways(path: str, dtype: str, monkeypatch, quantization: str = "none", block_size: int = 4):
    """Greedy decoding of PROMPTS twice, with the one-call layers and with the loop; returns
    both runs (tokens, logits seen) and how many steps took the one call."""
    calls = []
    real = cpu_decode.decode_layers
    monkeypatch.setattr(cpu_decode, "decode_layers", lambda *a, **k: calls.append(a[1].shape[0]) or real(*a, **k))
    runs = []
    for native in (True, False):
        loaded = load_model(path, dtype=getattr(torch, dtype), quantization=quantization)
        # Chunked prompts: steps mix prompt and decode rows, and decode batches of 1 to 5 rows.
        engine = LLMEngine(EngineConfig(model=path, dtype=dtype, block_size=block_size, num_device_blocks=256,
                                        swap_space_gib=0.01, max_num_batched_tokens=24, quantization=quantization),
                           loaded)
        if not native:
            engine.executor.model.decode_plan = None
        runs.append(run_greedy(engine, PROMPTS + [[9, 8, 7]], 7))
        assert engine.block_manager.num_free_device_blocks == 256
    return runs, calls


def assert_same(runs) -> None:
    (tokens, seen), (loop_tokens, loop_seen) = runs
    assert tokens == loop_tokens
    for i in seen:
        assert [t for t, _ in seen[i]] == [t for t, _ in loop_seen[i]]
        for (_, a), (_, b) in zip(seen[i], loop_seen[i]):
            assert torch.equal(a, b), i


@needs_library
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("config", [dict(num_layers=2, num_heads=4, num_kv_heads=2, tie_word_embeddings=True),
                                    dict(num_layers=3, num_heads=4, num_kv_heads=1, head_dim=128, hidden_size=128),
                                    dict(num_layers=2, model_type="mistral", extra_config=dict(sliding_window=5)),
                                    dict(num_layers=2, model_type="qwen3", head_dim=32),
                                    dict(num_layers=3, model_type="gemma3_text", head_dim=32, num_kv_heads=1,
                                         extra_config=dict(sliding_window=5, query_pre_attn_scalar=24,
                                                           layer_types=["sliding_attention", "full_attention",
                                                                        "sliding_attention"]))],
                         ids=["gqa-tied", "hd128", "sliding-window", "qwen3-qk-norms", "gemma3"])
def test_float32_layers_in_one_call_equal_the_loop(tiny_model, config, threads, monkeypatch):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        runs, calls = greedy_both_ways(tiny_model(**config), "float32", monkeypatch)
    finally:
        torch.set_num_threads(before)
    # It ran, on the rows the few-row kernel takes (more go to oneDNN): F.linear's 1 to 3, or
    # 1 to 8 where pagedkv's loops take float32 rows over the BLAS.
    most = cpu_ops.F32_LINEAR_ROWS if cpu_ops.f32_linear_preferred() else 3
    assert calls and set(calls) <= set(range(1, most + 1))
    assert_same(runs)


@needs_library
@pytest.mark.skipif(not cpu_ops.bf16_linear_supported(), reason="no AVX512-BF16 on this CPU")
def test_bfloat16_layers_in_one_call_equal_the_loop(tiny_model, monkeypatch):
    runs, calls = greedy_both_ways(tiny_model(num_layers=2, num_heads=4, num_kv_heads=2), "bfloat16", monkeypatch,
                                   block_size=16)
    assert calls and set(calls) <= {1, 2, 3, 4}
    assert_same(runs)


def quantized_file(storage: str, tmp_path) -> str:
    import transformers

    folder = make_tiny_llama(str(tmp_path / "hf"), with_tokenizer=False, tie_word_embeddings=True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder)
    weights = {k: v.numpy() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    return write_gguf(str(tmp_path / f"{storage}.gguf"), weights, hf.config, qtypes=FILES[storage])


def plan_kinds(model: LlamaModel) -> set[str]:
    return {w.kind for layer in model.decode_plan.layers for w in (layer.qkv, layer.o, layer.gate_up, layer.down)}


@needs_library
@needs_int4
@pytest.mark.parametrize("storage", list(FILES))
def test_quantized_layers_in_one_call_equal_the_loop(storage, tmp_path, monkeypatch):
    path = quantized_file(storage, tmp_path)
    loaded = load_model(path, quantization="auto")
    model = LlamaModel(loaded.config, loaded.weights, torch.device("cpu"), torch.float32)
    # Q8_0's codes whole (cpu_q8.c) where that kernel runs and AMX is missing, else as 4-bit halves.
    eight = "q8" if cpu_ops.q8_supported() and not cpu_ops.amx_supported() else "int4"
    kinds = {"q4_1": {"int4"}, "q8_0": {eight}, "mixed": {"int4", eight, "float32"}}
    assert plan_kinds(model) == kinds[storage]
    most = cpu_ops.F32_LINEAR_ROWS if cpu_ops.f32_linear_preferred() else 3  # float32's few-row kernel
    assert model.decode_plan.max_rows == (most if storage == "mixed" else None)  # 4-bit layers: any batch
    runs, calls = greedy_both_ways(path, "float32", monkeypatch, quantization="auto")
    assert calls and (max(calls) <= most if storage == "mixed" else 5 in calls)
    assert_same(runs)


@needs_library
@pytest.mark.skipif(not (cpu_ops.amx_supported() or cpu_ops.int4_bf16_supported()),
                    reason="no AMX or AVX512-BF16 on this CPU")
@pytest.mark.parametrize("storage", ["q4_1", "q8_0"])
def test_quantized_bfloat16_layers_in_one_call_equal_the_loop(storage, tmp_path, monkeypatch):
    # bfloat16 rows through cpu_amx.c's 4-bit kernel, or without AMX cpu_bf16.c's, in the one
    # call and in the loop alike.
    path = quantized_file(storage, tmp_path)
    loaded = load_model(path, quantization="auto", dtype=torch.bfloat16)
    model = LlamaModel(loaded.config, loaded.weights, torch.device("cpu"), torch.bfloat16)
    assert plan_kinds(model) == {"int4"} and model.decode_plan.max_rows is None
    assert ("AMX" if cpu_ops.amx_supported() else "AVX512-BF16") in model.describe()
    runs, calls = greedy_both_ways(path, "bfloat16", monkeypatch, quantization="auto", block_size=16)
    assert calls and 5 in calls
    assert_same(runs)


@needs_library
def test_models_the_call_cannot_run_keep_the_loop(tiny_model):
    def plan(**config):
        loaded = load_model(tiny_model(num_layers=1, **config))
        return LlamaModel(loaded.config, loaded.weights, torch.device("cpu"), torch.float32).decode_plan

    assert plan() is not None
    assert plan(model_type="qwen2", num_heads=4, num_kv_heads=2) is None  # q/k/v biases
    assert plan(head_dim=40, hidden_size=80, num_heads=2, num_kv_heads=2) is None  # the kernel's head sizes
    assert not cpu_decode.sgemm_matches_linear(torch.randn(8, 16).t())  # not contiguous


@needs_library
def test_errors_are_the_loops(tiny_model):
    loaded = load_model(tiny_model(num_layers=2, num_heads=4, num_kv_heads=2))
    model = LlamaModel(loaded.config, loaded.weights, torch.device("cpu"), torch.float32)
    cfg = model.config
    cache = torch.zeros(8, cfg.num_layers, 2, 4, cfg.num_kv_heads, cfg.head_dim)
    rows = 2
    h = torch.randn(rows, cfg.hidden_size)
    x = torch.randn(rows, cfg.hidden_size)
    cos, sin = (t[:, 0].contiguous() for t in model.rotary(torch.tensor([3, 5]))[0])
    good = dict(slot_mapping=torch.tensor([3, 9]), block_tables=torch.tensor([[0, 0], [1, 2]]),
                context_lens=torch.tensor([4, 6]))

    def run(**changes):
        args = {**good, **changes}
        cpu_decode.decode_layers(model.decode_plan, h.clone(), x.clone(), cos, sin, cache, args["slot_mapping"],
                                 args["block_tables"], args["context_lens"], model.num_heads, model.num_kv_heads,
                                 cfg.rms_norm_eps, model.scale)

    run()
    with pytest.raises(IndexError, match="outside the cache"):
        run(block_tables=torch.tensor([[0, 0], [1, 99]]))
    with pytest.raises(IndexError, match="outside the cache"):
        run(slot_mapping=torch.tensor([3, 8 * 4]))
    with pytest.raises(IndexError, match="longer than its block table"):
        run(context_lens=torch.tensor([4, 9]))
    with pytest.raises(ValueError, match="decode_layers"):
        run(slot_mapping=torch.tensor([3]))
    n = model.decode_plan.max_rows + 1  # more rows than the plan takes
    with pytest.raises(ValueError, match="decode_layers"):
        cpu_decode.decode_layers(model.decode_plan, torch.randn(n, cfg.hidden_size), torch.randn(n, cfg.hidden_size),
                                 cos.repeat(n, 1)[:n], sin.repeat(n, 1)[:n], cache, torch.arange(n),
                                 torch.zeros(n, 2, dtype=torch.int32), torch.ones(n, dtype=torch.int32),
                                 model.num_heads, model.num_kv_heads, cfg.rms_norm_eps, model.scale)
