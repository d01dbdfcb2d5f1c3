"""The Anthropic Messages API (`/v1/messages`) on the manager's port, with the official client.

The pure translations are tested on their own first; then a real manager, real workers and
the real SmolLM2 model answer the `anthropic` SDK, the way Claude Code calls them: model
names such as `claude-sonnet-4-6` reach the local models through `claude-*`
alias patterns.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anthropic
import httpx
import jsonschema
import pytest
from anthropic.types import MessageParam as SdkMessage
from anthropic.types import ToolChoiceParam
from anthropic.types import ToolParam as SdkTool

from model_service.engine import StopMatcher
from pool_manager.anthropic_api import (
    AnthropicError,
    MessageStream,
    from_openai_error,
    openai_chat_request,
    sse_frame,
    translate,
)
from pool_manager.anthropic_protocol import MessagesRequest, PingEvent, TextBlock, ToolUseBlock
from pool_manager.config import ModelSpec, match_alias
from pool_manager.ports import free_port
from tests.conftest import (
    Manager,
    ManagerFactory,
    free_port_range,
    model_entry,
    pid_alive,
    wait_for,
    write_setup,
)

MAIN = "local/main:1"
SMALL = "local/small:1"
SONNET = "claude-sonnet-4-6"
HAIKU = "claude-haiku-4-5-20251001"
HELLO: list[SdkMessage] = [{"role": "user", "content": "Say hello"}]
WEATHER: SdkTool = {
    "name": "get_weather",
    "description": "The current weather in a city.",
    "input_schema": {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        },
        "required": ["city", "unit"],
    },
}
TIME: SdkTool = {
    "name": "get_time",
    "description": "The current time in a timezone.",
    "input_schema": {
        "type": "object",
        "properties": {"timezone": {"type": "string"}},
        "required": ["timezone"],
    },
}
ASK_WEATHER: list[SdkMessage] = [{"role": "user", "content": "What is the weather in Paris?"}]
CLIENT_KEY = "client-key-anthropic-5d1e"
# The SDK has no `temperature` argument any more; the API (and this server) still take it.
GREEDY = {"temperature": 0}
ADMIN_KEY = "admin-key-anthropic-9a07"


# --- pure translations ---------------------------------------------------------------------


def request(**fields: Any) -> MessagesRequest:
    return MessagesRequest.model_validate(
        {"model": SONNET, "max_tokens": 64, "messages": HELLO, **fields}
    )


def test_history_translates_to_openai_messages() -> None:
    call = request(
        system=[{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind."}],
        messages=[
            {"role": "user", "content": "Weather in Paris and Rome?"},
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "hm", "signature": "x"},
                    {"type": "text", "text": "Let me look."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"c": 1}},
                    {"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Here you are.", "cache_control": {"type": "x"}},
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "20 C"},
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_2",
                        "content": [{"type": "text", "text": "no such city"}],
                        "is_error": True,
                    },
                ],
            },
        ],
        metadata={"user_id": "user-7"},
        top_k=5,
        thinking={"type": "enabled", "budget_tokens": 1024},
        some_future_field=True,
    )
    body = openai_chat_request(call, MAIN, context=None)
    assert body["model"] == MAIN and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["user"] == "user-7" and "top_k" not in body and "thinking" not in body
    assert body["messages"] == [
        {"role": "system", "content": "Be brief.\n\nBe kind."},
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {
            "role": "assistant",
            "content": "Let me look.",
            "tool_calls": [
                {
                    "id": "toolu_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"c": 1}'},
                },
                {
                    "id": "toolu_2",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": "{}"},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "toolu_1", "content": "20 C"},
        {"role": "tool", "tool_call_id": "toolu_2", "content": "Error: no such city"},
        {"role": "user", "content": "Here you are."},
    ]
    only_calls = request(
        messages=[
            *HELLO,
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f"}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t"}]},
        ]
    )
    messages = openai_chat_request(only_calls, MAIN, context=None)["messages"]
    assert messages[1]["content"] is None and messages[1]["tool_calls"][0]["id"] == "t"
    assert messages[2:] == [{"role": "tool", "tool_call_id": "t", "content": ""}], (
        "no empty user message after the results"
    )


def test_tools_choice_and_limits_translate() -> None:
    server_tool = {"type": "web_search_20250305", "name": "web_search"}
    base = {"tools": [WEATHER, TIME, server_tool]}
    body = openai_chat_request(
        request(**base, tool_choice={"type": "any"}, temperature=0, top_p=0.5), MAIN, 1024
    )
    assert [t["function"]["name"] for t in body["tools"]] == ["get_weather", "get_time"]
    assert body["tools"][0] == {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": WEATHER["description"],
            "parameters": WEATHER["input_schema"],
        },
    }
    assert body["tool_choice"] == "required" and "parallel_tool_calls" not in body
    assert body["temperature"] == 0 and body["top_p"] == 0.5
    named = openai_chat_request(
        request(
            **base,
            tool_choice={"type": "tool", "name": "get_time", "disable_parallel_tool_use": True},
        ),
        MAIN,
        None,
    )
    assert named["tool_choice"] == {"type": "function", "function": {"name": "get_time"}}
    assert named["parallel_tool_calls"] is False
    assert openai_chat_request(request(**base), MAIN, None).get("tool_choice") is None
    none = openai_chat_request(request(**base, tool_choice={"type": "none"}), MAIN, None)
    assert none["tool_choice"] == "none"
    auto = openai_chat_request(request(**base, tool_choice={"type": "auto"}), MAIN, None)
    assert auto["tool_choice"] == "auto"
    assert "tools" not in openai_chat_request(request(tools=[server_tool]), MAIN, None)

    assert openai_chat_request(request(max_tokens=32000), MAIN, 1024)["max_tokens"] == 1024
    assert openai_chat_request(request(max_tokens=100), MAIN, 1024)["max_tokens"] == 100
    assert openai_chat_request(request(max_tokens=32000), MAIN, None)["max_tokens"] == 32000

    for bad, words in (
        ({**base, "tool_choice": {"type": "tool", "name": "nope"}}, "no tool named 'nope'"),
        ({"tools": [{"name": "x"}]}, "needs an input_schema"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
            "image content blocks are not supported",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "tool_result",
                                "tool_use_id": "t",
                                "content": [{"type": "image", "source": {}}],
                            }
                        ],
                    }
                ]
            },
            "image content blocks are not supported",
        ),
    ):
        with pytest.raises(AnthropicError) as refused:
            openai_chat_request(request(**bad), MAIN, None)
        assert refused.value.status == 400 and words in refused.value.message
        assert refused.value.type == "invalid_request_error"


def chunk(
    content: str | None = None,
    calls: list[dict[str, Any]] | None = None,
    finish: str | None = None,
) -> dict[str, Any]:
    delta: dict[str, Any] = {}
    if content is not None:
        delta["content"] = content
    if calls is not None:
        delta["tool_calls"] = calls
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


USAGE = {
    "choices": [],
    "usage": {
        "prompt_tokens": 30,
        "completion_tokens": 7,
        "total_tokens": 37,
        "prompt_tokens_details": {"cached_tokens": 12},
    },
}


def run(stream: MessageStream, chunks: list[dict[str, Any]]) -> list[Any]:
    events = stream.start()
    for part in chunks:
        events += stream.feed(part)
        if stream.stopped:
            break
    return events + stream.finish()


def test_stream_of_text_becomes_events_and_a_message() -> None:
    stream = MessageStream("msg_1", SONNET, [])
    events = run(
        stream,
        [chunk(""), chunk("Hel"), chunk("lo"), chunk(None, finish="length"), USAGE],
    )
    assert [e.type for e in events] == [
        "message_start",
        "ping",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert events[0].message.content == [] and events[0].message.model == SONNET
    assert events[2].content_block.type == "text" and events[2].content_block.text == ""
    assert [e.delta.text for e in events[3:5]] == ["Hel", "lo"]
    assert events[6].delta.stop_reason == "max_tokens"
    usage = events[6].usage
    assert (usage.input_tokens, usage.cache_read_input_tokens, usage.output_tokens) == (18, 12, 7)
    message = stream.message()
    assert message.id == "msg_1" and message.stop_reason == "max_tokens"
    assert [b.model_dump() for b in message.content] == [{"type": "text", "text": "Hello"}]
    assert message.usage.cache_creation_input_tokens == 0

    frame = sse_frame(PingEvent()).decode()
    assert frame == 'event: ping\ndata: {"type":"ping"}\n\n'


def test_streamed_tool_calls_become_tool_use_blocks() -> None:
    stream = MessageStream("msg_2", SONNET, ["never"])
    first = {"index": 0, "id": "call_a", "type": "function", "function": {"name": "get_weather"}}
    second = {"index": 1, "id": "call_b", "function": {"name": "get_time", "arguments": ""}}
    events = run(
        stream,
        [
            chunk("Checking"),
            chunk(None, [first]),
            chunk(None, [{"index": 0, "function": {"arguments": '{"city": '}}]),
            chunk(None, [{"index": 0, "function": {"arguments": '"Paris"}'}}]),
            chunk(None, [second]),
            chunk(None, finish="tool_calls"),
            USAGE,
        ],
    )
    kinds = [(e.type, getattr(e, "index", None)) for e in events]
    assert kinds == [
        ("message_start", None),
        ("ping", None),
        ("content_block_start", 0),
        ("content_block_delta", 0),
        ("content_block_stop", 0),
        ("content_block_start", 1),
        ("content_block_delta", 1),
        ("content_block_delta", 1),
        ("content_block_stop", 1),
        ("content_block_start", 2),
        ("content_block_stop", 2),
        ("message_delta", None),
        ("message_stop", None),
    ]
    assert events[3].delta.text == "Checking", "held-back text comes before the call"
    start = events[5].content_block
    assert (start.type, start.id, start.name, start.input) == (
        "tool_use",
        "toolu_call_a",
        "get_weather",
        {},
    )
    partial = "".join(e.delta.partial_json for e in events[6:8])
    assert json.loads(partial) == {"city": "Paris"}
    assert events[-2].delta.stop_reason == "tool_use"
    message = stream.message()
    assert [b.type for b in message.content] == ["text", "tool_use", "tool_use"]
    paris, empty = message.content[1], message.content[2]
    assert isinstance(paris, ToolUseBlock) and isinstance(empty, ToolUseBlock)
    assert paris.input == {"city": "Paris"}
    assert empty.input == {} and empty.id == "toolu_call_b"

    # A server that ends calls with "stop" still gets tool_use; bad JSON gives an empty input.
    odd = MessageStream("msg_3", SONNET, [])
    run(odd, [chunk(None, [{"index": 0, "function": {"name": "f", "arguments": "{nope"}}])])
    assert odd.message().stop_reason == "tool_use"
    block = odd.message().content[0]
    assert isinstance(block, ToolUseBlock) and block.input == {} and block.id.startswith("toolu_")


def test_stop_sequences_are_found_across_chunks() -> None:
    scanner = StopMatcher(["END", "xyz"])
    assert scanner.feed("abc E") == ("abc ", None), "a possible start is held back"
    assert scanner.feed("N") == ("", None)
    assert scanner.feed("Dtail") == ("", "END")
    plain = StopMatcher(["END"])
    assert plain.feed("ab E") == ("ab ", None)
    assert plain.feed("x") == ("Ex", None), "held text that turned out harmless goes on"
    assert plain.feed("E") == ("", None) and plain.flush() == "E"
    earliest = StopMatcher(["cd", "b"])
    assert earliest.feed("abcd") == ("a", "b"), "the sequence that appears first wins"

    stream = MessageStream("msg_4", SONNET, ["STOP"])
    events = run(stream, [chunk("one two ST"), chunk("OP three"), chunk("never seen")])
    assert stream.stopped
    texts = [e.delta.text for e in events if e.type == "content_block_delta"]
    assert "".join(texts) == "one two "
    message = stream.message()
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", "STOP")
    assert message.usage.output_tokens == 2, "no usage arrived: the pieces are counted"
    ended = MessageStream("msg_5", SONNET, ["STOP"])
    run(ended, [chunk("no ST"), chunk(None, finish="stop"), USAGE])
    held = ended.message().content[0]
    assert isinstance(held, TextBlock) and held.text == "no ST", "held text is flushed at the end"
    assert (ended.message().stop_reason, ended.message().stop_sequence) == ("end_turn", None)


def test_relayed_stream_translation_ends_on_errors_and_closes() -> None:
    def frames(*payloads: Any) -> list[bytes]:
        return [f"data: {json.dumps(p)}\n\n".encode() for p in payloads]

    async def translated(parts: list[bytes], stops: list[str]) -> tuple[list[Any], bool]:
        closed = False

        async def body() -> AsyncIterator[bytes]:
            nonlocal closed
            try:
                for part in parts:
                    yield part
            finally:
                closed = True

        stream = MessageStream("msg_6", SONNET, stops)
        events = [event async for event in translate(body(), stream)]
        return events, closed

    broken = {"error": {"message": "worker died", "type": "server_error"}}
    events, closed = asyncio.run(translated(frames(chunk("Hi"), broken), []))
    assert [e.type for e in events][-2:] == ["content_block_delta", "error"] and closed
    assert (events[-1].error.type, events[-1].error.message) == ("api_error", "worker died")

    events, closed = asyncio.run(translated(frames(chunk("Hi")), []))
    assert events[-1].type == "error" and "ended before" in events[-1].error.message

    # Split frames are put together; a stop sequence ends the stream and closes the relay.
    whole = b"".join(frames(chunk("a b"), chunk(" c"), chunk("d"))) + b"data: [DONE]\n\n"
    parts = [whole[i : i + 7] for i in range(0, len(whole), 7)]
    events, closed = asyncio.run(translated(parts, []))
    assert [e.type for e in events][-2:] == ["message_delta", "message_stop"] and closed
    texts = "".join(e.delta.text for e in events if e.type == "content_block_delta")
    assert texts == "a b cd"
    events, closed = asyncio.run(translated(parts[:-3], ["b c"]))
    assert events[-2].delta.stop_sequence == "b c" and closed


def test_openai_errors_become_anthropic_errors() -> None:
    full = from_openai_error(
        503,
        {"error": {"message": "pool is full", "type": "server_error", "code": "pool_full"}},
        {"retry-after": "5"},
    )
    assert (full.status, full.type, full.headers) == (503, "overloaded_error", {"Retry-After": "5"})
    assert full.body() == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "pool is full"},
    }
    missing = from_openai_error(404, {"error": {"message": "no", "type": "invalid_request_error"}})
    assert missing.type == "not_found_error"
    long = from_openai_error(
        400, {"error": {"message": "4000 > 2048", "code": "context_length_exceeded"}}
    )
    assert long.message == "prompt is too long: 4000 > 2048"
    assert long.type == "invalid_request_error"
    assert from_openai_error(502, None).type == "api_error"
    assert from_openai_error(504, {"error": {"message": "slow"}}).type == "timeout_error"
    assert from_openai_error(429, {"error": "busy"}).type == "rate_limit_error"


def spec(model_id: str, *aliases: str) -> ModelSpec:
    return ModelSpec.model_validate(model_entry(model_id, aliases=list(aliases)))


def test_alias_patterns_most_specific_wins() -> None:
    specs = [
        spec("main", "claude-*", "sonnet"),
        spec("small", "claude-*haiku*"),
        spec("tie-first", "gpt-?"),
        spec("tie-second", "gpt-?"),
        spec("exact", "claude-special"),
    ]

    def owner(name: str) -> str | None:
        found = match_alias(name, specs)
        return found.model_id if found else None

    assert owner("sonnet") == "main"
    assert owner(SONNET) == "main"
    assert owner(HAIKU) == "small", "claude-*haiku* is more specific than claude-*"
    assert owner("claude-special") == "exact", "an exact alias beats any pattern"
    assert owner("gpt-4") == "tie-first", "a tie goes to registry order"
    assert owner("Claude-sonnet") is None, "patterns are case-sensitive"
    assert owner("gpt-4o") is None
    for bad in ("", " claude-*", "claude-[", "x" * 300):
        with pytest.raises(ValueError):
            spec("m", bad)
    assert spec("m", "claude-[0-9]*").aliases == ["claude-[0-9]*"]


# --- a real pool ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Manager]:
    """A manager whose main model answers every `claude-*` name and whose small model
    answers the haiku ones (COLD until asked)."""
    folder = tmp_path_factory.mktemp("anthropic-pool")
    port_range = free_port_range(4)
    port = free_port()
    config = {
        "port": port,
        "port_range": {"start": port_range[0], "end": port_range[1]},
        "graceful_shutdown_seconds": 5,
    }
    models = [
        model_entry(MAIN, warmup=True, n_ctx=2048, aliases=["claude-*"], timeout_seconds=120),
        model_entry(SMALL, aliases=["claude-*haiku*"], timeout_seconds=120),
    ]
    write_setup(folder, config, models)
    manager = Manager(folder, port, port_range).start()
    manager.wait_state(MAIN, "HOT")
    yield manager
    assert manager.stop() == 0
    leftovers = [pid for pid in manager.seen_worker_pids if pid_alive(pid)]
    assert not leftovers, f"worker processes outlived their manager: {leftovers}"


def client_for(manager: Manager, **options: Any) -> anthropic.Anthropic:
    options.setdefault("api_key", "unused")
    return anthropic.Anthropic(base_url=manager.url, max_retries=0, timeout=120, **options)


def sse_events(reply: httpx.Response) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) for each frame; the name must be the data's type."""
    assert reply.headers["content-type"].startswith("text/event-stream"), reply.text
    events = []
    for frame in reply.text.split("\n\n"):
        if not frame.strip():
            continue
        lines = dict(line.split(": ", 1) for line in frame.split("\n"))
        data = json.loads(lines["data"])
        assert lines["event"] == data["type"], frame
        events.append((lines["event"], data))
    return events


