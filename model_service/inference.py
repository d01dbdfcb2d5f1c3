"""Turns OpenAI requests into engine jobs and engine output into OpenAI responses."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from model_service.backends.base import BackendError, RenderedPrompt, SamplingParams
from model_service.engine import Engine, EngineError, Finished, FinishReason, GenerationStream
from model_service.errors import ApiError
from model_service.limits import Admission
from model_service.logs import prompts_may_be_logged
from model_service.metrics import WorkerMetrics
from model_service.protocol import (
    SSE_DONE,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChunkDelta,
    Completion,
    CompletionChoice,
    CompletionRequest,
    PromptTokensDetails,
    ResponseFormat,
    SamplingFields,
    Usage,
    new_completion_id,
    unix_now,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelDefaults:
    """Sampling defaults from the registry entry, used when a request leaves them out."""

    temperature: float = 0.8
    top_p: float = 0.95
    max_tokens: int | None = None

    @classmethod
    def from_settings(cls, raw: dict[str, Any] | None) -> ModelDefaults:
        raw = raw or {}
        return cls(**{k: raw[k] for k in ("temperature", "top_p", "max_tokens") if k in raw})


@dataclass
class Prepared:
    """A validated request, ready for the engine."""

    prompt: RenderedPrompt
    params: SamplingParams
    max_tokens: int
    stop: list[str] = field(default_factory=list)


def _schema_of(response_format: ResponseFormat | None) -> dict[str, Any] | None:
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return {}
    if response_format.json_schema is None:
        raise ApiError(
            400,
            "response_format.json_schema is required when type is 'json_schema'",
            param="response_format.json_schema",
            code="invalid_value",
        )
    return response_format.json_schema.json_schema


def _sse(payload: str) -> bytes:
    return f"data: {payload}\n\n".encode()


class InferenceService:
    """The worker's request logic. Methods raise ApiError for anything the client got wrong."""

    def __init__(
        self,
        model_id: str,
        engine: Engine,
        defaults: ModelDefaults,
        metrics: WorkerMetrics,
        admission: Admission,
        timeout_seconds: float,
        aliases: frozenset[str] = frozenset(),
    ) -> None:
        self.model_id = model_id
        self.admission = admission
        self._timeout = timeout_seconds
        self.engine = engine
        self._backend = engine.backend
        self._defaults = defaults
        self._metrics = metrics
        self._names = frozenset({model_id, *aliases})

    # --- request preparation ------------------------------------------------------------

    def _check_model(self, name: str) -> None:
        if name not in self._names:
            raise ApiError(
                404,
                f"The model '{name}' is not served here; this worker serves '{self.model_id}'",
                param="model",
                code="model_not_found",
            )

    def _prepare(
        self,
        request: SamplingFields,
        prompt: RenderedPrompt,
        requested_max: int | None,
        response_format: ResponseFormat | None,
    ) -> Prepared:
        context = self._backend.context_length
        prompt_tokens = len(prompt.tokens)
        if prompt_tokens == 0:
            raise ApiError(400, "The prompt is empty.", param="prompt", code="invalid_value")
        if prompt_tokens >= context:
            raise ApiError(
                400,
                f"This model's maximum context length is {context} tokens, but the prompt "
                f"has {prompt_tokens} tokens. Shorten the prompt.",
                param="messages",
                code="context_length_exceeded",
            )
        if requested_max is not None and requested_max > context:
            raise ApiError(
                400,
                f"max_tokens is too large: {requested_max}. This model's maximum context "
                f"length is {context} tokens.",
                param="max_tokens",
                code="invalid_value",
            )
        max_tokens = requested_max or self._defaults.max_tokens or context - prompt_tokens
        params = SamplingParams(
            temperature=(
                request.temperature
                if request.temperature is not None
                else self._defaults.temperature
            ),
            top_p=request.top_p if request.top_p is not None else self._defaults.top_p,
            seed=request.seed,
            presence_penalty=request.presence_penalty or 0.0,
            frequency_penalty=request.frequency_penalty or 0.0,
            json_schema=_schema_of(response_format),
        )
        try:
            self._backend.check_sampling(params)
        except BackendError as exc:
            raise ApiError(400, str(exc), param="response_format", code="invalid_value") from exc
        return Prepared(prompt, params, max_tokens, stop=prompt.stop + request.stop_sequences())

    def _submit(self, prepared: Prepared) -> GenerationStream:
        return self.engine.submit(
            prepared.prompt.tokens, prepared.params, prepared.max_tokens, prepared.stop
        )

    def prepare_chat(self, request: ChatCompletionRequest) -> Prepared:
        self._check_model(request.model)
        messages = [{"role": m.role, "content": m.text()} for m in request.messages]
        if prompts_may_be_logged():
            log.debug("chat prompt", extra={"messages": messages})
        try:
            prompt = self._backend.render_chat(messages)
        except BackendError as exc:
            raise ApiError(400, str(exc), param="messages", code="invalid_value") from exc
        return self._prepare(request, prompt, request.token_limit(), request.response_format)

    def prepare_completion(self, request: CompletionRequest) -> Prepared:
        self._check_model(request.model)
        prompt = RenderedPrompt(tokens=self._backend.tokenize(request.prompt_text()))
        return self._prepare(request, prompt, request.token_limit(), request.response_format)

    # --- running a request -----------------------------------------------------------------

    def _timeout_error(self) -> ApiError:
        return ApiError(
            504,
            f"The request did not finish within {self._timeout:g} seconds "
            "(the model's timeout_seconds); its generation was stopped.",
            type="timeout_error",
            code="timeout",
        )

    async def _generate(self, prepared: Prepared) -> tuple[str, Finished]:
        """Queue for a slot, generate, collect. Raises ApiError 429/504/500."""
        try:
            async with asyncio.timeout(self._timeout), self.admission.slot():
                stream = self._submit(prepared)
                text = await stream.text()
        except TimeoutError:
            raise self._timeout_error() from None
        except EngineError as exc:
            raise _engine_error(exc) from exc
        assert stream.result is not None
        return text, stream.result

    async def open_stream(self, prepared: Prepared, framer: Framer) -> StreamHandle:
        """Take a slot (waiting in the queue), then hand back the SSE frames to send.

        Raises ApiError 429 (queue full) or 504 (no slot before the deadline). The caller
        must call `StreamHandle.close()` when the response is over, sent or not.
        """
        deadline = asyncio.get_running_loop().time() + self._timeout
        try:
            async with asyncio.timeout_at(deadline):
                await self.admission.acquire()
        except TimeoutError:
            raise self._timeout_error() from None
        return StreamHandle(self._frames(prepared, framer, deadline), self.admission.release)

    async def _frames(
        self, prepared: Prepared, framer: Framer, deadline: float
    ) -> AsyncIterator[bytes]:
        started = time.perf_counter()
        first_token_at: float | None = None
        stream = self._submit(prepared)
        for frame in framer.opening():
            yield frame
        try:
            async with asyncio.timeout_at(deadline):
                async for piece in stream.pieces():
                    if first_token_at is None:
                        first_token_at = time.perf_counter()
                    yield framer.piece(piece)
        except TimeoutError:
            yield _sse(json.dumps(self._timeout_error().body()))
            return
        except EngineError as exc:
            yield _sse(json.dumps(_engine_error(exc).body()))
            return
        result = stream.result
        assert result is not None
        self._metrics.observe_generation(started, first_token_at, result)
        for frame in framer.closing(result):
            yield frame
        yield SSE_DONE

    # --- chat -------------------------------------------------------------------------------

    async def chat(self, request: ChatCompletionRequest) -> ChatCompletion:
        prepared = self.prepare_chat(request)
        started = time.perf_counter()
        text, result = await self._generate(prepared)
        self._metrics.observe_generation(started, None, result)
        return ChatCompletion(
            id=new_completion_id("chatcmpl"),
            created=unix_now(),
            model=self.model_id,
            choices=[
                ChatChoice(
                    message=AssistantMessage(content=text), finish_reason=result.finish_reason
                )
            ],
            usage=_usage(result),
        )

    async def chat_stream(self, request: ChatCompletionRequest) -> StreamHandle:
        prepared = self.prepare_chat(request)
        return await self.open_stream(prepared, ChatFramer(self.model_id, request))

    # --- completions ------------------------------------------------------------------------

    async def complete(self, request: CompletionRequest) -> Completion:
        prepared = self.prepare_completion(request)
        started = time.perf_counter()
        text, result = await self._generate(prepared)
        self._metrics.observe_generation(started, None, result)
        if request.echo:
            text = request.prompt_text() + text
        return Completion(
            id=new_completion_id("cmpl"),
            created=unix_now(),
            model=self.model_id,
            choices=[CompletionChoice(text=text, finish_reason=result.finish_reason)],
            usage=_usage(result),
        )

    async def complete_stream(self, request: CompletionRequest) -> StreamHandle:
        prepared = self.prepare_completion(request)
        return await self.open_stream(prepared, CompletionFramer(self.model_id, request))


