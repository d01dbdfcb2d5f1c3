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

import numpy as np

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

    @classmethod
    def of(cls, body: bytes, headers: dict[str, str], expires_at: float) -> CachedReply | None:
        """A 200 reply to keep; None for a body that is not a JSON object."""
        try:
            usage = json.loads(body).get("usage") or {}
        except (ValueError, AttributeError):
            return None
        return cls(
            body=body,
            headers={k: v for k, v in headers.items() if k in _KEPT_HEADERS},
            expires_at=expires_at,
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
        )


def cache_refused(headers: dict[str, str]) -> bool:
    """The request says `x-pool-cache: off`: neither cache answers or keeps it."""
    return headers.get(CACHE_HEADER, "").strip().lower() == "off"


def cache_ttl(headers: dict[str, str], model_ttl: float | None) -> float | None:
    """How long to keep this request's answer; None: not cached. The request's header
    wins over the model's setting."""
    if cache_refused(headers):
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
        entry = CachedReply.of(body, headers, self._clock() + ttl)
        if entry is None or entry.size > self.max_bytes:
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


# --- L2: semantic ---------------------------------------------------------------------------

SEMANTIC_PATH = "/v1/chat/completions"


def single_turn(payload: dict[str, Any]) -> tuple[str, str] | None:
    """The prompt of a single-turn chat request and the key of everything else about it
    (model settings, system prompt); None for anything else (several turns, tools,
    images, a stream, several choices): only one question, asked alone, may be answered
    by a similar one's answer."""
    messages = payload.get("messages")
    if payload.get("stream") or payload.get("n", 1) != 1 or payload.get("tools"):
        return None
    if not isinstance(messages, list) or not messages:
        return None
    *before, last = messages
    if not isinstance(last, dict) or last.get("role") != "user":
        return None
    if any(not isinstance(m, dict) or m.get("role") not in ("system", "developer") for m in before):
        return None
    prompt = last.get("content")
    if not isinstance(prompt, str) or not prompt.strip():
        return None
    rest = {k: v for k, v in payload.items() if k not in ("messages", "model", "user", "stream")}
    text = json.dumps([before, rest], sort_keys=True, separators=(",", ":"))
    return prompt, hashlib.sha256(text.encode()).hexdigest()


@dataclass
class _Similar:
    """The answers of one model in one context (settings, system prompt), by prompt."""

    vectors: Any  # numpy float32 [n, dim], each of unit length
    replies: list[CachedReply]


class SemanticCache:
    """Owns the L2 entries: a reply kept with its prompt's embedding. A lookup finds
    the most similar prompt asked in the same context; at or above the threshold its
    reply is the answer. It can replay an answer to a question that only looks alike
    (the documented caveat): opt-in, per model, with a threshold."""

    def __init__(self, max_entries: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_entries = max_entries
        self._clock = clock
        self._groups: OrderedDict[tuple[str, str], _Similar] = OrderedDict()
        self._count = 0

    def lookup(
        self, model_id: str, context: str, vector: Any, threshold: float
    ) -> tuple[CachedReply, float] | None:
        """The kept reply whose prompt is the most similar to `vector` (cosine), and the
        similarity, if at least `threshold` and not expired."""
        group = self._groups.get((model_id, context))
        if group is None:
            return None
        self._expire(group)
        if not group.replies:
            return None
        query = _unit(np.asarray(vector, dtype=np.float32))
        scores = group.vectors @ query
        best = int(np.argmax(scores))
        similarity = float(scores[best])
        if similarity < threshold:
            return None
        self._groups.move_to_end((model_id, context))
        return group.replies[best], similarity

    def put(
        self,
        model_id: str,
        context: str,
        vector: Any,
        body: bytes,
        headers: dict[str, str],
        ttl: float,
    ) -> None:
        """Keep a 200 reply with its prompt's embedding for `ttl` seconds."""
        reply = CachedReply.of(body, headers, self._clock() + ttl)
        if reply is None:
            return
        row = _unit(np.asarray(vector, dtype=np.float32))[None, :]
        group = self._groups.get((model_id, context))
        if group is None or group.vectors.shape[1] != row.shape[1]:
            if group is not None:
                self._count -= len(group.replies)
            group = self._groups[(model_id, context)] = _Similar(row, [reply])
        else:
            group.vectors = np.vstack([group.vectors, row])
            group.replies.append(reply)
        self._count += 1
        while self._count > self.max_entries and self._groups:
            self._drop_oldest()

    def _expire(self, group: _Similar) -> None:
        now = self._clock()
        keep = [i for i, r in enumerate(group.replies) if r.expires_at > now]
        if len(keep) != len(group.replies):
            self._count -= len(group.replies) - len(keep)
            group.vectors = group.vectors[keep]
            group.replies = [group.replies[i] for i in keep]

    def _drop_oldest(self) -> None:
        """The least recently used context loses its oldest entry."""
        key = next(iter(self._groups))
        group = self._groups[key]
        group.vectors = group.vectors[1:]
        group.replies.pop(0)
        self._count -= 1
        if not group.replies:
            del self._groups[key]

    @property
    def entries(self) -> int:
        return self._count


def _unit(vector: Any) -> Any:
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else vector
