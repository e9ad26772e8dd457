"""The offline API, in the style users know from vLLM:

    LLM(model=None).generate(["Hello"], SamplingParams(max_tokens=32))
"""
from __future__ import annotations

import sys
from typing import Sequence as Seq

from tqdm import tqdm

from pagedkv.runtime.engine.config import EngineConfig
from pagedkv.runtime.engine.llm_engine import LLMEngine
from pagedkv.runtime.engine.outputs import RequestOutput
from pagedkv.runtime.engine.sampling_params import SamplingParams
from pagedkv.runtime.models.loader import LoadedModel


class LLM:
    def __init__(self, model: str | None = None, loaded: LoadedModel | None = None, **engine_args) -> None:
        self.engine = LLMEngine(EngineConfig(model=model, **engine_args), loaded)
        self._counter = 0

    def close(self) -> None:
        """Stops the tensor-parallel workers, if any."""
        self.engine.close()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: str | list[int] | Seq[str | list[int]],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Runs every prompt to completion; outputs in the prompts' order. A prompt is text
        or a list of token ids."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params_list = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(params_list)} sampling parameters for {len(prompts)} prompts")
        ids = []
        for prompt, p in zip(prompts, params_list):
            request_id = f"llm-{self._counter}"
            self._counter += 1
            self.engine.add_request(request_id, prompt, p, stream=False)
            ids.append(request_id)
        finished: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), desc="generating", unit="req", disable=not use_tqdm) as bar:
            while self.engine.has_unfinished():
                for output in self.engine.step():
                    if output.finished:
                        finished[output.request_id] = output
                        bar.update(1)
        if self.engine.profile.enabled:
            print(self.engine.profile.report(), file=sys.stderr)
        return [finished[i] for i in ids]

    def chat(self, messages: list[dict], sampling_params: SamplingParams | None = None,
             use_tqdm: bool = False) -> RequestOutput:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer, so no chat template")
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.generate([self.tokenizer.encode(prompt, add_special_tokens=False)], sampling_params,
                             use_tqdm)[0]
