"""The uvicorn server both the manager and the workers run."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Generator
from typing import Any, NoReturn

import uvicorn

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def exit_now(code: int) -> NoReturn:
    """End the process at once, its logs flushed: no interpreter teardown, which frees,
    one object at a time, what the kernel frees anyway (0.3-0.6 s for a worker: time a
    swap waits on before the next model's load). Only where no connection has a reply
    in flight: one the client has not read yet may be lost with the process."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class GracefulServer(uvicorn.Server):
    """A uvicorn server that exits with status 0 after a signalled graceful shutdown.

    Stock uvicorn re-raises SIGTERM/SIGINT once it has shut down, so a clean stop would
    look like a crash (exit -15) to supervisors. `on_started` runs once the server accepts
    connections.
    """

    def __init__(
        self,
        config: uvicorn.Config,
        on_started: Callable[[], None] | None = None,
        on_exit_requested: Callable[[], None] | None = None,
        on_idle_exit: Callable[[], None] | None = None,
    ):
        """`on_idle_exit`: when set, a signal that finds no request being served runs it
        and ends the process at once (`exit_now`)."""
        super().__init__(config)
        self._on_started = on_started
        self._on_exit_requested = on_exit_requested
        self._on_idle_exit = on_idle_exit
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = asyncio.Event()
        self._stopping_soon = False

    def stop_soon(self) -> None:
        """Stop serving within milliseconds, the process going on; from any thread. For a
        drained worker handed back to the spares: with no request being served, none of
        uvicorn's graceful shutdown (its next tick, 0.1 s of sleep) is waited for."""
        self._stopping_soon = self.should_exit = True
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    async def main_loop(self) -> None:
        # uvicorn's own, but woken at once by stop_soon rather than at its next 0.1 s tick.
        counter = 0
        should_exit = await self.on_tick(counter)
        while not should_exit:
            counter = (counter + 1) % 864000
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 0.1)
            should_exit = await self.on_tick(counter)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if not (self._stopping_soon and not self.server_state.tasks):
            await super().shutdown(sockets)
            return
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        for connection in list(self.server_state.connections):
            connection.shutdown()  # idle keep-alive connections, closed now

    def handle_exit(self, sig: int, frame: Any) -> None:
        super().handle_exit(sig, frame)
        if self._on_idle_exit is not None and not self.server_state.tasks:
            # No request is being served (a drained worker): uvicorn's graceful shutdown
            # would spend ~0.2 s on ticks and sleeps that wait for nothing.
            self._on_idle_exit()
            exit_now(0)
        # Lets endless responses (event streams) end, so the graceful shutdown can finish.
        if self._on_exit_requested is not None:
            self._on_exit_requested()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)
        if self.started and self._on_started is not None:
            self._on_started()

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in HANDLED_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
