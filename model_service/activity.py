"""What the worker tells its manager, and the counters behind its /health.

The manager learns about every inference request through the control socket (a `start`
event and an `end` event), so it knows in-flight counts and last use without polling,
including for requests sent straight to the worker's port.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable, MutableMapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from model_service.contract import EndEvent, Event, StartEvent
from model_service.errors import ApiError

log = logging.getLogger(__name__)

UNLOADING_ERROR = ApiError(
    503,
    "This model is being unloaded; retry in a moment (through the pool manager it "
    "will be loaded again).",
    type="server_error",
    code="model_unloading",
    headers={"Retry-After": "1"},
)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class StatusChannel:
    """Writes events to the manager (model_service/contract.py); a no-op when run
    standalone."""

    def __init__(self, fd: int | None) -> None:
        self._fd = fd

    def send(self, event: Event) -> None:
        if self._fd is None:
            return
        try:
            os.write(self._fd, event.encode())
        except OSError:
            # The manager is gone; the control-socket reader will shut us down.
            self._fd = None


@dataclass
class RequestUsage:
    """The tokens one request used, reported with its `end` event (the manager books
    them to whoever sent it: the ticket its gateway put in `x-pool-ticket`)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


# Set by ActivityMiddleware for each inference request; a mutable object, so the tasks a
# streamed reply runs in (copies of the request's context) count into the same one.
request_usage: ContextVar[RequestUsage | None] = ContextVar("request_usage", default=None)


def count_usage(prompt_tokens: int, completion_tokens: int = 0, cached_tokens: int = 0) -> None:
    """Add one generation's (or embedding's) tokens to the current request's usage."""
    usage = request_usage.get()
    if usage is not None:
        usage.prompt_tokens += prompt_tokens
        usage.completion_tokens += completion_tokens
        usage.cached_tokens += cached_tokens


@dataclass
class WorkerStats:
    started_at: float = field(default_factory=time.time)
    requests_served: int = 0
    in_flight: int = 0
    last_request_at: float | None = None
    # Set (from the control-socket thread) when the manager starts unloading this worker.
    draining: bool = False


class ActivityMiddleware:
    """Counts inference requests in flight and reports their start and end."""

    def __init__(
        self,
        app: ASGIApp,
        stats: WorkerStats,
        channel: StatusChannel,
        paths: frozenset[str],
        on_finished: Callable[[str, int], None] | None = None,
    ) -> None:
        self._on_finished = on_finished
        self._app = app
        self._stats = stats
        self._channel = channel
        self._paths = paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self._paths:
            await self._app(scope, receive, send)
            return
        stats = self._stats
        if stats.draining:
            await UNLOADING_ERROR.response()(scope, receive, send)
            return
        stats.in_flight += 1
        self._channel.send(StartEvent())
        status = 500
        usage = RequestUsage()
        counting = request_usage.set(usage)

        async def noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._app(scope, receive, noting_status)
        finally:
            stats.in_flight -= 1
            stats.requests_served += 1
            stats.last_request_at = time.time()
            request_usage.reset(counting)
            self._channel.send(
                EndEvent(
                    ticket=_ticket(scope),
                    status=status,
                    prompt_tokens=usage.prompt_tokens,
                    completion_tokens=usage.completion_tokens,
                    cached_tokens=usage.cached_tokens,
                )
            )
            if self._on_finished is not None:
                self._on_finished(scope["path"], status)


def _ticket(scope: Scope) -> str | None:
    """The manager's `x-pool-ticket` header (absent: sent straight to this port)."""
    for name, value in scope.get("headers", ()):
        if name == b"x-pool-ticket":
            text: str = value.decode("latin-1")[:64]
            return text
    return None
