"""Seed 003's sessions, WebSocket streaming and FIFO queue on the manager (issue 17), with the real
model: a session keeps its context across requests and a manager restart, belongs to its
caller, is trimmed to the model's context; `/ws` streams tokens and `stop` ends the
generation at once. Sessions live in the SQL store, or in a real Redis with REDIS_URL."""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection, connect

from tests.conftest import DEFAULT_MODEL, Manager, ManagerFactory, model_entry, wait_for
from tests.redis_server import REDIS_PASSWORD, RedisServer

ADMIN_KEY = "admin-key-sessions-1b9e"
CLIENT_KEY = "client-key-sessions-4c2d"
N_CTX = 1024
STORY = "Write a long story about a lighthouse keeper and the sea, with many details."


@pytest.fixture(params=["sqlite", "postgresql", "redis"])
def pool(request: pytest.FixtureRequest, start_manager: ManagerFactory) -> Iterator[Manager]:
    """A manager whose sessions live in SQLite (the default), PostgreSQL or Redis."""
    env = {"POOL_ADMIN_KEY": ADMIN_KEY, "POOL_API_KEY": CLIENT_KEY}
    if request.param == "postgresql":
        env["DATABASE_URL"] = request.getfixturevalue("postgres_server").create_database("sessions")
    if request.param == "redis":
        env["REDIS_URL"] = request.getfixturevalue("redis_server").create_database()
    manager = start_manager(
        models=[model_entry(DEFAULT_MODEL, warmup=True, n_ctx=N_CTX)],
        env=env,
        config={"spare_workers": 0},
    )
    manager.wait_state(DEFAULT_MODEL, "HOT")
    yield manager


def make_key(manager: Manager, name: str) -> str:
    made = manager.request("POST", "/keys", json={"name": name, "limits": {}})
    assert made.status_code == 201, made.text
    key: str = made.json()["key"]
    return key


def chat(manager: Manager, key: str, **body: Any) -> httpx.Response:
    body.setdefault("max_tokens", 8)
    body.setdefault("temperature", 0)
    return httpx.post(
        f"{manager.url}/api/v1/inference/chat",
        json=body,
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    )


def test_a_session_keeps_its_context_across_turns_and_a_restart(pool: Manager) -> None:
    key = make_key(pool, "alice")
    first = chat(pool, key, session_id="s-1", prompt="My name is Zorblax. Remember it.")
    assert first.status_code == 200, first.text
    one = first.json()
    assert one["session_id"] == "s-1" and one["model"] == DEFAULT_MODEL and one["response"]
    second = chat(pool, key, session_id="s-1", prompt="What is my name?").json()
    # The model saw the first turn: its prompt holds both turns, not just this one.
    alone = chat(pool, key, prompt="What is my name?").json()
    assert (
        second["usage"]["prompt_tokens"]
        > alone["usage"]["prompt_tokens"] + one["usage"]["completion_tokens"]
    )
    stored = pool.request("GET", "/api/v1/sessions/s-1", headers={"X-API-Key": key}).json()
    assert [m["role"] for m in stored["messages"]] == ["user", "assistant"] * 2
    assert stored["messages"][2]["content"] == "What is my name?"
    assert stored["messages"][3]["content"] == second["response"]
    assert pool.stop() == 0
    pool.start()
    third = chat(pool, key, session_id="s-1", prompt="And again?").json()
    assert third["usage"]["prompt_tokens"] > second["usage"]["prompt_tokens"]
    listed = httpx.get(
        f"{pool.url}/api/v1/sessions", headers={"X-API-Key": key}, timeout=10
    ).json()["sessions"]
    assert [(s["session_id"], s["messages"]) for s in listed] == [("s-1", 6)]


def test_a_session_is_its_owners(pool: Manager) -> None:
    alice, bob = make_key(pool, "alice"), make_key(pool, "bob")
    assert chat(pool, alice, session_id="private", prompt="Hello").status_code == 200
    taken = chat(pool, bob, session_id="private", prompt="Hello")
    assert taken.status_code == 403 and taken.json()["error"]["param"] == "session_id"
    for method in ("GET", "DELETE"):
        reply = httpx.request(
            method, f"{pool.url}/api/v1/sessions/private", headers={"X-API-Key": bob}, timeout=10
        )
        assert reply.status_code == 403, (method, reply.text)
    bobs = httpx.get(f"{pool.url}/api/v1/sessions", headers={"X-API-Key": bob}, timeout=10)
    assert bobs.json()["sessions"] == []
    everyone = pool.request("GET", "/api/v1/sessions").json()["sessions"]  # the admin
    assert [(s["session_id"], s["owner"]) for s in everyone] == [("private", "key:alice")]
    assert pool.request("DELETE", "/api/v1/sessions/private").status_code == 200
    assert pool.request("DELETE", "/api/v1/sessions/private").status_code == 404
    bad = chat(pool, alice, session_id="no spaces allowed", prompt="Hi")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "session_id"
    # The worker's refusal keeps its status and words, streamed or not (the fuzzer once
    # got a 502 for a streamed turn whose max_tokens passed the context).
    for stream in (False, True):
        too_long = chat(pool, alice, prompt="Hi", max_tokens=100_000, stream=stream)
        assert too_long.status_code == 400, too_long.text
        assert "max_tokens" in too_long.json()["error"]["message"]


