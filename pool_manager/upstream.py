"""A lean HTTP/1.1 client for the manager's hop to its own workers on loopback.

The relay is on every request's path, and a general-purpose client (httpx) spent about
a millisecond per request in its own layers. Workers are ours and speak plain
HTTP/1.1 (uvicorn), so this client does only that: keep-alive connections per worker,
one `write` for the request, a header block parsed in one read, and the body passed on
as it arrives (chunked or Content-Length).

Two things it guards against: a worker that stops answering (each read may wait at most
the request's `idle_timeout`, then the exchange fails with UpstreamTimeout), and idle
connections the worker closed (its keep-alive ends after 5 s): they are swept, not left
in CLOSE_WAIT until the port is used again.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import AsyncIterator, Iterable

MAX_HEADER_BYTES = 64 * 1024
MAX_IDLE_PER_PORT = 64
IDLE_SECONDS = 4.0  # under uvicorn's 5 s keep-alive: we close first
SWEEP_SECONDS = 2.0


class UpstreamError(Exception):
    """The worker could not be reached or broke off its reply."""


class UpstreamTimeout(UpstreamError):
    """The worker sent nothing for the request's idle timeout (it is hung or stuck)."""


_Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]
Target = tuple[str, int]  # a worker's host and port
LOCAL_HOST = "127.0.0.1"  # where a local worker listens


class UpstreamResponse:
    """Status and headers read; the body is read by iterating `body()` (once)."""

    def __init__(
        self,
        status: int,
        headers: list[tuple[str, str]],
        connection: _Connection,
        pool: UpstreamPool,
        target: Target,
        idle_timeout: float | None = None,
    ) -> None:
        self.status = status
        self._idle_timeout = idle_timeout
        self.headers = headers
        self._connection: _Connection | None = connection
        self._pool = pool
        self._target = target
        values = {name: value for name, value in headers}
        self._chunked = "chunked" in values.get("transfer-encoding", "").lower()
        length = values.get("content-length")
        self._length = int(length) if length is not None and length.isdigit() else None
        self._reusable = values.get("connection", "").lower() != "close" and (
            self._chunked or self._length is not None
        )

    def header(self, name: str, default: str = "") -> str:
        for key, value in self.headers:
            if key == name:
                return value
        return default

    async def body(self) -> AsyncIterator[bytes]:
        """The body's bytes as they arrive. Raises UpstreamError if the worker breaks off."""
        if self._connection is None:
            return
        reader = self._connection[0]
        timeout = self._idle_timeout
        try:
            if self._chunked:
                while True:
                    async with asyncio.timeout(timeout):
                        size_line = await reader.readuntil(b"\r\n")
                        size = int(size_line.split(b";", 1)[0], 16)
                        if size == 0:
                            await reader.readuntil(b"\r\n")  # no trailers from uvicorn
                            break
                        data = await reader.readexactly(size + 2)
                    yield data[:-2]
            elif self._length is not None:
                left = self._length
                while left:
                    async with asyncio.timeout(timeout):
                        data = await reader.read(min(left, 1 << 16))
                    if not data:
                        raise asyncio.IncompleteReadError(b"", left)
                    left -= len(data)
                    yield data
            else:
                while True:
                    async with asyncio.timeout(timeout):
                        data = await reader.read(1 << 16)
                    if not data:
                        break
                    yield data
        except TimeoutError as exc:
            self.close()
            raise UpstreamTimeout(f"the worker sent nothing for {timeout:g} s") from exc
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            self.close()
            raise UpstreamError(f"the reply broke off: {exc or type(exc).__name__}") from exc
        except asyncio.CancelledError:
            self.close()  # our client left: the worker sees EOF and stops generating
            raise
        connection, self._connection = self._connection, None
        if connection is None:
            return  # closed (the client left) while the body's end was arriving
        if self._reusable:
            self._pool.give_back(self._target, connection)
        else:
            connection[1].close()

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.body()])

    def close(self) -> None:
        """Drop the connection (the body was not read to its end; the worker sees EOF)."""
        if self._connection is not None:
            self._connection[1].close()
            self._connection = None


