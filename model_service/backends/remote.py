"""Remote backends: a worker that serves a model another server runs.

- `openai`: any OpenAI-compatible server (vLLM, llama.cpp's llama-server, OpenAI,
  Gemini's OpenAI endpoint). Requests are forwarded with the model renamed and the API
  key read from the environment variable the registry entry names.
- `ollama`: an Ollama server. OpenAI requests are translated to `/api/chat` and
  `/api/generate` and the NDJSON replies back to OpenAI JSON / SSE. Loading warms the
  model with `keep_alive: -1`; unloading sends `keep_alive: 0`.

The worker process, its port, TTL, drain and metrics stay as for local models, so the
pool treats every model alike.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import AsyncIterator
from typing import Any

import httpx

from model_service.backends.base import BackendError
from model_service.errors import ApiError
from model_service.protocol import SSE_DONE, new_completion_id, unix_now

REMOTE_BACKENDS = frozenset({"openai", "ollama"})


class RemoteModel:
    """What a worker needs to reach one remote model. Methods raise ApiError for clients."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.model_id = str(settings["model_id"])
        self.kind = str(settings["backend"])
        self.remote_name = str(settings.get("remote_model") or self.model_id)
        base = settings.get("base_url") or (
            settings.get("ollama_base_url") if self.kind == "ollama" else None
        )
        if not base:
            raise BackendError(f"a {self.kind} model needs base_url")
        self.base_url = str(base).rstrip("/")
        key_env = settings.get("api_key_env")
        self._api_key = os.environ.get(str(key_env)) if key_env else None
        if key_env and not self._api_key:
            raise BackendError(f"environment variable {key_env} (the API key) is not set")
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=5.0))

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}

    # --- load / unload ----------------------------------------------------------------------

    def load(self) -> None:
        """Check the remote answers (and warm an Ollama model). Blocks; raises BackendError."""
        try:
            if self.kind == "ollama":
                reply = httpx.post(
                    f"{self.base_url}/api/generate",
                    timeout=120,
                    json={"model": self.remote_name, "keep_alive": -1},
                )
            else:
                reply = httpx.get(f"{self.base_url}/models", headers=self._headers(), timeout=30)
        except httpx.HTTPError as exc:
            raise BackendError(
                f"{self.kind} server at {self.base_url} is not reachable: "
                f"{exc or type(exc).__name__}"
            ) from exc
        if reply.status_code >= 400:
            raise BackendError(
                f"{self.kind} server at {self.base_url} refused the model "
                f"'{self.remote_name}': HTTP {reply.status_code} {reply.text[:200]}"
            )

    def unload(self) -> None:
        if self.kind == "ollama":
            # If the server is gone there is nothing left to unload.
            with contextlib.suppress(httpx.HTTPError):
                httpx.post(
                    f"{self.base_url}/api/generate",
                    timeout=30,
                    json={"model": self.remote_name, "keep_alive": 0},
                )

    # --- requests ---------------------------------------------------------------------------

    async def forward(self, route: str, body: dict[str, Any]) -> tuple[int, Any]:
        """A non-streamed request: (status, JSON body in OpenAI's shape)."""
        if self.kind == "openai":
            reply = await self._post(f"/{route}", {**body, "model": self.remote_name})
            data = _json_or_error(reply)
            if reply.status_code == 200 and isinstance(data, dict):
                data["model"] = self.model_id
            return reply.status_code, data
        path, payload = _to_ollama(route, body, self.remote_name, stream=False)
        reply = await self._post(path, payload)
        data = _json_or_error(reply)
        if reply.status_code != 200:
            return reply.status_code, _ollama_error(reply.status_code, data)
        return 200, _from_ollama(route, self.model_id, data)

    async def stream(self, route: str, body: dict[str, Any]) -> AsyncIterator[bytes]:
        """A streamed request, as OpenAI SSE frames ending in `data: [DONE]`.

        An upstream error, before or during the stream, becomes one SSE error event in
        OpenAI's shape (no `[DONE]`), as for a local model.
        """
        try:
            if self.kind == "openai":
                async for chunk in self._stream_openai(route, body):
                    yield chunk
            else:
                async for chunk in self._stream_ollama(route, body):
                    yield chunk
        except (httpx.HTTPError, ValueError) as exc:
            message = f"the {self.kind} server at {self.base_url} failed mid-stream: {exc!r}"
            yield _sse(
                {"error": {"message": message, "type": "server_error", "code": "upstream_failed"}}
            )

    async def _stream_openai(self, route: str, body: dict[str, Any]) -> AsyncIterator[bytes]:
        payload = {**body, "model": self.remote_name}
        async with self._client.stream(
            "POST", f"{self.base_url}/{route}", json=payload, headers=self._headers()
        ) as reply:
            if reply.status_code != 200:
                content = await reply.aread()
                yield _sse(_json_or_error(httpx.Response(reply.status_code, content=content)))
                return
            async for chunk in reply.aiter_raw():
                yield chunk

    async def _stream_ollama(self, route: str, body: dict[str, Any]) -> AsyncIterator[bytes]:
        path, payload = _to_ollama(route, body, self.remote_name, stream=True)
        completion_id, created = new_completion_id("chatcmpl"), unix_now()
        async with self._client.stream("POST", f"{self.base_url}{path}", json=payload) as reply:
            if reply.status_code != 200:
                content = await reply.aread()
                data = _json_or_error(httpx.Response(reply.status_code, content=content))
                yield _sse(_ollama_error(reply.status_code, data))
                return
            async for line in reply.aiter_lines():
                if not line.strip():
                    continue
                part = json.loads(line)
                yield _sse(_ollama_chunk(route, self.model_id, completion_id, created, part))
        yield SSE_DONE

    async def _post(self, path: str, payload: dict[str, Any]) -> httpx.Response:
        try:
            return await self._client.post(
                f"{self.base_url}{path}", json=payload, headers=self._headers()
            )
        except httpx.HTTPError as exc:
            raise ApiError(
                502,
                f"the {self.kind} server at {self.base_url} failed: {exc or type(exc).__name__}",
                type="server_error",
                code="upstream_failed",
            ) from exc


