"""Seed 003's chat with server-side sessions, over HTTP and WebSocket (issue 17).

`POST /api/v1/inference/chat` takes a prompt and an optional `session_id`: the
conversation so far is read from the session store, the prompt added, the history trimmed
to what fits the model's context, the answer generated (through the gateway, so limits
and usage apply as everywhere) and both turns saved. `/ws` streams the same thing token
by token: `stream_chat` → `stream_start`, `stream_token` …, `stream_end`; a `stop`
message ends the generation at once (the worker's connection is closed, so it stops
spending tokens) and the part generated so far is saved.

Sessions belong to the caller that made them (`key:NAME`, `user:SUB`, ...): another
caller gets 403, an admin may list and delete any.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Query, WebSocket, WebSocketDisconnect
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from model_service.auth import Role
from model_service.errors import ApiError, invalid_input
from pool_manager.gateway import JSON_REQUEST, Gateway
from pool_manager.identity import Caller, current_caller
from pool_manager.pool import ModelPool, PoolError
from pool_manager.sse import close_stream, sse_payloads
from pool_manager.store import SessionForbidden, SessionMessage, SessionStore, StoreError

log = logging.getLogger(__name__)

SESSION_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
KEEP_MESSAGES = 400  # a bound on what one session stores; the context trims further
CHARS_PER_TOKEN = 3  # a cautious estimate (SmolLM2 averages ~4 on English)
MESSAGE_OVERHEAD_TOKENS = 8  # the chat template's tokens around each message
DEFAULT_MAX_TOKENS = 256


class ChatTurn(BaseModel):
    """One turn: seed 003's request, plus the pool's `model` and sampling."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=1_000_000)
    session_id: str | None = None
    model: str | None = None  # default: the first warmup model
    system_prompt: str | None = Field(default=None, max_length=100_000)
    max_tokens: int = Field(default=DEFAULT_MAX_TOKENS, ge=1, le=1_000_000)
    temperature: float | None = Field(default=None, ge=0, le=2)
    stream: bool = False

    @field_validator("prompt", "system_prompt")
    @classmethod
    def _no_nul(cls, text: str | None) -> str | None:
        if text is not None and "\x00" in text:
            raise ValueError("must not contain NUL characters")  # PostgreSQL refuses them
        return text


@dataclass
class Prepared:
    """A turn ready to send: its model, the messages the model sees, the session."""

    model_id: str
    messages: list[dict[str, str]]
    session_id: str | None
    caller: Caller
    prompt: str
    dropped: int = 0  # older messages left out to fit the context
    answer: list[str] = field(default_factory=list)


def _invalid(message: str, param: str) -> ApiError:
    return ApiError(400, message, param=param, code="invalid_value")


def _forbidden() -> ApiError:
    return ApiError(
        403,
        "This session belongs to another caller.",
        type="permission_error",
        param="session_id",
        code="insufficient_permissions",
    )


def _store_down(exc: StoreError) -> ApiError:
    return ApiError(
        503, f"the session store is unavailable: {exc}", type="server_error", code="store_down"
    )


