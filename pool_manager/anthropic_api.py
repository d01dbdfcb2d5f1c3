"""The Anthropic Messages API on the manager's port, for Claude Code and the `anthropic` SDK.

Routes: `POST /v1/messages` and `POST /v1/messages/count_tokens`. A request is translated
to the worker's OpenAI `/v1/chat/completions` (or `/v1/count_tokens`) and sent through
the gateway, so COLD models load on demand and a model's fallback chain applies; the reply
is translated back. The model is named by id or alias (`claude-*` patterns included, see
`ModelPool.resolve`).

Translation, request side: `system` becomes a system message; an assistant turn's
`tool_use` blocks become its `tool_calls`; a user turn's `tool_result` blocks become `tool`
messages, in order, before the turn's text (`is_error` results start with "Error: ");
thinking blocks in the history are dropped; image and document blocks are refused (400).
`tool_choice` `any` is OpenAI's `required`, `tool` a named function; server tools (a
`type` such as "web_search_20250305") are left out. `max_tokens` is capped at a local
model's context. `metadata.user_id` is sent as `user`. Ignored: `top_k` (the workers have
none) and `thinking` (the pool's models do not think aloud).

Reply side: the worker is always asked for a stream (with usage), read by `MessageStream`,
which yields Anthropic's stream events and also folds them into the one `Message` a
non-streamed request gets. `stop_sequences` are matched here, on the text, not by the
worker: the worker's OpenAI reply cannot say which sequence stopped it, and Anthropic's
must (`stop_reason: "stop_sequence"`, `stop_sequence`). On a match the relayed stream is
closed, which stops the generation; the usage then counts one output token per piece the
worker streamed and no input tokens (the worker's count comes at the end of its stream).
`message_start` reports 0 input tokens for the same reason: the counts arrive in
`message_delta`, as cumulative usage (the SDK takes them from there). `input_tokens`
leaves out the prompt tokens served from the KV cache, reported as
`cache_read_input_tokens` (Anthropic's meaning: the prompt is their sum).

Errors use Anthropic's shape, `{"type": "error", "error": {"type", "message"}}`, with the
HTTP status (503 is `overloaded_error`, with Retry-After); errors answered before the
routes (401/403 from the keys, 413 from the body limit) are reshaped by
`AnthropicErrorShape` on these paths. An error in the middle of a stream is an
`event: error`. A client that goes away closes the relayed stream, which stops the
generation.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.types import Message as AsgiMessage

from model_service.engine import StopMatcher
from model_service.errors import ApiError
from pool_manager.anthropic_protocol import (
    ContentBlock,
    ContentBlockDeltaEvent,
    ContentBlockParam,
    ContentBlockStartEvent,
    ContentBlockStopEvent,
    CountTokensRequest,
    CountTokensResponse,
    ErrorDetail,
    ErrorEvent,
    ErrorResponse,
    ErrorType,
    InputJsonDelta,
    Message,
    MessageDelta,
    MessageDeltaEvent,
    MessageParam,
    MessagesRequest,
    MessageStartEvent,
    MessageStopEvent,
    PingEvent,
    StopReason,
    StreamEvent,
    TextBlock,
    TextBlockParam,
    TextDelta,
    ToolChoice,
    ToolChoiceAny,
    ToolChoiceNone,
    ToolChoiceTool,
    ToolParam,
    ToolResultBlockParam,
    ToolUseBlock,
    ToolUseBlockParam,
    Usage,
    new_message_id,
    new_tool_use_id,
)
from pool_manager.gateway import JSON_REQUEST, Gateway
from pool_manager.pool import ModelPool, PoolError
from pool_manager.sse import close_stream, sse_payloads

log = logging.getLogger(__name__)

MESSAGES_PATH = "/v1/messages"
# Which model answered (a fallback, perhaps): passed on from the gateway's reply.
_POOL_HEADERS = ("x-pool-model", "x-pool-fallback-from")
_STATUS_TYPES: dict[int, ErrorType] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}
# OpenAI error types that say more than their status (an error inside a stream has none).
_OPENAI_TYPES: dict[str, ErrorType] = {
    "authentication_error": "authentication_error",
    "permission_error": "permission_error",
    "rate_limit_error": "rate_limit_error",
    "timeout_error": "timeout_error",
    "server_error": "api_error",
}
# The status for an error that came inside the stream, when the reply is not streamed.
_STATUS_OF_TYPES: dict[str, int] = {
    "rate_limit_error": 429,
    "overloaded_error": 503,
    "timeout_error": 504,
}
_FINISH_REASONS: dict[str, StopReason] = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
}


class AnthropicError(Exception):
    """An error returned in Anthropic's shape, with `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: ErrorType | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type: ErrorType = type or error_type_for(status)
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return ErrorResponse(error=ErrorDetail(type=self.type, message=self.message)).model_dump()

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), self.status, headers=self.headers)


