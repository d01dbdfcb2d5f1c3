"""The L1 response cache (issue 17): an answer a deterministic request already got.

Opt-in, per model (registry `cache_ttl_seconds`) or per request (header
`x-pool-cache-ttl: SECONDS`; `x-pool-cache: off` skips the cache). Only requests whose
answer is determined by the request are cached: `temperature` 0 or a `seed`, one choice,
not streamed. The key is a SHA-256 of the route, the model's id and the request's JSON
with its keys sorted (so spacing and key order do not matter). A hit is the stored reply,
byte for byte, with `x-pool-cache: hit`; the worker is not asked. Entries live in this
manager's memory, least recently used dropped first past `response_cache_mb`.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

CACHE_HEADER = "x-pool-cache"
TTL_HEADER = "x-pool-cache-ttl"
MAX_TTL_SECONDS = 30 * 86400.0
CACHED_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
# Reply headers worth replaying; the rest (dates, rate limits) belong to the new reply.
_KEPT_HEADERS = ("content-type", "x-pool-model")


@dataclass(frozen=True)
class CachedReply:
    body: bytes
    headers: dict[str, str]
    expires_at: float
    prompt_tokens: int
    completion_tokens: int

    @property
    def size(self) -> int:
        return len(self.body) + 256


def cache_ttl(headers: dict[str, str], model_ttl: float | None) -> float | None:
    """How long to keep this request's answer; None: not cached. The request's header
    wins over the model's setting."""
    if headers.get(CACHE_HEADER, "").strip().lower() == "off":
        return None
    asked = headers.get(TTL_HEADER)
    if asked is not None:
        try:
            seconds = float(asked)
        except ValueError:
            return None
        return min(seconds, MAX_TTL_SECONDS) if seconds > 0 else None
    return model_ttl


def request_key(path: str, model_id: str, payload: Any) -> str | None:
    """The cache key of a deterministic request; None for one that is not."""
    if path not in CACHED_PATHS or not isinstance(payload, dict):
        return None
    if payload.get("stream") or payload.get("n", 1) != 1:
        return None
    deterministic = payload.get("temperature") == 0 or payload.get("seed") is not None
    if not deterministic:
        return None
    normal = {k: v for k, v in payload.items() if k not in ("model", "user", "stream")}
    text = json.dumps([path, model_id, normal], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


class ResponseCache:
    """Owns the stored replies. One event loop; nothing here waits."""

    def __init__(self, max_bytes: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_bytes = max_bytes
        self._clock = clock
        self._entries: OrderedDict[str, CachedReply] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> CachedReply | None:
        entry = self._entries.get(key)
        if entry is None or entry.expires_at <= self._clock():
            if entry is not None:
                self._drop(key)
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry

    def put(self, key: str, body: bytes, headers: dict[str, str], ttl: float) -> None:
        """Keep a 200 reply's body for `ttl` seconds (one larger than the cache is not)."""
        try:
            usage = json.loads(body).get("usage") or {}
        except (ValueError, AttributeError):
            return  # not a JSON object: nothing a client of this route expects
        entry = CachedReply(
            body=body,
            headers={k: v for k, v in headers.items() if k in _KEPT_HEADERS},
            expires_at=self._clock() + ttl,
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
        )
        if entry.size > self.max_bytes:
            return
        if key in self._entries:
            self._drop(key)
        self._entries[key] = entry
        self._bytes += entry.size
        while self._bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key)
        self._bytes -= entry.size

    @property
    def entries(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:
        return self._bytes
