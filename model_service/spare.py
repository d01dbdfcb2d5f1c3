"""How the pool manager starts a worker process:
`python -m model_service.spare [--sandbox [--network]] WORKER-ARGS`.

1. With `--sandbox`, it enters the worker sandbox first (model_service/sandbox.py),
   while the process has one thread: namespaces belong to threads, and importing the
   worker starts some.
2. It imports the worker (FastAPI, uvicorn, llama.cpp: ~1.2 s of CPU, most of a spare's
   start) on a thread at nice 19, then runs it on the main thread, at the priority the
   process started with. A spare started while models load or serve so takes only CPU
   time they leave, and the manager can replace a spare the moment a load takes it
   instead of waiting for that load's first requests to pass (issue 16: cold starts in
   succession each find a spare). Threads keep the nice of the thread that starts
   them, so numpy, whose BLAS starts its threads when imported, is imported first, on
   the main thread; a thread's allocations go to the one heap arena the spare keeps
   its reserve in (model_service/heap.py).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import threading
from collections.abc import Callable

from model_service import heap, sandbox

IMPORT_NICE = 19
WorkerMain = Callable[[list[str]], int]


def import_worker_main(nice: int = IMPORT_NICE) -> WorkerMain:
    """The worker's `main`, imported on a thread at `nice` (blocks until it is); an error
    of the import is raised here."""
    import numpy  # noqa: F401  # its BLAS threads at the caller's priority, not `nice`

    imported: dict[str, WorkerMain] = {}
    failed: list[BaseException] = []

    def run() -> None:
        with contextlib.suppress(OSError):  # no such priority here: import as we are
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
        try:
            from model_service.__main__ import main

            imported["main"] = main
        except BaseException as exc:  # raised again on the caller's thread
            failed.append(exc)

    with heap.one_arena():
        thread = threading.Thread(target=run, name="import-worker")
        thread.start()
        thread.join()
    if failed:
        raise failed[0]
    return imported["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m model_service.spare", add_help=False, allow_abbrev=False
    )
    parser.add_argument("--sandbox", action="store_true", help="enter the worker sandbox")
    parser.add_argument("--network", action="store_true", help="sandboxed, keep the network")
    own, worker_args = parser.parse_known_args(argv)
    if own.sandbox:
        sandbox.enter(network=own.network)
    worker_main = import_worker_main()
    try:
        return worker_main(worker_args)
    except MemoryError:
        return sandbox.EXIT_OUT_OF_MEMORY


if __name__ == "__main__":
    sys.exit(main())