def _sse(data: Any) -> bytes:
    return f"data: {json.dumps(data)}\n\n".encode()


def _json_or_error(reply: httpx.Response) -> Any:
    try:
        return reply.json()
    except ValueError:
        return {"error": {"message": reply.text[:500], "type": "server_error"}}


def _ollama_error(status: int, data: Any) -> dict[str, Any]:
    message = data.get("error") if isinstance(data, dict) else None
    if isinstance(message, dict):
        return {"error": message}
    return {
        "error": {
            "message": str(message or f"Ollama answered {status}"),
            "type": "invalid_request_error" if status < 500 else "server_error",
            "param": None,
            "code": "upstream_error",
        }
    }


def _options(body: dict[str, Any]) -> dict[str, Any]:
    names = {
        "temperature": "temperature",
        "top_p": "top_p",
        "seed": "seed",
        "stop": "stop",
        "max_tokens": "num_predict",
        "max_completion_tokens": "num_predict",
        "presence_penalty": "presence_penalty",
        "frequency_penalty": "frequency_penalty",
    }
    options = {names[k]: v for k, v in body.items() if k in names and v is not None}
    if isinstance(options.get("stop"), str):
        options["stop"] = [options["stop"]]
    return options


def _format(body: dict[str, Any]) -> Any:
    response_format = body.get("response_format") or {}
    if response_format.get("type") == "json_object":
        return "json"
    if response_format.get("type") == "json_schema":
        return (response_format.get("json_schema") or {}).get("schema") or "json"
    return None


def _to_ollama(
    route: str, body: dict[str, Any], remote_name: str, stream: bool
) -> tuple[str, dict[str, Any]]:
    payload: dict[str, Any] = {"model": remote_name, "stream": stream, "options": _options(body)}
    fmt = _format(body)
    if fmt is not None:
        payload["format"] = fmt
    if route == "chat/completions":
        payload["messages"] = [
            {"role": m.get("role"), "content": _text(m.get("content"))}
            for m in body.get("messages", [])
        ]
        return "/api/chat", payload
    prompt = body.get("prompt")
    payload["prompt"] = prompt[0] if isinstance(prompt, list) else prompt
    return "/api/generate", payload


def _text(content: Any) -> str:
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content or "")


def _finish(part: dict[str, Any]) -> str:
    return "length" if part.get("done_reason") == "length" else "stop"


def _usage(part: dict[str, Any]) -> dict[str, int]:
    prompt, completion = int(part.get("prompt_eval_count", 0)), int(part.get("eval_count", 0))
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _from_ollama(route: str, model_id: str, data: dict[str, Any]) -> dict[str, Any]:
    created = unix_now()
    if route == "chat/completions":
        content = (data.get("message") or {}).get("content", "")
        return {
            "id": new_completion_id("chatcmpl"),
            "object": "chat.completion",
            "created": created,
            "model": model_id,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": _finish(data),
                    "logprobs": None,
                }
            ],
            "usage": _usage(data),
        }
    return {
        "id": new_completion_id("cmpl"),
        "object": "text_completion",
        "created": created,
        "model": model_id,
        "choices": [
            {
                "index": 0,
                "text": data.get("response", ""),
                "finish_reason": _finish(data),
                "logprobs": None,
            }
        ],
        "usage": _usage(data),
    }


def _ollama_chunk(
    route: str, model_id: str, completion_id: str, created: int, part: dict[str, Any]
) -> dict[str, Any]:
    done = bool(part.get("done"))
    if route == "chat/completions":
        piece = (part.get("message") or {}).get("content", "")
        return {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model_id,
            "choices": [
                {
                    "index": 0,
                    "delta": {} if done else {"content": piece},
                    "finish_reason": _finish(part) if done else None,
                }
            ],
            **({"usage": _usage(part)} if done else {}),
        }
    return {
        "id": completion_id,
        "object": "text_completion",
        "created": created,
        "model": model_id,
        "choices": [
            {
                "index": 0,
                "text": part.get("response", ""),
                "finish_reason": _finish(part) if done else None,
            }
        ],
        **({"usage": _usage(part)} if done else {}),
    }
