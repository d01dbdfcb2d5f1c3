"""An Ollama-compatible subset of the API on the manager's port, so Ollama tools can use the pool.

Routes: `GET /api/version`, `GET /api/tags`, `GET /api/ps`, `POST /api/show`,
`POST /api/chat`, `POST /api/generate`, `POST /api/embed` and the older
`POST /api/embeddings`. Chat and generate are translated to the worker's OpenAI
`/v1/chat/completions` (or `/v1/completions` for `raw` generate), the embed routes to
`/v1/embeddings`, and sent through the gateway, so COLD models load on demand and a
model's fallback chain applies (`keep_alive` then applies to the model that answered);
the reply is translated back, a stream as Ollama's NDJSON (`"stream"` defaults to true,
as in Ollama). Errors use Ollama's shape, `{"error": "message"}`, with the HTTP status;
an error in the middle of a stream is one last `{"error": ...}` line. A client that goes
away closes the relayed stream, which stops the generation. The request and reply shapes,
and the 400s for malformed requests, are in `ollama_protocol.py`; this module decides what
the pool can serve and translates to and from OpenAI.

`keep_alive` (a Go duration such as "5m" or "1h30m", or seconds) maps onto the pool's TTL
once the request is over: a positive value sets the remaining TTL (capped at
max_ttl_minutes), 0 unloads the model (with drain), a negative value keeps it as long as
the pool allows (max_ttl_minutes). Unloading and shortening are an admin's actions: with
keys configured, a client key's keep_alive may only lengthen the TTL (0 and shorter values
are ignored). Warmup (pinned) models ignore keep_alive: they stay loaded.

Tools in `/api/chat` go both ways: the request's `tools` (Ollama's are OpenAI's function
tools) pass through, as does `tool_choice`, an extension (Ollama has none); history
`tool_calls` get their arguments as a JSON string and stable ids (`call_<turn>_<n>`), and
each `tool` message the id of the call it answers (its `tool_name`'s, else the next
unanswered one). Replies carry `message.tool_calls` with arguments as an object; a
stream gathers OpenAI's fragments and sends each call whole, once, as Ollama does.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from model_service.auth import Role, caller_role
from model_service.backends.base import BackendError
from model_service.errors import ApiError
from model_service.gguf import read_metadata
from model_service.secrets import redact_url
from pool_manager.gateway import JSON_REQUEST, Gateway
from pool_manager.ollama_protocol import (
    ChatReply,
    ChatRequest,
    EmbeddingsReply,
    EmbeddingsRequest,
    EmbedReply,
    EmbedRequest,
    ErrorReply,
    GenerateReply,
    GenerateRequest,
    Message,
    ModelDetails,
    OllamaError,
    OllamaReply,
    Options,
    PsEntry,
    PsReply,
    ReplyFunction,
    ReplyMessage,
    ReplyToolCall,
    ShowReply,
    ShowRequest,
    TagsEntry,
    TagsReply,
    ToolCall,
    VersionReply,
    parse_messages,
    parse_request,
)
from pool_manager.pool import ModelPool, ModelRecord, PoolError
from pool_manager.sse import close_stream, sse_payloads
from pool_manager.states import SERVING, ModelState

log = logging.getLogger(__name__)

# The Ollama API level these routes follow; tools check it against their minimum.
OLLAMA_VERSION = "0.12.0"
NDJSON = "application/x-ndjson"
NANOS = 1_000_000_000
# What Ollama reports for a model kept "forever" (negative keep_alive): now + max duration.
FOREVER = dt.timedelta(microseconds=(2**63 - 1) // 1000)
_PS_STATES = (ModelState.WARMING, ModelState.HOT, ModelState.COOLING)

# llama.cpp's `general.file_type` (enum llama_ftype) as Ollama names quantizations.
_FILE_TYPES = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    7: "Q8_0",
    8: "Q5_0",
    9: "Q5_1",
    10: "Q2_K",
    11: "Q3_K_S",
    12: "Q3_K_M",
    13: "Q3_K_L",
    14: "Q4_K_S",
    15: "Q4_K_M",
    16: "Q5_K_S",
    17: "Q5_K_M",
    18: "Q6_K",
    19: "IQ2_XXS",
    20: "IQ2_XS",
    21: "Q2_K_S",
    22: "IQ3_XS",
    23: "IQ3_XXS",
    24: "IQ1_S",
    25: "IQ4_NL",
    26: "IQ3_S",
    27: "IQ3_M",
    28: "IQ2_S",
    29: "IQ2_M",
    30: "IQ4_XS",
    31: "IQ1_M",
    32: "BF16",
    36: "TQ1_0",
    37: "TQ2_0",
    38: "MXFP4",
}


@dataclass
class _Call:
    """One /api/chat or /api/generate request, parsed, and the model it names."""

    started: float
    request: ChatRequest | GenerateRequest
    record: ModelRecord

    @property
    def name(self) -> str:
        return self.request.model


def _error_response(error: OllamaError) -> JSONResponse:
    return JSONResponse(ErrorReply(error=error.message).wire(), error.status, headers=error.headers)


# --- small translations ---------------------------------------------------------------------


def _now_iso() -> str:
    return _iso(dt.datetime.now(dt.UTC))


def _iso(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _response_format(value: str | dict[str, Any] | None) -> dict[str, Any] | None:
    """Ollama's `format` ("json" or a JSON schema) as OpenAI's `response_format`."""
    if not value:
        return None
    if isinstance(value, dict):
        return {"type": "json_schema", "json_schema": {"name": "response", "schema": value}}
    return {"type": "json_object"}  # "json": the only other value validation lets through


def _sampling(options: Options | None, record: ModelRecord) -> dict[str, Any]:
    """Ollama `options` as OpenAI sampling fields; options with no counterpart are ignored."""
    if options is None:
        return {}
    fields: dict[str, Any] = {}
    for name in ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty"):
        if getattr(options, name) is not None:
            fields[name] = getattr(options, name)
    if options.stop:
        fields["stop"] = [options.stop] if isinstance(options.stop, str) else options.stop
    num_predict = options.num_predict
    if num_predict is not None and num_predict > 0:
        # -1 (no limit) and -2 (fill the context) mean: up to the context
        fields["max_tokens"] = min(int(num_predict), record.spec.n_ctx)
    return fields


def _openai_error(reply: Response) -> OllamaError:
    """A worker's (or the gateway's) OpenAI-shaped error reply, in Ollama's shape."""
    message = f"request failed with status {reply.status_code}"
    try:
        payload = json.loads(bytes(reply.body))
        error = payload.get("error")
        if isinstance(error, dict) and error.get("message"):
            message = str(error["message"])
        elif isinstance(error, str):
            message = error
    except (ValueError, AttributeError):
        pass
    headers = {}
    if "retry-after" in reply.headers:
        headers["Retry-After"] = reply.headers["retry-after"]
    return OllamaError(reply.status_code, message, headers)


