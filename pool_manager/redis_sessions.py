"""Server-side chat sessions in Redis (`RedisSessionStore`), for managers that share one.

Chosen by `open_session_store` when a Redis URL is configured; otherwise sessions live in
the SQL store's own tables. Per session, with `prefix` (default "pool:"):

- `{prefix}session:{id}:meta`: a hash of owner, model, created_at, updated_at;
- `{prefix}session:{id}:messages`: a list of the kept messages as JSON, oldest first;

and two sorted sets of session ids scored by updated_at, for listing:
`{prefix}sessions:owner:{owner}` (one owner's) and `{prefix}sessions` (everyone's).

`append` and `delete` are Lua scripts, so each is atomic: concurrent appends to one
session land whole, one after the other. The delete script names the owner's sorted set
from the owner it finds, which a single Redis allows (not a Redis Cluster).

`description` and every error name the server as `redis host:port/db`: never the URL,
which may hold a password.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import redis.asyncio
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from pool_manager.store import (
    SessionForbidden,
    SessionInfo,
    SessionMessage,
    SessionStore,
    SqlStore,
    StoreError,
    sessions_order,
)

T = TypeVar("T")

# KEYS: meta, messages, the owner's index, everyone's index.
# ARGV: session id, owner, model, now, keep_last, then each message as JSON.
# Returns 0 (nothing changed) when the session is another owner's, else 1.
_APPEND = """
local stored = redis.call('HGET', KEYS[1], 'owner')
if stored and stored ~= ARGV[2] then
  return 0
end
if not stored then
  redis.call('HSET', KEYS[1], 'owner', ARGV[2], 'created_at', ARGV[4])
end
redis.call('HSET', KEYS[1], 'model', ARGV[3], 'updated_at', ARGV[4])
-- In slices: unpack() of many thousands of values would overflow Lua's stack.
for first = 6, #ARGV, 1000 do
  redis.call('RPUSH', KEYS[2], unpack(ARGV, first, math.min(first + 999, #ARGV)))
end
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[5]), -1)
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[1])
redis.call('ZADD', KEYS[4], ARGV[4], ARGV[1])
return 1
"""

# KEYS: meta, messages, everyone's index.
# ARGV: session id, the owners' index prefix, and the owner when it must match (absent for
# an admin). Returns 0 when there is no such session, -1 when it is another owner's (kept),
# 1 when deleted.
_DELETE = """
local stored = redis.call('HGET', KEYS[1], 'owner')
if not stored then
  return 0
end
if ARGV[3] and stored ~= ARGV[3] then
  return -1
