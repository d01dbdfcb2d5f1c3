"""Reading the server-sent events the workers send (OpenAI's streams), for the manager's
routes that translate them into another protocol (Anthropic, Responses, Ollama), and
closing a relayed stream (which stops its generation)."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from typing import Any


async def sse_payloads(chunks: AsyncIterable[Any]) -> AsyncIterator[bytes]:
    """The `data:` payload of each event of an SSE byte stream, however it was split."""
    buffer = b""
    async for chunk in chunks:
        buffer += chunk.encode() if isinstance(chunk, str) else bytes(chunk)
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            data = b"\n".join(
                row[5:].strip() for row in event.split(b"\n") if row.startswith(b"data:")
            )
            if data:
                yield data


async def close_stream(iterator: Any) -> None:
    """Close a relayed stream (an async generator) if it can be: the worker then stops."""
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        await aclose()
