"""The durable store (keys, usage) and the usage ledger, on SQLite and on a real PostgreSQL.

Every test runs on both backends. PostgreSQL tests connect as a role with a password, over
TCP, each to a fresh database; the outage tests stop a server of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pool_manager.store import (
    KeyExists,
    KeyRecord,
    Ledger,
    PostgresStore,
    SqliteStore,
    Store,
    StoreError,
    UsageRow,
    hour_start,
    open_store,
)
from tests.pg_server import APP_PASSWORD, PostgresServer

HOUR = 3600
T0 = hour_start(1_780_000_000)


@dataclass
class Database:
    """One empty database of a backend; `new_store` opens another store on it (as a
    second manager sharing it would), closed at the test's end."""

    backend: str
    make: Callable[[], Store]
    opened: list[Store] = field(default_factory=list)

    async def new_store(self) -> Store:
        store = self.make()
        await store.open()
        self.opened.append(store)
        return store


@pytest.fixture(params=["sqlite", "postgresql"])
async def database(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    if request.param == "sqlite":
        path = tmp_path / "store" / "usage.db"
        database = Database("sqlite", lambda: SqliteStore(path))
    else:
        server: PostgresServer = request.getfixturevalue("postgres_server")
        url = server.create_database()
        database = Database("postgresql", lambda: PostgresStore(url))
    yield database
    for store in database.opened:
        await store.close()


@pytest.fixture
async def store(database: Database) -> Store:
    return await database.new_store()


def key(name: str, role: str = "client", **limits: Any) -> KeyRecord:
    return KeyRecord(
        name=name,
        role=role,
        digest=f"{name:0>64}"[-64:],
        prefix=f"pk-{name}"[:8],
        limits=limits,
        created_at=1_780_000_000.25,
    )


async def eventually(
    condition: Callable[[], Awaitable[Any]], timeout: float = 10.0, message: str = "condition"
) -> Any:
    """Poll the async `condition` until it returns something truthy; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await condition()
        if last:
            return last
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {message} (last: {last!r})")


# --- keys ------------------------------------------------------------------------------------


async def test_keys_add_find_list_update_delete(store: Store) -> None:
    alice = key("alice", requests_per_minute=60, models=["smollm2:135m"])
    bob = key("bob", role="admin")
    await store.add_key(bob)
    await store.add_key(alice)

    assert await store.keys() == [alice, bob]  # by name
    assert await store.key_by_digest(alice.digest) == alice  # limits and float time round-trip
    assert await store.key_by_digest("0" * 64) is None

    updated = await store.update_key("alice", limits={"tokens_per_day": 1000})
    assert updated == KeyRecord(
        "alice", "client", alice.digest, alice.prefix, {"tokens_per_day": 1000}, alice.created_at
    )
    updated = await store.update_key("alice", role="admin")
    assert updated is not None and updated.role == "admin"
    assert updated.limits == {"tokens_per_day": 1000}  # kept: not given
    assert await store.update_key("alice") == updated  # nothing to change: as it is
    assert await store.key_by_digest(alice.digest) == updated
    assert await store.update_key("carol", role="admin") is None

    assert await store.delete_key("alice") is True
    assert await store.delete_key("alice") is False
    assert await store.key_by_digest(alice.digest) is None
    assert await store.keys() == [bob]


async def test_a_taken_name_or_digest_raises_key_exists(store: Store) -> None:
    alice = key("alice")
    await store.add_key(alice)
    with pytest.raises(KeyExists, match="alice"):
        await store.add_key(key("alice", role="admin"))
    with pytest.raises(KeyExists, match="digest"):
        await store.add_key(KeyRecord("alias", "client", alice.digest, "x", {}, 0.0))
    assert await store.keys() == [alice]  # the first one, unchanged
    assert issubclass(KeyExists, StoreError)


async def test_keys_outlive_the_store_object(database: Database) -> None:
    first = await database.new_store()
    await first.add_key(key("alice"))
    await first.add_usage([UsageRow("key:alice", "m", T0, requests=1)])
    await first.close()
    with pytest.raises(StoreError, match="the store is not open"):
        await first.ping()
    again = await database.new_store()  # opening again keeps what is there
    assert [record.name for record in await again.keys()] == ["alice"]
    assert await again.usage() == [UsageRow("key:alice", "m", T0, requests=1)]


# --- usage -----------------------------------------------------------------------------------


async def test_concurrent_increments_add_up_exactly(database: Database) -> None:
    # Two store objects on one database, as two managers sharing it: 20 tasks x 10 batches.
    stores = [await database.new_store(), await database.new_store()]

    async def book_ten(task: int) -> None:
        for call in range(10):
            await stores[task % 2].add_usage(
                [
                    UsageRow("key:alice", "m1", T0, requests=1, prompt_tokens=task, errors=1),
                    UsageRow("key:alice", "m1", T0, completion_tokens=call),  # same row again
                    UsageRow(f"key:t{task}", "m2", T0 + HOUR, requests=1, cached_tokens=2),
                ]
            )

    await asyncio.gather(*(book_ten(task) for task in range(20)))

    rows = {row.key: row for row in await stores[0].usage()}
    assert rows[("key:alice", "m1", T0)] == UsageRow(
        "key:alice",
        "m1",
        T0,
        requests=200,
        prompt_tokens=10 * sum(range(20)),
        completion_tokens=20 * sum(range(10)),
        errors=200,
    )
    for task in range(20):
        assert rows[(f"key:t{task}", "m2", T0 + HOUR)].requests == 10
        assert rows[(f"key:t{task}", "m2", T0 + HOUR)].cached_tokens == 20
    assert len(rows) == 21


async def test_usage_filters_and_order(store: Store) -> None:
    rows = [
        UsageRow(caller, model, T0 + n * HOUR, requests=1 + n, refusals=n)
        for n in range(3)
        for caller in ("key:bob", "key:alice")
        for model in ("m2", "m1")
    ]
    await store.add_usage(rows)
    everything = await store.usage()
    assert everything == sorted(rows, key=lambda r: (r.hour, r.caller, r.model))
    assert [(r.caller, r.model) for r in everything[:4]] == [
        ("key:alice", "m1"),
        ("key:alice", "m2"),
        ("key:bob", "m1"),
        ("key:bob", "m2"),
    ]

    assert {r.hour for r in await store.usage(since=T0 + HOUR)} == {T0 + HOUR, T0 + 2 * HOUR}
    assert {r.hour for r in await store.usage(until=T0 + HOUR)} == {T0}  # until: exclusive
    assert {r.hour for r in await store.usage(since=T0 + HOUR, until=T0 + 2 * HOUR)} == {T0 + HOUR}
    alice = await store.usage(caller="key:alice")
    assert len(alice) == 6 and {r.caller for r in alice} == {"key:alice"}
    one = await store.usage(caller="key:bob", model="m1", since=T0 + 2 * HOUR)
    assert one == [UsageRow("key:bob", "m1", T0 + 2 * HOUR, requests=3, refusals=2)]
    assert await store.usage(caller="key:nobody") == []
    await store.add_usage([])  # nothing to write: no error, no row


def test_hour_start() -> None:
    assert hour_start(T0) == T0
    assert hour_start(T0 + 3599.9) == T0
    assert hour_start(T0 + 3600) == T0 + HOUR


# --- the ledger ------------------------------------------------------------------------------


async def test_ledger_books_in_memory_and_flushes_in_one_write(store: Store) -> None:
    ledger = Ledger(store)
    for n in range(100):
        ledger.book(UsageRow("key:alice", "m1", T0, requests=1, prompt_tokens=n))
        ledger.book(UsageRow("open", "m2", T0 + HOUR, requests=1, refusals=n % 2))
    assert ledger.pending_rows == 2
    assert await store.usage() == []  # nothing written before a flush

    await ledger.flush()
    assert ledger.pending_rows == 0
    assert await store.usage() == [
        UsageRow("key:alice", "m1", T0, requests=100, prompt_tokens=sum(range(100))),
        UsageRow("open", "m2", T0 + HOUR, requests=100, refusals=50),
    ]
    await ledger.flush()  # nothing pending: nothing written twice
    assert (await store.usage())[0].requests == 100


async def test_ledger_usage_merges_pending_and_stored_rows(store: Store) -> None:
    ledger = Ledger(store)
    ledger.book(UsageRow("key:alice", "m1", T0, requests=2, completion_tokens=10))
    ledger.book(UsageRow("key:bob", "m1", T0, requests=1))
    await ledger.flush()
    ledger.book(UsageRow("key:alice", "m1", T0, requests=1, completion_tokens=5))  # stored too
    ledger.book(UsageRow("key:alice", "m2", T0 + HOUR, errors=1))  # pending only

    assert await ledger.usage() == [
        UsageRow("key:alice", "m1", T0, requests=3, completion_tokens=15),
        UsageRow("key:bob", "m1", T0, requests=1),
        UsageRow("key:alice", "m2", T0 + HOUR, errors=1),
    ]
    assert await ledger.usage(caller="key:alice", model="m1") == [
        UsageRow("key:alice", "m1", T0, requests=3, completion_tokens=15)
    ]
    assert await ledger.usage(since=T0 + HOUR) == [UsageRow("key:alice", "m2", T0 + HOUR, errors=1)]
    assert await ledger.usage(until=T0 + HOUR, caller="key:bob") == [
        UsageRow("key:bob", "m1", T0, requests=1)
    ]
    assert ledger.pending_rows == 2  # reading wrote nothing
    assert len(await store.usage()) == 2


async def test_ledger_usage_during_a_write_counts_the_batch_once(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger = Ledger(store)
    writing, may_write = asyncio.Event(), asyncio.Event()
    add_usage = store.add_usage

    async def add_usage_when_let(rows: list[UsageRow]) -> None:
        writing.set()
        await may_write.wait()
        await add_usage(rows)

    monkeypatch.setattr(store, "add_usage", add_usage_when_let)
    ledger.book(UsageRow("key:alice", "m1", T0, requests=1))
    flush = asyncio.create_task(ledger.flush())
    await asyncio.wait_for(writing.wait(), 10)
    assert ledger.pending_rows == 1  # in the write under way: not yet known to be written
    # The batch is neither pending nor stored now: a reader waits for the write to end.
    reading = asyncio.create_task(ledger.usage())
    done, _ = await asyncio.wait({reading}, timeout=0.2)
    assert not done, f"read during the write: {reading.result()}"
    may_write.set()
    await asyncio.wait_for(flush, 10)
    assert await asyncio.wait_for(reading, 10) == [UsageRow("key:alice", "m1", T0, requests=1)]


async def test_ledger_run_flushes_periodically_and_once_more_when_cancelled(store: Store) -> None:
    ledger = Ledger(store, flush_seconds=0.05)
    runner = asyncio.create_task(ledger.run())
    try:
        ledger.book(UsageRow("key:alice", "m1", T0, requests=1))

        async def written() -> bool:
            return ledger.pending_rows == 0 and len(await store.usage()) == 1

        await eventually(written, message="the ledger's loop to write the booked row")
    finally:
        ledger.book(UsageRow("key:alice", "m1", T0, requests=1))  # written by the last flush
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
    assert ledger.pending_rows == 0
    assert await store.usage() == [UsageRow("key:alice", "m1", T0, requests=2)]


# --- outages ---------------------------------------------------------------------------------


@dataclass
class Outage:
    """A store and a way to take its database away and give it back."""

    store: Store
    make: Callable[[], Store]  # another store on the same database, not opened
    begin: Callable[[], None]
    end: Callable[[], None]
    ping_fails: bool  # whether ping sees the outage (a locked SQLite file still reads)


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server of this test's own, which it may stop."""
    server = PostgresServer.create()
    yield server
    server.destroy()


@pytest.fixture(params=["sqlite", "postgresql"])
async def outage(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Outage]:
    if request.param == "sqlite":
        # Another process holds the file's write lock: writers wait busy_timeout, then fail.
        path = tmp_path / "usage.db"

        def make() -> Store:
            return SqliteStore(path, busy_timeout=0.2)

        store = make()
        await store.open()
        locker = sqlite3.connect(path, isolation_level=None)

        def lock() -> None:
            locker.execute("BEGIN EXCLUSIVE")

        def unlock() -> None:
            locker.execute("ROLLBACK")

        yield Outage(store, make, lock, unlock, ping_fails=False)
        locker.close()
    else:
        server: PostgresServer = request.getfixturevalue("own_postgres")
        url = server.create_database()

        def make() -> Store:
            return PostgresStore(url, timeout=5)

        store = make()
        await store.open()
        yield Outage(store, make, server.stop, server.start, ping_fails=True)
    await store.close()


async def test_a_failed_flush_keeps_its_rows_until_the_database_is_back(outage: Outage) -> None:
    store = outage.store
    ledger = Ledger(store)
    ledger.book(UsageRow("key:alice", "m1", T0, requests=1, prompt_tokens=5))
    await ledger.flush()

    outage.begin()
    ledger.book(UsageRow("key:alice", "m1", T0, requests=1, prompt_tokens=7))
    ledger.book(UsageRow("key:bob", "m1", T0, requests=1))
    if outage.ping_fails:
        with pytest.raises(StoreError, match=f"^{re.escape(store.description)}: "):
            await store.ping()
    with pytest.raises(StoreError, match=f"^{re.escape(store.description)}: ") as failure:
        await ledger.flush()
    assert APP_PASSWORD not in str(failure.value)
    assert ledger.pending_rows == 2  # kept
    ledger.book(UsageRow("key:alice", "m1", T0, requests=1, prompt_tokens=11))  # meanwhile
    with pytest.raises(StoreError):
        await ledger.flush()
    assert ledger.pending_rows == 2
    outage.end()

    await store.ping()
    await ledger.flush()
    assert ledger.pending_rows == 0
    assert await store.usage() == [  # nothing lost, nothing twice
        UsageRow("key:alice", "m1", T0, requests=3, prompt_tokens=23),
        UsageRow("key:bob", "m1", T0, requests=1),
    ]


async def test_the_ledger_loop_logs_a_failed_flush_and_retries(
    outage: Outage, caplog: pytest.LogCaptureFixture
) -> None:
    ledger = Ledger(outage.store, flush_seconds=0.05)
    outage.begin()
    runner = asyncio.create_task(ledger.run())
    try:
        ledger.book(UsageRow("key:alice", "m1", T0, requests=1))

        async def warned() -> bool:
            return any("usage ledger: cannot write 1 rows" in m for m in caplog.messages)

        await eventually(warned, message="a warning about the failed flush")
        assert ledger.pending_rows == 1
        outage.end()

        async def written() -> bool:
            return ledger.pending_rows == 0

        await eventually(written, message="the loop to write the row once the database is back")
    finally:
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
    assert await outage.store.usage() == [UsageRow("key:alice", "m1", T0, requests=1)]


async def test_a_store_opened_during_an_outage_works_once_the_database_is_back(
    outage: Outage,
) -> None:
    late = outage.make()
    outage.begin()
    with pytest.raises(StoreError):
        await late.open()
    outage.end()
    await late.add_key(key("alice"))  # connects, with the tables made
    assert [record.name for record in await late.keys()] == ["alice"]
    await late.close()


async def test_postgres_reconnects_once_after_a_server_restart(
    own_postgres: PostgresServer,
) -> None:
    store = PostgresStore(own_postgres.create_database())
    await store.open()
    try:
        await store.add_key(key("alice"))
        own_postgres.stop()
        own_postgres.start()
        # The store's connection died with the old server: the next call, on a new one, works.
        assert [record.name for record in await store.keys()] == ["alice"]
        await store.add_usage([UsageRow("key:alice", "m1", T0, requests=1)])
        own_postgres.stop()
        own_postgres.start()
        await store.add_usage([UsageRow("key:alice", "m1", T0, requests=1)])
        assert (await store.usage())[0].requests == 2
    finally:
        await store.close()


# --- naming the database -----------------------------------------------------------------------


async def test_the_password_never_shows(postgres_server: PostgresServer) -> None:
    url = postgres_server.create_database("secret")
    dbname = url.rsplit("/", 1)[1]
    store = open_store(url, Path("/unused.db"))
    assert isinstance(store, PostgresStore)
    assert store.description == f"postgresql 127.0.0.1:{postgres_server.port}/{dbname}"
    assert APP_PASSWORD not in repr(store)

    # Errors name the database, not the URL: a database that does not exist, a wrong
    # password, a server that is not there.
    for bad_url in (
        postgres_server.url_for("no_such_db"),
        postgres_server.url_for(dbname, password=APP_PASSWORD + "x"),
        f"postgresql://pool:{APP_PASSWORD}@127.0.0.1:1/{dbname}",
    ):
        bad = PostgresStore(bad_url, timeout=5)
        with pytest.raises(StoreError) as failure:
            await bad.open()
        message = str(failure.value)
        assert message.startswith("postgresql 127.0.0.1:"), message
        assert APP_PASSWORD not in message
        assert failure.value.__cause__ is None and failure.value.__suppress_context__
        await bad.close()

    with pytest.raises(StoreError) as failure:
        open_store(f"postgresql://pool:{APP_PASSWORD}@127.0.0.1:port/db?x", Path("/unused.db"))
    assert APP_PASSWORD not in str(failure.value)


def test_open_store_picks_the_backend(tmp_path: Path) -> None:
    sqlite = open_store(None, tmp_path / "usage.db")
    assert isinstance(sqlite, SqliteStore)
    assert sqlite.description == f"sqlite {tmp_path / 'usage.db'}"
    assert isinstance(open_store("", tmp_path / "usage.db"), SqliteStore)
    postgres = open_store("postgresql://u:pw@db.example:6543/pool", tmp_path / "usage.db")
    assert postgres.description == "postgresql db.example:6543/pool"
    assert open_store("postgresql:///pool", tmp_path / "x").description == (
        "postgresql localhost:5432/pool"
    )
    with pytest.raises(StoreError, match="postgresql://"):
        open_store("mysql://u:pw@db.example/pool", tmp_path / "usage.db")


async def test_sqlite_errors_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    path = tmp_path / "a-file" / "usage.db"  # its folder is a file
    store = SqliteStore(path)
    assert store.description == f"sqlite {path}"
    with pytest.raises(StoreError, match=f"^{re.escape(store.description)}: "):
        await store.open()
    await store.close()
    with pytest.raises(StoreError, match="the store is not open"):
        await store.ping()
