"""Overload and hostile input on a worker: queue limits, timeouts, body size."""

from __future__ import annotations

import concurrent.futures
import json

import httpx

from tests.conftest import Manager, ManagerFactory, model_entry, wait_for

MODEL = "busy:1"


def long_request(max_tokens: int = 400, stream: bool = False) -> dict[str, object]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Write a very long story about ships."}],
        "max_tokens": max_tokens,
        "temperature": 0.9,
        "stream": stream,
    }


def settled(endpoint: str) -> dict[str, object] | None:
    health: dict[str, object] = httpx.get(f"{endpoint}/health").json()
    return health if health["in_flight"] == 0 and not health["generating"] else None


def test_beyond_the_queue_callers_get_429_at_once(start_manager: ManagerFactory) -> None:
    # timeout_seconds: room for two 400-token replies in turn on a slow, shared machine.
    manager = start_manager(
        models=[model_entry(MODEL, max_concurrent=1, max_queue=1, timeout_seconds=180)]
    )
    endpoint = manager.load(MODEL)["endpoint"]

    def post(_: int) -> httpx.Response:
        return httpx.post(f"{endpoint}/v1/chat/completions", json=long_request(), timeout=120)

    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        replies = list(pool.map(post, range(5)))
    statuses = sorted(r.status_code for r in replies)
    assert statuses == [200, 200, 429, 429, 429], statuses
    refused = next(r for r in replies if r.status_code == 429)
    assert refused.headers["Retry-After"] == "1"
    assert refused.json()["error"]["code"] == "model_overloaded"
    for reply in replies:
        if reply.status_code == 200:
            assert reply.json()["usage"]["completion_tokens"] > 0
    wait_for(lambda: settled(endpoint), 30, message="the worker to go idle")


def test_slow_request_times_out_with_504_and_stops(start_manager: ManagerFactory) -> None:
    manager = start_manager(models=[model_entry(MODEL, timeout_seconds=1, n_ctx=4096)])
    endpoint = manager.load(MODEL)["endpoint"]
    before = httpx.get(f"{endpoint}/health").json()["tokens_generated"]
    reply = httpx.post(f"{endpoint}/v1/chat/completions", json=long_request(3000), timeout=60)
    assert reply.status_code == 504
    assert reply.json()["error"]["code"] == "timeout"
    health = wait_for(lambda: settled(endpoint), 30, message="the timed-out generation to stop")
    assert int(health["tokens_generated"]) - before < 1000  # type: ignore[call-overload]


def test_stream_past_its_deadline_ends_with_an_error_event(start_manager: ManagerFactory) -> None:
    manager = start_manager(models=[model_entry(MODEL, timeout_seconds=1, n_ctx=4096)])
    endpoint = manager.load(MODEL)["endpoint"]
    # Counting at temperature 0: thousands of tokens, never an early end of text.
    counting = {
        "model": MODEL,
        "prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,",
        "max_tokens": 3000,
        "temperature": 0,
        "stream": True,
    }
    with httpx.stream("POST", f"{endpoint}/v1/completions", json=counting, timeout=60) as reply:
        assert reply.status_code == 200
        events = [line for line in reply.iter_lines() if line.startswith("data: ")]
    last = json.loads(events[-1][len("data: ") :])
    assert last["error"]["code"] == "timeout"
    assert len(events) > 2, "tokens flowed before the deadline"
    wait_for(lambda: settled(endpoint), 30, message="the timed-out generation to stop")


def test_oversized_bodies_get_413(start_manager: ManagerFactory) -> None:
    manager: Manager = start_manager(
        config={"max_request_bytes": 4096}, models=[model_entry(MODEL)]
    )
    endpoint = manager.load(MODEL)["endpoint"]
    big = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 10000}]}
    for url in (f"{endpoint}/v1/chat/completions", f"{manager.url}/models/register"):
        reply = httpx.post(url, json=big, timeout=60)
        assert reply.status_code == 413, url
        assert reply.json()["error"]["code"] == "request_too_large"

    def chunks() -> object:
        for _ in range(10):
            yield b" " * 1000  # no Content-Length: the limit counts what arrives

    streamed = httpx.post(
        f"{endpoint}/v1/chat/completions",
        content=chunks(),  # type: ignore[arg-type]
        headers={"Content-Type": "application/json"},
        timeout=60,
    )
    assert streamed.status_code == 413
    ok = httpx.post(
        f"{endpoint}/v1/chat/completions",
        json={**big, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        timeout=60,  # a shared machine can be slow; the default 5 s is not the point here
    )
    assert ok.status_code == 200
