"""Protocol parsing and streamed text deltas, without a server."""
import msgpack
import pytest

from pagedkv.runtime.serving.protocol import BAD_REQUEST, TOO_LONG, ProtocolError, decode_message
from pagedkv.runtime.serving.streaming import TextStream


def _decode(message, max_chars=1000):
    return decode_message(msgpack.packb(message), max_chars)


def test_generate_message_is_parsed_into_sampling_params():
    msg = _decode({"type": "generate", "id": 3, "prompt": "hi", "stream": True,
                   "params": {"max_tokens": 5, "temperature": 0.5, "n": 2, "seed": 1}})
    assert (msg.type, msg.id, msg.prompt, msg.stream) == ("generate", 3, "hi", True)
    assert (msg.params.max_tokens, msg.params.temperature, msg.params.n, msg.params.seed) == (5, 0.5, 2, 1)


@pytest.mark.parametrize("message, code, request_id, words", [
    ({"type": "generate", "id": True, "prompt": "x"}, BAD_REQUEST, None, "'id'"),
    ({"type": "generate", "id": "x" * 300, "prompt": "x"}, BAD_REQUEST, None, "'id'"),
    ({"type": "generate", "id": 1, "prompt": "x", "params": {"top_p": 0}}, BAD_REQUEST, 1, "top_p"),
    ({"type": "generate", "id": 1, "prompt": "x", "params": {"max_tokens": "9"}}, BAD_REQUEST, 1, "max_tokens"),
    ({"type": "generate", "id": 1, "prompt_ids": [1, True]}, BAD_REQUEST, 1, "integers"),
    ({"type": "generate", "id": 1, "messages": []}, BAD_REQUEST, 1, "messages"),
    ({"type": "generate", "id": 1, "prompt": "x" * 1001}, TOO_LONG, 1, "1001 characters"),
    ({"type": "generate", "id": 1, "messages": [{"role": "user", "content": "x" * 1001}]}, TOO_LONG, 1, "1005"),
    ({"type": "stats", "id": 1, "verbose": True}, BAD_REQUEST, 1, "verbose"),
    ({"type": "generate", "id": 1, "prompt": "x", "clamp_max_tokens": 0}, BAD_REQUEST, 1, "clamp_max_tokens"),
    ({"type": "health", "id": 1, "requests": "g"}, BAD_REQUEST, 1, "requests"),
    ({"type": "health", "id": 1, "requests": list(range(257))}, BAD_REQUEST, 1, "at most 256"),
    ({"type": "health", "id": 1, "requests": [True]}, BAD_REQUEST, 1, "requests"),
])
def test_bad_messages_name_what_is_wrong(message, code, request_id, words):
    with pytest.raises(ProtocolError) as e:
        _decode(message)
    assert (e.value.code, e.value.request_id) == (code, request_id)
    assert words in e.value.message


def _byte_decoder(vocab: dict[int, bytes]):
    return lambda ids: b"".join(vocab[i] for i in ids).decode("utf-8", errors="replace")


def test_stream_holds_back_an_incomplete_utf8_character():
    euro = "€".encode()  # three bytes, one token each
    stream = TextStream(_byte_decoder({1: b"a", 2: euro[:1], 3: euro[1:2], 4: euro[2:], 5: b"b"}), stop=[])
    assert [stream.push([i]) for i in (1, 2, 3, 4, 5)] == ["a", "", "", "€", "b"]
    assert stream.finish("a€b") == ""


def test_stream_holds_back_what_could_begin_a_stop_string_and_finish_completes_the_text():
    vocab = {i: c.encode() for i, c in enumerate("abcdefXY", start=1)}
    stream = TextStream(_byte_decoder(vocab), stop=["XYZ"])
    deltas = [stream.push([i]) for i in (1, 2, 3, 7, 8)]  # "abcXY": "XY" may begin "XYZ"
    assert "".join(deltas) == "abc"
    # The engine stopped on some other condition; the final text includes "XY".
    assert "".join(deltas) + stream.finish("abcXY") == "abcXY"


def test_stream_deltas_concatenate_to_the_decoded_text():
    vocab = {i: bytes([96 + i]) for i in range(1, 27)}
    stream = TextStream(_byte_decoder(vocab), stop=["q"])
    ids = [8, 5, 12, 12, 15]
    text = "".join(stream.push([i]) for i in ids)
    assert text + stream.finish("hello") == "hello"


