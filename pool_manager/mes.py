"""The Model Execution Service API of seed 000: `/v1/inference`, `/ready`, `/v1/status`.

`/v1/inference` is a single-shot call for backends that want one JSON answer: a prompt
and optional system prompt in, `{success, output, usage, latency_ms, model_id}` out. With
`json_schema`, decoding is constrained to the schema (llama.cpp grammar); the reply is
then parsed (also out of a markdown code fence) and validated with jsonschema, and a
reply that does not validate is `success: false` with the reason.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Any

import httpx
import jsonschema
import psutil
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr

from model_service.backends.kinds import KINDS
from model_service.errors import ApiError
from pool_manager.gateway import Gateway
from pool_manager.pool import ModelPool
from pool_manager.states import SERVING, ModelState

VERSION = "0.1.0"
REACHABLE_TIMEOUT_S = 2.0
_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.S)


class InferenceRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    # Strict: "10" is not 10, and true is not 1.
    model_id: StrictStr
    prompt: StrictStr = Field(min_length=1)
    system_prompt: StrictStr | None = None
    temperature: StrictFloat = Field(default=0.7, ge=0, le=2)
    max_tokens: StrictInt = Field(default=1000, ge=1, le=1_000_000)
    json_schema: dict[str, Any] | None = None
    timeout: StrictFloat = Field(default=30, ge=1, le=3600)  # seconds; under 1 s cannot work


class InferenceResponse(BaseModel):
    success: bool
    output: Any
    usage: dict[str, Any] | None
    latency_ms: int
    model_id: str
    error: str | None = None


def extract_json(text: str) -> Any:
    """Parse a JSON reply, also when wrapped in a markdown code fence. Raises ValueError."""
    fenced = _FENCE.search(text)
    return json.loads(fenced.group(1) if fenced else text)


class MesService:
    def __init__(self, pool: ModelPool, gateway: Gateway) -> None:
        self._pool = pool
        self._gateway = gateway

    async def infer(self, request: InferenceRequest, headers: dict[str, str]) -> InferenceResponse:
        """Run one chat completion. Raises ApiError for unknown models, load failures, 504."""
        started = time.perf_counter()
        messages = []
        if request.system_prompt:
            messages.append({"role": "system", "content": request.system_prompt})
        messages.append({"role": "user", "content": request.prompt})
        body: dict[str, Any] = {
            "model": request.model_id,
            "messages": messages,
            "temperature": request.temperature,
            "max_tokens": request.max_tokens,
        }
        if request.json_schema is not None:
            try:
                jsonschema.Draft202012Validator.check_schema(request.json_schema)
            except jsonschema.SchemaError as exc:
                raise ApiError(
                    400,
                    f"json_schema is not a valid JSON schema: {exc.message}",
                    param="json_schema",
                    code="invalid_value",
                ) from exc
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "output", "schema": request.json_schema},
            }
        try:
            async with asyncio.timeout(request.timeout):
                reply = await self._gateway.relay(
                    "/v1/chat/completions", json.dumps(body).encode(), headers
                )
        except TimeoutError:
            raise ApiError(
                504,
                f"inference did not finish within {request.timeout:g} s",
                type="timeout_error",
                code="timeout",
            ) from None
        payload = json.loads(bytes(reply.body))
        if reply.status_code != 200:
            error = payload.get("error", {})
            raise ApiError(
                reply.status_code,
                error.get("message", "inference failed"),
                type=error.get("type", "server_error"),
                code=error.get("code"),
            )
        text = payload["choices"][0]["message"]["content"]
        latency_ms = round((time.perf_counter() - started) * 1000)
        result = InferenceResponse(
            success=True,
            output=text,
            usage=payload.get("usage"),
            latency_ms=latency_ms,
            # The model that answered: a fallback of the chain, when it came to that.
            model_id=reply.headers.get("x-pool-model", request.model_id),
        )
        if request.json_schema is None:
            return result
        try:
            document = extract_json(text)
            jsonschema.validate(document, request.json_schema)
        except ValueError as exc:
            return result.model_copy(update={"success": False, "error": f"not JSON: {exc}"})
        except jsonschema.ValidationError as exc:
            return result.model_copy(
                update={"success": False, "error": f"does not match json_schema: {exc.message}"}
            )
        return result.model_copy(update={"output": document})

    def readiness(self) -> tuple[bool, str]:
        """Ready when start-up loading is over and every warmup model is HOT."""
        if not self._pool.warmup_done.is_set():
            return False, "warmup models are still loading"
        cold = [
            r.model_id
            for r in self._pool.records()
            if self._pool.is_pinned(r) and r.state not in SERVING
        ]
        if cold:
            return False, f"warmup models not serving: {', '.join(cold)}"
        return True, "ready"

    async def status(self) -> dict[str, Any]:
        records = self._pool.records()
        local = {name: True for name, kind in KINDS.items() if kind.local}
        backends = {**local, **await self._remote_backends_answer()}
        return {
            "models_loaded": [r.model_id for r in records if r.state in SERVING],
            "models_failed": [r.model_id for r in records if r.state is ModelState.FAILED],
            "memory_available_gb": round(psutil.virtual_memory().available / 2**30, 2),
            "gpu_available": self._pool.gpu.available,
            "backends": backends,
            "ollama_running": backends.get("ollama"),  # null: no ollama model registered
            "version": VERSION,
        }

    async def _remote_backends_answer(self) -> dict[str, bool]:
        """For each remote backend the registry uses: does every one of its servers answer?

        Ollama servers are asked `GET /api/version`, OpenAI-compatible ones `GET /models`
        (any reply below 500 counts: a 401 still says the server is up); 2 s each, all at
        once.
        """
        probes: dict[str, set[str]] = {}
        config = self._pool.config.model_dump()
        for record in self._pool.records():
            spec = record.spec
            url = KINDS[spec.backend].probe_url(spec.model_dump(), config)
            if url is not None:
                probes.setdefault(spec.backend, set()).add(url)
        if not probes:
            return {}
        async with httpx.AsyncClient(timeout=REACHABLE_TIMEOUT_S, trust_env=False) as client:

            async def answers(url: str) -> bool:
                try:
                    return (await client.get(url)).status_code < 500
                except httpx.HTTPError:
                    return False

            kinds = sorted(probes)
            checks = await asyncio.gather(
                *(asyncio.gather(*(answers(url) for url in sorted(probes[k]))) for k in kinds)
            )
        return {kind: all(results) for kind, results in zip(kinds, checks, strict=True)}