def test_text_message_through_claude_aliases(pool: Manager) -> None:
    client = client_for(pool)
    raw = client.messages.with_raw_response.create(
        model=SONNET, max_tokens=16, extra_body=GREEDY, messages=HELLO, system="Be friendly."
    )
    assert raw.headers["x-pool-model"] == MAIN, "claude-* reaches the main model"
    message = raw.parse()
    assert message.type == "message" and message.role == "assistant"
    assert message.id.startswith("msg_") and message.model == SONNET
    assert [b.type for b in message.content] == ["text"]
    assert message.content[0].type == "text" and message.content[0].text.strip()
    assert message.stop_reason in ("end_turn", "max_tokens") and message.stop_sequence is None
    usage = message.usage
    assert 0 < usage.output_tokens <= 16
    assert usage.input_tokens + (usage.cache_read_input_tokens or 0) > 10
    assert usage.cache_creation_input_tokens == 0

    assert pool.model(SMALL)["state"] == "COLD"
    raw = client.messages.with_raw_response.create(
        model=HAIKU, max_tokens=4, extra_body=GREEDY, messages=HELLO
    )
    assert raw.headers["x-pool-model"] == SMALL, "claude-*haiku* wins and loads on demand"
    assert raw.parse().content and pool.model(SMALL)["state"] == "HOT"

    # The other protocols resolve model names through the same function.
    body = {"model": SONNET, "messages": HELLO, "stream": False, "options": {"num_predict": 2}}
    ollama = httpx.post(f"{pool.url}/api/chat", json=body, timeout=60)
    assert ollama.status_code == 200 and ollama.json()["done"], ollama.text


