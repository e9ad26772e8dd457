"""`pagedkv generate` end to end with the default model (SmolLM2 from its wheel)."""
import json

import pytest

from pagedkv.runtime.cli.main import main

SMALL_CACHE = ["--num-device-blocks", "64", "--swap-space-gib", "0.01"]


def test_generate_says_paris(capsys):
    pytest.importorskip("gguf")
    assert main(["generate", "--prompt", "The capital of France is", "--max-tokens", "8", "--json",
                 *SMALL_CACHE]) == 0
    result = json.loads(capsys.readouterr().out)
    (output,) = result["outputs"]
    assert "Paris" in output["text"]
    assert len(output["token_ids"]) == 8 and output["finish_reason"] == "length"
    assert result["stats"]["blocks"]["device"]["used"] == 0   # every block free again


def test_generate_rejects_bad_input(tiny_model, capsys):
    path = tiny_model()
    assert main(["generate", "--model", path, "--prompt-ids", "1,2,3", "--temperature", "-1"]) == 2
    assert "temperature" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "--model", path])  # no prompt
