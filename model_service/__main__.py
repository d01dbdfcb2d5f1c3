"""Run one worker: `python -m model_service --model-path FILE.gguf --port 8060`.

The pool manager starts workers with `--control-fd`, one end of a Unix socketpair, by way
of `python -m model_service.spare` (which sandboxes the process first). Such
a worker imports everything, reports `spare`, and waits for a `load` command carrying
the model's settings and a listening socket the manager already bound. Later commands
are `drain` and `abort`, and `recycle`: a drained worker of a local chat model stops
serving, frees its model's context, keeps the weights loaded ahead and is a spare again,
so that a swap needs no new process. EOF means the manager is gone, and the worker
shuts down. What the two say to each other is model_service/contract.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import queue
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import uvicorn

from model_service import heap, sandbox
from model_service.activity import StatusChannel, WorkerStats
from model_service.app import (
    create_embedding_worker_app,
    create_remote_worker_app,
    create_worker_app,
)
from model_service.auth import ApiKeys
from model_service.backends import BackendError, create_backend
from model_service.backends.kinds import kind_of
from model_service.backends.llama_cpp import ContextShape, LlamaCppBackend, Preloaded, can_preload
from model_service.backends.llama_embed import EmbeddingModel, LlamaEmbedder, pooling_of
from model_service.backends.remote import RemoteModel
from model_service.browsers import BrowserGuard
from model_service.contract import (
    AbortCommand,
    BeatEvent,
    Command,
    DrainCommand,
    FailedEvent,
    LoadCommand,
    MemoryCeiling,
    ModelSettings,
    PreloadCommand,
    PreloadedEvent,
    ReadyEvent,
    RecycleCommand,
    SpareEvent,
    ThreadsCommand,
    parse_command,
)
from model_service.cpus import at_low_priority, usable_cores
from model_service.embeddings import EmbeddingService
from model_service.engine import Engine
from model_service.inference import InferenceService, ModelDefaults
from model_service.limits import DEFAULT_MAX_REQUEST_BYTES, Admission
from model_service.logs import setup_logging
from model_service.metrics import WorkerMetrics
from model_service.preload import Preloader
from model_service.serving import GracefulServer
from model_service.warmup import warm_up_serving

log = logging.getLogger("model_service")

EXIT_LOAD_FAILED = 3
HEARTBEAT_SECONDS = 1.0
# A worker handed back to the spares lets its old preloader free what it still holds
# before it waits for a model again; a load under way there is waited for this long.
PRELOADER_FINISH_SECONDS = 5.0


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m model_service", description=__doc__)
    parser.add_argument("--model-path", default=None, help="GGUF file (standalone use)")
    parser.add_argument("--model-id", default=None, help="model id (standalone use)")
    parser.add_argument("--n-ctx", type=int, default=None)
    parser.add_argument("--parallel", type=int, default=None, help="sequences decoded at once")
    parser.add_argument("--threads", type=int, default=None, help="llama.cpp threads")
    parser.add_argument(
        "--weights",
        choices=["auto", "as_stored"],
        default="auto",
        help="auto: Q4_1 on the patched kernel, else from a cached Q8_0 copy (faster on CPU)",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8051)
    parser.add_argument("--control-fd", type=int, default=None, help="set by the manager")
    parser.add_argument(
        "--reserve-mb",
        type=int,
        default=0,
        help="spare workers: heap to map ahead for the model's buffers (set by the manager)",
    )
    parser.add_argument("--graceful-seconds", type=float, default=30.0)
    parser.add_argument("--log-level", default=os.environ.get("POOL_LOG_LEVEL", "INFO"))
    return parser.parse_args(argv)


class ManagerLink:
    """The worker's end of the control socket: commands in (on a thread), events out."""

    def __init__(self, fd: int, reserve_mb: int) -> None:
        self.sock = socket.socket(fileno=fd)
        self.events = StatusChannel(fd)
        self._reserve_mb = reserve_mb
        self.threads: int | None = None  # the manager's latest share of the cores
        self._assignment: queue.SimpleQueue[tuple[ModelSettings, int] | None] = queue.SimpleQueue()
        self.be_spare()
        threading.Thread(target=self._read_commands, name="manager-link", daemon=True).start()

    def be_spare(self) -> None:
        """Wait for a model: at start, and again once handed back to the spares."""
        self.stats = WorkerStats()
        self.engine: Engine | None = None  # set once the model is loaded
        self.embedder: LlamaEmbedder | None = None  # its embeddings context, if local
        self.server: GracefulServer | None = None  # set while it serves
        self.recycling = False  # told to go back to the spares once it stops serving
        # What a recycled worker keeps: its served file and the model loaded from it.
        self.kept: tuple[str, Preloaded] | None = None
        self.preloader = Preloader(
            Preloaded.open,
            Preloaded.close,
            on_change=lambda paths: self.events.send(PreloadedEvent(paths=paths)),
            # A context made ahead lives in the heap reserve; with none (spare_reserve_mb
            # 0, to keep spares small) it would be memory nobody budgeted.
            fit_model=Preloaded.fit if self._reserve_mb > 0 else None,
            warm_model=Preloaded.warm,
        )

    def wait_for_model(self) -> tuple[ModelSettings, int] | None:
        """Block until the manager assigns a model: (settings, listening socket fd)."""
        return self._assignment.get()

    def _read_commands(self) -> None:
        pending = b""
        received_fds: list[int] = []  # in order; each `load` line takes the next one
        try:
            while True:
                data, fds, _flags, _addr = socket.recv_fds(self.sock, 1 << 20, 4)
                if not data:
                    break  # EOF: the manager died or let go of us
                pending += data
                received_fds.extend(fds)
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    try:
                        command = parse_command(line)
                    except ValueError as exc:
                        # The manager runs this very code: a line that is no command is a
                        # bug, and its load (if it was one) would wait for its timeout.
                        log.error("unreadable command", extra={"reason": str(exc)})
                        self.events.send(FailedEvent(reason=f"unreadable command: {exc}"))
                        return
                    self._handle(command, received_fds)
        finally:
            self._assignment.put(None)
            os.kill(os.getpid(), signal.SIGTERM)

    def _handle(self, command: Command, fds: list[int]) -> None:
        if isinstance(command, LoadCommand) and fds:
            self._assignment.put((command.settings, fds.pop(0)))
        elif isinstance(command, PreloadCommand):
            # Files of COLD models to load ahead while we wait, likeliest first, and the
            # settings of the likeliest model: its context is made ahead too.
            paths, first = command.paths, command.first_settings
            shape = None
            if paths and first and first.served_model_path == paths[0]:
                with contextlib.suppress(BackendError):  # its load will say what is wrong
                    shape = ContextShape.from_settings(first.model_dump())
            self.preloader.want(paths, shape)
        elif isinstance(command, DrainCommand):
            # New inference requests get 503; accepted ones finish.
            self.stats.draining = True
        elif isinstance(command, ThreadsCommand):
            # The manager shares the cores among the workers that are generating.
            self.threads = command.n
            if self.engine is not None:
                self.engine.set_threads(self.threads)
            if self.embedder is not None:
                self.embedder.set_threads(self.threads)
        elif isinstance(command, AbortCommand):
            # A forced unload: fail what is running with a clear error, then exit.
            self.stats.draining = True
            if self.engine is not None:
                self.engine.abort("The model was force-unloaded while this request ran.")
            os.kill(os.getpid(), signal.SIGTERM)
        elif isinstance(command, RecycleCommand):
            # Drained: stop serving; main() then lets the model go and waits as a spare.
            self.stats.draining = self.recycling = True
            if self.server is not None:
                self.server.stop_soon()
            else:
                os.kill(os.getpid(), signal.SIGTERM)  # not serving yet: nothing to keep