def test_streaming_events_in_order(pool: Manager) -> None:
    client = client_for(pool)
    ask: dict[str, Any] = {
        "model": SONNET,
        "max_tokens": 12,
        "extra_body": GREEDY,
        "messages": [{"role": "user", "content": "Name three colours."}],
    }
    whole = client.messages.create(**ask)
    assert whole.content[0].type == "text"

    events = list(client.messages.create(**ask, stream=True))
    kinds = [e.type for e in events]
    # The SDK drops `ping`; the wire check below sees it.
    assert kinds[:2] == ["message_start", "content_block_start"], kinds
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"], kinds
    assert set(kinds[2:-3]) == {"content_block_delta"}, kinds
    start = events[0]
    assert start.type == "message_start"
    assert start.message.content == [] and start.message.id.startswith("msg_")
    text = "".join(
        e.delta.text
        for e in events
        if e.type == "content_block_delta" and e.delta.type == "text_delta"
    )
    assert text == whole.content[0].text, "the same greedy answer, streamed"
    delta = events[-2]
    assert delta.type == "message_delta"
    assert delta.delta.stop_reason == whole.stop_reason
    assert delta.usage.output_tokens == whole.usage.output_tokens

    with client.messages.stream(**ask) as stream:
        final = stream.get_final_message()
    assert final.content[0].type == "text" and final.content[0].text == text
    assert final.usage.input_tokens + (final.usage.cache_read_input_tokens or 0) > 5

    # On the wire: `event:` names match each data's type.
    wire = {k: v for k, v in ask.items() if k != "extra_body"}
    reply = httpx.post(
        f"{pool.url}/v1/messages", json={**wire, **GREEDY, "stream": True}, timeout=60
    )
    names = [name for name, _ in sse_events(reply)]
    assert names == ["message_start", "ping", *kinds[1:]]


