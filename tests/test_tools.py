"""Tool calls, logprobs and `n` on a worker port and through 8050, with the `openai` client.

The model is SmolLM2-135M: `required` and a named `tool_choice` are enforced by a grammar,
so a call is guaranteed; under `auto` the model chooses, so no test depends on its choice
beyond the reply having one of the two valid shapes.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from model_service.tools import ArgumentsDelta, CallStart, ToolReplyParser, read_reply
from tests.conftest import DEFAULT_MODEL, REPO, Manager, ManagerFactory, model_entry

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"$ref": "#/$defs/Unit"},
            },
            "required": ["city", "unit"],
            "$defs": {"Unit": {"enum": ["celsius", "fahrenheit"]}},
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two integers.",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
        },
    },
}
TOOLS: list[Any] = [WEATHER, ADD]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


@pytest.fixture(scope="module", params=["worker", "manager"])
def client(request: pytest.FixtureRequest, shared_manager: Manager, worker_url: str) -> Any:
    base = worker_url if request.param == "worker" else shared_manager.url
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)


def _valid_call(call: Any, name: str | None = None) -> dict[str, Any]:
    assert call.type == "function" and call.id.startswith("call_")
    assert name is None or call.function.name == name
    arguments: dict[str, Any] = json.loads(call.function.arguments)
    jsonschema.validate(arguments, SCHEMAS[call.function.name])
    return arguments


@pytest.mark.parametrize(
    "choice",
    ["required", {"type": "function", "function": {"name": "add"}}],
    ids=["required", "named"],
)
def test_enforced_choice_returns_a_valid_call(client: openai.OpenAI, choice: Any) -> None:
    reply = client.chat.completions.create(
        model=DEFAULT_MODEL, messages=ASK, tools=TOOLS, tool_choice=choice, temperature=0
    )
    message = reply.choices[0].message
    assert reply.choices[0].finish_reason == "tool_calls"
    assert message.tool_calls is not None and len(message.tool_calls) == 1
    named = choice["function"]["name"] if isinstance(choice, dict) else None
    _valid_call(message.tool_calls[0], named)
    assert not message.content


def test_auto_replies_with_a_call_or_text(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=DEFAULT_MODEL, messages=ASK, tools=TOOLS, temperature=0, max_tokens=100
    )
    choice = reply.choices[0]
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls"
        for call in choice.message.tool_calls:
            _valid_call(call)
    else:
        assert choice.message.content and choice.finish_reason in ("stop", "length")
        assert not choice.message.content.lstrip().startswith('{"')  # unwrapped text


def test_none_ignores_the_tools(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=ASK,
        tools=TOOLS,
        tool_choice="none",
        temperature=0,
        max_tokens=8,
    )
    assert reply.choices[0].message.tool_calls is None
    assert reply.choices[0].message.content
    plain = client.chat.completions.create(
        model=DEFAULT_MODEL, messages=ASK, temperature=0, max_tokens=8
    )
    assert reply.choices[0].message.content == plain.choices[0].message.content


def test_parallel_calls_when_allowed(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=[{"role": "user", "content": "Weather in Paris and in Rome?"}],
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=True,
        temperature=0,
        max_tokens=120,
    )
    calls = reply.choices[0].message.tool_calls or []
    assert calls, reply
    assert len({call.id for call in calls}) == len(calls)
    for call in calls:
        _valid_call(call, "get_weather")


def test_streamed_call_arrives_in_fragments(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=ASK,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0,
        stream=True,
    )
    first: Any = None
    fragments: list[str] = []
    finish = None
    for chunk in stream:
        for choice in chunk.choices:
            assert not choice.delta.content
            for delta in choice.delta.tool_calls or []:
                assert delta.index == 0
                if first is None:
                    first = delta  # OpenAI's order: id and name first
                    assert delta.id and delta.id.startswith("call_") and delta.type == "function"
                    assert delta.function and delta.function.name == "get_weather"
                else:
                    assert delta.id is None and delta.function and delta.function.name is None
                fragments.append(delta.function.arguments or "")
            finish = choice.finish_reason or finish
    assert first is not None and finish == "tool_calls"
    assert len([f for f in fragments if f]) > 1  # streamed, not sent whole
    jsonschema.validate(json.loads("".join(fragments)), SCHEMAS["get_weather"])


def test_two_turn_round_trip(client: openai.OpenAI) -> None:
    """The call and its result go back as history; the next reply sees them."""
    first = client.chat.completions.create(
        model=DEFAULT_MODEL, messages=ASK, tools=TOOLS, tool_choice="required", temperature=0
    )
    call = first.choices[0].message.tool_calls[0]  # type: ignore[index]
    history: list[Any] = [
        *ASK,
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 degrees."},
    ]
    second = client.chat.completions.create(
        model=DEFAULT_MODEL, messages=history, tools=TOOLS, temperature=0, max_tokens=60
    )
    assert second.choices[0].finish_reason in ("stop", "tool_calls", "length")
    longer = [*history[:-1], {**history[-1], "content": "Sunny, 21 degrees. " * 4}]
    with_longer = client.chat.completions.create(
        model=DEFAULT_MODEL, messages=longer, tools=TOOLS, max_tokens=1
    )
    # The tool's result is part of the prompt: a longer one costs more tokens.
    assert second.usage and with_longer.usage
    assert second.usage.prompt_tokens < with_longer.usage.prompt_tokens


def test_tool_errors_are_400(client: openai.OpenAI) -> None:
    bad: list[dict[str, Any]] = [
        {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        {"tool_choice": "required"},
        {"tools": [ADD, ADD]},
        {"tools": [{"type": "function", "function": {"name": "bad name!"}}]},
        {"tools": [{"type": "retrieval"}]},
        {"tools": TOOLS, "tool_choice": "sometimes"},
        {"logprobs": False, "top_logprobs": 2},
        {"top_logprobs": 21, "logprobs": True},
        {"n": 9},
    ]
    for extra in bad:
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model=DEFAULT_MODEL, messages=ASK, **extra)
        error = caught.value.body
        assert isinstance(error, dict) and error.get("message"), extra


def test_chat_logprobs(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=ASK,
        temperature=0,
        max_tokens=6,
        logprobs=True,
        top_logprobs=3,
    )
    choice = reply.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content
    entries = choice.logprobs.content
    assert len(entries) == reply.usage.completion_tokens  # type: ignore[union-attr]
    assert "".join(entry.token for entry in entries) == choice.message.content
    for entry in entries:
        assert entry.logprob <= 0 and bytes(entry.bytes or []).decode() == entry.token
        assert len(entry.top_logprobs) == 3
        values = [alt.logprob for alt in entry.top_logprobs]
        assert values == sorted(values, reverse=True)
        # Greedy: the token taken is the likeliest one.
        assert entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)


def test_completion_logprobs(client: openai.OpenAI) -> None:
    reply = client.completions.create(
        model=DEFAULT_MODEL, prompt="Once upon a time", max_tokens=5, temperature=0, logprobs=2
    )
    logprobs = reply.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens and logprobs.token_logprobs
    assert "".join(logprobs.tokens) == reply.choices[0].text
    assert logprobs.text_offset == [
        sum(len(t) for t in logprobs.tokens[:i]) for i in range(len(logprobs.tokens))
    ]
    assert all(len(top) == 2 for top in logprobs.top_logprobs or [])


def test_n_choices(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=DEFAULT_MODEL, messages=ASK, n=3, max_tokens=6, temperature=1.0, seed=7
    )
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 3 * 6 or all(
        c.finish_reason in ("stop", "length") for c in reply.choices
    )
    texts = {c.message.content for c in reply.choices}
    assert len(texts) > 1  # seeds 7, 8, 9: different samples
    again = client.chat.completions.create(
        model=DEFAULT_MODEL, messages=ASK, n=3, max_tokens=6, temperature=1.0, seed=7
    )
    assert [c.message.content for c in again.choices] == [c.message.content for c in reply.choices]


def test_n_choices_streamed(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=ASK,
        n=2,
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    texts = {0: "", 1: ""}
    finished = set()
    usage = None
    ids = set()
    for chunk in stream:
        ids.add(chunk.id)
        usage = chunk.usage or usage
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished.add(choice.index)
    assert finished == {0, 1} and len(ids) == 1
    assert texts[0] == texts[1] and texts[0]  # greedy: the same text twice
    assert usage is not None and usage.completion_tokens == 12


def test_model_by_id(client: openai.OpenAI) -> None:
    assert client.models.retrieve(DEFAULT_MODEL).id == DEFAULT_MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_count_tokens_on_the_worker(worker_url: str) -> None:
    def count(body: dict[str, Any]) -> int:
        reply = httpx.post(
            f"{worker_url}/v1/count_tokens", json={"model": DEFAULT_MODEL, **body}, timeout=30
        )
        assert reply.status_code == 200, reply.text
        value: int = reply.json()["prompt_tokens"]
        return value

    plain = count({"messages": ASK})
    with_tools = count({"messages": ASK, "tools": TOOLS})
    longer = count(
        {"messages": [{"role": "user", "content": "What is the weather in Paris? " * 5}]}
    )
    assert 0 < plain < with_tools and plain < longer


def test_agents_sdk_loop(shared_manager: Manager) -> None:
    """The OpenAI Agents SDK runs its loop against 8050: the model calls a Python tool,
    the SDK runs it, and the run ends with the tool's answer."""
    agents = pytest.importorskip("agents")
    agents.set_tracing_disabled(True)
    cities: list[str] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """Get the current weather for a city."""
        cities.append(city)
        return f"It is sunny and 21 degrees in {city}."

    client = openai.AsyncOpenAI(base_url=f"{shared_manager.url}/v1", api_key="unused")
    agent = agents.Agent(
        name="weather",
        instructions="Answer weather questions with the get_weather tool.",
        tools=[get_weather],
        model=agents.OpenAIChatCompletionsModel(model=DEFAULT_MODEL, openai_client=client),
        model_settings=agents.ModelSettings(tool_choice="required", temperature=0),
        # A 135M model asked again after the result tends to call the tool once more;
        # stopping at the first tool's result keeps the loop finite and the test exact.
        tool_use_behavior="stop_on_first_tool",
    )
    result = asyncio.run(agents.Runner.run(agent, "What is the weather in Paris?", max_turns=3))
    assert len(cities) == 1 and cities[0]
    assert result.final_output == f"It is sunny and 21 degrees in {cities[0]}."


