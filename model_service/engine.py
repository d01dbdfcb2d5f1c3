"""The engine: one thread owns the backend and decodes every active request together.

Requests reach the thread through a queue. Between decode steps the thread admits new
requests into free slots (continuous batching), so a new request never waits for others
to finish; each request finishes on its own (end of text, stop sequence, token budget,
client gone). Generation never runs on the event loop: the thread hands each step's text
to the loop in one `call_soon_threadsafe`, and a request's `GenerationStream` yields it.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import logging
import queue
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

from model_service.backends.base import Backend, DecodeFailed, SamplingParams, TokenScore

log = logging.getLogger(__name__)

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class Finished:
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0


@dataclass(frozen=True)
class Scored:
    """Text with the scores of the tokens that made it (when the request asked for them)."""

    text: str
    scores: list[TokenScore]


@dataclass(frozen=True)
class Failed:
    message: str
    code: str = "generation_failed"


class StopMatcher:
    """Cuts text at the first stop sequence, holding back text that may start one."""

    def __init__(self, stops: list[str]) -> None:
        self._stops = [s for s in stops if s]
        self._held = ""

    def feed(self, text: str) -> tuple[str, str | None]:
        """Return (text safe to emit, the stop sequence hit or None); nothing after it."""
        if not self._stops:
            return text, None
        buffer = self._held + text
        hits = [(i, s) for s in self._stops if (i := buffer.find(s)) >= 0]
        if hits:
            position, stop = min(hits, key=lambda hit: hit[0])
            self._held = ""
            return buffer[:position], stop
        keep = max(self._partial_suffix(buffer, s) for s in self._stops)
        self._held = buffer[len(buffer) - keep :] if keep else ""
        return buffer[: len(buffer) - keep], None

    def flush(self) -> str:
        """The held-back text, once no more text is coming."""
        held, self._held = self._held, ""
        return held

    @staticmethod
    def _partial_suffix(buffer: str, stop: str) -> int:
        for size in range(min(len(stop) - 1, len(buffer)), 0, -1):
            if buffer.endswith(stop[:size]):
                return size
        return 0


@dataclass
class GenerationJob:
    prompt_tokens: list[int]
    params: SamplingParams
    max_tokens: int
    stop: list[str]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[str | Scored | Finished | Failed] = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    submitted_at: float = field(default_factory=time.monotonic)
    # Written by the engine thread as it goes: what a job cut off midway had used.
    produced: int = 0
    cached: int = 0


class GenerationStream:
    """The caller's side of one job: iterate text pieces, then read `result`."""

    def __init__(self, job: GenerationJob) -> None:
        self._job = job
        self.result: Finished | None = None
        # Every token's score so far, when the request asked for logprobs.
        self.scores: list[TokenScore] = []

    async def pieces(self) -> AsyncIterator[str]:
        """Yield text as it is generated. Raises EngineError if generation failed.

        With logprobs, a piece may be empty: its tokens' scores are in `scores`."""
        try:
            while True:
                event = await self._job.events.get()
                if isinstance(event, str):
                    yield event
                elif isinstance(event, Scored):
                    self.scores.extend(event.scores)
                    yield event.text
                elif isinstance(event, Finished):
                    self.result = event
                    return
                else:
                    raise EngineError(event.message, event.code)
        finally:
            # Normal end, error, or the consumer went away: in every case the engine
            # must stop spending tokens on this job.
            self._job.cancelled = True

    async def text(self) -> str:
        return "".join([piece async for piece in self.pieces()])

    def cancel(self) -> None:
        self._job.cancelled = True

    def used(self) -> Finished:
        """Its counts: the result's, or for a job cut off midway what it used so far."""
        if self.result is not None:
            return self.result
        job = self._job
        return Finished("length", len(job.prompt_tokens), job.produced, job.cached)


class EngineError(Exception):
    """Generation did not finish; `code` says why (for the client's error body)."""

    def __init__(self, message: str, code: str = "generation_failed") -> None:
        super().__init__(message)
        self.code = code


class _Active:
    """A job holding a slot: its budget and its text decoding state."""

    def __init__(self, job: GenerationJob, budget: int) -> None:
        self.job = job  # its counts (produced, cached) live there: a stream reads them
        self.budget = budget
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stopper = StopMatcher(job.stop)


class _Outbox:
    """Events produced during one step, handed to each event loop in one call."""

    def __init__(self) -> None:
        self._events: dict[asyncio.AbstractEventLoop, list[tuple[Any, Any]]] = defaultdict(list)

    def put(self, job: GenerationJob, event: str | Scored | Finished | Failed) -> None:
        self._events[job.loop].append((job.events, event))

    def send(self) -> None:
        for loop, events in self._events.items():
            # A closed loop means the worker is shutting down: nobody is left to tell.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_deliver, events)
        self._events.clear()


def _deliver(events: list[tuple[asyncio.Queue[Any], Any]]) -> None:
    for target, event in events:
        target.put_nowait(event)