def _nested(depth: int):
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("field", ["type", "stream", "temperature", "stop"])
def test_deeply_nested_values_are_a_bad_request_with_the_id(field):
    """msgpack nested 1,000 deep used to raise RecursionError while the error message quoted it."""
    message = {"type": "generate", "id": "deep", "prompt": "x", "params": {}}
    if field in ("type", "stream"):
        message[field] = _nested(1000)
    else:
        message["params"][field] = _nested(1000)
    with pytest.raises(ProtocolError) as e:
        decode_message(msgpack.packb(message), 1000)
    assert (e.value.code, e.value.request_id) == (BAD_REQUEST, "deep")
    assert len(e.value.message) < 500


@pytest.mark.parametrize("where", ["type", "stream", "temperature", "stop", "field name"])
def test_an_error_quotes_at_most_a_few_hundred_characters_of_a_bad_value(where):
    huge = "7" * 2_000_000
    message = {"type": "generate", "id": 1, "prompt": "x", "params": {}}
    if where in ("type", "stream"):
        message[where] = huge
    elif where == "field name":
        message[huge] = 1
    else:
        message["params"][where] = huge if where == "temperature" else [huge, 3]
    with pytest.raises(ProtocolError) as e:
        decode_message(msgpack.packb(message), 1000)
    assert e.value.code == BAD_REQUEST and len(e.value.message) < 500, len(e.value.message)


@pytest.mark.parametrize("messages, words", [
    ([{"role": "x" * 1001, "content": ""}], "1001 characters"),                  # a 15 MiB role, scaled down
    ([{"role": "user", "content": ""}] * 40, "40 messages"),                     # 700,000 empty messages, scaled
])
def test_chat_size_counts_roles_and_messages_before_any_template_runs(messages, words):
    with pytest.raises(ProtocolError) as e:
        decode_message(msgpack.packb({"type": "generate", "id": 2, "messages": messages}), 1000)
    assert (e.value.code, e.value.request_id) == (TOO_LONG, 2)
    assert words in e.value.message


@pytest.mark.parametrize("params, words", [
    ({"max_tokens": 2**64 - 1}, "max_tokens"),
    ({"max_tokens": 2**63}, "max_tokens"),
    ({"seed": 2**63}, "seed"),
    ({"seed": -(2**63)}, None),
    ({"top_k": 2**64 - 1}, "top_k"),
    ({"n": 2**63}, "n"),
    ({"beam_width": 2**64 - 1}, "beam_width"),
    ({"stop_token_ids": [5, 2**64 - 1]}, "stop_token_ids"),
], ids=lambda x: str(x) if isinstance(x, dict) else None)
def test_integers_beyond_int64_are_a_bad_request(params, words):
    """msgpack carries integers up to 2**64 - 1; parameters are signed 64-bit, as in vLLM."""
    message = {"type": "generate", "id": 4, "prompt": "x", "params": params}
    if words is None:
        assert _decode(message).params.seed == params["seed"]
        return
    with pytest.raises(ProtocolError) as e:
        _decode(message)
    assert (e.value.code, e.value.request_id) == (BAD_REQUEST, 4)
    assert words in e.value.message and "64-bit" in e.value.message


def _with_raw_string(message: dict, field: str, utf8: bytes) -> bytes:
    """The message packed with `field`'s string made of these bytes, valid UTF-8 or not."""
    packed = msgpack.packb({**message, field: "\x00PLACEHOLDER\x00"})
    return packed.replace(msgpack.packb("\x00PLACEHOLDER\x00"), b"\xd9" + bytes([len(utf8)]) + utf8)


@pytest.mark.parametrize("field", ["prompt", "id"])
def test_a_lone_surrogate_is_a_bad_request(field):
    """CESU-style bytes of U+D800: no valid UTF-8, so no string; msgpack refuses to decode it."""
    payload = _with_raw_string({"type": "generate", "id": 8, "prompt": "x"}, field, b"a\xed\xa0\x80b")
    with pytest.raises(ProtocolError) as e:
        decode_message(payload, 1000)
    assert e.value.code == BAD_REQUEST and "msgpack" in e.value.message


