"""Overload protection: a per-model admission queue and a request body size limit.

Ollama's scheduler taught the shape: a bounded queue in front of the work, and a caller
that finds it full is told so at once (429 with Retry-After) instead of waiting forever.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.exceptions import HTTPException

from model_service.activity import ASGIApp, Message, Receive, Scope, Send
from model_service.errors import ApiError

DEFAULT_MAX_REQUEST_BYTES = 8 * 2**20


class Admission:
    """At most `max_active` requests run; up to `max_queued` more wait in FIFO order.

    Runs on the event loop only. `slot()` raises ApiError 429 when the queue is full.
    """

    def __init__(self, max_active: int, max_queued: int) -> None:
        self.max_active = max_active
        self.max_queued = max_queued
        self.active = 0
        self._waiting: deque[asyncio.Future[None]] = deque()

    @property
    def queued(self) -> int:
        return len(self._waiting)

    async def acquire(self) -> None:
        """Wait for a slot. Raises ApiError(429) when the queue is full."""
        if self.active < self.max_active and not self._waiting:
            self.active += 1
            return
        if len(self._waiting) >= self.max_queued:
            raise ApiError(
                429,
                f"This model is busy: {self.active} requests running and {self.queued} "
                "queued. Retry shortly.",
                type="rate_limit_error",
                code="model_overloaded",
                headers={"Retry-After": "1"},
            )
        turn = asyncio.get_running_loop().create_future()
        self._waiting.append(turn)
        try:
            await turn  # release() hands its slot straight to us
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self.release()  # we were handed a slot as we gave up: pass it on
            else:
                self._waiting.remove(turn)
            raise

    def release(self) -> None:
        while self._waiting:
            turn = self._waiting.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        self.active -= 1

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        await self.acquire()
        try:
            yield
        finally:
            self.release()


class _BodyTooLarge(HTTPException):
    # An HTTPException, so FastAPI's body parsing lets it through to the error handlers.
    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"Request body is larger than the limit of {max_bytes} bytes.")


class BodySizeLimit:
    """Refuses request bodies over `max_bytes` with 413, declared or streamed."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self._app = app
        self._max_bytes = max_bytes

    def _error(self) -> ApiError:
        return ApiError(
            413,
            f"Request body is larger than the limit of {self._max_bytes} bytes.",
            code="request_too_large",
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > self._max_bytes:
                await self._error().response()(scope, receive, send)
                return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self._max_bytes:
                    raise _BodyTooLarge(self._max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self._app(scope, counting_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await self._error().response()(scope, receive, send)
