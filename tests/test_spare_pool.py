"""SparePool's timing on its own: when a taken spare's replacement starts.

The workers here are stand-ins with only what SparePool reads of a WorkerProcess (its
first request and exit as futures the test settles), so that "not before" can be
asserted without a clock race; tests/test_preload.py covers the same with real workers.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from pool_manager import spares
from pool_manager.spares import SparePool


class StandInWorker:
    """What SparePool uses of a WorkerProcess; `first_request` is settled by the test."""

    def __init__(self) -> None:
        self.returncode: int | None = None
        self.preloaded: list[str] = []
        self.preload_sent: Any = None
        self.is_warm_spare = True
        self.reserved_bytes = 0
        self.first_request: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def preload(self, paths: list[str], first_settings: Any = None) -> None:
        self.preloaded = list(paths)

    async def wait_first_request(self, timeout: float) -> None:
        await asyncio.wait({self.first_request}, timeout=timeout)

    def kill(self) -> None:
        self.returncode = -9

    async def wait_exit(self) -> int:
        return self.returncode or 0


async def _pool_with_one_spare(
    urgent: list[bool] | None = None,
) -> tuple[SparePool, list[StandInWorker]]:
    """A pool of one spare; `urgent` collects how each later one was started."""
    started: list[StandInWorker] = []

    async def start_spare(urgent_start: bool = False, **_: Any) -> Any:
        started.append(StandInWorker())
        if urgent is not None and len(started) > 1:
            urgent.append(urgent_start)
        return started[-1]

    pool = SparePool(1, lambda **kw: start_spare(kw.get("urgent", False)))
    pool.refill()
    await _until(lambda: pool.count == 1)
    return pool, started


async def _until(condition: Any, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def test_the_replacement_starts_once_the_taken_spares_first_request_ended(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(spares, "REPLACEMENT_DEFER_SECONDS", 60.0)
    pool, started = await _pool_with_one_spare()
    taken = await pool.take()
    assert taken is started[0]
    for _ in range(20):  # the refill task gets every chance to run, and waits
        await asyncio.sleep(0)
    assert len(started) == 1 and pool.count == 0, "no replacement during the first request"
    started[0].first_request.set_result(None)
    await _until(lambda: pool.count == 1)
    assert len(started) == 2
    await pool.close()


async def test_the_replacement_starts_after_the_limit_when_no_request_comes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(spares, "REPLACEMENT_DEFER_SECONDS", 0.05)
    pool, started = await _pool_with_one_spare()
    await pool.take()
    await _until(lambda: pool.count == 1)  # the first request never ends
    assert len(started) == 2
    await pool.close()


async def test_a_load_that_finds_no_spare_starts_an_urgent_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its import then runs at normal priority: on a busy machine a low-priority one
    would starve while the load waits (the background refill's stay low-priority)."""
    monkeypatch.setattr(spares, "REPLACEMENT_DEFER_SECONDS", 0.01)
    urgent: list[bool] = []
    pool, started = await _pool_with_one_spare(urgent)
    await pool.take()  # the spare
    await _until(lambda: pool.count == 1)  # its replacement, in the background
    pool._spares.clear()  # as if it had just been taken too
    taken = await pool.take()
    assert taken is started[2] and urgent[:2] == [False, True], urgent
    await pool.close()


async def test_resizing_to_zero_lets_the_spares_go_at_once() -> None:
    pool, started = await _pool_with_one_spare()
    pool.resize(0)
    assert pool.count == 0 and started[0].returncode == -9
    pool.resize(1)
    await _until(lambda: pool.count == 1)
    assert len(started) == 2
    await pool.close()


async def test_a_spare_that_finishes_starting_after_a_resize_down_is_not_kept() -> None:
    """The bench's quick mode found a spare left with spare_workers 0: its start was
    under way when the size dropped, and the fill loop added it anyway."""
    release = asyncio.Event()
    started: list[StandInWorker] = []

    async def slow_start(**_: Any) -> Any:
        started.append(StandInWorker())
        await release.wait()
        return started[-1]

    pool = SparePool(1, slow_start)
    pool.refill()
    await _until(lambda: len(started) == 1)  # under way
    pool.resize(0)
    release.set()
    await _until(lambda: started[0].returncode is not None)
    assert pool.count == 0
    await pool.close()


async def test_what_a_taken_spare_held_goes_to_the_others_after_the_first_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A new plan sets a spare loading weights and making a context: not beside the
    taken spare's first request."""
    monkeypatch.setattr(spares, "REPLACEMENT_DEFER_SECONDS", 60.0)
    started: list[StandInWorker] = []

    async def start_spare(**_: Any) -> Any:
        started.append(StandInWorker())
        return started[-1]

    pool = SparePool(2, start_spare)
    pool.refill()
    await _until(lambda: pool.count == 2)
    pool.preload(["a.gguf", "b.gguf"])
    holding_a = next(w for w in started if "a.gguf" in w.preloaded)
    other = next(w for w in started if w is not holding_a)
    before = list(other.preloaded)
    assert "a.gguf" not in before
    taken = await pool.take("a.gguf")
    assert taken is holding_a
    for _ in range(20):
        await asyncio.sleep(0)
    assert other.preloaded == before, "no new plan during the first request"
    holding_a.first_request.set_result(None)
    await _until(lambda: "a.gguf" in other.preloaded)
    await pool.close()


async def test_a_burst_of_cold_starts_keeps_one_spare_more_until_it_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two takes within the burst window: the pool refills to size + 1 so that the next
    cold start of the burst finds a spare even while the other one is still starting; the
    hold after the last take lets the extra one go."""
    monkeypatch.setattr(spares, "REPLACEMENT_DEFER_SECONDS", 0.01)
    monkeypatch.setattr(spares, "BURST_HOLD_SECONDS", 0.5)
    pool, _started = await _pool_with_one_spare()
    await pool.take()
    await _until(lambda: pool.count == 1)
    assert pool.target == 1, "one take is not a burst"
    await pool.take()
    assert pool.target == 2
    await _until(lambda: pool.count == 2)
    kept = list(pool._spares)
    await _until(lambda: pool.count == 1, timeout=5.0)  # the hold ran out
    assert pool.target == 1
    assert sum(w.returncode == -9 for w in kept) == 1, "the extra spare was let go"
    await pool.close()


async def test_takes_further_apart_than_the_window_are_no_burst(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(spares, "REPLACEMENT_DEFER_SECONDS", 0.01)
    monkeypatch.setattr(spares, "BURST_WINDOW_SECONDS", 0.05)
    pool, started = await _pool_with_one_spare()
    await pool.take()
    await _until(lambda: pool.count == 1)
    await asyncio.sleep(0.1)  # past the window on purpose: the point of this test
    await pool.take()
    await _until(lambda: pool.count == 1)
    for _ in range(20):  # the fill loop gets every chance to start a second one
        await asyncio.sleep(0)
    assert pool.target == 1 and pool.count == 1 and len(started) == 3
    await pool.close()
