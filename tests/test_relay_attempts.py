"""The gateway's retry loop on its own: what a client gets when every attempt found the
worker's port closed. Stand-ins for the pool and the upstream connections, so that the
race an operator's unloads win against a request (tests/test_state.py hammers it with real
workers, where it is rare) happens every time here.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from model_service.errors import ApiError
from pool_manager import gateway
from pool_manager.gateway import Gateway
from pool_manager.upstream import UpstreamError


class StandInPool:
    """Loads at once, routes to a new worker each time, and has always let it go."""

    def __init__(self, left_on_request: bool) -> None:
        self.config = SimpleNamespace(response_cache_mb=0, semantic_cache_entries=0)
        self.left_on_request = left_on_request
        self.routed = 0

    async def load_record(self, record: Any) -> None:
        return None

    def route(self, record: Any, body: bytes) -> Any:
        self.routed += 1
        return SimpleNamespace(port=9, host="127.0.0.1", left_on_request=self.left_on_request)

    async def wait_released(self, record: Any, worker: Any, timeout: float) -> bool:
        return True


class ClosedPorts:
    def __init__(self) -> None:
        self.forgotten = 0

    async def request(self, *args: Any, **kwargs: Any) -> Any:
        raise UpstreamError("connection refused")

    def forget(self, port: int, host: str) -> None:
        self.forgotten += 1

    def close(self) -> None:
        return None


async def _relay(left_on_request: bool) -> tuple[ApiError, StandInPool]:
    pool = StandInPool(left_on_request)
    relay = Gateway(pool)  # type: ignore[arg-type]
    relay._upstream = ClosedPorts()  # type: ignore[assignment]
    record = SimpleNamespace(model_id="m", spec=SimpleNamespace(is_local=False))
    with pytest.raises(ApiError) as raised:
        await relay._relay_attempts(record, "/v1/chat/completions", b"{}", {})  # type: ignore[arg-type]
    return raised.value, pool


async def test_a_request_that_lost_every_race_to_an_unload_gets_503_with_retry_after() -> None:
    error, pool = await _relay(left_on_request=True)
    assert pool.routed == gateway.ATTEMPTS
    assert error.status == 503 and error.code == "model_unloaded"
    assert error.headers["Retry-After"] == "1"


async def test_a_worker_that_died_unasked_is_still_502() -> None:
    error, pool = await _relay(left_on_request=False)
    assert pool.routed == gateway.ATTEMPTS
    assert error.status == 502 and error.code == "worker_unreachable"
