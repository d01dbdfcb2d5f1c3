"""Turns OpenAI requests into engine jobs and engine output into OpenAI responses."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from model_service.activity import count_usage
from model_service.backends.base import (
    BackendError,
    GrammarFrame,
    PromptTooLong,
    RenderedPrompt,
    SamplingParams,
    TokenScore,
)
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
    ChoiceLogprobs,
    ChunkDelta,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    FunctionCall,
    FunctionCallDelta,
    PromptTokensDetails,
    ResponseFormat,
    SamplingFields,
    TokenLogprob,
    ToolCall,
    ToolCallDelta,
    TopLogprob,
    Usage,
    new_completion_id,
    unix_now,
)
from model_service.tools import (
    ArgumentsDelta,
    CallStart,
    Event,
    ToolPlan,
    ToolReplyParser,
    prompt_messages,
    read_reply,
    tool_results_as_user,
)

log = logging.getLogger(__name__)

# Bounds on a schema a reply is constrained to (`response_format`, tools), as OpenAI's
# structured outputs have them. Each enum value, const and anyOf/oneOf branch is an
# alternative the grammar tracks while the reply is at that point: one grammar check of
# the whole vocabulary costs ~0.1 ms per alternative (SmolLM2), and it runs on the engine
# thread, in every other request's step.
MAX_SCHEMA_ALTERNATIVES = 1000
MAX_SCHEMA_PROPERTIES = 5000
# Requests smaller than this are prepared on the event loop: rendering and tokenizing
# them costs less than the hop to a thread. Larger ones, and any with a schema or tools
# (a grammar to build), are prepared on a thread, so that no request stalls the others.
INLINE_PREPARE_CHARS = 16 * 1024


def check_schema_bounds(schema: Any, param: str) -> None:
    """Raises ApiError 400 for a schema with more alternatives or properties than the
    bounds above. The schema is JSON (its nesting is bounded by the body's)."""
    alternatives = properties = 0
    pending = [schema]
    while pending:
        node = pending.pop()
        if isinstance(node, list):
            pending.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        for key, value in node.items():
            if key == "enum" and isinstance(value, list):
                alternatives += len(value)
            elif key == "const":
                alternatives += 1
            elif key in ("anyOf", "oneOf") and isinstance(value, list):
                alternatives += len(value)
            elif key == "properties" and isinstance(value, dict):
                properties += len(value)
            if isinstance(value, dict | list):
                pending.append(value)
    if alternatives > MAX_SCHEMA_ALTERNATIVES:
        raise ApiError(
            400,
            f"Invalid schema for '{param}': it has {alternatives} enum values, consts and "
            f"anyOf/oneOf branches; at most {MAX_SCHEMA_ALTERNATIVES} are allowed.",
            param=param,
            code="schema_too_large",
        )
    if properties > MAX_SCHEMA_PROPERTIES:
        raise ApiError(
            400,
            f"Invalid schema for '{param}': it has {properties} object properties; at most "
            f"{MAX_SCHEMA_PROPERTIES} are allowed.",
            param=param,
            code="schema_too_large",
        )


def _prepared_inline(request: ChatCompletionRequest | CompletionRequest) -> bool:
    """Whether a request is small enough to prepare on the event loop."""
    if request.response_format is not None and request.response_format.type != "text":
        return False
    if isinstance(request, CompletionRequest):
        return len(request.prompt_text()) <= INLINE_PREPARE_CHARS
    if request.tools:
        return False
    size = 0
    for message in request.messages:
        size += len(message.text()) + 64  # the template's own text around each
        if size > INLINE_PREPARE_CHARS:
            return False
    return True


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
    tools: ToolPlan | None = None  # set when the reply is read as tool calls
    reply_opening: str = ""  # the reply's start, put in the prompt (see ToolPlan)
    n: int = 1  # choices: sequences generated side by side

    @property
    def scored(self) -> bool:
        """Whether the reply reports logprobs."""
        return self.params.top_logprobs is not None


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
        schema: dict[str, Any] | None,
        top_logprobs: int | None,
        tools: ToolPlan | None = None,
        primed: tuple[int, ...] = (),
        frame: GrammarFrame | None = None,
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
        if schema:
            check_schema_bounds(schema, "tools" if tools is not None else "response_format")
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
            json_schema=schema,
            json_frame=frame,
            top_logprobs=top_logprobs,
            grammar_primed=primed,
        )
        try:
            self._backend.check_sampling(params)
        except BackendError as exc:
            param = "tools" if tools is not None else "response_format"
            raise ApiError(400, str(exc), param=param, code="invalid_value") from exc
        stop = prompt.stop + request.stop_sequences()
        return Prepared(prompt, params, max_tokens, stop=stop, tools=tools, n=request.n)

    def _submit(self, prepared: Prepared) -> GenerationStream:
        return self.engine.submit(
            prepared.prompt.tokens, prepared.params, prepared.max_tokens, prepared.stop
        )

    def render_chat(self, request: ChatCompletionRequest) -> tuple[RenderedPrompt, ToolPlan | None]:
        """The prompt for a chat request, and its tool plan (None without tools)."""
        self._check_model(request.model)
        answer_schema = _schema_of(request.response_format)
        native = self._backend.tool_format
        if answer_schema is not None and request.tool_choice in (None, "auto"):
            native = "generic"  # a free native reply could not be held to the schema
        plan = ToolPlan.from_request(
            request, answer_schema, "hermes" if native == "hermes" else "generic"
        )
        messages = prompt_messages(request, plan)
        tools = plan.template_tools() if plan and plan.format == "hermes" and plan.active else None
        if prompts_may_be_logged():
            log.debug("chat prompt", extra={"messages": messages})
        try:
            prompt = self._backend.render_chat(messages, tools)
        except PromptTooLong as exc:
            raise _too_long(exc, "messages") from exc
        except BackendError as exc:
            # Some templates know no `tool` role: tell them the results as the user.
            if not any(m["role"] == "tool" for m in messages):
                raise ApiError(400, str(exc), param="messages", code="invalid_value") from exc
            try:
                prompt = self._backend.render_chat(tool_results_as_user(messages), tools)
            except BackendError as again:
                raise ApiError(400, str(again), param="messages", code="invalid_value") from exc
        return prompt, plan

    def prepare_chat(self, request: ChatCompletionRequest) -> Prepared:
        prompt, plan = self.render_chat(request)
        schema = _schema_of(request.response_format)
        opening = ""
        primed: list[int] = []
        frame = None
        if plan is not None and plan.constrained:
            schema, frame = plan.schema(), plan.frame()
            opening = plan.reply_opening()
            primed = self._backend.tokenize(opening, bos=False) if opening else []
            prompt = RenderedPrompt(tokens=prompt.tokens + primed, stop=prompt.stop)
        elif plan is None or not plan.active:
            plan = None
        if request.top_logprobs is not None and not request.logprobs:
            raise ApiError(
                400,
                "top_logprobs needs logprobs set to true",
                param="top_logprobs",
                code="invalid_value",
            )
        top_logprobs = (request.top_logprobs or 0) if request.logprobs else None
        prepared = self._prepare(
            request, prompt, request.token_limit(), schema, top_logprobs, plan, tuple(primed), frame
        )
        prepared.reply_opening = opening
        return prepared

    def count_chat_tokens(self, request: ChatCompletionRequest) -> int:
        """How many tokens the request's prompt takes (messages, tools and template)."""
        prompt, _ = self.render_chat(request)
        return len(prompt.tokens)

    async def count_tokens(self, request: ChatCompletionRequest) -> int:
        """`count_chat_tokens`, off the event loop for a large request."""
        if _prepared_inline(request):
            return self.count_chat_tokens(request)
        return await asyncio.to_thread(self.count_chat_tokens, request)

    async def _prepared(self, request: ChatCompletionRequest | CompletionRequest) -> Prepared:
        """The request rendered, tokenized and checked (its grammar built): on a thread
        unless it is small, so that a large one never stalls the event loop (the other
        requests, /health). The backend's vocabulary is read-only: safe beside the
        engine thread."""
        if isinstance(request, ChatCompletionRequest):
            if _prepared_inline(request):
                return self.prepare_chat(request)
            return await asyncio.to_thread(self.prepare_chat, request)
        if _prepared_inline(request):
            return self.prepare_completion(request)
        return await asyncio.to_thread(self.prepare_completion, request)

    def prepare_completion(self, request: CompletionRequest) -> Prepared:
        self._check_model(request.model)
        try:
            prompt = RenderedPrompt(tokens=self._backend.tokenize(request.prompt_text()))
        except PromptTooLong as exc:
            raise _too_long(exc, "prompt") from exc
        schema = _schema_of(request.response_format)
        return self._prepare(request, prompt, request.token_limit(), schema, request.logprobs)

    # --- running a request -----------------------------------------------------------------

    def _timeout_error(self) -> ApiError:
        return ApiError(
            504,
            f"The request did not finish within {self._timeout:g} seconds "
            "(the model's timeout_seconds); its generation was stopped.",
            type="timeout_error",
            code="timeout",
        )

    async def _generate(self, prepared: Prepared) -> Generated:
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
        return Generated(text, stream.result, stream.scores)

    async def _generate_choices(self, prepared: Prepared) -> list[Generated]:
        """`n` sequences of one prompt, generated side by side (one batch)."""
        started = time.perf_counter()
        if prepared.n == 1:
            generated = [await self._generate(prepared)]
        else:
            generated = list(await asyncio.gather(*map(self._generate, _choices(prepared))))
        for one in generated:
            self._metrics.observe_generation(started, None, one.result)
        return generated

    async def open_stream(self, prepared: Prepared, framers: list[Framer]) -> StreamHandle:
        """Take a slot for each choice (waiting in the queue), then hand back the SSE
        frames to send.

        Raises ApiError 429 (queue full) or 504 (no slot before the deadline). The caller
        must call `StreamHandle.close()` when the response is over, sent or not.
        """
        deadline = asyncio.get_running_loop().time() + self._timeout
        taken = 0
        try:
            async with asyncio.timeout_at(deadline):
                for _ in framers:
                    await self.admission.acquire()
                    taken += 1
        except BaseException as exc:
            for _ in range(taken):
                self.admission.release()
            if isinstance(exc, TimeoutError):
                raise self._timeout_error() from None
            raise

        def release() -> None:
            for _ in framers:
                self.admission.release()

        return StreamHandle(self._frames(prepared, framers, deadline), release)

    async def _frames(
        self, prepared: Prepared, framers: list[Framer], deadline: float
    ) -> AsyncIterator[bytes]:
        started = time.perf_counter()
        first_token_at: float | None = None
        streams = [self._submit(choice) for choice in _choices(prepared)]
        for framer in framers:
            for frame in framer.opening():
                yield frame
        try:
            async with asyncio.timeout_at(deadline):
                async for index, piece, scores in _interleaved(streams):
                    if first_token_at is None:
                        first_token_at = time.perf_counter()
                    if piece is None:  # choice `index` is over
                        yield framers[index].finish(_result(streams[index]))
                        continue
                    frame = framers[index].piece(piece, scores)
                    if frame:
                        yield frame
        except TimeoutError:
            yield _sse(json.dumps(self._timeout_error().body()))
            return
        except EngineError as exc:
            yield _sse(json.dumps(_engine_error(exc).body()))
            return
        finally:
            for stream in streams:
                stream.cancel()
                if stream.result is None:  # cut off (stopped, timed out, client gone)
                    used = stream.used()
                    count_usage(used.prompt_tokens, used.completion_tokens, used.cached_tokens)
        results = [_result(stream) for stream in streams]
        for result in results:
            self._metrics.observe_generation(started, first_token_at, result)
        if framers[0].include_usage:
            yield framers[0].usage(_usage(results))
        yield SSE_DONE

    # --- chat -------------------------------------------------------------------------------

    async def chat(self, request: ChatCompletionRequest) -> ChatCompletion:
        prepared = await self._prepared(request)
        generated = await self._generate_choices(prepared)
        return ChatCompletion(
            id=new_completion_id("chatcmpl"),
            created=unix_now(),
            model=self.model_id,
            choices=[
                self._chat_choice(index, one, prepared) for index, one in enumerate(generated)
            ],
            usage=_usage([one.result for one in generated]),
        )

    def _chat_choice(self, index: int, one: Generated, prepared: Prepared) -> ChatChoice:
        message = AssistantMessage(content=one.text)
        finish: ChoiceFinish = one.result.finish_reason
        if prepared.tools is not None:
            reply = read_reply(prepared.reply_opening + one.text, prepared.tools.format)
            calls = [
                ToolCall(id=c.id, function=FunctionCall(name=c.name or "", arguments=c.arguments))
                for c in reply.calls
            ]
            message = AssistantMessage(content=reply.content, tool_calls=calls or None)
            if calls and finish == "stop":
                finish = "tool_calls"
        logprobs = None
        if prepared.scored:
            logprobs = chat_logprobs(one.scores, self._backend.token_bytes)
        return ChatChoice(index=index, message=message, finish_reason=finish, logprobs=logprobs)

    async def chat_stream(self, request: ChatCompletionRequest) -> StreamHandle:
        prepared = await self._prepared(request)
        response_id = new_completion_id("chatcmpl")
        framers: list[Framer] = [
            ChatFramer(
                self.model_id,
                request,
                response_id,
                self._backend.token_bytes,
                index,
                prepared.tools,
                prepared.reply_opening,
            )
            for index in range(prepared.n)
        ]
        return await self.open_stream(prepared, framers)

    # --- completions ------------------------------------------------------------------------

    async def complete(self, request: CompletionRequest) -> Completion:
        prepared = await self._prepared(request)
        generated = await self._generate_choices(prepared)
        echo = request.prompt_text() if request.echo else ""
        choices = []
        for index, one in enumerate(generated):
            logprobs = None
            if prepared.scored:
                logprobs = legacy_logprobs(one.scores, len(echo), self._backend.token_bytes)
            choices.append(
                CompletionChoice(
                    index=index,
                    text=echo + one.text,
                    finish_reason=one.result.finish_reason,
                    logprobs=logprobs,
                )
            )
        return Completion(
            id=new_completion_id("cmpl"),
            created=unix_now(),
            model=self.model_id,
            choices=choices,
            usage=_usage([one.result for one in generated]),
        )

    async def complete_stream(self, request: CompletionRequest) -> StreamHandle:
        prepared = await self._prepared(request)
        response_id = new_completion_id("cmpl")
        framers: list[Framer] = [
            CompletionFramer(self.model_id, request, response_id, self._backend.token_bytes, index)
            for index in range(prepared.n)
        ]
        return await self.open_stream(prepared, framers)