class Engine:
    """Owns the backend and its thread. `submit` never blocks."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._jobs: queue.SimpleQueue[GenerationJob | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._active: dict[int, _Active] = {}
        self._stopping = False
        # Set once, by abort(), from another thread; every job from then on fails with it.
        self._abort_reason: str | None = None
        # Set by set_threads() from another thread; applied before the next step.
        self._threads_wanted: int | None = None
        # Written by the engine thread only; read for /health and metrics.
        self.tokens_generated = 0
        self.prompt_tokens_cached = 0
        self._step_started: float | None = None  # monotonic, while a step runs

    @property
    def step_seconds(self) -> float:
        """How long the step now running has taken (0 between steps): the heartbeat
        reports it, so the manager can tell a decode that never returns (any thread)."""
        started = self._step_started
        return 0.0 if started is None else time.monotonic() - started

    @property
    def generating(self) -> bool:
        return bool(self._active)

    @property
    def active_requests(self) -> int:
        return len(self._active)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Finish the running jobs, then end the thread; waits up to `timeout`."""
        self._jobs.put(None)
        self._thread.join(timeout)

    def set_threads(self, threads: int) -> None:
        """Compute with at most `threads` threads from the next step on (any thread)."""
        self._threads_wanted = threads

    def abort(self, reason: str) -> None:
        """Fail the running jobs and every later one with `reason` (code model_unloaded)."""
        self._abort_reason = reason

    def submit(
        self, prompt_tokens: list[int], params: SamplingParams, max_tokens: int, stop: list[str]
    ) -> GenerationStream:
        """Queue a generation; must be called on the event loop that will consume it."""
        job = GenerationJob(
            prompt_tokens=prompt_tokens,
            params=params,
            max_tokens=max_tokens,
            stop=stop,
            loop=asyncio.get_running_loop(),
        )
        self._jobs.put(job)
        return GenerationStream(job)

    # --- the engine thread ----------------------------------------------------------------

    def _run(self) -> None:
        try:
            # Runs while the server starts; a request that arrives meanwhile waits for
            # it (tens of milliseconds, once per model and machine: see the backend).
            self.backend.warm_up()
        except Exception:
            log.warning("warm-up failed; the first request pays for it", exc_info=True)
        outbox = _Outbox()
        while not (self._stopping and not self._active):
            self._admit(outbox, wait=not self._active)
            if self._abort_reason is not None:
                self._fail_all(outbox, Failed(self._abort_reason, code="model_unloaded"))
            elif self._active:
                self._step_started = time.monotonic()
                try:
                    self._step(outbox)
                except DecodeFailed as exc:
                    # The backend rolled their caches back: only the requests in that
                    # batch fail; the others were not in it and go on.
                    log.error("decode failed", extra={"reason": str(exc), "slots": exc.slots})
                    self._fail(exc.slots, outbox, Failed(f"generation failed: {exc}"))
                except Exception as exc:
                    log.exception("generation step failed")
                    self._fail_all(outbox, Failed(f"generation failed: {exc}"))
                finally:
                    self._step_started = None
            outbox.send()

    def _admit(self, outbox: _Outbox, wait: bool) -> None:
        """Move queued jobs into free slots; block for one if nothing is running."""
        backend = self.backend
        while not self._stopping and len(self._active) < backend.slots:
            try:
                job = self._jobs.get(block=wait)
            except queue.Empty:
                return
            wait = False
            if job is None:
                self._stopping = True
                return
            if job.cancelled:
                continue
            if self._abort_reason is not None:
                outbox.put(job, Failed(self._abort_reason, code="model_unloaded"))
                continue
            free = [s for s in range(backend.slots) if s not in self._active]
            room = backend.context_length - len(job.prompt_tokens)
            budget = min(job.max_tokens, room)
            # The steps it may decode beside the running ones: a slot apart from theirs
            # costs a pass each of those steps (see the backend's pick_slot).
            beside = max((a.budget - a.job.produced for a in self._active.values()), default=0)
            slot = backend.pick_slot(free, job.prompt_tokens, min(budget, beside))
            job.cached = backend.open_sequence(slot, job.prompt_tokens, job.params)
            self.prompt_tokens_cached += job.cached
            self._active[slot] = _Active(job, budget)

    def _step(self, outbox: _Outbox) -> None:
        backend = self.backend
        if self._threads_wanted is not None:
            threads, self._threads_wanted = self._threads_wanted, None
            backend.set_threads(threads)
        sampled = backend.step(list(self._active))
        to_bytes = backend.token_bytes
        for slot, token in sampled.items():
            active = self._active[slot]
            if backend.is_end(token):
                self._finish(slot, outbox, "stop")
                continue
            active.job.produced += 1
            self.tokens_generated += 1
            text, hit_stop = active.stopper.feed(active.decoder.decode(to_bytes(token)))
            score = backend.token_score(slot)
            if score is not None:
                outbox.put(active.job, Scored(text, [score]))
            elif text:
                outbox.put(active.job, text)
            if hit_stop:
                self._finish(slot, outbox, "stop", flush=False)
            elif backend.reply_complete(slot):
                self._finish(slot, outbox, "stop")
            elif active.job.produced >= active.budget:
                self._finish(slot, outbox, "length")
        for slot in [s for s, a in self._active.items() if a.job.cancelled]:
            backend.close_sequence(slot)
            del self._active[slot]

    def _finish(self, slot: int, outbox: _Outbox, reason: FinishReason, flush: bool = True) -> None:
        active = self._active.pop(slot)
        self.backend.close_sequence(slot)
        if flush:
            tail, _ = active.stopper.feed(active.decoder.decode(b"", final=True))
            tail += active.stopper.flush()
            if tail:
                outbox.put(active.job, tail)
        outbox.put(
            active.job,
            Finished(reason, len(active.job.prompt_tokens), active.job.produced, active.job.cached),
        )

    def _fail_all(self, outbox: _Outbox, failure: Failed) -> None:
        self._fail(list(self._active), outbox, failure)

    def _fail(self, slots: list[int], outbox: _Outbox, failure: Failed) -> None:
        for slot in slots:
            active = self._active.pop(slot, None)
            if active is not None:
                self.backend.close_sequence(slot)
                outbox.put(active.job, failure)