def _standalone_settings(args: argparse.Namespace) -> ModelSettings:
    if not args.model_path:
        raise SystemExit("give --model-path (or run under the pool manager)")
    given = {"n_ctx": args.n_ctx, "max_concurrent": args.parallel, "n_threads": args.threads}
    return ModelSettings.model_validate(
        {
            "model_id": args.model_id or os.path.basename(args.model_path),
            "model_path": args.model_path,
            "weights": args.weights,
            "max_request_bytes": DEFAULT_MAX_REQUEST_BYTES,
            **{name: value for name, value in given.items() if value is not None},
        }
    )


def _standalone_socket(args: argparse.Namespace) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(256)
    return sock


class _Loadable(Protocol):
    def load(self) -> None: ...


LoadableT = TypeVar("LoadableT", bound=_Loadable)


@dataclass(frozen=True)
class LoadReport:
    seconds: float
    finished_at: float  # time.perf_counter() when the load ended
    phases: Mapping[str, float]  # seconds per step, as the backend measured them
    weights_preloaded: bool = False  # the spare had loaded them ahead
    context_preloaded: bool = False  # ...and made the model's context ahead


def _load_reporting_failure(
    model_id: str,
    channel: StatusChannel,
    make: Callable[[], LoadableT],
    ceiling: MemoryCeiling | None = None,
) -> tuple[LoadableT, LoadReport] | None:
    """Build and load the model; on failure tell the manager why and return None.

    `ceiling`: the worker's memory ceiling (see model_service/sandbox.py), so that a load
    it stopped is reported as out of memory.
    """
    started = time.perf_counter()
    try:
        model = make()
        model.load()
    except (BackendError, MemoryError) as exc:
        limit = ceiling.model_dump() if ceiling else None
        reason = sandbox.out_of_memory_reason(exc, limit) or str(exc)
        log.error("model failed to load", extra={"model": model_id, "reason": reason})
        channel.send(FailedEvent(reason=reason))
        return None
    finished = time.perf_counter()
    phases = getattr(model, "load_phases", None) or {"load_model": finished - started}
    preloaded = bool(getattr(model, "weights_preloaded", False))
    context = bool(getattr(model, "context_preloaded", False))
    return model, LoadReport(finished - started, finished, phases, preloaded, context)