ChoiceFinish = FinishReason | Literal["tool_calls"]


@dataclass
class Generated:
    """One choice's whole text, how it ended, and its tokens' scores (if asked for)."""

    text: str
    result: Finished
    scores: list[TokenScore]


def _choices(prepared: Prepared) -> list[Prepared]:
    """The request once per choice; with a seed, choice i samples with seed + i."""
    if prepared.n == 1:
        return [prepared]
    seed = prepared.params.seed
    return [
        replace(
            prepared,
            n=1,
            params=replace(prepared.params, seed=None if seed is None else seed + index),
        )
        for index in range(prepared.n)
    ]


async def _interleaved(
    streams: list[GenerationStream],
) -> AsyncIterator[tuple[int, str | None, list[TokenScore]]]:
    """(choice, piece, new scores) as each stream produces them; piece None: it ended.

    Raises the first stream's EngineError."""
    if len(streams) == 1:
        stream = streams[0]
        seen = 0
        async for piece in stream.pieces():
            yield 0, piece, stream.scores[seen:]
            seen = len(stream.scores)
        yield 0, None, []
        return
    merged: asyncio.Queue[tuple[int, str | None, list[TokenScore]] | EngineError] = asyncio.Queue()

    async def pump(index: int, stream: GenerationStream) -> None:
        seen = 0
        try:
            async for piece in stream.pieces():
                merged.put_nowait((index, piece, stream.scores[seen:]))
                seen = len(stream.scores)
            merged.put_nowait((index, None, []))
        except EngineError as exc:
            merged.put_nowait(exc)

    pumps = [asyncio.create_task(pump(i, stream)) for i, stream in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            item = await merged.get()
            if isinstance(item, EngineError):
                raise item
            if item[1] is None:
                remaining -= 1
            yield item
    finally:
        for task in pumps:
            task.cancel()


def _result(stream: GenerationStream) -> Finished:
    assert stream.result is not None
    return stream.result


@dataclass
class StreamHandle:
    """SSE frames for one streamed response, and what to do when the response ends."""

    frames: AsyncIterator[bytes]
    close: Callable[[], None]


class Framer:
    """Shapes one choice's SSE frames (chat and completions differ)."""

    def __init__(
        self,
        model_id: str,
        include_usage: bool,
        response_id: str,
        token_bytes: TokenBytes,
        index: int,
    ) -> None:
        self.model_id = model_id
        self.include_usage = include_usage
        self.id = response_id  # shared by every choice of one response
        self.index = index
        self.created = unix_now()
        self._token_bytes = token_bytes

    def opening(self) -> list[bytes]:
        return []

    def piece(self, text: str, scores: list[TokenScore]) -> bytes:
        raise NotImplementedError

    def finish(self, result: Finished) -> bytes:
        raise NotImplementedError

    def usage(self, usage: Usage) -> bytes:
        raise NotImplementedError


class ChatFramer(Framer):
    def __init__(
        self,
        model_id: str,
        request: ChatCompletionRequest,
        response_id: str,
        token_bytes: TokenBytes,
        index: int = 0,
        tools: ToolPlan | None = None,
        reply_opening: str = "",
    ) -> None:
        options = request.stream_options
        include_usage = bool(options and options.include_usage)
        super().__init__(model_id, include_usage, response_id, token_bytes, index)
        self._logprobs = request.logprobs
        # With tools, the reply is JSON to read: its text and calls become deltas.
        self._parser = ToolReplyParser(tools.format) if tools is not None else None
        self._reply_opening = reply_opening

    def _chunk(
        self,
        delta: ChunkDelta,
        finish: ChoiceFinish | None = None,
        usage: Usage | None = None,
        logprobs: ChoiceLogprobs | None = None,
    ) -> bytes:
        choices = (
            []
            if usage
            else [
                ChatChunkChoice(
                    index=self.index, delta=delta, finish_reason=finish, logprobs=logprobs
                )
            ]
        )
        body = ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model_id, choices=choices, usage=usage
        )
        return _sse(body.model_dump_json(exclude_none=usage is None))

    def opening(self) -> list[bytes]:
        frames = [self._chunk(ChunkDelta(role="assistant", content=""))]
        if self._parser is not None:  # the reply's fixed start (say, a named call's name)
            delta = self._tool_delta(self._parser.feed(self._reply_opening))
            if delta is not None:
                frames.append(self._chunk(delta))
        return frames

    def piece(self, text: str, scores: list[TokenScore]) -> bytes:
        logprobs = None
        if self._logprobs and scores:
            logprobs = chat_logprobs(scores, self._token_bytes)
        if self._parser is None:
            return self._chunk(ChunkDelta(content=text), logprobs=logprobs)
        delta = self._tool_delta(self._parser.feed(text))
        if delta is None:
            return self._chunk(ChunkDelta(), logprobs=logprobs) if logprobs else b""
        return self._chunk(delta, logprobs=logprobs)

    @staticmethod
    def _tool_delta(events: list[Event]) -> ChunkDelta | None:
        """What a piece of a tool reply said, as one delta: text and call fragments."""
        content = "".join(e for e in events if isinstance(e, str)) or None
        deltas: list[ToolCallDelta] = []
        for event in events:
            if isinstance(event, CallStart):
                deltas.append(
                    ToolCallDelta(
                        index=event.index,
                        id=event.id,
                        type="function",
                        function=FunctionCallDelta(name=event.name, arguments=""),
                    )
                )
            elif isinstance(event, ArgumentsDelta):
                last = deltas[-1] if deltas else None
                if last is not None and last.index == event.index:
                    last.function.arguments = (last.function.arguments or "") + event.text
                else:
                    function = FunctionCallDelta(arguments=event.text)
                    deltas.append(ToolCallDelta(index=event.index, function=function))
        if content is None and not deltas:
            return None
        return ChunkDelta(content=content, tool_calls=deltas or None)

    def finish(self, result: Finished) -> bytes:
        finish: ChoiceFinish = result.finish_reason
        held = b""
        if self._parser is not None:
            delta = self._tool_delta(self._parser.finish())  # text held back at the end
            held = self._chunk(delta) if delta is not None else b""
            if self._parser.finished_calls() and finish == "stop":
                finish = "tool_calls"
        return held + self._chunk(ChunkDelta(), finish)

    def usage(self, usage: Usage) -> bytes:
        return self._chunk(ChunkDelta(), usage=usage)