class SessionChat:
    """Runs chat turns against the gateway, keeping sessions in `sessions`."""

    def __init__(self, pool: ModelPool, gateway: Gateway, sessions: SessionStore) -> None:
        self._pool = pool
        self._gateway = gateway
        self.sessions = sessions

    def _model_for(self, turn: ChatTurn) -> str:
        if turn.model:
            return self._pool.resolve(turn.model).model_id
        warm = [r for r in self._pool.records() if self._pool.is_pinned(r)]
        if not warm:
            raise _invalid("model: required (the pool has no warmup model to default to)", "model")
        return warm[0].model_id

    async def prepare(self, turn: ChatTurn) -> Prepared:
        """The messages for `turn`: its session's history (trimmed to the context) and
        the prompt. Raises ApiError 400/403/404/503."""
        caller = current_caller.get()
        if turn.session_id is not None and not SESSION_ID.match(turn.session_id):
            raise _invalid(
                "session_id: 1 to 128 letters, digits, '_', '.', ':' or '-'", "session_id"
            )
        model_id = self._model_for(turn)
        history: list[SessionMessage] = []
        if turn.session_id is not None:
            try:
                history = await self.sessions.history(turn.session_id, caller.id)
            except SessionForbidden:
                raise _forbidden() from None
            except StoreError as exc:
                raise _store_down(exc) from exc
        messages = [{"role": m.role, "content": m.content} for m in history]
        messages.append({"role": "user", "content": turn.prompt})
        system = [{"role": "system", "content": turn.system_prompt}] if turn.system_prompt else []
        record = self._pool.resolve(model_id)
        budget = record.spec.n_ctx - turn.max_tokens if record.spec.is_local else None
        kept, dropped = _fit(messages, system, budget)
        return Prepared(model_id, system + kept, turn.session_id, caller, turn.prompt, dropped)

    def body(self, turn: ChatTurn, prepared: Prepared, stream: bool) -> bytes:
        payload: dict[str, Any] = {
            "model": prepared.model_id,
            "messages": prepared.messages,
            "max_tokens": turn.max_tokens,
        }
        if turn.temperature is not None:
            payload["temperature"] = turn.temperature
        if stream:
            payload["stream"] = True
            payload["stream_options"] = {"include_usage": True}
        return json.dumps(payload).encode()

    async def save(self, prepared: Prepared, answer: str) -> None:
        """Keep the turn in its session (none: nothing to keep)."""
        if prepared.session_id is None:
            return
        now = time.time()
        turns = [
            SessionMessage("user", prepared.prompt, now),
            SessionMessage("assistant", answer, now),
        ]
        try:
            await self.sessions.append(
                prepared.session_id, prepared.caller.id, prepared.model_id, turns, KEEP_MESSAGES
            )
        except SessionForbidden:
            raise _forbidden() from None
        except StoreError as exc:
            raise _store_down(exc) from exc

    async def complete(self, turn: ChatTurn) -> dict[str, Any]:
        """One turn, answered whole. Raises ApiError, PoolError."""
        prepared = await self.prepare(turn)
        reply = await self._gateway.relay(
            "/v1/chat/completions", self.body(turn, prepared, stream=False), JSON_REQUEST
        )
        if reply.status_code != 200:
            raise _refusal(reply)
        payload = json.loads(bytes(reply.body))
        choice = payload["choices"][0]
        answer = choice["message"].get("content") or ""
        await self.save(prepared, answer)
        return {
            "session_id": prepared.session_id,
            "model": prepared.model_id,
            "response": answer,
            "finish_reason": choice.get("finish_reason"),
            "usage": payload.get("usage"),
            "history_dropped": prepared.dropped,
        }

    async def stream(
        self, turn: ChatTurn, prepared: Prepared
    ) -> AsyncGenerator[dict[str, Any], None]:
        """One turn, as events: `{"token": ...}` each, then `{"finish_reason", "usage"}`.
        Closing the iterator early (a `stop`) closes the worker's connection; what was
        generated is saved either way. Raises ApiError, PoolError before the first."""
        reply = await self._gateway.relay(
            "/v1/chat/completions", self.body(turn, prepared, stream=True), JSON_REQUEST
        )
        if reply.status_code != 200 or not isinstance(reply, StreamingResponse):
            raise _refusal(reply)  # the worker refused it (too long, a bad value, ...)
        finish: str | None = None
        usage = None
        chunks = reply.body_iterator
        try:
            async for data in _sse_data(chunks):
                if "error" in data:
                    yield {"error": data["error"]}
                    return
                usage = data.get("usage") or usage
                for choice in data.get("choices") or []:
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        prepared.answer.append(piece)
                        yield {"token": piece}
                    finish = choice.get("finish_reason") or finish
            yield {"finish_reason": finish, "usage": usage}
        finally:
            await close_stream(chunks)  # a stop: the worker's connection closes, it stops
            with contextlib.suppress(ApiError):
                await self.save(prepared, "".join(prepared.answer))


