"""Wait, don't refuse (issue 16, point 1): the admission queue, as a policy and end to end.

A request for a model that cannot be placed now (the pool full of busy models) waits for
room instead of getting 503 at once; 503 with Retry-After comes only past
admission_timeout_seconds or when admission_queue_max loads wait already.
"""

from __future__ import annotations

import threading

import httpx
import pytest

from pool_manager.admission import AdmissionQueue, QueueFull, rank_of
from tests.conftest import Manager, ManagerFactory, model_entry, wait_for

BUSY, WAITING = "busy:1", "waiting:1"


def test_the_queue_orders_pinned_then_priority_then_arrival() -> None:
    queue = AdmissionQueue(max_waiting=5)
    low = queue.enter("low", rank_of("low", pinned=False))
    first_normal = queue.enter("n1", rank_of("normal", pinned=False))
    high = queue.enter("high", rank_of("high", pinned=False))
    second_normal = queue.enter("n2", rank_of("normal", pinned=False))
    pinned = queue.enter("pinned", rank_of("low", pinned=True))
    assert queue.waiting() == ["pinned", "high", "n1", "n2", "low"]
    assert queue.is_first(pinned) and queue.ahead_of(second_normal) == 3
    with pytest.raises(QueueFull):
        queue.enter("one-too-many", 2)
    for ticket in (pinned, high, first_normal):
        queue.leave(ticket)
        queue.leave(ticket)  # leaving twice changes nothing
    assert queue.is_first(second_normal) and queue.waiting() == ["n2", "low"]
    queue.leave(low)
    queue.leave(second_normal)
    assert len(queue) == 0 and not queue.is_first(low)


def _long_stream(url: str, into: list[str], tokens: int = 1000) -> None:
    """A stream of `tokens` tokens (a raw prompt the model goes on counting from, at
    temperature 0: it never ends the text early)."""
    body = {
        "model": BUSY,
        "prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,",
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as reply:
        into.extend(line for line in reply.iter_lines() if line)


def _chat(url: str, model: str) -> httpx.Response:
    """A short chat; it may wait as long as the busy model's long stream runs."""
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600)


def _busy_pool(
    start_manager: ManagerFactory, admission_timeout_seconds: float, tokens: int = 1000
) -> tuple[Manager, list[str], threading.Thread]:
    """A pool with room for one model, BUSY loaded there and streaming a long reply of
    `tokens` tokens (its SSE lines gathered as they come), and WAITING registered, COLD."""
    busy = model_entry(BUSY, timeout_seconds=600, n_ctx=max(1024, tokens + 64))
    manager = start_manager(
        config={
            "max_concurrent_models": 1,
            "admission_timeout_seconds": admission_timeout_seconds,
        },
        models=[busy, model_entry(WAITING)],
    )
    manager.load(BUSY)
    lines: list[str] = []
    stream = threading.Thread(target=_long_stream, args=(manager.url, lines, tokens))
    stream.start()
    wait_for(lambda: len(lines) > 3, 60, message="the busy model to stream")
    return manager, lines, stream


def test_a_request_waits_for_a_busy_model_instead_of_503(start_manager: ManagerFactory) -> None:
    manager, lines, stream = _busy_pool(start_manager, admission_timeout_seconds=300)
    replies: list[httpx.Response] = []
    waiting = threading.Thread(target=lambda: replies.append(_chat(manager.url, WAITING)))
    waiting.start()
    queue = wait_for(
        lambda: manager.request("GET", "/health").json()["waiting_for_room"],
        30,
        message="the load to wait in the admission queue",
    )
    assert queue == [WAITING]
    assert "data: [DONE]" not in lines, "it waits while the busy model is still streaming"
    waiting.join(300)
    stream.join(300)
    assert replies and replies[0].status_code == 200, replies and replies[0].text
    assert any('"usage"' in line for line in lines) and lines[-1] == "data: [DONE]", (
        "the busy model's request finished whole before it was evicted"
    )
    models = manager.models()
    assert models[WAITING]["state"] == "HOT" and models[BUSY]["state"] == "COLD"


def test_past_the_deadline_or_a_full_queue_it_is_503(start_manager: ManagerFactory) -> None:
    manager, lines, stream = _busy_pool(start_manager, admission_timeout_seconds=1)
    late = _chat(manager.url, WAITING)
    assert late.status_code == 503 and late.json()["error"]["code"] == "pool_full", late.text
    assert "admission_timeout_seconds=1" in late.json()["error"]["message"]
    assert int(late.headers["Retry-After"]) > 0
    assert manager.request("PATCH", "/config", json={"admission_queue_max": 0}).status_code == 200
    full = _chat(manager.url, WAITING)
    assert full.status_code == 503 and "admission_queue_max=0" in full.json()["error"]["message"]
    stream.join(600)
    assert lines[-1] == "data: [DONE]"
    assert manager.model(WAITING)["state"] == "COLD"


def test_a_load_whose_client_left_is_given_up(start_manager: ManagerFactory) -> None:
    """The client's own timeout counts: a client that gives up while its model waits for
    room takes the load with it, and the busy model is not evicted for nobody."""
    # A stream of ~15 s: the give-up must be seen while it runs (1,000 tokens took ~5 s,
    # too close to the client's 2 s plus the check on a loaded CI machine).
    manager, lines, stream = _busy_pool(start_manager, admission_timeout_seconds=300, tokens=3000)
    body = {"model": WAITING, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{manager.url}/v1/chat/completions", json=body, timeout=2)
    wait_for(
        lambda: manager.request("GET", "/health").json()["waiting_for_room"] == [],
        30,
        message="the load to be given up",
    )
    assert "data: [DONE]" not in lines, "given up while the busy model still streams"
    stream.join(600)
    assert lines[-1] == "data: [DONE]"
    models = manager.models()
    assert models[BUSY]["state"] == "HOT" and models[WAITING]["state"] == "COLD"
    assert "load given up: no caller left" in manager.log()


def test_a_busy_model_is_evicted_once_its_requests_end_and_takes_no_new_ones(
    start_manager: ManagerFactory,
) -> None:
    """Under steady traffic a loaded model may never be idle: a load that waits for room
    marks it instead. It finishes what it has, takes nothing new (a later request for it
    waits, then loads it again), and the waiting load goes first."""
    manager, lines, stream = _busy_pool(start_manager, admission_timeout_seconds=300)
    first_load = manager.model(BUSY)["loaded_at"]
    finished: list[tuple[str, httpx.Response]] = []

    def ask(model: str) -> None:
        finished.append((model, _chat(manager.url, model)))

    waiting = threading.Thread(target=ask, args=(WAITING,))
    waiting.start()
    wait_for(lambda: manager.model(BUSY)["evicting"], 30, message="the busy model to be marked")
    later = threading.Thread(target=ask, args=(BUSY,))
    later.start()  # while the long stream runs: without the mark, served beside it at once
    for thread in (waiting, later, stream):
        thread.join(300)
    assert [model for model, _ in finished] == [WAITING, BUSY], "the waiting load went first"
    assert all(reply.status_code == 200 for _, reply in finished), finished
    assert lines[-1] == "data: [DONE]", "the busy model's request finished whole"
    busy = manager.model(BUSY)
    assert busy["state"] == "HOT" and busy["loaded_at"] != first_load, "loaded again for it"
    assert busy["evicting"] is False
