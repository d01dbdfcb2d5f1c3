"""Weights a spare worker loads ahead, so that a cold start skips llama.cpp's model load.

Loading SmolLM2 from the page cache takes llama.cpp about 80 ms on this project's 2-core
machine, mostly building its 49,152-token vocabulary: half of a cold start. The manager
tells each spare which COLD local models are likeliest to be asked for next (the
`preload` command: their served files, best first); the spare loads their weights on a
thread. When the manager then hands it one of them, the worker takes that model as
loaded and the others are freed.

While a spare waits, each preloaded model costs its mapped file (page cache, shared with
every other reader of the file) and its vocabulary on the heap (~16 MB for SmolLM2).

The likeliest model also gets its context made ahead (`fit`), of the shape the manager
says its registry entry asks for: llama.cpp zeroing the KV cache is the next biggest
cost of a cold start (8 ms to 40 ms for SmolLM2's 190 MB, by the machine). It lives in
the heap the spare reserved for that model's buffers anyway (model_service.heap).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from model_service import heap
from model_service.cpus import lower_this_thread

log = logging.getLogger(__name__)

FREE_DELAY_SECONDS = 5.0
INFLIGHT_WAIT_SECONDS = 1.0
WARM_RETRY_SECONDS = 0.25  # between looks for idle cores to warm a context on
FileVersion = tuple[int, int, int, int]  # device, inode, size, mtime: "the same file"


def _file_version(path: str) -> FileVersion | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


class Preloader:
    """Owns the models a spare loaded ahead; loads and frees them on its own thread.

    `want` (the manager's latest list) and `take` (once, at assignment) may be called
    from any thread.
    """

    def __init__(
        self,
        open_model: Callable[[str], Any],
        close_model: Callable[[Any], None],
        on_change: Callable[[list[str]], None] | None = None,
        free_delay: float = FREE_DELAY_SECONDS,
        inflight_wait: float = INFLIGHT_WAIT_SECONDS,
        fit_model: Callable[[Any, Any], None] | None = None,
        warm_model: Callable[[Any], bool] | None = None,
    ) -> None:
        self._free_delay = free_delay  # after `take`, before freeing the rest
        self._inflight_wait = inflight_wait  # the longest `take` waits for a load under way
        self._open = open_model
        self._close = close_model
        # fit_model(model, shape): give a loaded model a context of `shape` (None: none).
        self._fit = fit_model
        # warm_model(model): warm its context if the machine lets it now; False: not yet.
        # Idle-time work: `take` does not wait for it.
        self._warm = warm_model
        self._warmed: set[str] = set()  # paths whose context needs no more warming
        self._on_change = on_change  # told the loaded paths after each change
        self._changed = threading.Condition()
        self._wanted: list[str] = []
        self._shape: Any = None  # the context the first wanted model should have
        self._loaded: dict[str, tuple[FileVersion, Any]] = {}
        self._fitted: dict[str, Any] = {}  # path -> the shape its model holds a context of
        self._failed: set[tuple[str, FileVersion | None]] = set()  # not tried again
        self._failed_fits: set[tuple[str, Any]] = set()
        self._loading: str | None = None  # the file the thread is loading or fitting now
        self._taken = False
        self._thread: threading.Thread | None = None
        self._hurry = threading.Event()  # free the rest now, not after free_delay

    def start(self) -> None:
        """Begin loading (after the spare's own warm-up, which needs the CPU first)."""
        self._thread = threading.Thread(target=self._run, name="preload", daemon=True)
        self._thread.start()

    def want(self, paths: list[str], shape: Any = None) -> None:
        """Keep these files loaded (in this order of preference); free any other. The
        first one's model also gets a context of `shape` (with `fit_model`; None: none)."""
        with self._changed:
            self._wanted = list(dict.fromkeys(paths))
            self._shape = shape if self._fit is not None else None
            self._changed.notify_all()

    def adopt(self, path: str, model: Any, fitted: Any = None) -> None:
        """Hold `model`, loaded from `path`, as if loaded ahead, with a context of shape
        `fitted` (None: none): a worker handed back to the spares keeps its model. Wanted
        until the manager's next list."""
        version = _file_version(path)
        if version is None:  # the file is gone: nothing could take it
            self._close(model)
            return
        with self._changed:
            self._loaded[path] = (version, model)
            if fitted is not None:
                self._fitted[path] = fitted
                self._warmed.add(path)  # it has served
            self._wanted = self._wanted or [path]
            self._changed.notify_all()
        self._report()

    def loaded(self) -> list[str]:
        """The files whose models are ready to take: loaded, and fitted where wanted."""
        with self._changed:
            return [path for path in self._loaded if not self._needs_fit(path)]

    def take(self, path: str | None) -> Any | None:
        """The model loaded from `path`, if it is loaded and the file has not changed since;
        None otherwise. Ends preloading: the other models' contexts are freed now (the
        model this worker serves makes its own from their memory: a cold start of
        another model than the likeliest spent 72 ms in page faults making its context
        while that memory waited to be freed), and the thread frees the rest
        `free_delay` seconds later.

        A load (or context) of `path` under way is waited for, `inflight_wait` seconds at
        most: it usually ends sooner than a new load would, but at low priority on a machine busy
        with other workers it could take seconds.
        """
        deadline = time.monotonic() + self._inflight_wait
        with self._changed:
            self._taken = True
            self._wanted = []
            self._changed.notify_all()
            while path is not None and self._loading == path:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(left)
            version, model = None, None
            if path is not None and self._loading != path:  # else the thread frees it later
                version, model = self._loaded.pop(path, (None, None))
                self._fitted.pop(path, None)
                self._warmed.discard(path)
            contexts = self._pop_contexts() if self._fit is not None else []
        for other_model in contexts:  # the heap keeps it mapped: freeing costs no unmapping
            assert self._fit is not None
            self._fit(other_model, None)
        if model is not None and version != _file_version(str(path)):
            self._close(model)  # the file was replaced after it was loaded
            return None
        return model

    def _run(self) -> None:
        # Lowest priority: loading ahead must not slow the workers that serve, nor this
        # worker's first requests while it frees what it no longer needs (Linux: per thread).
        # Nice 19, not SCHED_IDLE: once the spare is handed a model, this thread shares
        # the GIL with the threads that serve, and must not hold it while starved.
        lower_this_thread(idle=False)
        while True:
            with self._changed:
                while not self._taken and self._next_job() is None and not self._unwanted():
                    if self._to_warm() is not None:
                        break
                    self._changed.wait()
                if self._taken:
                    break
                unwanted = self._pop_unwanted()
                job = self._next_job()
                self._loading = job[0] if job else None
                to_warm = self._to_warm() if job is None and not unwanted else None
            self._free(unwanted)
            if job is not None:
                path, action = job
                if action == "load":
                    self._load(path)
                else:
                    self._fit_context(path)
            elif to_warm is not None:
                self._warm_context(*to_warm)
        # Handed a model: the new worker's start and first requests come before freeing
        # the rest (freeing unmaps memory, which interrupts every core of the process).
        recycled = self._hurry.wait(self._free_delay)
        with self._changed:
            unwanted = self._pop_unwanted()
        self._free(unwanted)
        if unwanted and not recycled:
            # What they held sits below the served model's buffers in the heap, where
            # glibc's automatic trim (the heap's top only) does not reach; a recycled
            # worker keeps it mapped instead, for its next model (heap.keep).
            heap.release_unused()

    def finish(self, timeout: float) -> None:
        """Free what is left now and wait (up to `timeout`) for the thread to end: the
        worker stopped serving (it goes back to the spares), so no first request is left
        to protect, and freeing later would land on its next model's first request
        (unmapping interrupts every core of the process)."""
        self._hurry.set()
        with self._changed:
            self._taken = True
            self._changed.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def _load(self, path: str) -> None:
        version = _file_version(path)
        model = None
        try:
            model = self._open(path)
        except (ValueError, RuntimeError, OSError) as exc:
            log.warning("could not preload", extra={"path": path, "reason": str(exc)})
        with self._changed:
            self._loading = None
            if model is None:
                self._failed.add((path, version))
            elif version is not None:
                self._loaded[path] = (version, model)  # freed next round if unwanted
                model = None
            self._changed.notify_all()
        if model is not None:
            self._close(model)  # the file vanished while it loaded
        self._report()

    def _fit_context(self, path: str) -> None:
        with self._changed:
            shape = self._fit_target(path)
            entry = self._loaded.get(path)
        failed = False
        if entry is not None and self._fit is not None:
            try:
                self._fit(entry[1], shape)
            except Exception as exc:  # an allocation that failed must not end the spare
                log.warning("could not make a context ahead", extra={"reason": str(exc)})
                failed = True
        with self._changed:
            self._loading = None
            if failed:
                self._failed_fits.add((path, shape))
            else:
                self._fitted[path] = shape
                self._warmed.discard(path)
            self._changed.notify_all()
        self._report()

    def _pop_contexts(self) -> list[Any]:
        """The loaded models that hold a context, marked as holding none (the caller
        frees their contexts)."""
        holding = [p for p, shape in self._fitted.items() if shape is not None]
        for path in holding:
            self._fitted[path] = None
            self._warmed.discard(path)
        return [self._loaded[p][1] for p in holding if p in self._loaded]

    def _to_warm(self) -> tuple[str, Any] | None:
        """(path, model) of the context made ahead that is not known to be warm yet."""
        if self._warm is None or not self._wanted:
            return None
        path = self._wanted[0]
        entry = self._loaded.get(path)
        if entry is None or path in self._warmed or self._fitted.get(path) is None:
            return None
        return None if self._needs_fit(path) else (path, entry[1])

    def _warm_context(self, path: str, model: Any) -> None:
        """Warm `model`'s context if the cores are idle; else look again a little later
        (or sooner, when the wanted list changes)."""
        assert self._warm is not None
        try:
            done = self._warm(model)
        except Exception as exc:  # it only costs the warming
            log.warning("could not warm a context made ahead", extra={"reason": str(exc)})
            done = True
        with self._changed:
            if done and self._fitted.get(path) is not None and path in self._loaded:
                self._warmed.add(path)
            elif not done and not self._taken:
                self._changed.wait(WARM_RETRY_SECONDS)

    def _fit_target(self, path: str) -> Any:
        """The shape of context `path`'s model should hold (None: none). Only the first
        wanted file keeps one."""
        first = self._wanted[0] if self._wanted else None
        return self._shape if path == first else None

    def _needs_fit(self, path: str) -> bool:
        """Whether `path`'s model holds another context than it should (and making that
        one has not failed already)."""
        target = self._fit_target(path)
        return target != self._fitted.get(path) and (path, target) not in self._failed_fits

    def _free(self, models: list[Any]) -> None:
        for model in models:
            self._close(model)
        if models:
            self._report()

    def _next_job(self) -> tuple[str, str] | None:
        """(path, "load" or "fit"): contexts no longer wanted are freed first; then the
        wanted files load in order, the first one's context made right after its load."""
        for path in self._loaded:
            if self._needs_fit(path) and self._fit_target(path) is None:
                return path, "fit"
        for path in self._wanted:
            if path not in self._loaded:
                if (path, _file_version(path)) not in self._failed:
                    return path, "load"
            elif self._needs_fit(path):
                return path, "fit"
        return None

    def _unwanted(self) -> list[str]:
        return [p for p in self._loaded if p not in self._wanted]

    def _pop_unwanted(self) -> list[Any]:
        """Take the models no longer wanted out of the loaded set (the caller frees them)."""
        unwanted = self._unwanted()
        for path in unwanted:
            self._fitted.pop(path, None)
            self._warmed.discard(path)
        return [self._loaded.pop(path)[1] for path in unwanted]

    def _report(self) -> None:
        if self._on_change is not None:
            self._on_change(self.loaded())
