"""Chat for the families: the chat template (a file's own, or its architecture's where it has
none), the end-of-turn tokens that stop a turn, and the sampling settings a model ships, in
`LLM.chat` (and so `generate --chat`), in the server's health (what `pagedkv chat` starts from)
and in the OpenAI gateway, whose requests take them for the fields they leave out."""
from __future__ import annotations

import httpx
import pytest
from gguf_files import gemma_vocab, write_family_gguf
from models import make_tiny_llama
from server_process import running_http_server

from pagedkv.runtime.engine.llm import LLM
from pagedkv.runtime.engine.sampling_params import SamplingParams
from pagedkv.runtime.models.loader import load_model
from pagedkv.runtime.serving.client import Client
from pagedkv.runtime.serving.http.requests import parse

pytestmark = pytest.mark.timeout(300)
SHIPPED = {"temp": 0.7, "top_k": 5, "top_p": 0.9}
WANT = {"temperature": 0.7, "top_k": 5, "top_p": 0.9}
MESSAGES = [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "hello world"}]


@pytest.fixture(scope="module")
def gemma_file(tmp_path_factory):
    """A tiny Gemma 3 GGUF file whose vocabulary is Gemma's, without a chat template, with
    sampling settings in its metadata."""
    tmp = tmp_path_factory.mktemp("gemma-chat")
    folder = make_tiny_llama(str(tmp / "hf"), model_type="gemma3_text", head_dim=32, num_layers=2,
                             num_kv_heads=1, vocab_size=512, with_tokenizer=False,
                             extra_config=dict(sliding_window=16, query_pre_attn_scalar=32))
    return write_family_gguf(str(tmp / "gemma.gguf"), folder, metadata=gemma_vocab(512, SHIPPED))


def test_the_architectures_template_end_of_turn_and_settings(gemma_file):
    loaded = load_model(gemma_file)
    tok = loaded.tokenizer
    assert tok.apply_chat_template(MESSAGES) == ("<bos><start_of_turn>user\nBe nice.\n\nhello world<end_of_turn>\n"
                                                 "<start_of_turn>model\n")
    end_of_turn = tok.token_to_id("<end_of_turn>")
    assert loaded.config.eos_token_ids == [1, end_of_turn]
    assert loaded.sampling_defaults == pytest.approx(WANT)
    llm = LLM(loaded=loaded, num_device_blocks=64)
    out = llm.chat(MESSAGES, SamplingParams(max_tokens=4, temperature=0))
    assert out.prompt_token_ids[:3] == [2, tok.token_to_id("<start_of_turn>"), tok.encode("user", False)[0]]
    assert out.prompt_token_ids.count(2) == 1  # the template's <bos>, not the tokenizer's too


def test_requests_take_the_shipped_settings_they_leave_out():
    job = parse({"messages": MESSAGES}, True, 100, WANT)
    assert {k: job.params[k] for k in WANT} == WANT
    job = parse({"messages": MESSAGES, "temperature": 0, "top_k": 2}, True, 100, WANT)
    assert (job.params["temperature"], job.params["top_k"], job.params["top_p"]) == (0, 2, 0.9)
    assert parse({"prompt": "hi"}, False, 100, None).params["temperature"] == 1.0


def test_gateway_and_health_use_the_template_and_the_shipped_settings(gemma_file, tmp_path):
    offline = LLM(model=gemma_file, num_device_blocks=64, block_size=4)
    want = offline.chat(MESSAGES, SamplingParams(max_tokens=6, seed=3, ignore_eos=True, **WANT))
    with running_http_server(gemma_file, "--num-device-blocks", "64", "--block-size", "4",
                             log_path=str(tmp_path / "server.log")) as (proc, url):
        with Client(proc.address, timeout=60) as engine:  # what `pagedkv chat` starts from
            assert engine.health()["sampling_defaults"] == pytest.approx(WANT)
        body = {"messages": MESSAGES, "max_tokens": 6, "seed": 3, "ignore_eos": True}
        reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).json()
        assert reply["usage"]["prompt_tokens"] == len(want.prompt_token_ids)
        assert reply["choices"][0]["message"]["content"] == want.outputs[0].text
