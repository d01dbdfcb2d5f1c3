"""Run one worker: `python -m model_service --model-path FILE.gguf --port 8060`.

The pool manager starts workers with `--spec-json`, a listening socket it already bound
(`--listen-fd`), a pipe for status events (`--status-fd`) and `--lifeline-stdin`: when
the manager goes away, the worker's stdin closes and the worker shuts itself down.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from typing import Any

import uvicorn

from model_service.activity import StatusChannel, WorkerStats
from model_service.app import create_worker_app
from model_service.auth import ApiKeys
from model_service.backends import BackendError, create_backend
from model_service.engine import Engine
from model_service.inference import InferenceService, ModelDefaults
from model_service.limits import DEFAULT_MAX_REQUEST_BYTES, Admission
from model_service.logs import setup_logging
from model_service.metrics import WorkerMetrics
from model_service.serving import GracefulServer

log = logging.getLogger("model_service")

EXIT_LOAD_FAILED = 3


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m model_service", description=__doc__)
    parser.add_argument("--spec-json", help="the model's registry entry, as JSON")
    parser.add_argument("--model-id", default=None, help="model id (standalone use)")
    parser.add_argument("--model-path", default=None, help="GGUF file (standalone use)")
    parser.add_argument("--n-ctx", type=int, default=None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8051)
    parser.add_argument("--listen-fd", type=int, default=None)
    parser.add_argument("--status-fd", type=int, default=None)
    parser.add_argument("--lifeline-stdin", action="store_true")
    parser.add_argument("--graceful-seconds", type=float, default=30.0)
    parser.add_argument("--log-level", default=os.environ.get("POOL_LOG_LEVEL", "INFO"))
    return parser.parse_args(argv)


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    if args.spec_json:
        settings: dict[str, Any] = json.loads(args.spec_json)
        return settings
    if not args.model_path:
        raise SystemExit("give --spec-json or --model-path")
    model_id = args.model_id or os.path.basename(args.model_path)
    return {
        "model_id": model_id,
        "backend": "llama_cpp",
        "model_path": args.model_path,
        "n_ctx": args.n_ctx,
    }


class ManagerCommands:
    """What the manager can tell a running worker on its stdin, one word a line."""

    def __init__(self, stats: WorkerStats) -> None:
        self.stats = stats
        self.engine: Engine | None = None  # set once the model is loaded

    def handle(self, command: bytes) -> None:
        if command == b"drain":
            # New inference requests get 503; accepted ones finish.
            self.stats.draining = True
        elif command == b"abort":
            # A forced unload: fail what is running with a clear error, then exit.
            self.stats.draining = True
            if self.engine is not None:
                self.engine.abort("The model was force-unloaded while this request ran.")
            os.kill(os.getpid(), signal.SIGTERM)


def _watch_lifeline(commands: ManagerCommands) -> None:
    """Follow the manager's commands on stdin; when stdin closes, shut down.

    EOF means the manager died or let go of us.
    """
    pending = b""
    try:
        # os.read, not sys.stdin: a daemon thread blocked inside a buffered reader
        # aborts the interpreter at exit.
        while chunk := os.read(0, 4096):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                commands.handle(line.strip())
    finally:
        os.kill(os.getpid(), signal.SIGTERM)


def _listening_socket(args: argparse.Namespace) -> socket.socket:
    if args.listen_fd is not None:
        return socket.socket(fileno=args.listen_fd)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(256)
    return sock


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    setup_logging("worker", args.log_level)
    settings = _settings(args)
    model_id = str(settings["model_id"])
    channel = StatusChannel(args.status_fd)
    stats = WorkerStats()
    commands = ManagerCommands(stats)
    if args.lifeline_stdin:
        threading.Thread(
            target=_watch_lifeline, args=(commands,), name="lifeline", daemon=True
        ).start()

    started = time.perf_counter()
    try:
        backend = create_backend(settings)
        backend.load()
    except BackendError as exc:
        log.error("model failed to load", extra={"model": model_id, "reason": str(exc)})
        channel.send("failed", reason=str(exc))
        return EXIT_LOAD_FAILED
    load_seconds = time.perf_counter() - started

    engine = Engine(backend)
    engine.start()
    commands.engine = engine
    metrics = WorkerMetrics(model_id, stats)
    admission = Admission(
        max_active=int(settings.get("max_concurrent") or 4),
        max_queued=int(settings.get("max_queue", 32)),
    )
    service = InferenceService(
        model_id,
        engine,
        ModelDefaults.from_settings(settings.get("defaults")),
        metrics,
        admission,
        timeout_seconds=float(settings.get("timeout_seconds") or 30),
        aliases=frozenset(settings.get("aliases") or ()),
    )
    sock = _listening_socket(args)
    port = sock.getsockname()[1]
    app = create_worker_app(
        service,
        stats,
        metrics,
        channel,
        port=port,
        keys=ApiKeys.from_env(),
        max_request_bytes=int(settings.get("max_request_bytes") or DEFAULT_MAX_REQUEST_BYTES),
    )
    config = uvicorn.Config(
        app,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=max(1, int(args.graceful_seconds)),
        lifespan="off",
    )

    def on_started() -> None:
        log.info(
            "worker ready",
            extra={"model": model_id, "port": port, "load_seconds": round(load_seconds, 3)},
        )
        channel.send("ready", pid=os.getpid(), port=port, load_seconds=load_seconds)

    server = GracefulServer(config, on_started)
    server.run(sockets=[sock])
    engine.stop()
    backend.unload()
    log.info("worker stopped", extra={"model": model_id})
    return 0


if __name__ == "__main__":
    sys.exit(main())
