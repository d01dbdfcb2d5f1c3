"""A hung worker is found and replaced; nobody waits on it forever (issue 14, point 4).

A worker sends a heartbeat each second from its event loop. SIGSTOP silences it, as a
blocked event loop would: the manager must kill it after hang_timeout_seconds, free its
model as after a crash (last_error says why), and its clients must get an answer or a
clean error, not an endless wait. The manager must also not keep connections the
workers closed (CLOSE_WAIT) once traffic stops.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import psutil

from pool_manager.worker_process import hang_reason
from tests.conftest import DEFAULT_MODEL, ManagerFactory, model_entry, pid_alive, wait_for

HANG_TIMEOUT = 3
CHAT = {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "Hi"}]}
# A raw prompt the model goes on counting from: a stream that does not end early.
LONG_STREAM = {
    "model": DEFAULT_MODEL,
    "prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,",
    "max_tokens": 400,
    "stream": True,
}


def _stream_into(url: str, lines: list[str]) -> None:
    """Stream LONG_STREAM through the manager, gathering its SSE lines as they come."""
    with httpx.stream("POST", f"{url}/v1/completions", json=LONG_STREAM, timeout=300) as reply:
        lines.extend(line for line in reply.iter_lines() if line)


def test_a_stopped_worker_is_killed_and_its_clients_answered(
    start_manager: ManagerFactory,
) -> None:
    manager = start_manager(
        config={"hang_timeout_seconds": HANG_TIMEOUT},
        models=[model_entry(DEFAULT_MODEL, warmup=True)],
    )
    hung_pid = manager.wait_state(DEFAULT_MODEL, "HOT")["pid"]
    manager.seen_worker_pids.add(hung_pid)

    # A stream under way when the worker stops ends with an error event, not silence.
    stream_lines: list[str] = []

    streaming = threading.Thread(target=_stream_into, args=(manager.url, stream_lines))
    streaming.start()
    wait_for(lambda: len(stream_lines) > 2, 60, message="the stream to start")
    os.kill(hung_pid, signal.SIGSTOP)
    started = time.monotonic()
    # A request sent to the stopped worker: answered once the pool has replaced it.
    reply = httpx.post(
        f"{manager.url}/v1/chat/completions", json={**CHAT, "max_tokens": 2}, timeout=90
    )
    waited = time.monotonic() - started
    assert reply.status_code in (200, 502, 503, 504), reply.text
    if reply.status_code != 200:
        assert reply.json()["error"]["code"], "a clean OpenAI-shaped error"
    streaming.join(90)
    assert not streaming.is_alive(), "the stream ended"
    assert stream_lines and "worker_failed" in "".join(stream_lines[-3:]), stream_lines[-3:]

    wait_for(lambda: not pid_alive(hung_pid), 30, message="the stopped worker to be killed")
    model = manager.wait_state(DEFAULT_MODEL, "HOT", timeout=60)
    assert model["pid"] != hung_pid and model["crashes"] == 1
    assert "hung" in (model["last_error"] or "") or "hung" in manager.log()
    assert "killing a hung worker" in manager.log()
    print(f"the request waited {waited:.1f} s with hang_timeout_seconds={HANG_TIMEOUT}")


def test_no_connection_lingers_in_close_wait(start_manager: ManagerFactory) -> None:
    manager = start_manager()
    manager.wait_state(DEFAULT_MODEL, "HOT")

    def one(_: int) -> int:
        return httpx.post(
            f"{manager.url}/v1/chat/completions", json={**CHAT, "max_tokens": 1}, timeout=60
        ).status_code

    threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert manager.process is not None
    process = psutil.Process(manager.process.pid)

    def lingering() -> list[str]:
        return [
            f"{c.laddr} -> {c.raddr}"
            for c in process.net_connections(kind="tcp")
            if c.status == psutil.CONN_CLOSE_WAIT
        ]

    # The workers close idle keep-alive connections after 5 s; the manager must follow.
    wait_for(lambda: not lingering(), 20, message=f"no CLOSE_WAIT sockets ({lingering()})")
    assert json.loads(manager.request("GET", "/health").text)["status"] == "healthy"


def test_what_counts_as_hung() -> None:
    """The rule the hang watcher applies to each serving worker's last heartbeat."""
    assert hang_reason(1.0, 0.0, 15, 300) is None
    assert hang_reason(14.9, 299.0, 15, 300) is None, "a long step that still beats is fine"
    silent = hang_reason(16.0, 0.0, 15, 300)
    assert silent is not None and "no heartbeat for 16 s" in silent
    stuck = hang_reason(1.0, 301.0, 15, 300)
    assert stuck is not None and "decode step has run for 301 s" in stuck


def test_requests_queued_on_a_killed_worker_go_to_its_replacement(
    start_manager: ManagerFactory,
) -> None:
    """One slot: a long stream runs, three requests wait behind it in the worker's queue.
    The worker is killed: the stream ends with a clean error (it was generating), the
    three that had not started are sent again to the new worker and answered."""
    manager = start_manager(
        models=[model_entry(DEFAULT_MODEL, warmup=True, max_concurrent=1, timeout_seconds=300)]
    )
    pid = manager.wait_state(DEFAULT_MODEL, "HOT")["pid"]
    manager.seen_worker_pids.add(pid)
    stream_lines: list[str] = []

    queued: list[httpx.Response] = []

    def one() -> None:
        queued.append(
            httpx.post(
                f"{manager.url}/v1/chat/completions", json={**CHAT, "max_tokens": 2}, timeout=300
            )
        )

    streaming = threading.Thread(target=_stream_into, args=(manager.url, stream_lines))
    streaming.start()
    wait_for(lambda: len(stream_lines) > 2, 60, message="the stream to start")
    waiting = [threading.Thread(target=one) for _ in range(3)]
    for thread in waiting:
        thread.start()
    worker_health = f"{manager.model(DEFAULT_MODEL)['endpoint']}/health"
    wait_for(
        lambda: httpx.get(worker_health, timeout=5).json().get("in_flight", 0) >= 4,
        60,
        message="three requests queued behind the stream",
    )
    os.kill(pid, signal.SIGKILL)
    streaming.join(300)
    for thread in waiting:
        thread.join(300)
    assert "worker_failed" in stream_lines[-1], stream_lines[-2:]
    assert [r.status_code for r in queued] == [200, 200, 200], [r.text for r in queued]
    assert manager.model(DEFAULT_MODEL)["pid"] != pid
