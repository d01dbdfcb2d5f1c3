"""The unified OpenAI endpoint on the manager: route by `model`, load on demand, relay.

The body is forwarded to the model's worker untouched and the reply (a stream included)
is relayed as it arrives. A client that goes away closes the connection to the worker,
which stops the generation. Failures become OpenAI errors: a model that cannot load is
503 with Retry-After, a worker that dies before answering is 502, and one that dies
mid-stream ends the stream with an SSE error event.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from model_service.errors import ApiError
from model_service.logs import request_id
from pool_manager.identity import Caller, current_caller
from pool_manager.pool import ModelPool, ModelRecord, PoolError
from pool_manager.quotas import NO_GRANT, Grant, Quotas, RateLimited
from pool_manager.response_cache import (
    CACHE_HEADER,
    SEMANTIC_PATH,
    CachedReply,
    ResponseCache,
    SemanticCache,
    cache_refused,
    cache_ttl,
    request_key,
    single_turn,
)
from pool_manager.sse import close_stream
from pool_manager.upstream import UpstreamError, UpstreamPool, UpstreamResponse, UpstreamTimeout
from pool_manager.usage import Accounting
from pool_manager.worker_process import WorkerProcess

log = logging.getLogger(__name__)

SERVER_TIMING_WAIT = "pool-wait"  # metric name in the Server-Timing reply header
# Headers that describe one hop, not the message (RFC 9110 §7.6.1), and the body's length,
# which the relay recomputes.
_HOP_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "proxy-authorization",
        "proxy-authenticate",
        "content-length",
        "host",
        # Ours, not the worker's: uvicorn adds them to every reply it sends.
        "date",
        "server",
    }
)
# The caller's key is not among them: the manager checked it, and the worker gets the
# client key instead (workers never hold the admin key).
_FORWARDED_REQUEST_HEADERS = (
    "content-type",
    "x-request-id",
    "accept",
)
# What the translating APIs (Ollama, Anthropic, Responses) send with their JSON: the
# caller's key stays behind (checked already; workers get their own) and the request id
# is the gateway's own, so there is nothing else of the caller's to pass on.
JSON_REQUEST = {"content-type": "application/json"}
RELAY_SLACK_SECONDS = 5.0
WORKER_GONE_WAIT_SECONDS = 2.0
ATTEMPTS = 3  # a worker that was evicted or died between load and send is reloaded


SIMILARITY_HEADER = "x-pool-cache-similarity"


@dataclass
class SemanticLookup:
    """What the L2 cache said about a request: its hit (reply, similarity), or the
    prompt's embedding and context to keep the coming reply under."""

    hit: tuple[CachedReply, float] | None = None
    vector: list[float] | None = None
    context: str = ""


