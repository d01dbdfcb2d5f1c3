"""Callers' limits (issue 17): requests per hour, tokens per minute, requests at once.

`Quotas` owns the counters, in this manager's memory (several managers sharing one
database each count their own traffic). Windows slide: a request counts for the hour
after it was admitted, tokens for the minute after its request ended (they are known
only then, so one request may pass a tokens-per-minute limit; the next waits). A refusal
is 429 with Retry-After and OpenAI's `x-ratelimit-*` headers; an admitted request's
reply carries the same headers.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from pool_manager.identity import Caller, Limits
from pool_manager.pool import PoolError

HOUR = 3600.0
MINUTE = 60.0
CONCURRENCY_RETRY_SECONDS = 1.0


class RateLimited(PoolError):
    """A caller over one of its limits; `error_type` names which (as OpenAI's do)."""

    status, code = 429, "rate_limit_exceeded"

    def __init__(
        self, message: str, *, kind: str, retry_after: float, headers: dict[str, str]
    ) -> None:
        super().__init__(message, retry_after=retry_after)
        self.error_type = kind
        self.headers.update(headers)


def duration(seconds: float) -> str:
    """OpenAI's reset format: '6m0s', '1s', '120ms'."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    whole = math.ceil(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


@dataclass
class _Window:
    """One scope's counters: a caller's, or a caller's for one model."""

    admitted: deque[float] = field(default_factory=deque)  # when each request was admitted
    tokens: deque[tuple[float, int]] = field(default_factory=deque)  # (when, how many)
    tokens_sum: int = 0
    running: int = 0

    def expire(self, now: float) -> None:
        while self.admitted and self.admitted[0] <= now - HOUR:
            self.admitted.popleft()
        while self.tokens and self.tokens[0][0] <= now - MINUTE:
            self.tokens_sum -= self.tokens.popleft()[1]

    def tokens_free_in(self, limit: int, now: float) -> float:
        """Seconds until the tokens counted in the last minute are under `limit`."""
        left = self.tokens_sum
        for when, count in self.tokens:
            if left < limit:
                break
            left -= count
            wait = when + MINUTE - now
            if left < limit:
                return max(0.0, wait)
        return 0.0

    @property
    def idle(self) -> bool:
        return not (self.admitted or self.tokens or self.running)


@dataclass
class Grant:
    """An admitted request's place in its windows; `release` once it has ended."""

    windows: list[_Window]
    headers: dict[str, str]
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            for window in self.windows:
                window.running -= 1


NO_GRANT = Grant([], {})


class Quotas:
    """The counters behind every caller's limits. One event loop; no awaits inside."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._windows: dict[tuple[str, str | None], _Window] = {}

    def admit(self, caller: Caller, model_id: str) -> Grant:
        """Count one request of `caller` to `model_id`; raises RateLimited (nothing
        counted) when a limit of the caller's, or of the caller's for that model, is
        reached."""
        if caller.limits is None:
            return NO_GRANT
        now = self._clock()
        scopes = [(caller.limits, self._window(caller.id, None, now))]
        for_model = caller.limits.for_model(model_id)
        if for_model is not None:
            scopes.append((for_model, self._window(caller.id, model_id, now)))
        for limits, window in scopes:
            self._check(caller, model_id, limits, window, now, scoped=limits is for_model)
        for _limits, window in scopes:
            window.admitted.append(now)
            window.running += 1
        limits, window = scopes[-1]  # the narrowest scope's figures go in the headers
        return Grant([w for _, w in scopes], _headers(limits, window, now))

    def charge_tokens(self, caller: Caller, model_id: str, tokens: int) -> None:
        """Count the tokens of a request that ended (prompt and completion)."""
        if caller.limits is None or tokens <= 0:
            return
        now = self._clock()
        keys: list[tuple[str, str | None]] = [(caller.id, None)]
        if caller.limits.for_model(model_id) is not None:
            keys.append((caller.id, model_id))
        for key in keys:
            window = self._window(*key, now)
            window.tokens.append((now, tokens))
            window.tokens_sum += tokens

    def _window(self, caller_id: str, model_id: str | None, now: float) -> _Window:
        window = self._windows.setdefault((caller_id, model_id), _Window())
        window.expire(now)
        if len(self._windows) > 10_000:
            self._forget_idle(now)
        return window

    def _forget_idle(self, now: float) -> None:
        for key, window in list(self._windows.items()):
            window.expire(now)
            if window.idle:
                del self._windows[key]

    def _check(
        self,
        caller: Caller,
        model_id: str,
        limits: Limits,
        window: _Window,
        now: float,
        scoped: bool,
    ) -> None:
        where = f" for model '{model_id}'" if scoped else ""
        per_hour = limits.requests_per_hour
        if per_hour is not None and len(window.admitted) >= per_hour:
            wait = window.admitted[-per_hour] + HOUR - now if per_hour else HOUR
            self._refuse(
                f"Rate limit reached for {caller.id}{where}: {per_hour} requests per hour. "
                f"Try again in {duration(wait)}.",
                "requests",
                wait,
                limits,
                window,
                now,
            )
        per_minute = limits.tokens_per_minute
        if per_minute is not None and window.tokens_sum >= per_minute:
            wait = window.tokens_free_in(per_minute, now) if per_minute else MINUTE
            self._refuse(
                f"Rate limit reached for {caller.id}{where}: {per_minute} tokens per minute "
                f"(used {window.tokens_sum}). Try again in {duration(wait)}.",
                "tokens",
                wait,
                limits,
                window,
                now,
            )
        at_once = limits.concurrent_requests
        if at_once is not None and window.running >= at_once:
            self._refuse(
                f"Concurrency limit reached for {caller.id}{where}: {at_once} requests at "
                "once. Try again when one has finished.",
                "concurrent_requests",
                CONCURRENCY_RETRY_SECONDS,
                limits,
                window,
                now,
            )

    @staticmethod
    def _refuse(
        message: str, kind: str, wait: float, limits: Limits, window: _Window, now: float
    ) -> None:
        headers = _headers(limits, window, now)
        raise RateLimited(message, kind=kind, retry_after=max(wait, 0.001), headers=headers)


def _headers(limits: Limits, window: _Window, now: float) -> dict[str, str]:
    """OpenAI's x-ratelimit-* headers for one window (the limits that are set)."""
    headers = {}
    if limits.requests_per_hour is not None:
        limit = limits.requests_per_hour
        reset = window.admitted[0] + HOUR - now if window.admitted else 0.0
        headers["x-ratelimit-limit-requests"] = str(limit)
        headers["x-ratelimit-remaining-requests"] = str(max(0, limit - len(window.admitted)))
        headers["x-ratelimit-reset-requests"] = duration(reset)
    if limits.tokens_per_minute is not None:
        limit = limits.tokens_per_minute
        reset = window.tokens[-1][0] + MINUTE - now if window.tokens else 0.0
        headers["x-ratelimit-limit-tokens"] = str(limit)
        headers["x-ratelimit-remaining-tokens"] = str(max(0, limit - window.tokens_sum))
        headers["x-ratelimit-reset-tokens"] = duration(reset)
    return headers
