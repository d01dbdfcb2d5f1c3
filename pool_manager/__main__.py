"""Start the pool manager: `pool-manager` or `python -m pool_manager`."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

import uvicorn

from model_service.auth import ApiKeys
from model_service.logs import setup_logging
from model_service.serving import GracefulServer
from pool_manager.api import create_app
from pool_manager.config import ClusterConfig, ConfigError, ConfigStore
from pool_manager.identity import jwt_secret_from_env
from pool_manager.metrics import PoolMetrics
from pool_manager.pool import ModelPool

log = logging.getLogger("pool_manager")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pool-manager", description=__doc__)
    parser.add_argument(
        "--config",
        type=Path,
        default=Path(os.environ.get("POOL_CONFIG", "configs/model_pool_config.json")),
        help="pool config file (env POOL_CONFIG)",
    )
    parser.add_argument(
        "--registry",
        type=Path,
        default=Path(os.environ.get("POOL_REGISTRY", "configs/model_pool_registry.json")),
        help="model registry file (env POOL_REGISTRY)",
    )
    parser.add_argument(
        "--host",
        default=os.environ.get("POOL_HOST"),
        help="listen address, overrides the config (env POOL_HOST)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=_env_int("POOL_PORT"),
        help="listen port, overrides the config (env POOL_PORT)",
    )
    parser.add_argument(
        "--cluster",
        metavar="RAY_ADDRESS",
        default=os.environ.get("POOL_CLUSTER"),
        help="run the workers on this Ray cluster (host:port of its head, or 'auto'); "
        "overrides the config's cluster.address (env POOL_CLUSTER; docs/SCALING.md)",
    )
    return parser.parse_args(argv)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


def _print_welcome(pool: ModelPool, host: str, port: int) -> None:
    lines = [
        f"pool manager ready on http://{host}:{port}  (models: curl http://{host}:{port}/models)"
    ]
    example = None
    for record in pool.records():
        if record.worker is not None:
            endpoint = f"http://{host}:{record.worker.port}"
            lines.append(f"  {record.model_id}: {record.state} on {endpoint}")
            example = example or (record.model_id, endpoint)
    if example:
        model_id, endpoint = example
        lines.append("try (through the manager, which loads any registered model on demand):")
        lines.append(
            f"  curl http://{host}:{port}/v1/chat/completions "
            "-H 'Content-Type: application/json' "
            f'-d \'{{"model": "{model_id}", "messages": '
            '[{"role": "user", "content": "Say hello"}]}\''
        )
        lines.append(f"or straight to the worker: {endpoint}/v1/chat/completions")
    lines.append("Ctrl-C stops the manager and all its workers.")
    print("\n".join(lines), flush=True)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    store = ConfigStore(args.config, args.registry)
    try:
        config = store.load_config()
        specs = store.load_registry()
    except ConfigError as exc:
        print(f"pool-manager: {exc}", file=sys.stderr)
        return 2
    # Command-line and environment overrides apply to this run only; they are not saved.
    overrides: dict[str, Any] = {k: v for k, v in (("host", args.host), ("port", args.port)) if v}
    if args.cluster:
        cluster = config.cluster or ClusterConfig()
        overrides["cluster"] = cluster.model_copy(update={"address": args.cluster})
    setup_logging("manager", config.log_level)
    pool = ModelPool(store, config, specs, PoolMetrics(), overrides=overrides)
    host, port = pool.config.host, pool.config.port
    try:
        # Bind before anything starts, so a taken port fails fast and clearly.
        listener = socket.create_server((host, port), backlog=2048, reuse_port=False)
    except OSError as exc:
        print(f"pool-manager: cannot listen on {host}:{port}: {exc.strerror}", file=sys.stderr)
        return 3
    keys = ApiKeys.from_env()
    if not keys.enabled and not jwt_secret_from_env():
        loopback = host in ("127.0.0.1", "localhost", "::1")
        log.warning(
            "no API keys configured (POOL_API_KEY, POOL_ADMIN_KEY, POOL_JWT_SECRET): running "
            "open unless named keys exist (poolctl keys)"
            + ("" if loopback else f" on {host}, reachable from other machines"),
        )
    app = create_app(pool, keys=keys, on_warm=lambda: _print_welcome(pool, host, port))
    log.info(
        "starting",
        extra={
            "host": host,
            "port": port,
            "config": str(args.config),
            "registry": str(args.registry),
        },
    )
    server_config = uvicorn.Config(
        app,
        log_config=None,
        access_log=False,
        # Bounds the wait for open client connections (long streams) at shutdown.
        timeout_graceful_shutdown=max(1, int(pool.config.graceful_shutdown_seconds)),
    )
    GracefulServer(server_config, on_exit_requested=app.state.stopping.set).run(sockets=[listener])
    return 0


if __name__ == "__main__":
    sys.exit(main())