TOOL_CHOICES = [
    pytest.param({"type": "any"}, "get_weather", id="any"),
    pytest.param({"type": "tool", "name": "get_time"}, "get_time", id="named"),
]


@pytest.mark.parametrize(("choice", "expected"), TOOL_CHOICES)
def test_tool_choice_gives_a_valid_tool_use(
    pool: Manager, choice: ToolChoiceParam, expected: str
) -> None:
    tools = [WEATHER] if expected == "get_weather" else [WEATHER, TIME]
    message = client_for(pool).messages.create(
        model=SONNET,
        max_tokens=96,
        extra_body=GREEDY,
        messages=ASK_WEATHER,
        tools=tools,
        tool_choice=choice,
    )
    assert message.stop_reason == "tool_use", message
    calls = [b for b in message.content if b.type == "tool_use"]
    assert calls and calls[0].name == expected
    assert calls[0].id.startswith("toolu_")
    schema = {WEATHER["name"]: WEATHER, TIME["name"]: TIME}[expected]["input_schema"]
    jsonschema.validate(calls[0].input, schema)


def test_streamed_tool_use(pool: Manager) -> None:
    events = list(
        client_for(pool).messages.create(
            model=SONNET,
            max_tokens=96,
            extra_body=GREEDY,
            messages=ASK_WEATHER,
            tools=[WEATHER],
            tool_choice={"type": "any"},
            stream=True,
        )
    )
    starts = [e for e in events if e.type == "content_block_start"]
    tool_starts = [e for e in starts if e.content_block.type == "tool_use"]
    assert len(tool_starts) >= 1
    block = tool_starts[0]
    assert block.content_block.type == "tool_use"
    assert block.content_block.id.startswith("toolu_")
    assert block.content_block.name == "get_weather" and block.content_block.input == {}
    fragments = [
        e.delta.partial_json
        for e in events
        if e.type == "content_block_delta"
        and e.index == block.index
        and e.delta.type == "input_json_delta"
    ]
    assert len(fragments) >= 2, "the arguments arrive in pieces"
    jsonschema.validate(json.loads("".join(fragments)), WEATHER["input_schema"])
    stops = [e.index for e in events if e.type == "content_block_stop"]
    assert stops == [e.index for e in starts], "every block stops, in order"
    assert events[-2].type == "message_delta" and events[-2].delta.stop_reason == "tool_use"


