"""The `pagedkv` command as a new user meets it, run as a real process: a mistake gets one
`pagedkv: error: ...` line that names the file or flag and what to do, exit status 2, no
traceback (unless --debug); no server is reported at once; --help is fast and shows defaults."""
from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import gguf
import pytest
import torch
import zmq
from gguf_files import write_gguf

from pagedkv.runtime.cli.main import build_parser
from pagedkv.runtime.models.sampling_defaults import from_generation_config, from_gguf

PAGEDKV = str(Path(sys.executable).with_name("pagedkv"))
ROOT = Path(__file__).resolve().parent.parent


def pagedkv(*args: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PAGEDKV, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def one_line_error(result: subprocess.CompletedProcess, *words: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.startswith("pagedkv: error: ")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1] == lines[0]  # at most progress lines before it
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def broken_models(tiny_model, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("broken")
    good = Path(tiny_model())
    folders = {}
    for name in ("no_config", "bad_json", "missing_key", "no_weights"):
        folders[name] = root / name
        shutil.copytree(good, folders[name])
    (folders["no_config"] / "config.json").unlink()
    (folders["bad_json"] / "config.json").write_text('{"vocab_size": 512,')
    config = json.loads((good / "config.json").read_text())
    del config["num_attention_heads"]
    (folders["missing_key"] / "config.json").write_text(json.dumps(config))
    for file in folders["no_weights"].glob("*.safetensors"):
        file.unlink()
    return folders


@pytest.mark.parametrize("case, words", [
    ("nonexistent", ["/nonexistent", "not found", ".gguf"]),
    ("no_config", ["no_config", "config.json"]),
    ("bad_json", ["bad_json/config.json", "JSON"]),
    ("missing_key", ["missing_key/config.json", "num_attention_heads"]),
    ("no_weights", ["no_weights", "safetensors"]),
])
def test_a_model_that_cannot_load_is_one_line_naming_the_file(broken_models, case, words):
    path = "/nonexistent" if case == "nonexistent" else str(broken_models[case])
    one_line_error(pagedkv("generate", "--model", path, "--prompt", "hi"), *words)


def test_debug_shows_the_traceback(broken_models):
    result = pagedkv("generate", "--model", str(broken_models["missing_key"]), "--prompt", "hi", "--debug")
    assert result.returncode == 2 and "Traceback" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("pagedkv: error: ")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda(tiny_model):
    one_line_error(pagedkv("generate", "--model", tiny_model(), "--device", "cuda", "--prompt", "hi"),
                   "--device cuda", "--device cpu")


def test_a_kv_cache_larger_than_memory(tiny_model):
    one_line_error(pagedkv("generate", "--model", tiny_model(), "--device", "cpu", "--kv-cache-gib", "100000",
                           "--prompt", "hi"), "--kv-cache-gib", "lower")


def test_beam_width_0_names_beam_width(tiny_model):
    line = one_line_error(pagedkv("generate", "--model", tiny_model(), "--prompt-ids", "1,2", "--beam-width", "0"))
    assert line.startswith("pagedkv: error: beam_width must be >= 1")


@pytest.mark.parametrize("command", [["client", "generate", "--prompt", "hi"], ["stats"], ["chat"],
                                     ["client", "health"]])
def test_no_server_is_said_at_once_with_how_to_start_one(command):
    """Each waited 120 s in silence; the handshake wait is 3 s (the subprocess limit is far
    below 120 s, above 3 s)."""
    address = f"tcp://127.0.0.1:{free_port()}"
    result = pagedkv(*command, "--address", address, timeout=60)
    one_line_error(result, f"no server answers at {address}", "pagedkv serve")


def test_serve_on_a_taken_address_says_so_before_loading_the_model():
    """A second `make serve` loaded the model for 12 s, then failed on the port. The model
    here does not exist: had the server loaded it first, the error would be about the model."""
    taken = zmq.Context.instance().socket(zmq.ROUTER)
    port = taken.bind_to_random_port("tcp://127.0.0.1")
    try:
        result = pagedkv("serve", "--model", "/nonexistent", "--bind", f"tcp://127.0.0.1:{port}")
    finally:
        taken.close(linger=0)
    one_line_error(result, f"tcp://127.0.0.1:{port}", "already in use", "--bind")


def test_serve_on_a_taken_ipc_path_says_so(tmp_path):
    path = tmp_path / "s.sock"
    taken = zmq.Context.instance().socket(zmq.ROUTER)
    taken.bind(f"ipc://{path}")
    try:
        one_line_error(pagedkv("serve", "--model", "/nonexistent", "--bind", f"ipc://{path}"), "already in use")
    finally:
        taken.close(linger=0)
    # a stale socket file (no server behind it) is no obstacle: the error is about the model
    one_line_error(pagedkv("serve", "--model", "/nonexistent", "--bind", f"ipc://{path}"), "/nonexistent")


def test_version():
    result = pagedkv("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"pagedkv {importlib.metadata.version('pagedkv')}"


@pytest.mark.parametrize("command", [[], ["generate"], ["serve"], ["chat"], ["ablate"]])
def test_help_does_not_import_torch(command):
    result = pagedkv(*command, "--help", env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert result.returncode == 0 and "--debug" in result.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()
                if line.startswith("import time:")}
    assert "pagedkv" in imported  # the profile is there
    heavy = sorted(m for m in imported if m.split(".")[0] in ("torch", "transformers", "numpy", "gguf"))
    assert not heavy, heavy


def _parsers(parser, name="pagedkv"):
    yield name, parser
    for action in parser._actions:
        if hasattr(action, "choices") and isinstance(action.choices, dict):
            for sub, child in action.choices.items():
                yield from _parsers(child, f"{name} {sub}")


def test_help_shows_every_default():
    """Every option that takes a value says its default in --help."""
    missing = []
    for name, parser in _parsers(build_parser()):
        formatter = parser._get_formatter()
        for action in parser._actions:
            if action.option_strings and action.nargs != 0:
                if "default" not in formatter._get_help_string(action):
                    missing.append(f"{name} {action.option_strings[0]}")
    assert not missing, missing


def test_chat_help_gives_the_max_tokens_chat_uses():
    help_text = " ".join(pagedkv("chat", "--help").stdout.split())
    assert "at most (default: 512)" in help_text, help_text
    assert "generation_config.json" in help_text and "temperature 0.8" in help_text


def test_model_sampling_defaults_are_read_from_generation_config_and_gguf(tmp_path):
    assert from_generation_config({"do_sample": True, "temperature": 0.6, "top_p": 0.9, "max_new_tokens": 9}) == \
        {"temperature": 0.6, "top_p": 0.9}
    assert from_generation_config({"do_sample": True, "top_k": 20}) == {"temperature": 1.0, "top_k": 20}
    assert from_generation_config({"temperature": 0.6}) == {}  # transformers would not sample: greedy
    assert from_generation_config({}) == {}

    def metadata(w: gguf.GGUFWriter) -> None:
        w.add_float32("general.sampling.temp", 0.5)
        w.add_int32("general.sampling.top_k", 7)

    path = write_gguf(str(tmp_path / "s.gguf"), {}, None, metadata=metadata)
    assert from_gguf(gguf.GGUFReader(path)) == {"temperature": 0.5, "top_k": 7}
