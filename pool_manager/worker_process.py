"""One worker OS process, seen from the manager.

A worker starts as a spare: Python, FastAPI and llama.cpp imported, no model. Assigning
it a model sends the model's settings and a listening socket the manager already bound
(so nothing can take the port in between) over the control socket; the worker loads the
weights and reports `ready` the moment it serves. Manager and worker share:
- the control socket (a Unix socketpair): commands to the worker (`preload`, `load`
  with the listening socket attached, `threads`, `drain`, `abort`) and events from it
  (`spare`, `preloaded`, `ready`, `failed`, `start`, `end`, `beat`), JSON lines both
  ways, as model_service/contract.py defines them. When the manager dies, the worker
  reads EOF and shuts itself down (no orphans);
- the listening socket, once assigned.
Nothing is polled: process exit is noticed by waiting on the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from model_service.auth import ADMIN_KEY_ENV
from model_service.contract import (
    AbortCommand,
    BeatEvent,
    Command,
    DrainCommand,
    EndEvent,
    FailedEvent,
    LoadCommand,
    ModelSettings,
    PreloadCommand,
    PreloadedEvent,
    ReadyEvent,
    RecycleCommand,
    SpareEvent,
    StartEvent,
    ThreadsCommand,
    parse_event,
)
from model_service.sandbox import (
    EXIT_OUT_OF_MEMORY,
    OUT_OF_MEMORY,
    PROCESS_MECHANISMS,
    MemoryCgroups,
    Report,
)
from model_service.secrets import SECRET_ENV_PREFIX
from pool_manager.fork_server import ForkServer, start_spare_module

log = logging.getLogger(__name__)

# Called with the worker and "start" or "end" for every inference request it serves.
ActivityCallback = Callable[["WorkerProcess", StartEvent | EndEvent], None]


class WorkerStartError(Exception):
    """The worker did not become ready; the message says why.

    `permanent`: the worker said the model cannot load (a bad file, say), so trying
    again at once would fail the same way.
    """

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


def hang_reason(
    silent: float, step_seconds: float, silence_limit: float, step_limit: float
) -> str | None:
    """Why a serving worker looks hung, or None: no heartbeat for more than
    `silence_limit` seconds (stopped, or its event loop blocked), or one engine step
    running for more than `step_limit` (a decode that does not return)."""
    if silent > silence_limit:
        return f"worker hung: no heartbeat for {silent:.0f} s"
    if step_seconds > step_limit:
        return f"worker hung: one decode step has run for {step_seconds:.0f} s"
    return None


# What only the manager uses: the JWT secret (it checks tokens) and the URLs of its
# stores, whose passwords a worker (running a model file from anywhere) must not hold.
MANAGER_ONLY_ENV = frozenset({ADMIN_KEY_ENV, "POOL_JWT_SECRET", "DATABASE_URL", "REDIS_URL"})


def worker_environment() -> dict[str, str]:
    """The manager's environment less what no worker needs: the admin key (workers check
    the client key only), the JWT secret and the stores' URLs, and the remote backends'
    secrets (the manager resolves a model's own key and sends it with its settings)."""
    return {
        name: value
        for name, value in os.environ.items()
        if name not in MANAGER_ONLY_ENV and not name.startswith(SECRET_ENV_PREFIX)
    }


class ProcessHandle(Protocol):
    """What WorkerProcess needs of its process: an asyncio subprocess here, a process on
    a cluster node through its WorkerHost actor there (pool_manager/cluster.py)."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    async def wait(self) -> int: ...

    def send_signal(self, signal: int) -> None: ...


class ControlChannel(Protocol):
    """Where WorkerProcess sends commands: the control socket, or a WorkerHost actor."""

    def send(self, data: bytes, /) -> int: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class SpareOptions:
    """How a spare process is started (`python -m model_service.spare`'s arguments)."""

    graceful_seconds: float
    log_level: str
    reserve_mb: int = 0
    sandbox: bool = False  # model_service/sandbox.py's, without network unless `network`
    network: bool = False
    urgent: bool = False  # a load waits for it: no low-priority start

    def worker_args(self) -> list[str]:
        """The worker's own arguments (model_service/__main__.py), less `--control-fd`."""
        return [
            *("--graceful-seconds", str(self.graceful_seconds)),
            *("--log-level", self.log_level),
            *("--reserve-mb", str(self.reserve_mb)),
        ]


async def spawn_spare(
    options: SpareOptions, env: dict[str, str]
) -> tuple[asyncio.subprocess.Process, socket.socket]:
    """Start `python -m model_service.spare` on this machine; the process and our end of
    its control socket. Also what a cluster node's WorkerHost does (pool_manager/cluster.py)."""
    network = ["--network"] if options.network else []
    args = [
        *(["--sandbox", *network] if options.sandbox else []),
        *(["--urgent"] if options.urgent else []),
        *options.worker_args(),
    ]
    return await start_spare_module(args, env)


class WorkerProcess:
    """Started by `start_spare`, given a model by `assign`; methods run on the event loop."""

    def __init__(self, process: ProcessHandle, control: ControlChannel) -> None:
        self.model_id: str | None = None
        self.host = "127.0.0.1"  # where it listens, once assigned: a cluster node's address
        self.node: dict[str, str] | None = None  # the cluster node it runs on, if any
        self.port: int = 0
        self.reserved_bytes = 0  # heap mapped ahead while a spare (see model_service.heap)
        self.threads: int | None = None  # the share of the cores last sent
        self.preload_sent: PreloadCommand | None = None  # the last one sent
        self.preloaded: list[str] = []  # files a spare reports loaded ahead
        self._process = process
        self._control = control  # we send on it; a duplicate feeds the event reader
        self._on_activity: ActivityCallback | None = None
        loop = asyncio.get_running_loop()
        self._spare_ready: asyncio.Future[None] = loop.create_future()
        self._ready: asyncio.Future[ReadyEvent] = loop.create_future()
        self._first_request_ended: asyncio.Future[None] = loop.create_future()
        self._failure_reason: str | None = None
        self._exit_task = asyncio.create_task(process.wait(), name=f"wait:{process.pid}")
        self._exit_task.add_done_callback(lambda _: self._close_control())
        self._events_task: asyncio.Task[None] | None = None
        self._events_writer: asyncio.StreamWriter | None = None
        # Heartbeats (`beat` events, each second from a serving worker's event loop): when
        # the last came, and how long the engine's step then running had taken.
        self.last_beat: float | None = None  # monotonic; set once it serves
        self.step_seconds = 0.0
        self.hung: str | None = None  # why the pool killed it as hung, if it did
        # The pool has stopped serving a model with it (unload, eviction, drain; kept once
        # it serves another): a request that found its port closed met an unload, not a
        # crash.
        self.left_on_request = False
        self._cgroup: Path | None = None  # its memory ceiling's cgroup, if it has one
        self._oom_killed = False  # the kernel killed it for passing that ceiling

    def _close_control(self) -> None:
        self._control.close()
        if self._events_writer is not None:
            self._events_writer.close()
        if self._cgroup is not None:
            self._oom_killed = MemoryCgroups.oom_killed(self._cgroup)
            MemoryCgroups.remove(self._cgroup)
            self._cgroup = None

    @property
    def out_of_memory(self) -> bool:
        """It exited for passing its memory ceiling (see model_service/sandbox.py)."""
        return self._oom_killed or self.returncode == EXIT_OUT_OF_MEMORY

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def returncode(self) -> int | None:
        return self._process.returncode

    @property
    def is_warm_spare(self) -> bool:
        """Imports done, no model yet."""
        return self._spare_ready.done() and self.model_id is None and self.returncode is None

    @classmethod
    async def start_spare(
        cls, options: SpareOptions, fork_server: ForkServer | None = None
    ) -> WorkerProcess:
        """Start a worker process with no model. Returns at once; it warms up meanwhile.

        Options' `sandbox`: in the sandbox of model_service/sandbox.py, without network
        access unless `network` (for a remote backend). `urgent`: a load waits for it, so
        it prepares at normal priority, not on CPU time others leave
        (model_service/spare.py). With `fork_server` (whose sandbox must be the one asked
        for), the spare is forked from it, its imports done; OSError if it cannot be.
        """
        env = worker_environment()
        process: ProcessHandle
        if fork_server is not None:
            process, ours = await fork_server.fork(options.worker_args(), env, options.urgent)
        else:
            process, ours = await spawn_spare(options, env)
        worker = cls(process, ours)
        worker.reserved_bytes = options.reserve_mb * 2**20
        reader, writer = await asyncio.open_unix_connection(sock=ours.dup())
        worker._events_writer = writer  # dropping the writer would close the transport
        worker._events_task = asyncio.create_task(
            worker._read_events(reader), name=f"events:{process.pid}"
        )
        return worker

    def assign(
        self,
        settings: ModelSettings,
        sock: socket.socket,
        on_activity: ActivityCallback,
        cgroups: MemoryCgroups | None = None,
    ) -> None:
        """Hand the worker a model and its listening socket (closed here afterwards).

        The `memory_ceiling` in `settings`, if any, is put in force in a cgroup of its own
        when `cgroups` allows, else the worker sets it as RLIMIT_AS; its `by` tells the
        worker which.
        """
        self.model_id = settings.model_id
        self.port = sock.getsockname()[1]
        self._on_activity = on_activity
        ceiling = settings.memory_ceiling
        if ceiling is not None and cgroups is not None:
            try:
                self._cgroup = cgroups.attach(self.pid, ceiling.bytes)
                ceiling = ceiling.model_copy(update={"by": "cgroup"})
                settings = settings.model_copy(update={"memory_ceiling": ceiling})
            except OSError as exc:
                log.warning(
                    "no memory cgroup for the worker; RLIMIT_AS instead",
                    extra={"pid": self.pid, "reason": str(exc)},
                )
        line = LoadCommand(settings=settings).encode()
        try:
            assert isinstance(self._control, socket.socket)  # a local worker's
            socket.send_fds(self._control, [line], [sock.fileno()])
        finally:
            sock.close()

    async def _read_events(self, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(OSError):  # a killed worker's socket can read as a reset
            await self._handle_events(reader)

    async def _handle_events(self, reader: asyncio.StreamReader) -> None:
        while line := await reader.readline():
            try:
                event = parse_event(line)
            except ValueError as exc:
                log.warning("unreadable worker event", extra={"pid": self.pid, "reason": str(exc)})
                continue
            if isinstance(event, StartEvent | EndEvent):
                if isinstance(event, EndEvent) and not self._first_request_ended.done():
                    self._first_request_ended.set_result(None)
                if self._on_activity is not None:
                    self._on_activity(self, event)
            elif isinstance(event, BeatEvent):
                self.last_beat = time.monotonic()
                self.step_seconds = event.step_seconds
            elif isinstance(event, ReadyEvent) and not self._ready.done():
                self.last_beat = time.monotonic()
                self._ready.set_result(event)
            elif isinstance(event, PreloadedEvent):
                self.preloaded = event.paths
            elif isinstance(event, SpareEvent) and not self._spare_ready.done():
                self._spare_ready.set_result(None)
            elif isinstance(event, FailedEvent):
                self._failure_reason = event.reason

    async def wait_first_request(self, timeout: float) -> None:
        """Block until the worker's first request ends (or it exits), `timeout` at most."""
        waits: set[asyncio.Future[Any]] = {
            asyncio.shield(self._first_request_ended),
            asyncio.shield(self._exit_task),
        }
        _, pending = await asyncio.wait(waits, timeout=timeout, return_when="FIRST_COMPLETED")
        for waiting in pending:
            waiting.cancel()

    async def wait_ready(self, timeout: float) -> ReadyEvent:
        """Block until the worker serves. Raises WorkerStartError (and kills it) otherwise."""
        waits: set[asyncio.Future[Any]] = {self._ready, self._exit_task}
        done, _ = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if self._ready in done:
            return self._ready.result()
        if self._exit_task in done:
            # Let the event reader drain the socket so a "failed" reason is not missed.
            if self._events_task is not None:
                # OSError: a SIGKILLed worker's socket may read as a reset, not EOF.
                with contextlib.suppress(TimeoutError, OSError):
                    await asyncio.wait_for(asyncio.shield(self._events_task), 1.0)
            if self._failure_reason:
                raise WorkerStartError(self._failure_reason, permanent=True)
            if self.out_of_memory:  # the same ceiling would stop it again
                raise WorkerStartError(
                    f"{OUT_OF_MEMORY}: the worker passed its memory ceiling while loading",
                    permanent=True,
                )
            raise WorkerStartError(f"worker exited with code {self.returncode} while loading")
        self.kill()
        raise WorkerStartError(f"worker not ready after {timeout:g} s")

    async def wait_exit(self) -> int:
        """Block until the process has exited; returns its exit code."""
        return await asyncio.shield(self._exit_task)

    def on_exit(self, callback: Callable[[], None]) -> None:
        """Call `callback` (on the event loop) once the process has exited."""
        self._exit_task.add_done_callback(lambda _: callback())

    def share_cores(self, threads: int) -> None:
        """Tell the worker how many threads it may compute with now (sent on change)."""
        if threads != self.threads:
            self.threads = threads
            self._command(ThreadsCommand(n=threads))

    def preload(self, paths: list[str], first_settings: ModelSettings | None = None) -> None:
        """Tell a spare which models' files to load ahead, likeliest first, and the first
        one's settings (its context is made ahead too). Sent on change."""
        plan = PreloadCommand(paths=paths, first_settings=first_settings)
        if plan != self.preload_sent:
            self.preload_sent = plan
            self._command(plan)

    def begin_drain(self) -> None:
        """Tell the worker to refuse new requests (503) while it finishes the others."""
        self._command(DrainCommand())

    @property
    def recyclable(self) -> bool:
        """Whether it may go back to the spares: not in a memory cgroup of its model's (a
        spare's process has none; RLIMIT_AS the worker lifts itself)."""
        return self._cgroup is None and self.returncode is None

    async def recycle(self, timeout: float) -> bool:
        """Hand a drained worker back to the spares: it stops serving, frees its model's
        context and keeps its weights loaded ahead (model_service/__main__.py). True once
        it says `spare` again, within `timeout`; False if it exited instead (a worker that
        cannot be recycled does) or did not answer in time (it is then killed)."""
        self.left_on_request = True
        loop = asyncio.get_running_loop()
        self._spare_ready = loop.create_future()
        self._ready = loop.create_future()
        self._on_activity = None  # a late `end` belongs to no model any more
        self._command(RecycleCommand())
        waits: set[asyncio.Future[Any]] = {self._spare_ready, self._exit_task}
        done, _ = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if self._spare_ready not in done or self.returncode is not None:
            self.kill()
            await self.wait_exit()
            return False
        self.model_id = None  # (`port` stays: the pool releases it after this returns)
        self.threads = None
        self.last_beat = None
        self.step_seconds = 0.0
        self.preload_sent = None  # it has its own list now: the next plan is sent
        return True

    async def abort(self, timeout: float) -> int:
        """Fail the worker's requests with a clear error and stop it; SIGKILL after `timeout`."""
        self.left_on_request = True
        self._command(AbortCommand())
        try:
            return await asyncio.wait_for(self.wait_exit(), timeout)
        except TimeoutError:
            self.kill()
            return await self.wait_exit()

    def _command(self, command: Command) -> None:
        with contextlib.suppress(OSError):  # a worker that is gone needs no command
            self._control.send(command.encode())

    async def stop(self, timeout: float) -> int:
        """SIGTERM (the worker drains), then SIGKILL after `timeout` seconds."""
        self.left_on_request = True
        self._signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.wait_exit(), timeout)
        except TimeoutError:
            log.warning("worker ignored SIGTERM; killing it", extra={"model": self.model_id})
            self.kill()
            return await self.wait_exit()

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def hang(self, silence_limit: float, step_limit: float) -> str | None:
        """Why this serving worker looks hung (see `hang_reason`), or None."""
        if self.last_beat is None or self.returncode is not None:
            return None
        silent = time.monotonic() - self.last_beat
        return hang_reason(silent, self.step_seconds, silence_limit, step_limit)

    def kill_as_hung(self, reason: str) -> None:
        """SIGKILL (a hung process may not act on SIGTERM); `reason` becomes its error."""
        self.hung = reason
        self.kill()

    def _signal(self, signum: int) -> None:
        if self._process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._process.send_signal(signum)


async def probe_sandbox() -> tuple[Report, MemoryCgroups | None]:
    """What a worker's sandbox gets on this machine: a throwaway process enters it and
    says what worked (model_service/sandbox.py); and the cgroups for memory ceilings, if
    the machine delegates the memory controller to the manager."""
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "model_service.sandbox",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            env=worker_environment(),
        )
        output, _ = await process.communicate()
        report: Report = json.loads(output)
    except (OSError, ValueError) as exc:
        why = f"the sandbox probe failed: {exc}"
        report = {name: {"available": False, "detail": why} for name in PROCESS_MECHANISMS}
    cgroups, detail = await asyncio.to_thread(MemoryCgroups.find)
    report["memory_cgroup"] = {"available": cgroups is not None, "detail": detail}
    report["memory_address_space"] = {
        "available": True,
        "detail": "RLIMIT_AS, set by each worker when it is handed a model"
        if cgroups is None
        else "RLIMIT_AS, only for a worker whose cgroup cannot be made",
    }
    return report, cgroups
