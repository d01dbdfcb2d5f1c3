"""The manager's REST routes. Thin: parse, call the pool, shape the reply."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import math
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

import httpx
from fastapi import Body, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.types import ASGIApp, Receive, Scope, Send

from model_service.auth import ApiKeys, Role, caller_role
from model_service.browsers import BrowserGuard
from model_service.embeddings import CreateEmbeddingResponse
from model_service.errors import ApiError, install_error_handlers
from model_service.limits import BodySizeLimit
from model_service.logs import RequestIdMiddleware
from model_service.protocol import ErrorResponse
from pool_manager.anthropic_api import install_anthropic_routes
from pool_manager.config import ModelSpec
from pool_manager.gateway import Gateway
from pool_manager.identity import CallerMiddleware
from pool_manager.mes import InferenceRequest, InferenceResponse, MesService
from pool_manager.ollama_api import install_ollama_routes
from pool_manager.pool import ModelPool, ModelRecord, PoolError
from pool_manager.responses_api import install_responses_routes
from pool_manager.session_chat import SessionChat, add_session_routes
from pool_manager.states import OCCUPYING, SERVING, ModelState
from pool_manager.tenancy import Tenancy, add_tenancy_routes
from pool_manager.ui import install_ui


class UnloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    force: bool = False


class ExtendTtlRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    minutes: float = Field(gt=0, le=24 * 60)


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).isoformat(timespec="milliseconds")


def _round(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


def model_view(pool: ModelPool, record: ModelRecord, *, admin: bool = True) -> dict[str, Any]:
    """What GET /models shows for one model (the worker's pid to admins only)."""
    worker = record.worker
    host = "127.0.0.1" if pool.config.host in ("0.0.0.0", "::") else pool.config.host
    rss = pool.memory_rss_bytes(record)
    vram = pool.vram_bytes(record)
    spec = record.spec
    return {
        "model_id": spec.model_id,
        "display_name": spec.display_name or spec.model_id,
        "state": record.state.value,
        "port": worker.port if worker else None,
        "endpoint": f"http://{worker.host if worker.node else host}:{worker.port}"
        if worker
        else None,
        "pid": worker.pid if worker and admin else None,
        # Cluster mode: the node the worker runs on (id, address, host name).
        "node": worker.node if worker else None,
        # Every worker serving it (one unless the registry asks for replicas).
        "replicas": [
            {
                "port": w.port,
                "endpoint": f"http://{w.host if w.node else host}:{w.port}",
                "pid": w.pid if admin else None,
                "node": w.node,
                "in_flight": record.worker_load.get(w, 0),
            }
            for w in record.workers
        ],
        "warmup": pool.is_pinned(record),
        "backend": spec.backend,
        "model_type": spec.model_type,
        "tags": spec.tags,
        "ttl_minutes": round(pool.ttl_seconds(record) / 60.0, 3),
        "ttl_remaining_seconds": _round(pool.ttl_remaining(record)),
        "cooling_remaining_seconds": _round(pool.cooling_remaining(record)),
        "in_flight": record.in_flight,
        # Marked to make room for a waiting load: takes no new requests until evicted.
        "evicting": record.evicting,
        "requests_total": record.requests_total,
        # Requests, halving every 10 minutes: what eviction and loading ahead weigh.
        "demand": round(record.demand.value(time.monotonic()), 3),
        "last_used": _iso(record.last_used_at),
        "loaded_at": _iso(record.loaded_at),
        "load_seconds": _round(record.load_seconds, 3),
        "load_breakdown_ms": {k: round(v * 1000, 1) for k, v in record.load_phases.items()},
        "weights_preloaded": record.weights_preloaded,
        "context_preloaded": record.context_preloaded,
        "weights_loaded_ahead": pool.weights_loaded_ahead(record),
        "memory_rss_mb": _round(rss / 2**20 if rss is not None else None),
        "memory_estimate_mb": round(record.memory_estimate / 2**20) if worker else None,
        "vram_mb": _round(vram / 2**20 if vram is not None else None),
        "failures": record.consecutive_failures,
        "crashes": record.crashes,
        "last_error": record.last_error,
        "retry_after_seconds": _round(pool.retry_after(record)),
    }


async def relay_or_error(
    gateway: Gateway, path: str, body: bytes, headers: dict[str, str]
) -> Response:
    """The gateway's reply, or its error as an OpenAI error reply."""
    try:
        return await gateway.relay(path, body, headers)
    except ApiError as exc:
        return exc.response()
    except PoolError as exc:
        return _pool_error_response(exc)


RELAYED_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings"})


class InferenceFastPath:
    """POST /v1/chat/completions, /v1/completions and /v1/embeddings straight to the gateway.

    They are the manager's hottest routes and only relay bytes; skipping FastAPI's
    routing and request wrappers takes ~0.3 ms off each (scripts/bench.py measures the
    whole hop against the worker).
    """

    def __init__(self, app: ASGIApp, gateway: Gateway) -> None:
        self._app = app
        self._gateway = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path")
        if scope["type"] != "http" or scope["method"] != "POST" or path not in RELAYED_PATHS:
            await self._app(scope, receive, send)
            return
        # BodySizeLimit, outside, has refused a body too large or nested too deep; the
        # limit is kept here too, so this read is bounded whatever wraps it.
        limit = self._gateway.max_request_bytes
        chunks = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                error = ApiError(
                    413,
                    f"Request body is larger than the limit of {limit} bytes.",
                    code="request_too_large",
                )
                await error.response()(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        relay = asyncio.ensure_future(
            relay_or_error(self._gateway, path, b"".join(chunks), headers)
        )
        # A client that leaves while its request waits (for a load, for room) takes the
        # request with it: a load nobody waits for any more is given up.
        gone = asyncio.ensure_future(_client_gone(receive))
        await asyncio.wait((relay, gone), return_when=asyncio.FIRST_COMPLETED)
        if not relay.done():
            relay.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await relay
            return
        gone.cancel()
        await relay.result()(scope, receive, send)


async def _client_gone(receive: Receive) -> None:
    """Returns when the client has disconnected (its body was read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def _pool_error_response(exc: PoolError) -> JSONResponse:
    headers = dict(exc.headers)
    if exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    error = ApiError(
        exc.status,
        exc.message,
        type=exc.error_type,
        param=exc.param,
        code=exc.code,
        headers=headers,
    )
    return error.response()


SNAPSHOT_SECONDS = 2.0
SILENT_WORKER_SECONDS = 3.0  # a serving worker beats each second: three missed is news


def _workers_health(pool: ModelPool) -> dict[str, Any]:
    """The serving workers: `ok` unless one has sent no heartbeat for
    SILENT_WORKER_SECONDS (hung, stopped, or its machine overloaded; the pool kills it
    at hang_timeout_seconds); models FAILED (their loads keep failing) listed beside."""
    now = time.monotonic()
    serving = [r for r in pool.records() if r.state in SERVING and r.worker is not None]
    silent = [
        r.model_id
        for r in serving
        if r.worker is not None
        and r.worker.last_beat is not None
        and now - r.worker.last_beat > SILENT_WORKER_SECONDS
    ]
    failed = [r.model_id for r in pool.records() if r.state is ModelState.FAILED]
    return {"ok": not silent, "serving": len(serving), "silent": silent, "failed": failed}


def _model_card(record: ModelRecord) -> dict[str, Any]:
    return {
        "id": record.model_id,
        "object": "model",
        "created": int(record.loaded_at or 0),
        "owned_by": "model-pool",
    }


def _sse_event(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, default=str)}\n\n".encode()


def manager_role(method: str, path: str) -> Role:
    """Reads and inference need the client key; every change needs the admin key."""
    if path in ("/health", "/ready", "/ui"):
        return Role.OPEN  # /ui is a static page; its data calls carry the admin key
    if path == "/events" or path == "/keys" or path.startswith("/keys/"):
        return Role.ADMIN  # an endless stream; the named keys
    # Reads and inference: /v1/* (incl. /v1/inference) and the Ollama-compatible /api/*.
    if method in ("GET", "HEAD") or path.startswith(("/v1/", "/api/")):
        return Role.CLIENT
    return Role.ADMIN


def create_app(
    pool: ModelPool,
    keys: ApiKeys | None = None,
    on_warm: Callable[[], None] | None = None,
    tenancy: Tenancy | None = None,
) -> FastAPI:
    """The manager's app; `on_warm` runs once every warmup model has loaded (or failed).
    `tenancy`: named keys, quotas and usage (default: from the environment and config)."""

    async def call_when_warm() -> None:
        await pool.warmup_done.wait()
        if on_warm is not None:
            on_warm()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await shared.start()
        await pool.start()
        # SIGHUP re-reads the config and registry files, as daemons do.
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(pool.reload_files()))
        welcome = asyncio.create_task(call_when_warm())
        try:
            yield
        finally:
            welcome.cancel()
            await pool.stop()
            await gateway.close()
            await shared.stop()  # after the workers: their last reports are booked

    keys = keys or ApiKeys()
    shared = tenancy or Tenancy.from_environment(pool, keys, pool.metrics.registry)
    # Workers check the client key only: what the manager sends them carries it.
    worker_auth = {"authorization": f"Bearer {keys.client}"} if keys.client else {}
    gateway = Gateway(pool, worker_auth, shared.quotas, shared.accounting)
    mes = MesService(pool, gateway)
    # Set when the server is asked to stop: endless event streams end so it can.
    stopping = asyncio.Event()
    app = FastAPI(title="Model Pool Manager", version="0.1.0", lifespan=lifespan)
    app.state.stopping = stopping
    install_error_handlers(app)

    async def on_pool_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, PoolError)
        return _pool_error_response(exc)

    app.add_exception_handler(PoolError, on_pool_error)
    # Innermost: inference requests skip FastAPI's routing, inside auth and body limits.
    app.add_middleware(InferenceFastPath, gateway=gateway)
    app.add_middleware(BodySizeLimit, max_bytes=pool.config.max_request_bytes)
    app.add_middleware(CallerMiddleware, identities=shared.identities, role_for=manager_role)
    # Before the keys: a web page's request is refused even when no keys are set.
    app.add_middleware(
        BrowserGuard,
        allowed_hosts=pool.config.allowed_hosts,
        allowed_origins=pool.config.allowed_origins,
    )
    app.add_middleware(RequestIdMiddleware)  # outermost: every line of a request has its id

    # --- the unified OpenAI endpoint -----------------------------------------------------

    # InferenceFastPath answers these before FastAPI routes anything; the routes declare
    # them for the OpenAPI schema, through the same function.
    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Response:
        return await relay_or_error(
            gateway, "/v1/chat/completions", await request.body(), dict(request.headers)
        )

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> Response:
        return await relay_or_error(
            gateway, "/v1/completions", await request.body(), dict(request.headers)
        )

    @app.post(
        "/v1/embeddings",
        response_model=None,
        responses={
            200: {"model": CreateEmbeddingResponse, "description": "The embeddings"},
            400: {"model": ErrorResponse, "description": "Invalid request (OpenAI error shape)"},
        },
    )
    async def embeddings(request: Request) -> Response:
        """OpenAI's embeddings, relayed to the model's worker (a COLD model loads first)."""
        return await relay_or_error(
            gateway, "/v1/embeddings", await request.body(), dict(request.headers)
        )

    @app.get("/v1/models")
    async def openai_models() -> dict[str, Any]:
        """OpenAI's model list (`data`), plus seed 000's `models` list for MES clients."""
        records = pool.records()
        return {
            "object": "list",
            "data": [_model_card(r) for r in records],
            "models": [
                {
                    "id": r.model_id,
                    "name": r.spec.display_name or r.model_id,
                    "status": r.state.value,
                    "loaded": r.state in SERVING,
                    "context_window": r.spec.n_ctx,
                    "supports_json": True,
                }
                for r in records
            ],
        }

    @app.get("/v1/models/{model_id:path}")
    async def openai_model(model_id: str) -> dict[str, Any]:
        """One model as OpenAI shows it, by id or alias (404 in OpenAI's shape)."""
        return _model_card(pool.resolve(model_id))

    install_ollama_routes(app, pool, gateway)  # /api/*: the Ollama-compatible subset
    install_responses_routes(app, pool, gateway)  # /v1/responses: OpenAI's Responses API
    install_anthropic_routes(app, pool, gateway)  # /v1/messages: Anthropic's Messages API
    install_ui(app)  # GET /ui: the dashboard

    # --- the MES API of seed 000 ----------------------------------------------------------

    @app.post("/v1/inference")
    async def inference(body: InferenceRequest, request: Request) -> InferenceResponse:
        return await mes.infer(body, dict(request.headers))

    @app.get("/ready")
    async def ready() -> JSONResponse:
        is_ready, reason = mes.readiness()
        return JSONResponse(
            {"ready": is_ready, "reason": reason}, status_code=200 if is_ready else 503
        )

    @app.get("/v1/status")
    async def status() -> dict[str, Any]:
        return await mes.status()

    # --- control plane ------------------------------------------------------------------

    @app.get("/health")
    async def health(request: Request) -> dict[str, Any]:
        """Up or down for anyone; the pool's detail for a caller with a key (or with no
        keys configured): an open port tells strangers no model names or errors."""
        if caller_role(request.scope) is Role.OPEN:
            return {"status": "healthy"}
        records = pool.records()
        rss = [pool.memory_rss_bytes(r) or 0 for r in records]
        dependencies = {**await shared.health(), "workers": _workers_health(pool)}
        detail = {
            "status": "healthy",
            "warmup_complete": pool.warmup_done.is_set(),
            "total_models": len(records),
            "active_models": sum(r.state in OCCUPYING for r in records),
            "models_by_state": {s.value: sum(r.state is s for r in records) for s in ModelState},
            "total_memory_mb": round(sum(rss) / 2**20, 1),
            "memory": pool.memory_summary(),
            "available_ports": pool.available_ports(),
            "waiting_for_room": pool.admission_waiting(),
            "spare_workers": len(pool.spare_pids),
            "preloaded_models": pool.preloaded_model_ids,
            "last_reload_error": pool.last_reload_error,
            "dependencies": dependencies,
        }
        nodes = await asyncio.to_thread(lambda: pool.cluster_nodes)
        if nodes is not None:  # cluster mode: every node Ray knows, dead ones included
            detail["cluster"] = {"nodes": nodes, "alive": sum(n["alive"] for n in nodes)}
        if not all(d["ok"] for d in dependencies.values()):
            detail["status"] = "degraded"  # inference goes on; usage waits in memory
        if caller_role(request.scope) is Role.ADMIN:  # what the workers' sandbox has here
            detail["sandbox"] = pool.sandbox
            detail["spare_pids"] = pool.spare_pids
            detail["fork_server_pid"] = pool.fork_server_pid
        return detail

    # Left out of the OpenAPI schema: an endless stream is no operation to fuzz or generate.
    @app.get("/events", include_in_schema=False)
    async def events(request: Request) -> StreamingResponse:
        """Server-sent events: a `snapshot` of every model at once and after each change,
        `state` for each change, and a `snapshot` every 2 s (TTL countdowns, memory)."""

        async def stream() -> AsyncIterator[bytes]:
            listener = pool.subscribe()
            try:
                while not (stopping.is_set() or await request.is_disconnected()):
                    snapshot = {"models": [model_view(pool, r) for r in pool.records()]}
                    yield _sse_event("snapshot", snapshot)
                    try:
                        change = await asyncio.wait_for(listener.get(), SNAPSHOT_SECONDS)
                    except TimeoutError:
                        continue
                    yield _sse_event(change.get("type", "state"), change)
            finally:
                pool.unsubscribe(listener)

        return StreamingResponse(
            stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    def is_admin(request: Request) -> bool:
        return caller_role(request.scope) is Role.ADMIN

    @app.get("/models")
    async def list_models(request: Request) -> dict[str, Any]:
        admin = is_admin(request)
        return {"models": [model_view(pool, r, admin=admin) for r in pool.records()]}

    @app.post("/models/register", status_code=201)
    async def register_model(spec: ModelSpec, replace: bool = False) -> dict[str, Any]:
        return model_view(pool, await pool.register(spec, replace=replace))

    @app.get("/models/{model_id:path}/health")
    async def model_health(model_id: str) -> dict[str, Any]:
        record = pool.get(model_id)
        view = model_view(pool, record)
        worker_health: dict[str, Any] | None = None
        if record.worker is not None and record.state is not ModelState.WARMING:
            try:
                async with httpx.AsyncClient(timeout=2.0, headers=worker_auth) as client:
                    reply = await client.get(f"{view['endpoint']}/health")
                worker_health = reply.json()
            except (httpx.HTTPError, ValueError) as exc:
                worker_health = {"status": "unreachable", "error": str(exc) or type(exc).__name__}
        return {
            "model_id": model_id,
            "state": record.state.value,
            "port": view["port"],
            "healthy": bool(worker_health and worker_health.get("status") == "ready"),
            "worker": worker_health,
        }

    @app.post("/models/{model_id:path}/load")
    async def load_model(model_id: str) -> dict[str, Any]:
        return model_view(pool, await pool.load(model_id))

    @app.post("/models/{model_id:path}/unload")
    async def unload_model(
        model_id: str, body: Annotated[UnloadRequest | None, Body()] = None
    ) -> dict[str, Any]:
        force = body.force if body else False
        return model_view(pool, await pool.unload(model_id, force=force))

    @app.post("/models/{model_id:path}/extend-ttl")
    async def extend_ttl(model_id: str, body: ExtendTtlRequest) -> dict[str, Any]:
        return model_view(pool, pool.extend_ttl(model_id, body.minutes))

    @app.get("/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> dict[str, Any]:
        return model_view(pool, pool.get(model_id), admin=is_admin(request))

    @app.delete("/models/{model_id:path}")
    async def delete_model(model_id: str) -> dict[str, Any]:
        await pool.delete(model_id)
        return {"deleted": model_id}

    @app.post("/reload")
    async def reload_files() -> JSONResponse:
        """Re-read the config and registry files now (SIGHUP does the same)."""
        result = await pool.reload_files()
        if not result["applied"]:
            raise ApiError(
                400, f"edit refused, running config kept: {result['error']}", code="invalid_config"
            )
        return JSONResponse(result)

    @app.get("/config")
    async def get_config() -> dict[str, Any]:
        return pool.config.model_dump(mode="json")

    @app.patch("/config")
    async def patch_config(changes: Annotated[dict[str, Any], Body()]) -> dict[str, Any]:
        try:
            config = pool.update_config(changes)
        except ValidationError as exc:
            first = exc.errors()[0]
            param = ".".join(str(p) for p in first["loc"]) or None
            raise ApiError(
                400,
                f"{param}: {first['msg']}" if param else first["msg"],
                param=param,
                code="invalid_value",
            ) from exc
        return config.model_dump(mode="json")

    add_tenancy_routes(app, shared)
    add_session_routes(app, SessionChat(pool, gateway, shared.sessions))

    @app.get("/metrics/targets")
    async def metrics_targets() -> list[dict[str, Any]]:
        """Prometheus HTTP service discovery: one target per running worker."""
        host = "127.0.0.1" if pool.config.host in ("0.0.0.0", "::") else pool.config.host
        return [
            {
                "targets": [f"{r.worker.host if r.worker.node else host}:{r.worker.port}"],
                "labels": {"model": r.model_id},
            }
            for r in pool.records()
            if r.worker is not None and r.state in SERVING
        ]

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(pool.metrics.render(), media_type="text/plain; version=0.0.4")

    return app
