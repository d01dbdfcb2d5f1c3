"""Spare workers: processes started ahead, imports done, waiting to be handed a model.

Starting Python and importing FastAPI and llama.cpp takes most of a second; loading a
small model from the page cache takes a fraction of that. Keeping spares makes a cold
start cost only the model load. A worker whose model is evicted comes back here
(`adopt`) instead of exiting, its model's weights still loaded: under swap churn no
process need be started at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import psutil

from model_service.contract import ModelSettings
from pool_manager.memory import SpareMemory
from pool_manager.policies import split_preload
from pool_manager.worker_process import WorkerProcess

log = logging.getLogger(__name__)

# A spare beyond `size` (a worker handed back while no load took one) is let go after
# this long, unless a load takes one meanwhile: evictions come just before loads.
SURPLUS_GRACE_SECONDS = 5.0
# A taken spare's replacement starts once the model's first request ended, this long at
# most: a process start's first ~40 ms (the interpreter, before the import moves to a
# low-priority thread) run at normal priority, and beside the first request's threads
# they made it ~2x slower (issue 16). The replacement still has most of a second to get
# ready before the next cold start of a succession.
REPLACEMENT_DEFER_SECONDS = 0.3
# Cold starts in a burst (two takes within BURST_WINDOW_SECONDS) keep one spare more than
# `size` until BURST_HOLD_SECONDS after the last take: with one, the fifth of five cold
# starts 1 s apart found its spare still importing (1,098 ms against ~60 ms, issue 16).
# The hold ends well before an idle pool's memory is worth measuring again.
BURST_WINDOW_SECONDS = 3.0
BURST_HOLD_SECONDS = 10.0

StartSpare = Callable[..., Awaitable[WorkerProcess]]  # urgent=True: a load waits for it


class SparePool:
    """Owns the spare processes. Every method runs on the event loop."""

    def __init__(self, size: int, start_spare: StartSpare) -> None:
        self.size = size
        self._start_spare = start_spare
        self._spares: list[WorkerProcess] = []
        self._preload: list[str] = []  # model files spares should load ahead
        self._first_settings: ModelSettings | None = None  # the likeliest model's
        self._refill: asyncio.Task[None] | None = None
        self._replan: asyncio.Task[None] | None = None  # see _replan_after
        self._trim_timer: asyncio.TimerHandle | None = None
        self._last_take: float | None = None  # loop time
        self._burst_timer: asyncio.TimerHandle | None = None  # set while a burst lasts
        self._closed = False

    @property
    def pids(self) -> list[int]:
        return [w.pid for w in self._spares if w.returncode is None]

    @property
    def preloaded(self) -> set[str]:
        """Files some spare has loaded ahead and is to keep."""
        return {path for w in self._spares if w.returncode is None for path in _kept(w)}

    def preload(self, paths: list[str], first_settings: ModelSettings | None = None) -> None:
        """Have the spares, now and later, keep these model files loaded ahead between
        them, and a context for the first one's model made with `first_settings`."""
        self._preload = list(paths)
        self._first_settings = first_settings
        self._send_preload()

    def _send_preload(self) -> None:
        """Tell each spare its part of the files to load ahead (policies.split_preload:
        each file to one spare, the one that has it if any); the first file's spare also
        makes its model's context ahead."""
        alive = [w for w in self._spares if w.returncode is None]
        holding = [
            set(w.preloaded) | set(w.preload_sent.paths if w.preload_sent else ()) for w in alive
        ]
        likeliest = self._preload[0] if self._preload else None
        for worker, paths in zip(alive, split_preload(self._preload, holding), strict=True):
            first = self._first_settings if paths and paths[0] == likeliest else None
            worker.preload(paths, first)

    @property
    def reserved_bytes(self) -> int:
        """Memory the spare `take` would hand out has mapped ahead for its model."""
        spare = self._next()
        return spare.reserved_bytes if spare is not None and spare.is_warm_spare else 0

    def memory(self, *, but_next: bool = False) -> list[SpareMemory]:
        """What each live spare holds (measured), leaving out the one `take` would hand
        out when `but_next` (a load counts that one as part of its model)."""
        skip = self._next() if but_next else None
        return [_measure(w) for w in self._spares if w.returncode is None and w is not skip]

    @property
    def target(self) -> int:
        """How many spares to keep now: `size`, one more during a burst of cold starts."""
        in_burst = self._burst_timer is not None and self.size > 0
        return self.size + 1 if in_burst else self.size

    def _note_take(self) -> None:
        """A take that follows another within BURST_WINDOW_SECONDS starts (or extends) a
        burst; its end lets the extra spare go."""
        now = asyncio.get_running_loop().time()
        if self._last_take is not None and now - self._last_take <= BURST_WINDOW_SECONDS:
            if self._burst_timer is not None:
                self._burst_timer.cancel()
            self._burst_timer = asyncio.get_running_loop().call_later(
                BURST_HOLD_SECONDS, self._end_burst
            )
        self._last_take = now

    def _end_burst(self) -> None:
        self._burst_timer = None
        if self._trim_timer is not None:
            self._trim_timer.cancel()
        self._trim()

    @property
    def count(self) -> int:
        return sum(1 for w in self._spares if w.returncode is None)

    def _next(self, path: str | None = None) -> WorkerProcess | None:
        """The spare `take` would hand out now: a warm one first, among those one holding
        `path`'s weights loaded ahead."""
        alive = [w for w in self._spares if w.returncode is None]
        return min(alive, key=lambda w: (not w.is_warm_spare, path not in _kept(w)), default=None)

    async def take(self, path: str | None = None) -> WorkerProcess:
        """A spare (warm ones first, holding `path`'s weights if one does), or a newly
        started process when none is left; its replacement starts as soon as the model's
        first request ended (REPLACEMENT_DEFER_SECONDS at most). That slows neither this
        load nor the requests after it: a spare imports at low priority
        (model_service/spare.py), so the next load, a second later, finds one ready or
        nearly."""
        self._note_take()
        spare = self._next(path)
        self._spares = [w for w in self._spares if w.returncode is None and w is not spare]
        # None left: a load waits for this one, which so imports at normal priority.
        taken = spare if spare is not None else await self._start_spare(urgent=True)
        self._replan_after(taken)
        self.refill(after=taken)
        return taken

    def _replan_after(self, taken: WorkerProcess) -> None:
        """What the taken spare held ahead goes to the others, once the model's first
        request ended (REPLACEMENT_DEFER_SECONDS at most): a new plan sets a spare
        loading weights and zeroing a context, which beside that request's threads made
        it 2-10x slower (30 ms became 100-220 ms)."""
        if self._replan is not None:
            self._replan.cancel()

        async def replan() -> None:
            await taken.wait_first_request(REPLACEMENT_DEFER_SECONDS)
            self._send_preload()

        self._replan = asyncio.create_task(replan(), name="spares-replan")

    @property
    def wants_workers_back(self) -> bool:
        """Whether a drained worker should come back here rather than exit."""
        return not self._closed and self.size > 0

    def adopt(self, worker: WorkerProcess) -> None:
        """Take back a worker recycled from its model (WorkerProcess.recycle): a warm
        spare with that model's weights loaded ahead. Past `size`, the surplus goes after
        SURPLUS_GRACE_SECONDS unless a load takes one meanwhile (`size` + 1 during a
        burst of cold starts)."""
        if self._closed:
            worker.kill()
            return
        self._spares.append(worker)
        self._send_preload()
        if self.count > self.target and self._trim_timer is None:
            loop = asyncio.get_running_loop()
            self._trim_timer = loop.call_later(SURPLUS_GRACE_SECONDS, self._trim)

    def _trim(self) -> None:
        """Let the spares beyond `target` go: still-starting ones first, then the oldest."""
        self._trim_timer = None
        alive = [w for w in self._spares if w.returncode is None]
        surplus = len(alive) - self.target
        if surplus <= 0:
            return
        by_use = sorted(alive, key=lambda w: w.is_warm_spare)  # stable: oldest first
        for worker in by_use[:surplus]:
            worker.kill()
        self._spares = [w for w in alive if w not in by_use[:surplus]]
        self._send_preload()

    def resize(self, size: int) -> None:
        """Keep `size` spares from now on: a smaller size lets the surplus go at once
        (an operator who sets spare_workers 0 wants no spare left), a larger one starts
        the missing ones. The same size changes nothing (a surplus keeps its grace)."""
        shrunk = size < self.size
        self.size = size
        if shrunk:
            if self._trim_timer is not None:
                self._trim_timer.cancel()
            self._trim()
        self.refill()

    def refill(self, after: WorkerProcess | None = None) -> None:
        """Start spares in the background until there are `target`; after `after`'s
        first request when given (see REPLACEMENT_DEFER_SECONDS)."""
        if self._closed or (self._refill is not None and not self._refill.done()):
            return
        self._refill = asyncio.create_task(self._fill(after), name="spares")

    async def _fill(self, after: WorkerProcess | None = None) -> None:
        if after is not None:
            await after.wait_first_request(REPLACEMENT_DEFER_SECONDS)
        while not self._closed and len(self._spares) < self.target:
            try:
                spare = await self._start_spare()
            except OSError as exc:
                log.error("could not start a spare worker", extra={"reason": str(exc)})
                return
            if self._closed or len(self._spares) >= self.target:
                # Resized down (or the burst ended) while it started: no surplus kept.
                spare.kill()
                return
            self._spares.append(spare)
            self._send_preload()

    async def close(self) -> None:
        """Stop every spare (they hold no model and no request)."""
        self._closed = True
        if self._replan is not None:
            self._replan.cancel()
        for timer in (self._trim_timer, self._burst_timer):
            if timer is not None:
                timer.cancel()
        if self._refill is not None:
            self._refill.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refill
        for worker in self._spares:
            worker.kill()
        for worker in self._spares:
            await worker.wait_exit()
        self._spares.clear()


def _kept(worker: WorkerProcess) -> list[str]:
    """The files a spare reported loaded ahead that its latest plan still has it keep.

    Two spares may hold one file (a worker handed back keeps its model's weights); the
    plan gives the file to one of them, and the other frees its copy as the plan reaches
    it. Until it reports again, its report still lists the file: without this, a load
    could take it and find the weights gone."""
    plan = worker.preload_sent
    if plan is None:
        return list(worker.preloaded)
    return [path for path in worker.preloaded if path in plan.paths]


def _measure(worker: WorkerProcess) -> SpareMemory:
    try:
        info = psutil.Process(worker.pid).memory_info()
        rss, file_backed = int(info.rss), int(info.shared)
    except psutil.Error:  # gone meanwhile: counts as just started
        rss = file_backed = 0
    return SpareMemory(rss=rss, file_backed=file_backed, reserve=worker.reserved_bytes)
