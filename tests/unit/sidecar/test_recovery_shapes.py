"""The two stream shapes of mid-stream recovery, chunk by chunk: OpenAI chat completion chunks
and Anthropic Messages events, continued by a prefill or by a replay, never with a word
duplicated, lost or altered; a new answer that does not continue the delivered one diverges."""

from __future__ import annotations

from typing import Any, TypeVar

import orjson
import pytest

from sidecar.recovery.anthropic import AnthropicAnswer
from sidecar.recovery.base import Continuation, Diverged
from sidecar.recovery.openai import OpenAIAnswer
from sidecar.upstreams.base import UpstreamRequest

HI = [{"role": "user", "content": "What is the weather in Paris?"}]
CHAT_BODY = {"model": "gpt-4o-mini", "messages": HI, "stream": True}
CHAT = UpstreamRequest("chat", orjson.dumps(CHAT_BODY), CHAT_BODY, "key-1", "run-1", {"a": "b"})
MESSAGES_BODY = {"model": "claude-sonnet-4-5", "max_tokens": 256, "messages": HI, "stream": True}
MESSAGES = UpstreamRequest("messages", orjson.dumps(MESSAGES_BODY), MESSAGES_BODY, "key-2")


# OpenAI chat.completion.chunk objects


def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
    """One `chat.completion.chunk` of choice 0."""
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return orjson.dumps({"id": "chatcmpl-1", "object": "chat.completion.chunk",
                         "created": 1700000000, "model": "gpt-4o-mini",
                         "system_fingerprint": "fp_1", "choices": [choice], **extra})  # fmt: skip


def opening(**delta: Any) -> bytes:
    """The first chunk of an answer: the role (and an empty content or refusal)."""
    return chunk({"role": "assistant", "content": "", "refusal": None, **delta})


def text(piece: str) -> bytes:
    return chunk({"content": piece})


def finish(reason: str = "stop") -> bytes:
    return chunk({}, reason)


def usage_chunk() -> bytes:
    """The usage chunk `stream_options.include_usage` asks for: no choices."""
    usage = {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}
    return orjson.dumps({"id": "chatcmpl-1", "object": "chat.completion.chunk",
                         "created": 1700000000, "model": "gpt-4o-mini", "choices": [],
                         "usage": usage})  # fmt: skip


def tool_start(index: int, call_id: str, name: str) -> bytes:
    """A tool call's first delta: its id, type and name, no arguments yet."""
    call = {"index": index, "id": call_id, "type": "function",
            "function": {"name": name, "arguments": ""}}  # fmt: skip
    return chunk({"role": "assistant", "content": None, "tool_calls": [call], "refusal": None})


def tool_args(index: int, arguments: str) -> bytes:
    return chunk({"tool_calls": [{"index": index, "function": {"arguments": arguments}}]})


A = TypeVar("A", OpenAIAnswer, AnthropicAnswer)


def fed(answer: A, *chunks: bytes) -> A:
    """`answer` after the caller received `chunks`."""
    for data in chunks:
        answer.feed(data)
    return answer


def openai_answer(*chunks: bytes) -> OpenAIAnswer:
    return fed(OpenAIAnswer(), *chunks)


def deltas(chunks: list[bytes]) -> list[dict[str, Any]]:
    return [orjson.loads(data)["choices"][0]["delta"] for data in chunks]


def content_of(chunks: list[bytes]) -> str:
    """The text a caller reading these chunks has."""
    return "".join(delta.get("content") or "" for delta in deltas(chunks))


def tool_calls_of(chunks: list[bytes]) -> dict[int, dict[str, Any]]:
    """Each tool call as a caller has it: every id and type it was given (a client
    concatenates an id given twice), its name and its arguments."""
    calls: dict[int, dict[str, Any]] = {}
    for delta in deltas(chunks):
        for call in delta.get("tool_calls") or ():
            got = calls.setdefault(call["index"], {"ids": [], "types": [], "name": "",
                                                   "arguments": ""})  # fmt: skip
            if "id" in call:
                got["ids"].append(call["id"])
            if "type" in call:
                got["types"].append(call["type"])
            function = call.get("function") or {}
            got["name"] += function.get("name") or ""
            got["arguments"] += function.get("arguments") or ""
    return calls