def _admission(settings: ModelSettings) -> Admission:
    """The model's request limit: max_concurrent running, max_queue waiting."""
    return Admission(max_active=settings.max_concurrent, max_queued=settings.max_queue)


def _serve_remote(
    settings: ModelSettings,
    args: argparse.Namespace,
    sock: socket.socket,
    stats: WorkerStats,
    channel: StatusChannel,
) -> int:
    """Run a worker for a model another server runs (openai / ollama backends)."""
    model_id = settings.model_id
    loaded = _load_reporting_failure(
        model_id, channel, lambda: RemoteModel(settings.model_dump()), settings.memory_ceiling
    )
    if loaded is None:
        return EXIT_LOAD_FAILED
    remote, load = loaded
    heap.release_unused()
    metrics = WorkerMetrics(model_id, stats)
    admission = _admission(settings)
    metrics.watch(queued=lambda: admission.queued, generating=lambda: admission.active)
    port = sock.getsockname()[1]
    app = create_remote_worker_app(
        remote,
        admission,
        stats,
        metrics,
        channel,
        port=port,
        keys=ApiKeys.from_env(),
        max_request_bytes=settings.max_request_bytes,
        aliases=frozenset(settings.aliases),
        chat=not is_embedding_model(settings),
    )
    _serve(app, sock, args, settings, load, channel)
    remote.unload()
    log.info("worker stopped", extra={"model": model_id})
    return 0


# --- embeddings --------------------------------------------------------------------------------


def is_embedding_model(settings: ModelSettings) -> bool:
    return settings.model_type == "embedding"


def _side_embedder(settings: ModelSettings, backend: Any) -> LlamaEmbedder | None:
    """A generative llama.cpp model's pooled embeddings: a second, small context on the
    same weights, made on the first /v1/embeddings request (llama_embed.py)."""
    if not isinstance(backend, LlamaCppBackend):
        return None
    return LlamaEmbedder(
        backend.model,
        limit=backend.context_length,
        threads=settings.n_threads or usable_cores(),
        pooling=pooling_of(backend.model, settings.pooling),
        pool_in_llama=False,
    )


def _embedding_service(
    settings: ModelSettings, embedder: LlamaEmbedder, admission: Admission
) -> EmbeddingService:
    return EmbeddingService(
        settings.model_id,
        embedder,
        admission,
        timeout_seconds=settings.timeout_seconds,
        aliases=frozenset(settings.aliases),
    )


def _serve_embedding_model(
    settings: ModelSettings,
    args: argparse.Namespace,
    sock: socket.socket,
    stats: WorkerStats,
    channel: StatusChannel,
    preloaded: Any,
    link: ManagerLink | None,
) -> int:
    """Run a worker for a llama.cpp embedding model (`model_type: "embedding"`)."""
    model_id = settings.model_id
    loaded = _load_reporting_failure(
        model_id,
        channel,
        lambda: EmbeddingModel(settings.model_dump(), preloaded=preloaded),
        settings.memory_ceiling,
    )
    if loaded is None:
        return EXIT_LOAD_FAILED
    model, load = loaded
    assert model.embedder is not None
    heap.release_unused()
    metrics = WorkerMetrics(model_id, stats)
    admission = _admission(settings)
    embedder = model.embedder
    if link is not None:
        link.embedder = embedder
        if link.threads:
            embedder.set_threads(link.threads)
    metrics.watch(queued=lambda: admission.queued, generating=lambda: int(embedder.busy))
    app = create_embedding_worker_app(
        _embedding_service(settings, embedder, admission),
        stats,
        metrics,
        channel,
        port=sock.getsockname()[1],
        keys=ApiKeys.from_env(),
        max_request_bytes=settings.max_request_bytes,
    )
    _serve(app, sock, args, settings, load, channel)
    model.unload()
    log.info("worker stopped", extra={"model": model_id})
    return 0