class Gateway:
    """Relays OpenAI requests from the manager's port to the right worker."""

    def __init__(
        self,
        pool: ModelPool,
        worker_auth: dict[str, str] | None = None,
        quotas: Quotas | None = None,
        accounting: Accounting | None = None,
    ) -> None:
        """`worker_auth`: the header that carries the workers' key, if they check one.
        `quotas` and `accounting`: callers' limits and usage (none: neither is kept)."""
        self._pool = pool
        self._worker_auth = worker_auth or {}
        self._quotas = quotas or Quotas()
        self._accounting = accounting
        self._cache = ResponseCache(pool.config.response_cache_mb * 2**20)
        self._semantic = SemanticCache(pool.config.semantic_cache_entries)
        # Keep-alive connections to the workers; no timeout on reads, since a generation
        # may take long (the worker enforces its own timeout_seconds).
        self._upstream = UpstreamPool()
        pool.worker_lost = self._worker_lost

    def _worker_lost(self, worker: WorkerProcess) -> None:
        # A local worker's death resets its connections; a lost node's may not.
        self._upstream.abort(worker.port, worker.host)

    async def close(self) -> None:
        self._upstream.close()

    @property
    def max_request_bytes(self) -> int:
        """The largest request body the manager takes (config `max_request_bytes`)."""
        return self._pool.config.max_request_bytes

    async def relay(self, path: str, body: bytes, headers: dict[str, str]) -> Response:
        """Forward one request, falling back along the model's `fallbacks` chain.

        A model that cannot load, is FAILED, is full, or answers 5xx before its first
        token hands the request to the next model of its chain. Raises ApiError
        (OpenAI-shaped) or the pool's errors when the whole chain fails.
        """
        started = time.perf_counter()
        payload = _read_payload(body)
        name = payload["model"]
        record = self._pool.resolve(name)
        if name != record.model_id:
            # An alias (an fnmatch pattern, perhaps): the worker is sure to know the id.
            body = _with_model(body, record.model_id)
        caller = current_caller.get()
        accounting = self._accounting
        try:
            grant = self._quotas.admit(caller, record.model_id)
        except RateLimited as exc:
            if accounting is not None:
                accounting.refused(caller, record.model_id)
            self._pool.metrics.gateway_answered(
                record.model_id, exc.status, time.perf_counter() - started
            )
            raise
        ttl = cache_ttl(headers, record.spec.cache_ttl_seconds)
        cache_key = request_key(path, record.model_id, payload) if ttl else None
        if cache_key is not None:
            hit = self._cache.get(cache_key)
            if accounting is not None:
                accounting.cache_looked_up(record.model_id, "hit" if hit else "miss")
            if hit is not None:
                marks = {CACHE_HEADER: "hit"}
                return self._replay(hit, marks, caller, record, grant, started)
        similar = await self._semantic_lookup(record, path, payload, headers, caller)
        if similar.hit is not None:
            reply, similarity = similar.hit
            marks = {CACHE_HEADER: "semantic-hit", SIMILARITY_HEADER: f"{similarity:.4f}"}
            return self._replay(reply, marks, caller, record, grant, started)
        ticket = accounting.open(caller, record.model_id, grant) if accounting else None
        try:
            response = await self._relay_chain(record, path, body, headers, ticket)
        except (PoolError, ApiError) as exc:
            self._end(ticket, grant, failed=True)
            self._pool.metrics.gateway_answered(
                record.model_id, exc.status, time.perf_counter() - started
            )
            raise
        except BaseException:
            self._end(ticket, grant, failed=False)  # its client left: no reply to book
            raise
        response.headers.update(grant.headers)
        if isinstance(response, StreamingResponse):
            # Its slot of the caller's limits is free when the stream is over.
            response.body_iterator = _then(
                response.body_iterator, lambda: self._end(ticket, grant, failed=False)
            )
        else:
            self._end(ticket, grant, failed=False)
            if cache_key is not None and ttl is not None:
                if response.status_code == 200:
                    self._cache.put(cache_key, bytes(response.body), dict(response.headers), ttl)
                response.headers[CACHE_HEADER] = "miss"
            if similar.vector is not None and record.spec.semantic_cache is not None:
                if response.status_code == 200:
                    self._semantic.put(
                        record.model_id,
                        similar.context,
                        similar.vector,
                        bytes(response.body),
                        dict(response.headers),
                        record.spec.semantic_cache.ttl_seconds,
                    )
                response.headers.setdefault(CACHE_HEADER, "semantic-miss")
        self._pool.metrics.gateway_answered(
            record.model_id, response.status_code, time.perf_counter() - started
        )
        return response

    def _replay(
        self,
        kept: CachedReply,
        marks: dict[str, str],
        caller: Caller,
        record: ModelRecord,
        grant: Grant,
        started: float,
    ) -> Response:
        """A cache's answer: booked as a request and a hit, the worker not asked."""
        grant.release()
        if self._accounting is not None:
            self._accounting.cache_hit(caller, record.model_id)
        self._pool.metrics.gateway_answered(record.model_id, 200, time.perf_counter() - started)
        return Response(
            kept.body, status_code=200, headers={**kept.headers, **grant.headers, **marks}
        )

    async def _semantic_lookup(
        self,
        record: ModelRecord,
        path: str,
        payload: dict[str, Any],
        headers: dict[str, str],
        caller: Caller,
    ) -> SemanticLookup:
        """The L2 cache's answer for a single-turn question to a model that has one: its
        prompt embedded by the configured embedding model, the nearest kept prompt's
        reply if similar enough. An embedding that fails means no L2 this time."""
        spec = record.spec.semantic_cache
        if spec is None or path != SEMANTIC_PATH or cache_refused(headers):
            return SemanticLookup()
        asked = single_turn(payload)
        if asked is None:
            return SemanticLookup()
        prompt, context = asked
        vector = await self._embed(caller, spec.embedding_model, prompt)
        if vector is None:
            return SemanticLookup()
        hit = self._semantic.lookup(record.model_id, context, vector, spec.threshold)
        if self._accounting is not None:
            self._accounting.cache_looked_up(
                record.model_id, "semantic_hit" if hit else "semantic_miss"
            )
        return SemanticLookup(hit, vector, context)

    async def _embed(self, caller: Caller, model_name: str, text: str) -> list[float] | None:
        """`text` embedded by `model_name` (booked to `caller`, outside its limits)."""
        try:
            embedder = self._pool.resolve(model_name)
        except PoolError:
            log.warning("semantic cache: unknown embedding model", extra={"model": model_name})
            return None
        accounting = self._accounting
        ticket = accounting.open(caller, embedder.model_id, NO_GRANT) if accounting else None
        body = json.dumps({"model": embedder.model_id, "input": text}).encode()
        try:
            reply = await self._relay_chain(embedder, "/v1/embeddings", body, JSON_REQUEST, ticket)
        except (PoolError, ApiError) as exc:
            self._end(ticket, NO_GRANT, failed=True)
            log.warning("semantic cache: no embedding", extra={"reason": exc.message})
            return None
        self._end(ticket, NO_GRANT, failed=False)
        if reply.status_code != 200:
            return None
        try:
            vector: list[float] = json.loads(bytes(reply.body))["data"][0]["embedding"]
        except (ValueError, KeyError, IndexError, TypeError):
            return None
        return vector

    def _end(self, ticket: str | None, grant: Grant, *, failed: bool) -> None:
        """The request's reply is over: its slot free, its ticket closed."""
        grant.release()
        if ticket is not None and self._accounting is not None:
            self._accounting.close(ticket, failed=failed)

    async def _relay_chain(
        self,
        record: ModelRecord,
        path: str,
        body: bytes,
        headers: dict[str, str],
        ticket: str | None = None,
    ) -> Response:
        forwarded = {k: v for k, v in headers.items() if k in _FORWARDED_REQUEST_HEADERS}
        forwarded.update(self._worker_auth)
        if ticket is not None:
            forwarded["x-pool-ticket"] = ticket  # the worker's report books it to the caller
        current = request_id.get()
        if current is not None:
            forwarded["x-request-id"] = current  # the worker logs under the same id
        chain = [record, *self._fallbacks(record)]
        for position, candidate in enumerate(chain):
            last = position + 1 == len(chain)
            payload = body if candidate is record else _with_model(body, candidate.model_id)
            try:
                response = await self._relay_to(candidate, path, payload, forwarded)
            except (PoolError, ApiError) as exc:
                status = exc.status
                if last or status < 500:
                    raise
                self._note_fallback(record, chain[position + 1], _reason(exc))
                continue
            if response.status_code >= 500 and not last:
                self._note_fallback(record, chain[position + 1], "worker_error")
                continue
            if candidate is not record:
                response.headers["x-pool-fallback-from"] = record.model_id
            return response
        raise AssertionError("unreachable: the last model of a chain returns or raises")

    def _fallbacks(self, record: ModelRecord) -> list[ModelRecord]:
        chain = []
        for name in record.spec.fallbacks:
            try:
                chain.append(self._pool.resolve(name))
            except PoolError:
                log.warning(
                    "unknown fallback model", extra={"model": record.model_id, "fallback": name}
                )
        return chain

    def _note_fallback(self, record: ModelRecord, to: ModelRecord, reason: str) -> None:
        log.warning(
            "falling back", extra={"model": record.model_id, "to": to.model_id, "reason": reason}
        )
        self._pool.metrics.fell_back(record.model_id, to.model_id, reason)

    async def _relay_to(
        self, record: ModelRecord, path: str, body: bytes, forwarded: dict[str, str]
    ) -> Response:
        # Held from before the load until the worker has the request: a model just loaded
        # for it is not evicted for another load in between.
        with self._pool.reserve(record):
            return await self._relay_attempts(record, path, body, forwarded)

    async def _relay_attempts(
        self, record: ModelRecord, path: str, body: bytes, forwarded: dict[str, str]
    ) -> Response:
        unloaded_meanwhile = False  # the last attempt's worker was unloaded, not lost
        waited = 0.0  # in load_record: the admission queue, a drain, the load
        for attempt in range(ATTEMPTS):
            asked = time.perf_counter()
            await self._pool.load_record(record)
            waited += time.perf_counter() - asked
            worker = self._pool.route(record, body)  # a replica, when it has several
            if worker is None:
                continue  # unloaded again in between: load once more
            idle_timeout = self._idle_timeout(record)
            try:
                upstream = await self._upstream.request(
                    worker.port, path, body, forwarded.items(), idle_timeout, host=worker.host
                )
            except UpstreamTimeout as exc:
                raise _timed_out(record, exc) from exc
            except UpstreamError as exc:
                self._upstream.forget(worker.port, worker.host)
                log.warning(
                    "worker unreachable",
                    extra={"model": record.model_id, "attempt": attempt + 1, "reason": str(exc)},
                )
                # Most often it died (killed, crashed, hung): give the pool the moment it
                # needs to notice and free it, so the next attempt loads a new worker
                # instead of knocking on the dead one's port again.
                released = await self._pool.wait_released(record, worker, WORKER_GONE_WAIT_SECONDS)
                unloaded_meanwhile = released and worker.left_on_request
                continue
            if upstream.status == 503 and attempt + 1 < ATTEMPTS:
                try:
                    content = await upstream.read()
                except UpstreamError:
                    content = b""
                if b'"model_unloading"' not in content and b'"model_unloaded"' not in content:
                    return Response(content, 503, headers=_reply_headers(record, upstream))
                # It was draining or force-unloaded: the next load brings a fresh worker.
                await self._wait_unloaded(record)
                continue
            return await self._respond(record, upstream, waited)
        if unloaded_meanwhile:
            # An operator's unloads (or evictions) kept winning the race: the model is
            # fine, the client may simply retry, as for a worker that answered
            # model_unloading.
            raise ApiError(
                503,
                f"Model '{record.model_id}' was unloaded while this request was on its way; retry.",
                type="server_error",
                code="model_unloaded",
                headers={"Retry-After": "1"},
            )
        raise ApiError(
            502,
            f"The worker for model '{record.model_id}' could not be reached.",
            type="server_error",
            code="worker_unreachable",
        )

    def _idle_timeout(self, record: ModelRecord) -> float | None:
        """The relay's own deadline: the longest a local worker may send nothing. It
        answers within the model's timeout_seconds (queueing included) or is killed as
        hung after hang_timeout_seconds; a remote model's pace is its server's."""
        if not record.spec.is_local:
            return None
        config = self._pool.config
        return record.spec.timeout_seconds + config.hang_timeout_seconds + RELAY_SLACK_SECONDS

    async def _wait_unloaded(self, record: ModelRecord) -> None:
        if record.unload_task is not None:
            await record.unload_task

    async def _respond(
        self, record: ModelRecord, upstream: UpstreamResponse, waited: float
    ) -> Response:
        headers = _reply_headers(record, upstream)
        # Why a request was slow, for clients and benchmarks: time spent getting the
        # model placed (queued for a slot, a busy model draining, the load) apart from
        # the worker's own.
        headers["server-timing"] = f"{SERVER_TIMING_WAIT};dur={waited * 1000:.1f}"
        is_stream = upstream.header("content-type").startswith("text/event-stream")
        if not is_stream:
            try:
                content = await upstream.read()
            except UpstreamTimeout as exc:
                raise _timed_out(record, exc) from exc
            except UpstreamError as exc:
                raise ApiError(
                    502,
                    f"The worker for model '{record.model_id}' failed while answering: "
                    f"{exc or type(exc).__name__}",
                    type="server_error",
                    code="worker_failed",
                ) from exc
            return Response(content, status_code=upstream.status, headers=headers)
        return RelayedStream(
            _relay_stream(record.model_id, upstream), upstream, upstream.status, headers
        )