@dataclass
class StreamHandle:
    """SSE frames for one streamed response, and what to do when the response ends."""

    frames: AsyncIterator[bytes]
    close: Callable[[], None]


class Framer:
    """Shapes one streamed response's SSE frames (chat and completions differ)."""

    def __init__(self, model_id: str, include_usage: bool) -> None:
        self.model_id = model_id
        self.include_usage = include_usage
        self.created = unix_now()

    def opening(self) -> list[bytes]:
        return []

    def piece(self, text: str) -> bytes:
        raise NotImplementedError

    def closing(self, result: Finished) -> list[bytes]:
        raise NotImplementedError


class ChatFramer(Framer):
    def __init__(self, model_id: str, request: ChatCompletionRequest) -> None:
        options = request.stream_options
        super().__init__(model_id, bool(options and options.include_usage))
        self.id = new_completion_id("chatcmpl")

    def _chunk(
        self, delta: ChunkDelta, finish: FinishReason | None = None, usage: Usage | None = None
    ) -> bytes:
        choices = [] if usage else [ChatChunkChoice(delta=delta, finish_reason=finish)]
        body = ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model_id, choices=choices, usage=usage
        )
        return _sse(body.model_dump_json(exclude_none=usage is None))

    def opening(self) -> list[bytes]:
        return [self._chunk(ChunkDelta(role="assistant", content=""))]

    def piece(self, text: str) -> bytes:
        return self._chunk(ChunkDelta(content=text))

    def closing(self, result: Finished) -> list[bytes]:
        frames = [self._chunk(ChunkDelta(), result.finish_reason)]
        if self.include_usage:
            usage = _usage(result)
            frames.append(self._chunk(ChunkDelta(), usage=usage))
        return frames


