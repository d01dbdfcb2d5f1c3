"""Overload protection: a per-model admission queue and a request body size limit.

Ollama's scheduler taught the shape: a bounded queue in front of the work, and a caller
that finds it full is told so at once (429 with Retry-After) instead of waiting forever.
"""

from __future__ import annotations

import asyncio
import re
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.exceptions import HTTPException

from model_service.activity import ASGIApp, Message, Receive, Scope, Send
from model_service.errors import ApiError

DEFAULT_MAX_REQUEST_BYTES = 8 * 2**20
# JSON nested deeper than this is refused with 400 before anything parses it: Python's
# json raises RecursionError near 1,000 levels, and code that walks a request (schemas,
# re-serialization) recurses too. Real requests (tool schemas included) nest far less.
MAX_JSON_DEPTH = 64
# Bodies larger than this are checked on a thread, not on the event loop.
_INLINE_CHECK_BYTES = 64 * 1024
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# A JSON string (escapes included), and the bytes that are not brackets.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


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


def json_depth(body: bytes) -> int:
    """How deeply `body`'s JSON arrays and objects nest (0 for a scalar), without parsing
    it; brackets inside strings do not count. Linear time, in C but for numpy's sum."""
    if body.count(b"[") + body.count(b"{") <= 1:
        return body.count(b"[") + body.count(b"{")
    brackets = _JSON_STRING.sub(b"", body).translate(None, _NOT_BRACKETS)
    import numpy as np  # only for bodies with brackets to count

    codes = np.frombuffer(brackets, dtype=np.uint8)
    steps = np.where((codes == ord("[")) | (codes == ord("{")), 1, -1).astype(np.int32)
    return int(np.cumsum(steps).max(initial=0))


def depth_exceeds(body: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    # Fewer opening brackets than the limit cannot nest deeper: most bodies stop here.
    return body.count(b"[") + body.count(b"{") > limit and json_depth(body) > limit


def too_deep_error(limit: int = MAX_JSON_DEPTH) -> ApiError:
    return ApiError(
        400,
        f"The request body nests JSON arrays and objects more than {limit} levels deep.",
        code="json_too_deep",
    )


class _BodyTooLarge(HTTPException):
    # An HTTPException, so FastAPI's body parsing lets it through to the error handlers.
    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"Request body is larger than the limit of {max_bytes} bytes.")


class BodySizeLimit:
    """Refuses request bodies over `max_bytes` with 413, declared or streamed, and JSON
    nested deeper than `max_depth` with 400.

    A body (POST, PUT, PATCH) is read whole before the app sees it (it is bounded), so
    its nesting can be checked first; a large one is checked on a thread.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, max_depth: int = MAX_JSON_DEPTH) -> None:
        self._app = app
        self._max_bytes = max_bytes
        self._max_depth = max_depth

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
        if scope.get("method") in _BODY_METHODS:
            await self._checked(scope, receive, send)
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

    async def _checked(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Read the whole body (at most `max_bytes`), check its nesting, then run the app
        with it; later `receive` calls (a disconnect) go to the client's."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending its body: nobody to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self._max_bytes:
                await self._error().response()(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        if size > _INLINE_CHECK_BYTES:
            too_deep = await asyncio.to_thread(depth_exceeds, body, self._max_depth)
        else:
            too_deep = depth_exceeds(body, self._max_depth)
        if too_deep:
            await too_deep_error(self._max_depth).response()(scope, receive, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self._app(scope, replay, send)