def push_all(continuation: Continuation, chunks: list[bytes]) -> list[list[bytes]]:
    """What `push` returned for each chunk, the stream then ended."""
    out = [continuation.push(data) for data in chunks]
    continuation.end()
    return out


def flat(pushed: list[list[bytes]]) -> list[bytes]:
    return [data for out in pushed for data in out]


# OpenAI: replay


def test_openai_replay_passes_on_only_the_rest_of_the_text() -> None:
    """Nothing of a replay is passed on before it covers the delivered text; then the chunk
    that straddles the cut is trimmed to its new part, and the rest passes as it comes."""
    delivered = [opening(), text("Hel"), text("lo wor")]
    answer = openai_answer(*delivered)
    pushed = push_all(answer.replay(),
                      [opening(), text("Hello"), text(" world"), text("!"), finish()])  # fmt: skip
    assert pushed[:2] == [[], []]
    assert deltas(pushed[2]) == [{"content": "ld"}]
    assert pushed[3] == [text("!")]
    assert pushed[4] == [finish()]
    straddling = orjson.loads(pushed[2][0])
    assert straddling["id"] == "chatcmpl-1" and straddling["model"] == "gpt-4o-mini"
    assert straddling["choices"][0]["index"] == 0
    assert straddling["choices"][0]["finish_reason"] is None
    assert content_of(delivered) + content_of(flat(pushed)) == "Hello world!"


def test_openai_replay_covering_at_a_chunk_boundary_passes_on_from_the_next_chunk() -> None:
    """A replay chunk that ends exactly where the delivered text ended is dropped whole; the
    chunks after it, and a usage chunk without choices, pass unchanged."""
    answer = openai_answer(opening(), text("Hello"))
    pushed = push_all(answer.replay(),
                      [opening(), text("Hel"), text("lo"), text(" world"), finish(),
                       usage_chunk()])  # fmt: skip
    assert pushed == [[], [], [], [text(" world")], [finish()], [usage_chunk()]]


def test_openai_replay_of_a_tool_call_cut_mid_arguments() -> None:
    """A tool call cut mid-arguments and replayed with another id and other chunk boundaries:
    the caller ends with one tool call, its first id, its name once, its whole arguments."""
    delivered = [tool_start(0, "call_a", "get_weather"), tool_args(0, '{"ci')]
    answer = openai_answer(*delivered)
    replay = [tool_start(0, "call_b", "get_weather"), tool_args(0, '{"'),
              tool_args(0, 'city": '), tool_args(0, '"Paris"}'), finish("tool_calls")]  # fmt: skip
    pushed = push_all(answer.replay(), replay)
    assert pushed[:2] == [[], []]
    got = flat(pushed)
    assert b"call_b" not in b"".join(got)
    calls = tool_calls_of(delivered + got)
    assert calls == {0: {"ids": ["call_a"], "types": ["function"], "name": "get_weather",
                         "arguments": '{"city": "Paris"}'}}  # fmt: skip
    assert orjson.loads(got[-1])["choices"][0]["finish_reason"] == "tool_calls"


def test_openai_replay_passes_on_a_new_tool_call_with_its_id_and_type() -> None:
    """A tool call the caller has not seen begin (index 1) is passed on whole, its first
    delta with its own id and type, once."""
    delivered = [tool_start(0, "call_a", "get_weather"), tool_args(0, '{"ci')]
    answer = openai_answer(*delivered)
    replay = [tool_start(0, "call_b", "get_weather"), tool_args(0, '{"city": "Paris"}'),
              tool_start(1, "call_c", "get_time"), tool_args(1, '{"tz": "CET"}'),
              finish("tool_calls")]  # fmt: skip
    got = flat(push_all(answer.replay(), replay))
    calls = tool_calls_of(delivered + got)
    assert calls[0] == {"ids": ["call_a"], "types": ["function"], "name": "get_weather",
                        "arguments": '{"city": "Paris"}'}  # fmt: skip
    assert calls[1] == {"ids": ["call_c"], "types": ["function"], "name": "get_time",
                        "arguments": '{"tz": "CET"}'}  # fmt: skip


