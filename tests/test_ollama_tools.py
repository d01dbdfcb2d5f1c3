"""Tools through Ollama's /api/chat (both ways) and through the `ollama` remote backend.

The translations are checked on their own first (no process); then end to end with the
real model. Ollama has no `tool_choice`; the end-to-end tests pass `"required"` as an
extension field, so that no test depends on whether the tiny model chooses to call.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import ollama
import openai
import pytest

from model_service.backends import remote
from pool_manager import ollama_api
from pool_manager.ports import free_port
from tests.conftest import (
    DEFAULT_MODEL,
    Manager,
    free_port_range,
    model_entry,
    pid_alive,
    write_setup,
)

FAR_OLLAMA = "far/ollama:1"  # the `ollama` backend, pointed at this pool's own /api
WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city now",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
TIME: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The time in a city now",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
TOOLS: list[Any] = [WEATHER, TIME]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


# --- Ollama's /api/chat -> OpenAI, unit by unit ---------------------------------------------------


def ollama_history() -> list[dict[str, Any]]:
    return [
        {"role": "user", "content": "Weather and time in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
                {"function": {"name": "get_time", "arguments": {"city": "Paris"}}},
            ],
        },
        # Answered in the other order: matched by tool_name, not by position.
        {"role": "tool", "tool_name": "get_time", "content": "14:05"},
        {"role": "tool", "tool_name": "get_weather", "content": "sunny, 21 C"},
        {"role": "assistant", "content": "Sunny and 21 C; it is 14:05."},
        {"role": "user", "content": "And in Rome?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Rome"}}}],
        },
        {"role": "tool", "content": "cloudy"},  # no tool_name: the next unanswered call
    ]


def test_history_gets_json_arguments_and_stable_ids() -> None:
    messages = ollama_api._openai_messages(ollama_history())
    assistant = messages[1]
    assert [c["id"] for c in assistant["tool_calls"]] == ["call_0_0", "call_0_1"]
    assert assistant["tool_calls"][0] == {
        "id": "call_0_0",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    assert messages[2] == {
        "role": "tool",
        "content": "14:05",
        "tool_call_id": "call_0_1",
        "name": "get_time",
    }
    assert messages[3]["tool_call_id"] == "call_0_0" and messages[3]["name"] == "get_weather"
    assert messages[6]["tool_calls"][0]["id"] == "call_1_0"
    assert messages[7]["tool_call_id"] == "call_1_0" and messages[7]["name"] == "get_weather"
    assert ollama_api._openai_messages(ollama_history()) == messages, "the same ids each time"


def test_own_ids_are_kept() -> None:
    history = [
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": "abc", "function": {"name": "get_time", "arguments": '{"city":"Oslo"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "abc", "content": "9:00"},
    ]
    messages = ollama_api._openai_messages(history)
    assert messages[0]["tool_calls"][0]["id"] == "abc"
    assert messages[0]["tool_calls"][0]["function"]["arguments"] == '{"city":"Oslo"}'
    assert messages[1]["tool_call_id"] == "abc"


@pytest.mark.parametrize(
    "bad",
    [
        {"role": "assistant", "content": "", "tool_calls": "get_time"},
        {"role": "assistant", "content": "", "tool_calls": [{"name": "get_time"}]},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"arguments": {}}}]},
    ],
)
def test_malformed_tool_calls_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ollama_api.OllamaError) as refused:
        ollama_api._openai_messages([bad])
    assert refused.value.status == 400


def test_reply_calls_get_object_arguments() -> None:
    call = {"id": "x", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    assert ollama_api._ollama_call(call) == {"function": {"name": "f", "arguments": {"a": 1}}}
    for arguments in ("[1, 2]", "not json"):
        with pytest.raises(ValueError, match="not a JSON object"):
            ollama_api._ollama_call({"function": {"name": "f", "arguments": arguments}})


def fragment(index: int, arguments: str, name: str | None = None) -> dict[str, Any]:
    function: dict[str, Any] = {"arguments": arguments}
    if name is not None:
        function["name"] = name
    head = {"id": f"call_{index}", "type": "function"} if name else {}
    return {"index": index, **head, "function": function}


def test_streamed_fragments_become_whole_calls_sent_once() -> None:
    calls = ollama_api._StreamedCalls()
    assert calls.add([fragment(0, '{"ci', "get_weather")]) == []
    assert calls.add([fragment(0, 'ty": "Paris"}')]) == []
    whole = calls.add([fragment(1, '{"city": "Rome"}', "get_time")])
    assert whole == [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]
    assert calls.rest() == [{"function": {"name": "get_time", "arguments": {"city": "Rome"}}}]
    assert calls.rest() == [], "each call is sent once"


def sse(*payloads: Any) -> list[bytes]:
    out = []
    for payload in payloads:
        data = payload if isinstance(payload, str) else json.dumps(payload)
        out.append(f"data: {data}\n\n".encode())
    return out


def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


async def _lines(events: list[bytes]) -> list[dict[str, Any]]:
    async def source() -> AsyncIterator[bytes]:
        for event in events:
            yield event

    usage = ollama_api._Usage(started=time.perf_counter())
    translated = ollama_api._translate_stream(source(), "m", usage, chat=True)
    return [json.loads(line) async for line in translated]


def test_stream_sends_each_call_whole_then_done() -> None:
    events = sse(
        chunk({"role": "assistant", "content": ""}),
        chunk({"tool_calls": [fragment(0, "", "get_weather")]}),
        chunk({"tool_calls": [fragment(0, '{"city": ')]}),
        chunk({"tool_calls": [fragment(0, '"Paris"}')]}),
        chunk({}, "tool_calls"),
        {"choices": [], "usage": {"prompt_tokens": 30, "completion_tokens": 9}},
        "[DONE]",
    )
    lines = asyncio.run(_lines(events))
    with_calls = [line for line in lines if line.get("message", {}).get("tool_calls")]
    assert len(with_calls) == 1, lines
    assert with_calls[0]["message"]["tool_calls"] == [
        {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    ]
    assert with_calls[0]["done"] is False
    final = lines[-1]
    assert final["done"] is True and final["done_reason"] == "stop"
    assert final["prompt_eval_count"] == 30 and final["eval_count"] == 9


@pytest.mark.parametrize("finish", ["tool_calls", None])
def test_stream_with_bad_arguments_ends_with_an_error_line(finish: str | None) -> None:
    events = sse(chunk({"tool_calls": [fragment(0, "[1]", "f")]}, finish), "[DONE]")
    lines = asyncio.run(_lines(events))
    assert "error" in lines[-1] and "not a JSON object" in lines[-1]["error"]
    assert not any(line.get("done") for line in lines)


# --- OpenAI -> an Ollama server (the `ollama` remote backend), unit by unit ----------------------


def test_remote_translates_history_to_ollama() -> None:
    openai_history = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_9",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_9", "content": "sunny"},
    ]
    body = {"messages": openai_history, "tools": [WEATHER], "tool_choice": "required"}
    path, payload = remote._to_ollama("chat/completions", body, "far-model", stream=False)
    assert path == "/api/chat" and payload["tools"] == [WEATHER]
    assert payload["tool_choice"] == "required", "an extension our Ollama API honours"
    assert payload["messages"][1]["tool_calls"] == [
        {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    ]
    assert payload["messages"][2] == {
        "role": "tool",
        "content": "sunny",
        "tool_name": "get_weather",
    }
    _, without = remote._to_ollama(
        "chat/completions", {**body, "tool_choice": "none"}, "far-model", stream=False
    )
    assert "tools" not in without and "tool_choice" not in without


def test_remote_translates_ollama_calls_back() -> None:
    reply = {
        "message": {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}],
        },
        "done": True,
        "done_reason": "stop",
        "prompt_eval_count": 10,
        "eval_count": 5,
    }
    data = remote._from_ollama("chat/completions", "far:1", reply)
    choice = data["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    call = choice["message"]["tool_calls"][0]
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert json.loads(call["function"]["arguments"]) == {"city": "Oslo"}
    assert choice["message"]["content"] is None

    line = {**reply, "done": False}
    chunk = remote._ollama_chunk("chat/completions", "far:1", "id", 0, line)
    sent = remote._add_stream_calls(chunk, line, 0)
    assert sent == 1 and chunk["choices"][0]["delta"]["tool_calls"][0]["index"] == 0
    last = {"message": {"role": "assistant", "content": ""}, "done": True}
    final = remote._ollama_chunk("chat/completions", "far:1", "id", 0, last)
    assert remote._add_stream_calls(final, last, sent) == 1
    assert final["choices"][0]["finish_reason"] == "tool_calls"


# --- end to end --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Manager]:
    folder = tmp_path_factory.mktemp("ollama-tools-pool")
    port, port_range = free_port(), free_port_range(4)
    config = {
        "port": port,
        "port_range": {"start": port_range[0], "end": port_range[1]},
        "graceful_shutdown_seconds": 5,
        "load_timeout_seconds": 120,
    }
    models = [
        model_entry(DEFAULT_MODEL, warmup=True, n_ctx=2048, timeout_seconds=120),
        {
            "model_id": FAR_OLLAMA,
            "backend": "ollama",
            "base_url": f"http://127.0.0.1:{port}",
            "remote_model": DEFAULT_MODEL,
            "timeout_seconds": 120,
        },
    ]
    write_setup(folder, config, models)
    manager = Manager(folder, port, port_range).start()
    manager.wait_state(DEFAULT_MODEL, "HOT", timeout=120)
    yield manager
    manager.models()
    assert manager.stop() == 0
    leftovers = [pid for pid in manager.seen_worker_pids if pid_alive(pid)]
    assert not leftovers, f"worker processes outlived their manager: {leftovers}"


def chat(pool: Manager, **body: Any) -> httpx.Response:
    payload = {"model": DEFAULT_MODEL, "options": {"temperature": 0, "num_predict": 64}, **body}
    return httpx.post(f"{pool.url}/api/chat", json=payload, timeout=120)


def test_ollama_chat_returns_a_tool_call(pool: Manager) -> None:
    reply = chat(pool, messages=ASK, tools=[WEATHER], tool_choice="required", stream=False)
    assert reply.status_code == 200, reply.text
    parsed = ollama.ChatResponse.model_validate(reply.json())  # what the client reads
    assert parsed.done and parsed.done_reason == "stop"
    calls = parsed.message.tool_calls
    assert calls and len(calls) == 1
    assert calls[0].function.name == "get_weather"
    assert isinstance(calls[0].function.arguments, dict)
    assert isinstance(calls[0].function.arguments.get("city"), str)


def test_ollama_chat_streams_each_call_once(pool: Manager) -> None:
    reply = chat(pool, messages=ASK, tools=[WEATHER], tool_choice="required", stream=True)
    assert reply.status_code == 200, reply.text
    lines = [json.loads(line) for line in reply.text.splitlines() if line]
    with_calls = [line for line in lines if line.get("message", {}).get("tool_calls")]
    assert len(with_calls) == 1, lines
    (call,) = with_calls[0]["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert isinstance(call["function"]["arguments"], dict)
    assert lines[-1]["done"] is True and lines[-1]["eval_count"] > 0
    assert not any(line["done"] for line in lines[:-1])


def test_ollama_client_round_trip_with_tool_results(pool: Manager) -> None:
    client = ollama.Client(host=pool.url, timeout=120)
    history: list[dict[str, Any]] = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "tool_name": "get_weather", "content": "sunny, 21 degrees"},
    ]
    reply = client.chat(
        model=DEFAULT_MODEL,
        messages=history,
        tools=[WEATHER],
        options={"temperature": 0, "num_predict": 48},
    )
    assert reply.done and reply.message.role == "assistant"
    assert reply.message.content or reply.message.tool_calls, "an answer, in words or a call"


def test_ollama_chat_bad_tools_are_400(pool: Manager) -> None:
    reply = chat(pool, messages=ASK, tools="get_weather", stream=False)
    assert reply.status_code == 400 and "tools" in reply.json()["error"]
    unknown = chat(
        pool,
        messages=ASK,
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "nope"}},
        stream=False,
    )
    assert unknown.status_code == 400, unknown.text


def test_ollama_backend_carries_tools_both_ways(pool: Manager) -> None:
    client = openai.OpenAI(base_url=f"{pool.url}/v1", api_key="unused", max_retries=0)
    request: dict[str, Any] = {
        "model": FAR_OLLAMA,
        "messages": ASK,
        "tools": [WEATHER, TIME],
        "tool_choice": "required",
        "temperature": 0,
        "max_tokens": 64,
    }
    reply = client.chat.completions.create(**request)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls and choice.message.tool_calls[0].id.startswith("call_")
    function = choice.message.tool_calls[0].function
    assert function.name in ("get_weather", "get_time")
    assert isinstance(json.loads(function.arguments), dict)

    fragments: list[Any] = []
    finishes: list[str] = []
    for part in client.chat.completions.create(**request, stream=True):
        for streamed in part.choices:
            fragments += streamed.delta.tool_calls or []
            if streamed.finish_reason:
                finishes.append(streamed.finish_reason)
    assert finishes == ["tool_calls"]
    assert fragments and fragments[0].index == 0 and fragments[0].function
    assert isinstance(json.loads(fragments[0].function.arguments or ""), dict)

    call = choice.message.tool_calls[0]
    history: list[Any] = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 degrees"},
    ]
    answered = client.chat.completions.create(
        model=FAR_OLLAMA, messages=history, tools=TOOLS, temperature=0, max_tokens=48
    )
    assert answered.choices[0].message.content or answered.choices[0].message.tool_calls
