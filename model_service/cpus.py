"""How many cores this process may use, and work that should take only what others leave."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import psutil

LOW_PRIORITY_NICE = 19  # where SCHED_IDLE is missing
T = TypeVar("T")
# False in a process a load is waiting for (`python -m model_service.spare --urgent`):
# low priority would leave it starved on a busy machine while that load waits.
_low_priority_allowed = True


def run_everything_now() -> None:
    """From now on `at_low_priority` runs its work at the caller's own priority."""
    global _low_priority_allowed
    _low_priority_allowed = False


def usable_cores() -> int:
    """The cores the scheduler lets us run on (a container's or taskset's limit), at least 1.

    `os.cpu_count()` counts the machine's; threads beyond the allowed cores spin and wait.
    """
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def idle_cores(window_s: float = 0.05) -> float:
    """How many of the cores we may use were left over the next `window_s` seconds by
    work at normal priority (the whole machine's, not only ours): idle, or running niced
    work (a spare's, which yields to anything but other niced work). The kernel counts in
    10 ms ticks per core, so a window of 50 ms tells a free core from a busy one, no finer."""
    try:
        allowed = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        allowed = list(range(os.cpu_count() or 1))
    before = psutil.cpu_times(percpu=True)
    time.sleep(window_s)
    after = psutil.cpu_times(percpu=True)
    idle = 0.0
    for cpu in allowed:
        if cpu >= min(len(before), len(after)):
            continue
        total = sum(after[cpu]) - sum(before[cpu])
        if total > 0:
            free = (after[cpu].idle + after[cpu].nice) - (before[cpu].idle + before[cpu].nice)
            idle += min(1.0, max(0.0, free / total))
    return idle


def lower_this_thread(idle: bool = True) -> None:
    """Let the calling thread run only on CPU time other threads leave (Linux: per thread;
    the threads it starts inherit it). A process cannot lower a thread's nice again
    without privileges, hence a thread of its own.

    `idle`: SCHED_IDLE, not just nice 19: a nice-19 thread that is running keeps its core
    until its slice ends when a busy thread wakes up, and llama.cpp's threads wake at
    every barrier of a forward pass, so a nice-19 import beside a first request made it
    3-5x slower; a SCHED_IDLE thread yields at once. But a SCHED_IDLE thread holding the
    GIL may not run again for as long as other threads keep the cores busy: only for
    work no other thread of the process waits on (a spare's import, while its main
    thread only waits for it). Otherwise (`idle` False) nice 19.
    """
    if idle:
        with contextlib.suppress(AttributeError, OSError):
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # 0: this thread
    # Nice 19 under SCHED_IDLE too: the kernel then counts its time as niced, which
    # `idle_cores` leaves out of the busy time.
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOW_PRIORITY_NICE)


def at_low_priority(work: Callable[[], T], name: str) -> T:
    """`work()` run on a new thread lowered by `lower_this_thread` (blocks until it
    returns; its error is raised here). The caller's own priority is untouched.

    Against other processes this counts only within one scheduling group (an autogroup
    is a session): the pool's workers share the manager's session (worker_process.py).
    """
    if not _low_priority_allowed:
        return work()
    results: list[T] = []
    failed: list[BaseException] = []

    def run() -> None:
        lower_this_thread()
        try:
            results.append(work())
        except BaseException as exc:  # raised again on the caller's thread
            failed.append(exc)

    thread = threading.Thread(target=run, name=name)
    thread.start()
    thread.join()
    if failed:
        raise failed[0]
    return results[0]