end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('ZREM', ARGV[2] .. stored, ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
return 1
"""


@dataclass(frozen=True)
class _Connected:
    """The client and its scripts, made together at `open`."""

    redis: redis.asyncio.Redis
    append: AsyncScript
    delete: AsyncScript


def redis_description(redis_url: str) -> str:
    """'redis host:port/db' (or 'redis unix:/path/db') for a Redis URL, without user or
    password. Raises StoreError when the URL cannot be parsed (without repeating it)."""
    try:
        params = parse_url(redis_url)
    except ValueError:
        raise StoreError("redis: the Redis URL is not a valid redis:// URL") from None
    db = params.get("db", 0)
    if "path" in params:
        return f"redis unix:{params['path']}/{db}"
    return f"redis {params.get('host', 'localhost')}:{params.get('port', 6379)}/{db}"


class RedisSessionStore(SessionStore):
    """Chat sessions in a Redis database, which several managers may share. One client
    with its connection pool; a connection found broken (the server restarted) is replaced
    once and the command sent again. A command without an answer within `timeout` seconds
    fails with StoreError."""

    def __init__(self, redis_url: str, timeout: float = 10.0, prefix: str = "pool:") -> None:
        self.description = redis_description(redis_url)
        self._url = redis_url  # holds the password: never in a message
        self._password = str(parse_url(redis_url).get("password") or "")
        self._timeout = timeout
        self._prefix = prefix
        self._connected: _Connected | None = None

    async def open(self) -> None:
        if self._connected is None:
            client = redis.asyncio.Redis.from_url(
                self._url,
                decode_responses=True,
                socket_timeout=self._timeout,
                socket_connect_timeout=self._timeout,
                # Once, at once, and only for a connection that failed: a timed-out command
                # may have run, and an append must not run twice.
                retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            )
            # EVALSHA, loading the script again where the server lost it (a restart).
            append, delete = client.register_script(_APPEND), client.register_script(_DELETE)
            self._connected = _Connected(client, append, delete)
        await self.ping()

    async def close(self) -> None:
        connected, self._connected = self._connected, None
        if connected is not None:
            with contextlib.suppress(Exception):  # closing: nothing to do about it
                await connected.redis.aclose()

    async def ping(self) -> None:
        await self._run(lambda connected: connected.redis.ping())

    async def history(self, session_id: str, owner: str) -> list[SessionMessage]:
        async def read(connected: _Connected) -> list[Any]:
            # MULTI/EXEC: the owner and the messages of one moment.
            async with connected.redis.pipeline(transaction=True) as pipe:
                pipe.hget(self._meta(session_id), "owner")
                pipe.lrange(self._messages(session_id), 0, -1)
                replies: list[Any] = await pipe.execute()
                return replies

        stored_owner, messages = await self._run(read)
        if stored_owner is None:
            return []
        if stored_owner != owner:
            raise self._forbidden(session_id)
        return [_message(text) for text in messages]

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
        keys = [
            self._meta(session_id),
            self._messages(session_id),
            self._owner_index(owner),
            self._all_index(),
        ]
        args: list[str | int] = [session_id, owner, model, repr(time.time()), keep_last]
        args += [json.dumps({"role": m.role, "content": m.content, "at": m.at}) for m in messages]
        done = await self._run(lambda connected: connected.append(keys=keys, args=args))
        if done == 0:
            raise self._forbidden(session_id)

    async def sessions(self, owner: str | None) -> list[SessionInfo]:
        index = self._all_index() if owner is None else self._owner_index(owner)

        async def read(connected: _Connected) -> list[SessionInfo]:
            newest_first = await connected.redis.zrange(index, 0, -1, desc=True)
            session_ids = cast(list[str], newest_first)  # decode_responses: str, not bytes
            async with connected.redis.pipeline(transaction=True) as pipe:
                for session_id in session_ids:
                    pipe.hmget(self._meta(session_id), "owner", "model", "created_at", "updated_at")
                    pipe.llen(self._messages(session_id))
                replies: list[Any] = await pipe.execute() if session_ids else []
            infos = []
            for session_id, meta, count in zip(
                session_ids, replies[::2], replies[1::2], strict=True
            ):
                its_owner, model, created_at, updated_at = meta
                if its_owner is None:  # deleted since the ids were read
                    continue
                infos.append(
                    SessionInfo(
                        session_id,
                        its_owner,
                        model,
                        int(count),
                        float(created_at),
                        float(updated_at),
                    )
                )
            return infos

        return sorted(await self._run(read), key=sessions_order)

    async def delete(self, session_id: str, owner: str | None) -> bool:
        keys = [self._meta(session_id), self._messages(session_id), self._all_index()]
        args = [session_id, self._owner_index("")]
        if owner is not None:
            args.append(owner)
        done = await self._run(lambda connected: connected.delete(keys=keys, args=args))
        if done == -1:
            raise self._forbidden(session_id)
        return bool(done == 1)

    # --- keys -----------------------------------------------------------------------------

    def _meta(self, session_id: str) -> str:
        return f"{self._prefix}session:{session_id}:meta"

    def _messages(self, session_id: str) -> str:
        return f"{self._prefix}session:{session_id}:messages"

    def _owner_index(self, owner: str) -> str:
        return f"{self._prefix}sessions:owner:{owner}"

    def _all_index(self) -> str:
        return f"{self._prefix}sessions"

    # --- errors ---------------------------------------------------------------------------

    async def _run(self, work: Callable[[_Connected], Awaitable[T]]) -> T:
        """`work` with the client; Redis errors become StoreError (naming the server, never
        the password)."""
        connected = self._connected
        if connected is None:
            raise StoreError(f"{self.description}: the store is not open")
        try:
            return await work(connected)
        except RedisError as exc:
            # `from None`: the chained error would carry the connection's details.
            raise self._error(exc) from None

    def _error(self, exc: RedisError) -> StoreError:
        message = " ".join(str(exc).split()) or type(exc).__name__
        if self._password:
            message = message.replace(self._password, "***")
        return StoreError(f"{self.description}: {message}")

    def _forbidden(self, session_id: str) -> SessionForbidden:
        # Says neither whose it is nor anything about it.
        return SessionForbidden(f"{self.description}: session {session_id!r} is another owner's")


def _message(text: str) -> SessionMessage:
    fields = json.loads(text)
    return SessionMessage(fields["role"], fields["content"], float(fields["at"]))


def open_session_store(redis_url: str | None, store: SqlStore) -> SessionStore:
    """RedisSessionStore(redis_url) when a URL is given (not yet opened), else `store`
    itself (sessions in its own tables). Raises StoreError for a URL that is not a
    redis://, rediss:// or unix:// one (without repeating it)."""
    if not redis_url:
        return store
    return RedisSessionStore(redis_url)