# --- the reply parser, without a model --------------------------------------------------


CALLS_REPLY = (
    '{"tool_calls": [{"name": "add", "arguments": {"a": 1, "b": {"x": "}\\"{"}}}, '
    '{"name": "get_weather", "arguments": {"city": "Par\\u00eds"}}]}'
)


@pytest.mark.parametrize("size", [1, 2, 3, 7, len(CALLS_REPLY)])
def test_parser_reads_calls_in_any_pieces(size: int) -> None:
    parser = ToolReplyParser()
    events = []
    for at in range(0, len(CALLS_REPLY), size):
        events += parser.feed(CALLS_REPLY[at : at + size])
    starts = [e for e in events if isinstance(e, CallStart)]
    assert [(s.index, s.name) for s in starts] == [(0, "add"), (1, "get_weather")]
    for index in (0, 1):
        arguments = "".join(
            e.text for e in events if isinstance(e, ArgumentsDelta) and e.index == index
        )
        assert json.loads(arguments) == json.loads(CALLS_REPLY)["tool_calls"][index]["arguments"]
    assert not [e for e in events if isinstance(e, str)]
    assert len(parser.finished_calls()) == 2


@pytest.mark.parametrize("size", [1, 2, 5, 100])
def test_parser_unwraps_a_text_response(size: int) -> None:
    reply = '{"response": "caf\\u00e9 \\ud83d\\ude00 \\"quoted\\"\\nend"}'
    parser = ToolReplyParser()
    text = "".join(
        e
        for at in range(0, len(reply), size)
        for e in parser.feed(reply[at : at + size])
        if isinstance(e, str)
    )
    assert text == 'café 😀 "quoted"\nend'
    assert not parser.calls