def test_openai_replay_diverges_when_the_text_differs_in_the_delivered_part() -> None:
    """A replay whose text differs from the delivered text before the cut diverges."""
    continuation = openai_answer(opening(), text("Hello wor")).replay()
    assert continuation.push(text("Hello")) == []
    with pytest.raises(Diverged):
        continuation.push(text(" there"))


def test_openai_replay_diverges_when_a_tool_call_differs() -> None:
    """A replayed tool call of another name, or of other arguments, diverges."""
    answer = openai_answer(tool_start(0, "call_a", "get_weather"), tool_args(0, '{"ci'))
    with pytest.raises(Diverged):
        answer.replay().push(tool_start(0, "call_b", "get_time"))
    continuation = answer.replay()
    continuation.push(tool_start(0, "call_b", "get_weather"))
    with pytest.raises(Diverged):
        continuation.push(tool_args(0, '{"co'))


def test_openai_replay_diverges_when_the_new_answer_finishes_short() -> None:
    """A replay that gives its finish_reason before covering the delivered text diverges."""
    continuation = openai_answer(opening(), text("Hello wor")).replay()
    assert continuation.push(opening()) == []
    assert continuation.push(text("Hello")) == []
    with pytest.raises(Diverged):
        continuation.push(finish())


def test_openai_replay_ended_before_coverage_diverges() -> None:
    """A replay stream that ends before it covered the delivered text diverges at `end`."""
    continuation = openai_answer(opening(), text("Hello wor")).replay()
    assert continuation.push(text("Hello")) == []
    with pytest.raises(Diverged):
        continuation.end()


# OpenAI: prefill


def test_openai_prefill_request_ends_with_the_delivered_text() -> None:
    """The prefill request is the original one with the params merged in and the delivered
    text as a last assistant message."""
    answer = openai_answer(opening(), text("Hel"), text("lo wor"))
    params = {"continue_final_message": True, "add_generation_prompt": False}
    made = answer.prefill(CHAT, params)
    assert made is not None
    request, _ = made
    assert request.body["messages"] == [*HI, {"role": "assistant", "content": "Hello wor"}]
    assert request.body == {**CHAT_BODY, **params, "messages": request.body["messages"]}
    assert orjson.loads(request.payload) == request.body
    assert (request.operation, request.idempotency_key, request.run_id, request.labels) == (
        "chat", "key-1", "run-1", {"a": "b"})  # fmt: skip
    assert CHAT.body["messages"] == HI  # the original request is left as it was


def test_openai_prefill_is_none_without_plain_text() -> None:
    """No prefill when a tool call was delivered, nor when no text was."""
    tools = openai_answer(opening(), text("Let me check."), tool_start(0, "call_a", "f"))
    assert tools.prefill(CHAT, {}) is None
    assert openai_answer(opening()).prefill(CHAT, {}) is None


def test_openai_prefilled_stream_drops_only_its_opening_role_chunk() -> None:
    """The prefilled stream's opening role-only chunk is dropped; its content chunks, the
    finish chunk and the usage chunk pass unchanged."""
    made = openai_answer(opening(), text("Hello wor")).prefill(CHAT, {})
    assert made is not None
    _, continuation = made
    stream = [opening(), text("ld"), text("!"), finish(), usage_chunk()]
    pushed = push_all(continuation, stream)
    assert pushed == [[], [text("ld")], [text("!")], [finish()], [usage_chunk()]]


def test_openai_answer_of_several_choices_is_refused() -> None:
    """A delivered chunk of two choices (n > 1) makes the answer unrecoverable, saying so."""
    answer = openai_answer(opening(), text("Hi"))
    assert answer.refusal is None
    two = orjson.loads(text("Hi"))
    two["choices"].append({**two["choices"][0], "index": 1})
    answer.feed(orjson.dumps(two))
    assert answer.refusal is not None and "n > 1" in answer.refusal


# Anthropic Messages events


def message_start() -> bytes:
    message: dict[str, Any] = {
        "id": "msg_01", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
        "content": [], "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": 12, "output_tokens": 1}}  # fmt: skip
    return orjson.dumps({"type": "message_start", "message": message})


