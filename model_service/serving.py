"""The uvicorn server both the manager and the workers run."""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
from collections.abc import Callable, Generator
from typing import Any

import uvicorn

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


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
    ):
        super().__init__(config)
        self._on_started = on_started
        self._on_exit_requested = on_exit_requested

    def handle_exit(self, sig: int, frame: Any) -> None:
        super().handle_exit(sig, frame)
        # Lets endless responses (event streams) end, so the graceful shutdown can finish.
        if self._on_exit_requested is not None:
            self._on_exit_requested()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
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
