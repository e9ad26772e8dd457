"""Every Python block of the README runs as written: the offline block in this process, the client
block against a real `pagedkv serve` of the default model (its address put in place of 5555's)."""
import contextlib
import io
import os
import re

import pytest
from server_process import ROOT, running_server

pytestmark = pytest.mark.timeout(600)
DEFAULT_ADDRESS = "tcp://127.0.0.1:5555"


def python_blocks() -> list[str]:
    with open(os.path.join(ROOT, "README.md")) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


def run_block(code: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})
    return out.getvalue()


def test_readme_has_the_offline_and_client_blocks():
    blocks = python_blocks()
    assert len(blocks) == 3  # the third, the openai package's, runs in test_openai_api.py
    assert "LLM(" in blocks[0] and DEFAULT_ADDRESS in blocks[1] and "OpenAI(" in blocks[2]


def test_offline_block_runs(one_torch_thread):
    pytest.importorskip("gguf")
    import ast

    samples, stats = run_block(python_blocks()[0]).strip().split("\n")
    texts = ast.literal_eval(samples)                        # n=2 samples' texts
    assert len(texts) == 2 and all(isinstance(t, str) and t for t in texts)
    assert "'blocks'" in stats and "kv_waste" in stats       # the stats line ran


def test_client_block_runs(tmp_path):
    pytest.importorskip("gguf")
    from pagedkv.runtime.models.loader import default_model_path

    with running_server(default_model_path(), "--num-device-blocks", "256", "--swap-space-gib", "0.01",
                        log_path=str(tmp_path / "server.log")) as server:
        printed = run_block(python_blocks()[1].replace(DEFAULT_ADDRESS, server.address))
        assert server.terminate() == 0
    assert "Paris" in printed                                # the greedy generate
    assert "'type': 'final'" in printed                      # the stream ended with its final reply
    assert printed.strip().endswith("16")                    # 16 concurrent AsyncClient finals
