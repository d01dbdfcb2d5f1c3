"""The manager's side of the fork server (model_service/fork_server.py): a process that
has imported the worker and forks spares from itself in milliseconds, where a new
process takes seconds of imports.

The manager makes itself a child subreaper, so each forked spare becomes its child:
`ForkedProcess` waits for it through a pidfd and signals it through that pidfd (no pid
reuse can redirect a signal). Without pidfds or the subreaper (not Linux, an old
kernel), there is no fork server and spares start as processes of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import os
import select
import signal
import socket
import sys
from collections import deque
from collections.abc import Callable

import psutil

from model_service.contract import (
    FailedEvent,
    ForkCommand,
    ForkedEvent,
    ForkServerReadyEvent,
    parse_fork_server_event,
)
from pool_manager.memory import SpareMemory

log = logging.getLogger(__name__)

_PR_SET_CHILD_SUBREAPER = 36
# How long a fork may take to be answered: milliseconds when the server is ready; it
# waits for its import first, which on a busy machine takes seconds at low priority.
FORK_TIMEOUT_SECONDS = 10.0
READY_TIMEOUT_SECONDS = 120.0


async def start_spare_module(
    args: list[str], env: dict[str, str]
) -> tuple[asyncio.subprocess.Process, socket.socket]:
    """Start `python -m model_service.spare ARGS --control-fd N` on this machine, N its end
    of a new socket pair; the process and our end. It starts in the manager's session and
    process group; a spare leaves the group itself (model_service/spare.py says why)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        process = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "model_service.spare", *args),
            *("--control-fd", str(theirs.fileno())),
            stdin=asyncio.subprocess.DEVNULL,
            env=env,
            pass_fds=(theirs.fileno(),),
        )
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    return process, ours


def become_subreaper() -> str | None:
    """Make this process the parent of its descendants' orphans (the spares the fork
    server forks); None once it is, else why not."""
    if not (hasattr(os, "pidfd_open") and hasattr(os, "P_PIDFD")):
        return "no pidfd support here"
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError as exc:
        return f"pidfd_open: {exc}"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError as exc:
        return f"no libc: {exc}"
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        return f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(ctypes.get_errno())}"
    return None


class ForkedProcess:
    """A spare the fork server forked, re-parented to this process (a ProcessHandle, as
    pool_manager/worker_process.py needs): waited for and signalled through a pidfd."""

    def __init__(self, pid: int) -> None:
        self._pid = pid
        self._returncode: int | None = None
        loop = asyncio.get_running_loop()
        self._exited: asyncio.Future[int] = loop.create_future()
        self._pidfd: int | None = os.pidfd_open(pid)
        loop.add_reader(self._pidfd, self._reap)
        self._reap()  # it may have exited already: a zombie's pidfd reads as ready too

    @property
    def pid(self) -> int:
        return self._pid

    @property
    def returncode(self) -> int | None:
        return self._returncode

    def _reap(self) -> None:
        if self._pidfd is None:
            return
        try:
            status = os.waitid(os.P_PIDFD, self._pidfd, os.WEXITED | os.WNOHANG)
        except ChildProcessError:
            # Not our child after all (it cannot happen once the fork server answered:
            # it waits for the process in between first): that it exited is all we learn.
            if not _pidfd_exited(self._pidfd):
                return
            code = -signal.SIGKILL
        else:
            if status is None:
                return  # not exited yet
            code = status.si_status if status.si_code == os.CLD_EXITED else -status.si_status
        loop = asyncio.get_running_loop()
        loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        self._pidfd = None
        self._returncode = code
        self._exited.set_result(code)

    async def wait(self) -> int:
        return await asyncio.shield(self._exited)

    def send_signal(self, signum: int) -> None:
        if self._pidfd is not None:
            signal.pidfd_send_signal(self._pidfd, signum)


def _pidfd_exited(pidfd: int) -> bool:
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