def error_type_for(status: int, openai_type: str | None = None) -> ErrorType:
    """Anthropic's error type for an HTTP status (and the OpenAI type, when known)."""
    if status in _STATUS_TYPES:
        return _STATUS_TYPES[status]
    if openai_type in _OPENAI_TYPES:
        return _OPENAI_TYPES[openai_type]
    return "api_error" if status >= 500 or status == 0 else "invalid_request_error"


def from_openai_error(
    status: int, payload: Any, headers: dict[str, str] | None = None
) -> AnthropicError:
    """An OpenAI-shaped error body (the gateway's, a worker's) as an AnthropicError."""
    message = f"request failed with status {status}"
    openai_type = code = None
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict):
        message = str(error.get("message") or message)
        openai_type, code = error.get("type"), error.get("code")
    elif isinstance(error, str):
        message = error
    if code == "context_length_exceeded":
        message = f"prompt is too long: {message}"  # the words Claude Code looks for
    kept = {}
    retry_after = {k.lower(): v for k, v in (headers or {}).items()}.get("retry-after")
    if retry_after is not None:
        kept["Retry-After"] = retry_after
    return AnthropicError(status, message, type=error_type_for(status, openai_type), headers=kept)


def from_pool_error(exc: PoolError) -> AnthropicError:
    headers = {}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    return AnthropicError(exc.status, exc.message, headers=headers)


_UNION_BRANCHES = frozenset({"str", "int", "float", "bool", "dict", "list", "none"})


def validation_error(exc: ValidationError) -> AnthropicError:
    """A pydantic error as Anthropic words it: `field.path: message`.

    Of a union's errors, the deepest says the most (a bad block inside a list, rather than
    "not a string"); the union's branch labels are left out of the path.
    """
    errors = exc.errors()
    if not errors:
        return AnthropicError(400, "invalid request")
    first = max(errors, key=lambda error: len(error["loc"]))
    if first["type"] == "json_invalid":
        return AnthropicError(400, "request body is not valid JSON")
    loc = ".".join(
        str(part)
        for part in first["loc"]
        if not (isinstance(part, str) and ("[" in part or part in _UNION_BRANCHES))
    )
    if not loc and first["type"] == "model_type":
        return AnthropicError(400, "request body must be a JSON object")
    message = f"{loc}: {first['msg']}" if loc else str(first["msg"])
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem(s))"
    return AnthropicError(400, message)


# --- request translation (pure) ----------------------------------------------------------------


def _unsupported(block_type: str) -> AnthropicError:
    return AnthropicError(
        400, f"{block_type} content blocks are not supported by this server (text only)"
    )


def _text_of(blocks: str | list[Any] | None, where: str) -> str:
    """Text blocks joined (a blank line between them); other blocks refused."""
    if blocks is None:
        return ""
    if isinstance(blocks, str):
        return blocks
    texts = []
    for block in blocks:
        if not isinstance(block, TextBlockParam):
            raise _unsupported(f"{where}: {block.type}")
        texts.append(block.text)
    return "\n\n".join(texts)


def _tool_message(block: ToolResultBlockParam) -> dict[str, Any]:
    content = _text_of(block.content, "tool_result content")
    if block.is_error:
        content = f"Error: {content}" if content else "Error"
    return {"role": "tool", "tool_call_id": block.tool_use_id, "content": content}


