"""tools/bench_cpu_peers.py on a tiny GGUF file: every engine in its own child process, and
pagedkv's float32 tokens equal to transformers'."""
import pytest

from gguf_files import gpt2_vocab, write_gguf
from models import make_tiny_llama
from test_quant import Q4_1_FILE
from tools import bench_cpu_peers

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def q4_with_vocab(tmp_path_factory):  # transformers reads the vocabulary size from the file's tokenizer
    folder = make_tiny_llama(str(tmp_path_factory.mktemp("hf")), with_tokenizer=False, tie_word_embeddings=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    weights = {k: v.numpy() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    return write_gguf(str(tmp_path_factory.mktemp("q4") / "q4.gguf"), weights, model.config,
                      metadata=gpt2_vocab(None), qtypes=Q4_1_FILE)


def test_engines_run_side_by_side(q4_with_vocab, capsys):
    args = ["--threads", "1", "--repeats", "1", "--requests", "2", "--new-tokens", "6", "--prompt-len", "8",
            "--model", q4_with_vocab]
    assert bench_cpu_peers.main(args) == 0
    table = [line.strip("|").split("|") for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    rows = {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in table[1:]}  # after the header
    assert set(rows) >= {"pagedkv, float32 (--quantization none)", "transformers generate, float32",
                         "pagedkv, the file's quantization (--quantization auto)"}
    assert rows["transformers generate, float32"][5] == "6/6"  # greedy tokens equal to pagedkv float32's
    for cells in rows.values():  # threads; A prefill, decode wall and CPU; B tokens/s
        assert cells[0] == "1" and min(float(cells[i]) for i in (1, 2, 3, 6)) > 0


def test_engines_that_match_nothing_are_refused(q4_with_vocab, capsys):
    with pytest.raises(SystemExit):
        bench_cpu_peers.main(["--engines", "nothing by this name", "--model", q4_with_vocab])
    assert "matches no engine" in capsys.readouterr().err


def test_no_amx_switches_amx_off_in_every_child(q4_with_vocab, capsys, monkeypatch):
    # --no-amx: pagedkv's children turn AMX off themselves, and every child's oneDNN is held
    # below AMX; the table says so (and --update-docs would write the section without AMX).
    seen = []
    real = bench_cpu_peers.run_peer

    def spy(python, script, args, threads, no_amx=False):
        seen.append((args.get("no_amx"), no_amx))
        return real(python, script, args, threads, no_amx)

    monkeypatch.setattr(bench_cpu_peers, "run_peer", spy)
    args = ["--threads", "1", "--repeats", "1", "--requests", "0", "--new-tokens", "3", "--prompt-len", "4",
            "--engines", "quantization auto", "--no-amx", "--model", q4_with_vocab]
    assert bench_cpu_peers.main(args) == 0
    assert seen == [(True, True)]
    assert "AMX switched off" in capsys.readouterr().out