# --- model facts from the GGUF file -----------------------------------------------------------


@dataclass
class ModelFile:
    """What /api/tags and /api/show say about a model's weights."""

    path: Path | None = None
    size: int = 0
    modified: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        """Stable for one file version (path, size, mtime); not a hash of the contents."""
        if self.path is None:
            return hashlib.sha256(b"").hexdigest()
        stamp = f"{self.path}:{self.size}:{self.modified.timestamp()}"
        return hashlib.sha256(stamp.encode()).hexdigest()

    def details(self) -> ModelDetails:
        arch = self.metadata.get("general.architecture")
        file_type = self.metadata.get("general.file_type")
        return ModelDetails(
            format="gguf" if self.metadata else "",
            family=arch or "",
            families=[arch] if arch else None,
            parameter_size=self._parameter_size(),
            quantization_level=_FILE_TYPES.get(file_type, "") if file_type is not None else "",
        )

    def _parameter_size(self) -> str:
        label = self.metadata.get("general.size_label")
        if isinstance(label, str) and label:
            return label
        count = self.metadata.get("general.parameter_count")
        if isinstance(count, int) and count > 0:
            for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
                if count >= scale:
                    return f"{count / scale:.1f}{unit}".replace(".0", "")
            return str(count)
        return ""


def _read_model_file(path: Path | None) -> ModelFile:
    if path is None:
        return ModelFile()
    try:
        stat = path.stat()
    except OSError:
        return ModelFile()
    try:
        metadata = read_metadata(path)
    except BackendError:
        metadata = {}  # not (valid) GGUF: its load will say what is wrong
    modified = dt.datetime.fromtimestamp(stat.st_mtime, dt.UTC)
    return ModelFile(path, stat.st_size, modified, metadata)


# --- the routes --------------------------------------------------------------------------------