def _user_messages(blocks: list[ContentBlockParam]) -> list[dict[str, Any]]:
    """A user turn: its tool results first (in order), then its text as one message."""
    results = [_tool_message(b) for b in blocks if isinstance(b, ToolResultBlockParam)]
    texts = []
    for block in blocks:
        if isinstance(block, TextBlockParam):
            texts.append(block.text)
        elif block.type in ("image", "document", "tool_use"):
            raise _unsupported(f"user {block.type}")
        # tool results are above; thinking blocks belong to assistant turns: dropped
    if texts or not results:
        results.append({"role": "user", "content": "\n\n".join(texts)})
    return results


def _assistant_message(blocks: list[ContentBlockParam]) -> dict[str, Any]:
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in blocks:
        if isinstance(block, TextBlockParam):
            texts.append(block.text)
        elif isinstance(block, ToolUseBlockParam):
            calls.append(
                {
                    "id": block.id,
                    "type": "function",
                    "function": {"name": block.name, "arguments": json.dumps(block.input)},
                }
            )
        elif block.type in ("image", "document", "tool_result"):
            raise _unsupported(f"assistant {block.type}")
        # thinking and redacted_thinking: the pool's models never made them; dropped
    message: dict[str, Any] = {"role": "assistant", "content": "\n\n".join(texts) or None}
    if calls:
        message["tool_calls"] = calls
    elif message["content"] is None:
        message["content"] = ""
    return message


def openai_messages(
    system: str | list[TextBlockParam] | None, messages: list[MessageParam]
) -> list[dict[str, Any]]:
    """Anthropic's system prompt and turns as OpenAI chat messages. Raises AnthropicError."""
    out: list[dict[str, Any]] = []
    system_text = _text_of(system, "system")
    if system_text:
        out.append({"role": "system", "content": system_text})
    for message in messages:
        if isinstance(message.content, str):
            out.append({"role": message.role, "content": message.content})
        elif message.role == "user":
            out.extend(_user_messages(message.content))
        else:
            out.append(_assistant_message(message.content))
    return out


