"""The worker's HTTP routes: thin wrappers around `InferenceService`."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute

from model_service.activity import (
    ActivityMiddleware,
    Receive,
    Scope,
    Send,
    StatusChannel,
    WorkerStats,
)
from model_service.auth import ApiKeys, AuthMiddleware, Role, caller_role
from model_service.backends.kinds import kind_of
from model_service.backends.remote import RemoteModel
from model_service.embeddings import (
    CreateEmbeddingResponse,
    EmbeddingRequest,
    EmbeddingService,
    check_inputs,
)
from model_service.errors import ApiError, install_error_handlers
from model_service.inference import InferenceService, StreamHandle
from model_service.limits import DEFAULT_MAX_REQUEST_BYTES, Admission, BodySizeLimit
from model_service.logs import RequestIdMiddleware
from model_service.metrics import WorkerMetrics
from model_service.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ModelCard,
    ModelList,
    TokenCount,
)
from model_service.sandbox import EXIT_OUT_OF_MEMORY

log = logging.getLogger(__name__)
INFERENCE_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings"})
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# Bodies larger than this are parsed on a thread (json.loads of 8 MB takes ~0.3 s).
INLINE_PARSE_BYTES = 64 * 1024


class _OffLoopJsonRequest(Request):
    """A request whose large JSON body is parsed on a thread, not on the event loop."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            if len(body) > INLINE_PARSE_BYTES:
                self._json = await asyncio.to_thread(json.loads, body)
            else:
                self._json = json.loads(body)
        return self._json


class OffLoopJsonRoute(APIRoute):
    """FastAPI's route, reading the body through `_OffLoopJsonRequest` (FastAPI's
    documented way to customize the request a route parses)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            return await handler(_OffLoopJsonRequest(request.scope, request.receive))

        return route


def create_worker_app(
    service: InferenceService,
    stats: WorkerStats,
    metrics: WorkerMetrics,
    channel: StatusChannel,
    port: int | None = None,
    keys: ApiKeys | None = None,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    embeddings: EmbeddingService | None = None,
) -> FastAPI:
    """`embeddings`: the model's pooled embeddings (POST /v1/embeddings), if it has them."""
    app = FastAPI(title=f"model worker: {service.model_id}", version="0.1.0")
    app.router.route_class = OffLoopJsonRoute  # for the routes added below
    engine = service.engine
    install_error_handlers(app)
    if embeddings is not None:
        _add_embeddings_route(app, _answer_with(embeddings))

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: ChatCompletionRequest) -> ChatCompletion | Response:
        if request.stream:
            return _sse_response(await service.chat_stream(request))
        return await service.chat(request)

    @app.post("/v1/completions", response_model=None)
    async def completions(request: CompletionRequest) -> Completion | Response:
        if request.stream:
            return _sse_response(await service.complete_stream(request))
        return await service.complete(request)

    @app.post("/v1/count_tokens")
    async def count_tokens(request: ChatCompletionRequest) -> TokenCount:
        """The prompt's size in tokens, as a chat request would render it (tools too)."""
        return TokenCount(model=service.model_id, prompt_tokens=await service.count_tokens(request))

    _add_common_parts(
        app,
        service.model_id,
        stats,
        metrics,
        channel,
        port,
        keys,
        max_request_bytes,
        health_extra=lambda: {
            "generating": engine.generating,
            "tokens_generated": engine.tokens_generated,
            **_embeddings_health(embeddings),
        },
    )
    return app


