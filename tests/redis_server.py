"""A real Redis server for tests: `redis-server` in a temporary folder, on a free port,
with a password and no persistence, stopped and removed after.

`redis_server` is a session fixture (one server for the whole run); a test that stops its
server (an outage) makes its own with `RedisServer.create()`. Each test takes a database
of its own with `create_database()`: a URL with the password (`REDIS_PASSWORD`), as a
real one would be, for an emptied database number.

Use from a test module (or list it in conftest's `pytest_plugins`):

    def test_x(redis_server: RedisServer) -> None:
        url = redis_server.create_database()   # redis://:...@127.0.0.1:port/3
"""

from __future__ import annotations

import atexit
import contextlib
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from pool_manager.ports import free_port

REDIS_PASSWORD = "redis-" + secrets.token_hex(12)  # per test session; what tests look for
DATABASES = 256  # numbers handed out in turn, each emptied first
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0


def redis_server_binary() -> str:
    """The path of `redis-server`. Skips the test when it is not installed, as tests do
    for the other tools a machine may lack (CI installs it, and there a skip fails)."""
    found = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
    )
    if found is None:
        pytest.skip(
            "Redis is not installed (no redis-server on the PATH): apt-get install redis-server"
        )
    return found


class RedisServer:
    """One `redis-server` process on 127.0.0.1:`port`, its files in `folder`."""

    def __init__(self, folder: Path, port: int, binary: str) -> None:
        self.folder = folder
        self.port = port
        self.binary = binary
        self.process: subprocess.Popen[bytes] | None = None
        self._next_db = 0

    @property
    def log_path(self) -> Path:
        return self.folder / "redis.log"

    @classmethod
    def create(cls) -> RedisServer:
        """Start a server in a new temporary folder (blocks until it answers PING). Fails
        the test if Redis is missing or does not start."""
        binary = redis_server_binary()
        folder = Path(tempfile.mkdtemp(prefix="pool-test-redis-"))
        server = cls(folder, free_port(), binary)
        atexit.register(server.destroy)  # if the session dies before its teardown
        try:
            server.start()
        except BaseException:
            server.destroy()
            raise
        return server

    def start(self) -> None:
        """Start `redis-server` (empty: nothing is saved); blocks until it answers PING
        (fails the test after START_TIMEOUT s or if it exits)."""
        assert self.process is None or self.process.poll() is not None, "already running"
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [
                    self.binary,
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--requirepass",
                    REDIS_PASSWORD,
                    "--databases",
                    str(DATABASES),
                    # A throwaway server: no snapshots, no append-only file.
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self.folder),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + START_TIMEOUT
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(
                    f"redis-server exited with {self.process.returncode}:\n{self.log()}",
                    pytrace=False,
                )
            try:
                with self.client() as client:
                    client.ping()
                    return
            except redis.RedisError as exc:
                last = exc
            time.sleep(0.05)
        self.kill()
        pytest.fail(
            f"redis-server did not answer within {START_TIMEOUT:g} s ({last}):\n{self.log()}",
            pytrace=False,
        )

    def stop(self) -> None:
        """SIGTERM (clients are disconnected; nothing saved); blocks until the server
        exited, killing it after STOP_TIMEOUT s."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def destroy(self) -> None:
        """Stop the server and remove its folder. Safe to call twice."""
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-4000:]
        return "(no log)"

    # --- connecting -----------------------------------------------------------------------

    def url_for(self, db: int, password: str = REDIS_PASSWORD) -> str:
        """A Redis URL for database `db`, with the password."""
        return f"redis://:{password}@127.0.0.1:{self.port}/{db}"

    def client(self, db: int = 0) -> redis.Redis:
        """A synchronous client for the fixture's own work."""
        return redis.Redis(
            host="127.0.0.1", port=self.port, db=db, password=REDIS_PASSWORD, socket_timeout=5
        )

    def create_database(self) -> str:
        """The URL of the next database number, emptied (numbers are reused in turn)."""
        db, self._next_db = self._next_db, (self._next_db + 1) % DATABASES
        with self.client(db) as client:
            client.flushdb()
        return self.url_for(db)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One Redis server for the test session; stopped and removed at its end."""
    server = RedisServer.create()
    yield server
    server.destroy()