def _serve(
    app: Any,
    sock: socket.socket,
    args: argparse.Namespace,
    settings: ModelSettings,
    load: LoadReport,
    channel: StatusChannel,
    step_seconds: Callable[[], float] = lambda: 0.0,
    link: ManagerLink | None = None,
) -> None:
    """Serve `app` on `sock` until told to stop; report `ready` once accepting, then a
    heartbeat each second (with `step_seconds`, how long the engine's step has run).
    With `link`, a `recycle` command stops it too."""
    model_id = settings.model_id
    # A web page may not reach a worker's port either (see model_service/browsers.py).
    app.add_middleware(
        BrowserGuard,
        allowed_hosts=settings.allowed_hosts,
        allowed_origins=settings.allowed_origins,
    )
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=max(1, int(args.graceful_seconds)),
        lifespan="off",
    )

    def on_started() -> None:
        now = time.perf_counter()
        phases = {**load.phases, "start_server": now - load.finished_at}
        load_seconds = load.seconds + phases["start_server"]
        log.info(
            "worker ready",
            extra={
                "model": model_id,
                "port": port,
                "load_seconds": round(load_seconds, 3),
                "load_phases": {name: round(value, 3) for name, value in phases.items()},
                "weights_preloaded": load.weights_preloaded,
                "context_preloaded": load.context_preloaded,
            },
        )
        channel.send(
            ReadyEvent(
                pid=os.getpid(),
                port=port,
                load_seconds=load_seconds,
                load_phases=phases,
                weights_preloaded=load.weights_preloaded,
                context_preloaded=load.context_preloaded,
            )
        )

    beats: list[asyncio.Task[None]] = []  # held, so the task is not collected

    def on_serving() -> None:
        on_started()
        beats.append(asyncio.get_running_loop().create_task(_heartbeat(channel, step_seconds)))

    def on_idle_exit() -> None:
        log.info("worker stopped", extra={"model": model_id, "idle": True})

    server = GracefulServer(config, on_serving, on_idle_exit=on_idle_exit)
    if link is not None:
        link.server = server
    server.run(sockets=[sock])
    sock.close()  # its port goes back to the manager


async def _heartbeat(channel: StatusChannel, step_seconds: Callable[[], float]) -> None:
    """Sent from the event loop: a loop that is blocked (or a process stopped) goes
    silent, and the manager kills the worker (pool_manager.pool._kill_hung_workers)."""
    while True:
        channel.send(BeatEvent(step_seconds=round(step_seconds(), 1)))
        await asyncio.sleep(HEARTBEAT_SECONDS)


def _apply_memory_ceiling(ceiling: MemoryCeiling | None) -> None:
    """The manager's memory ceiling for this model, where the worker enforces it itself
    (RLIMIT_AS; a cgroup's the manager set up already). See model_service/sandbox.py."""
    if ceiling is None or ceiling.by != "address_space":
        return
    try:
        limit = sandbox.limit_address_space(ceiling.bytes)
    except (OSError, ValueError) as exc:
        log.warning("no memory ceiling", extra={"reason": str(exc)})
        return
    log.debug("memory ceiling set", extra={"address_space_mb": limit >> 20})


def _exit_when_a_thread_runs_out_of_memory() -> None:
    """A MemoryError that ends a thread (one of ours or the bootstrap of a new one) ends
    the worker with EXIT_OUT_OF_MEMORY at once: whoever waited on that thread would wait
    until the manager's load or hang timeout, and the manager reads the exit code as
    the memory ceiling's doing. Nothing is allocated on the way out."""
    threading_hook = threading.excepthook
    unraisable_hook = sys.unraisablehook

    def on_thread_error(args: threading.ExceptHookArgs) -> None:
        if issubclass(args.exc_type, MemoryError):
            os._exit(sandbox.EXIT_OUT_OF_MEMORY)
        threading_hook(args)

    def on_unraisable(unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, MemoryError):
            os._exit(sandbox.EXIT_OUT_OF_MEMORY)
        unraisable_hook(unraisable)

    threading.excepthook = on_thread_error
    sys.unraisablehook = on_unraisable