class CompletionFramer(Framer):
    def __init__(
        self,
        model_id: str,
        request: CompletionRequest,
        response_id: str,
        token_bytes: TokenBytes,
        index: int = 0,
    ) -> None:
        options = request.stream_options
        include_usage = bool(options and options.include_usage)
        super().__init__(model_id, include_usage, response_id, token_bytes, index)
        self._echo = request.prompt_text() if request.echo else None
        self._logprobs = request.logprobs is not None
        self._offset = len(self._echo or "")

    def _chunk(
        self,
        text: str,
        finish: FinishReason | None = None,
        usage: Usage | None = None,
        logprobs: CompletionLogprobs | None = None,
    ) -> bytes:
        choices = (
            []
            if usage
            else [
                CompletionChoice(
                    index=self.index, text=text, finish_reason=finish, logprobs=logprobs
                )
            ]
        )
        body = Completion(
            id=self.id, created=self.created, model=self.model_id, choices=choices, usage=usage
        )
        return _sse(body.model_dump_json(exclude_none=usage is None))

    def opening(self) -> list[bytes]:
        return [self._chunk(self._echo)] if self._echo else []

    def piece(self, text: str, scores: list[TokenScore]) -> bytes:
        logprobs = None
        if self._logprobs and scores:
            logprobs = legacy_logprobs(scores, self._offset, self._token_bytes)
            self._offset += sum(len(token) for token in logprobs.tokens)
        if not text and logprobs is None:
            return b""
        return self._chunk(text, logprobs=logprobs)

    def finish(self, result: Finished) -> bytes:
        return self._chunk("", result.finish_reason)

    def usage(self, usage: Usage) -> bytes:
        return self._chunk("", usage=usage)


