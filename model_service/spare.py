"""How the pool manager starts a worker process:
`python -m model_service.spare [--sandbox [--network]] WORKER-ARGS`, or the fork server
that forks spares from itself: `python -m model_service.spare [--sandbox] --fork-server
--control-fd N` (model_service/fork_server.py).

1. With `--sandbox`, it enters the worker sandbox first (model_service/sandbox.py),
   while the process has one thread: namespaces belong to threads, and importing the
   worker starts some.
2. It imports the worker (FastAPI, uvicorn, llama.cpp, numpy: ~1.2 s of CPU, most of a
   spare's start) on a thread that runs only on CPU time others leave (SCHED_IDLE:
   model_service.cpus.at_low_priority), then runs
   it on the main thread, at the priority the process started with; the worker prepares
   itself the same way (model_service.__main__). A spare started while models load or
   serve so takes only CPU time they leave, and the manager can replace a spare the moment
   a load takes it instead of waiting for that load's first requests to pass (issue 16:
   cold starts in succession each find a spare). A thread's allocations go to the one heap
   arena the spare keeps its reserve in (model_service/heap.py).
3. It leaves the manager's process group (a Ctrl-C in the manager's terminal reaches the
   manager, which then drains and stops its workers in order) and gives up the terminal,
   but stays in the manager's session: a new session would be a scheduling group of its
   own, where its import thread's low priority counts for nothing against the others.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import socket
import sys
import termios
from collections.abc import Callable

from model_service import cpus, fork_server, heap, sandbox
from model_service.cpus import at_low_priority

WorkerMain = Callable[[list[str]], int]


def import_worker_main() -> WorkerMain:
    """The worker's `main`, imported on a low-priority thread (blocks until it is); an
    error of the import is raised here."""
    # The worker's numpy work is element-wise: BLAS threads would only sit there.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

    def load() -> WorkerMain:
        from model_service.__main__ import main

        return main

    with heap.one_arena():
        return at_low_priority(load, "import-worker")


def leave_the_terminal() -> None:
    """Our own process group, no controlling terminal (see the module's docstring)."""
    with contextlib.suppress(OSError):  # a session leader (started by hand) has both
        os.setpgid(0, 0)
    with contextlib.suppress(OSError):  # no terminal: nothing to give up
        tty = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY)
        try:
            fcntl.ioctl(tty, termios.TIOCNOTTY)
        finally:
            os.close(tty)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m model_service.spare", add_help=False, allow_abbrev=False
    )
    parser.add_argument("--sandbox", action="store_true", help="enter the worker sandbox")
    parser.add_argument("--network", action="store_true", help="sandboxed, keep the network")
    parser.add_argument(
        "--urgent", action="store_true", help="a load waits: import at normal priority"
    )
    parser.add_argument(
        "--fork-server", action="store_true", help="fork spares for the manager on --control-fd"
    )
    own, worker_args = parser.parse_known_args(argv)
    leave_the_terminal()
    if own.urgent:
        cpus.run_everything_now()
    if own.sandbox:
        sandbox.enter(network=own.network)
    worker_main = import_worker_main()
    if own.fork_server:
        return _serve_forks(worker_args, worker_main)
    try:
        return worker_main(worker_args)
    except MemoryError:
        return sandbox.EXIT_OUT_OF_MEMORY


def _serve_forks(args: list[str], worker_main: WorkerMain) -> int:
    """The fork server's loop, after what each spare would do first anyway (its spares
    inherit it): serving's first-use costs (model_service/warmup.py)."""
    parser = argparse.ArgumentParser(prog="python -m model_service.spare --fork-server")
    parser.add_argument("--control-fd", type=int, required=True)
    control = socket.socket(fileno=parser.parse_args(args).control_fd)
    from model_service.warmup import warm_up_serving  # imported with the worker: no cost

    at_low_priority(warm_up_serving, "warm-up")
    return fork_server.serve(control, worker_main)


if __name__ == "__main__":
    sys.exit(main())
