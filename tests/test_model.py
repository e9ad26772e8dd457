"""Our Llama model over the paged cache against transformers: greedy tokens and logits."""
import pytest
import torch

from pagedkv.kernels.cpu import ops as cpu_ops
from pagedkv.kvcache.sequence import SequenceStatus
from pagedkv.runtime.engine.config import EngineConfig
from pagedkv.runtime.engine.llm_engine import LLMEngine
from pagedkv.runtime.models.llama import LlamaModel
from pagedkv.runtime.models.loader import load_model

transformers = pytest.importorskip("transformers")

CONFIGS = [
    dict(num_layers=1, num_heads=4, num_kv_heads=4, head_dim=64),                          # MHA
    dict(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64, tie_word_embeddings=True),  # GQA, tied
    dict(num_layers=3, num_heads=4, num_kv_heads=1, head_dim=128, hidden_size=128),          # head_dim 128
    dict(num_layers=2, model_type="qwen2", num_heads=4, num_kv_heads=2),                    # q/k/v biases
]
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4], list(range(20, 57)), [100]]


def run_greedy(engine: LLMEngine, prompts, max_tokens):
    """Greedy decoding through scheduler and executor, keeping every sampled row's logits."""
    groups = []
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p)
        groups.append(engine.groups[str(i)])
    logits_seen = {i: [] for i in range(len(prompts))}
    sched = engine.scheduler
    while sched.has_unfinished():
        out = sched.schedule()
        logits = engine.executor.execute(out)
        for row, row_logits in zip([r for r in out.scheduled if r.sample], logits):
            i = int(row.group.request_id)
            logits_seen[i].append((list(row.seq.token_ids), row_logits))
            row.seq.append(int(row_logits.argmax()))
            if len(row.seq.output_ids) == max_tokens:
                sched.free_seq(row.seq, SequenceStatus.FINISHED_LENGTH)
    return [g.seqs[0].output_ids for g in groups], logits_seen


@pytest.mark.parametrize("config", CONFIGS, ids=["mha", "gqa-tied", "hd128", "qwen2"])
@pytest.mark.parametrize("block_size", [1, 8, 16, 32])
def test_greedy_and_logits_equal_transformers(tiny_model, config, block_size):
    check_against_transformers(tiny_model(**config), block_size)


@pytest.mark.parametrize("config", [CONFIGS[1], CONFIGS[3]], ids=["gqa-tied", "qwen2"])
def test_without_the_cpu_kernels_torch_ops_equal_transformers_too(tiny_model, config, monkeypatch):
    # The path CUDA takes, and the CPU's where the C kernels cannot be built.
    monkeypatch.setattr(cpu_ops, "library", lambda: None)
    check_against_transformers(tiny_model(**config), 16)


def check_against_transformers(path: str, block_size: int) -> None:
    hf = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    engine = LLMEngine(EngineConfig(model=path, block_size=block_size, num_device_blocks=256,
                                    swap_space_gib=0.01, max_num_batched_tokens=24), load_model(path))
    max_tokens = 8
    ours, seen = run_greedy(engine, PROMPTS, max_tokens)
    for i, prompt in enumerate(PROMPTS):
        ref = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=max_tokens,
                          min_new_tokens=max_tokens, pad_token_id=0)
        assert ours[i] == ref[0, len(prompt):].tolist(), f"prompt {i}"
        for tokens, row_logits in seen[i]:
            with torch.no_grad():
                expected = hf(torch.tensor([tokens])).logits[0, -1]
            torch.testing.assert_close(row_logits, expected, atol=1e-4, rtol=1e-4)
    assert engine.block_manager.num_free_device_blocks == 256


def test_llama3_rope_scaling_matches_transformers(tiny_model, tmp_path):
    import json
    import shutil

    src = tiny_model(num_layers=1)
    path = tmp_path / "scaled"
    shutil.copytree(src, path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_theta": 10000.0, "rope_type": "llama3", "factor": 8.0,
                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 16}
    (path / "config.json").write_text(json.dumps(cfg))
    hf = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    engine = LLMEngine(EngineConfig(model=str(path), block_size=4, num_device_blocks=64), load_model(str(path)))
    prompt = list(range(3, 40))
    ours, _ = run_greedy(engine, [prompt], 6)
    ref = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=6, min_new_tokens=6, pad_token_id=0)
    assert ours[0] == ref[0, len(prompt):].tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_is_transformers_bit_for_bit(tiny_model, dtype):
    # The CPU path uses torch's fused norm: it must round exactly as LlamaRMSNorm's five steps.
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    loaded = load_model(tiny_model(num_layers=1), dtype=dtype)
    model = LlamaModel(loaded.config, loaded.weights, torch.device("cpu"), dtype)
    g = torch.Generator().manual_seed(0)
    for rows, width in [(1, 64), (7, 576), (300, 960)]:
        norm = LlamaRMSNorm(width, eps=model.config.rms_norm_eps).to(dtype)
        with torch.no_grad():
            norm.weight.copy_(torch.randn(width, generator=g))
            x = (torch.randn(rows, width, generator=g) * 3).to(dtype)
            assert torch.equal(model.rms_norm(x, norm.weight), norm(x))


@pytest.mark.parametrize("config", CONFIGS[1:3], ids=["gqa-tied", "hd128"])
def test_bfloat16_follows_transformers_in_bfloat16(tiny_model, config):
    # Not bit for bit (other kernels, other summation orders): every row's logits within 5% of
    # transformers' bfloat16 ones (relative to their largest), where a wrong row or layer is
    # off by the whole scale. Decode steps of 4 sequences take the few-row bfloat16 loops.
    path = tiny_model(**config)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    engine = LLMEngine(EngineConfig(model=path, dtype="bfloat16", num_device_blocks=256, swap_space_gib=0.01,
                                    max_num_batched_tokens=24), load_model(path, dtype=torch.bfloat16))
    if cpu_ops.bf16_linear_supported():
        assert "AVX512-BF16 loops" in engine.executor.model.describe()
    _, seen = run_greedy(engine, PROMPTS, 6)
    for i in range(len(PROMPTS)):
        for tokens, row_logits in seen[i]:
            with torch.no_grad():
                expected = hf(torch.tensor([tokens])).logits[0, -1].float()
            assert (row_logits.float() - expected).abs().max() <= 0.05 * expected.abs().max(), (i, len(tokens))