def _prepare_spare(reserve_mb: int) -> None:
    warm_up_serving()
    heap.reserve(reserve_mb)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    setup_logging("worker", args.log_level, file_suffix="-workers")
    if args.control_fd is None:
        return _run_model(_standalone_settings(args), _standalone_socket(args), args)
    link = ManagerLink(args.control_fd, args.reserve_mb)
    _exit_when_a_thread_runs_out_of_memory()
    if args.reserve_mb > 0:
        heap.keep()  # before the thread starts, so that its reserve lands in the main heap
    # Like the import (model_service/spare.py), on CPU time others leave: a spare started
    # beside a model's first requests must not slow them. The main thread, which serves,
    # keeps its priority.
    at_low_priority(lambda: _prepare_spare(args.reserve_mb), "prepare-spare")
    while True:
        if can_preload():
            link.preloader.start()
        link.events.send(SpareEvent(pid=os.getpid()))
        assignment = link.wait_for_model()
        if assignment is None:
            return 0  # the manager went away before giving us a model
        settings, listen_fd = assignment
        _apply_memory_ceiling(settings.memory_ceiling)
        preloaded = link.preloader.take(settings.served_model_path)
        sock = socket.socket(fileno=listen_fd)
        code = _run_model(settings, sock, args, link, preloaded)
        kept = link.kept
        if not link.recycling or kept is None:
            return code
        # Handed back to the spares: its model's weights (and context) are the first
        # loaded ahead; what it freed stays mapped (heap.keep), as a new spare's reserve.
        sandbox.lift_address_space_limit()
        setup_logging("worker", args.log_level, file_suffix="-workers")
        link.preloader.finish(PRELOADER_FINISH_SECONDS)
        link.be_spare()
        path, model = kept
        link.preloader.adopt(path, model, model.shape)


def _run_model(
    settings: ModelSettings,
    sock: socket.socket,
    args: argparse.Namespace,
    link: ManagerLink | None = None,
    preloaded: Any = None,
) -> int:
    """Load `settings`' model and serve it on `sock` until told to stop; the exit code.
    Told to recycle (`link.recycling`), a local chat model's weights are left in
    `link.kept` instead of freed."""
    channel = link.events if link else StatusChannel(None)
    stats = link.stats if link else WorkerStats()
    model_id = settings.model_id
    # With POOL_LOG_FILE, each model's worker logs to its own file next to the manager's.
    setup_logging("worker", args.log_level, file_suffix="-" + re.sub(r"[^\w.-]", "_", model_id))

    if not kind_of(settings.backend).local:
        return _serve_remote(settings, args, sock, stats, channel)
    if is_embedding_model(settings):
        return _serve_embedding_model(settings, args, sock, stats, channel, preloaded, link)
    local = _load_reporting_failure(
        model_id,
        channel,
        lambda: create_backend(settings.model_dump(), preloaded=preloaded),
        settings.memory_ceiling,
    )
    if local is None:
        return EXIT_LOAD_FAILED
    backend, load = local
    heap.release_unused()

    engine = Engine(backend)
    engine.start()
    if link is not None:
        link.engine = engine
        if link.threads:  # a share sent while the model was loading
            engine.set_threads(link.threads)
    metrics = WorkerMetrics(model_id, stats)
    admission = _admission(settings)
    metrics.watch(queued=lambda: admission.queued, generating=lambda: engine.active_requests)
    service = InferenceService(
        model_id,
        engine,
        ModelDefaults.from_settings(settings.defaults),
        metrics,
        admission,
        timeout_seconds=settings.timeout_seconds,
        aliases=frozenset(settings.aliases),
    )
    port = sock.getsockname()[1]
    embedder = _side_embedder(settings, backend)
    embeddings = _embedding_service(settings, embedder, admission) if embedder else None
    if link is not None and embedder is not None:
        link.embedder = embedder
        if link.threads:
            embedder.set_threads(link.threads)
    app = create_worker_app(
        service,
        stats,
        metrics,
        channel,
        port=port,
        keys=ApiKeys.from_env(),
        max_request_bytes=settings.max_request_bytes,
        embeddings=embeddings,
    )
    _serve(app, sock, args, settings, load, channel, lambda: engine.step_seconds, link)
    engine.stop()
    if embedder is not None:
        embedder.close()  # before the weights it shares go
    recycling = link is not None and link.recycling
    if link is not None and recycling and isinstance(backend, LlamaCppBackend):
        heap.keep()  # what it frees stays mapped for the next model's buffers
        kept = backend.release_model()
        if kept is not None and backend.served_path is not None:
            link.kept = (backend.served_path, kept)
    else:
        backend.unload()
    log.info("worker stopped", extra={"model": model_id, "recycled": recycling})
    return 0


if __name__ == "__main__":
    sys.exit(main())