def _refusal(reply: Response) -> ApiError:
    """A worker's (or the gateway's) error reply, with its own status and error."""
    try:
        error = json.loads(bytes(reply.body))["error"]
        return ApiError(
            reply.status_code,
            str(error.get("message") or "the model failed"),
            type=str(error.get("type") or "server_error"),
            param=error.get("param"),
            code=error.get("code"),
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        return ApiError(
            502,
            f"the model failed ({reply.status_code})",
            type="server_error",
            code="worker_failed",
        )


async def _sse_data(chunks: AsyncIterable[Any]) -> AsyncIterator[dict[str, Any]]:
    """The JSON of each event of a relayed OpenAI stream, up to `[DONE]`."""
    async for data in sse_payloads(chunks):
        if data == b"[DONE]":
            return
        with contextlib.suppress(ValueError):
            yield json.loads(data)


def _fit(
    messages: list[dict[str, str]], system: list[dict[str, str]], budget: int | None
) -> tuple[list[dict[str, str]], int]:
    """The newest messages that fit `budget` tokens (by a cautious estimate) beside the
    system prompt; the newest (the prompt) always stays. Returns them and how many
    older ones were left out."""
    if budget is None:
        return messages, 0

    def cost(message: dict[str, str]) -> int:
        return len(message["content"]) // CHARS_PER_TOKEN + MESSAGE_OVERHEAD_TOKENS

    left = budget - sum(cost(m) for m in system)
    kept: list[dict[str, str]] = []
    for message in reversed(messages):
        left -= cost(message)
        if kept and left < 0:
            break
        kept.append(message)
    kept.reverse()
    # A history that starts with the model's answer reads oddly: start at a user turn.
    while len(kept) > 1 and kept[0]["role"] != "user":
        kept.pop(0)
    return kept, len(messages) - len(kept)


def _parse_turn(raw: Any) -> ChatTurn:
    """A WebSocket message's `data` as a turn (the HTTP route has FastAPI parse it)."""
    try:
        return ChatTurn.model_validate(raw)
    except ValidationError as exc:
        raise invalid_input(exc) from None


def add_session_routes(app: FastAPI, chat: SessionChat) -> None:
    sessions = chat.sessions

    @app.post("/api/v1/inference/chat", response_model=None)
    async def inference_chat(turn: ChatTurn) -> Any:
        """Seed 003's chat: one turn of a session kept server-side (`session_id`), or a
        single exchange without one. `stream: true` answers as SSE events."""
        if not turn.stream:
            return await chat.complete(turn)
        prepared = await chat.prepare(turn)
        events = chat.stream(turn, prepared)
        first = await anext(events)  # a refusal before the first token is the reply's status
        if "error" in first:  # the stream broke before its first token
            await events.aclose()
            error = first["error"]
            raise ApiError(
                502, str(error.get("message")), type="server_error", code="worker_failed"
            )

        async def frames() -> AsyncIterator[bytes]:
            try:
                yield f"data: {json.dumps(first)}\n\n".encode()
                async for event in events:
                    yield f"data: {json.dumps(event)}\n\n".encode()
                yield b"data: [DONE]\n\n"
            finally:
                await events.aclose()

        return StreamingResponse(frames(), media_type="text/event-stream")

    @app.get("/api/v1/sessions")
    async def list_sessions() -> dict[str, Any]:
        """The caller's sessions (an admin's: everyone's), most recently used first."""
        caller = current_caller.get()
        owner = None if caller.role is Role.ADMIN else caller.id
        try:
            found = await sessions.sessions(owner)
        except StoreError as exc:
            raise _store_down(exc) from exc
        return {
            "sessions": [
                {
                    "session_id": s.session_id,
                    "owner": s.owner,
                    "model": s.model,
                    "messages": s.messages,
                    "created_at": s.created_at,
                    "updated_at": s.updated_at,
                }
                for s in found
            ]
        }

    @app.get("/api/v1/sessions/{session_id}")
    async def get_session(session_id: str) -> dict[str, Any]:
        """A session's messages (its owner's)."""
        caller = current_caller.get()
        try:
            history = await sessions.history(session_id, caller.id)
        except SessionForbidden:
            raise _forbidden() from None
        except StoreError as exc:
            raise _store_down(exc) from exc
        if not history:
            raise _no_session(session_id)
        return {
            "session_id": session_id,
            "messages": [{"role": m.role, "content": m.content, "at": m.at} for m in history],
        }

    @app.delete("/api/v1/sessions/{session_id}")
    async def delete_session(session_id: str) -> dict[str, Any]:
        """Forget a session (its owner, or an admin)."""
        caller = current_caller.get()
        owner = None if caller.role is Role.ADMIN else caller.id
        try:
            deleted = await sessions.delete(session_id, owner)
        except SessionForbidden:
            raise _forbidden() from None
        except StoreError as exc:
            raise _store_down(exc) from exc
        if not deleted:
            raise _no_session(session_id)
        return {"session_id": session_id, "deleted": True}

    @app.websocket("/ws")
    async def stream_socket(socket: WebSocket, token: str | None = Query(default=None)) -> None:
        """Seed 003's WebSocket: `stream_chat` → `stream_start`, `stream_token` …,
        `stream_end`; `stop` ends the running generation. (`token` is checked by the
        CallerMiddleware, as a header would be.)"""
        await socket.accept()
        await WebSocketTurns(chat, socket).run()


def _no_session(session_id: str) -> ApiError:
    return ApiError(
        404, f"no session '{session_id}'", type="invalid_request_error", code="session_not_found"
    )


class WebSocketTurns:
    """One WebSocket connection: at most one generation at a time, stoppable."""

    def __init__(self, chat: SessionChat, socket: WebSocket) -> None:
        self._chat = chat
        self._socket = socket
        self._running: asyncio.Task[None] | None = None
        self._send_lock = asyncio.Lock()

    async def _send(self, event: str, data: dict[str, Any]) -> None:
        async with self._send_lock:
            await self._socket.send_text(json.dumps({"event": event, "data": data}))

    async def _error(self, exc: ApiError | PoolError) -> None:
        data: dict[str, Any]
        if isinstance(exc, PoolError):
            data = {"message": exc.message, "type": exc.error_type, "code": exc.code}
            if exc.retry_after is not None:
                data["retry_after"] = exc.retry_after
        else:
            data = {"message": exc.message, "type": exc.type, "code": exc.code}
        await self._send("error", data)

    async def run(self) -> None:
        try:
            while True:
                text = await self._socket.receive_text()
                await self._on_message(text)
        except WebSocketDisconnect:
            pass
        finally:
            if self._running is not None:
                self._running.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._running

    async def _on_message(self, text: str) -> None:
        try:
            message = json.loads(text)
        except ValueError:
            await self._error(ApiError(400, "a message is JSON", code="invalid_json"))
            return
        event = message.get("event") if isinstance(message, dict) else None
        if event == "stop":
            await self._stop()
        elif event == "stream_chat":
            if self._running is not None and not self._running.done():
                await self._error(
                    ApiError(409, "a generation is running: send stop first", code="busy")
                )
                return
            try:
                turn = _parse_turn(message.get("data"))
            except ApiError as exc:
                await self._error(exc)
                return
            self._running = asyncio.create_task(self._turn(turn))
        else:
            await self._error(
                ApiError(400, "event: 'stream_chat' or 'stop'", param="event", code="invalid_value")
            )

    async def _stop(self) -> None:
        running = self._running
        if running is None or running.done():
            await self._send("stream_end", {"finish_reason": "stopped", "running": False})
            return
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running

    async def _turn(self, turn: ChatTurn) -> None:
        try:
            prepared = await self._chat.prepare(turn)
        except (ApiError, PoolError) as exc:
            await self._error(exc)
            return
        events = self._chat.stream(turn, prepared)
        base = {"session_id": prepared.session_id, "model": prepared.model_id}
        try:
            await self._send("stream_start", {**base, "history_dropped": prepared.dropped})
            async for event in events:
                if "error" in event:
                    await self._send("error", event["error"])
                    return
                if "token" in event:
                    await self._send("stream_token", {"token": event["token"]})
                else:
                    await self._send("stream_end", {**base, **event})
        except (ApiError, PoolError) as exc:
            await self._error(exc)
        except asyncio.CancelledError:
            await events.aclose()  # the worker's connection closes now: it stops
            with contextlib.suppress(Exception):
                answer = "".join(prepared.answer)
                await self._send("stream_end", {**base, "finish_reason": "stopped", "text": answer})
            raise
        finally:
            await events.aclose()