def test_tool_result_round_trip(pool: Manager) -> None:
    client = client_for(pool)
    first = client.messages.create(
        model=SONNET,
        max_tokens=96,
        extra_body=GREEDY,
        messages=ASK_WEATHER,
        tools=[WEATHER],
        tool_choice={"type": "any"},
    )
    call = next(b for b in first.content if b.type == "tool_use")
    history: list[Any] = [
        *ASK_WEATHER,
        {"role": "assistant", "content": [b.model_dump() for b in first.content]},
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": call.id, "content": "22 degrees, sunny"},
                {"type": "text", "text": "Answer in one sentence."},
            ],
        },
    ]
    second = client.messages.create(
        model=SONNET,
        max_tokens=24,
        extra_body=GREEDY,
        messages=history,
        tools=[WEATHER],
        tool_choice={"type": "none"},
    )
    assert second.stop_reason in ("end_turn", "max_tokens")
    assert [b.type for b in second.content] == ["text"]
    assert second.content[0].type == "text" and second.content[0].text.strip()

    # The tool result is part of the prompt: a longer one costs more tokens.
    longer = json.loads(json.dumps(history))
    longer[2]["content"][0]["content"] = "22 degrees, sunny, light wind from the west " * 5
    counts = [
        client.messages.count_tokens(model=SONNET, messages=h, tools=[WEATHER]).input_tokens
        for h in (history, longer)
    ]
    assert 0 < counts[0] < counts[1]