@dataclass
class _Usage:
    """What one generation reported, for the final Ollama message."""

    started: float  # perf_counter at the start of the request
    load_seconds: float = 0.0
    sent_at: float = 0.0  # when the request went to the worker
    first_piece_at: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"

    def final(self, piece: ChatReply | GenerateReply) -> ChatReply | GenerateReply:
        """`piece` made the last object: done, with the reason, counts and durations."""
        end = time.perf_counter()
        first = self.first_piece_at if self.first_piece_at is not None else end
        return piece.model_copy(
            update={
                "done": True,
                "done_reason": self.finish_reason,
                "total_duration": round((end - self.started) * NANOS),
                "load_duration": round(self.load_seconds * NANOS),
                "prompt_eval_count": self.prompt_tokens,
                "prompt_eval_duration": round(max(0.0, first - self.sent_at) * NANOS),
                "eval_count": self.completion_tokens,
                "eval_duration": round(max(0.0, end - first) * NANOS),
            }
        )


class OllamaApi:
    """The handlers; each returns a response, errors included, in Ollama's shape."""

    def __init__(self, pool: ModelPool, gateway: Gateway) -> None:
        self._pool = pool
        self._gateway = gateway
        self._tasks: set[asyncio.Task[Any]] = set()

    # --- shared ---------------------------------------------------------------------------

    def resolve(self, name: str | None) -> ModelRecord:
        """The model a client named: by id or alias, also with or without ":latest".

        Raises OllamaError: 400 when there is no name, 404 when no model has it.
        """
        if not name:
            raise OllamaError(400, "model is required")
        candidates = [name]
        tail = name.rsplit("/", 1)[-1]
        if name.endswith(":latest"):
            candidates.append(name.removesuffix(":latest"))
        elif ":" not in tail:
            candidates.append(f"{name}:latest")
        for candidate in candidates:
            try:
                return self._pool.resolve(candidate)
            except PoolError:
                continue
        raise OllamaError(404, f"model '{name}' not found")

    async def _model_file(self, record: ModelRecord) -> ModelFile:
        if not record.spec.is_local:
            return ModelFile()  # a remote backend's model: no file here
        try:
            # The pool resolves relative paths against the registry's folder.
            path: Path | None = Path(self._pool._model_file(record.spec))
        except PoolError:
            path = None
        return await asyncio.to_thread(_read_model_file, path)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _keep_alive_for(
        self, request: Request, record: ModelRecord, seconds: float | None
    ) -> float | None:
        """`keep_alive` as the caller's key may use it. Unloading and shortening a TTL are
        an admin's actions: from a client key, 0 and a value below the model's TTL (or
        what is left of it) are ignored; longer ones apply, within max_ttl_minutes."""
        if seconds is None or seconds < 0 or caller_role(request.scope) is Role.ADMIN:
            return seconds
        current = max(self._pool.ttl_seconds(record), self._pool.ttl_remaining(record) or 0.0)
        return seconds if seconds > current else None

    def apply_keep_alive(self, record: ModelRecord, seconds: float | None) -> None:
        """Map `keep_alive` onto the pool's TTL, after a request."""
        if seconds is None or self._pool.is_pinned(record) or record.state not in SERVING:
            return
        if seconds == 0:
            self._spawn(self._unload(record), f"ollama-unload:{record.model_id}")
            return
        if self._pool.ttl_remaining(record) is None:
            return  # never expires (auto_unload is off)
        cap = self._pool.config.max_ttl_minutes * 60.0
        wanted = cap if seconds < 0 else min(seconds, cap)
        try:
            self._pool.set_ttl_remaining(record.model_id, wanted)
        except PoolError as exc:
            log.debug("keep_alive not applied", extra={"model": record.model_id, "why": str(exc)})

    async def _unload(self, record: ModelRecord) -> None:
        try:
            await self._pool.unload(record.model_id)
        except PoolError as exc:
            log.warning(
                "keep_alive 0 unload failed", extra={"model": record.model_id, "why": str(exc)}
            )

    async def _load(self, record: ModelRecord) -> float:
        """Load the model if needed; returns the seconds it took."""
        if record.state in SERVING:
            return 0.0
        started = time.perf_counter()
        await self._pool.load_record(record)
        return time.perf_counter() - started

    async def _load_or_unload(
        self, name: str, record: ModelRecord, keep_alive: float | None, started: float, chat: bool
    ) -> ChatReply | GenerateReply:
        """Ollama's empty request: load the model, or with keep_alive 0, unload it."""
        reply = _piece(name, "", chat=chat)
        if keep_alive == 0:
            if not self._pool.is_pinned(record):
                await self._pool.unload(record.model_id)
            return reply.model_copy(update={"done": True, "done_reason": "unload"})
        load_seconds = await self._load(record)
        self.apply_keep_alive(record, keep_alive)
        return reply.model_copy(
            update={
                "done": True,
                "done_reason": "load",
                "total_duration": round((time.perf_counter() - started) * NANOS),
                "load_duration": round(load_seconds * NANOS),
            }
        )

    # --- read-only routes -------------------------------------------------------------------

    async def tags(self) -> TagsReply:
        models = []
        for record in self._pool.records():
            info = await self._model_file(record)
            models.append(
                TagsEntry(
                    name=record.model_id,
                    model=record.model_id,
                    modified_at=_iso(info.modified),
                    size=info.size,
                    digest=info.digest,
                    details=info.details(),
                )
            )
        return TagsReply(models=models)

    async def ps(self) -> PsReply:
        models = []
        now = dt.datetime.now(dt.UTC)
        for record in self._pool.records():
            if record.state not in _PS_STATES:
                continue
            info = await self._model_file(record)
            models.append(
                PsEntry(
                    name=record.model_id,
                    model=record.model_id,
                    size=self._pool.memory_rss_bytes(record) or record.memory_estimate,
                    digest=info.digest,
                    details=info.details(),
                    expires_at=_iso(now + self._expires_in(record)),
                    size_vram=self._pool.vram_bytes(record) or 0,
                    context_length=record.spec.n_ctx,
                )
            )
        return PsReply(models=models)

    def _expires_in(self, record: ModelRecord) -> dt.timedelta:
        """Until the pool will unload the model: TTL left plus the cooling grace period."""
        pool = self._pool
        if pool.is_pinned(record) or not pool.config.auto_unload:
            return FOREVER
        grace = pool.config.grace_period_seconds
        if record.state is ModelState.COOLING:
            seconds = pool.cooling_remaining(record) or 0.0
        elif record.state is ModelState.WARMING:
            seconds = pool.ttl_seconds(record) + grace
        else:
            seconds = (pool.ttl_remaining(record) or 0.0) + grace
        return dt.timedelta(seconds=seconds)

    async def show(self, request: Request) -> ShowReply:
        body = parse_request(ShowRequest, await request.body())
        record = self.resolve(body.model_name)
        info = await self._model_file(record)
        spec = record.spec
        metadata = info.metadata
        template = metadata.get("tokenizer.chat_template", "")
        model_info = {
            k: v
            for k, v in metadata.items()
            if k != "tokenizer.chat_template" and isinstance(v, int | float | str | bool)
        }
        parameters = [f"num_ctx {spec.n_ctx}"]
        parameters += [
            f"{key} {value}"
            for key, value in spec.defaults.items()
            if key in ("temperature", "top_p")
        ]
        if "max_tokens" in spec.defaults:
            parameters.append(f"num_predict {spec.defaults['max_tokens']}")
        source = info.path or spec.model_path or spec.package_file
        if not spec.is_local:
            base_url = redact_url(spec.base_url or self._pool.config.ollama_base_url)
            source = f"{spec.remote_model or spec.model_id} ({spec.backend} at {base_url})"
        modelfile = [
            f"# Modelfile for {spec.model_id}, served by the model pool manager",
            f"FROM {source}",
            *(f"PARAMETER {p}" for p in parameters),
        ]
        return ShowReply(
            license=str(metadata.get("general.license", "")),
            modelfile="\n".join(modelfile) + "\n",
            parameters="\n".join(parameters),
            template=template,
            details=info.details(),
            model_info=model_info,
            # Every chat model takes tools here (a grammar holds even a small model to them).
            capabilities=(
                ["embedding"] if spec.model_type == "embedding" else ["completion", "tools"]
            ),
            modified_at=_iso(info.modified),
        )

    # --- generation ---------------------------------------------------------------------------

    def _begin(
        self, started: float, body: ChatRequest | GenerateRequest, unsupported: dict[str, Any]
    ) -> _Call:
        """The model a request names; refuse the features we lack (feature: its value)."""
        record = self.resolve(body.model)
        for feature, value in unsupported.items():
            if value:
                raise OllamaError(400, f"model '{body.model}' does not support {feature}")
        return _Call(started, body, record)

    @staticmethod
    def _openai_body(call: _Call) -> dict[str, Any]:
        """The OpenAI request fields both routes share: model, sampling, format."""
        openai_body: dict[str, Any] = {
            "model": call.record.model_id,
            **_sampling(call.request.options, call.record),
        }
        response_format = _response_format(call.request.format)
        if response_format is not None:
            openai_body["response_format"] = response_format
        return openai_body

    async def chat(self, request: Request) -> Response:
        started = time.perf_counter()
        body = parse_request(ChatRequest, await request.body())
        call = self._begin(started, body, {"thinking": body.think})
        body.keep_alive = self._keep_alive_for(request, call.record, body.keep_alive)
        if not body.messages:
            reply = await self._load_or_unload(
                call.name, call.record, body.keep_alive, started, chat=True
            )
            return JSONResponse(reply.wire())
        openai_body = self._openai_body(call)
        openai_body["messages"] = _openai_messages(body.messages)
        if body.tools:
            openai_body["tools"] = [tool.model_dump(exclude_unset=True) for tool in body.tools]
        if body.tool_choice is not None:  # an extension: Ollama has none
            openai_body["tool_choice"] = body.tool_choice
        return await self._generate("/v1/chat/completions", openai_body, call, chat=True)

    async def generate(self, request: Request) -> Response:
        started = time.perf_counter()
        body = parse_request(GenerateRequest, await request.body())
        call = self._begin(
            started,
            body,
            {"images": body.images, "insert": body.suffix, "thinking": body.think},
        )
        body.keep_alive = self._keep_alive_for(request, call.record, body.keep_alive)
        if not body.prompt:
            reply = await self._load_or_unload(
                call.name, call.record, body.keep_alive, started, chat=False
            )
            return JSONResponse(reply.wire())
        openai_body = self._openai_body(call)
        record = call.record
        if body.raw:
            # No template: the prompt goes to the model as it is.
            path = "/v1/completions"
            openai_body["prompt"] = body.prompt
            if "max_tokens" not in openai_body:  # legacy completions default to 16 tokens
                limit = record.spec.defaults.get("max_tokens") or record.spec.n_ctx
                openai_body["max_tokens"] = min(int(limit), record.spec.n_ctx)
        else:
            path = "/v1/chat/completions"
            messages = []
            if body.system:
                messages.append({"role": "system", "content": body.system})
            messages.append({"role": "user", "content": body.prompt})
            openai_body["messages"] = messages
        return await self._generate(path, openai_body, call, chat=False)

    async def _generate(
        self,
        path: str,
        openai_body: dict[str, Any],
        call: _Call,
        *,
        chat: bool,
    ) -> Response:
        name, record, stream = call.name, call.record, call.request.stream
        keep_alive, started = call.request.keep_alive, call.started
        usage = _Usage(started)
        if stream:
            openai_body["stream"] = True
            openai_body["stream_options"] = {"include_usage": True}
        serving = {r.model_id for r in self._pool.records() if r.state in SERVING}
        sent_at = time.perf_counter()
        # The gateway loads the model (or falls back along its chain) and relays.
        reply = await self._gateway.relay(path, json.dumps(openai_body).encode(), JSON_REQUEST)
        if reply.status_code != 200:
            if isinstance(reply, StreamingResponse):
                await close_stream(reply.body_iterator)
            raise _openai_error(reply)
        record = self._served_by(reply, record)
        if record.model_id not in serving and record.load_seconds:
            usage.load_seconds = record.load_seconds
        usage.sent_at = sent_at + usage.load_seconds
        if isinstance(reply, StreamingResponse):
            pieces = _translate_stream(reply.body_iterator, name, usage, chat=chat)
            return StreamingResponse(
                self._then_keep_alive(pieces, record, keep_alive), media_type=NDJSON
            )
        payload = json.loads(bytes(reply.body))
        choice = payload["choices"][0]
        message = choice.get("message") or {}
        text = (message.get("content") if "message" in choice else choice["text"]) or ""
        reported = payload.get("usage") or {}
        usage.prompt_tokens = int(reported.get("prompt_tokens", 0))
        usage.completion_tokens = int(reported.get("completion_tokens", 0))
        usage.finish_reason = _done_reason(choice.get("finish_reason"))
        usage.first_piece_at = usage.sent_at  # one answer: no split between prompt and tokens
        self.apply_keep_alive(record, keep_alive)
        calls: list[dict[str, Any]] = []
        if chat:
            try:
                calls = [_ollama_call(call) for call in message.get("tool_calls") or []]
            except ValueError as exc:
                raise OllamaError(500, str(exc)) from None
        return JSONResponse(usage.final(_piece(name, text, chat=chat, calls=calls)).wire())

    # --- embeddings -------------------------------------------------------------------------

    async def embed(self, request: Request) -> EmbedReply:
        """POST /api/embed: `input` a string or a list of strings; `truncate` (default
        true) cuts inputs to the context, as Ollama does."""
        started = time.perf_counter()
        body = parse_request(EmbedRequest, await request.body())
        record = self.resolve(body.model)
        body.keep_alive = self._keep_alive_for(request, record, body.keep_alive)
        texts = body.texts
        if not texts:  # Ollama's way to load (or, with keep_alive 0, unload) a model
            loaded = await self._load_or_unload(
                body.model, record, body.keep_alive, started, chat=False
            )
            return EmbedReply(
                model=body.model,
                embeddings=[],
                total_duration=loaded.total_duration or 0,
                load_duration=loaded.load_duration or 0,
            )
        openai_body: dict[str, Any] = {
            "model": record.model_id,
            "input": texts,
            "truncate": body.truncate is not False,
        }
        if body.dimensions:  # 0: the model's own size, as in Ollama
            openai_body["dimensions"] = body.dimensions
        vectors, tokens, load_seconds = await self._embeddings(record, body.keep_alive, openai_body)
        return EmbedReply(
            model=body.model,
            embeddings=vectors,
            total_duration=round((time.perf_counter() - started) * NANOS),
            load_duration=round(load_seconds * NANOS),
            prompt_eval_count=tokens,
        )

    async def embeddings(self, request: Request) -> EmbeddingsReply:
        """POST /api/embeddings (Ollama's older route): one `prompt`, one `embedding`."""
        started = time.perf_counter()
        body = parse_request(EmbeddingsRequest, await request.body())
        record = self.resolve(body.model)
        body.keep_alive = self._keep_alive_for(request, record, body.keep_alive)
        if not body.prompt:
            await self._load_or_unload(body.model, record, body.keep_alive, started, chat=False)
            return EmbeddingsReply(embedding=[])
        openai_body = {"model": record.model_id, "input": [body.prompt]}
        vectors, _, _ = await self._embeddings(record, body.keep_alive, openai_body)
        return EmbeddingsReply(embedding=vectors[0])

    async def _embeddings(
        self,
        record: ModelRecord,
        keep_alive: float | None,
        openai_body: dict[str, Any],
    ) -> tuple[list[list[float]], int, float]:
        """Relay an OpenAI embeddings request: (vectors, prompt tokens, load seconds)."""
        serving = {r.model_id for r in self._pool.records() if r.state in SERVING}
        reply = await self._gateway.relay(
            "/v1/embeddings", json.dumps(openai_body).encode(), JSON_REQUEST
        )
        if reply.status_code != 200:
            if isinstance(reply, StreamingResponse):
                await close_stream(reply.body_iterator)
            raise _openai_error(reply)
        record = self._served_by(reply, record)
        load_seconds = 0.0 if record.model_id in serving else (record.load_seconds or 0.0)
        self.apply_keep_alive(record, keep_alive)
        payload = json.loads(bytes(reply.body))
        items = sorted(payload.get("data") or [], key=lambda item: int(item.get("index", 0)))
        tokens = int((payload.get("usage") or {}).get("prompt_tokens", 0))
        return [item["embedding"] for item in items], tokens, load_seconds

    def _served_by(self, reply: Response, record: ModelRecord) -> ModelRecord:
        """The model that answered: `record`, or a fallback of its chain."""
        served = reply.headers.get("x-pool-model")
        if served and served != record.model_id:
            try:
                return self._pool.get(served)
            except PoolError:
                pass
        return record

    async def _then_keep_alive(
        self, lines: AsyncIterator[bytes], record: ModelRecord, keep_alive: float | None
    ) -> AsyncIterator[bytes]:
        try:
            async for line in lines:
                yield line
        finally:
            await close_stream(lines)
            self.apply_keep_alive(record, keep_alive)