def test_chat_messages_carry_tool_calls_and_the_chat_options():
    calls = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"x": 1}}}]
    msg = _decode({"type": "generate", "id": 1, "messages": [
        {"role": "user", "content": "hi", "name": "ann"},
        {"role": "assistant", "content": None, "tool_calls": calls},
        {"role": "tool", "content": "42", "tool_call_id": "c1"}],
        "chat": {"tools": [{"type": "function", "function": {"name": "f"}}], "add_generation_prompt": True}})
    assert msg.messages[1]["tool_calls"] == calls and msg.chat["tools"][0]["function"]["name"] == "f"


@pytest.mark.parametrize("message, words", [
    ({"type": "generate", "id": 1, "messages": [{"role": "user", "content": "x", "weight": 1}]}, "'messages'"),
    ({"type": "generate", "id": 1, "messages": [{"role": "user", "content": "x", "tool_calls": "f"}]},
     "'messages'"),
    ({"type": "generate", "id": 1, "messages": [{"role": "user", "content": "x"}], "chat": {"tool": []}}, "'chat'"),
    ({"type": "generate", "id": 1, "prompt": "x", "chat": {}}, "'chat' goes with 'messages'"),
    ({"type": "generate", "id": 1, "messages": [{"role": "user", "content": "x"}],
      "chat": {"add_generation_prompt": True, "continue_final_message": True}}, "exclude each other"),
    ({"type": "generate", "id": 1, "prompt": "x", "params": {"guided_json": {}}}, "guided_json"),
    ({"type": "tokenize", "id": 1, "prompt_ids": [1]}, "prompt_ids"),
    ({"type": "tokenize", "id": 1, "prompt": "x", "add_special_tokens": 1}, "add_special_tokens"),
    ({"type": "detokenize", "id": 1, "tokens": ["a"]}, "'tokens'"),
    ({"type": "detokenize", "id": 1, "tokens": [1], "skip": True}, "skip"),
])
def test_bad_chat_and_tokenizer_messages(message, words):
    with pytest.raises(ProtocolError) as e:
        _decode(message)
    assert e.value.code == BAD_REQUEST and words in e.value.message


def test_tokenize_and_detokenize_messages():
    msg = _decode({"type": "tokenize", "id": 1, "prompt": "hi"})
    assert (msg.prompt, msg.add_special_tokens) == ("hi", True)
    msg = _decode({"type": "tokenize", "id": 1, "messages": [{"role": "user", "content": "hi"}]})
    assert msg.add_special_tokens is False  # a chat template writes its own special tokens
    assert _decode({"type": "detokenize", "id": 2, "tokens": [5, 6]}).tokens == [5, 6]


def test_prompt_logprobs_travel_as_triples_with_the_prompt_and_its_texts():
    from pagedkv.runtime.engine.outputs import CompletionOutput, RequestOutput
    from pagedkv.runtime.serving.protocol import final_reply
    from pagedkv.runtime.serving.streaming import RequestStream

    msg = _decode({"type": "generate", "id": 1, "prompt": "x", "params": {"prompt_logprobs": 3}})
    assert msg.params.prompt_logprobs == 3
    for bad in (-1, 21, "1", True):
        with pytest.raises(ProtocolError, match="prompt_logprobs"):
            _decode({"type": "generate", "id": 1, "prompt": "x", "params": {"prompt_logprobs": bad}})
    output = RequestOutput("r", [4, 5, 6], [CompletionOutput(0, [7], "g", -0.5, "length")], True,
                           prompt_logprobs=[None, {5: (-2.5, 3), 9: (-0.5, 1)}, {6: (-0.25, 1)}])
    texts = {4: "d", 5: "e", 6: "f", 9: "i"}
    reply = final_reply(1, output, texts.__getitem__)
    assert reply["prompt_token_ids"] == [4, 5, 6]
    assert reply["prompt_logprobs"] == [None, [[5, -2.5, 3], [9, -0.5, 1]], [[6, -0.25, 1]]]
    assert reply["prompt_token_texts"] == texts
    assert msgpack.unpackb(msgpack.packb(reply), strict_map_key=False)["prompt_logprobs"][1][0] == [5, -2.5, 3]
    assert "prompt_logprobs" not in final_reply(1, RequestOutput("r", [4], [], True), texts.__getitem__)
    stream = RequestStream(lambda ids: "", [], texts.__getitem__)
    assert stream.prompt_fields(output)["prompt_token_texts"] == texts
    assert stream.prompt_fields(output) == {}  # once
