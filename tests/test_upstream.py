"""The manager's HTTP/1.1 client for its workers, against a real uvicorn server."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
import uvicorn

from pool_manager.upstream import LOCAL_HOST, UpstreamError, UpstreamPool, UpstreamTimeout

Scope = dict[str, Any]


async def _app(scope: Scope, receive: Any, send: Any) -> None:
    """/stream: three chunks; /fixed: echoes the body with a Content-Length; /cut: dies;
    /mute: never answers; /stall: sends its headers, then nothing."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    path = scope["path"]
    if path == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for piece in (b"one ", b"two ", b"three"):
            await send({"type": "http.response.body", "body": piece, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    elif path == "/mute":
        await asyncio.sleep(3600)
    elif path == "/stall":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"first", "more_body": True})
        await asyncio.sleep(3600)
    elif path == "/fixed":
        headers = [(b"content-type", b"application/json"), (b"x-seen", scope["method"].encode())]
        await send({"type": "http.response.start", "status": 201, "headers": headers})
        await send({"type": "http.response.body", "body": body})
    else:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"partial", "more_body": True})
        raise RuntimeError("the worker broke off")  # uvicorn drops the connection


@pytest.fixture
async def server() -> AsyncIterator[int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(
        _app, log_config=None, timeout_keep_alive=1, lifespan="off", timeout_graceful_shutdown=1
    )
    serving = uvicorn.Server(config)
    task = asyncio.create_task(serving.serve(sockets=[sock]))
    async with asyncio.timeout(10):
        while not serving.started:
            await asyncio.sleep(0.01)
    yield sock.getsockname()[1]
    serving.should_exit = True
    await task


async def test_streams_chunks_and_reads_fixed_length_bodies(server: int) -> None:
    pool = UpstreamPool()
    reply = await pool.request(server, "/stream", b"{}", [("x-request-id", "r1")])
    assert reply.status == 200
    assert [chunk async for chunk in reply.body()] == [b"one ", b"two ", b"three"]
    reply = await pool.request(server, "/fixed", b'{"a": 1}', [])
    assert (reply.status, reply.header("x-seen"), await reply.read()) == (201, "POST", b'{"a": 1}')
    assert len(pool._idle[(LOCAL_HOST, server)]) == 1, "both requests on one kept-alive connection"
    pool.close()


async def test_a_reader_that_leaves_at_the_last_chunk_breaks_nothing(server: int) -> None:
    """The relay's client leaves right after the last data ([DONE]), before the chunk
    terminator is read: the closed connection must not be pooled (it was, as None, and
    the next request on that port failed)."""
    pool = UpstreamPool()
    for _ in range(3):
        reply = await pool.request(server, "/stream", b"{}", [])
        chunks = []
        async for chunk in reply.body():
            chunks.append(chunk)
            if chunk == b"three":
                await asyncio.sleep(0.05)  # the terminator is in the reader's buffer now
                reply.close()  # what the relay does when its client goes away
        assert chunks == [b"one ", b"two ", b"three"]
        assert all(c is not None for c in pool._idle.get(server, []))
        assert await (await pool.request(server, "/fixed", b"next", [])).read() == b"next"
    pool.close()


async def test_a_connection_the_worker_closed_while_idle_is_replaced(server: int) -> None:
    pool = UpstreamPool()
    assert await (await pool.request(server, "/fixed", b"1", [])).read() == b"1"
    assert pool._sweep is not None
    pool._sweep.cancel()  # what this test is about happens between two sweeps
    (reader, _writer), _since = pool._idle[(LOCAL_HOST, server)][0]
    # uvicorn closes connections idle for timeout_keep_alive (1 s here).
    async with asyncio.timeout(10):
        await reader.read()
    idle = pool._idle[(LOCAL_HOST, server)]
    assert reader.at_eof() and len(idle) == 1, "still pooled, but closed"
    assert await (await pool.request(server, "/fixed", b"2", [])).read() == b"2"
    pool.close()


async def test_a_reply_that_breaks_off_raises(server: int) -> None:
    pool = UpstreamPool()
    reply = await pool.request(server, "/cut", b"", [])
    with pytest.raises(UpstreamError):
        async for _chunk in reply.body():
            pass
    assert not pool._idle.get(server), "a broken connection is not reused"
    pool.close()


async def test_nobody_listening_raises() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        with pytest.raises(UpstreamError, match="cannot connect"):
            await UpstreamPool().request(port, "/", b"", [])


async def test_a_worker_that_stops_answering_times_out(server: int) -> None:
    """The relay's own deadline: a silent worker fails the exchange, it does not hang."""
    pool = UpstreamPool()
    with pytest.raises(UpstreamTimeout):
        await pool.request(server, "/mute", b"{}", [], idle_timeout=0.5)
    reply = await pool.request(server, "/stall", b"{}", [], idle_timeout=0.5)
    pieces = []
    with pytest.raises(UpstreamTimeout):
        async for piece in reply.body():
            pieces.append(piece)
    assert pieces == [b"first"]
    pool.close()


async def test_idle_connections_the_worker_closed_are_swept(server: int) -> None:
    """After a burst, no connection lingers in CLOSE_WAIT once the worker's keep-alive
    (1 s here) has ended: the sweep closes them though no request comes."""
    pool = UpstreamPool()
    replies = await asyncio.gather(*(pool.request(server, "/fixed", b"x", []) for _ in range(5)))
    for reply in replies:
        await reply.read()
    assert pool.idle_connections() == 5
    async with asyncio.timeout(15):
        while pool.idle_connections():
            await asyncio.sleep(0.1)
    pool.close()


async def test_abort_breaks_a_silent_worker_s_connections_waiting_or_mid_reply(
    server: int,
) -> None:
    """A worker on a node that froze keeps its connections open and silent; abort (the
    pool saw it lost) ends the wait for headers and a reply under way at once, with no
    retry on a fresh connection (that would wait as long again), even on a reused one."""
    pool = UpstreamPool()
    warm = await pool.request(server, "/fixed", b"{}", [])
    await warm.read()  # one kept-alive connection: the next request reuses it
    waiting = asyncio.create_task(pool.request(server, "/mute", b"{}", [], idle_timeout=60))
    mid_reply = await pool.request(server, "/stall", b"{}", [], idle_timeout=60)
    chunks = mid_reply.body()
    assert await anext(chunks) == b"first"
    reading = asyncio.create_task(anext(chunks))
    await asyncio.sleep(0.05)  # both are now waiting on the worker
    assert not waiting.done() and not reading.done()
    pool.abort(server)
    async with asyncio.timeout(5):
        with pytest.raises(UpstreamError):
            await waiting
        with pytest.raises(UpstreamError):
            await reading
    assert pool.idle_connections() == 0
    after = await pool.request(server, "/fixed", b"{}", [])  # a new request is not refused
    assert await after.read() == b"{}"
    pool.close()