TokenBytes = Callable[[int], bytes]


def _token_text(token_bytes: TokenBytes, token: int) -> tuple[str, list[int]]:
    raw = token_bytes(token)
    return raw.decode("utf-8", errors="replace"), list(raw)


def chat_logprobs(scores: list[TokenScore], token_bytes: TokenBytes) -> ChoiceLogprobs:
    """Chat's logprobs: each token, its log-probability, and the likeliest others."""
    entries = []
    for score in scores:
        text, raw = _token_text(token_bytes, score.token)
        top = []
        for token, logprob in score.top:
            alt_text, alt_raw = _token_text(token_bytes, token)
            top.append(TopLogprob(token=alt_text, logprob=logprob, bytes=alt_raw))
        entries.append(TokenLogprob(token=text, logprob=score.logprob, bytes=raw, top_logprobs=top))
    return ChoiceLogprobs(content=entries)


def legacy_logprobs(
    scores: list[TokenScore], offset: int, token_bytes: TokenBytes
) -> CompletionLogprobs:
    """Completions' logprobs: parallel lists, as the legacy API has them."""
    tokens, offsets = [], []
    for score in scores:
        text, _ = _token_text(token_bytes, score.token)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
    return CompletionLogprobs(
        tokens=tokens,
        token_logprobs=[score.logprob for score in scores],
        top_logprobs=[
            {_token_text(token_bytes, token)[0]: logprob for token, logprob in score.top}
            for score in scores
        ],
        text_offset=offsets,
    )


def _usage(results: list[Finished]) -> Usage:
    """One response's usage: the prompt once, every choice's completion."""
    first = results[0]
    completion = sum(result.completion_tokens for result in results)
    return Usage(
        prompt_tokens=first.prompt_tokens,
        completion_tokens=completion,
        total_tokens=first.prompt_tokens + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=first.cached_tokens),
    )


def _too_long(exc: PromptTooLong, param: str) -> ApiError:
    return ApiError(400, str(exc), param=param, code="context_length_exceeded")


def _engine_error(exc: EngineError) -> ApiError:
    if exc.code == "model_unloaded":
        return ApiError(
            503, str(exc), type="server_error", code=exc.code, headers={"Retry-After": "1"}
        )
    return ApiError(500, f"generation failed: {exc}", type="server_error", code=exc.code)
