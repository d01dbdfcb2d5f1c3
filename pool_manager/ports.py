"""Hands out worker ports: the lowest free port in the range, skipping any port in use.

The allocator binds and listens on the port itself and passes the socket to the worker,
so nothing can take the port between choosing it and the worker serving on it.
"""

from __future__ import annotations

import random
import socket
from collections.abc import Collection


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether `port` can be bound on `host` right now (a TIME_WAIT leftover counts as free)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel says is free now (for tests and scripts that start a manager)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def free_port_range(size: int, rng: random.Random | None = None) -> tuple[int, int]:
    """`size` consecutive free ports at random in 20000-59999, away from 8050-8099 (for
    scripts that start a manager of their own)."""
    rng = rng or random.Random()
    for _ in range(2000):
        start = rng.randrange(20000, 60000 - size)
        if all(port_is_free(p) for p in range(start, start + size)):
            return start, start + size - 1
    raise RuntimeError("no free port range found")


class NoFreePort(Exception):
    pass


def listen_on_first_free(
    host: str, start: int, end: int, skip: Collection[int] = ()
) -> socket.socket:
    """A listening socket on the lowest port of `start`-`end` (not in `skip`) that can be
    bound on `host`; a TIME_WAIT leftover of an earlier worker does not count as taken.
    Raises NoFreePort."""
    for port in range(start, end + 1):
        if port in skip:
            continue
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            sock.listen(1024)
        except OSError:
            sock.close()  # someone else's port
            continue
        return sock
    raise NoFreePort(f"no free port in {start}-{end} on {host}")


class PortAllocator:
    def __init__(self, host: str, start: int, end: int) -> None:
        self.host = host
        self.start = start
        self.end = end
        self._taken: set[int] = set()

    def set_range(self, start: int, end: int) -> None:
        """Applies to the next allocation; ports already handed out stay valid."""
        self.start, self.end = start, end

    def allocate(self) -> socket.socket:
        """A listening socket on the lowest free port. Raises NoFreePort."""
        sock = listen_on_first_free(self.host, self.start, self.end, skip=self._taken)
        self._taken.add(sock.getsockname()[1])
        return sock

    def release(self, port: int) -> None:
        self._taken.discard(port)

    @property
    def in_use(self) -> frozenset[int]:
        return frozenset(self._taken)

    def available(self) -> int:
        return max(
            0, self.end - self.start + 1 - len(self._taken & set(range(self.start, self.end + 1)))
        )
