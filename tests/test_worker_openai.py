"""A worker port speaks the OpenAI API: the official `openai` client, real inference."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from tests.conftest import DEFAULT_MODEL, wait_for


@pytest.fixture(scope="module")
def client(worker_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{worker_url}/v1", api_key="unused", max_retries=0)


def test_chat_completion(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=[{"role": "user", "content": "Say hello in one short sentence."}],
        max_tokens=24,
    )
    choice = reply.choices[0]
    assert reply.model == DEFAULT_MODEL
    assert choice.message.role == "assistant"
    assert choice.message.content and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage is not None
    assert reply.usage.prompt_tokens > 5
    assert 0 < reply.usage.completion_tokens <= 24
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_max_tokens_is_honoured_exactly(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=[{"role": "user", "content": "Write a long essay about the sea."}],
        max_tokens=7,
        temperature=0,
    )
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == 7


def test_streaming_chat_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=[{"role": "user", "content": "Count from one to ten in words."}],
        max_tokens=40,
        temperature=0,  # sampled, the model at times stops after a few tokens
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, finish_reasons, usage = [], [], None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            if choice.finish_reason:
                finish_reasons.append(choice.finish_reason)
    assert len(pieces) > 3, f"tokens should arrive as separate chunks: {pieces}"
    assert "".join(pieces).strip()
    assert finish_reasons in (["stop"], ["length"])
    assert usage is not None and 0 < usage.completion_tokens <= 40
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_streaming_matches_non_streaming_with_the_same_seed(client: openai.OpenAI) -> None:
    request = {
        "model": DEFAULT_MODEL,
        "messages": [{"role": "user", "content": "Name three colours."}],
        "max_tokens": 20,
        "seed": 1234,
        "temperature": 0.9,
    }
    whole = client.chat.completions.create(**request).choices[0].message.content
    again = client.chat.completions.create(**request).choices[0].message.content
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(**request, stream=True)
        if c.choices
    )
    assert whole == again == streamed


def test_sse_wire_format_ends_with_done(worker_url: str) -> None:
    body = {
        "model": DEFAULT_MODEL,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 5,
        "stream": True,
    }
    with httpx.stream("POST", f"{worker_url}/v1/chat/completions", json=body) as reply:
        assert reply.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in reply.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    first = json.loads(lines[0][len("data: ") :])
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"]["role"] == "assistant"


def test_completions_and_stop_sequence(client: openai.OpenAI) -> None:
    free = client.completions.create(
        model=DEFAULT_MODEL, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0
    )
    text = free.choices[0].text
    assert "5" in text, f"greedy continuation should count on: {text!r}"
    stopped = client.completions.create(
        model=DEFAULT_MODEL, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0, stop=["6"]
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == text[: text.index("6")]
    assert stopped.usage is not None and stopped.usage.prompt_tokens > 0


def test_streaming_completions(client: openai.OpenAI) -> None:
    chunks = list(
        client.completions.create(
            model=DEFAULT_MODEL, prompt="The sky is", max_tokens=10, stream=True, temperature=0
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text.strip()
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_json_schema_output_parses_and_validates(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            # Numeric bounds are left out: llama-cpp-python's schema-to-grammar
            # converter does not enforce minimum/maximum (docs/API.md says so).
            "age": {"type": "integer"},
            "mood": {"enum": ["happy", "calm", "grumpy"]},
            "likes_cats": {"type": "boolean"},
        },
        "required": ["name", "age", "mood", "likes_cats"],
        "additionalProperties": False,
    }
    reply = client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=[{"role": "user", "content": "Describe a person as JSON."}],
        max_tokens=120,
        temperature=0.2,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": schema, "strict": True},
        },
    )
    assert reply.choices[0].finish_reason == "stop"
    document = json.loads(reply.choices[0].message.content or "")
    jsonschema.validate(document, schema)


def test_json_object_mode_returns_json(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=[{"role": "user", "content": "Give a JSON object with one key 'ok'."}],
        max_tokens=60,
        temperature=0,
        response_format={"type": "json_object"},
    )
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(reply.choices[0].message.content or ""), dict)
    else:  # cut by max_tokens: still well-formed so far
        assert (reply.choices[0].message.content or "").lstrip().startswith("{")


def test_models_and_health(client: openai.OpenAI, worker_url: str) -> None:
    assert [m.id for m in client.models.list().data] == [DEFAULT_MODEL]
    health = httpx.get(f"{worker_url}/health").json()
    assert health["status"] == "ready"
    assert health["model"] == DEFAULT_MODEL
    assert health["uptime_seconds"] > 0
    assert health["requests_served"] > 0
    assert health["in_flight"] == 0
    assert health["last_request_at"] is not None


def test_worker_metrics(worker_url: str) -> None:
    text = httpx.get(f"{worker_url}/metrics").text
    assert f'pool_worker_completion_tokens_total{{model="{DEFAULT_MODEL}"}}' in text
    assert "pool_worker_time_to_first_token_seconds_bucket" in text


def test_client_disconnect_stops_generation(worker_url: str) -> None:
    before = httpx.get(f"{worker_url}/health").json()["tokens_generated"]
    body = {
        "model": DEFAULT_MODEL,
        "messages": [{"role": "user", "content": "Write a very long story."}],
        "max_tokens": 1500,
        "stream": True,
        "temperature": 0.8,
    }
    with httpx.stream("POST", f"{worker_url}/v1/chat/completions", json=body) as reply:
        received = 0
        for line in reply.iter_lines():
            if line.startswith("data: "):
                received += 1
            if received >= 5:
                break  # leaving the block closes the connection mid-stream

    def settled() -> dict[str, object] | None:
        health: dict[str, object] = httpx.get(f"{worker_url}/health").json()
        return health if health["in_flight"] == 0 and not health["generating"] else None

    health = wait_for(settled, 30, message="the abandoned generation to stop")
    spent = int(health["tokens_generated"]) - before  # type: ignore[call-overload]
    assert spent < 300, f"{spent} tokens generated for a client that left after 5"


def test_unknown_model_on_worker_is_404(worker_url: str) -> None:
    reply = httpx.post(
        f"{worker_url}/v1/chat/completions",
        json={"model": "nope", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert reply.status_code == 404
    assert reply.json()["error"]["code"] == "model_not_found"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": DEFAULT_MODEL, "messages": []}, "messages"),
        ({"model": DEFAULT_MODEL, "messages": [{"role": "wizard", "content": "x"}]}, None),
        (
            {
                "model": DEFAULT_MODEL,
                "messages": [{"role": "user", "content": "x"}],
                "temperature": "hot",
            },
            "temperature",
        ),
        (
            {
                "model": DEFAULT_MODEL,
                "messages": [{"role": "user", "content": "x"}],
                "temperature": -1,
            },
            "temperature",
        ),
        (
            {
                "model": DEFAULT_MODEL,
                "messages": [{"role": "user", "content": "x"}],
                "max_tokens": 0,
            },
            "max_tokens",
        ),
        (
            {
                "model": DEFAULT_MODEL,
                "messages": [{"role": "user", "content": "x"}],
                "max_tokens": 10**9,
            },
            "max_tokens",
        ),
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
    ],
)
def test_bad_requests_get_openai_errors(
    worker_url: str, body: dict[str, object], param: str | None
) -> None:
    reply = httpx.post(f"{worker_url}/v1/chat/completions", json=body)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["message"]
    if param:
        assert error["param"] is not None and error["param"].startswith(param)


def test_malformed_json_is_400(worker_url: str) -> None:
    reply = httpx.post(
        f"{worker_url}/v1/chat/completions",
        content=b'{"model": "x", "messages": [',
        headers={"Content-Type": "application/json"},
    )
    assert reply.status_code == 400
    assert reply.json()["error"]["code"] == "invalid_json"


def test_prompt_longer_than_context_is_400(worker_url: str) -> None:
    long_text = "word " * 5000
    reply = httpx.post(
        f"{worker_url}/v1/chat/completions",
        json={"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": long_text}]},
    )
    assert reply.status_code == 400
    assert reply.json()["error"]["code"] == "context_length_exceeded"


def test_requests_are_served_concurrently_without_loss(worker_url: str) -> None:
    import concurrent.futures

    def ask(i: int) -> tuple[int, str]:
        reply = httpx.post(
            f"{worker_url}/v1/completions",
            json={"model": DEFAULT_MODEL, "prompt": f"Item {i}:", "max_tokens": 8},
            timeout=120,
        )
        return reply.status_code, reply.json()["choices"][0]["text"]

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(ask, range(6)))
    assert [status for status, _ in results] == [200] * 6
