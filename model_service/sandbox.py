"""The sandbox a worker runs in (issue 14): what a model's process may not do.

- **No network of its own.** A new network namespace, with no interface up, not even
  loopback: the worker can open no TCP or UDP connection to anything. It still serves,
  on the listening socket the manager bound in its own namespace and handed over, and it
  still talks to the manager over the control socketpair (file descriptors keep the
  namespace they were made in). `unshare(CLONE_NEWNET)` needs root or CAP_SYS_ADMIN;
  otherwise a new user namespace comes with it (unprivileged user namespaces).
  Namespaces belong to threads and importing llama.cpp starts one, so this happens
  first, in `python -m model_service.spare --sandbox`, before the worker imports
  anything.
  Remote-backend workers (openai, ollama) keep the network: they need it.
- **`no_new_privs`**: exec'ing a setuid program gains nothing.
- **Open files** at most `OPEN_FILES`; **no core dumps** (a dump would write the model's
  memory, prompts included, to disk).
- **A memory ceiling of its own**, set when the worker is handed a model (it depends on
  the model): cgroup v2 `memory.max` in a cgroup per worker, made by the manager, where
  the machine delegates the memory controller to it (`MemoryCgroups`; the kernel then
  kills only that worker); else `RLIMIT_AS` (`limit_address_space`): the address space
  the worker has at that moment plus the budget, so allocations past it fail inside the
  worker. Either way the worker dies or fails alone and its model reports "out of memory".

Each mechanism that cannot be had is reported (`enter`, `probe`) and the worker runs on
without it. Linux only; elsewhere everything reports unavailable.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import json
import os
import resource
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

OPEN_FILES = 4096
EXIT_OUT_OF_MEMORY = 4  # a worker that ran out of memory outside a load
OUT_OF_MEMORY = "out of memory"
# What `enter` sets up in the process itself; the memory ceiling comes with the model.
PROCESS_MECHANISMS = ("network_namespace", "no_new_privs", "open_files_limit", "core_dumps_off")

_CLONE_NEWNET = 0x40000000
_CLONE_NEWUSER = 0x10000000
_PR_SET_NO_NEW_PRIVS = 38

# mechanism -> {"available": bool, "detail": str}
Report = dict[str, dict[str, Any]]


def _result(available: bool, detail: str) -> dict[str, Any]:
    return {"available": available, "detail": detail}


def _libc() -> Any:
    return ctypes.CDLL(None, use_errno=True)


def _failed_call(what: str) -> str:
    code = ctypes.get_errno()
    return f"{what} failed: {os.strerror(code)} ({errno.errorcode.get(code, code)})"


# --- entered by the worker itself, before it imports anything ---------------------------------


def enter(*, network: bool) -> Report:
    """Sandbox this process (single-threaded: before any import that starts a thread)."""
    report: Report = {}
    if not sys.platform.startswith("linux"):
        return {name: _result(False, "Linux only") for name in PROCESS_MECHANISMS}
    libc = _libc()
    if network:
        report["network_namespace"] = _result(False, "kept: a remote backend needs the network")
    else:
        report["network_namespace"] = _leave_network(libc)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0:
        report["no_new_privs"] = _result(True, "prctl(PR_SET_NO_NEW_PRIVS)")
    else:
        report["no_new_privs"] = _result(False, _failed_call("prctl(PR_SET_NO_NEW_PRIVS)"))
    report["open_files_limit"] = _set_limit(resource.RLIMIT_NOFILE, OPEN_FILES, "RLIMIT_NOFILE")
    report["core_dumps_off"] = _set_limit(resource.RLIMIT_CORE, 0, "RLIMIT_CORE")
    return report


def _leave_network(libc: Any) -> dict[str, Any]:
    if libc.unshare(_CLONE_NEWNET) == 0:
        return _result(True, "unshare(CLONE_NEWNET)")
    privileged = _failed_call("unshare(CLONE_NEWNET)")
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNET) != 0:
        unprivileged = _failed_call("unshare(CLONE_NEWUSER|CLONE_NEWNET)")
        return _result(False, f"{privileged}; {unprivileged}")
    # Map our own ids, so the worker keeps seeing who it is (files, home folder).
    with contextlib.suppress(OSError):  # else the ids show as "nobody"; the namespaces hold
        Path("/proc/self/setgroups").write_text("deny")
        Path("/proc/self/uid_map").write_text(f"{uid} {uid} 1")
        Path("/proc/self/gid_map").write_text(f"{gid} {gid} 1")
    return _result(True, "unshare(CLONE_NEWUSER|CLONE_NEWNET)")


def _set_limit(which: int, value: int, name: str) -> dict[str, Any]:
    _soft, hard = resource.getrlimit(which)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    try:
        resource.setrlimit(which, (value, value))
    except (OSError, ValueError) as exc:
        return _result(False, f"setrlimit({name}) failed: {exc}")
    return _result(True, f"{name} {value}")


# --- the memory ceiling, RLIMIT_AS fallback (in the worker) ----------------------------------


def default_ceiling_bytes(estimate_bytes: int) -> int:
    """A model's memory ceiling unless its registry entry sets `memory_max_mb`: twice the
    pool's estimate of its memory, plus 512 MB for what the estimate leaves out (thread
    stacks and malloc arenas count in RLIMIT_AS; an embeddings context made later)."""
    return 2 * estimate_bytes + 512 * 2**20


def address_space_bytes() -> int:
    """This process's address space now (VSZ)."""
    pages = int(Path("/proc/self/statm").read_text().split()[0])
    return pages * os.sysconf("SC_PAGE_SIZE")