def test_count_tokens(pool: Manager) -> None:
    client = client_for(pool)
    short = client.messages.count_tokens(model=SONNET, messages=HELLO)
    assert short.input_tokens > 0
    longer: list[SdkMessage] = [
        {"role": "user", "content": "Say hello to everyone in the room, politely."}
    ]
    assert client.messages.count_tokens(model=SONNET, messages=longer).input_tokens > (
        short.input_tokens
    )
    # (SmolLM2's template adds a system prompt of its own when there is none: compare two.)
    brief = client.messages.count_tokens(model=SONNET, messages=HELLO, system="Be brief.")
    wordy = client.messages.count_tokens(
        model=SONNET, messages=HELLO, system=[{"type": "text", "text": "Be brief and kind."}]
    )
    assert 0 < brief.input_tokens < wordy.input_tokens
    with_tools = client.messages.count_tokens(model=SONNET, messages=HELLO, tools=[WEATHER])
    assert with_tools.input_tokens > short.input_tokens

    # The count is the prompt the model is given.
    message = client.messages.create(model=SONNET, max_tokens=2, messages=HELLO)
    prompt = message.usage.input_tokens + (message.usage.cache_read_input_tokens or 0)
    assert prompt == short.input_tokens

    with pytest.raises(anthropic.NotFoundError) as missing:
        client.messages.count_tokens(model="nope", messages=HELLO)
    assert error_of(missing.value)["type"] == "not_found_error"


