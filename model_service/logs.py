"""Structured logging shared by the manager and the workers.

One JSON object per line. Every line written while a request is handled carries its
`request_id`: taken from the client's `X-Request-ID` (or made up), passed from the
manager to the worker, and returned in the response's `X-Request-ID`. Each request also
gets one access line. Keys and prompts are never logged; `POOL_LOG_PROMPTS=1` logs
prompts at DEBUG for troubleshooting. With `POOL_LOG_FILE`, logs go to that file (the
manager) or to a file per model next to it (workers), rotated daily, 7 days kept.
"""

from __future__ import annotations

import contextvars
import json
import logging
import logging.handlers
import os
import re
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from model_service.activity import ASGIApp, Message, Receive, Scope, Send

# Standard LogRecord attributes, and uvicorn's ANSI-coloured copy of its message.
_RESERVED = set(vars(logging.makeLogRecord({}))) | {"color_message"}
# Attributes another library's record factory adds to every record (Ray's, in cluster
# mode: `_ray_timestamp_ns`): not ours to log.
_FOREIGN_PREFIX = "_"
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
LOG_FILE_ENV = "POOL_LOG_FILE"
LOG_PROMPTS_ENV = "POOL_LOG_PROMPTS"

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
access_log = logging.getLogger("access")


class JsonFormatter(logging.Formatter):
    def __init__(self, component: str) -> None:
        super().__init__()
        self._component = component

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "component": self._component,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        current = request_id.get()
        if current is not None:
            entry["request_id"] = current
        # Fields passed with `extra=` become top-level keys.
        entry.update(
            {
                k: v
                for k, v in vars(record).items()
                if k not in _RESERVED and not k.startswith(_FOREIGN_PREFIX)
            }
        )
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(component: str, level: str = "INFO", file_suffix: str = "") -> None:
    """Log JSON lines to stderr, or to `$POOL_LOG_FILE` (plus `file_suffix`) rotated daily."""
    log_file = os.environ.get(LOG_FILE_ENV)
    handler: logging.Handler
    if log_file:
        path = Path(log_file)
        if file_suffix:
            path = path.with_name(f"{path.stem}{file_suffix}{path.suffix or '.log'}")
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.handlers.TimedRotatingFileHandler(
            path, when="midnight", backupCount=7, encoding="utf-8"
        )
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(component))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Our access lines replace uvicorn's (they carry the request id and the duration).
    logging.getLogger("uvicorn.access").disabled = True


def prompts_may_be_logged() -> bool:
    return os.environ.get(LOG_PROMPTS_ENV) == "1"


class RequestIdMiddleware:
    """Names each request (X-Request-ID in and out) and writes its access line."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        given = next(
            (v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"x-request-id"),
            None,
        )
        rid = given if given and _VALID_REQUEST_ID.match(given) else uuid.uuid4().hex
        token = request_id.set(rid)
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [
                    *[(k, v) for k, v in message.get("headers", []) if k != b"x-request-id"],
                    (b"x-request-id", rid.encode()),
                ]
            await send(message)

        try:
            await self._app(scope, receive, send_with_id)
        finally:
            access_log.info(
                "request",
                extra={
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status,
                    "duration_ms": round((time.perf_counter() - started) * 1000, 1),
                },
            )
            request_id.reset(token)