def limit_address_space(budget_bytes: int) -> int:
    """Cap the address space at what it is now plus `budget_bytes`; returns the cap.

    RLIMIT_AS counts every mapping (thread stacks, malloc arenas, the mmapped weights),
    not memory in use, hence the current size as the base: the budget is what may be added.
    The soft limit only: a worker handed back to the spares lifts it for its next model
    (`lift_address_space_limit`). The ceiling guards against a model that takes more
    memory than it was given, not against code that sets out to get around it.
    """
    limit = address_space_bytes() + budget_bytes
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    return limit


def lift_address_space_limit() -> None:
    """Undo `limit_address_space`: back to the hard limit."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (hard, hard))


def out_of_memory_reason(error: BaseException, ceiling: Mapping[str, Any] | None) -> str | None:
    """'out of memory: ...' when a failed load is the ceiling's doing, else None.

    A MemoryError always is. Under an address-space ceiling llama.cpp only says that it
    could not load the model or make its context; that counts as out of memory when the
    room left under the ceiling is less than the model needs (`need`, the manager's
    estimate less what the process already holds). A bad file still gets its own reason.
    """
    if isinstance(error, MemoryError):
        return f"{OUT_OF_MEMORY}: {_ceiling_text(ceiling)}"
    soft, _hard = resource.getrlimit(resource.RLIMIT_AS)
    if ceiling is None or soft == resource.RLIM_INFINITY:
        return None
    room = soft - address_space_bytes()
    need = int(ceiling.get("need") or 0)
    if room >= need:
        return None
    return (
        f"{OUT_OF_MEMORY}: the model needs about {need >> 20} MB and {_ceiling_text(ceiling)} "
        f"leaves {max(room, 0) >> 20} MB ({error})"
    )


def address_space_limited() -> bool:
    """Whether this process runs under an RLIMIT_AS ceiling."""
    return resource.getrlimit(resource.RLIMIT_AS)[0] != resource.RLIM_INFINITY


def address_space_left() -> int | None:
    """Bytes the address space may still grow by under RLIMIT_AS; None with no ceiling."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    return max(0, soft - address_space_bytes())


