"""One worker OS process, seen from the manager.

The manager and a worker share three channels, none of them polled:
- the listening socket, bound by the manager and inherited by the worker;
- a status pipe on which the worker writes JSON lines (`ready`, `failed`, `start`, `end`);
- the worker's stdin, a lifeline and a command line: the manager writes `drain` when it
  starts unloading the worker and `abort` for a forced unload; when the manager dies,
  stdin closes and the worker shuts itself down (no orphans).
Process exit is noticed by waiting on the process, not by polling it.
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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

# Called with the worker and "start" or "end" for every inference request it serves.
ActivityCallback = Callable[["WorkerProcess", str], None]


@dataclass(frozen=True)
class WorkerReady:
    pid: int
    port: int
    load_seconds: float


class WorkerStartError(Exception):
    """The worker did not become ready; the message says why.

    `permanent`: the worker said the model cannot load (a bad file, say), so trying
    again at once would fail the same way.
    """

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class WorkerProcess:
    """Spawned by `spawn`; every method runs on the manager's event loop."""

    def __init__(
        self,
        model_id: str,
        port: int,
        process: asyncio.subprocess.Process,
        on_activity: ActivityCallback,
    ) -> None:
        self.model_id = model_id
        self.port = port
        self._process = process
        self._on_activity = on_activity
        loop = asyncio.get_running_loop()
        self._ready: asyncio.Future[WorkerReady] = loop.create_future()
        self._failure_reason: str | None = None
        self._exit_task = asyncio.create_task(process.wait(), name=f"wait:{model_id}")
        self._status_task: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def returncode(self) -> int | None:
        return self._process.returncode

    @classmethod
    async def spawn(
        cls,
        model_id: str,
        settings: dict[str, Any],
        sock: socket.socket,
        *,
        graceful_seconds: float,
        log_level: str,
        on_activity: ActivityCallback,
    ) -> WorkerProcess:
        """Start the worker process serving on `sock` (which this call closes here)."""
        status_read, status_write = os.pipe()
        port = sock.getsockname()[1]
        command = [
            sys.executable,
            "-m",
            "model_service",
            "--spec-json",
            json.dumps(settings),
            "--listen-fd",
            str(sock.fileno()),
            "--status-fd",
            str(status_write),
            "--lifeline-stdin",
            "--graceful-seconds",
            str(graceful_seconds),
            "--log-level",
            log_level,
        ]
        try:
            process = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.PIPE,
                pass_fds=(sock.fileno(), status_write),
                # Own session: a Ctrl-C in the manager's terminal reaches the manager only,
                # which then drains and stops its workers in order.
                start_new_session=True,
            )
        except BaseException:
            os.close(status_read)
            raise
        finally:
            os.close(status_write)
            sock.close()
        worker = cls(model_id, port, process, on_activity)
        await worker._watch_status(status_read)
        return worker

    async def _watch_status(self, fd: int) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        pipe = os.fdopen(fd, "rb", buffering=0)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
        self._status_task = asyncio.create_task(
            self._read_status(reader), name=f"status:{self.model_id}"
        )

    async def _read_status(self, reader: asyncio.StreamReader) -> None:
        while line := await reader.readline():
            try:
                message = json.loads(line)
            except ValueError:
                log.warning("unreadable status line", extra={"model": self.model_id})
                continue
            event = message.get("event")
            if event in ("start", "end"):
                self._on_activity(self, event)
            elif event == "ready" and not self._ready.done():
                self._ready.set_result(
                    WorkerReady(self.pid, self.port, float(message.get("load_seconds", 0.0)))
                )
            elif event == "failed":
                self._failure_reason = str(message.get("reason", "unknown reason"))

    async def wait_ready(self, timeout: float) -> WorkerReady:
        """Block until the worker serves. Raises WorkerStartError (and kills it) otherwise."""
        waits: set[asyncio.Future[Any]] = {self._ready, self._exit_task}
        done, _ = await asyncio.wait(
            waits,
            timeout=timeout,
            return_when=asyncio.FIRST_COMPLETED,
        )
        if self._ready in done:
            return self._ready.result()
        if self._exit_task in done:
            # Let the status reader drain the pipe so a "failed" reason is not missed.
            if self._status_task is not None:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self._status_task), 1.0)
            if self._failure_reason:
                raise WorkerStartError(self._failure_reason, permanent=True)
            raise WorkerStartError(f"worker exited with code {self.returncode} while loading")
        self.kill()
        raise WorkerStartError(f"worker not ready after {timeout:g} s")

    async def wait_exit(self) -> int:
        """Block until the process has exited; returns its exit code."""
        return await asyncio.shield(self._exit_task)

    def begin_drain(self) -> None:
        """Tell the worker to refuse new requests (503) while it finishes the others."""
        self._command(b"drain")

    async def abort(self, timeout: float) -> int:
        """Fail the worker's requests with a clear error and stop it; SIGKILL after `timeout`."""
        self._command(b"abort")
        try:
            return await asyncio.wait_for(self.wait_exit(), timeout)
        except TimeoutError:
            self.kill()
            return await self.wait_exit()

    def _command(self, word: bytes) -> None:
        stdin = self._process.stdin
        if stdin is not None and not stdin.is_closing():
            stdin.write(word + b"\n")

    async def stop(self, timeout: float) -> int:
        """SIGTERM (the worker drains), then SIGKILL after `timeout` seconds."""
        self._signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.wait_exit(), timeout)
        except TimeoutError:
            log.warning("worker ignored SIGTERM; killing it", extra={"model": self.model_id})
            self.kill()
            return await self.wait_exit()

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def _signal(self, signum: int) -> None:
        if self._process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._process.send_signal(signum)
