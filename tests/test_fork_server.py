"""The fork server (model_service/fork_server.py, pool_manager/fork_server.py): spares
forked from a process that has imported the worker, re-parented to the manager.

In-process tests make this pytest process the subreaper (as the manager makes itself);
the end-to-end ones run the real manager, its real fork server and real inference.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from openai import OpenAI

from pool_manager import fork_server
from pool_manager.fork_server import ForkedProcess, ForkServer, become_subreaper
from pool_manager.worker_process import SpareOptions, WorkerProcess, worker_environment
from tests.conftest import Manager, ManagerFactory, model_entry, pid_alive, wait_for

OPTIONS = SpareOptions(graceful_seconds=5, log_level="WARNING")
_PR_SET_CHILD_SUBREAPER = 36


@pytest.fixture
def subreaper() -> Iterator[None]:
    """This pytest process as the manager makes itself, for this test only: orphans of
    later tests' daemons (`ray start`) must not become its zombies."""
    assert become_subreaper() is None
    yield
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    assert libc.prctl(_PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0) == 0


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


async def _until(condition: object, timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while not callable(condition) or not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {message}")
        await asyncio.sleep(0.02)


async def test_an_exit_code_is_read_through_the_pidfd() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(42)"])
    assert await asyncio.wait_for(ForkedProcess(child.pid).wait(), 30) == 42
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    process = ForkedProcess(sleeper.pid)
    assert process.returncode is None
    process.send_signal(signal.SIGKILL)
    assert await asyncio.wait_for(process.wait(), 30) == -signal.SIGKILL
    process.send_signal(signal.SIGKILL)  # gone: nothing is signalled, nothing raised


async def test_spares_are_forked_become_our_children_and_outlive_the_fork_server(
    subreaper: None,
) -> None:
    exits: list[ForkServer] = []
    server = await ForkServer.start(sandbox=False, env=worker_environment(), on_exit=exits.append)
    try:
        spare = await WorkerProcess.start_spare(OPTIONS, server)
        await _until(lambda: spare.is_warm_spare, 120, "the forked spare to be ready")
        assert server.ready
        assert _parent(spare.pid) == os.getpid(), "re-parented to us, the subreaper"
        assert "--fork-server" in psutil.Process(spare.pid).cmdline(), "forked, not spawned"
        assert os.getpgid(spare.pid) == spare.pid, "a process group of its own"

        server_pid = server.pid
        os.kill(server_pid, signal.SIGKILL)
        await _until(lambda: exits == [server], 30, "the fork server's exit to be noticed")
        assert not server.alive and not server.ready
        assert spare.returncode is None and pid_alive(spare.pid), "the spare stays"
        with pytest.raises(OSError):
            await server.fork(OPTIONS.worker_args(), worker_environment(), urgent=False)
        # Its exit code is ours to read: SIGTERM with no model makes it exit on SIGTERM.
        assert await spare.stop(timeout=30) == -signal.SIGTERM
    finally:
        await server.close()


async def test_a_spare_whose_manager_end_closes_exits_and_is_reaped(subreaper: None) -> None:
    server = await ForkServer.start(sandbox=False, env=worker_environment())
    try:
        process, ours = await server.fork(OPTIONS.worker_args(), worker_environment(), False)
        ours.close()  # what a manager that went away leaves: EOF on the spare's socket
        code = await asyncio.wait_for(process.wait(), 120)
        assert code in (0, -signal.SIGTERM)  # it ends itself with SIGTERM after EOF
        assert not psutil.pid_exists(process.pid), "reaped, no zombie left"
    finally:
        await server.close()


async def test_a_fork_its_caller_left_is_reaped_and_the_next_gets_its_own_answer(
    subreaper: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = await ForkServer.start(sandbox=False, env=worker_environment())
    try:
        await _until(lambda: server.ready, 120, "the fork server's imports")
        # This session's other children (servers of other tests' fixtures) are not ours.
        others = {c.pid for c in psutil.Process().children()}
        # No time to answer: the caller gives up right after asking.
        monkeypatch.setattr(fork_server, "FORK_TIMEOUT_SECONDS", 0)
        with pytest.raises(OSError, match="did not answer"):
            await server.fork(OPTIONS.worker_args(), worker_environment(), urgent=False)
        monkeypatch.undo()
        spare = await WorkerProcess.start_spare(OPTIONS, server)
        # Had it been handed the first fork's answer, it would be the left spare, which
        # exits (its socket is closed), and never say `spare` on this socket.
        await _until(lambda: spare.is_warm_spare, 120, "the second spare to be ready")
        assert spare.pid not in others
        # The first spare exits (its socket is closed) and is reaped: without that it
        # would stay our zombie child.
        await _until(
            lambda: {c.pid for c in psutil.Process().children()} - others == {spare.pid},
            60,
            "the left spare to be reaped",
        )
        spare.kill()
        await spare.wait_exit()
    finally:
        await server.close()


# --- the manager's fork server -----------------------------------------------------------


def _fork_server_pid(manager: Manager) -> int | None:
    pid: int | None = manager.request("GET", "/health").json()["fork_server_pid"]
    return pid


def _spares(manager: Manager) -> list[int]:
    pids: list[int] = manager.request("GET", "/health").json()["spare_pids"]
    return pids


def test_the_manager_forks_its_spares_and_replaces_a_fork_server_that_died(
    start_manager: ManagerFactory,
) -> None:
    manager = start_manager(
        config={"spare_workers": 1}, models=[model_entry("a:1"), model_entry("b:1")]
    )
    assert manager.process is not None
    first_server = wait_for(lambda: _fork_server_pid(manager), 120, message="a fork server")
    spare = wait_for(lambda: _spares(manager), 120, message="a spare")[0]
    assert _parent(spare) == manager.process.pid
    assert "--fork-server" in psutil.Process(spare).cmdline(), "forked from the fork server"

    os.kill(first_server, signal.SIGKILL)
    second_server = wait_for(
        lambda: (p := _fork_server_pid(manager)) not in (None, first_server) and p,
        120,
        message="a new fork server",
    )
    assert pid_alive(second_server)
    a = manager.load("a:1")
    assert a["pid"] == spare, "the spare forked from the first server still serves"
    client = OpenAI(base_url=f"{manager.url}/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(
        model="a:1", messages=[{"role": "user", "content": "Hi"}], max_tokens=4
    )
    assert reply.choices[0].message.content is not None
    # The replacement of the spare a:1 took comes from the new fork server.
    replacement = wait_for(lambda: _spares(manager), 120, message="a replacement spare")[0]
    assert replacement != spare and _parent(replacement) == manager.process.pid
    assert "--fork-server" in psutil.Process(replacement).cmdline()

    manager.request("PATCH", "/config", json={"spare_workers": 0}).raise_for_status()
    wait_for(lambda: _fork_server_pid(manager) is None, 30, message="the fork server to stop")
    wait_for(lambda: not pid_alive(second_server), 30, message="its process to exit")
