"""Server-side chat sessions storage, on SQLite, a real PostgreSQL and a real Redis.

Every test runs on the three backends, each on an empty database of its own; the Redis
outage test stops a server of its own. PostgreSQL and Redis are reached over TCP with a
password, as a real DATABASE_URL or Redis URL would.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pool_manager.redis_sessions import RedisSessionStore, open_session_store
from pool_manager.store import (
    PostgresStore,
    SessionForbidden,
    SessionInfo,
    SessionMessage,
    SessionStore,
    SqliteStore,
    SqlStore,
    StoreError,
)
from tests.pg_server import PostgresServer
from tests.redis_server import REDIS_PASSWORD, RedisServer

T0 = 1_780_000_000.25
MODEL = "smollm2:135m"


@dataclass
class Backend:
    """One empty database of a backend; `new_store` opens another store on it (as a
    second manager sharing it would), closed at the test's end."""

    name: str
    make: Callable[[], SessionStore]
    opened: list[SessionStore] = field(default_factory=list)

    async def new_store(self) -> SessionStore:
        store = self.make()
        await store.open()
        self.opened.append(store)
        return store


@pytest.fixture(params=["sqlite", "postgresql", "redis"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    if request.param == "sqlite":
        path = tmp_path / "store" / "usage.db"
        backend = Backend("sqlite", lambda: SqliteStore(path))
    elif request.param == "postgresql":
        postgres: PostgresServer = request.getfixturevalue("postgres_server")
        database_url = postgres.create_database("sessions")
        backend = Backend("postgresql", lambda: PostgresStore(database_url))
    else:
        redis: RedisServer = request.getfixturevalue("redis_server")
        redis_url = redis.create_database()
        backend = Backend("redis", lambda: RedisSessionStore(redis_url))
    yield backend
    for store in backend.opened:
        await store.close()


@pytest.fixture
async def store(backend: Backend) -> SessionStore:
    return await backend.new_store()


def exchange(n: int, at: float = T0) -> list[SessionMessage]:
    """A user message and the assistant's answer to it."""
    return [
        SessionMessage("user", f"question {n}", at + n),
        SessionMessage("assistant", f"answer {n}", at + n + 0.5),
    ]


# --- one owner's session ---------------------------------------------------------------------


async def test_a_new_session_has_no_history(store: SessionStore) -> None:
    assert await store.history("never-made", "key:alice") == []
    assert await store.sessions("key:alice") == []
    assert await store.sessions(None) == []


async def test_append_then_history_in_order(store: SessionStore) -> None:
    first = [
        SessionMessage("system", "Answer briefly.\nIn French.", T0),
        SessionMessage("user", "héllo ✓ \"quoted\" 'single' ? % \\", T0 + 0.125),
        SessionMessage("assistant", "", T0 + 0.25),  # empty content is kept too
    ]
    await store.append("s1", "key:alice", MODEL, first, keep_last=100)
    assert await store.history("s1", "key:alice") == first  # content and float times round-trip

    await store.append("s1", "key:alice", "other:model", exchange(1), keep_last=100)
    await store.append("s1", "key:alice", "other:model", [], keep_last=100)  # touches it only
    assert await store.history("s1", "key:alice") == first + exchange(1)

    [info] = await store.sessions("key:alice")
    assert (info.session_id, info.owner, info.model, info.messages) == (
        "s1",
        "key:alice",
        "other:model",  # the model of its last exchange
        5,
    )
    assert info.created_at <= info.updated_at


async def test_keep_last_trims_the_oldest(store: SessionStore) -> None:
    for n in range(3):
        await store.append("s1", "key:alice", MODEL, exchange(n), keep_last=4)
    assert await store.history("s1", "key:alice") == exchange(1) + exchange(2)

    await store.append("s1", "key:alice", MODEL, exchange(3)[:1], keep_last=10)
    assert await store.history("s1", "key:alice") == exchange(1) + exchange(2) + exchange(3)[:1]
    await store.append("s1", "key:alice", MODEL, exchange(4), keep_last=1)
    assert await store.history("s1", "key:alice") == exchange(4)[1:]
    # One append longer than keep_last keeps its own last ones.
    await store.append("s1", "key:alice", MODEL, exchange(5) + exchange(6), keep_last=3)
    assert await store.history("s1", "key:alice") == exchange(5)[1:] + exchange(6)
    assert [info.messages for info in await store.sessions("key:alice")] == [3]

    with pytest.raises(ValueError, match="keep_last"):
        await store.append("s1", "key:alice", MODEL, exchange(7), keep_last=0)
    assert await store.history("s1", "key:alice") == exchange(5)[1:] + exchange(6)


async def test_a_session_outlives_the_store_object(backend: Backend) -> None:
    first = await backend.new_store()
    await first.append("s1", "key:alice", MODEL, exchange(1), keep_last=10)
    await first.close()
    with pytest.raises(StoreError, match="the store is not open"):
        await first.history("s1", "key:alice")
    again = await backend.new_store()
    assert await again.history("s1", "key:alice") == exchange(1)


# --- owners ----------------------------------------------------------------------------------


async def test_another_owner_is_forbidden(store: SessionStore) -> None:
    await store.append("s1", "key:alice", MODEL, exchange(1), keep_last=10)
    [before] = await store.sessions("key:alice")

    with pytest.raises(SessionForbidden) as failure:
        await store.history("s1", "user:bob")
    assert "key:alice" not in str(failure.value)  # whose it is stays unsaid
    with pytest.raises(SessionForbidden):
        await store.append("s1", "user:bob", "other:model", exchange(2), keep_last=1)
    with pytest.raises(SessionForbidden):
        await store.delete("s1", "user:bob")
    assert issubclass(SessionForbidden, StoreError)

    # Nothing changed: not the messages, the model, the times, nor who owns it.
    assert await store.history("s1", "key:alice") == exchange(1)
    assert await store.sessions("key:alice") == [before]
    assert await store.sessions("user:bob") == []
    assert await store.sessions(None) == [before]


async def test_deleting_a_session(store: SessionStore) -> None:
    for session_id in ("s1", "s2"):
        await store.append(session_id, "key:alice", MODEL, exchange(1), keep_last=10)
    await store.append("s3", "user:bob", MODEL, exchange(1), keep_last=10)

    assert await store.delete("s1", "key:alice") is True  # its owner
    assert await store.delete("s1", "key:alice") is False  # gone
    assert await store.delete("never-made", "key:alice") is False
    assert await store.delete("s3", None) is True  # an admin: anyone's
    assert await store.delete("s3", None) is False
    assert await store.history("s1", "key:alice") == []
    assert await store.history("s3", "user:bob") == []
    assert [info.session_id for info in await store.sessions(None)] == ["s2"]
    assert await store.sessions("user:bob") == []

    # A deleted session's id is free: the next append makes a new one, for its caller.
    await store.append("s3", "key:alice", MODEL, exchange(2), keep_last=10)
    assert await store.history("s3", "key:alice") == exchange(2)
    [info] = [info for info in await store.sessions("key:alice") if info.session_id == "s3"]
    assert info.messages == 2


async def test_sessions_listed_per_owner_and_all_latest_first(store: SessionStore) -> None:
    await store.append("a1", "key:alice", MODEL, exchange(1), keep_last=10)
    await store.append("b1", "user:bob", "other:model", exchange(1)[:1], keep_last=10)
    await store.append("a2", "key:alice", MODEL, [], keep_last=10)
    await store.append("a1", "key:alice", MODEL, exchange(2), keep_last=10)  # a1 is the latest

    alice = await store.sessions("key:alice")
    assert [(info.session_id, info.messages) for info in alice] == [("a1", 4), ("a2", 0)]
    assert all(info.owner == "key:alice" and info.model == MODEL for info in alice)
    assert alice[0].updated_at > alice[1].updated_at
    assert alice[0].created_at < alice[1].created_at  # made first, used last

    everyone = await store.sessions(None)
    assert [info.session_id for info in everyone] == ["a1", "a2", "b1"]
    assert everyone[2] == SessionInfo(
        "b1",
        "user:bob",
        "other:model",
        1,
        everyone[2].created_at,
        everyone[2].created_at,  # never appended to again
    )
    assert [info.updated_at for info in everyone] == sorted(
        (info.updated_at for info in everyone), reverse=True
    )
    assert await store.sessions("key:nobody") == []


# --- concurrency -----------------------------------------------------------------------------


async def test_concurrent_appends_keep_every_message(backend: Backend) -> None:
    # Two store objects on one database, as two managers sharing it: 20 tasks x 5 appends
    # of an exchange each, to one session that does not exist yet.
    stores = [await backend.new_store(), await backend.new_store()]

    async def chat(task: int) -> None:
        for call in range(5):
            exchange = [
                SessionMessage("user", f"q {task}.{call}", T0 + call),
                SessionMessage("assistant", f"a {task}.{call}", T0 + call),
            ]
            await stores[task % 2].append("shared", "key:alice", MODEL, exchange, keep_last=1000)

    await asyncio.gather(*(chat(task) for task in range(20)))

    history = await stores[0].history("shared", "key:alice")
    assert len(history) == 200
    questions = history[0::2]
    answers = history[1::2]
    # Each question followed by its own answer: no append split by another.
    for question, answer in zip(questions, answers, strict=True):
        assert question.role == "user" and answer.role == "assistant"
        assert answer.content == "a" + question.content[1:]
    assert sorted(q.content for q in questions) == sorted(
        f"q {task}.{call}" for task in range(20) for call in range(5)
    )
    # Each task's own exchanges in the order it made them.
    for task in range(20):
        mine = [q.content for q in questions if q.content.startswith(f"q {task}.")]
        assert mine == [f"q {task}.{call}" for call in range(5)]
    [info] = await stores[1].sessions(None)
    assert info.messages == 200


# --- choosing the backend --------------------------------------------------------------------


def test_open_session_store_picks_the_backend(tmp_path: Path) -> None:
    sql: SqlStore = SqliteStore(tmp_path / "usage.db")
    assert open_session_store(None, sql) is sql  # the SQL store keeps sessions itself
    assert open_session_store("", sql) is sql
    in_redis = open_session_store("redis://:pw@cache.example:6380/2", sql)
    assert isinstance(in_redis, RedisSessionStore)
    assert in_redis.description == "redis cache.example:6380/2"
    assert open_session_store("redis://localhost", sql).description == "redis localhost:6379/0"
    assert open_session_store("unix:///run/redis.sock?db=3", sql).description == (
        "redis unix:/run/redis.sock/3"
    )
    with pytest.raises(StoreError) as failure:
        open_session_store("http://u:secret-pw@cache.example/1", sql)
    assert "secret-pw" not in str(failure.value)
    with pytest.raises(StoreError) as failure:
        open_session_store("redis://u:secret-pw@cache.example:port/1", sql)
    assert "secret-pw" not in str(failure.value)


# --- Redis: naming the server, outages ---------------------------------------------------------


async def test_the_redis_password_never_shows(redis_server: RedisServer) -> None:
    url = redis_server.create_database()
    db = url.rsplit("/", 1)[1]
    store = RedisSessionStore(url)
    assert store.description == f"redis 127.0.0.1:{redis_server.port}/{db}"
    assert REDIS_PASSWORD not in repr(store)

    # Errors name the server, not the URL: a wrong password, a server that is not there, a
    # database number the server does not have.
    for bad_url in (
        redis_server.url_for(int(db), password=REDIS_PASSWORD + "x"),
        f"redis://:{REDIS_PASSWORD}@127.0.0.1:1/{db}",
        redis_server.url_for(100_000),
    ):
        bad = RedisSessionStore(bad_url, timeout=5)
        with pytest.raises(StoreError) as failure:
            await bad.open()
        message = str(failure.value)
        assert message.startswith("redis 127.0.0.1:"), message
        assert REDIS_PASSWORD not in message
        assert failure.value.__cause__ is None and failure.value.__suppress_context__
        await bad.close()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A Redis server of this test's own, which it may stop."""
    server = RedisServer.create()
    yield server
    server.destroy()


async def test_redis_outage_raises_store_error_and_recovers(own_redis: RedisServer) -> None:
    store = RedisSessionStore(own_redis.create_database(), timeout=5)
    await store.open()
    try:
        await store.append("s1", "key:alice", MODEL, exchange(1), keep_last=10)
        own_redis.stop()
        prefix = f"^{re.escape(store.description)}: "
        calls: list[Callable[[], Awaitable[object]]] = [
            store.ping,
            lambda: store.history("s1", "key:alice"),
            lambda: store.append("s1", "key:alice", MODEL, exchange(2), keep_last=10),
            lambda: store.sessions(None),
            lambda: store.delete("s1", None),
        ]
        for call in calls:
            with pytest.raises(StoreError, match=prefix) as failure:
                await call()
            assert REDIS_PASSWORD not in str(failure.value)

        own_redis.start()  # empty: the test server saves nothing
        # The client's connections died with the old server: the next calls, on new ones,
        # work (and the scripts are loaded again).
        await store.ping()
        assert await store.history("s1", "key:alice") == []
        await store.append("s1", "key:alice", MODEL, exchange(3), keep_last=10)
        assert await store.history("s1", "key:alice") == exchange(3)

        # A restart between two calls: the first after it finds its connection broken and
        # is sent again, once, on a new one.
        own_redis.stop()
        own_redis.start()
        await store.append("s2", "key:alice", MODEL, exchange(4), keep_last=10)
        assert await store.history("s2", "key:alice") == exchange(4)
        own_redis.stop()
        own_redis.start()
        assert await store.history("s2", "key:alice") == []  # emptied by the restart
    finally:
        await store.close()


async def test_a_redis_store_opened_during_an_outage_works_once_it_is_back(
    own_redis: RedisServer,
) -> None:
    store = RedisSessionStore(own_redis.create_database(), timeout=5)
    own_redis.stop()
    try:
        with pytest.raises(StoreError):
            await store.open()
        own_redis.start()
        await store.append("s1", "key:alice", MODEL, exchange(1), keep_last=10)
        assert await store.history("s1", "key:alice") == exchange(1)
    finally:
        await store.close()
