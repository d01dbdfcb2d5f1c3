"""The worker's HTTP routes: thin wrappers around `InferenceService`."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response, StreamingResponse

from model_service.activity import (
    ActivityMiddleware,
    Receive,
    Scope,
    Send,
    StatusChannel,
    WorkerStats,
)
from model_service.auth import ApiKeys, AuthMiddleware, Role
from model_service.backends.remote import RemoteModel
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

INFERENCE_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def create_worker_app(
    service: InferenceService,
    stats: WorkerStats,
    metrics: WorkerMetrics,
    channel: StatusChannel,
    port: int | None = None,
    keys: ApiKeys | None = None,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
) -> FastAPI:
    app = FastAPI(title=f"model worker: {service.model_id}", version="0.1.0")
    engine = service.engine
    install_error_handlers(app)

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
        return TokenCount(model=service.model_id, prompt_tokens=service.count_chat_tokens(request))

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
) -> FastAPI:
    """A worker for a model another server runs (the `openai` and `ollama` backends)."""
    app = FastAPI(title=f"model worker: {remote.model_id} ({remote.kind})", version="0.1.0")
    install_error_handlers(app)
    names = {remote.model_id, *aliases}

    async def run(route: str, request: ChatCompletionRequest | CompletionRequest) -> Response:
        if request.model not in names:
            raise ApiError(
                404,
                f"The model '{request.model}' is not served here; this "
                f"worker serves '{remote.model_id}'",
                param="model",
                code="model_not_found",
            )
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

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: ChatCompletionRequest) -> Response:
        return await run("chat/completions", request)

    @app.post("/v1/completions", response_model=None)
    async def completions(request: CompletionRequest) -> Response:
        return await run("completions", request)

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
            "upstream": remote.base_url,
            "generating": stats.in_flight > 0,
            "tokens_generated": None,
        },
    )
    return app


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
    async def health() -> JSONResponse:
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
            self._close()


def _sse_response(handle: StreamHandle) -> StreamingResponse:
    return _SlotStreamingResponse(handle)


def worker_role(method: str, path: str) -> Role:
    """Workers enforce the client key too, so a worker port is no back door."""
    return Role.OPEN if path == "/health" else Role.CLIENT