class UpstreamPool:
    """Keep-alive connections to workers, by address (127.0.0.1 and the port, or a cluster
    node's). Runs on one event loop."""

    def __init__(self) -> None:
        # Per worker, idle connections and when each was given back (monotonic).
        self._idle: dict[Target, list[tuple[_Connection, float]]] = {}
        self._sweep: asyncio.TimerHandle | None = None
        # Per worker, every connection still open (idle or carrying a request), for
        # `abort`; and when a worker's were last aborted.
        self._open: dict[Target, weakref.WeakSet[asyncio.StreamWriter]] = {}
        self._aborted_at: dict[Target, float] = {}

    async def request(
        self,
        port: int,
        path: str,
        body: bytes,
        headers: Iterable[tuple[str, str]],
        idle_timeout: float | None = None,
        host: str = LOCAL_HOST,
    ) -> UpstreamResponse:
        """POST `body` to the worker on `host`:`port`; returns once the reply's headers
        are in.

        Raises UpstreamError when no reply comes, UpstreamTimeout when nothing came for
        `idle_timeout` seconds (here or later, reading the body). A kept-alive connection
        the worker closed meanwhile is retried once on a new one (nothing was processed
        on it).
        """
        target = (host, port)
        head = [f"POST {path} HTTP/1.1\r\nhost: {host}:{port}\r\n"]
        head.extend(f"{name}: {value}\r\n" for name, value in headers)
        head.append(f"content-length: {len(body)}\r\n\r\n")
        message = "".join(head).encode("latin-1") + body
        started = time.monotonic()
        while True:
            connection, reused = await self._connect(target)
            try:
                return await self._exchange(target, connection, message, idle_timeout)
            except TimeoutError as exc:
                connection[1].close()
                raise UpstreamTimeout(f"the worker sent nothing for {idle_timeout:g} s") from exc
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
                connection[1].close()
                aborted = self._aborted_at.get(target, float("-inf")) >= started
                stale = isinstance(exc, (asyncio.IncompleteReadError, OSError))
                if reused and stale and not aborted:
                    continue  # stale keep-alive connection: once more on a fresh one
                raise UpstreamError(str(exc) or type(exc).__name__) from exc
            except ValueError as exc:
                connection[1].close()
                raise UpstreamError(f"unreadable reply: {exc}") from exc
            except asyncio.CancelledError:
                connection[1].close()  # our client left before the reply began
                raise

    async def _connect(self, target: Target) -> tuple[_Connection, bool]:
        idle = self._idle.get(target)
        while idle:
            (reader, writer), _since = idle.pop()
            if not writer.is_closing() and not reader.at_eof():
                return (reader, writer), True
            writer.close()
        try:
            connection = await asyncio.open_connection(*target, limit=MAX_HEADER_BYTES)
        except OSError as exc:
            raise UpstreamError(f"cannot connect to {target[0]}:{target[1]}: {exc}") from exc
        self._open.setdefault(target, weakref.WeakSet()).add(connection[1])
        return connection, False

    async def _exchange(
        self, target: Target, connection: _Connection, message: bytes, idle_timeout: float | None
    ) -> UpstreamResponse:
        reader, writer = connection
        writer.write(message)
        async with asyncio.timeout(idle_timeout):
            block = await reader.readuntil(b"\r\n\r\n")
        status_line, *lines = block[:-4].decode("latin-1").split("\r\n")
        _version, status, *_reason = status_line.split(" ", 2)
        headers = []
        for line in lines:
            name, _, value = line.partition(":")
            headers.append((name.strip().lower(), value.strip()))
        return UpstreamResponse(int(status), headers, connection, self, target, idle_timeout)

    def give_back(self, target: Target, connection: _Connection) -> None:
        idle = self._idle.setdefault(target, [])
        if len(idle) < MAX_IDLE_PER_PORT:
            idle.append((connection, time.monotonic()))
            if self._sweep is None:
                loop = asyncio.get_running_loop()
                self._sweep = loop.call_later(SWEEP_SECONDS, self._sweep_idle)
        else:
            connection[1].close()

    def _sweep_idle(self) -> None:
        """Close connections idle for IDLE_SECONDS or closed by the worker; again later
        while any are left."""
        self._sweep = None
        oldest = time.monotonic() - IDLE_SECONDS
        for target, idle in list(self._idle.items()):
            keep = []
            for (reader, writer), since in idle:
                if since < oldest or reader.at_eof() or writer.is_closing():
                    writer.close()
                else:
                    keep.append(((reader, writer), since))
            if keep:
                self._idle[target] = keep
            else:
                del self._idle[target]
        if self._idle:
            self._sweep = asyncio.get_running_loop().call_later(SWEEP_SECONDS, self._sweep_idle)

    def idle_connections(self) -> int:
        return sum(len(idle) for idle in self._idle.values())

    def forget(self, port: int, host: str = LOCAL_HOST) -> None:
        """Close the idle connections to the worker at `host`:`port` (it is gone)."""
        for (_reader, writer), _since in self._idle.pop((host, port), []):
            writer.close()

    def abort(self, port: int, host: str = LOCAL_HOST) -> None:
        """Break every connection to the worker at `host`:`port`, idle or not: it is gone
        but its host may not say so (a cluster node that froze or lost its network
        leaves the connections silent, not reset). A request waiting for its reply's
        headers then fails with UpstreamError (the gateway sends it again) and a reply
        under way breaks off, instead of both waiting out their idle timeout."""
        target = (host, port)
        self._aborted_at[target] = time.monotonic()
        self._idle.pop(target, None)
        for writer in list(self._open.pop(target, ())):
            writer.transport.abort()

    def close(self) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for host, port in list(self._idle):
            self.forget(port, host)