def test_a_long_session_is_trimmed_to_the_models_context(pool: Manager) -> None:
    key = make_key(pool, "chatty")
    n_ctx = N_CTX
    long_prompt = "Please read this carefully. " * 40  # ~280 tokens a turn
    dropped = []
    for turn in range(n_ctx // 200 + 2):
        reply = chat(pool, key, session_id="long", prompt=f"Turn {turn}. {long_prompt}")
        assert reply.status_code == 200, reply.text
        dropped.append(reply.json()["history_dropped"])
        assert reply.json()["usage"]["prompt_tokens"] < n_ctx
    assert dropped[0] == 0 and dropped[-1] > 0, dropped


def receive(socket: ClientConnection) -> dict[str, Any]:
    message: dict[str, Any] = json.loads(socket.recv(timeout=60))
    return message


def worker_health(manager: Manager) -> dict[str, Any]:
    endpoint = manager.model(DEFAULT_MODEL)["endpoint"]
    health = httpx.get(f"{endpoint}/health", headers={"X-API-Key": CLIENT_KEY}, timeout=10)
    detail: dict[str, Any] = health.json()
    return detail


def test_websocket_streams_tokens_and_stop_ends_the_generation(pool: Manager) -> None:
    key = make_key(pool, "socket")
    url = pool.url.replace("http://", "ws://") + "/ws"
    with pytest.raises(InvalidStatus) as refused:
        connect(url, open_timeout=10).close()
    assert refused.value.response.status_code == 403
    with connect(f"{url}?token={key}", open_timeout=10) as socket:
        socket.send(
            json.dumps(
                {
                    "event": "stream_chat",
                    "data": {"prompt": "Say hi.", "max_tokens": 6, "session_id": "ws-1"},
                }
            )
        )
        events = [receive(socket)]
        while events[-1]["event"] not in ("stream_end", "error"):
            events.append(receive(socket))
        kinds = [e["event"] for e in events]
        assert kinds[0] == "stream_start" and kinds[-1] == "stream_end", kinds
        assert set(kinds[1:-1]) == {"stream_token"}
        end = events[-1]["data"]
        assert end["usage"]["completion_tokens"] >= len(kinds) - 2 >= 1  # a token each, at least
        text = "".join(e["data"]["token"] for e in events[1:-1])
        stored = pool.request("GET", "/api/v1/sessions/ws-1", headers={"X-API-Key": key}).json()
        assert stored["messages"][-1]["content"] == text

        # A long generation, stopped after a few tokens: the worker stops spending tokens.
        before = worker_health(pool)["tokens_generated"]
        socket.send(
            json.dumps(
                {
                    "event": "stream_chat",
                    "data": {"prompt": STORY, "max_tokens": 600, "temperature": 0},
                }
            )
        )
        assert receive(socket)["event"] == "stream_start"
        for _ in range(3):
            assert receive(socket)["event"] == "stream_token"
        socket.send(json.dumps({"event": "stop"}))
        while (event := receive(socket))["event"] == "stream_token":
            pass
        assert event["event"] == "stream_end" and event["data"]["finish_reason"] == "stopped"
        wait_for(lambda: not worker_health(pool)["generating"], 10, message="the worker to stop")
        spent = worker_health(pool)["tokens_generated"] - before
        assert spent < 100, f"the stop did not end the generation: {spent} tokens of 600"
        # The connection still serves the next turn; a bad message gets an error event.
        socket.send("not json")
        assert receive(socket)["event"] == "error"
    wait_for(
        lambda: (
            pool.request("GET", "/usage", params={"caller": "key:socket"}).json()["totals"][
                "completion_tokens"
            ]
            > 0
        ),
        10,
        message="the stopped stream's tokens to be booked",
    )
    booked = pool.request("GET", "/usage", params={"caller": "key:socket"}).json()["totals"]
    assert booked["requests"] == 2 and booked["completion_tokens"] < 100


def queue_depth(endpoint: str) -> int:
    metrics = httpx.get(f"{endpoint}/metrics", headers={"X-API-Key": CLIENT_KEY}, timeout=10).text
    line = next(m for m in metrics.splitlines() if m.startswith("pool_worker_queue_depth{"))
    return int(float(line.rsplit(" ", 1)[1]))


def test_the_queue_is_first_in_first_out_under_concurrent_submitters(
    start_manager: ManagerFactory,
) -> None:
    """Seed 003's FIFO queue: requests that wait for a model's slot are served in the
    order they arrived, whoever sent them and however many send at once."""
    manager = start_manager(
        models=[model_entry(DEFAULT_MODEL, warmup=True, max_concurrent=1, max_queue=16)],
        env={"POOL_ADMIN_KEY": ADMIN_KEY, "POOL_API_KEY": CLIENT_KEY},
        config={"spare_workers": 0},
    )
    manager.wait_state(DEFAULT_MODEL, "HOT")
    endpoint = manager.model(DEFAULT_MODEL)["endpoint"]
    keys = [make_key(manager, f"submitter-{i}") for i in range(3)]
    finished: list[int] = []
    lock = threading.Lock()

    def submit(index: int) -> None:
        reply = chat(manager, keys[index % len(keys)], prompt=f"Say {index}.", max_tokens=3)
        assert reply.status_code == 200, reply.text
        with lock:
            finished.append(index)

    blocker = {"prompt": STORY, "max_tokens": 300, "stream": True}
    with httpx.stream(
        "POST",
        f"{manager.url}/api/v1/inference/chat",
        json={**blocker, "temperature": 0},
        headers={"Authorization": f"Bearer {keys[0]}"},
        timeout=60,
    ) as holding:
        lines = holding.iter_lines()
        next(line for line in lines if line.startswith("data: "))  # it holds the slot
        threads = []
        for index in range(8):
            thread = threading.Thread(target=submit, args=(index,))
            thread.start()
            threads.append(thread)
            # The next one arrives once this one waits in the queue: a known order.
            wait_for(lambda n=index: queue_depth(endpoint) == n + 1, 20, message="queued")
        assert finished == [], "a request passed the one holding the slot"
    for thread in threads:
        thread.join(60)
    assert finished == list(range(8))


def test_health_names_the_dependency_that_is_down(start_manager: ManagerFactory) -> None:
    """Redis for sessions stopped under a running manager: /health says `degraded` and
    names it; inference goes on; a session turn gets 503 `store_down`; back once it is."""
    server = RedisServer.create()
    try:
        manager = start_manager(
            models=[model_entry(DEFAULT_MODEL, warmup=True)],
            env={"POOL_ADMIN_KEY": ADMIN_KEY, "REDIS_URL": server.url_for(0)},
            config={"spare_workers": 0},
        )
        manager.wait_state(DEFAULT_MODEL, "HOT")
        health = manager.request("GET", "/health").json()
        assert health["status"] == "healthy" and health["dependencies"]["redis"]["ok"]
        server.stop()
        down = manager.request("GET", "/health").json()
        assert down["status"] == "degraded"
        assert down["dependencies"]["redis"]["ok"] is False
        assert down["dependencies"]["database"]["ok"] is True
        assert REDIS_PASSWORD not in json.dumps(down)
        turn = chat(manager, ADMIN_KEY, session_id="s", prompt="Hi")
        assert turn.status_code == 503 and turn.json()["error"]["code"] == "store_down"
        plain = httpx.post(
            f"{manager.url}/v1/chat/completions",
            json={
                "model": DEFAULT_MODEL,
                "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 2,
            },
            headers={"X-API-Key": ADMIN_KEY},
            timeout=60,
        )
        assert plain.status_code == 200, "inference stopped with the session store"
        server.start()
        wait_for(
            lambda: manager.request("GET", "/health").json()["status"] == "healthy",
            20,
            message="health to recover with Redis",
        )
        assert chat(manager, ADMIN_KEY, session_id="s", prompt="Hi").status_code == 200
    finally:
        server.destroy()


def test_health_names_a_silent_worker(start_manager: ManagerFactory) -> None:
    """A worker that stops beating (SIGSTOP) makes /health `degraded` and names its model,
    before the pool kills it as hung; it recovers when the worker goes on."""
    manager = start_manager(
        models=[model_entry(DEFAULT_MODEL, warmup=True)],
        config={"spare_workers": 0, "hang_timeout_seconds": 60},
    )
    pid = manager.wait_state(DEFAULT_MODEL, "HOT")["pid"]
    workers = manager.request("GET", "/health").json()["dependencies"]["workers"]
    assert workers == {"ok": True, "serving": 1, "silent": [], "failed": []}
    os.kill(pid, signal.SIGSTOP)
    try:
        down = wait_for(
            lambda: (h := manager.request("GET", "/health").json())["status"] == "degraded" and h,
            20,
            message="health to name the silent worker",
        )
        assert down["dependencies"]["workers"]["silent"] == [DEFAULT_MODEL]
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_for(
        lambda: manager.request("GET", "/health").json()["status"] == "healthy",
        20,
        message="health to recover",
    )