def _openai_tools(tools: list[ToolParam] | None, choice: ToolChoice | None) -> dict[str, Any]:
    """`tools`, `tool_choice` and `parallel_tool_calls` for the OpenAI request."""
    client_tools = [t for t in tools or [] if t.is_client_tool]
    if not client_tools:
        return {}
    for tool in client_tools:
        if tool.input_schema is None:
            raise AnthropicError(400, f"tools: tool '{tool.name}' needs an input_schema")
    fields: dict[str, Any] = {
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": t.name,
                    **({"description": t.description} if t.description else {}),
                    "parameters": t.input_schema,
                },
            }
            for t in client_tools
        ]
    }
    if isinstance(choice, ToolChoiceTool):
        if choice.name not in {t.name for t in client_tools}:
            raise AnthropicError(400, f"tool_choice: no tool named '{choice.name}' in tools")
        fields["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
    elif isinstance(choice, ToolChoiceAny):
        fields["tool_choice"] = "required"
    elif isinstance(choice, ToolChoiceNone):
        fields["tool_choice"] = "none"
    elif choice is not None:
        fields["tool_choice"] = "auto"
    if not isinstance(choice, ToolChoiceNone | None) and choice.disable_parallel_tool_use:
        fields["parallel_tool_calls"] = False
    return fields


def openai_chat_request(
    request: MessagesRequest, model_id: str, context: int | None
) -> dict[str, Any]:
    """The OpenAI chat request for a Messages request, always streamed with usage.

    `context` caps `max_tokens` (a local model's n_ctx; Claude Code asks for 32000).
    Stop sequences are left to `MessageStream`. Raises AnthropicError.
    """
    body: dict[str, Any] = {
        "model": model_id,
        "messages": openai_messages(request.system, request.messages),
        "max_tokens": min(request.max_tokens, context) if context else request.max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        **_openai_tools(request.tools, request.tool_choice),
    }
    if request.temperature is not None:
        body["temperature"] = request.temperature
    if request.top_p is not None:
        body["top_p"] = request.top_p
    if request.metadata is not None and request.metadata.user_id:
        body["user"] = request.metadata.user_id
    return body


def openai_count_request(request: CountTokensRequest, model_id: str) -> dict[str, Any]:
    """The worker's `/v1/count_tokens` request (an OpenAI chat body). Raises AnthropicError."""
    return {
        "model": model_id,
        "messages": openai_messages(request.system, request.messages),
        **_openai_tools(request.tools, request.tool_choice),
    }


# --- reply translation (pure) ------------------------------------------------------------------


def anthropic_tool_id(openai_id: Any) -> str:
    """Anthropic's `toolu_` id for an OpenAI call id (the same id, prefixed)."""
    if not isinstance(openai_id, str) or not openai_id:
        return new_tool_use_id()
    return openai_id if openai_id.startswith("toolu_") else f"toolu_{openai_id}"


def _tool_input(arguments: str) -> dict[str, Any]:
    if not arguments.strip():
        return {}
    try:
        parsed = json.loads(arguments)
    except ValueError:
        parsed = None
    if not isinstance(parsed, dict):
        log.warning("tool arguments are not a JSON object", extra={"arguments": arguments[:200]})
        return {}
    return parsed


@dataclass
class _Block:
    """One content block being built: text, or a tool call and its arguments so far."""

    text: str = ""
    tool_id: str | None = None
    name: str = ""
    arguments: list[str] = field(default_factory=list)

    def final(self) -> ContentBlock:
        if self.tool_id is None:
            return TextBlock(text=self.text)
        return ToolUseBlock(
            id=self.tool_id, name=self.name, input=_tool_input("".join(self.arguments))
        )


class MessageStream:
    """OpenAI chat chunks in, Anthropic stream events out, and the whole message at the end.

    Pure: `start()`, then `feed(chunk)` for each parsed chunk, then `finish()` (or
    `error()`). `stopped` turns true when a stop sequence matched; feed nothing after it.
    """

    def __init__(self, message_id: str, model: str, stop_sequences: list[str]) -> None:
        self.message_id = message_id
        self.model = model
        self.stopped = False
        self._scanner = StopMatcher(stop_sequences)
        self._blocks: list[_Block] = []
        self._open: int | None = None  # the index of the block not yet stopped
        self._calls: dict[int, int] = {}  # OpenAI tool-call index -> block index
        self._finish_reason: str | None = None
        self._stop_sequence: str | None = None
        self._pieces = 0  # chunks with text or call fragments: output tokens if no usage
        self._usage: dict[str, Any] | None = None

    # --- events ---

    def start(self) -> list[StreamEvent]:
        opening = Message(
            id=self.message_id,
            model=self.model,
            content=[],
            usage=Usage(input_tokens=0, output_tokens=0),
        )
        return [MessageStartEvent(message=opening), PingEvent()]

    def feed(self, chunk: dict[str, Any]) -> list[StreamEvent]:
        """The events for one OpenAI chunk (text, tool-call fragments, finish, usage)."""
        if isinstance(chunk.get("usage"), dict):
            self._usage = chunk["usage"]
        events: list[StreamEvent] = []
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("content") or delta.get("tool_calls"):
                self._pieces += 1
            if delta.get("content"):
                events += self._text(str(delta["content"]))
                if self.stopped:
                    return events
            for call in delta.get("tool_calls") or []:
                events += self._tool_fragment(call)
            if choice.get("finish_reason"):
                self._finish_reason = str(choice["finish_reason"])
        return events

    def finish(self) -> list[StreamEvent]:
        """The closing events: the last block's stop, the stop reason and usage."""
        events = self._append_text(self._scanner.flush())
        events += self._close_open()
        delta = MessageDelta(stop_reason=self.stop_reason(), stop_sequence=self._stop_sequence)
        events.append(MessageDeltaEvent(delta=delta, usage=self.usage()))
        events.append(MessageStopEvent())
        return events

    @staticmethod
    def error(message: str, error_type: ErrorType = "api_error") -> ErrorEvent:
        return ErrorEvent(error=ErrorDetail(type=error_type, message=message))

    # --- the message so far ---

    def stop_reason(self) -> StopReason:
        if self._stop_sequence is not None:
            return "stop_sequence"
        reason = _FINISH_REASONS.get(self._finish_reason or "stop", "end_turn")
        if reason == "end_turn" and self._calls:
            return "tool_use"  # some servers finish a call with "stop"
        return reason

    def usage(self) -> Usage:
        if self._usage is None:
            return Usage(input_tokens=0, output_tokens=self._pieces)
        details = self._usage.get("prompt_tokens_details") or {}
        cached = int(details.get("cached_tokens") or 0)
        prompt = int(self._usage.get("prompt_tokens") or 0)
        return Usage(
            input_tokens=max(0, prompt - cached),
            output_tokens=int(self._usage.get("completion_tokens") or 0),
            cache_read_input_tokens=cached,
        )

    def message(self) -> Message:
        """The whole reply, for a request that was not streamed (call after finish())."""
        return Message(
            id=self.message_id,
            model=self.model,
            content=[block.final() for block in self._blocks],
            stop_reason=self.stop_reason(),
            stop_sequence=self._stop_sequence,
            usage=self.usage(),
        )

    # --- helpers ---

    def _text(self, text: str) -> list[StreamEvent]:
        safe, stop = self._scanner.feed(text)
        events = self._append_text(safe)
        if stop is not None:
            self._stop_sequence = stop
            self.stopped = True
        return events

    def _append_text(self, text: str) -> list[StreamEvent]:
        if not text:
            return []
        events: list[StreamEvent] = []
        if self._open is None or self._blocks[self._open].tool_id is not None:
            events += self._close_open()
            events += self._open_block(_Block(), TextBlock(text=""))
        assert self._open is not None
        self._blocks[self._open].text += text
        events.append(ContentBlockDeltaEvent(index=self._open, delta=TextDelta(text=text)))
        return events

    def _tool_fragment(self, call: dict[str, Any]) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        function = call.get("function") or {}
        position = int(call.get("index") or 0)
        index = self._calls.get(position)
        if index is None:
            # A call starts: text held back for a stop sequence comes before it.
            events += self._append_text(self._scanner.flush())
            events += self._close_open()
            block = _Block(
                tool_id=anthropic_tool_id(call.get("id")), name=function.get("name") or ""
            )
            assert block.tool_id is not None
            start = ToolUseBlock(id=block.tool_id, name=block.name, input={})
            events += self._open_block(block, start)
            index = self._calls[position] = len(self._blocks) - 1
        arguments = function.get("arguments")
        if arguments:
            self._blocks[index].arguments.append(arguments)
            events.append(
                ContentBlockDeltaEvent(index=index, delta=InputJsonDelta(partial_json=arguments))
            )
        return events

    def _open_block(self, block: _Block, start: ContentBlock) -> list[StreamEvent]:
        self._blocks.append(block)
        self._open = len(self._blocks) - 1
        return [ContentBlockStartEvent(index=self._open, content_block=start)]

    def _close_open(self) -> list[StreamEvent]:
        if self._open is None:
            return []
        index, self._open = self._open, None
        return [ContentBlockStopEvent(index=index)]


def sse_frame(event: StreamEvent) -> bytes:
    """One event as Anthropic frames it: its type as the SSE event name, then the JSON."""
    return f"event: {event.type}\ndata: {event.model_dump_json()}\n\n".encode()


# --- driving a relayed stream ------------------------------------------------------------------


async def openai_chunks(body: AsyncIterable[Any]) -> AsyncIterator[dict[str, Any] | None]:
    """The JSON payloads of an OpenAI SSE stream; None for `[DONE]`, which ends it."""
    async for data in sse_payloads(body):
        if data == b"[DONE]":
            yield None
            return
        try:
            payload = json.loads(data)
        except ValueError:
            continue
        if isinstance(payload, dict):
            yield payload


async def translate(body: AsyncIterable[Any], stream: MessageStream) -> AsyncIterator[StreamEvent]:
    """The Anthropic events for a relayed OpenAI stream; ends with `error` if it breaks.

    Closing this generator (or a stop sequence) closes the relayed stream, which stops the
    generation.
    """
    chunks = openai_chunks(body)
    try:
        for event in stream.start():
            yield event
        async for chunk in chunks:
            if chunk is None:
                break
            error = chunk.get("error")
            if error is not None:
                detail = error if isinstance(error, dict) else {"message": str(error)}
                kind = error_type_for(0, detail.get("type"))
                yield stream.error(str(detail.get("message") or "generation failed"), kind)
                return
            for event in stream.feed(chunk):
                yield event
            if stream.stopped:
                break
        else:
            yield stream.error("the model's stream ended before it was complete")
            return
        for event in stream.finish():
            yield event
    finally:
        await close_stream(chunks)
        await close_stream(body)


async def _sse_frames(events: AsyncIterator[StreamEvent]) -> AsyncIterator[bytes]:
    try:
        async for event in events:
            yield sse_frame(event)
    finally:
        await close_stream(events)


class ClosingStream(StreamingResponse):
    """A streamed reply that closes its source when the client goes away.

    Starlette's own only notices when a write fails; here a task waits for the client's
    disconnect and stops the sending, and the source is always closed at the end, which
    closes the relayed stream and stops the generation.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        sending = asyncio.ensure_future(self.stream_response(send))
        leaving = asyncio.ensure_future(self._client_leaves(receive))
        try:
            await asyncio.wait((sending, leaving), return_when=asyncio.FIRST_COMPLETED)
        finally:
            leaving.cancel()
            sending.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await sending
            await close_stream(self.body_iterator)

    @staticmethod
    async def _client_leaves(receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass


# --- the routes --------------------------------------------------------------------------------

_Request = TypeVar("_Request", bound=BaseModel)


def _parse(raw: bytes, model: type[_Request]) -> _Request:
    try:
        return model.model_validate_json(raw or b"null")
    except ValidationError as exc:
        raise validation_error(exc) from None


class AnthropicApi:
    """The handlers; each returns a response, errors included, in Anthropic's shape."""

    def __init__(self, pool: ModelPool, gateway: Gateway) -> None:
        self._pool = pool
        self._gateway = gateway

    async def _relay(self, path: str, body: dict[str, Any]) -> Response:
        """The gateway's 200 reply; anything else raised as an AnthropicError."""
        reply = await self._gateway.relay(path, json.dumps(body).encode(), JSON_REQUEST)
        if reply.status_code == 200:
            return reply
        if isinstance(reply, StreamingResponse):
            await close_stream(reply.body_iterator)
            raise AnthropicError(reply.status_code, "the model's worker failed")
        try:
            payload = json.loads(bytes(reply.body))
        except ValueError:
            payload = None
        raise from_openai_error(reply.status_code, payload, dict(reply.headers))

    async def messages(self, request: Request) -> Response:
        call = _parse(await request.body(), MessagesRequest)
        record = self._pool.resolve(call.model)
        context = record.spec.n_ctx if record.spec.is_local else None
        body = openai_chat_request(call, record.model_id, context)
        reply = await self._relay("/v1/chat/completions", body)
        if not isinstance(reply, StreamingResponse):
            raise AnthropicError(502, "the model's worker did not stream its reply")
        headers = {k: reply.headers[k] for k in _POOL_HEADERS if k in reply.headers}
        stream = MessageStream(new_message_id(), call.model, call.stop_sequences or [])
        events = translate(reply.body_iterator, stream)
        if call.stream:
            headers["Cache-Control"] = "no-cache"
            return ClosingStream(
                _sse_frames(events), media_type="text/event-stream", headers=headers
            )
        try:
            async for event in events:
                if isinstance(event, ErrorEvent):
                    status = _STATUS_OF_TYPES.get(event.error.type, 502)
                    raise AnthropicError(status, event.error.message, type=event.error.type)
        finally:
            await close_stream(events)
        return JSONResponse(stream.message().model_dump(), headers=headers)

    async def count_tokens(self, request: Request) -> Response:
        call = _parse(await request.body(), CountTokensRequest)
        record = self._pool.resolve(call.model)
        body = openai_count_request(call, record.model_id)
        reply = await self._relay("/v1/count_tokens", body)
        if isinstance(reply, StreamingResponse):
            await close_stream(reply.body_iterator)
            raise AnthropicError(502, "the model's worker streamed a token count")
        count = json.loads(bytes(reply.body))["prompt_tokens"]
        return JSONResponse(CountTokensResponse(input_tokens=int(count)).model_dump())


def _is_messages_path(path: str) -> bool:
    return path == MESSAGES_PATH or path.startswith(MESSAGES_PATH + "/")


class AnthropicErrorShape:
    """Gives the OpenAI-shaped errors answered before the routes (401/403 from the keys,
    413 from the body limit, 404/405 from routing) Anthropic's shape on /v1/messages paths.
    Every other request and reply passes untouched."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _is_messages_path(scope["path"]):
            await self._app(scope, receive, send)
            return
        start: AsgiMessage | None = None
        body = b""

        async def reshaping_send(message: AsgiMessage) -> None:
            nonlocal start, body
            if message["type"] == "http.response.start" and message["status"] >= 400:
                start = message  # hold it until the body says whether to reshape
                return
            if start is None or message["type"] != "http.response.body":
                await send(message)
                return
            body += message.get("body", b"")
            if message.get("more_body"):
                return
            status, headers = start["status"], _reshaped_headers(start)
            start = None
            content = _anthropic_error_body(status, body, headers)
            if content is not None:
                headers = [(k, v) for k, v in headers if k != b"content-length"]
                headers.append((b"content-length", str(len(content)).encode()))
                body = content
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        await self._app(scope, receive, reshaping_send)


def _reshaped_headers(start: AsgiMessage) -> list[tuple[bytes, bytes]]:
    return [(bytes(k), bytes(v)) for k, v in start.get("headers", [])]


def _anthropic_error_body(
    status: int, body: bytes, headers: list[tuple[bytes, bytes]]
) -> bytes | None:
    """The Anthropic body for an OpenAI-shaped JSON error; None to leave `body` as it is."""
    content_type = dict(headers).get(b"content-type", b"")
    if not content_type.startswith(b"application/json"):
        return None
    try:
        payload = json.loads(body)
    except ValueError:
        return None
    if not isinstance(payload, dict) or "error" not in payload or payload.get("type") == "error":
        return None  # not an OpenAI error body (Anthropic's already, perhaps)
    error = from_openai_error(status, payload)
    return json.dumps(error.body()).encode()


def install_anthropic_routes(app: FastAPI, pool: ModelPool, gateway: Gateway) -> None:
    """Add `POST /v1/messages` and `POST /v1/messages/count_tokens` to the manager's app,
    and the outermost middleware that gives the errors before them Anthropic's shape.

    They are left out of the OpenAPI schema: that documents OpenAI's error shape, and these
    routes answer in Anthropic's.
    """
    api = AnthropicApi(pool, gateway)
    app.add_middleware(AnthropicErrorShape)

    async def guarded(call: Callable[[], Awaitable[Response]]) -> Response:
        try:
            return await call()
        except AnthropicError as exc:
            return exc.response()
        except ApiError as exc:
            return from_openai_error(exc.status, exc.body(), exc.headers).response()
        except PoolError as exc:
            return from_pool_error(exc).response()
        except StarletteHTTPException:
            raise  # the body limit's 413, answered by the app's handlers
        except Exception:
            log.exception("unhandled error in an Anthropic route")
            return AnthropicError(500, "internal server error").response()

    @app.post(MESSAGES_PATH, response_model=None, include_in_schema=False)
    async def anthropic_messages(request: Request) -> Response:
        return await guarded(lambda: api.messages(request))

    @app.post(f"{MESSAGES_PATH}/count_tokens", response_model=None, include_in_schema=False)
    async def anthropic_count_tokens(request: Request) -> Response:
        return await guarded(lambda: api.count_tokens(request))