class ForkServer:
    """The fork server process and our end of its control socket. Methods run on the
    event loop; forks are asked for one at a time."""

    def __init__(
        self,
        process: asyncio.subprocess.Process,
        control: socket.socket,
        on_exit: Callable[[ForkServer], None],
    ) -> None:
        self._process = process
        self._on_exit = on_exit
        self._control = control
        self._lock = asyncio.Lock()
        loop = asyncio.get_running_loop()
        self._ready: asyncio.Future[None] = loop.create_future()
        # The forks asked for and not answered yet, oldest first.
        self._replies: deque[asyncio.Future[ForkedEvent | FailedEvent | None]] = deque()
        self._unwanted: set[ForkedProcess] = set()  # forked for a caller that left
        self._reader_task: asyncio.Task[None] | None = None

    @classmethod
    async def start(
        cls,
        *,
        sandbox: bool,
        env: dict[str, str],
        on_exit: Callable[[ForkServer], None] = lambda _: None,
    ) -> ForkServer:
        """Start the fork server (it imports the worker meanwhile; `fork` waits for it).
        `on_exit` is called once it has closed its control socket (it exited)."""
        args = [*(["--sandbox"] if sandbox else []), "--fork-server"]
        process, ours = await start_spare_module(args, env)
        server = cls(process, ours, on_exit)
        reader, writer = await asyncio.open_unix_connection(sock=ours.dup())
        server._reader_task = asyncio.create_task(
            server._read(reader, writer), name=f"fork-server:{process.pid}"
        )
        return server

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def alive(self) -> bool:
        return self._process.returncode is None and not self._control_closed

    @property
    def ready_once(self) -> bool:
        """It finished its imports (it may have exited since)."""
        return self._ready.done() and not self._ready.cancelled()

    @property
    def ready(self) -> bool:
        """Imports done and alive: a fork is answered within milliseconds."""
        return self.ready_once and self.alive

    @property
    def _control_closed(self) -> bool:
        return self._control.fileno() < 0

    async def _read(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            with contextlib.suppress(OSError):
                while line := await reader.readline():
                    try:
                        event = parse_fork_server_event(line)
                    except ValueError as exc:
                        log.error("unreadable fork server event", extra={"reason": str(exc)})
                        continue
                    if isinstance(event, ForkServerReadyEvent):
                        if not self._ready.done():
                            self._ready.set_result(None)
                    else:
                        self._answered(event)
        finally:
            writer.close()
            self._control.close()
            if not self._ready.done():
                self._ready.cancel()
            self._answered(None)  # a fork waiting for an answer gets none
            self._on_exit(self)

    async def fork(
        self, args: list[str], env: dict[str, str], urgent: bool
    ) -> tuple[ForkedProcess, socket.socket]:
        """A spare forked with the worker's `args` and `env`, and our end of its control
        socket. Raises OSError when the fork server cannot (it is gone, it failed)."""
        async with self._lock:
            try:
                await asyncio.wait_for(asyncio.shield(self._ready), READY_TIMEOUT_SECONDS)
            except TimeoutError:
                raise OSError("the fork server is not ready") from None
            except asyncio.CancelledError:
                if not self._ready.cancelled():
                    raise  # our caller was cancelled
                raise OSError("the fork server exited") from None
            reply: asyncio.Future[ForkedEvent | FailedEvent | None]
            reply = asyncio.get_running_loop().create_future()
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                line = ForkCommand(args=args, env=env, urgent=urgent).encode()
                try:
                    socket.send_fds(self._control, [line], [theirs.fileno()])
                finally:
                    theirs.close()
                self._replies.append(reply)  # it answers in the order asked
                try:
                    event = await asyncio.wait_for(asyncio.shield(reply), FORK_TIMEOUT_SECONDS)
                except TimeoutError:
                    raise OSError("the fork server did not answer") from None
                if not isinstance(event, ForkedEvent):
                    raise OSError(event.reason if event else "the fork server exited")
                return ForkedProcess(event.pid), ours
            except BaseException:
                ours.close()  # a spare forked all the same reads EOF and exits...
                reply.cancel()  # ...and `_answered` reaps it
                raise

    def _answered(self, event: ForkedEvent | FailedEvent | None) -> None:
        """The oldest fork's answer (None: the fork server exited, for every fork still
        waiting). One whose caller left (cancelled, or timed out) is a spare whose
        control socket is closed: it exits, and is reaped."""
        waiting = [self._replies.popleft()] if event is not None and self._replies else []
        if event is None:
            waiting, self._replies = list(self._replies), deque()
        for reply in waiting:
            if not reply.cancelled():
                reply.set_result(event)
            elif isinstance(event, ForkedEvent):
                with contextlib.suppress(OSError):
                    self._unwanted.add(ForkedProcess(event.pid))
        self._unwanted = {p for p in self._unwanted if p.returncode is None}

    async def close(self) -> None:
        """Stop the fork server; the spares it forked are not its children and stay."""
        if self._process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._process.kill()
        await self._process.wait()
        if self._reader_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task


class ForkServerKeeper:
    """Keeps one fork server running while spares are wanted: starts it, replaces one
    that died after it had worked (one that never got ready is not tried again: the
    spares then start as processes of their own), stops it. Runs on the event loop."""

    def __init__(self, sandbox: bool) -> None:
        self._sandbox = sandbox
        self._server: ForkServer | None = None
        self._starting: asyncio.Task[None] | None = None
        self._wanted = False
        self._started = False  # by the pool's start: a pool never started forks nothing
        self._unavailable: str | None = None  # why there is none, for good
        self._stopping: set[asyncio.Task[None]] = set()

    @property
    def pid(self) -> int | None:
        server = self._server
        return server.pid if server is not None and server.alive else None

    def memory(self) -> list[SpareMemory]:
        """What the fork server holds (measured), counted with the spares': much of it is
        shared with them and the workers it forked, which their RSS counts again."""
        pid = self.pid
        if pid is None:
            return []
        try:
            info = psutil.Process(pid).memory_info()
        except psutil.Error:
            return []
        return [SpareMemory(rss=int(info.rss), file_backed=int(info.shared), reserve=0)]

    def start(self, wanted: bool, env: dict[str, str]) -> None:
        """Start keeping one (with the pool): `want` acts only from here on."""
        self._started = True
        self.want(wanted, env)

    def want(self, wanted: bool, env: dict[str, str]) -> None:
        """Have a fork server (started in the background) or none."""
        self._wanted = wanted
        if not self._started:
            return
        if wanted and self._server is None and self._starting is None:
            if self._unavailable is None and (why := become_subreaper()) is not None:
                self._unavailable = why
                log.warning("no fork server; spares start as processes", extra={"reason": why})
            if self._unavailable is None:
                self._starting = asyncio.create_task(self._start(env), name="fork-server")
        elif not wanted and self._server is not None:
            server, self._server = self._server, None
            stopping = asyncio.create_task(server.close(), name="fork-server-stop")
            self._stopping.add(stopping)
            stopping.add_done_callback(self._stopping.discard)

    async def _start(self, env: dict[str, str]) -> None:
        def on_exit(server: ForkServer) -> None:
            self._exited(server, env)

        try:
            server = await ForkServer.start(sandbox=self._sandbox, env=env, on_exit=on_exit)
        except OSError as exc:
            self._unavailable = f"the fork server did not start: {exc}"
            log.error("no fork server", extra={"reason": self._unavailable})
            return
        finally:
            self._starting = None
        if not self._wanted:
            await server.close()
            return
        self._server = server
        if not server.alive:  # it exited before it was ours: `on_exit` found it not ours
            self._exited(server, env)

    async def usable(self, *, urgent: bool) -> ForkServer | None:
        """The fork server to fork a spare from now; none when a load waits (`urgent`) and
        it is still importing: a process of its own then starts at normal priority."""
        if self._starting is not None:
            await asyncio.shield(self._starting)  # its process is started in milliseconds
        server = self._server
        if server is None or not server.alive or (urgent and not server.ready):
            return None
        return server

    def _exited(self, server: ForkServer, env: dict[str, str]) -> None:
        """The fork server exited: replace it if it had worked and is still wanted."""
        if server is not self._server:
            return  # stopped on purpose
        self._server = None
        if not server.ready_once:
            self._unavailable = "the fork server exited before it was ready"
            log.error("no fork server", extra={"reason": self._unavailable})
            return
        log.warning("the fork server exited; starting another", extra={"pid": server.pid})
        self.want(self._wanted, env)

    async def close(self) -> None:
        self._wanted = self._started = False
        if self._starting is not None:
            await self._starting  # a start is quick (the imports come after); it sees
            # `_wanted` False and stops what it started
        if self._server is not None:
            server, self._server = self._server, None
            await server.close()
        await asyncio.gather(*self._stopping)
