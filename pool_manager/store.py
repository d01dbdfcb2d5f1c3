"""The durable store: named API keys, the usage ledger and server-side chat sessions, in
SQLite or PostgreSQL.

SQLite (a file the caller names) is the default and needs nothing installed; with a
`DATABASE_URL` (postgresql://...) the same tables live in PostgreSQL, which several
managers can share. Both backends run the same SQL (`SqlStore`); each backend only says
how a statement reaches its database:

- `SqliteStore`: one connection, owned by one dedicated thread (every call is handed to
  it), so the event loop never waits on the disk. WAL mode, so readers in other processes
  do not block the writer.
- `PostgresStore`: one `psycopg.AsyncConnection` behind an asyncio lock; a connection the
  server dropped (a restart) is replaced once, at the next statement.

Usage is counted per caller x model x hour. `add_usage` increments the counters in the
database (`INSERT ... ON CONFLICT DO UPDATE SET n = n + excluded.n`), so managers sharing
a database never overwrite each other's counts. `Ledger` sits in front of it: a request
books into memory (no database on the request's path) and the ledger writes in batches.

A chat session is a conversation kept for its owner (`SessionStore`): a row in
`chat_sessions` and its messages in `chat_messages`, numbered by `seq`. `append` is one
transaction that first upserts the session's row, which locks it, so concurrent appends to
one session (from one manager or several) take turns and never share a `seq`. Sessions may
instead live in Redis (`pool_manager/redis_sessions.py`; its `open_session_store` picks).

Messages, exceptions and `description` name the database as `sqlite <path>` or
`postgresql host:port/db`: never the URL, which may hold a password.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import sqlite3
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Generator, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

log = logging.getLogger(__name__)

T = TypeVar("T")
Params = Sequence[Any]
Rows = list[tuple[Any, ...]]
# A transaction's body, written once for both backends: it yields each statement (with its
# parameters), is sent that statement's rows, and returns its result. The backend runs it
# in one transaction, rolled back if the body raises (SqlStore._transaction).
Transaction = Generator[tuple[str, Params], Rows, T]


class StoreError(Exception):
    """The database cannot be reached or refused a statement. The message says which
    database ('sqlite <path>' or 'postgresql host:port/db'), never a password."""


class KeyExists(StoreError):
    """A key with that name (or that digest) is already stored."""


class SessionForbidden(StoreError):
    """The session exists but belongs to another owner."""


@dataclass(frozen=True)
class KeyRecord:
    name: str  # unique, [A-Za-z0-9_.-]{1,64} (the caller validates it)
    role: str  # "client" or "admin"
    digest: str  # sha256 hex of the key; the key itself is never stored
    prefix: str  # the key's first 8 characters, shown to identify it
    limits: dict[str, Any]  # JSON-serialisable, stored as JSON text
    created_at: float  # unix seconds


@dataclass(frozen=True)
class UsageRow:
    caller: str  # "key:alice", "user:bob", "env:client", "open", "worker-port", ...
    model: str
    hour: int  # unix seconds of the hour's start: hour_start(t)
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    errors: int = 0
    refusals: int = 0
    cache_hits: int = 0  # requests answered from the L1 response cache (in `requests` too)

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.caller, self.model, self.hour)

    def plus(self, other: UsageRow) -> UsageRow:
        """This row's counters plus `other`'s (same caller, model and hour)."""
        return dataclasses.replace(
            self, **{name: getattr(self, name) + getattr(other, name) for name in COUNTERS}
        )


COUNTERS = (
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "errors",
    "refusals",
    "cache_hits",
)


@dataclass(frozen=True)
class SessionMessage:
    role: str  # "system", "user" or "assistant"
    content: str
    at: float  # unix seconds


@dataclass(frozen=True)
class SessionInfo:
    session_id: str
    owner: str  # the caller that made it: "key:alice", "user:bob", ...
    model: str  # the model of its last exchange
    messages: int  # how many are kept
    created_at: float  # unix seconds
    updated_at: float  # unix seconds of the last append


def sessions_order(info: SessionInfo) -> tuple[float, str]:
    """The listing's order: the latest updated first, ties by id."""
    return (-info.updated_at, info.session_id)


