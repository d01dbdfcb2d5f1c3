"""Memory mapped ahead by a spare worker, so a cold start does not wait on page faults.

A new llama.cpp context allocates its KV cache and zeroes it. Fresh memory costs a page
fault per 4 KiB page (about 2 us here): ~100 ms for SmolLM2's 190 MB cache of 8 x 1,024
tokens, most of a cold start, and as much again for repacked weights. A spare worker
instead writes `reserve_mb` of heap while it waits for a model and tells glibc to keep
it (no separate mmap for big blocks, no trimming), so the model's buffers are carved out
of memory that is already mapped: creating that context then takes ~10 ms. Once the
model is loaded, `release_unused` hands what it did not use back to the system.

glibc only; elsewhere both calls do nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)

# mallopt parameters (malloc.h) and glibc's defaults for them.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX, _DEFAULT_ARENA_MAX = 128 * 1024, 65536, 0
_KEEP_EVERYTHING = 2**31 - 1


def _libc() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc.restype = ctypes.c_void_p
        libc.malloc.argtypes = [ctypes.c_size_t]
        libc.free.argtypes = [ctypes.c_void_p]
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):
        return None


def reserve(megabytes: int) -> bool:
    """Map `megabytes` of heap now and keep it for later allocations. Returns whether it did."""
    libc = _libc()
    if megabytes <= 0 or libc is None:
        return False
    keep()
    size = megabytes * 2**20
    block = libc.malloc(size)
    if not block:
        release_unused()
        log.warning("could not reserve memory for a fast load", extra={"megabytes": megabytes})
        return False
    ctypes.memset(block, 0, size)  # the writes are what map the pages
    libc.free(block)
    return True


def keep() -> None:
    """Keep what is freed from now on mapped (`reserve` does this first; so does a worker
    handed back to the spares, whose model's buffers the next model's then reuse)."""
    libc = _libc()
    if libc is None:
        return
    libc.mallopt(_M_MMAP_MAX, 0)  # big blocks come from the heap too...
    libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_EVERYTHING)  # ...and freed ones stay in it...
    # ...the one heap, whichever thread allocates: the preloader thread's model and
    # context must land in this memory, not in an arena of its own.
    libc.mallopt(_M_ARENA_MAX, 1)


@contextlib.contextmanager
def one_arena() -> Iterator[None]:
    """Threads started meanwhile allocate from the main heap, not from an arena of their
    own (glibc gives each new thread one, and keeps it after the thread ends)."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_ARENA_MAX, 1)
    try:
        yield
    finally:
        if libc is not None:
            libc.mallopt(_M_ARENA_MAX, _DEFAULT_ARENA_MAX)


def release_unused() -> None:
    """Give free heap back to the system and restore glibc's defaults."""
    libc = _libc()
    if libc is None:
        return
    libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
    libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
    libc.mallopt(_M_ARENA_MAX, _DEFAULT_ARENA_MAX)
    libc.malloc_trim(0)
