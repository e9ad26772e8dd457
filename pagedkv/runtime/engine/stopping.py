"""When a sequence stops (EOS, stop tokens, stop strings, length), and its text."""
from __future__ import annotations

from pagedkv.kvcache.sequence import Sequence, SequenceStatus
from pagedkv.runtime.engine.outputs import CompletionOutput
from pagedkv.runtime.engine.sampling_params import SamplingParams
from pagedkv.runtime.models.config import ModelConfig
from pagedkv.runtime.models.tokenizer import Tokenizer


REPLACEMENT = "\ufffd"  # what decoding makes of an incomplete UTF-8 character


class StopChecker:
    def __init__(self, tokenizer: Tokenizer | None, config: ModelConfig) -> None:
        self.tokenizer = tokenizer
        self.eos = set(config.eos_token_ids)
        self.max_len = config.max_position_embeddings

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids) if self.tokenizer else ""

    def check(self, seq: Sequence, params: SamplingParams) -> SequenceStatus | None:
        """The status the sequence ends with after its newest token, or None to go on."""
        last = seq.token_ids[-1]
        if params.min_tokens and len(seq) - seq.prompt_len < params.min_tokens:
            # Nothing but the length ends it before min_tokens (as vLLM); a stop string that
            # ends in the text before then never counts, as vLLM looks at new text only.
            if params.stop and self.tokenizer:
                seq.searched_text = self.decode(seq.output_ids).rstrip(REPLACEMENT)
            return SequenceStatus.FINISHED_LENGTH if self.length_reached(seq, params) else None
        if (last in self.eos and not params.ignore_eos) or last in params.stop_token_set:
            return SequenceStatus.FINISHED_STOPPED
        if params.stop and self.tokenizer:
            text = self.decode(seq.output_ids)
            # Only what the new token can have completed needs a look, unless the text before
            # changed (decoding is not always prefix-stable; then it is all searched again).
            searched = len(seq.searched_text) if text.startswith(seq.searched_text) else 0
            cut = params.stop_strings.find(text, searched)
            if cut >= 0:
                # The stop string itself is not returned, unless include_stop_str_in_output.
                end = params.stop_strings.end_of(text, cut) if params.include_stop_str_in_output else cut
                seq.output_text = text[:end]
                return SequenceStatus.FINISHED_STOPPED
            # A trailing U+FFFD may be half a character that the next token completes.
            seq.searched_text = text.rstrip(REPLACEMENT)
        if self.length_reached(seq, params):
            return SequenceStatus.FINISHED_LENGTH
        return None

    def length_reached(self, seq: Sequence, params: SamplingParams) -> bool:
        """Whether the newest token (known or pending) is the last that max_tokens or the
        model's context allows."""
        return len(seq) - seq.prompt_len >= params.max_tokens or len(seq) >= self.max_len

    def completion(self, index: int, seq: Sequence, new_ids: list[int], params: SamplingParams) -> CompletionOutput:
        # Text is decoded once, when the sequence ends; streaming decodes deltas itself.
        text = ""
        if seq.is_finished:
            text = seq.output_text if seq.output_text is not None else self.decode(seq.output_ids)
        return CompletionOutput(index, list(seq.output_ids), text, seq.cumulative_logprob,
                                seq.status.value if seq.is_finished else None,
                                list(seq.output_logprobs) if params.logprobs is not None else None,
                                list(new_ids))
