"""Hands out worker ports: the lowest free port in the range, skipping any port in use.

The allocator binds and listens on the port itself and passes the socket to the worker,
so nothing can take the port between choosing it and the worker serving on it.
"""

from __future__ import annotations

import socket


class NoFreePort(Exception):
    pass


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
        for port in range(self.start, self.end + 1):
            if port in self._taken:
                continue
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((self.host, port))
                sock.listen(1024)
            except OSError:
                sock.close()  # someone else's port
                continue
            self._taken.add(port)
            return sock
        raise NoFreePort(f"no free port in {self.start}-{self.end}")

    def release(self, port: int) -> None:
        self._taken.discard(port)

    @property
    def in_use(self) -> frozenset[int]:
        return frozenset(self._taken)

    def available(self) -> int:
        return max(
            0, self.end - self.start + 1 - len(self._taken & set(range(self.start, self.end + 1)))
        )
