"""A real PostgreSQL server for tests: `initdb` and `postgres` in a temporary folder, on a
free port, stopped and removed after.

`postgres_server` is a session fixture (one server for the whole run); a test that stops
its server (an outage) makes its own with `PostgresServer.create()`. Stores connect over
TCP as the role `pool`, which has a password (`APP_PASSWORD`), so tests see what a real
DATABASE_URL looks like; the fixture's own admin work goes over the Unix socket as the
superuser `postgres`, trusted there.

PostgreSQL refuses to run as root: under root, initdb and postgres run as the `postgres`
system user that Debian's package creates, in a folder given to it.

Use from a test module (or list it in conftest's `pytest_plugins`):

    from tests import pg_server
    postgres_server = pg_server.postgres_server  # the fixture, in this module

    def test_x(postgres_server: PostgresServer) -> None:
        url = postgres_server.create_database("x")   # postgresql://pool:...@127.0.0.1:port/x
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pool_manager.ports import free_port

SUPERUSER = "postgres"
APP_ROLE = "pool"
APP_PASSWORD = "pg-" + secrets.token_hex(12)  # per test session; what tests look for
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0


def postgres_bin_dir() -> Path:
    """The folder with `initdb` and `postgres`: Debian's newest /usr/lib/postgresql/<v>/bin,
    else the PATH's. Skips the test when PostgreSQL is not installed, as tests do for
    the other tools a machine may lack (CI installs it, and there a skip fails)."""
    versions = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    if versions:
        newest = max(versions, key=lambda path: int(Path(path).parent.parent.name.split(".")[0]))
        return Path(newest).parent
    initdb, postgres = shutil.which("initdb"), shutil.which("postgres")
    if initdb and postgres and Path(initdb).parent == Path(postgres).parent:
        return Path(initdb).parent
    pytest.skip(
        "PostgreSQL is not installed (no initdb and postgres in /usr/lib/postgresql/*/bin "
        "or on the PATH): apt-get install postgresql"
    )


class PostgresServer:
    """One `postgres` process on 127.0.0.1:`port`, its data and socket in `folder`."""

    def __init__(self, folder: Path, port: int, bin_dir: Path) -> None:
        self.folder = folder
        self.port = port
        self.bin_dir = bin_dir
        self.process: subprocess.Popen[bytes] | None = None
        self._databases = 0
        # Root may not run PostgreSQL: run it as the system user `postgres` (Debian's).
        self._run_as = "postgres" if os.geteuid() == 0 else None

    @property
    def data_dir(self) -> Path:
        return self.folder / "data"

    @property
    def log_path(self) -> Path:
        return self.folder / "postgres.log"

    @classmethod
    def create(cls) -> PostgresServer:
        """initdb a new cluster in a new temporary folder and start it (blocks until it
        accepts connections). Fails the test if PostgreSQL is missing or does not start."""
        bin_dir = postgres_bin_dir()
        # Not pytest's tmp_path: its parents are private to root, where `postgres` cannot go.
        folder = Path(tempfile.mkdtemp(prefix="pool-test-pg-"))
        server = cls(folder, free_port(), bin_dir)
        atexit.register(server.destroy)  # if the session dies before its teardown
        try:
            server._init()
            server.start()
            server.sql(f"CREATE ROLE {APP_ROLE} LOGIN CREATEDB PASSWORD '{APP_PASSWORD}'")
        except BaseException:
            server.destroy()
            raise
        return server

    def _init(self) -> None:
        if self._run_as:
            try:
                user = pwd.getpwnam(self._run_as)
            except KeyError:
                pytest.fail(
                    f"PostgreSQL refuses to run as root, and there is no {self._run_as!r} user "
                    "to run it as (apt-get install postgresql creates it)",
                    pytrace=False,
                )
            os.chown(self.folder, user.pw_uid, user.pw_gid)
        password_file = self.folder / "superuser-password"
        password_file.write_text(secrets.token_hex(16) + "\n")
        if self._run_as:
            os.chown(password_file, user.pw_uid, -1)
        # Password (scram) over TCP, as a DATABASE_URL would connect; trust on the socket,
        # which only this folder's owner and root can reach, for the fixture's admin work.
        done = subprocess.run(
            [
                str(self.bin_dir / "initdb"),
                f"--pgdata={self.data_dir}",
                f"--username={SUPERUSER}",
                f"--pwfile={password_file}",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",  # a throwaway cluster: no fsync
            ],
            capture_output=True,
            **self._as_server_user(),
        )
        if done.returncode != 0:
            output = (done.stdout + done.stderr).decode(errors="replace")[-3000:]
            pytest.fail(f"initdb failed ({done.returncode}):\n{output}", pytrace=False)

    def start(self) -> None:
        """Start `postgres` on the existing cluster; blocks until it accepts connections
        (fails the test after START_TIMEOUT s or if it exits)."""
        assert self.process is None or self.process.poll() is not None, "already running"
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [
                    str(self.bin_dir / "postgres"),
                    "-D",
                    str(self.data_dir),
                    "-p",
                    str(self.port),
                    "-k",
                    str(self.folder),
                    "-c",
                    "listen_addresses=127.0.0.1",
                    # A throwaway cluster: durability only costs time.
                    "-c",
                    "fsync=off",
                    "-c",
                    "synchronous_commit=off",
                    "-c",
                    "full_page_writes=off",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                **self._as_server_user(),
            )
        deadline = time.monotonic() + START_TIMEOUT
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(
                    f"postgres exited with {self.process.returncode}:\n{self.log()}", pytrace=False
                )
            try:
                with psycopg.connect(self.admin_conninfo(), connect_timeout=2):
                    return
            except psycopg.OperationalError as exc:
                last = exc
            time.sleep(0.05)
        self.kill()
        pytest.fail(
            f"postgres did not accept connections within {START_TIMEOUT:g} s ({last}):\n"
            f"{self.log()}",
            pytrace=False,
        )

    def stop(self) -> None:
        """Fast shutdown (clients are disconnected, the cluster stays); blocks until the
        server exited, killing it after STOP_TIMEOUT s."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGINT)  # SIGTERM would wait for clients to leave
        try:
            self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()  # its backends exit when they see the postmaster gone
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

    def admin_conninfo(self, dbname: str = "postgres") -> str:
        """The superuser over the Unix socket (trusted: no password)."""
        return f"host={self.folder} port={self.port} user={SUPERUSER} dbname={dbname}"

    def url_for(self, dbname: str, user: str = APP_ROLE, password: str = APP_PASSWORD) -> str:
        """A DATABASE_URL for `dbname` over TCP, as the password-protected role `pool`."""
        return f"postgresql://{user}:{password}@127.0.0.1:{self.port}/{dbname}"

    def sql(self, statement: str, dbname: str = "postgres") -> list[tuple[Any, ...]]:
        """Run one statement as the superuser (autocommit); its rows, if any."""
        with psycopg.connect(self.admin_conninfo(dbname), autocommit=True) as connection:
            cursor = connection.execute(statement.encode())
            return cursor.fetchall() if cursor.description is not None else []

    def create_database(self, prefix: str = "test") -> str:
        """A new, empty database owned by the role `pool`; its DATABASE_URL."""
        self._databases += 1
        name = f"{prefix}_{self._databases}_{secrets.token_hex(3)}".lower()
        self.sql(f'CREATE DATABASE "{name}" OWNER {APP_ROLE}')
        return self.url_for(name)

    def _as_server_user(self) -> dict[str, Any]:
        if not self._run_as:
            return {}
        # Popen's user=/group= switch in the child itself (no runuser in between): the pid
        # we hold is postgres's own, so a signal reaches the postmaster.
        return {"user": self._run_as, "group": self._run_as, "extra_groups": [], "cwd": "/"}


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the test session; stopped and removed at its end."""
    server = PostgresServer.create()
    yield server
    server.destroy()
