"""The engine: one thread owns the backend; requests reach it through a queue.

Generation never runs on the event loop. Each submitted job gets a `GenerationStream`
that the HTTP handler iterates asynchronously; the engine thread pushes text pieces into
it with `call_soon_threadsafe`. Closing the stream (a client that went away) sets a flag
the engine checks after every token, so an abandoned generation stops within a token.
"""

from __future__ import annotations

import asyncio
import codecs
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal

from model_service.backends.base import Backend, SamplingParams

log = logging.getLogger(__name__)

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class Finished:
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    message: str
    code: str = "generation_failed"


class StopMatcher:
    """Cuts text at the first stop sequence, holding back text that may start one."""

    def __init__(self, stops: list[str]) -> None:
        self._stops = [s for s in stops if s]
        self._held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Return (text safe to emit, whether a stop sequence was hit)."""
        if not self._stops:
            return text, False
        buffer = self._held + text
        hits = [i for i in (buffer.find(s) for s in self._stops) if i >= 0]
        if hits:
            self._held = ""
            return buffer[: min(hits)], True
        keep = max((self._partial_suffix(buffer, s) for s in self._stops), default=0)
        self._held = buffer[len(buffer) - keep :] if keep else ""
        return buffer[: len(buffer) - keep], False

    def flush(self) -> str:
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
    events: asyncio.Queue[str | Finished | Failed] = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    submitted_at: float = field(default_factory=time.monotonic)


class GenerationStream:
    """The caller's side of one job: iterate text pieces, then read `result`."""

    def __init__(self, job: GenerationJob) -> None:
        self._job = job
        self.result: Finished | None = None

    async def pieces(self) -> AsyncIterator[str]:
        """Yield text as it is generated. Raises EngineError if generation failed."""
        try:
            while True:
                event = await self._job.events.get()
                if isinstance(event, str):
                    yield event
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


class EngineError(Exception):
    """Generation did not finish; `code` says why (for the client's error body)."""

    def __init__(self, message: str, code: str = "generation_failed") -> None:
        super().__init__(message)
        self.code = code


class Engine:
    """Owns the backend and its thread. `submit` never blocks."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._jobs: queue.SimpleQueue[GenerationJob | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        # Written by the engine thread only; read for /health.
        self.tokens_generated = 0
        self.generating = False
        # Set once, by abort(), from another thread; every job from then on fails with it.
        self._abort_reason: str | None = None
        self._current: GenerationJob | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the thread to finish its current job and exit; waits up to `timeout`."""
        self._jobs.put(None)
        self._thread.join(timeout)

    def abort(self, reason: str) -> None:
        """Fail the running job and every later one with `reason` (code model_unloaded)."""
        self._abort_reason = reason
        current = self._current
        if current is not None:
            current.cancelled = True

    def _aborted(self, job: GenerationJob) -> bool:
        if self._abort_reason is None:
            return False
        failure = Failed(self._abort_reason, code="model_unloaded")
        job.loop.call_soon_threadsafe(job.events.put_nowait, failure)
        return True

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

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            if job.cancelled or self._aborted(job):
                continue
            self.generating = True
            self._current = job
            try:
                self._generate(job)
            except Exception as exc:
                log.exception("generation failed")
                job.loop.call_soon_threadsafe(job.events.put_nowait, Failed(str(exc)))
            finally:
                self._current = None
                self.generating = False

    def _generate(self, job: GenerationJob) -> None:
        emit = job.events.put_nowait
        post = job.loop.call_soon_threadsafe
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stopper = StopMatcher(job.stop)
        room = self.backend.context_length - len(job.prompt_tokens)
        budget = min(job.max_tokens, room)
        produced = 0
        finish: FinishReason = "length"
        hit_stop = False
        tokens = self.backend.generate(job.prompt_tokens, job.params)
        try:
            for piece in tokens:
                produced += 1
                self.tokens_generated += 1
                text, hit_stop = stopper.feed(decoder.decode(piece))
                if text:
                    post(emit, text)
                if hit_stop:
                    finish = "stop"
                    break
                if produced >= budget or job.cancelled:
                    break
            else:
                finish = "stop"
        finally:
            tokens.close()
        if not hit_stop:
            tail, _ = stopper.feed(decoder.decode(b"", final=True))
            tail += stopper.flush()
            if tail:
                post(emit, tail)
        if not self._aborted(job):
            post(emit, Finished(finish, len(job.prompt_tokens), produced))