def block_start(index: int, kind: str = "text", **tool: str) -> bytes:
    """content_block_start: a text block, or a tool_use block (`id`, `name`)."""
    block: dict[str, Any] = {"type": "text", "text": ""}
    if kind == "tool_use":
        block = {"type": "tool_use", "id": tool["id"], "name": tool["name"], "input": {}}
    return orjson.dumps({"type": "content_block_start", "index": index, "content_block": block})


def text_delta(index: int, piece: str) -> bytes:
    return orjson.dumps({"type": "content_block_delta", "index": index,
                         "delta": {"type": "text_delta", "text": piece}})  # fmt: skip


def json_delta(index: int, piece: str) -> bytes:
    return orjson.dumps({"type": "content_block_delta", "index": index,
                         "delta": {"type": "input_json_delta", "partial_json": piece}})  # fmt: skip


def block_stop(index: int) -> bytes:
    return orjson.dumps({"type": "content_block_stop", "index": index})


def message_delta(stop_reason: str = "end_turn") -> bytes:
    return orjson.dumps({"type": "message_delta",
                         "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                         "usage": {"output_tokens": 15}})  # fmt: skip


def message_stop() -> bytes:
    return orjson.dumps({"type": "message_stop"})


def anthropic_answer(*events: bytes) -> AnthropicAnswer:
    return fed(AnthropicAnswer(), *events)


def events(chunks: list[bytes]) -> list[dict[str, Any]]:
    return [orjson.loads(data) for data in chunks]


def block_texts(chunks: list[bytes]) -> dict[int, str]:
    """Each block's text (or partial JSON) as a caller reading these events has it."""
    texts: dict[int, str] = {}
    for event in events(chunks):
        if event["type"] == "content_block_delta":
            delta = event["delta"]
            piece = delta["text"] if delta["type"] == "text_delta" else delta["partial_json"]
            texts[event["index"]] = texts.get(event["index"], "") + piece
    return texts


# Anthropic: replay


def test_anthropic_replay_passes_on_only_the_rest_of_the_block() -> None:
    """The replay's message_start and the start of a block the caller has are dropped, its
    text held until it covers the delivered text; then only the new part, on the block's
    index, and the events after it unchanged."""
    delivered = [message_start(), block_start(0), text_delta(0, "Hel"), text_delta(0, "lo wor")]
    answer = anthropic_answer(*delivered)
    replay = [message_start(), block_start(0), text_delta(0, "Hello"), text_delta(0, " world"),
              block_stop(0), message_delta(), message_stop()]  # fmt: skip
    pushed = push_all(answer.replay(), replay)
    assert pushed[:3] == [[], [], []]
    assert pushed[3] == [text_delta(0, "ld")]
    assert pushed[4:] == [[block_stop(0)], [message_delta()], [message_stop()]]
    assert block_texts(delivered + flat(pushed)) == {0: "Hello world"}


def test_anthropic_replay_of_a_tool_use_block_keeps_the_delivered_id() -> None:
    """A tool_use block replayed with another id: its start is not passed on again, and its
    JSON goes on from where the caller's stopped."""
    delivered = [message_start(), block_start(0, "tool_use", id="toolu_a", name="get_weather"),
                 json_delta(0, '{"ci')]  # fmt: skip
    answer = anthropic_answer(*delivered)
    replay = [message_start(), block_start(0, "tool_use", id="toolu_b", name="get_weather"),
              json_delta(0, '{"city": '), json_delta(0, '"Paris"}'), block_stop(0),
              message_delta("tool_use"), message_stop()]  # fmt: skip
    got = flat(push_all(answer.replay(), replay))
    assert b"toolu_b" not in b"".join(got)
    assert got[0] == json_delta(0, 'ty": ')
    assert block_texts(delivered + got) == {0: '{"city": "Paris"}'}


def test_anthropic_replay_diverges_on_a_block_of_another_type() -> None:
    """A replay whose block 0 is a tool_use where the caller has text diverges."""
    continuation = anthropic_answer(message_start(), block_start(0), text_delta(0, "Hi")).replay()
    assert continuation.push(message_start()) == []
    with pytest.raises(Diverged):
        continuation.push(block_start(0, "tool_use", id="toolu_b", name="get_weather"))


def test_anthropic_replay_diverges_on_a_tool_of_another_name() -> None:
    """A replayed tool_use block calling another tool diverges."""
    answer = anthropic_answer(message_start(),
                              block_start(0, "tool_use", id="toolu_a", name="get_weather"),
                              json_delta(0, '{"ci'))  # fmt: skip
    with pytest.raises(Diverged):
        answer.replay().push(block_start(0, "tool_use", id="toolu_b", name="get_time"))


def test_anthropic_replay_diverges_when_the_text_differs() -> None:
    """A replayed block whose text differs from the delivered text diverges."""
    answer = anthropic_answer(message_start(), block_start(0), text_delta(0, "Hello wor"))
    continuation = answer.replay()
    continuation.push(block_start(0))
    with pytest.raises(Diverged):
        continuation.push(text_delta(0, "Hello there"))


def test_anthropic_replay_diverges_when_the_message_ends_short() -> None:
    """A replay's message_delta before it covered the delivered blocks diverges, as does
    its end."""
    answer = anthropic_answer(message_start(), block_start(0), text_delta(0, "Hello wor"))
    continuation = answer.replay()
    for data in (message_start(), block_start(0), text_delta(0, "Hello")):
        assert continuation.push(data) == []
    with pytest.raises(Diverged):
        continuation.push(message_delta())
    short = answer.replay()
    short.push(block_start(0))
    with pytest.raises(Diverged):
        short.end()


def test_anthropic_replay_diverges_when_a_stopped_block_grows() -> None:
    """A block the caller saw end (content_block_stop) must end with the same text in the
    replay: a longer one diverges rather than sending deltas after the block's stop."""
    answer = anthropic_answer(message_start(), block_start(0), text_delta(0, "Hello"),
                              block_stop(0))  # fmt: skip
    replay = [message_start(), block_start(0), text_delta(0, "Hello"), text_delta(0, " world"),
              block_stop(0), message_delta(), message_stop()]  # fmt: skip
    with pytest.raises(Diverged):
        push_all(answer.replay(), replay)


# Anthropic: prefill


def test_anthropic_prefill_leaves_out_trailing_white_space() -> None:
    """The prefill is the delivered text without its trailing space (which the API refuses);
    that space is taken off the continuation's first delta, passed on the delivered block's
    index; the continuation's message_start and its block 0 start are dropped."""
    delivered = [message_start(), block_start(0), text_delta(0, "Hel"), text_delta(0, "lo ")]
    made = anthropic_answer(*delivered).prefill(MESSAGES, {"temperature": 0})
    assert made is not None
    request, continuation = made
    assert request.body["messages"] == [*HI, {"role": "assistant", "content": "Hello"}]
    assert request.body["temperature"] == 0 and request.body["max_tokens"] == 256
    assert orjson.loads(request.payload) == request.body
    assert request.idempotency_key == "key-2"
    stream = [message_start(), block_start(0), text_delta(0, " world"), text_delta(0, "!"),
              block_stop(0), message_delta(), message_stop()]  # fmt: skip
    pushed = push_all(continuation, stream)
    assert pushed == [[], [], [text_delta(0, "world")], [text_delta(0, "!")], [block_stop(0)],
                      [message_delta()], [message_stop()]]  # fmt: skip
    assert block_texts(delivered + flat(pushed)) == {0: "Hello world!"}


def test_anthropic_prefill_after_a_stopped_block_numbers_the_new_blocks_after_it() -> None:
    """With the delivered block stopped, the continuation's blocks are begun (their starts
    kept) and numbered after it."""
    delivered = [message_start(), block_start(0), text_delta(0, "Hello."), block_stop(0)]
    made = anthropic_answer(*delivered).prefill(MESSAGES, {})
    assert made is not None
    request, continuation = made
    assert request.body["messages"][-1] == {"role": "assistant", "content": "Hello."}
    stream = [message_start(), block_start(0), text_delta(0, " Bye."), block_stop(0),
              block_start(1, "tool_use", id="toolu_a", name="get_weather"),
              json_delta(1, "{}"), block_stop(1), message_delta("tool_use")]  # fmt: skip
    pushed = push_all(continuation, stream)
    assert pushed == [[], [block_start(1)], [text_delta(1, " Bye.")], [block_stop(1)],
                      [block_start(2, "tool_use", id="toolu_a", name="get_weather")],
                      [json_delta(2, "{}")], [block_stop(2)],
                      [message_delta("tool_use")]]  # fmt: skip


def test_anthropic_prefill_is_none_after_a_tool_use_block() -> None:
    """No prefill once a tool_use block was delivered, nor without any text."""
    answer = anthropic_answer(message_start(), block_start(0), text_delta(0, "Let me check."),
                              block_stop(0),
                              block_start(1, "tool_use", id="toolu_a", name="get_weather"),
                              json_delta(1, '{"ci'))  # fmt: skip
    assert answer.prefill(MESSAGES, {}) is None
    assert anthropic_answer(message_start()).prefill(MESSAGES, {}) is None
    blank = anthropic_answer(message_start(), block_start(0), text_delta(0, " \n"))
    assert blank.prefill(MESSAGES, {}) is None


def test_anthropic_prefill_does_not_merge_a_tool_use_into_the_open_text_block() -> None:
    """A continuation that begins with a tool_use block, after a text block cut open: either
    it diverges, or each JSON delta goes to a tool_use block the caller saw begin."""
    delivered = [message_start(), block_start(0), text_delta(0, "Let me check")]
    made = anthropic_answer(*delivered).prefill(MESSAGES, {})
    assert made is not None
    _, continuation = made
    stream = [message_start(), block_start(0, "tool_use", id="toolu_a", name="get_weather"),
              json_delta(0, '{"city": "Paris"}'), block_stop(0),
              message_delta("tool_use")]  # fmt: skip
    try:
        got = flat(push_all(continuation, stream))
    except Diverged:
        return
    kinds = {e["index"]: e["content_block"]["type"]
             for e in events(delivered + got) if e["type"] == "content_block_start"}  # fmt: skip
    for event in events(got):
        if event["type"] == "content_block_delta":
            expected = "tool_use" if event["delta"]["type"] == "input_json_delta" else "text"
            assert kinds.get(event["index"]) == expected


def test_anthropic_prefill_does_not_repeat_delivered_white_space() -> None:
    """Delivered "Para one.\\n\\n", continued after the prefill "Para one." with "\\nPara
    two.": the caller's newlines are not added to again."""
    delivered = [message_start(), block_start(0), text_delta(0, "Para one.\n\n")]
    made = anthropic_answer(*delivered).prefill(MESSAGES, {})
    assert made is not None
    request, continuation = made
    assert request.body["messages"][-1]["content"] == "Para one."
    stream = [message_start(), block_start(0), text_delta(0, "\nPara two."), block_stop(0)]
    got = flat(push_all(continuation, stream))
    assert block_texts(delivered + got) == {0: "Para one.\n\nPara two."}


def test_openai_replay_after_the_finish_passes_nothing_more() -> None:
    """Cut after the caller had the finish_reason (before the usage chunk or [DONE]): the
    replay adds no text and no second finish chunk; a longer replay diverges."""
    delivered = [opening(), text("Hello"), finish()]
    same = push_all(openai_answer(*delivered).replay(), [opening(), text("Hello"), finish()])
    assert flat(same) == []
    longer = openai_answer(*delivered).replay()
    push_all(longer, [opening(), text("Hello")])
    with pytest.raises(Diverged):
        longer.push(text(" world"))
    assert openai_answer(*delivered).prefill(CHAT, {}) is None


def test_anthropic_replay_after_the_message_delta_passes_nothing_more() -> None:
    """Cut between message_delta and message_stop: the replay's message_delta is not passed
    on again, and a replay with more blocks diverges."""
    delivered = [message_start(), block_start(0), text_delta(0, "Hello"), block_stop(0),
                 message_delta()]  # fmt: skip
    replay = anthropic_answer(*delivered).replay()
    assert flat(push_all(replay, delivered)) == []
    longer = anthropic_answer(*delivered).replay()
    push_all(longer, delivered[:4])
    with pytest.raises(Diverged):
        longer.push(block_start(1))


# What the review of the first version found


def test_openai_replay_keeps_fields_it_does_not_know_and_legacy_function_calls() -> None:
    """Every string of the delta is a channel: a `reasoning` field (OpenRouter, newer vLLM)
    and a legacy `function_call` cut mid-arguments are trimmed and passed on like content,
    never dropped (a truncated call is never made to look complete)."""
    call = {"name": "get_weather", "arguments": '{"city": "Pa'}
    delivered = [opening(), chunk({"reasoning": "Let me th"}), chunk({"function_call": call})]
    replay = openai_answer(*delivered).replay()
    new = [opening(), chunk({"reasoning": "Let me think."}),
           chunk({"function_call": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}),
           finish("function_call")]  # fmt: skip
    out = deltas(flat(push_all(replay, new))[:-1])
    assert out == [{"reasoning": "ink."}, {"function_call": {"arguments": 'ris"}'}}]


def test_openai_trimmed_chunk_loses_its_logprobs() -> None:
    """The chunk that straddles the cut would repeat delivered tokens' logprobs: it has none."""
    replay = openai_answer(opening(), text("Hel")).replay()
    logprobs = {"content": [{"token": "Hello", "logprob": -0.1, "bytes": None,
                             "top_logprobs": []}]}  # fmt: skip
    with_logprobs = orjson.loads(text("Hello"))
    with_logprobs["choices"][0]["logprobs"] = logprobs
    out = flat(push_all(replay, [orjson.dumps(with_logprobs)]))
    assert orjson.loads(out[0])["choices"][0]["logprobs"] is None
    assert deltas(out) == [{"content": "lo"}]


def test_openai_usage_chunk_is_not_passed_twice_and_a_finished_answer_is_complete() -> None:
    """After the finish and the usage chunk reached the caller the answer is complete; a
    replay would not pass the usage chunk again."""
    answer = openai_answer(opening(), text("Hi"), finish(), usage_chunk())
    assert answer.complete and answer.usage_sent
    assert flat(push_all(answer.replay(), [opening(), text("Hi"), finish(), usage_chunk()])) == []
    assert not openai_answer(opening(), text("Hi")).complete


def test_openai_prefill_extends_the_callers_own_prefill() -> None:
    """A request that already ends with the assistant's words (its own prefill) is extended,
    not given a second assistant turn."""
    body = {**CHAT_BODY, "messages": [*HI, {"role": "assistant", "content": "The weather"}]}
    request = UpstreamRequest("chat", orjson.dumps(body), body)
    made = openai_answer(opening(), text(" in Paris")).prefill(request, {})
    assert made is not None
    assert made[0].body["messages"][-1] == {"role": "assistant", "content": "The weather in Paris"}
    assert len(made[0].body["messages"]) == 2


def citation(index: int) -> bytes:
    citation = {"type": "web_search_result_location", "url": "https://example.com",
                "title": "Example", "cited_text": "x", "encrypted_index": "e"}  # fmt: skip
    return orjson.dumps({"type": "content_block_delta", "index": index,
                         "delta": {"type": "citations_delta", "citation": citation}})  # fmt: skip


def test_anthropic_replay_passes_deltas_it_does_not_compare_once() -> None:
    """A citations_delta the caller had is not passed again; the replay's next one is."""
    delivered = [message_start(), block_start(0), text_delta(0, "Par"), citation(0)]
    replay = anthropic_answer(*delivered).replay()
    new = [message_start(), block_start(0), text_delta(0, "Paris"), citation(0), citation(0),
           block_stop(0), message_delta()]  # fmt: skip
    out = events(flat(push_all(replay, new)))
    assert [e["delta"]["type"] for e in out if e["type"] == "content_block_delta"] == [
        "text_delta", "citations_delta"]  # fmt: skip


def test_anthropic_prefill_passes_other_deltas_while_white_space_is_pending() -> None:
    """A citations_delta at the continuation's start is passed on, not taken for text."""
    answer = anthropic_answer(message_start(), block_start(0), text_delta(0, "Paris, "))
    made = answer.prefill(MESSAGES, {})
    assert made is not None
    _, continuation = made
    out = events(continuation.push(citation(0)) + continuation.push(text_delta(0, " France")))
    assert [e["delta"]["type"] for e in out] == ["citations_delta", "text_delta"]
    assert out[1]["delta"]["text"] == "France"
