"""Remote backends: a worker that serves a model another server runs.

- `openai`: any OpenAI-compatible server (vLLM, llama.cpp's llama-server, OpenAI,
  Gemini's OpenAI endpoint). Requests are forwarded with the model renamed and the API
  key read from the environment variable the registry entry names.
- `ollama`: an Ollama server. OpenAI requests are translated to `/api/chat` and
  `/api/generate` and the NDJSON replies back to OpenAI JSON / SSE. Loading warms the
  model with `keep_alive: -1`; unloading sends `keep_alive: 0`.

Embeddings (`/v1/embeddings`): the `openai` kind forwards them as they are (model
renamed); the `ollama` kind translates them to `/api/embed` and back (text inputs only:
Ollama takes no token ids). A server that has no embeddings route answers a clear 400.
Tools: the `openai` kind forwards them untouched; the `ollama` kind translates `tools`,
assistant `tool_calls` (arguments: OpenAI's JSON string, Ollama's object) and `tool`
messages (`tool_call_id` becomes the called function's `tool_name`), and Ollama's calls
back, each with an id of ours. Ollama has no `tool_choice`: "none" leaves the tools out;
"required" or a named function travel as an extra field, which Ollama ignores (its model
decides) and this pool's own Ollama API honours.

The worker process, its port, TTL, drain and metrics stay as for local models, so the
pool treats every model alike.
"""

from __future__ import annotations

import base64
import contextlib
import json
import struct
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx

