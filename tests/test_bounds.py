"""Bounds on every input (issue 14): what is too large, too deep or of the wrong type gets
a clean 4xx at once, and what is expensive to prepare runs off the worker's event loop.

The stall tests send a large input and, while it is handled, ask the same worker for
/health and a small real chat: both must answer within a generous deadline (before the
fix, a 7.5 MB prompt stalled the worker for 2.5-10 s and 30,000 messages for 15-30 s).
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from pydantic import ValidationError

from model_service.limits import MAX_JSON_DEPTH, json_depth
from model_service.protocol import MAX_MESSAGES
from pool_manager.config import MAX_N_BATCH, ModelSpec
from pool_manager.launch import PACKAGE_ROOT, manager_command
from tests.conftest import DEFAULT_MODEL, Manager

STALL_DEADLINE = 2.0  # seconds for /health or a 1-token chat while a big request runs
USER = [{"role": "user", "content": "hi"}]


def chat(url: str, body: dict[str, Any], timeout: float = 60) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=timeout)


def error_of(reply: httpx.Response) -> dict[str, Any]:
    body = reply.json()
    assert set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    assert error["type"] == "invalid_request_error" and error["message"], error
    return error


def while_handled(url: str, send_big: Callable[[], httpx.Response]) -> httpx.Response:
    """Run `send_big` on a thread; meanwhile /health and a small chat must answer in time."""
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["reply"] = send_big()
        except Exception as exc:  # reported below
            result["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(0.2)  # the big body is sent and being handled
    checks = 0
    while thread.is_alive() or checks < 2:
        health = httpx.get(f"{url}/health", timeout=STALL_DEADLINE)
        assert health.status_code == 200
        small = chat(
            url,
            {"model": DEFAULT_MODEL, "messages": USER, "max_tokens": 1},
            timeout=STALL_DEADLINE * 3,  # a step may wait for another request's
        )
        assert small.status_code == 200, small.text
        checks += 1
    thread.join()
    assert "error" not in result, result
    reply: httpx.Response = result["reply"]
    return reply


# --- stalls: the worker keeps answering --------------------------------------------------


def test_a_huge_prompt_is_refused_by_its_size_without_stalling(worker_url: str) -> None:
    text = "hello world " * (7_500_000 // 12)

    def send() -> httpx.Response:
        body = {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": text}]}
        return chat(worker_url, body)

    reply = while_handled(worker_url, send)
    assert reply.status_code == 400
    error = error_of(reply)
    assert error["code"] == "context_length_exceeded"
    # Refused by its length in bytes, before tokenizing 1.25 million tokens.
    assert "bytes long" in error["message"], error
    completion = httpx.post(
        f"{worker_url}/v1/completions",
        json={"model": DEFAULT_MODEL, "prompt": text, "max_tokens": 1},
        timeout=60,
    )
    assert completion.status_code == 400
    assert error_of(completion)["param"] == "prompt"


def test_many_large_messages_are_prepared_off_the_event_loop(worker_url: str) -> None:
    # 2,000 messages, 7 MB: parsed, rendered and measured on a thread.
    messages = [{"role": "user", "content": f"{i} " + "x" * 3500} for i in range(2000)]

    def send() -> httpx.Response:
        return chat(worker_url, {"model": DEFAULT_MODEL, "messages": messages})

    reply = while_handled(worker_url, send)
    assert reply.status_code == 400
    assert error_of(reply)["code"] == "context_length_exceeded"


def test_too_many_messages_are_refused_before_rendering(worker_url: str) -> None:
    messages = [{"role": "user", "content": "a"}] * 30_000

    def send() -> httpx.Response:
        return chat(worker_url, {"model": DEFAULT_MODEL, "messages": messages})

    reply = while_handled(worker_url, send)
    assert reply.status_code == 400
    error = error_of(reply)
    assert error["code"] == "array_above_max_length" and error["param"] == "messages"
    assert f"maximum length {MAX_MESSAGES}" in error["message"]


@pytest.mark.parametrize("where", ["response_format", "tools"])
def test_a_schema_with_20000_enum_values_is_refused(worker_url: str, where: str) -> None:
    schema = {
        "type": "object",
        "properties": {"x": {"type": "string", "enum": [f"v{i:05}" for i in range(20_000)]}},
        "required": ["x"],
    }
    body: dict[str, Any] = {"model": DEFAULT_MODEL, "messages": USER, "max_tokens": 40}
    if where == "tools":
        body["tools"] = [{"type": "function", "function": {"name": "f", "parameters": schema}}]
        body["tool_choice"] = "required"
        body["messages"] = [{"role": "user", "content": "call f"}]
    else:
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "x", "schema": schema},
        }
    reply = while_handled(worker_url, lambda: chat(worker_url, body))
    assert reply.status_code == 400
    error = error_of(reply)
    # tools: the schema is also in the prompt, which may be refused first for its size.
    assert error["code"] in ("schema_too_large", "context_length_exceeded"), error
    if where == "response_format":
        assert error["code"] == "schema_too_large" and "1000" in error["message"]


def test_a_schema_within_the_bounds_still_works(worker_url: str) -> None:
    schema = {"type": "string", "enum": [f"v{i}" for i in range(200)]}
    reply = chat(
        worker_url,
        {
            "model": DEFAULT_MODEL,
            "messages": USER,
            "max_tokens": 8,
            "response_format": {"type": "json_schema", "json_schema": {"schema": schema}},
        },
    )
    assert reply.status_code == 200, reply.text
    assert json.loads(reply.json()["choices"][0]["message"]["content"]) in schema["enum"]


# --- size and nesting, on the worker and on the manager -------------------------------------


def deep_body(depth: int) -> bytes:
    return b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "x": %s1%s}' % (
        DEFAULT_MODEL.encode(),
        b"[" * depth,
        b"]" * depth,
    )


def test_json_depth_counts_brackets_outside_strings() -> None:
    assert json_depth(b'"x"') == 0
    assert json_depth(b"{}") == 1
    assert json_depth(b'{"a": [1, {"b": "[[[[{{{"}]}') == 3
    assert json_depth(b'{"a\\"[[[": [[]]}') == 3  # an escaped quote does not end a string
    assert json_depth(b"[" * 5000 + b"]" * 5000) == 5000


COMMON_PATHS = ("/v1/chat/completions", "/v1/completions")


@pytest.mark.parametrize(
    ("surface", "path"),
    [
        *((surface, path) for surface in ("worker", "manager") for path in COMMON_PATHS),
        ("worker", "/v1/count_tokens"),
        ("manager", "/api/chat"),
    ],
)
def test_json_nested_5000_deep_is_a_clean_400(
    shared_manager: Manager, worker_url: str, surface: str, path: str
) -> None:
    url = worker_url if surface == "worker" else shared_manager.url
    reply = httpx.post(
        url + path,
        content=deep_body(5000),
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["code"] == "json_too_deep" and str(MAX_JSON_DEPTH) in error["message"]


def test_nesting_within_the_limit_is_accepted(worker_url: str) -> None:
    reply = httpx.post(
        f"{worker_url}/v1/chat/completions",
        content=deep_body(MAX_JSON_DEPTH - 2).replace(b'"x"', b'"max_tokens": 1, "x"'),
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert reply.status_code == 200, reply.text


@pytest.mark.parametrize("surface", ["worker", "manager"])
@pytest.mark.parametrize("chunked", [True, False])
def test_a_10_mb_body_is_a_clean_413(
    shared_manager: Manager, worker_url: str, surface: str, chunked: bool
) -> None:
    url = worker_url if surface == "worker" else shared_manager.url
    opening = b'{"model": "%s", "messages": [{"role": "user", "content": "' % DEFAULT_MODEL.encode()

    def pieces() -> Any:
        yield opening
        for _ in range(100):
            yield b"a" * 100_000
        yield b'"}]}'

    content: Any = pieces() if chunked else b"".join(pieces())
    reply = httpx.post(
        f"{url}/v1/chat/completions",
        content=content,
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert reply.status_code == 413
    error = reply.json()["error"]
    assert error["code"] == "request_too_large" and "limit" in error["message"]


# --- types and ranges: strict, as OpenAI ---------------------------------------------------------

WRONG = [
    ({"max_tokens": "10"}, "max_tokens", "invalid_type"),
    ({"max_tokens": True}, "max_tokens", "invalid_type"),
    ({"max_tokens": 10.0}, "max_tokens", "invalid_type"),
    ({"stream": "yes"}, "stream", "invalid_type"),
    ({"n": "2"}, "n", "invalid_type"),
    ({"temperature": "0.5"}, "temperature", "invalid_type"),
    ({"seed": 2**64}, "seed", "integer_above_max_value"),
    ({"seed": -(2**63) - 1}, "seed", "integer_below_min_value"),
]


@pytest.mark.parametrize("surface", ["worker", "manager"])
@pytest.mark.parametrize(("fields", "param", "code"), WRONG)
def test_wrong_types_and_ranges_are_refused_on_chat_and_completions(
    shared_manager: Manager,
    worker_url: str,
    surface: str,
    fields: dict[str, Any],
    param: str,
    code: str,
) -> None:
    url = worker_url if surface == "worker" else shared_manager.url
    for path, base in (
        ("/v1/chat/completions", {"messages": USER}),
        ("/v1/completions", {"prompt": "hi"}),
    ):
        body = {"model": DEFAULT_MODEL, "max_tokens": 2, **base, **fields}
        reply = httpx.post(url + path, json=body, timeout=30)
        assert reply.status_code == 400, (path, reply.text)
        error = error_of(reply)
        assert (error["param"], error["code"]) == (param, code), (path, error)


def test_seeds_within_64_bits_are_accepted(worker_url: str) -> None:
    for seed in (-1, 2**63 - 1):
        body = {"model": DEFAULT_MODEL, "messages": USER, "max_tokens": 2, "seed": seed}
        assert chat(worker_url, body).status_code == 200


@pytest.mark.parametrize("role", ["user", "system", "tool"])
def test_null_content_is_refused_but_for_an_assistant(worker_url: str, role: str) -> None:
    messages: list[dict[str, Any]] = [{"role": role, "content": None}]
    reply = chat(worker_url, {"model": DEFAULT_MODEL, "messages": messages, "max_tokens": 2})
    assert reply.status_code == 400
    assert error_of(reply)["param"] == "messages.0.content"
    calling = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None},
        {"role": "user", "content": "again"},
    ]
    assert (
        chat(worker_url, {"model": DEFAULT_MODEL, "messages": calling, "max_tokens": 2}).status_code
        == 200
    )


@pytest.mark.parametrize(
    ("path", "body", "words"),
    [
        (
            "/api/chat",
            '{"model": "M", "messages": [{"role": "user", "content": "hi"}], '
            '"options": {"num_predict": 1e400}}',
            "num_predict",
        ),
        ("/api/chat", {"messages": USER, "options": {"seed": 2**64}}, "seed"),
        ("/api/generate", {"prompt": "hi", "options": {"seed": 2**64}}, "seed"),
        ("/api/chat", {"messages": USER, "stream": "yes"}, "stream"),
        ("/v1/messages", {"messages": USER, "max_tokens": "10"}, "max_tokens"),
        ("/v1/messages", {"messages": USER, "max_tokens": True}, "max_tokens"),
        ("/v1/messages", {"messages": USER, "max_tokens": 2, "stream": "yes"}, "stream"),
        ("/v1/messages", {"messages": [{"role": "user", "content": None}], "max_tokens": 2}, ""),
        ("/v1/responses", {"input": "hi", "max_output_tokens": "10"}, "max_output_tokens"),
        ("/v1/responses", {"input": "hi", "max_output_tokens": True}, "max_output_tokens"),
        ("/v1/responses", {"input": "hi", "stream": "yes"}, "stream"),
        ("/v1/inference", {"prompt": "hi", "max_tokens": "10"}, "max_tokens"),
        ("/v1/inference", {"prompt": "hi", "max_tokens": True}, "max_tokens"),
        ("/v1/inference", {"prompt": None}, "prompt"),
    ],
)
def test_every_manager_surface_refuses_wrong_types(
    shared_manager: Manager, path: str, body: dict[str, Any] | str, words: str
) -> None:
    if isinstance(body, str):
        content = body.replace('"M"', json.dumps(DEFAULT_MODEL)).encode()
    else:
        key = "model_id" if path == "/v1/inference" else "model"
        content = json.dumps({key: DEFAULT_MODEL, **body}).encode()
    reply = httpx.post(
        shared_manager.url + path,
        content=content,
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert reply.status_code == 400, reply.text
    assert words in reply.text


# --- the registry and the config files -----------------------------------------------------------


def test_n_batch_is_bounded() -> None:
    base = {"model_id": "m", "model_path": "m.gguf", "n_ctx": 1024}
    with pytest.raises(ValidationError, match="n_batch"):
        ModelSpec.model_validate({**base, "n_batch": 20_000_000})
    with pytest.raises(ValidationError, match="n_batch"):
        ModelSpec.model_validate({**base, "n_batch": MAX_N_BATCH + 1})
    assert ModelSpec.model_validate({**base, "n_batch": 4096}).n_batch == 1024
    assert ModelSpec.model_validate({**base, "n_batch": 256}).n_batch == 256
    assert ModelSpec.model_validate(base).n_batch == 512


def test_registering_a_huge_n_batch_is_a_400(shared_manager: Manager) -> None:
    reply = shared_manager.request(
        "POST",
        "/models/register",
        json={"model_id": "bounds/huge-batch", "model_path": "x.gguf", "n_batch": 20_000_000},
    )
    assert reply.status_code == 400 and "n_batch" in reply.text


@pytest.mark.parametrize("problem", ["utf8", "directory", "deep", "not_json"])
@pytest.mark.parametrize("which", ["config", "registry"])
def test_a_bad_file_stops_the_manager_with_one_clear_line(
    tmp_path: Path, problem: str, which: str
) -> None:
    config, registry = tmp_path / "config.json", tmp_path / "registry.json"
    config.write_text("{}")
    registry.write_text('{"models": []}')
    bad = config if which == "config" else registry
    bad.unlink()
    expected = {
        "utf8": "not valid UTF-8",
        "directory": "is a directory",
        "deep": "nests JSON more than",
        "not_json": "not valid JSON",
    }[problem]
    if problem == "utf8":
        bad.write_bytes(b'{"models": [], "x": "\xff\xfe"}')
    elif problem == "directory":
        bad.mkdir()
    elif problem == "deep":
        bad.write_text('{"x": ' + "[" * 5000 + "]" * 5000 + "}")
    else:
        bad.write_text("{")
    done = subprocess.run(
        manager_command(config, registry),
        cwd=PACKAGE_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("pool-manager: ") and str(bad) in lines[0]
    assert expected in lines[0], lines[0]


# --- the idle worker is idle ---------------------------------------------------------------------


def _raw(port: int, data: bytes, leave_after: float) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(data)
        time.sleep(leave_after)  # then close: the client is gone, answered or not


def _post(body: bytes, extra: bytes = b"") -> bytes:
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n%s\r\n"
        % (len(body), extra)
        + body
    )


def test_an_idle_worker_uses_no_cpu_after_adversarial_requests(
    shared_manager: Manager, worker_url: str
) -> None:
    """A worker once spun at ~95 % CPU for minutes after such a round, with nothing to do."""
    port = int(worker_url.rsplit(":", 1)[1])
    pid = shared_manager.model(DEFAULT_MODEL)["pid"]
    story = {"model": DEFAULT_MODEL, "messages": USER, "max_tokens": 100, "stream": True}
    big = {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "hi " * 2_000_000}]}
    many = {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "a"}] * 30_000}
    sends = [
        (_post(json.dumps(story).encode()), 0.3),  # a stream its client leaves
        (_post(json.dumps(big).encode())[:3_000_000], 0.2),  # half a body, then gone
        (_post(json.dumps(big).encode()), 0.05),  # gone before the answer
        (_post(json.dumps(many).encode()), 0.05),
        (_post(deep_body(5000)), 0.2),
        (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n100000\r\n" + b"a" * 50_000,
            0.1,
        ),  # a chunk cut short
    ]
    threads = [threading.Thread(target=_raw, args=(port, *send)) for send in sends]
    for thread in threads:
        thread.start()
    for fields in WRONG:
        chat(worker_url, {"model": DEFAULT_MODEL, "messages": USER, "max_tokens": 2, **fields[0]})
    for thread in threads:
        thread.join()

    def idle() -> bool:
        health = httpx.get(f"{worker_url}/health", timeout=10).json()
        return health["in_flight"] == 0 and not health["generating"]

    deadline = time.monotonic() + 60
    while not idle():
        assert time.monotonic() < deadline, "the worker did not become idle"
        time.sleep(0.2)
    time.sleep(1)  # threads finishing refused work
    process = psutil.Process(pid)
    before = process.cpu_times()
    time.sleep(10)
    after = process.cpu_times()
    used = (after.user + after.system) - (before.user + before.system)
    assert used < 0.5, f"the idle worker used {used:.2f} CPU seconds in 10 s"