def create_remote_worker_app(
    remote: RemoteModel,
    admission: Admission,
    stats: WorkerStats,
    metrics: WorkerMetrics,
    channel: StatusChannel,
    port: int | None = None,
    keys: ApiKeys | None = None,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    aliases: frozenset[str] = frozenset(),
    chat: bool = True,
) -> FastAPI:
    """A worker for a model another server runs (the `openai` and `ollama` backends).

    `chat`: False for an embedding model (registry `model_type: "embedding"`), which
    refuses chat and completions with a 400.
    """
    app = FastAPI(title=f"model worker: {remote.model_id} ({remote.kind})", version="0.1.0")
    install_error_handlers(app)
    names = {remote.model_id, *aliases}
    kind = kind_of(remote.kind)

    def unsupported(what: str, param: str | None = None) -> ApiError:
        return ApiError(
            400,
            f"The model '{remote.model_id}' runs on a {remote.kind} server, which cannot "
            f"{what} here.",
            param=param,
            code="unsupported_by_backend",
        )

    def check_model(name: str) -> None:
        if name not in names:
            raise ApiError(
                404,
                f"The model '{name}' is not served here; this worker serves '{remote.model_id}'",
                param="model",
                code="model_not_found",
            )

    async def run(route: str, request: ChatCompletionRequest | CompletionRequest) -> Response:
        check_model(request.model)
        if isinstance(request, ChatCompletionRequest) and request.tools and not kind.tools:
            raise unsupported("call tools", param="tools")  # never dropped silently
        body = request.model_dump(exclude_none=True, by_alias=True)
        await admission.acquire()
        if request.stream:
            return _SlotStreamingResponse(
                StreamHandle(remote.stream(route, body), admission.release)
            )
        try:
            status, data = await remote.forward(route, body)
        finally:
            admission.release()
        return JSONResponse(data, status_code=status)

    async def embed(request: EmbeddingRequest) -> Response:
        check_model(request.model)
        if not kind.embeds:
            raise unsupported("make embeddings")
        check_inputs(request)
        async with admission.slot():
            status, data = await remote.embed(request.model_dump(exclude_none=True))
        return JSONResponse(data, status_code=status)

    _add_embeddings_route(app, embed)

    @app.post("/v1/count_tokens")
    async def count_tokens(request: ChatCompletionRequest) -> TokenCount:
        raise unsupported("count a prompt's tokens")  # no tokenizer in this process

    if chat:
        _add_generation_routes(app, run)
    else:
        _refuse_generation(app, remote.model_id)

    _add_common_parts(
        app,
        remote.model_id,
        stats,
        metrics,
        channel,
        port,
        keys,
        max_request_bytes,
        health_extra=lambda: {
            "backend": remote.kind,
            "upstream": remote.shown_url,
            "generating": stats.in_flight > 0,
            "tokens_generated": None,
        },
    )
    return app


def _add_generation_routes(
    app: FastAPI,
    run: Callable[[str, ChatCompletionRequest | CompletionRequest], Awaitable[Response]],
) -> None:
    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: ChatCompletionRequest) -> Response:
        return await run("chat/completions", request)

    @app.post("/v1/completions", response_model=None)
    async def completions(request: CompletionRequest) -> Response:
        return await run("completions", request)


# --- embeddings ------------------------------------------------------------------------------


def create_embedding_worker_app(
    service: EmbeddingService,
    stats: WorkerStats,
    metrics: WorkerMetrics,
    channel: StatusChannel,
    port: int | None = None,
    keys: ApiKeys | None = None,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
) -> FastAPI:
    """A worker for an embedding model (registry `model_type: "embedding"`): it serves
    /v1/embeddings and refuses chat and completions with a 400."""
    app = FastAPI(title=f"model worker: {service.model_id} (embeddings)", version="0.1.0")
    install_error_handlers(app)
    _add_embeddings_route(app, _answer_with(service))
    _refuse_generation(app, service.model_id)
    _add_common_parts(
        app,
        service.model_id,
        stats,
        metrics,
        channel,
        port,
        keys,
        max_request_bytes,
        health_extra=lambda: {
            "generating": stats.in_flight > 0,
            "tokens_generated": None,
            **_embeddings_health(service),
        },
    )
    return app


def _add_embeddings_route(
    app: FastAPI, create: Callable[[EmbeddingRequest], Awaitable[Response]]
) -> None:
    @app.post(
        "/v1/embeddings",
        response_model=None,
        responses={200: {"model": CreateEmbeddingResponse, "description": "The embeddings"}},
    )
    async def embeddings(request: EmbeddingRequest) -> Response:
        return await create(request)


def _answer_with(service: EmbeddingService) -> Callable[[EmbeddingRequest], Awaitable[Response]]:
    async def answer(request: EmbeddingRequest) -> Response:
        # Serialized by pydantic-core in one go: thousands of floats per reply.
        reply = await service.create(request)
        return Response(reply.model_dump_json(), media_type="application/json")

    return answer