from model_service.backends.base import BackendError
from model_service.errors import ApiError
from model_service.protocol import SSE_DONE, new_completion_id, unix_now
from model_service.secrets import redact_url


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
        # For messages and /health: the URL's password, if any, masked.
        self.shown_url = redact_url(self.base_url)
        # Read by the manager from the entry's api_key_env or api_key_file.
        self._api_key = settings.get("api_key") or None
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
                f"{self.kind} server at {self.shown_url} is not reachable: "
                f"{exc or type(exc).__name__}"
            ) from exc
        if reply.status_code >= 400:
            raise BackendError(
                f"{self.kind} server at {self.shown_url} refused the model "
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

    async def embed(self, body: dict[str, Any]) -> tuple[int, Any]:
        """POST /v1/embeddings, `body` already validated: (status, JSON in OpenAI's shape).

        Raises ApiError 400 for what the remote cannot embed (token ids for Ollama, a
        server without an embeddings route), 502 when it cannot be reached.
        """
        truncate = bool(body.pop("truncate", False))  # our extension: OpenAI has none
        if self.kind == "openai":
            reply = await self._post("/embeddings", {**body, "model": self.remote_name})
            data = _json_or_error(reply)
            if reply.status_code in (404, 405):
                raise ApiError(
                    400,
                    f"the openai server at {self.shown_url} does not serve embeddings "
                    f"(HTTP {reply.status_code} on /embeddings)",
                    param="model",
                    code="embeddings_unsupported",
                )
            if reply.status_code == 200 and isinstance(data, dict):
                data["model"] = self.model_id
            return reply.status_code, data
        inputs = body["input"]
        texts = [inputs] if isinstance(inputs, str) else list(inputs)
        if not all(isinstance(text, str) for text in texts):
            raise ApiError(
                400,
                "this model runs on an Ollama server, which embeds text only: send the "
                "input as a string or a list of strings, not token ids",
                param="input",
                code="invalid_value",
            )
        payload: dict[str, Any] = {"model": self.remote_name, "input": texts, "truncate": truncate}
        if body.get("dimensions"):
            payload["dimensions"] = body["dimensions"]
        reply = await self._post("/api/embed", payload)
        data = _json_or_error(reply)
        if reply.status_code != 200:
            return reply.status_code, _ollama_error(reply.status_code, data)
        tokens = int(data.get("prompt_eval_count") or 0)
        encoding = body.get("encoding_format", "float")
        return 200, {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": _encoded(vector, encoding)}
                for i, vector in enumerate(data.get("embeddings") or [])
            ],
            "model": self.model_id,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

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
            message = f"the {self.kind} server at {self.shown_url} failed mid-stream: {exc!r}"
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
        calls = 0  # tool calls sent so far: each one's index in the stream
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
                chunk = _ollama_chunk(route, self.model_id, completion_id, created, part)
                if route == "chat/completions":
                    calls = _add_stream_calls(chunk, part, calls)
                yield _sse(chunk)
        yield SSE_DONE

    async def _post(self, path: str, payload: dict[str, Any]) -> httpx.Response:
        try:
            return await self._client.post(
                f"{self.base_url}{path}", json=payload, headers=self._headers()
            )
        except httpx.HTTPError as exc:
            raise ApiError(
                502,
                f"the {self.kind} server at {self.shown_url} failed: {exc or type(exc).__name__}",
                type="server_error",
                code="upstream_failed",
            ) from exc


def _encoded(vector: list[float], encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector


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
        payload["messages"] = _ollama_messages(body.get("messages", []))
        choice = body.get("tool_choice")
        if body.get("tools") and choice != "none":
            payload["tools"] = body["tools"]  # Ollama's tools are OpenAI's function tools
            if choice not in (None, "auto"):
                payload["tool_choice"] = choice
        return "/api/chat", payload
    prompt = body.get("prompt")
    payload["prompt"] = prompt[0] if isinstance(prompt, list) else prompt
    return "/api/generate", payload


def _ollama_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI chat messages as Ollama's: tool calls with object arguments, and tool
    results named by the function called (Ollama's `tool_name`) instead of a call id."""
    names: dict[str, str] = {}  # call id -> function name, from the assistant turns
    out = []
    for message in messages:
        role = message.get("role")
        item: dict[str, Any] = {"role": role, "content": _text(message.get("content"))}
        calls = message.get("tool_calls") or []
        if role == "assistant" and calls:
            item["tool_calls"] = []
            for call in calls:
                function = call.get("function") or {}
                names[str(call.get("id"))] = str(function.get("name", ""))
                item["tool_calls"].append(
                    {
                        "function": {
                            "name": function.get("name", ""),
                            "arguments": _arguments_object(function.get("arguments")),
                        }
                    }
                )
        if role == "tool":
            name = names.get(str(message.get("tool_call_id"))) or message.get("name")
            if name:
                item["tool_name"] = name
        out.append(item)
    return out


def _arguments_object(arguments: Any) -> Any:
    """OpenAI's arguments (a JSON string) as the object Ollama wants."""
    if isinstance(arguments, str):
        try:
            return json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            return arguments  # not JSON: Ollama gets what the client sent
    return arguments if arguments is not None else {}


def _openai_calls(calls: list[dict[str, Any]], first_index: int = 0) -> list[dict[str, Any]]:
    """Ollama's tool calls as OpenAI's: an id of ours, arguments as a JSON string."""
    out = []
    for n, call in enumerate(calls):
        function = call.get("function") or {}
        arguments = function.get("arguments")
        out.append(
            {
                "index": first_index + n,
                "id": call.get("id") or f"call_{uuid.uuid4().hex[:24]}",
                "type": "function",
                "function": {
                    "name": function.get("name", ""),
                    "arguments": arguments
                    if isinstance(arguments, str)
                    else json.dumps(arguments if arguments is not None else {}),
                },
            }
        )
    return out


def _add_stream_calls(chunk: dict[str, Any], part: dict[str, Any], sent: int) -> int:
    """Put the tool calls of an Ollama stream line into its OpenAI chunk (Ollama sends a
    call whole, in one line: one delta each); the last chunk finishes with "tool_calls"
    once any were sent. Returns how many calls the stream has sent so far."""
    calls = (part.get("message") or {}).get("tool_calls") or []
    choice = chunk["choices"][0]
    if calls:
        choice["delta"]["tool_calls"] = _openai_calls(calls, sent)
        sent += len(calls)
    if part.get("done") and sent:
        choice["finish_reason"] = "tool_calls"
    return sent


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
        message = data.get("message") or {}
        content = message.get("content", "")
        reply: dict[str, Any] = {"role": "assistant", "content": content}
        calls = message.get("tool_calls") or []
        if calls:
            reply["content"] = content or None
            reply["tool_calls"] = [
                {k: v for k, v in call.items() if k != "index"} for call in _openai_calls(calls)
            ]
        return {
            "id": new_completion_id("chatcmpl"),
            "object": "chat.completion",
            "created": created,
            "model": model_id,
            "choices": [
                {
                    "index": 0,
                    "message": reply,
                    "finish_reason": "tool_calls" if calls else _finish(data),
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