def hour_start(t: float) -> int:
    """The start of the hour `t` falls in, in unix seconds (a UsageRow's `hour`)."""
    return int(t) - int(t) % 3600


# --- the schema and the statements, shared by both backends ------------------------------
# Written with `?` placeholders; PostgresStore turns them into psycopg's `%s` (none of
# these statements holds a literal `?` or `%`).

# Each table is created if missing, so a store opened by an older manager gains the tables
# a newer one adds: append, never edit a shipped line.
SCHEMA = (
    """CREATE TABLE IF NOT EXISTS api_keys (
        name TEXT PRIMARY KEY,
        role TEXT NOT NULL,
        digest TEXT NOT NULL UNIQUE,
        prefix TEXT NOT NULL,
        limits TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL
    )""",
    f"""CREATE TABLE IF NOT EXISTS usage_hourly (
        caller TEXT NOT NULL,
        model TEXT NOT NULL,
        hour BIGINT NOT NULL,
        {", ".join(f"{name} BIGINT NOT NULL DEFAULT 0" for name in COUNTERS)},
        PRIMARY KEY (caller, model, hour)
    )""",
    "CREATE INDEX IF NOT EXISTS usage_hourly_by_hour ON usage_hourly (hour)",
    """CREATE TABLE IF NOT EXISTS chat_sessions (
        session_id TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        model TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS chat_sessions_by_owner ON chat_sessions (owner)",
    """CREATE TABLE IF NOT EXISTS chat_messages (
        session_id TEXT NOT NULL,
        seq BIGINT NOT NULL,
        role TEXT NOT NULL,
        content TEXT NOT NULL,
        at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (session_id, seq)
    )""",
)

_KEY_COLUMNS = "name, role, digest, prefix, limits, created_at"
_USAGE_COLUMNS = ", ".join(("caller", "model", "hour", *COUNTERS))

_INSERT_KEY = f"""INSERT INTO api_keys ({_KEY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)
    ON CONFLICT DO NOTHING"""
# An atomic increment: concurrent writers (other managers on the same database) add up.
_ADD_USAGE = f"""INSERT INTO usage_hourly ({_USAGE_COLUMNS})
    VALUES ({", ".join("?" for _ in range(3 + len(COUNTERS)))})
    ON CONFLICT (caller, model, hour) DO UPDATE SET
    {", ".join(f"{name} = usage_hourly.{name} + excluded.{name}" for name in COUNTERS)}"""

# Creates the session or marks it used; either way the row is locked until the transaction
# ends (PostgreSQL), so appends to one session take turns. The owner is never changed: the
# stored one comes back, and the caller rolls back if it is another's.
_TOUCH_SESSION = """INSERT INTO chat_sessions (session_id, owner, model, created_at, updated_at)
    VALUES (?, ?, ?, ?, ?)
    ON CONFLICT (session_id) DO UPDATE
    SET model = excluded.model, updated_at = excluded.updated_at
    RETURNING owner"""
_MESSAGE_COLUMNS = "session_id, seq, role, content, at"
# Rows per INSERT: 5 parameters each stays far below SQLite's limit of parameters.
_MESSAGES_PER_INSERT = 100
# Its owner and its messages in one statement, so one snapshot (no append in between).
_HISTORY = """SELECT s.owner, m.role, m.content, m.at FROM chat_sessions s
    LEFT JOIN chat_messages m ON m.session_id = s.session_id
    WHERE s.session_id = ? ORDER BY m.seq"""
_SESSIONS = """SELECT s.session_id, s.owner, s.model, COUNT(m.seq), s.created_at, s.updated_at
    FROM chat_sessions s LEFT JOIN chat_messages m ON m.session_id = s.session_id
    {where} GROUP BY s.session_id, s.owner, s.model, s.created_at, s.updated_at"""


def _key_record(row: Sequence[Any]) -> KeyRecord:
    name, role, digest, prefix, limits, created_at = row
    return KeyRecord(name, role, digest, prefix, json.loads(limits), float(created_at))


def _usage_order(row: UsageRow) -> tuple[int, str, str]:
    return (row.hour, row.caller, row.model)


def _merged(rows: Iterable[UsageRow]) -> dict[tuple[str, str, int], UsageRow]:
    """Rows with the same caller, model and hour summed into one."""
    merged: dict[tuple[str, str, int], UsageRow] = {}
    for row in rows:
        earlier = merged.get(row.key)
        merged[row.key] = row if earlier is None else earlier.plus(row)
    return merged


class Connected(ABC):
    """A database connection: what /health pings and the app opens and closes."""

    description: str  # "sqlite /path/usage.db", "postgresql 127.0.0.1:5432/pool": no password

    @abstractmethod
    async def open(self) -> None:
        """Connect and create the tables that are missing. Raises StoreError."""

    @abstractmethod
    async def close(self) -> None:
        """Let the connection go. Never raises; later calls raise StoreError until `open`."""

    @abstractmethod
    async def ping(self) -> None:
        """A trivial query (for /health). Raises StoreError when the database is down."""


class Store(Connected):
    """Where keys and usage are kept. Every method may raise StoreError (the database is
    down or refused the statement); none blocks the event loop."""

    @abstractmethod
    async def add_key(self, record: KeyRecord) -> None:
        """Store a new key. Raises KeyExists when its name (or digest) is taken."""

    @abstractmethod
    async def keys(self) -> list[KeyRecord]:
        """Every key, by name."""

    @abstractmethod
    async def key_by_digest(self, digest: str) -> KeyRecord | None:
        """The key whose sha256 is `digest`, or None."""

    @abstractmethod
    async def update_key(
        self, name: str, *, role: str | None = None, limits: dict[str, Any] | None = None
    ) -> KeyRecord | None:
        """Change what is given (None: keep); the key as it is now, or None if no such key."""

    @abstractmethod
    async def delete_key(self, name: str) -> bool:
        """Whether a key by that name was there (and is now gone)."""

    @abstractmethod
    async def add_usage(self, rows: list[UsageRow]) -> None:
        """Add the rows' counters to the stored ones of their (caller, model, hour),
        inserting missing rows; all rows in one transaction (all or none written)."""

    @abstractmethod
    async def usage(
        self,
        *,
        caller: str | None = None,
        model: str | None = None,
        since: int | None = None,
        until: int | None = None,
    ) -> list[UsageRow]:
        """Stored rows with since <= hour < until, for one caller and model if given;
        ordered by hour, caller, model."""


class SessionStore(Connected):
    """Where server-side chat sessions are kept, each owned by the caller that made it.
    Every method may raise StoreError (the database is down or refused the command); none
    blocks the event loop. Session ids are the caller's, taken as given (validated by the
    caller)."""

    @abstractmethod
    async def history(self, session_id: str, owner: str) -> list[SessionMessage]:
        """The session's kept messages, oldest first; [] if there is no such session.
        Raises SessionForbidden if it is another owner's."""

    @abstractmethod
    async def append(
        self,
        session_id: str,
        owner: str,
        model: str,
        messages: list[SessionMessage],
        keep_last: int,
    ) -> None:
        """Append `messages` in order, creating the session (owned by `owner`) if new and
        recording `model` as its latest; then keep only its last `keep_last` (>= 1)
        messages. Atomic: concurrent appends to one session each land whole, in some order.
        Raises SessionForbidden if it is another owner's (nothing changed), ValueError
        for keep_last < 1."""

    @abstractmethod
    async def sessions(self, owner: str | None) -> list[SessionInfo]:
        """`owner`'s sessions, or everyone's (None); the latest updated first."""

    @abstractmethod
    async def delete(self, session_id: str, owner: str | None) -> bool:
        """Delete the session and its messages; whether it was there. `owner` None: any
        owner's (an admin). Raises SessionForbidden if it is another owner's (kept)."""


class SqlStore(Store, SessionStore):
    """The store's SQL, once; a backend says how a statement reaches its database."""

    # --- what a backend provides ----------------------------------------------------------

    @abstractmethod
    async def _fetch(self, sql: str, params: Params = ()) -> list[tuple[Any, ...]]:
        """Run one statement (in a transaction of its own) and return its rows."""

    @abstractmethod
    async def _execute(self, sql: str, params: Params = ()) -> int:
        """Run one statement (in a transaction of its own); the number of rows it changed."""

    @abstractmethod
    async def _execute_in_transaction(self, sql: str, many: Sequence[Params]) -> None:
        """Run one statement for each parameter list, all in one transaction."""

    @abstractmethod
    async def _transaction(self, body: Callable[[], Transaction[T]]) -> T:
        """Run the statements a new `body()` yields in one transaction, sending each its
        rows; its result. An exception from the body rolls the transaction back and is
        raised as it is. The body may run twice (a connection lost before the commit)."""

    # --- the store, in SQL ----------------------------------------------------------------

    async def ping(self) -> None:
        await self._fetch("SELECT 1")

    async def add_key(self, record: KeyRecord) -> None:
        params = (
            record.name,
            record.role,
            record.digest,
            record.prefix,
            json.dumps(record.limits),
            record.created_at,
        )
        if await self._execute(_INSERT_KEY, params) == 0:
            if await self._fetch("SELECT 1 FROM api_keys WHERE name = ?", (record.name,)):
                raise KeyExists(f"{self.description}: a key named {record.name!r} already exists")
            raise KeyExists(f"{self.description}: a key with the same digest already exists")

    async def keys(self) -> list[KeyRecord]:
        rows = await self._fetch(f"SELECT {_KEY_COLUMNS} FROM api_keys")
        # Sorted here, not by the database: a PostgreSQL collation would order names its way.
        return sorted((_key_record(row) for row in rows), key=lambda record: record.name)

    async def key_by_digest(self, digest: str) -> KeyRecord | None:
        rows = await self._fetch(f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE digest = ?", (digest,))
        return _key_record(rows[0]) if rows else None

    async def update_key(
        self, name: str, *, role: str | None = None, limits: dict[str, Any] | None = None
    ) -> KeyRecord | None:
        changes: dict[str, Any] = {}
        if role is not None:
            changes["role"] = role
        if limits is not None:
            changes["limits"] = json.dumps(limits)
        if changes:
            assignments = ", ".join(f"{column} = ?" for column in changes)
            sql = f"UPDATE api_keys SET {assignments} WHERE name = ? RETURNING {_KEY_COLUMNS}"
            rows = await self._fetch(sql, (*changes.values(), name))
        else:
            rows = await self._fetch(f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE name = ?", (name,))
        return _key_record(rows[0]) if rows else None

    async def delete_key(self, name: str) -> bool:
        return await self._execute("DELETE FROM api_keys WHERE name = ?", (name,)) > 0

    async def add_usage(self, rows: list[UsageRow]) -> None:
        if not rows:
            return
        # Sorted, so that two managers' batches lock their rows in the same order (in
        # PostgreSQL, another order could deadlock them).
        batch = sorted(_merged(rows).values(), key=_usage_order)
        params = [
            (row.caller, row.model, row.hour, *(getattr(row, name) for name in COUNTERS))
            for row in batch
        ]
        await self._execute_in_transaction(_ADD_USAGE, params)

    async def usage(
        self,
        *,
        caller: str | None = None,
        model: str | None = None,
        since: int | None = None,
        until: int | None = None,
    ) -> list[UsageRow]:
        conditions: list[str] = []
        params: list[Any] = []
        for condition, value in (
            ("caller = ?", caller),
            ("model = ?", model),
            ("hour >= ?", since),
            ("hour < ?", until),
        ):
            if value is not None:
                conditions.append(condition)
                params.append(value)
        where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
        rows = await self._fetch(f"SELECT {_USAGE_COLUMNS} FROM usage_hourly{where}", params)
        return sorted((UsageRow(*row) for row in rows), key=_usage_order)

    # --- chat sessions --------------------------------------------------------------------

    async def history(self, session_id: str, owner: str) -> list[SessionMessage]:
        rows = await self._fetch(_HISTORY, (session_id,))
        if rows and rows[0][0] != owner:
            raise self._forbidden(session_id)
        # A session without messages comes back as one row of NULLs from the LEFT JOIN.
        return [
            SessionMessage(role, content, float(at))
            for _, role, content, at in rows
            if role is not None
        ]

    async def append(
        self,
        session_id: str,
        owner: str,
        model: str,
        messages: list[SessionMessage],
        keep_last: int,
    ) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be at least 1, not {keep_last}")

        def body() -> Transaction[None]:
            now = time.time()
            rows = yield (_TOUCH_SESSION, (session_id, owner, model, now, now))
            if rows[0][0] != owner:
                raise self._forbidden(session_id)
            # Under the session's lock: no other append can take these numbers.
            rows = yield ("SELECT MAX(seq) FROM chat_messages WHERE session_id = ?", (session_id,))
            last = int(rows[0][0] or 0)
            for start in range(0, len(messages), _MESSAGES_PER_INSERT):
                chunk = messages[start : start + _MESSAGES_PER_INSERT]
                values = ", ".join("(?, ?, ?, ?, ?)" for _ in chunk)
                params: list[Any] = []
                for message in chunk:
                    last += 1
                    params += (session_id, last, message.role, message.content, message.at)
                yield (f"INSERT INTO chat_messages ({_MESSAGE_COLUMNS}) VALUES {values}", params)
            # The numbers are consecutive (only the oldest are ever deleted): this keeps
            # exactly the last keep_last.
            yield (
                "DELETE FROM chat_messages WHERE session_id = ? AND seq <= ?",
                (session_id, last - keep_last),
            )

        await self._transaction(body)

    async def sessions(self, owner: str | None) -> list[SessionInfo]:
        if owner is None:
            rows = await self._fetch(_SESSIONS.format(where=""))
        else:
            rows = await self._fetch(_SESSIONS.format(where="WHERE s.owner = ?"), (owner,))
        infos = (
            SessionInfo(session_id, its_owner, model, int(count), float(created), float(updated))
            for session_id, its_owner, model, count, created, updated in rows
        )
        # Sorted here, as keys(): ties by id the same way in both databases.
        return sorted(infos, key=sessions_order)

    async def delete(self, session_id: str, owner: str | None) -> bool:
        def body() -> Transaction[bool]:
            rows = yield (
                "DELETE FROM chat_sessions WHERE session_id = ? RETURNING owner",
                (session_id,),
            )
            if not rows:
                return False
            if owner is not None and rows[0][0] != owner:
                raise self._forbidden(session_id)  # rolls the delete back
            yield ("DELETE FROM chat_messages WHERE session_id = ?", (session_id,))
            return True

        return await self._transaction(body)

    def _forbidden(self, session_id: str) -> SessionForbidden:
        # Says neither whose it is nor anything about it.
        return SessionForbidden(f"{self.description}: session {session_id!r} is another owner's")


# --- SQLite --------------------------------------------------------------------------------


class SqliteStore(SqlStore):
    """The store in one SQLite file. One thread owns the connection and runs every
    statement, so the event loop never waits on the disk; another process writing the same
    file makes a writer wait up to `busy_timeout` seconds, then fail with StoreError."""

    def __init__(self, path: Path, busy_timeout: float = 10.0) -> None:
        self.path = path
        self.description = f"sqlite {path}"
        self._busy_timeout = busy_timeout
        self._connection: sqlite3.Connection | None = None  # touched only in the thread
        self._thread: ThreadPoolExecutor | None = None

    async def open(self) -> None:
        if self._thread is None:
            self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-store")
        await self._in_thread(self._connect)

    async def close(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        with contextlib.suppress(Exception):
            await asyncio.get_running_loop().run_in_executor(thread, self._disconnect)
        thread.shutdown(wait=False)  # idle: the close above was its last job

    async def _fetch(self, sql: str, params: Params = ()) -> list[tuple[Any, ...]]:
        return await self._in_thread(lambda: self._cursor().execute(sql, params).fetchall())

    async def _execute(self, sql: str, params: Params = ()) -> int:
        return await self._in_thread(lambda: self._cursor().execute(sql, params).rowcount)

    async def _execute_in_transaction(self, sql: str, many: Sequence[Params]) -> None:
        def run(connection: sqlite3.Connection) -> None:
            connection.executemany(sql, many)

        await self._in_thread(lambda: self._write_transaction(run))

    async def _transaction(self, body: Callable[[], Transaction[T]]) -> T:
        def run(connection: sqlite3.Connection) -> T:
            return _run_body(body(), lambda sql, params: connection.execute(sql, params).fetchall())

        return await self._in_thread(lambda: self._write_transaction(run))

    # --- in the thread --------------------------------------------------------------------

    async def _in_thread(self, work: Callable[[], T]) -> T:
        """Run `work` in the store's thread; sqlite3 and file errors become StoreError."""
        if self._thread is None:
            raise StoreError(f"{self.description}: the store is not open")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._thread, work)
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"{self.description}: {exc}") from exc

    def _connect(self) -> sqlite3.Connection:
        """The connection, made if there is none, with the tables created."""
        if self._connection is not None:
            return self._connection
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: no implicit transactions; each statement commits unless
        # _execute_in_transaction opened one.
        connection = sqlite3.connect(self.path, timeout=self._busy_timeout, isolation_level=None)
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            # In WAL mode NORMAL survives a crash of the process; only a power cut can lose
            # the last commits.
            connection.execute("PRAGMA synchronous=NORMAL")
            connection.execute("BEGIN IMMEDIATE")
            for statement in SCHEMA:
                connection.execute(statement)
            connection.commit()
        except BaseException:
            connection.close()
            raise
        self._connection = connection
        return connection

    def _disconnect(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()

    def _write_transaction(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """`work` in one write transaction: committed, or rolled back if it raises. Only
        this thread writes through the connection, so transactions never overlap."""
        connection = self._cursor().connection
        # IMMEDIATE: the write lock at BEGIN (waiting up to busy_timeout for another
        # process to let go of it), never a read lock that would have to be upgraded.
        connection.execute("BEGIN IMMEDIATE")
        try:
            result = work(connection)
        except BaseException:
            connection.rollback()
            raise
        connection.commit()
        return result

    def _cursor(self) -> sqlite3.Cursor:
        # Connecting here too: a store whose open failed works once the file can be opened.
        return self._connect().cursor()


# --- PostgreSQL ----------------------------------------------------------------------------


def postgres_description(database_url: str) -> str:
    """'postgresql host:port/db' for a connection URL (no user, no password).
    Raises StoreError when the URL cannot be parsed (without repeating it)."""
    try:
        params = conninfo_to_dict(database_url)
    except psycopg.Error:
        raise StoreError("postgresql: DATABASE_URL is not a valid connection URL") from None
    host = params.get("host") or params.get("hostaddr") or "localhost"
    port = params.get("port") or 5432
    dbname = params.get("dbname") or params.get("user") or ""
    return f"postgresql {host}:{port}/{dbname}"


class PostgresStore(SqlStore):
    """The store in a PostgreSQL database, which several managers may share. One
    connection, one statement at a time; a connection found broken (the server restarted)
    is replaced once, and that statement run again. A statement that takes longer than
    `timeout` seconds fails with StoreError (and its connection is dropped)."""

    def __init__(self, database_url: str, timeout: float = 10.0) -> None:
        self.description = postgres_description(database_url)
        params = conninfo_to_dict(database_url)
        params.setdefault("connect_timeout", max(1, round(timeout)))
        params.setdefault("application_name", "pool-manager")
        self._conninfo = make_conninfo("", **params)  # holds the password: never in a message
        self._password = str(params.get("password") or "")
        self._timeout = timeout
        self._connection: psycopg.AsyncConnection[tuple[Any, ...]] | None = None
        self._lock = asyncio.Lock()  # one statement at a time on the one connection
        self._opened = False
        self._tables_made = False

    async def open(self) -> None:
        self._opened = True
        await self.ping()  # connects, creating the tables

    async def close(self) -> None:
        self._opened = False
        async with self._lock:
            await self._drop_connection()

    async def _fetch(self, sql: str, params: Params = ()) -> list[tuple[Any, ...]]:
        async def fetch(connection: psycopg.AsyncConnection[tuple[Any, ...]]) -> Any:
            cursor = await connection.execute(_pg(sql), params)
            return await cursor.fetchall() if cursor.description is not None else []

        rows: list[tuple[Any, ...]] = await self._run(fetch)
        return rows

    async def _execute(self, sql: str, params: Params = ()) -> int:
        async def execute(connection: psycopg.AsyncConnection[tuple[Any, ...]]) -> int:
            cursor = await connection.execute(_pg(sql), params)
            return cursor.rowcount

        return await self._run(execute)

    async def _execute_in_transaction(self, sql: str, many: Sequence[Params]) -> None:
        async def execute(connection: psycopg.AsyncConnection[tuple[Any, ...]]) -> None:
            async with connection.transaction(), connection.cursor() as cursor:
                await cursor.executemany(_pg(sql), many)

        await self._run(execute)

    async def _transaction(self, body: Callable[[], Transaction[T]]) -> T:
        async def run(connection: psycopg.AsyncConnection[tuple[Any, ...]]) -> T:
            steps = body()  # a new one on each try
            async with connection.transaction():
                try:
                    sql, params = next(steps)
                    while True:
                        cursor = await connection.execute(_pg(sql), params)
                        rows = await cursor.fetchall() if cursor.description is not None else []
                        sql, params = steps.send(rows)
                except StopIteration as done:
                    result: T = done.value
                    return result

        return await self._run(run)

    async def _run(
        self, work: Callable[[psycopg.AsyncConnection[tuple[Any, ...]]], Awaitable[T]]
    ) -> T:
        """`work` on the connection (connecting first if there is none), under the lock.
        Raises StoreError."""
        if not self._opened:
            raise StoreError(f"{self.description}: the store is not open")
        async with self._lock:
            for attempt in (1, 2):
                connection = await self._connected()
                try:
                    async with asyncio.timeout(self._timeout):
                        return await work(connection)
                except TimeoutError:
                    await self._drop_connection()  # mid-statement: its state is unknown
                    raise StoreError(
                        f"{self.description}: no answer within {self._timeout:g} s"
                    ) from None
                except psycopg.OperationalError as exc:
                    broken = connection.broken or connection.closed
                    if broken:
                        await self._drop_connection()
                    if not (broken and attempt == 1):
                        raise self._error(exc) from None
                    # The server dropped the connection since the last statement (it
                    # restarted): once more on a new one. The work is one transaction, so
                    # it either was not applied or is applied now, except in the rare case
                    # of the connection breaking during COMMIT itself.
                    log.info("%s: connection lost (%s); reconnecting", self.description, exc)
                except psycopg.Error as exc:
                    raise self._error(exc) from None
        raise AssertionError("unreachable")

    async def _connected(self) -> psycopg.AsyncConnection[tuple[Any, ...]]:
        """The connection, made if there is none, with the tables created on the first one
        (so a store opened while its database was down works once it is back). Call under
        the lock. Raises StoreError."""
        if self._connection is not None and not self._connection.closed:
            return self._connection
        try:
            async with asyncio.timeout(self._timeout):
                # autocommit: every statement its own transaction unless in one.
                connection = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)
                try:
                    if not self._tables_made:
                        await self._create_tables(connection)
                        self._tables_made = True
                except BaseException:
                    await connection.close()
                    raise
        except TimeoutError:
            raise StoreError(f"{self.description}: no answer within {self._timeout:g} s") from None
        except psycopg.Error as exc:
            raise self._error(exc) from None
        self._connection = connection
        return connection

    @staticmethod
    async def _create_tables(connection: psycopg.AsyncConnection[tuple[Any, ...]]) -> None:
        async with connection.transaction():
            # Two managers starting at once would race in CREATE TABLE IF NOT EXISTS (one
            # fails on a duplicate catalog row): the lock makes one wait for the other.
            await connection.execute("SELECT pg_advisory_xact_lock(hashtext('pool_store'))")
            for statement in SCHEMA:
                await connection.execute(statement)

    async def _drop_connection(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.close()

    def _error(self, exc: psycopg.Error) -> StoreError:
        # `from None` where this is raised: the chained psycopg error carries the connection.
        message = " ".join(str(exc).split()) or type(exc).__name__  # libpq's: several lines
        if self._password:
            message = message.replace(self._password, "***")
        return StoreError(f"{self.description}: {message}")


def _run_body(steps: Transaction[T], run: Callable[[str, Params], Rows]) -> T:
    """Drive a transaction's body: each statement it yields through `run`, its rows sent
    back; the body's result. Runs no transaction itself (the caller's)."""
    try:
        sql, params = next(steps)
        while True:
            sql, params = steps.send(run(sql, params))
    except StopIteration as done:
        result: T = done.value
        return result


def _pg(sql: str) -> str:
    """A statement written with `?` placeholders in psycopg's `%s` style."""
    return sql.replace("?", "%s")


def open_store(database_url: str | None, sqlite_path: Path) -> SqlStore:
    """PostgresStore(database_url) when a URL is given, else SqliteStore(sqlite_path); not
    yet opened. Raises StoreError for a URL that is not a postgresql:// one (or unparsable)."""
    if not database_url:
        return SqliteStore(sqlite_path)
    if not database_url.startswith(("postgresql://", "postgres://")):
        raise StoreError("DATABASE_URL must start with postgresql://")
    return PostgresStore(database_url)


# --- the ledger -----------------------------------------------------------------------------


class Ledger:
    """Usage counted in memory and written in batches: booking never waits for the database.

    Owns the counts not yet written. `book` adds to them; `flush` (and `run`, every
    flush_seconds) writes them in one `add_usage`. A write that fails keeps its rows for
    the next one, so an outage delays the counts but loses none; what is pending stays
    small, one row per caller x model x hour.
    """

    def __init__(self, store: Store, flush_seconds: float = 1.0) -> None:
        self._store = store
        self._flush_seconds = flush_seconds
        self._pending: dict[tuple[str, str, int], UsageRow] = {}
        self._writing = 0  # rows of the batch being written now
        # Held while a batch is written and while usage is read, so that a reader sees
        # each batch once: in the store or pending, never in both or neither.
        self._lock = asyncio.Lock()
        self._failing_since: float | None = None  # monotonic; when writes began to fail
        self._last_warning: float | None = None

    @property
    def pending_rows(self) -> int:
        """Rows not yet known to be written (pending, or in the write under way)."""
        return len(self._pending) + self._writing

    def book(self, row: UsageRow) -> None:
        """Add `row` to the pending counters of its caller, model and hour. Never blocks."""
        earlier = self._pending.get(row.key)
        self._pending[row.key] = row if earlier is None else earlier.plus(row)

    async def flush(self) -> None:
        """Write what is pending now, in one add_usage; waits for a write under way first,
        so everything booked before the call is written when it returns. Raises StoreError,
        with the rows kept pending. Cancelling the caller does not cut the write off: it
        finishes (or fails, its rows kept) on its own."""
        write = asyncio.ensure_future(self._write_pending())
        await asyncio.shield(write)

    async def run(self) -> None:
        """Flush every flush_seconds until cancelled; a failed flush is logged and its
        rows retried at the next. When cancelled, waits for a write under way, then tries
        one last flush (its failure logged, not raised)."""
        try:
            while True:
                await asyncio.sleep(self._flush_seconds)
                await self._flush_logged()
        finally:
            # A write under way holds the lock: taking it waits for the write to end.
            async with self._lock:
                pass
            await self._flush_logged()

    async def usage(
        self,
        *,
        caller: str | None = None,
        model: str | None = None,
        since: int | None = None,
        until: int | None = None,
    ) -> list[UsageRow]:
        """The store's rows plus what is still pending, merged; ordered by hour, caller,
        model. Waits for a write under way. Raises StoreError."""
        async with self._lock:
            stored = await self._store.usage(caller=caller, model=model, since=since, until=until)
            pending = [
                row
                for row in self._pending.values()
                if (caller is None or row.caller == caller)
                and (model is None or row.model == model)
                and (since is None or row.hour >= since)
                and (until is None or row.hour < until)
            ]
        return sorted(_merged([*stored, *pending]).values(), key=_usage_order)

    async def _write_pending(self) -> None:
        async with self._lock:
            if not self._pending:
                return
            batch, self._pending = self._pending, {}
            self._writing = len(batch)
            try:
                await self._store.add_usage(list(batch.values()))
            except BaseException:
                for row in batch.values():  # back, with what was booked meanwhile
                    self.book(row)
                raise
            finally:
                self._writing = 0

    async def _flush_logged(self) -> None:
        """flush(), its StoreError logged: at once, then once a minute while it lasts."""
        try:
            await self.flush()
        except StoreError as exc:
            now = time.monotonic()
            if self._failing_since is None:
                self._failing_since = now
            if self._last_warning is None or now - self._last_warning >= 60:
                self._last_warning = now
                log.warning(
                    "usage ledger: cannot write %d rows for %.0f s (%s); retrying every %g s",
                    self.pending_rows,
                    now - self._failing_since,
                    exc,
                    self._flush_seconds,
                )
            return
        if self._failing_since is not None:
            log.info(
                "usage ledger: writing again after %.0f s", time.monotonic() - self._failing_since
            )
            self._failing_since = None
            self._last_warning = None
