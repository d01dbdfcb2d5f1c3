"""The fork server: a process that has imported the worker and forks spares from itself.

A spare started as a new process spends most of its start importing FastAPI, uvicorn,
llama.cpp and numpy: ~1.2 s of CPU, 1.6-1.7 s wall on a slow 2-core machine and more
beside serving workers. Five cold starts 1 s apart outran that (issue 16): each found
no spare ready and started its own process, and the imports then shared the cores. A
fork of a process that has done those imports answers within milliseconds.

Run as `python -m model_service.spare --fork-server` (model_service/spare.py enters the
sandbox and imports first). On its control socket the manager sends `fork` lines
(model_service/contract.py) with the spare's control socket attached (SCM_RIGHTS); the
server answers `forked` with the spare's pid, or `failed` with why.

Each spare is forked twice, the process in between exiting at once: the spare is then
re-parented to the manager, which made itself a child subreaper
(PR_SET_CHILD_SUBREAPER). So the manager waits for its spares and reads their exit codes
(`EXIT_OUT_OF_MEMORY` matters) as for any process it started, and spares outlive a fork
server that dies.

Forking is safe only in a process with one thread: the import runs on a thread that is
joined before serving, and the server checks the count before each fork.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from typing import NoReturn

from model_service import cpus, sandbox
from model_service.contract import (
    FailedEvent,
    ForkCommand,
    ForkedEvent,
    ForkServerReadyEvent,
    parse_fork_command,
)

WorkerMain = Callable[[list[str]], int]
SINGLE_THREAD_WAIT_SECONDS = 1.0


class ForkError(Exception):
    """No spare was forked; the message says why (sent to the manager as `failed`)."""


def serve(control: socket.socket, worker_main: WorkerMain) -> int:
    """Fork a spare for each `fork` line until the manager closes the socket."""
    # The default, whatever the manager had: with SIGCHLD ignored, the process in between
    # would be reaped by the kernel, and waiting for it would fail.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    control.sendall(ForkServerReadyEvent(pid=os.getpid()).encode())
    pending = b""
    received_fds: list[int] = []  # in order; each `fork` line takes the next one
    while True:
        data, fds, _flags, _addr = socket.recv_fds(control, 1 << 20, 4)
        received_fds.extend(fds)
        if not data:
            return 0  # the manager is gone; its spares see their own sockets close
        pending += data
        *lines, pending = pending.split(b"\n")
        for line in lines:
            reply = _answer(line, received_fds, control, worker_main)
            control.sendall(reply.encode())


def _answer(
    line: bytes, received_fds: list[int], control: socket.socket, worker_main: WorkerMain
) -> ForkedEvent | FailedEvent:
    try:
        command = parse_fork_command(line)
    except ValueError as exc:
        return FailedEvent(reason=f"unreadable fork command: {exc}")
    if not received_fds:
        return FailedEvent(reason="a fork command came without a control socket")
    spare_control = received_fds.pop(0)
    try:
        others = [control.fileno(), *received_fds]
        return ForkedEvent(pid=fork_spare(command, spare_control, others, worker_main))
    except ForkError as exc:
        return FailedEvent(reason=str(exc))
    finally:
        os.close(spare_control)  # the spare has its copy


def thread_count() -> int:
    """This process's threads, native ones included (a library's pool would count)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 1


def _one_thread(within: float = SINGLE_THREAD_WAIT_SECONDS) -> int:
    """This process's thread count, once it is 1 or after `within` seconds: a joined
    thread is still listed for a moment after `join` returns."""
    deadline = time.monotonic() + within
    while (threads := thread_count()) != 1 and time.monotonic() < deadline:
        time.sleep(0.005)
    return threads


def fork_spare(
    command: ForkCommand, spare_control: int, close_in_spare: list[int], worker_main: WorkerMain
) -> int:
    """Fork a spare running `worker_main` on `spare_control`; its pid, once it is the
    manager's child. Raises ForkError."""
    threads = _one_thread()
    if threads != 1:
        raise ForkError(f"the fork server has {threads} threads; it forks only with one")
    read_end, write_end = os.pipe()
    try:
        middle = os.fork()
    except OSError as exc:
        os.close(read_end)
        os.close(write_end)
        raise ForkError(f"fork failed: {exc}") from exc
    if middle == 0:
        os.close(read_end)
        _fork_and_exit(command, spare_control, [*close_in_spare, write_end], write_end, worker_main)
    os.close(write_end)
    try:
        with os.fdopen(read_end, "rb") as said:
            answer = said.read()
    finally:
        os.waitpid(middle, 0)  # once it is gone, the spare is the manager's child
    if not answer.isdigit():
        raise ForkError(f"the spare could not be forked: {answer.decode(errors='replace')}")
    return int(answer)


def _fork_and_exit(
    command: ForkCommand,
    spare_control: int,
    close_in_spare: list[int],
    write_end: int,
    worker_main: WorkerMain,
) -> NoReturn:
    """The process in between: fork the spare, write its pid (or why not), exit."""
    code = 1
    try:
        try:
            spare = os.fork()
        except OSError as exc:
            os.write(write_end, f"fork failed: {exc}".encode())
        else:
            if spare == 0:
                _run_spare(command, spare_control, close_in_spare, worker_main)
            os.write(write_end, str(spare).encode())
            code = 0
    finally:
        os._exit(code)


def _run_spare(
    command: ForkCommand, spare_control: int, close_in_spare: list[int], worker_main: WorkerMain
) -> NoReturn:
    """The spare: the worker's `main` on its control socket, then exit; never returns into
    the fork server's loop, whatever happens."""
    code = 1
    try:
        for fd in close_in_spare:
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(OSError):  # a process group of its own, as a spare's
            os.setpgid(0, 0)
        os.environ.clear()
        os.environ.update(command.env)
        if command.urgent:
            cpus.run_everything_now()
        code = worker_main([*command.args, "--control-fd", str(spare_control)])
    except MemoryError:
        code = sandbox.EXIT_OUT_OF_MEMORY
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # said on stderr; the exit code tells the manager
        traceback.print_exc()
    finally:
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)