def _done_reason(finish_reason: Any) -> str:
    """OpenAI's finish_reason as Ollama's done_reason (Ollama says "stop" after tool calls)."""
    if not finish_reason or finish_reason == "tool_calls":
        return "stop"
    return str(finish_reason)


def _piece(
    name: str, text: str, *, chat: bool, calls: Sequence[dict[str, Any]] = ()
) -> ChatReply | GenerateReply:
    """One chat or generate object, not done: `text` (and a chat's tool calls)."""
    if not chat:
        return GenerateReply(model=name, created_at=_now_iso(), response=text)
    message = ReplyMessage(content=text)
    if calls:
        message.tool_calls = [ReplyToolCall.model_validate(call) for call in calls]
    return ChatReply(model=name, created_at=_now_iso(), message=message)


def _openai_messages(messages: Sequence[Message | dict[str, Any]]) -> list[dict[str, Any]]:
    """Ollama chat messages as OpenAI's, tool calls and tool results included.

    Raw messages (JSON objects) are parsed first: raises OllamaError 400 when one is not
    a message.

    Assistant `tool_calls` get ids (their own, else `call_<turn>_<n>`: the same history
    gets the same ids) and arguments as a JSON string; a `tool` message gets the id of
    the call it answers: its own `tool_call_id`, else the first unanswered call of the
    last assistant turn with its `tool_name`, else the first unanswered one.
    """
    out = []
    unanswered: list[tuple[str, str]] = []  # (id, function name) of the last turn's calls
    turn = 0
    for message in parse_messages(messages):
        item = _openai_message(message)
        if item["role"] == "assistant" and message.tool_calls:
            item["tool_calls"] = [
                _openai_call(call, turn, n) for n, call in enumerate(message.tool_calls)
            ]
            unanswered = [(c["id"], c["function"]["name"]) for c in item["tool_calls"]]
            turn += 1
        elif item["role"] == "tool":
            name = message.tool_name or message.name
            answered = next((c for c in unanswered if c[1] == name), None)
            if answered is None and unanswered:
                answered = unanswered[0]
            if answered is not None:
                unanswered.remove(answered)
            own = message.tool_call_id
            item["tool_call_id"] = own or (answered[0] if answered else f"call_{turn}_none")
            if name or answered:
                item["name"] = name or answered[1]  # type: ignore[index]
        out.append(item)
    return out