def test_stop_sequences(pool: Manager) -> None:
    client = client_for(pool)
    ask: dict[str, Any] = {
        "model": SONNET,
        "max_tokens": 24,
        "extra_body": GREEDY,
        "messages": [{"role": "user", "content": "Write one sentence about the sea."}],
    }
    plain = client.messages.create(**ask)
    text = plain.content[0].text if plain.content[0].type == "text" else ""
    words = text.split()
    assert len(words) >= 3, text
    stop = words[1]
    before = text[: text.find(stop)]

    stopped = client.messages.create(**ask, stop_sequences=["zzz-never", stop])
    assert (stopped.stop_reason, stopped.stop_sequence) == ("stop_sequence", stop)
    assert stopped.content[0].type == "text" and stopped.content[0].text == before
    assert 0 < stopped.usage.output_tokens < plain.usage.output_tokens

    events = list(client.messages.create(**ask, stop_sequences=[stop], stream=True))
    streamed = "".join(
        e.delta.text
        for e in events
        if e.type == "content_block_delta" and e.delta.type == "text_delta"
    )
    assert streamed == before
    assert events[-2].type == "message_delta"
    assert (events[-2].delta.stop_reason, events[-2].delta.stop_sequence) == ("stop_sequence", stop)
    assert events[-1].type == "message_stop"

    missed = client.messages.create(**ask, stop_sequences=["zzz-never"])
    assert missed.stop_reason == plain.stop_reason and missed.stop_sequence is None
    assert missed.content[0].type == "text" and missed.content[0].text == text


def error_of(exc: anthropic.APIStatusError) -> dict[str, Any]:
    """The `error` object of an Anthropic-shaped error body."""
    assert isinstance(exc.body, dict) and exc.body["type"] == "error", exc.body
    error: dict[str, Any] = exc.body["error"]
    return error


def anthropic_error(reply: httpx.Response, status: int, error_type: str) -> str:
    assert reply.status_code == status, reply.text
    body = reply.json()
    assert body["type"] == "error" and body["error"]["type"] == error_type, body
    message: str = body["error"]["message"]
    return message