class CompletionFramer(Framer):
    def __init__(self, model_id: str, request: CompletionRequest) -> None:
        options = request.stream_options
        super().__init__(model_id, bool(options and options.include_usage))
        self.id = new_completion_id("cmpl")
        self._echo = request.prompt_text() if request.echo else None

    def _chunk(
        self, text: str, finish: FinishReason | None = None, usage: Usage | None = None
    ) -> bytes:
        choices = [] if usage else [CompletionChoice(text=text, finish_reason=finish)]
        body = Completion(
            id=self.id, created=self.created, model=self.model_id, choices=choices, usage=usage
        )
        return _sse(body.model_dump_json(exclude_none=usage is None))

    def opening(self) -> list[bytes]:
        return [self._chunk(self._echo)] if self._echo else []

    def piece(self, text: str) -> bytes:
        return self._chunk(text)

    def closing(self, result: Finished) -> list[bytes]:
        frames = [self._chunk("", result.finish_reason)]
        if self.include_usage:
            frames.append(self._chunk("", usage=_usage(result)))
        return frames


def _usage(result: Finished) -> Usage:
    return Usage(
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
        total_tokens=result.prompt_tokens + result.completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=result.cached_tokens),
    )


def _engine_error(exc: EngineError) -> ApiError:
    if exc.code == "model_unloaded":
        return ApiError(
            503, str(exc), type="server_error", code=exc.code, headers={"Retry-After": "1"}
        )
    return ApiError(500, f"generation failed: {exc}", type="server_error", code=exc.code)