class RelayedStream(StreamingResponse):
    """A relayed SSE stream, sent with less machinery than Starlette's own.

    StreamingResponse runs every stream in a task group, beside a task that listens for
    the client going away. Here a plain task waits for that and closes the connection to
    the worker: the relay loop ends, and the worker stops generating.
    """

    def __init__(
        self,
        chunks: AsyncIterator[bytes],
        upstream: UpstreamResponse,
        status_code: int,
        headers: dict[str, str],
    ) -> None:
        super().__init__(chunks, status_code=status_code, headers=headers)
        self._upstream = upstream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        watcher = asyncio.ensure_future(self._close_when_client_leaves(receive))
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": self.status_code,
                    "headers": self.raw_headers,
                }
            )
            async for chunk in self.body_iterator:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            pass  # the client went away; the watcher has closed the worker's connection
        finally:
            watcher.cancel()
            self._upstream.close()
            await close_stream(self.body_iterator)  # its `finally` runs now, not when collected

    async def _close_when_client_leaves(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self._upstream.close()


async def _then(chunks: AsyncIterable[Any], on_end: Callable[[], None]) -> AsyncIterator[Any]:
    """`chunks`, then `on_end()` once they are over: sent, broken off, or closed."""
    try:
        async for chunk in chunks:
            yield chunk
    finally:
        on_end()
        await close_stream(chunks)


async def _relay_stream(model_id: str, upstream: UpstreamResponse) -> AsyncIterator[bytes]:
    """Pass SSE bytes through; if the worker dies mid-stream, end with an error event."""
    try:
        async for chunk in upstream.body():
            yield chunk
    except UpstreamError as exc:
        log.warning("worker stream broke", extra={"model": model_id, "reason": str(exc)})
        error = ApiError(
            502,
            f"The worker for model '{model_id}' stopped in the middle of the stream.",
            type="server_error",
            code="worker_failed",
        )
        yield f"data: {json.dumps(error.body())}\n\n".encode()
    finally:
        # Also reached when our client went away: closing tells the worker to stop.
        upstream.close()


def _timed_out(record: ModelRecord, exc: UpstreamTimeout) -> ApiError:
    return ApiError(
        504,
        f"The worker for model '{record.model_id}' stopped answering ({exc}).",
        type="server_error",
        code="worker_timeout",
    )


def _reply_headers(record: ModelRecord, upstream: UpstreamResponse) -> dict[str, str]:
    headers = {k: v for k, v in upstream.headers if k not in _HOP_HEADERS}
    headers["x-pool-model"] = record.model_id  # which model served the request
    return headers


def _with_model(body: bytes, model_id: str) -> bytes:
    """The same request, addressed to another model (a fallback)."""
    payload = json.loads(body)
    payload["model"] = model_id
    return json.dumps(payload).encode()


def _reason(exc: PoolError | ApiError) -> str:
    code = exc.code or "error"
    return {
        "model_load_failed": "load_failed",
        "pool_full": "pool_full",
        "insufficient_memory": "pool_full",
    }.get(code, code)


def _read_payload(body: bytes) -> dict[str, Any]:
    """The request's JSON with its `model` field checked; the worker validates the rest."""
    try:
        payload: Any = json.loads(body)
    except ValueError:
        raise ApiError(400, "request body is not valid JSON", code="invalid_json") from None
    if not isinstance(payload, dict):
        raise ApiError(400, "request body must be a JSON object", code="invalid_json")
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model: a model id is required", param="model", code="invalid_value")
    return payload