def _openai_call(call: ToolCall, turn: int, n: int) -> dict[str, Any]:
    arguments = call.function.arguments
    if arguments is None:
        arguments = {}
    return {
        "id": call.id or f"call_{turn}_{n}",
        "type": "function",
        "function": {
            "name": call.function.name,
            "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments),
        },
    }


def _ollama_call(call: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI tool call as Ollama's: `{"function": {"name", "arguments": {...}}}`.

    Raises ValueError when the arguments are not a JSON object.
    """
    function = call.get("function") or {}
    text = function.get("arguments") or "{}"
    try:
        arguments = json.loads(text) if isinstance(text, str) else text
    except ValueError:
        arguments = None
    if not isinstance(arguments, dict):
        raise ValueError(
            f"the model's call of {function.get('name')!r} has arguments that are not a JSON object"
        )
    name = str(function.get("name") or "")
    return ReplyToolCall(function=ReplyFunction(name=name, arguments=arguments)).wire()


class _StreamedCalls:
    """OpenAI's streamed `delta.tool_calls` fragments, gathered into whole calls.

    A call is whole once a fragment of a later call arrives, or the choice finishes.
    """

    def __init__(self) -> None:
        self._calls: dict[int, dict[str, Any]] = {}
        self._sent: set[int] = set()

    def add(self, fragments: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Take a chunk's fragments; return the calls they show to be whole."""
        whole = []
        for fragment in fragments:
            index = int(fragment.get("index", 0))
            whole += self._take(below=index)
            call = self._calls.setdefault(index, {"function": {"name": "", "arguments": ""}})
            function = fragment.get("function") or {}
            if function.get("name"):
                call["function"]["name"] = function["name"]
            call["function"]["arguments"] += function.get("arguments") or ""
        return whole

    def rest(self) -> list[dict[str, Any]]:
        """The calls not sent yet (the choice has finished)."""
        return self._take(below=None)

    def _take(self, below: int | None) -> list[dict[str, Any]]:
        """The unsent calls with an index under `below` (None: all), marked sent."""
        ready = [
            i for i in sorted(self._calls) if (below is None or i < below) and i not in self._sent
        ]
        self._sent.update(ready)
        return [_ollama_call(self._calls[i]) for i in ready]


def _openai_message(message: Message) -> dict[str, Any]:
    if message.images:
        raise OllamaError(400, "images are not supported by this server")
    return {"role": message.role, "content": message.content or ""}


async def _translate_stream(
    events: AsyncIterable[Any], name: str, usage: _Usage, *, chat: bool
) -> AsyncIterator[bytes]:
    """OpenAI SSE from the gateway in, Ollama NDJSON out.

    Closing this generator closes the relayed stream, which stops the generation.
    """

    def error_line(message: str) -> bytes:
        return ErrorReply(error=message).line()

    def with_calls(calls: list[dict[str, Any]]) -> bytes:
        if usage.first_piece_at is None:
            usage.first_piece_at = time.perf_counter()
        return _piece(name, "", chat=chat, calls=calls).line()

    streamed_calls = _StreamedCalls()
    try:
        async for data in sse_payloads(events):
            if data == b"[DONE]":
                try:
                    calls = streamed_calls.rest()
                except ValueError as exc:
                    yield error_line(str(exc))
                    return
                if calls:
                    yield with_calls(calls)
                yield usage.final(_piece(name, "", chat=chat)).line()
                return
            try:
                payload = json.loads(data)
            except ValueError:
                continue
            error = payload.get("error")
            if error is not None:
                message = error.get("message") if isinstance(error, dict) else str(error)
                yield error_line(message or "generation failed")
                return
            if payload.get("usage"):
                usage.prompt_tokens = int(payload["usage"].get("prompt_tokens", 0))
                usage.completion_tokens = int(payload["usage"].get("completion_tokens", 0))
            for choice in payload.get("choices") or []:
                # Chat chunks carry `delta.content`, completion chunks `text`.
                delta = choice.get("delta") or {}
                text = delta.get("content") or choice.get("text") or ""
                if text:
                    if usage.first_piece_at is None:
                        usage.first_piece_at = time.perf_counter()
                    yield _piece(name, text, chat=chat).line()
                try:
                    calls = streamed_calls.add(delta.get("tool_calls") or [])
                    if choice.get("finish_reason"):
                        usage.finish_reason = _done_reason(choice["finish_reason"])
                        calls += streamed_calls.rest()
                except ValueError as exc:
                    yield error_line(str(exc))
                    return
                if calls:
                    yield with_calls(calls)
        yield error_line("the model's stream ended early")
    finally:
        await close_stream(events)


def install_ollama_routes(app: FastAPI, pool: ModelPool, gateway: Gateway) -> None:
    """Add the Ollama-compatible routes (`/api/...`) to the manager's app.

    They are left out of the OpenAPI schema: that documents OpenAI's error shape, and these
    routes answer in Ollama's.
    """
    api = OllamaApi(pool, gateway)

    async def guarded(call: Callable[[], Awaitable[Response | OllamaReply]]) -> Response:
        try:
            reply = await call()
        except OllamaError as exc:
            return _error_response(exc)
        except ApiError as exc:
            return _error_response(OllamaError(exc.status, exc.message, exc.headers))
        except PoolError as exc:
            headers = {}
            if exc.retry_after is not None:
                headers["Retry-After"] = str(max(1, round(exc.retry_after)))
            return _error_response(OllamaError(exc.status, exc.message, headers))
        except Exception:
            log.exception("unhandled error in an Ollama route")
            return _error_response(OllamaError(500, "internal server error"))
        return reply if isinstance(reply, Response) else JSONResponse(reply.wire())

    @app.get("/api/version", include_in_schema=False)
    async def ollama_version() -> dict[str, Any]:
        return VersionReply(version=OLLAMA_VERSION).wire()

    @app.get("/api/tags", response_model=None, include_in_schema=False)
    async def ollama_tags() -> Any:
        return await guarded(api.tags)

    @app.get("/api/ps", response_model=None, include_in_schema=False)
    async def ollama_ps() -> Any:
        return await guarded(api.ps)

    @app.post("/api/show", response_model=None, include_in_schema=False)
    async def ollama_show(request: Request) -> Any:
        return await guarded(lambda: api.show(request))

    @app.post("/api/chat", response_model=None, include_in_schema=False)
    async def ollama_chat(request: Request) -> Any:
        return await guarded(lambda: api.chat(request))

    @app.post("/api/generate", response_model=None, include_in_schema=False)
    async def ollama_generate(request: Request) -> Any:
        return await guarded(lambda: api.generate(request))

    @app.post("/api/embed", response_model=None, include_in_schema=False)
    async def ollama_embed(request: Request) -> Any:
        return await guarded(lambda: api.embed(request))

    @app.post("/api/embeddings", response_model=None, include_in_schema=False)
    async def ollama_embeddings(request: Request) -> Any:
        return await guarded(lambda: api.embeddings(request))
