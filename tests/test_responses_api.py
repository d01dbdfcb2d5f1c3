"""OpenAI's Responses API (`/v1/responses`) on the manager's port.

Pure tests of the translation first (no processes), then the real manager, worker and
model through the official `openai` client and the OpenAI Agents SDK.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.types.responses import Response as SdkResponse
from openai.types.responses import ResponseStreamEvent
from pydantic import BaseModel, TypeAdapter

from model_service.errors import ApiError
from pool_manager.responses_api import (
    ResponseEventStream,
    ResponseStore,
    StoredResponse,
    _relayed_error,
    chat_messages,
    output_items,
    parse_items,
    plan_chat,
    plan_tools,
    response_base,
)
from pool_manager.responses_protocol import ResponseObject, parse_request
from tests.conftest import DEFAULT_MODEL, Manager, ManagerFactory, model_entry, wait_for

SDK_EVENT = TypeAdapter(ResponseStreamEvent)
WEATHER_TOOL: Any = {
    "type": "function",
    "name": "get_weather",
    "description": "The current weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict": True,
}
SHORT: dict[str, Any] = {"temperature": 0, "max_output_tokens": 12}
GROCER = "You are a grocer who knows every fruit and vegetable by name. " * 5 + "Be brief."


class Sky(BaseModel):
    """A structured answer: its grammar ends the generation within a few tokens."""

    sunny: bool


# --- pure translation ------------------------------------------------------------------------


def test_items_become_chat_messages() -> None:
    items = parse_items(
        [
            {"role": "developer", "content": "Be brief."},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
            {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "opaque"},
            {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "Let me look.", "annotations": []}],
            },
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": '{"a":1}'},
            {"type": "function_call", "call_id": "c2", "name": "g", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "one"},
            {
                "type": "function_call_output",
                "call_id": "c2",
                "output": [
                    {"type": "input_text", "text": "t"},
                    {"type": "input_text", "text": "wo"},
                ],
            },
            {"type": "custom_tool_call", "call_id": "c3", "name": "apply_patch", "input": "*** x"},
            {"type": "custom_tool_call_output", "call_id": "c3", "output": "done"},
        ]
    )
    messages = chat_messages("Answer in French.", items)
    assert messages == [
        {"role": "system", "content": "Answer in French."},
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {
            "role": "assistant",
            "content": "Let me look.",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}},
                {"id": "c2", "type": "function", "function": {"name": "g", "arguments": "{}"}},
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "one"},
        {"role": "tool", "tool_call_id": "c2", "content": "two"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c3",
                    "type": "function",
                    "function": {"name": "apply_patch", "arguments": '{"input": "*** x"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c3", "content": "done"},
    ]


def test_request_becomes_a_chat_request() -> None:
    request = parse_request(
        {
            "model": "m",
            "input": "Hello",
            "instructions": "Be kind.",
            "max_output_tokens": 20,
            "temperature": 0,
            "top_p": 0.5,
            "user": "u1",
            "stream": True,
            "parallel_tool_calls": False,
            "tools": [WEATHER_TOOL, {"type": "web_search"}],
            "tool_choice": "required",
            "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}},
            "store": False,
            "reasoning": {"effort": "high"},
            "include": ["reasoning.encrypted_content"],
            "prompt_cache_key": "k",
            "service_tier": "flex",
            "truncation": "auto",
            "something_new": {"tolerated": True},
        }
    )
    history = [{"type": "message", "role": "user", "content": "Before", "id": "msg_0"}]
    plan = plan_chat(request, history)
    assert plan.chat == {
        "model": "m",
        "messages": [
            {"role": "system", "content": "Be kind."},
            {"role": "user", "content": "Before"},
            {"role": "user", "content": "Hello"},
        ],
        "max_tokens": 20,
        "temperature": 0,
        "top_p": 0.5,
        "user": "u1",
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "parameters": WEATHER_TOOL["parameters"],
                    "description": "The current weather in a city.",
                    "strict": True,
                },
            }
        ],
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "x", "schema": {"type": "object"}},
        },
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    assert plan.tools.ignored == ["web_search"]
    assert plan.context[0] == history[0], "earlier turns come first, unchanged"
    assert plan.context[1]["content"] == [{"type": "input_text", "text": "Hello"}]
    assert plan.context[1]["id"].startswith("msg_")

    base = response_base(request, plan, "resp_1", 123)
    assert base.store is False and base.tools == [WEATHER_TOOL]
    assert base.text == {
        "format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}
    }
    assert base.reasoning == {"effort": "high", "summary": None}
    SdkResponse.model_validate(base.model_dump(mode="json"))


def test_tools_and_tool_choice() -> None:
    custom = {
        "type": "custom",
        "name": "apply_patch",
        "description": "Edit files.",
        "format": {"type": "grammar", "syntax": "lark", "definition": "start: /.+/"},
    }
    hosted = [{"type": t} for t in ("local_shell", "web_search_preview", "code_interpreter")]
    plan = plan_tools([WEATHER_TOOL, custom, *hosted], {"type": "custom", "name": "apply_patch"})
    assert plan.ignored == ["local_shell", "web_search_preview", "code_interpreter"]
    assert plan.custom_names == {"apply_patch"}
    assert plan.chat_tool_choice == {"type": "function", "function": {"name": "apply_patch"}}
    patch = plan.chat_tools[1]["function"]
    assert patch["parameters"]["required"] == ["input"]
    assert "start: /.+/" in patch["description"], "the grammar is told to the model"

    allowed = plan_tools(
        [WEATHER_TOOL, custom],
        {
            "type": "allowed_tools",
            "mode": "required",
            "tools": [{"type": "custom", "name": "apply_patch"}],
        },
    )
    assert [t["function"]["name"] for t in allowed.chat_tools] == ["apply_patch"]
    assert allowed.chat_tool_choice == "required"

    only_hosted = plan_tools(hosted, "auto")
    assert only_hosted.chat_tools == [] and only_hosted.chat_tool_choice is None

    for tools, choice, param in (
        ([WEATHER_TOOL], {"type": "function", "name": "nope"}, "tool_choice"),
        ([WEATHER_TOOL], {"type": "web_search_preview"}, "tool_choice"),
        (hosted, "required", "tool_choice"),
        ([WEATHER_TOOL], "sometimes", "tool_choice"),
        ([{"type": "function"}], "auto", "tools.0.name"),
        ([{"type": "function", "name": "bad name"}], "auto", "tools.0.name"),
        ([WEATHER_TOOL, WEATHER_TOOL], "auto", "tools.1.name"),
        ([{"type": "telepathy"}], "auto", "tools.0.type"),
    ):
        with pytest.raises(ApiError) as refused:
            plan_tools(tools, choice)
        assert refused.value.status == 400 and refused.value.param == param, (tools, choice)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": "x"}, "model"),
        ({"model": "m", "input": 5}, "input"),
        ({"model": "m", "input": "x", "temperature": "hot"}, "temperature"),
        ({"model": "m", "input": "x", "temperature": 3}, "temperature"),
        ({"model": "m", "input": "x", "max_output_tokens": 0}, "max_output_tokens"),
        ({"model": "m", "input": "x", "metadata": {"k": 1}}, "metadata.k"),
        ({"model": "m", "input": "x", "text": {"format": {"type": "yaml"}}}, "text.format.type"),
        (
            {"model": "m", "input": "x", "text": {"format": {"type": "json_schema"}}},
            "text.format.schema",
        ),
        ({"model": "m", "input": [{"role": "robot", "content": "x"}]}, "input.0.role"),
        ({"model": "m", "input": ["x"]}, "input.0"),
        (
            {"model": "m", "input": [{"type": "function_call_output", "output": "x"}]},
            "input.0.call_id",
        ),
        (
            {"model": "m", "input": [{"type": "function_call", "call_id": "c", "name": "f"}]},
            "input.0.arguments",
        ),
        (
            {
                "model": "m",
                "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}],
            },
            "input.0.content.0.type",
        ),
        ({"model": "m", "input": [{"type": "item_reference", "id": "msg_1"}]}, "input.0.type"),
        ({"model": "m", "input": []}, "input"),
        ({"model": "m", "input": "x", "background": True}, "background"),
    ],
)
def test_bad_requests_name_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(ApiError) as refused:
        plan_chat(parse_request(body))
    assert refused.value.status == 400
    assert refused.value.param == param, refused.value.message


def test_output_items_and_status() -> None:
    items = output_items(
        {
            "content": "Checking.",
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
                {
                    "id": "call_2",
                    "function": {"name": "apply_patch", "arguments": '{"input": "p"}'},
                },
            ],
        },
        "tool_calls",
        frozenset({"apply_patch"}),
    )
    assert [i.type for i in items] == ["message", "function_call", "custom_tool_call"]
    assert items[1].model_dump()["call_id"] == "call_1" and items[2].model_dump()["input"] == "p"
    assert all(i.status == "completed" for i in items)

    cut = output_items({"content": "Once upon"}, "length", frozenset())
    assert cut[0].status == "incomplete"
    empty = output_items({"content": None}, "stop", frozenset())
    assert empty[0].type == "message" and empty[0].model_dump()["content"][0]["text"] == ""


def _base() -> ResponseObject:
    return ResponseObject(id="resp_x", created_at=1, status="in_progress", model="m")


def _events(
    stream: ResponseEventStream, chunks: list[dict[str, Any]], *, end: bool = True
) -> list[dict[str, Any]]:
    frames = stream.start()
    for chunk in chunks:
        frames += stream.feed(chunk)
    if end:
        frames += stream.finish()
    events = []
    for frame in frames:
        head, data = frame.decode().strip().split("\n")
        event = json.loads(data.removeprefix("data: "))
        assert head == f"event: {event['type']}"
        SDK_EVENT.validate_python(event)  # every event parses as the SDK's own type
        events.append(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


def _delta(**delta: Any) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": None}]}


def _finish(reason: str) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": {}, "finish_reason": reason}]}


def test_stream_events_for_text_then_a_call() -> None:
    stream = ResponseEventStream(_base(), frozenset())
    usage = {
        "prompt_tokens": 7,
        "completion_tokens": 5,
        "total_tokens": 12,
        "prompt_tokens_details": {"cached_tokens": 3},
    }
    events = _events(
        stream,
        [
            _delta(role="assistant"),
            _delta(content="Hel"),
            _delta(content="lo"),
            _delta(
                tool_calls=[
                    {
                        "index": 0,
                        "id": "call_a",
                        "type": "function",
                        "function": {"name": "f", "arguments": ""},
                    }
                ]
            ),
            _delta(tool_calls=[{"index": 0, "function": {"arguments": '{"x":'}}]),
            _delta(tool_calls=[{"index": 0, "function": {"arguments": " 1}"}}]),
            _finish("tool_calls"),
            {"choices": [], "usage": usage},
        ],
    )
    assert [e["type"] for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert events[6]["text"] == "Hello" and events[12]["arguments"] == '{"x": 1}'
    assert events[9]["item"]["arguments"] == "" and events[9]["output_index"] == 1
    final = events[-1]["response"]
    assert final["status"] == "completed"
    assert [o["type"] for o in final["output"]] == ["message", "function_call"]
    assert final["output"][1]["call_id"] == "call_a"
    assert final["usage"]["input_tokens"] == 7 and final["usage"]["output_tokens"] == 5
    assert final["usage"]["input_tokens_details"]["cached_tokens"] == 3
    assert SdkResponse.model_validate(final).output_text == "Hello"


def test_stream_events_for_a_custom_call_a_cut_and_a_failure() -> None:
    custom = ResponseEventStream(_base(), frozenset({"apply_patch"}))
    events = _events(
        custom,
        [
            _delta(tool_calls=[{"index": 0, "id": "call_p", "function": {"name": "apply_patch"}}]),
            _delta(tool_calls=[{"index": 0, "function": {"arguments": '{"input": "*** Begin'}}]),
            _delta(tool_calls=[{"index": 0, "function": {"arguments": ' Patch"}'}}]),
            _finish("tool_calls"),
        ],
    )
    kinds = [e["type"] for e in events]
    assert kinds[2:] == [
        "response.output_item.added",
        "response.custom_tool_call_input.delta",
        "response.custom_tool_call_input.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert events[-2]["item"]["input"] == "*** Begin Patch"

    cut = ResponseEventStream(_base(), frozenset())
    events = _events(cut, [_delta(content="Once"), _finish("length")])
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert events[-2]["item"]["status"] == "incomplete"

    broken = ResponseEventStream(_base(), frozenset())
    events = _events(broken, [_delta(content="Once")], end=False)
    assert broken.feed_data(b"not json") == [] and broken.feed_data(b"[1]") == []
    worker_error = {"error": {"message": "boom", "type": "server_error", "code": "worker_failed"}}
    frames = broken.feed_data(json.dumps(worker_error).encode())
    failed = [json.loads(f.decode().split("data: ", 1)[1]) for f in frames]
    assert [f["type"] for f in failed] == ["response.failed"]
    assert failed[0]["sequence_number"] == len(events)
    assert failed[0]["response"]["error"] == {"code": "server_error", "message": "boom"}
    assert failed[0]["response"]["output"][0]["status"] == "incomplete"
    SDK_EVENT.validate_python(failed[0])

    garbled = ResponseEventStream(_base(), frozenset())
    garbled.start()
    frames = garbled.feed_data(b'{"choices": [{"delta": "not an object"}]}')
    assert garbled.final is not None and garbled.final.status == "failed"
    assert b"response.failed" in frames[-1]


def test_store_is_a_bounded_lru() -> None:
    def stored(name: str, text: str = "") -> StoredResponse:
        item = {"type": "message", "role": "user", "content": text, "id": f"msg_{name}"}
        return StoredResponse(_base().model_copy(update={"id": name}), [item])

    store = ResponseStore(max_items=2)
    for name in ("a", "b"):
        store.put(stored(name))
    assert store.get("a") is not None  # "a" is now the most recently used
    store.put(stored("c"))
    assert store.get("b") is None and store.get("a") is not None and len(store) == 2
    assert store.delete("a") and not store.delete("a")
    assert store.bytes == stored("c").size

    small = stored("s")
    sized = ResponseStore(max_items=10, max_bytes=3 * small.size + 100)
    for name in ("s1", "s2", "s3"):
        sized.put(stored(name))
    sized.put(stored("big", "x" * 200))  # needs room: the two least recently used go
    assert [n for n in ("s1", "s2", "s3", "big") if sized.get(n)] == ["s3", "big"]
    assert sized.bytes <= sized.max_bytes
    sized.put(stored("huge", "x" * 10_000))  # larger than the whole store: not kept
    assert sized.get("huge") is None and sized.get("big") is not None
    with pytest.raises(ValueError):
        ResponseStore(max_items=-1)


def test_worker_errors_name_responses_fields() -> None:
    from fastapi.responses import JSONResponse

    body = {
        "error": {
            "message": "max_tokens: too many",
            "type": "invalid_request_error",
            "param": "max_tokens",
            "code": "invalid_value",
        }
    }
    reply = _relayed_error(JSONResponse(body, 400, headers={"retry-after": "3"}))
    error = json.loads(bytes(reply.body))["error"]
    assert reply.status_code == 400 and reply.headers["retry-after"] == "3"
    assert error["param"] == "max_output_tokens"
    assert error["message"] == "max_output_tokens: too many"


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
FIELDS = st.sampled_from(
    [
        "model",
        "input",
        "instructions",
        "tools",
        "tool_choice",
        "text",
        "max_output_tokens",
        "temperature",
        "metadata",
        "reasoning",
        "include",
        "store",
        "stream",
        "truncation",
    ]
)
ITEM = st.fixed_dictionaries(
    {
        "type": st.sampled_from(
            [
                "message",
                "function_call",
                "function_call_output",
                "custom_tool_call",
                "reasoning",
                "web_search_call",
                "nope",
            ]
        )
    },
    optional={
        "role": st.sampled_from(["user", "assistant", "developer", "x"]) | JSON,
        "content": JSON,
        "call_id": JSON,
        "name": JSON,
        "arguments": JSON,
        "output": JSON,
    },
)


@settings(max_examples=300, derandomize=True, database=None, deadline=None)
@given(
    st.dictionaries(FIELDS, JSON, max_size=6),
    st.lists(ITEM, max_size=4),
    st.lists(
        st.fixed_dictionaries(
            {"type": st.sampled_from(["function", "custom", "mcp"])},
            optional={"name": JSON, "parameters": JSON},
        ),
        max_size=2,
    ),
)
def test_any_json_is_planned_or_refused_with_a_400(
    body: dict[str, Any], items: list[dict[str, Any]], tools: list[dict[str, Any]]
) -> None:
    """Whatever the JSON, translation answers a chat request or an ApiError 400, never a crash."""
    body = {"model": "m", "input": items, "tools": tools, **body}
    try:
        plan = plan_chat(parse_request(body))
    except ApiError as exc:
        assert exc.status == 400 and exc.param, exc.message
        return
    json.dumps(plan.chat)  # what goes to the worker is JSON
    assert plan.chat["messages"]


# --- the real manager -----------------------------------------------------------------------------


def client_for(manager: Manager) -> openai.OpenAI:
    return openai.OpenAI(base_url=manager.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def raw_create(manager: Manager, **body: Any) -> httpx.Response:
    return httpx.post(f"{manager.url}/v1/responses", json=body, timeout=120)


def test_string_input(shared_manager: Manager) -> None:
    reply = raw_create(shared_manager, model=DEFAULT_MODEL, input="Say hello.", **SHORT)
    assert reply.status_code == 200, reply.text
    raw = reply.json()
    response = SdkResponse.model_validate(raw)  # every field the SDK requires is there
    assert response.id.startswith("resp_") and response.object == "response"
    assert response.model == DEFAULT_MODEL and response.status in ("completed", "incomplete")
    assert response.output_text.strip()
    message = response.output[0]
    assert message.type == "message" and message.role == "assistant"
    assert message.id.startswith("msg_")
    assert response.usage is not None and response.usage.input_tokens > 5
    assert 0 < response.usage.output_tokens <= 12
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens
    assert raw["error"] is None and raw["store"] is True and raw["temperature"] == 0
    assert reply.headers["x-pool-model"] == DEFAULT_MODEL

    sdk = client_for(shared_manager).responses.create(
        model=DEFAULT_MODEL, input="Say hello.", **SHORT
    )
    assert sdk.output_text == response.output_text, "the same greedy answer through the SDK"


def test_items_with_instructions(shared_manager: Manager) -> None:
    client = client_for(shared_manager)
    items: Any = [
        {
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": "Name a fruit."}],
        }
    ]
    plain = client.responses.create(model=DEFAULT_MODEL, input=items, **SHORT)
    instructed = client.responses.create(
        model=DEFAULT_MODEL,
        input=items,
        instructions=GROCER,
        **SHORT,
    )
    assert plain.usage is not None and instructed.usage is not None
    # Without instructions the chat template adds a short system prompt of its own.
    assert instructed.usage.input_tokens >= plain.usage.input_tokens + 20, (
        "the instructions were sent"
    )
    assert instructed.instructions == GROCER
    assert instructed.output_text.strip()


def test_max_output_tokens_is_incomplete(shared_manager: Manager) -> None:
    response = client_for(shared_manager).responses.create(
        model=DEFAULT_MODEL,
        input="Tell me a long story about a dragon.",
        temperature=0,
        max_output_tokens=5,
    )
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.usage is not None and response.usage.output_tokens == 5
    assert response.output[0].type == "message" and response.output[0].status == "incomplete"


def test_json_schema_output(shared_manager: Manager) -> None:
    schema = {
        "type": "object",
        "properties": {"colour": {"type": "string"}, "sunny": {"type": "boolean"}},
        "required": ["colour", "sunny"],
        "additionalProperties": False,
    }
    response = client_for(shared_manager).responses.create(
        model=DEFAULT_MODEL,
        input="What colour is the sky on a clear day? Answer in JSON.",
        temperature=0,
        max_output_tokens=60,
        text={"format": {"type": "json_schema", "name": "sky", "schema": schema, "strict": True}},
    )
    assert response.status == "completed"
    jsonschema.validate(json.loads(response.output_text), schema)
    assert response.text is not None and response.text.format is not None
    assert response.text.format.type == "json_schema"


def test_streaming(shared_manager: Manager) -> None:
    client = client_for(shared_manager)
    events = list(
        client.responses.create(model=DEFAULT_MODEL, input="Count to five.", stream=True, **SHORT)
    )
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        kinds[-1],
    ]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert set(kinds[4:-4]) == {"response.output_text.delta"} and len(kinds) > 9
    numbers = [e.sequence_number for e in events]
    assert numbers == sorted(set(numbers)) and numbers[0] == 0
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    final = events[-1].response
    text = "".join(d.delta for d in deltas)
    assert text and text == final.output_text == events[-4].text
    assert {d.item_id for d in deltas} == {final.output[0].id}
    assert final.usage is not None and final.usage.output_tokens <= 12

    # The SDK's stream helper checks item identities, rebuilds the response and parses
    # structured output. (It wants response.completed: a cut response would not do.)
    with client.responses.stream(
        model=DEFAULT_MODEL,
        input="Is the sky blue on a clear day? Answer in JSON.",
        text_format=Sky,
        temperature=0,
        max_output_tokens=30,
    ) as stream:
        parts = [e.delta for e in stream if e.type == "response.output_text.delta"]
        helped = stream.get_final_response()
    assert helped.status == "completed" and isinstance(helped.output_parsed, Sky)
    assert "".join(parts) == helped.output_text

    # Over plain HTTP: `event:` names the type, and nothing follows the final event.
    body = {"model": DEFAULT_MODEL, "input": "Hi", "stream": True, **SHORT}
    with httpx.stream("POST", f"{shared_manager.url}/v1/responses", json=body, timeout=60) as reply:
        assert reply.headers["content-type"].startswith("text/event-stream")
        frames = [f for f in reply.read().decode().split("\n\n") if f.strip()]
    for frame in frames:
        head, data = frame.split("\n")
        assert head == "event: " + json.loads(data.removeprefix("data: "))["type"]
    assert json.loads(frames[-1].split("data: ", 1)[1])["type"] in (
        "response.completed",
        "response.incomplete",
    )


def test_previous_response_id_continues_the_conversation(shared_manager: Manager) -> None:
    client = client_for(shared_manager)
    instructions = "You are a patient assistant. " * 30  # ~150 tokens, not carried over
    first = client.responses.create(
        model=DEFAULT_MODEL, input="My name is Ada.", instructions=instructions, **SHORT
    )
    second = client.responses.create(
        model=DEFAULT_MODEL, input="What is my name?", previous_response_id=first.id, **SHORT
    )
    alone = client.responses.create(model=DEFAULT_MODEL, input="What is my name?", **SHORT)
    assert first.usage and second.usage and alone.usage
    assert second.previous_response_id == first.id and second.instructions is None
    # The second prompt holds the first turn (question and answer), not its instructions.
    assert second.usage.input_tokens >= alone.usage.input_tokens + first.usage.output_tokens + 5
    assert second.usage.input_tokens < first.usage.input_tokens + first.usage.output_tokens

    listed = client.responses.input_items.list(second.id, order="asc")
    kinds = [(i.type, getattr(i, "role", None)) for i in listed.data]
    assert kinds == [("message", "user"), ("message", "assistant"), ("message", "user")]
    assert listed.data[1].id == first.output[0].id
    newest = client.responses.input_items.list(second.id, limit=1)
    newest_item: Any = newest.data[0]
    assert newest.has_more and newest_item.content[0].text == "What is my name?"

    # A streamed turn is stored too and can be continued.
    streamed = client.responses.create(
        model=DEFAULT_MODEL,
        input="And my age?",
        previous_response_id=second.id,
        stream=True,
        **SHORT,
    )
    third = list(streamed)[-1].response
    fourth = client.responses.create(
        model=DEFAULT_MODEL, input="Thanks.", previous_response_id=third.id, **SHORT
    )
    assert fourth.usage and third.usage
    assert fourth.usage.input_tokens > third.usage.input_tokens + third.usage.output_tokens


def test_get_delete_and_store_false(shared_manager: Manager) -> None:
    client = client_for(shared_manager)
    made = client.responses.create(model=DEFAULT_MODEL, input="Hi", metadata={"run": "7"}, **SHORT)
    fetched = client.responses.retrieve(made.id)
    assert fetched.model_dump() == made.model_dump()
    assert fetched.metadata == {"run": "7"}

    deleted = httpx.delete(f"{shared_manager.url}/v1/responses/{made.id}", timeout=30)
    assert deleted.status_code == 200 and deleted.json() == {
        "id": made.id,
        "object": "response",
        "deleted": True,
    }
    for call in (
        lambda: client.responses.retrieve(made.id),
        lambda: client.responses.delete(made.id),
        lambda: client.responses.input_items.list(made.id),
    ):
        with pytest.raises(openai.NotFoundError) as missing:
            call()
        assert missing.value.status_code == 404
        assert isinstance(missing.value.body, dict) and made.id in missing.value.body["message"]

    unstored = client.responses.create(model=DEFAULT_MODEL, input="Hi", store=False, **SHORT)
    assert unstored.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    with pytest.raises(openai.NotFoundError) as previous:
        client.responses.create(
            model=DEFAULT_MODEL, input="Again", previous_response_id=unstored.id, **SHORT
        )
    assert previous.value.body["param"] == "previous_response_id"  # type: ignore[index]
    assert previous.value.code == "previous_response_not_found"


def test_errors(shared_manager: Manager) -> None:
    client = client_for(shared_manager)
    with pytest.raises(openai.NotFoundError) as unknown:
        client.responses.create(model="no-such-model", input="Hi")
    assert unknown.value.code == "model_not_found" and unknown.value.body["param"] == "model"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        list(client.responses.create(model="no-such-model", input="Hi", stream=True))

    for body, param in (
        ({"model": DEFAULT_MODEL, "input": "Hi", "temperature": "hot"}, "temperature"),
        ({"model": DEFAULT_MODEL, "input": 42}, "input"),
        ({"model": DEFAULT_MODEL, "input": "Hi", "tools": [{"type": "function"}]}, "tools.0.name"),
        (
            {"model": DEFAULT_MODEL, "input": "Hi", "tool_choice": {"type": "web_search_preview"}},
            "tool_choice",
        ),
        ({"model": DEFAULT_MODEL, "input": "Hi", "max_output_tokens": 10**9}, "max_output_tokens"),
        ({"model": DEFAULT_MODEL, "input": "Hi", "stream": "maybe"}, "stream"),
    ):
        reply = raw_create(shared_manager, **body)
        assert reply.status_code == 400, (body, reply.text)
        error = reply.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == param, error
    for content in (b"{nope", b"[1, 2]", b""):
        reply = httpx.post(f"{shared_manager.url}/v1/responses", content=content, timeout=30)
        assert reply.status_code == 400 and reply.json()["error"]["message"], content
    assert httpx.get(f"{shared_manager.url}/v1/responses/resp_nope", timeout=30).status_code == 404


def codex_request(**overrides: Any) -> dict[str, Any]:
    """A request shaped like the ones Codex CLI sends (`wire_api = "responses"`)."""
    body: dict[str, Any] = {
        "model": DEFAULT_MODEL,
        "instructions": "You are Codex, a coding agent. Be concise.",
        "input": [
            {
                "type": "message",
                "role": "developer",
                "content": [{"type": "input_text", "text": "<permissions>read-only</permissions>"}],
            },
            {
                "type": "message",
                "role": "user",
                "content": [
                    {
                        "type": "input_text",
                        "text": "<environment_context>cwd: /tmp</environment_context>",
                    }
                ],
            },
            {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "Say hi."}],
            },
            {
                "type": "reasoning",
                "id": "rs_1",
                "summary": [],
                "content": None,
                "encrypted_content": "gAAAAB-opaque",
            },
        ],
        "tools": [
            {
                "type": "function",
                "name": "shell",
                "description": "Runs a shell command.",
                "strict": False,
                "parameters": {
                    "type": "object",
                    "properties": {
                        "command": {"type": "array", "items": {"type": "string"}},
                        "workdir": {"type": "string"},
                    },
                    "required": ["command"],
                    "additionalProperties": False,
                },
            },
            {"type": "local_shell"},
            {"type": "web_search"},
            {
                "type": "custom",
                "name": "apply_patch",
                "description": "Edit files.",
                "format": {"type": "grammar", "syntax": "lark", "definition": "start: begin_patch"},
            },
        ],
        "tool_choice": "auto",
        "parallel_tool_calls": False,
        "reasoning": {"effort": "medium", "summary": "auto"},
        "store": False,
        "stream": True,
        "include": ["reasoning.encrypted_content"],
        "prompt_cache_key": "0199-session",
        "text": {"verbosity": "low"},
        "max_output_tokens": 16,
        "temperature": 0,
    }
    body.update(overrides)
    return body


def test_a_codex_shaped_request(shared_manager: Manager) -> None:
    url = f"{shared_manager.url}/v1/responses"
    with httpx.stream("POST", url, json=codex_request(), timeout=120) as reply:
        assert reply.status_code == 200, reply.read()
        assert reply.headers["x-pool-ignored-tools"] == "local_shell,web_search"
        events = [
            json.loads(frame.split("data: ", 1)[1])
            for frame in reply.read().decode().split("\n\n")
            if frame.strip()
        ]
    for event in events:
        SDK_EVENT.validate_python(event)
    final = events[-1]
    assert final["type"] in ("response.completed", "response.incomplete"), final
    assert final["response"]["store"] is False and final["response"]["usage"]["input_tokens"] > 20
    assert [t.get("name") for t in final["response"]["tools"]] == ["shell", "apply_patch"]
    done = [e["item"] for e in events if e["type"] == "response.output_item.done"]
    assert done and all(i["type"] in ("message", "function_call", "custom_tool_call") for i in done)
    gone = httpx.get(f"{url}/{final['response']['id']}", timeout=30)
    assert gone.status_code == 404, "store: false keeps nothing"

    unstreamed = raw_create(shared_manager, **codex_request(stream=False))
    assert unstreamed.status_code == 200, unstreamed.text
    SdkResponse.model_validate(unstreamed.json())


def test_cold_model_disconnect_and_failure(start_manager: ManagerFactory) -> None:
    cold = "team/cold:1"
    manager = start_manager(models=[model_entry(cold, timeout_seconds=120, n_ctx=2048)])
    assert manager.model(cold)["state"] == "COLD"
    response = client_for(manager).responses.create(model=cold, input="Hi", **SHORT)
    assert response.output_text and response.model == cold, "loaded on demand"
    assert manager.model(cold)["state"] == "HOT"

    # A client that goes away stops the generation.
    url = f"{manager.url}/v1/responses"
    # Counting at temperature 0: 1,500 tokens every time (a story may end in five).
    story = {
        "model": cold,
        "input": "Count from 1 to 1000, separated by commas.",
        "max_output_tokens": 1500,
        "temperature": 0,
        "stream": True,
    }
    with httpx.stream("POST", url, json=story, timeout=60) as reply:
        for n, _ in enumerate(reply.iter_lines()):
            if n > 20:
                break
    endpoint = manager.model(cold)["endpoint"]

    def settled() -> dict[str, Any] | None:
        health: dict[str, Any] = httpx.get(f"{endpoint}/health").json()
        return health if not health["generating"] and health["in_flight"] == 0 else None

    health = wait_for(settled, 30, message="the abandoned generation to stop")
    assert int(health["tokens_generated"]) < 300

    # A worker that stops mid-stream (a forced unload) ends the stream with response.failed.
    events: list[dict[str, Any]] = []
    with httpx.stream("POST", url, json=story, timeout=60) as reply:
        for line in reply.iter_lines():
            if not line.startswith("data: "):
                continue
            events.append(json.loads(line.removeprefix("data: ")))
            deltas = sum(e["type"] == "response.output_text.delta" for e in events)
            if deltas == 3 and events[-1]["type"] == "response.output_text.delta":
                unloaded = manager.request("POST", f"/models/{cold}/unload", json={"force": True})
                assert unloaded.status_code == 200, unloaded.text
    last = events[-1]
    assert last["type"] == "response.failed", [e["type"] for e in events[-3:]]
    assert last["response"]["status"] == "failed" and last["response"]["error"]["message"]
    assert last["sequence_number"] == len(events) - 1
    SDK_EVENT.validate_python(last)


async def test_agents_sdk(shared_manager: Manager) -> None:
    agents = pytest.importorskip("agents")
    agents.set_tracing_disabled(True)
    model = agents.OpenAIResponsesModel(
        model=DEFAULT_MODEL,
        openai_client=openai.AsyncOpenAI(base_url=shared_manager.url + "/v1", api_key="unused"),
    )
    agent = agents.Agent(
        name="weather",
        instructions="Answer about the weather, in JSON.",
        model=model,
        # Structured output: the schema's grammar ends the answer well within the limit
        # (the SDK treats a response cut at max_tokens as a failure).
        output_type=Sky,
        model_settings=agents.ModelSettings(temperature=0, max_tokens=40),
    )
    result = await agents.Runner.run(agent, "Is the sky blue on a clear day?")
    assert isinstance(result.final_output, Sky)

    streamed = agents.Runner.run_streamed(agent, "Is it sunny at night?")
    events = [event async for event in streamed.stream_events()]
    assert events and isinstance(streamed.final_output, Sky)


# --- tools (the worker's tool calling) ---------------------------------------------------------


def test_required_and_named_tool_choice(shared_manager: Manager) -> None:
    client = client_for(shared_manager)
    choices: list[Any] = ["required", {"type": "function", "name": "get_weather"}]
    for choice in choices:
        response = client.responses.create(
            model=DEFAULT_MODEL,
            input="What is the weather in Paris?",
            tools=[WEATHER_TOOL],
            tool_choice=choice,
            temperature=0,
            max_output_tokens=60,
        )
        calls = [o for o in response.output if o.type == "function_call"]
        assert calls, response.output
        call = calls[0]
        assert call.name == "get_weather" and call.call_id and call.id and call.id.startswith("fc_")
        jsonschema.validate(json.loads(call.arguments), WEATHER_TOOL["parameters"])
        assert response.status == "completed"


def test_streamed_function_call(shared_manager: Manager) -> None:
    client = client_for(shared_manager)
    events = list(
        client.responses.create(
            model=DEFAULT_MODEL,
            input="What is the weather in Rome?",
            tools=[WEATHER_TOOL],
            tool_choice={"type": "function", "name": "get_weather"},
            temperature=0,
            max_output_tokens=60,
            stream=True,
        )
    )
    added = [e for e in events if e.type == "response.output_item.added"]
    assert added and added[0].item.type == "function_call"
    assert added[0].item.type == "function_call" and added[0].item.arguments == ""
    item_id = added[0].item.id
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    arguments = "".join(deltas)
    assert deltas and done and done[0].arguments == arguments and done[0].item_id == item_id
    jsonschema.validate(json.loads(arguments), WEATHER_TOOL["parameters"])
    final = events[-1]
    assert final.type == "response.completed"
    assert final.response.output[-1].arguments == arguments  # type: ignore[union-attr]

    with client.responses.stream(
        model=DEFAULT_MODEL,
        input="What is the weather in Rome?",
        tools=[WEATHER_TOOL],
        tool_choice="required",
        temperature=0,
        max_output_tokens=60,
    ) as stream:
        helped = stream.get_final_response()
    assert helped.output[-1].type == "function_call"


def test_function_call_round_trip(shared_manager: Manager) -> None:
    client = client_for(shared_manager)
    first = client.responses.create(
        model=DEFAULT_MODEL,
        input="What is the weather in Oslo?",
        tools=[WEATHER_TOOL],
        tool_choice="required",
        temperature=0,
        max_output_tokens=60,
    )
    call = next(o for o in first.output if o.type == "function_call")
    result = "Oslo: light snow, minus three degrees, wind from the north at ten metres per second."
    answer = client.responses.create(
        model=DEFAULT_MODEL,
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": result}],
        tools=[WEATHER_TOOL],
        tool_choice="none",
        **SHORT,
    )
    assert answer.output[0].type == "message" and answer.output_text.strip()
    assert first.usage and answer.usage
    assert answer.previous_response_id == first.id

    # The same turn, stateless: the whole history as items (as the Agents SDK sends it).
    history: Any = [
        {"role": "user", "content": "What is the weather in Oslo?"},
        {
            "type": "function_call",
            "call_id": call.call_id,
            "name": call.name,
            "arguments": call.arguments,
            "id": call.id,
            "status": "completed",
        },
        {"type": "function_call_output", "call_id": call.call_id, "output": result},
    ]
    stateless = client.responses.create(
        model=DEFAULT_MODEL,
        input=history,
        tools=[WEATHER_TOOL],
        tool_choice="none",
        store=False,
        **SHORT,
    )
    assert stateless.usage and stateless.usage.input_tokens == answer.usage.input_tokens
    assert stateless.output_text == answer.output_text, "the same prompt, stored or sent"

    terse = client.responses.create(
        model=DEFAULT_MODEL,
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "snow"}],
        tools=[WEATHER_TOOL],
        tool_choice="none",
        **SHORT,
    )
    assert terse.usage
    assert answer.usage.input_tokens >= terse.usage.input_tokens + 15, "the result is in the prompt"


def test_custom_tool_call(shared_manager: Manager) -> None:
    """A freeform tool (Codex's apply_patch) is offered as a function with one string."""
    patch_tool: Any = {"type": "custom", "name": "apply_patch", "description": "Edit a file."}
    forced: Any = {"type": "custom", "name": "apply_patch"}
    client = client_for(shared_manager)
    response = client.responses.create(
        model=DEFAULT_MODEL,
        input="Add a line saying hello to README.md.",
        tools=[patch_tool],
        tool_choice=forced,
        temperature=0,
        max_output_tokens=60,
    )
    call = response.output[-1]
    assert call.type == "custom_tool_call" and call.name == "apply_patch", response.output
    assert isinstance(call.input, str) and call.call_id

    events = list(
        client.responses.create(
            model=DEFAULT_MODEL,
            input="Add a line saying hello to README.md.",
            tools=[patch_tool],
            tool_choice=forced,
            temperature=0,
            max_output_tokens=60,
            stream=True,
        )
    )
    done = [e for e in events if e.type == "response.custom_tool_call_input.done"]
    assert done and done[0].input == call.input, "the same greedy call, streamed"
    final = events[-1]
    assert final.type == "response.completed"
    assert final.response.output[-1].type == "custom_tool_call"