def _refuse_generation(app: FastAPI, model_id: str) -> None:
    """Chat and completions on an embedding model: a clear 400, whatever the body."""

    async def refuse(request: Request) -> Response:
        raise ApiError(
            400,
            f"The model '{model_id}' is an embedding model: it serves /v1/embeddings, "
            "not chat or completions.",
            param="model",
            code="model_not_chat",
        )

    for path in ("/v1/chat/completions", "/v1/completions"):
        app.add_api_route(path, refuse, methods=["POST"], response_model=None)


def _embeddings_health(service: EmbeddingService | None) -> dict[str, Any]:
    if service is None:
        return {}
    return {"embeddings": service.embedder.describe()}


def _add_common_parts(
    app: FastAPI,
    model_id: str,
    stats: WorkerStats,
    metrics: WorkerMetrics,
    channel: StatusChannel,
    port: int | None,
    keys: ApiKeys | None,
    max_request_bytes: int,
    health_extra: Callable[[], dict[str, Any]],
) -> None:
    """The routes and middleware every worker has, whatever runs its model."""
    loaded_at = int(time.time())

    async def out_of_memory(_: Request, exc: Exception) -> Response:
        # Past its memory ceiling (RLIMIT_AS, model_service/sandbox.py) a worker cannot be
        # trusted to go on: it answers, then exits alone with the code the manager reads
        # as "out of memory", and its model is loaded afresh on the next request.
        log.error("out of memory while serving; the worker exits", extra={"model": model_id})
        asyncio.get_running_loop().call_later(0.2, os._exit, EXIT_OUT_OF_MEMORY)
        return ApiError(
            503,
            "The model's worker ran out of memory (its memory ceiling) and is restarting.",
            type="server_error",
            code="out_of_memory",
        ).response()

    app.add_exception_handler(MemoryError, out_of_memory)

    @app.get("/v1/models")
    async def list_models() -> ModelList:
        return ModelList(data=[ModelCard(id=model_id, created=loaded_at)])

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str) -> ModelCard:
        if name != model_id:
            raise ApiError(
                404,
                f"The model '{name}' is not served here; this worker serves '{model_id}'",
                param="model",
                code="model_not_found",
            )
        return ModelCard(id=model_id, created=loaded_at)

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        if caller_role(request.scope) is Role.OPEN:
            # Up or down for anyone; the detail for a caller with a key (or no keys set).
            return JSONResponse({"status": "ready"})
        return JSONResponse(
            {
                "status": "ready",
                "model": model_id,
                "pid": os.getpid(),
                "port": port,
                "uptime_seconds": round(time.time() - stats.started_at, 3),
                "requests_served": stats.requests_served,
                "in_flight": stats.in_flight,
                "last_request_at": stats.last_request_at,
                **health_extra(),
            }
        )

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    app.add_middleware(
        ActivityMiddleware,
        stats=stats,
        channel=channel,
        paths=INFERENCE_PATHS,
        on_finished=metrics.request_finished,
    )
    app.add_middleware(BodySizeLimit, max_bytes=max_request_bytes)
    # Added after those, so it runs first: a refused request is not counted as activity.
    app.add_middleware(AuthMiddleware, keys=keys or ApiKeys(), role_for=worker_role)
    app.add_middleware(RequestIdMiddleware)


class _SlotStreamingResponse(StreamingResponse):
    """Streams SSE frames and always gives the request's slot back, even if never sent."""

    def __init__(self, handle: StreamHandle) -> None:
        super().__init__(handle.frames, media_type="text/event-stream", headers=SSE_HEADERS)
        self._close = handle.close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            closing = getattr(self.body_iterator, "aclose", None)
            if closing is not None:
                # Now, in this request's context: a stream cut off counts what it used
                # before the request's `end` report goes out (model_service/activity.py).
                await closing()
            self._close()


def _sse_response(handle: StreamHandle) -> StreamingResponse:
    return _SlotStreamingResponse(handle)


def worker_role(method: str, path: str) -> Role:
    """Workers enforce the client key too, so a worker port is no back door."""
    return Role.OPEN if path == "/health" else Role.CLIENT
