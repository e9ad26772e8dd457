"""tools/bench_cpu_kernels.py on a tiny GGUF file: both 4-bit kernels and both attention paths
timed side by side, and a one-line refusal where there is no AMX to compare."""
import pytest

from gguf_files import write_gguf
from kernels import cpu_ops
from models import make_tiny_llama
from test_quant import Q4_1_FILE
from tools import bench_cpu_kernels

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def q4_file(tmp_path_factory):
    folder = make_tiny_llama(str(tmp_path_factory.mktemp("hf")), with_tokenizer=False, tie_word_embeddings=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    weights = {k: v.numpy() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    return write_gguf(str(tmp_path_factory.mktemp("q4") / "q4.gguf"), weights, model.config, qtypes=Q4_1_FILE)


@pytest.mark.skipif(not cpu_ops.amx_supported(), reason="no AMX on this CPU or operating system")
def test_kernels_side_by_side(q4_file, capsys, tmp_path):
    args = ["--rows", "1,33", "--repeats", "1", "--seqs", "2", "--context", "20", "--model", q4_file,
            "--out", str(tmp_path / "out")]
    assert bench_cpu_kernels.main(args) == 0
    lines = [line.strip("|").split("|") for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    cells = {row[0].strip(): [c.strip() for c in row[1:]] for row in lines}
    for key in ("1", "33", "decode step", "prompts"):  # two timings and their ratio, all positive
        assert min(float(c) for c in cells[key][:2]) > 0 and cells[key][2].endswith("x"), key
    assert (tmp_path / "out" / "BENCHMARKS-section.md").exists()
    assert cpu_ops.amx_supported()  # the attention runs turned AMX back on


def test_refuses_without_amx_in_one_line(q4_file, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_ops, "amx_supported", lambda: False)
    assert bench_cpu_kernels.main(["--model", q4_file, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no AMX" in err
    assert not (tmp_path / "out").exists()