def _ceiling_text(ceiling: Mapping[str, Any] | None) -> str:
    if not ceiling:
        return "no memory left"
    return f"the worker's memory ceiling of {int(ceiling['bytes']) >> 20} MB"


# --- the memory ceiling, cgroup v2 (made by the manager) --------------------------------------


class MemoryCgroups:
    """One cgroup v2 per worker, with `memory.max`, under the manager's own cgroup.

    cgroup v2 lets a cgroup hand a controller to its children only when it holds no
    processes itself (the root excepted). So, as systemd's delegation rules ask, the
    manager moves itself into a leaf `manager` first when its cgroup has no free children
    yet; the workers' groups sit beside it.
    """

    def __init__(self, parent: Path) -> None:
        self.parent = parent

    @classmethod
    def find(cls) -> tuple[MemoryCgroups | None, str]:
        """The manager's delegated cgroup, or None and why not."""
        try:
            own = _own_cgroup_v2()
            mount = _cgroup2_mount()
        except OSError as exc:
            return None, f"cgroup v2 unreadable: {exc}"
        if own is None or mount is None:
            return None, "no cgroup v2 hierarchy is mounted"
        return cls.delegated(mount / own.lstrip("/"), is_root=own == "/")

    @classmethod
    def delegated(cls, base: Path, *, is_root: bool) -> tuple[MemoryCgroups | None, str]:
        try:
            controllers = (base / "cgroup.controllers").read_text().split()
            if "memory" not in controllers:
                return None, f"the memory controller is not delegated to {base}"
            enabled = (base / "cgroup.subtree_control").read_text().split()
            if "memory" not in enabled:
                if not is_root:  # no processes of its own, or it cannot enable children
                    leaf = base / "manager"
                    leaf.mkdir(exist_ok=True)
                    (leaf / "cgroup.procs").write_text(str(os.getpid()))
                (base / "cgroup.subtree_control").write_text("+memory")
        except OSError as exc:
            return None, f"cannot use the memory controller in {base}: {exc}"
        return cls(base), f"memory.max per worker, under {base}"

    def attach(self, pid: int, limit_bytes: int) -> Path:
        """Put process `pid` in a new cgroup of its own limited to `limit_bytes`."""
        group = self.parent / f"worker-{pid}"
        group.mkdir(exist_ok=True)
        try:
            (group / "memory.max").write_text(str(limit_bytes))
            swap = group / "memory.swap.max"  # swap would only hide the ceiling
            if swap.exists():
                swap.write_text("0")
            (group / "cgroup.procs").write_text(str(pid))
        except OSError:
            self.remove(group)
            raise
        return group

    @staticmethod
    def oom_killed(group: Path) -> bool:
        """Whether the kernel killed a process of `group` for passing memory.max."""
        try:
            events = (group / "memory.events").read_text().split("\n")
        except OSError:
            return False
        counts = dict(line.split() for line in events if line.count(" ") == 1)
        return int(counts.get("oom_kill", 0)) > 0

    @staticmethod
    def remove(group: Path) -> None:
        """Remove the group of a worker that has exited (the kernel refuses a busy one)."""
        with contextlib.suppress(OSError):
            group.rmdir()


def _own_cgroup_v2() -> str | None:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:]
    return None


def _cgroup2_mount() -> Path | None:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split(" - ", 1)
        if len(fields) == 2 and fields[1].split()[0] == "cgroup2":
            return Path(fields[0].split()[4])
    return None


# --- the probe ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """`python -m model_service.sandbox [--network]`: enter the sandbox and print what
    could be entered, as JSON (the manager asks at start). Workers enter it by way of
    `python -m model_service.spare --sandbox` (model_service/spare.py)."""
    parser = argparse.ArgumentParser(prog="python -m model_service.sandbox", allow_abbrev=False)
    parser.add_argument("--network", action="store_true", help="keep the network (remote)")
    own = parser.parse_args(argv)
    print(json.dumps(enter(network=own.network)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