def test_parser_cut_short_and_unexpected_text() -> None:
    cut = read_reply('{"tool_calls": [{"name": "add", "arguments": {"a": 1')
    assert cut.calls == [] and cut.content == ""
    structured = read_reply('{"response": {"answer": [1, 2]}}')
    assert structured.content is not None and json.loads(structured.content) == {"answer": [1, 2]}
    assert read_reply("plain words").content == "plain words"


# --- a chat template that knows tools: calls in <tool_call> tags -----------------------

NATIVE_TEMPLATE = REPO / "configs/chat_templates/chatml-tools.jinja"


def test_native_template_tools(start_manager: ManagerFactory) -> None:
    """With a template that writes <tool_call> blocks, tools go through the template and
    calls come back out of the blocks, constrained or read from free text."""
    manager = start_manager(
        models=[
            model_entry(
                "native", warmup=True, n_ctx=2048, chat_template=NATIVE_TEMPLATE.read_text()
            )
        ]
    )
    worker = manager.wait_state("native", "HOT")["endpoint"]
    client = openai.OpenAI(base_url=f"{manager.url}/v1", api_key="unused", max_retries=0)
    ask: dict[str, Any] = {"model": "native", "messages": ASK, "tools": TOOLS, "temperature": 0}
    reply = client.chat.completions.create(**ask, tool_choice="required")
    assert reply.choices[0].finish_reason == "tool_calls"
    assert not reply.choices[0].message.content
    _valid_call(reply.choices[0].message.tool_calls[0])  # type: ignore[index]

    stream = client.chat.completions.create(
        **ask, tool_choice={"type": "function", "function": {"name": "add"}}, stream=True
    )
    deltas = [d for chunk in stream for c in chunk.choices for d in c.delta.tool_calls or []]
    assert deltas[0].function and deltas[0].function.name == "add" and deltas[0].id
    arguments = "".join((d.function.arguments if d.function else "") or "" for d in deltas)
    jsonschema.validate(json.loads(arguments), SCHEMAS["add"])

    free = client.chat.completions.create(**ask, max_tokens=40)
    assert "<tool_call>" not in (free.choices[0].message.content or "")

    def count(messages: list[Any]) -> int:
        body = {"model": "native", "messages": messages, "tools": TOOLS}
        value: int = httpx.post(f"{worker}/v1/count_tokens", json=body).json()["prompt_tokens"]
        return value

    call = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call]}]
    with_result = [*history, {"role": "tool", "tool_call_id": "c1", "content": "2"}]
    # The template renders the call (its <tool_call> block) and the tool's response.
    assert count(ASK) < count(history) < count(with_result)


NATIVE_REPLY = (
    "Let me check.\n<tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
    "<tool_call>\n"
    '{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call> done <tool_'
)


@pytest.mark.parametrize("size", [1, 3, 11, len(NATIVE_REPLY)])
def test_parser_reads_native_blocks(size: int) -> None:
    parser = ToolReplyParser("hermes")
    events = []
    for at in range(0, len(NATIVE_REPLY), size):
        events += parser.feed(NATIVE_REPLY[at : at + size])
    events += parser.finish()
    text = "".join(e for e in events if isinstance(e, str))
    assert text == "Let me check.\n\n done <tool_"  # a tag cut short is text after all
    starts = [(e.index, e.name) for e in events if isinstance(e, CallStart)]
    assert starts == [(0, "get_weather"), (1, "add")]
    assert [json.loads(c.arguments) for c in parser.finished_calls()] == [
        {"city": "Paris"},
        {"a": 1, "b": 2},
    ]
    assert read_reply(NATIVE_REPLY, "hermes").content == "Let me check.\n\n done <tool_"