def test_errors_have_anthropics_shape(pool: Manager) -> None:
    url = f"{pool.url}/v1/messages"
    message = anthropic_error(
        httpx.post(url, json={"model": SONNET, "messages": HELLO}), 400, "invalid_request_error"
    )
    assert "max_tokens" in message
    for content in (b"{nope", b"[1]", b""):
        anthropic_error(httpx.post(url, content=content), 400, "invalid_request_error")
    bad_block = {
        "model": SONNET,
        "max_tokens": 5,
        "messages": [{"role": "user", "content": [{"type": "x"}]}],
    }
    anthropic_error(httpx.post(url, json=bad_block), 400, "invalid_request_error")
    too_hot = {"model": SONNET, "max_tokens": 5, "messages": HELLO, "temperature": 1.5}
    assert "temperature" in anthropic_error(
        httpx.post(url, json=too_hot), 400, "invalid_request_error"
    )
    image = {
        "type": "image",
        "source": {"type": "base64", "media_type": "image/png", "data": "AA=="},
    }
    pictured = {
        "model": SONNET,
        "max_tokens": 5,
        "messages": [{"role": "user", "content": [image]}],
    }
    assert "not supported" in anthropic_error(
        httpx.post(url, json=pictured), 400, "invalid_request_error"
    )
    anthropic_error(httpx.get(url), 405, "invalid_request_error")

    client = client_for(pool)
    for stream in (False, True):
        with pytest.raises(anthropic.NotFoundError) as missing:
            client.messages.create(model="gpt-nope", max_tokens=5, messages=HELLO, stream=stream)
        assert missing.value.status_code == 404
        assert error_of(missing.value)["type"] == "not_found_error"
        assert "gpt-nope" in error_of(missing.value)["message"]
    with pytest.raises(anthropic.BadRequestError) as too_long:
        client.messages.create(
            model=SONNET, max_tokens=5, messages=[{"role": "user", "content": "word " * 3000}]
        )
    assert "prompt is too long" in error_of(too_long.value)["message"]


def test_client_leaving_stops_generation(pool: Manager) -> None:
    endpoint = pool.model(MAIN)["endpoint"]
    before = int(httpx.get(f"{endpoint}/health").json()["tokens_generated"])
    body = {
        "model": SONNET,
        "max_tokens": 1500,
        "stream": True,
        "messages": [{"role": "user", "content": "A very long story."}],
    }
    with httpx.stream("POST", f"{pool.url}/v1/messages", json=body, timeout=60) as reply:
        for n, _ in enumerate(reply.iter_lines()):
            if n > 20:
                break

    def settled() -> dict[str, Any] | None:
        health: dict[str, Any] = httpx.get(f"{endpoint}/health").json()
        return health if not health["generating"] and health["in_flight"] == 0 else None

    health = wait_for(settled, 30, message="the abandoned generation to stop")
    assert int(health["tokens_generated"]) - before < 300


def test_api_keys(start_manager: ManagerFactory) -> None:
    manager = start_manager(
        models=[model_entry(MAIN, warmup=True, aliases=["claude-*"])],
        env={"POOL_API_KEY": CLIENT_KEY, "POOL_ADMIN_KEY": ADMIN_KEY},
    )
    manager.wait_state(MAIN, "HOT")
    beta = {"anthropic-beta": "interleaved-thinking-2025-05-14"}
    for options in (
        {"api_key": CLIENT_KEY},  # X-Api-Key, as the SDK sends it
        {"api_key": None, "auth_token": ADMIN_KEY},  # Authorization: Bearer (Claude Code)
    ):
        client = client_for(manager, default_headers=beta, **options)
        message = client.messages.create(model=SONNET, max_tokens=3, messages=HELLO)
        assert message.content and message.usage.output_tokens > 0
        assert client.messages.count_tokens(model=SONNET, messages=HELLO).input_tokens > 0

    with pytest.raises(anthropic.AuthenticationError) as wrong:
        client_for(manager, api_key="wrong").messages.create(
            model=SONNET, max_tokens=3, messages=HELLO
        )
    assert wrong.value.body == {
        "type": "error",
        "error": {"type": "authentication_error", "message": "Invalid API key."},
    }
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        missing = httpx.post(f"{manager.url}{path}", json={"model": SONNET, "messages": HELLO})
        anthropic_error(missing, 401, "authentication_error")
        assert missing.headers["WWW-Authenticate"] == "Bearer"
    # Other routes keep OpenAI's shape.
    openai_shaped = httpx.post(f"{manager.url}/v1/chat/completions", json={})
    assert openai_shaped.status_code == 401
    assert openai_shaped.json()["error"]["type"] == "authentication_error"
