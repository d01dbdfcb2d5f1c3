"""What a spare worker does ahead, so that a cold start's first request skips it.

Beyond imports, serving has first-use costs: FastAPI's first app and uvicorn's first
`Config.load` (which imports the protocol modules) cost ~25 ms each, a later one ~2 ms
and ~0.1 ms; the first streamed response imports anyio's socket and stream modules and
runs Starlette's streaming path for the first time (~15 ms on a 2.5 GHz Xeon, measured
as the first request's time to its first SSE chunk: 18 ms against 3 ms for the next).
A spare pays all of that once, on an app like the one it will serve, by answering one
streamed chat request in-process with a canned reply.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import uvicorn

from model_service.activity import StatusChannel, WorkerStats
from model_service.app import create_worker_app
from model_service.engine import Finished
from model_service.inference import ChatFramer, StreamHandle
from model_service.metrics import WorkerMetrics
from model_service.protocol import SSE_DONE, ChatCompletionRequest, new_completion_id

log = logging.getLogger(__name__)

MODEL_ID = "spare"
PATH = "/v1/chat/completions"


class _CannedService:
    """Stands in for `InferenceService`: one fixed streamed reply, no model."""

    model_id = MODEL_ID
    engine = SimpleNamespace(generating=False, tokens_generated=0)

    async def chat_stream(self, request: ChatCompletionRequest) -> StreamHandle:
        framer = ChatFramer(self.model_id, request, new_completion_id("chatcmpl"), bytes)

        async def frames() -> AsyncIterator[bytes]:
            for frame in framer.opening():
                yield frame
            yield framer.piece("ok", [])
            yield framer.finish(Finished("stop", 1, 1))
            yield SSE_DONE

        return StreamHandle(frames(), lambda: None)


def warm_up_serving() -> bool:
    """Build a worker app and serve one streamed request through it, in-process.

    Returns whether the request got its reply; a failure only costs the cold start the
    time it would have spent anyway, so it is logged, never raised.
    """
    stats = WorkerStats()
    app = create_worker_app(
        _CannedService(),  # type: ignore[arg-type]  # the routes use only what it has
        stats,
        WorkerMetrics(MODEL_ID, stats),
        StatusChannel(None),
    )
    uvicorn.Config(app, log_config=None, access_log=False, lifespan="off").load()
    try:
        status, body = asyncio.run(_one_streamed_request(app))
    except Exception as exc:  # a warm-up must never stop the spare
        log.warning("spare warm-up request failed", extra={"reason": repr(exc)})
        return False
    if status != 200 or not body.endswith(SSE_DONE):
        log.warning("spare warm-up request failed", extra={"status": status})
        return False
    return True


async def _one_streamed_request(app: Any) -> tuple[int, bytes]:
    """Call the ASGI app as uvicorn would for one POST with a JSON body."""
    body = json.dumps(
        {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    ).encode()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},  # as uvicorn says
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": PATH,
        "raw_path": PATH.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"127.0.0.1"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 0),
        "server": ("127.0.0.1", 0),
        "state": {},
    }
    incoming = [{"type": "http.request", "body": body, "more_body": False}]
    never = asyncio.Event()  # the client never disconnects
    status = 0
    received = bytearray()

    async def receive() -> dict[str, Any]:
        if incoming:
            return incoming.pop()
        await never.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = int(message["status"])
        elif message["type"] == "http.response.body":
            received.extend(message.get("body", b""))

    await asyncio.wait_for(app(scope, receive, send), timeout=10)
    return status, bytes(received)
