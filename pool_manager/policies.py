"""The pool's choices as small policies: which model to evict, which to load ahead, which
to cool and unload, how many threads busy workers get (issue 16, point 5), which replica
serves a request and how many replicas a model wants (issue 18).

Each is a pure function of what it is shown (snapshots of the models, the clock's `now`,
byte budgets) and returns a decision; none holds a process, a lock or a clock of its own.
`ModelPool` owns the state, takes the snapshots, and applies what comes back, so these
rules are unit-tested without starting anything (tests/test_policies.py). The admission
queue's order is the same kind of policy, in pool_manager/admission.py.

Demand is the traffic probe they share: each request counts 1 and the count halves every
`HALF_LIFE_SECONDS`, so one number weighs both how often and how lately a model was asked
for (ten requests five minutes ago outrank one a minute ago; an hour of silence lets
them fade).
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

HALF_LIFE_SECONDS = 600.0
MB = 1024 * 1024
# A model never loaded yet costs about this to load: a process start when no spare is
# ready, plus reading its file (a floor: loads measured on this kind of machine take
# 0.05 s with a spare that guessed right to 0.8 s without one).
FIRST_LOAD_SECONDS = 0.5
READ_BYTES_PER_SECOND = 1024 * MB
MIN_RELOAD_SECONDS = 0.05


@dataclass
class Demand:
    """One model's request count, halving every HALF_LIFE_SECONDS."""

    score: float = 0.0
    at: float = 0.0  # monotonic time the score was last brought up to date

    def value(self, now: float) -> float:
        """The count as of `now`."""
        if self.score == 0.0:
            return 0.0
        return self.score * 0.5 ** (max(0.0, now - self.at) / HALF_LIFE_SECONDS)

    def add(self, now: float) -> None:
        """One more request, at `now`."""
        self.score = self.value(now) + 1.0
        self.at = now


# --- eviction ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Resident:
    """A loaded model that could be evicted (idle, not pinned), as eviction sees it."""

    model_id: str
    demand: float  # Demand.value(now)
    last_used: float  # monotonic; breaks ties, so with no demand anywhere it is LRU
    reload_seconds: float  # what loading it again would cost (reload_seconds())
    size_bytes: int  # what evicting it frees


def reload_seconds(measured: float | None, size_bytes: int) -> float:
    """The cost of loading a model again: its last load's time when there was one, else
    a first-load guess from its size."""
    if measured is not None:
        return max(MIN_RELOAD_SECONDS, measured)
    return FIRST_LOAD_SECONDS + size_bytes / READ_BYTES_PER_SECOND


def keep_value(model: Resident, *, short_of_memory: bool) -> float:
    """Load time that keeping `model` is expected to save: its demand times its reload
    cost, per megabyte it holds when memory is what is short (Greedy-Dual-Size-Frequency,
    with the demand's decay as the aging). When only the count of models is short, size
    does not matter: any eviction frees one place."""
    value = model.demand * model.reload_seconds
    if short_of_memory:
        value /= max(1.0, model.size_bytes / MB)
    return value


def choose_victim(idle: Iterable[Resident], *, short_of_memory: bool) -> Resident | None:
    """The idle model least worth keeping; the least recently used among equals. None
    when there is none."""
    return min(
        idle,
        key=lambda m: (keep_value(m, short_of_memory=short_of_memory), m.last_used),
        default=None,
    )


# --- loading ahead ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ColdModel:
    """A COLD local model whose served file exists, as the preload choice sees it."""

    model_id: str
    path: str  # the file a spare would map
    size_bytes: int
    demand: float  # Demand.value(now)
    last_used: float  # monotonic; 0 when never used


def choose_preload(cold: Sequence[ColdModel], count: int, budget_bytes: int) -> dict[str, str]:
    """model id -> file, for the `count` COLD models likeliest to be asked for next: the
    most in demand first, then the most recently used, then the rest in the order given
    (the registry's). A file is counted once however many models serve it; a model whose
    file would take the total past `budget_bytes` is left out, and smaller ones after it
    may still fit."""
    ranked = sorted(cold, key=lambda m: (-m.demand, -m.last_used))  # stable
    files: dict[str, str] = {}
    left = budget_bytes
    for model in ranked:
        if len(files) >= count:
            break
        size = 0 if model.path in files.values() else model.size_bytes
        if size <= left:
            files[model.model_id] = model.path
            left -= size
    return files


def split_preload(paths: Sequence[str], holding: Sequence[set[str]]) -> list[list[str]]:
    """Which of `paths` (likeliest first) each spare loads ahead, given what each holds or
    was asked for already (`holding`, one set per spare): every path to one spare only,
    one that holds it if any, else the spare given the fewest so far, so that spares do
    not all load the same weights; each list keeps the order of `paths`."""
    lists: list[list[str]] = [[] for _ in holding]
    if not lists:
        return lists
    for path in paths:
        holders = [i for i, held in enumerate(holding) if path in held]
        chosen = holders[0] if holders else min(range(len(lists)), key=lambda i: len(lists[i]))
        lists[chosen].append(path)
    return lists


# --- time to live ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Expiring:
    """A HOT or COOLING model with no request in flight, not pinned, not unloading."""

    model_id: str
    cooling: bool  # COOLING already (else HOT)
    ttl_deadline: float | None  # monotonic; when a HOT model starts cooling
    cooling_deadline: float | None  # monotonic; when a COOLING model is unloaded


@dataclass(frozen=True)
class Expiry:
    """What the TTL reaper does now, and when it must look again."""

    cool: list[str]  # HOT -> COOLING
    unload: list[str]  # COOLING past its grace period -> unload ("ttl")
    next_due: float  # seconds until the next deadline (inf: none)


def expire(models: Iterable[Expiring], now: float, grace_seconds: float) -> Expiry:
    """HOT models past their TTL start cooling (for `grace_seconds`: they still serve,
    and a request sends them back to HOT); COOLING models past their grace are unloaded.
    A model that starts cooling with no grace is unloaded in the same pass."""
    cool: list[str] = []
    unload: list[str] = []
    next_due = float("inf")
    for model in models:
        cooling_deadline = model.cooling_deadline
        if not model.cooling:
            if model.ttl_deadline is None:
                continue
            if now < model.ttl_deadline:
                next_due = min(next_due, model.ttl_deadline - now)
                continue
            cool.append(model.model_id)
            cooling_deadline = now + grace_seconds
        if cooling_deadline is None:
            continue
        if now < cooling_deadline:
            next_due = min(next_due, cooling_deadline - now)
        else:
            unload.append(model.model_id)
    return Expiry(cool, unload, next_due)


# --- sharing the cores -------------------------------------------------------------------------

SHARE_GROW_SECONDS = 2.0


@dataclass
class CoreShare:
    """How many threads each busy local worker may compute with.

    llama.cpp's threads wait for each other at every step by spinning, so a worker whose
    thread is preempted by anything else runnable (another worker, a load) stalls whole:
    on 2 cores, a worker alone with 2 threads among others' loads ran the swap benchmark
    1.8x slower than with 1. So the cores are split among the most workers busy
    (generating or loading) at once lately: a worker left alone gets more threads only
    once the others have been quiet for `grow_after` seconds, not between two of their
    requests.
    """

    grow_after: float = SHARE_GROW_SECONDS
    _peak: int = 0  # the most workers busy at once lately
    _peak_until: float = math.inf  # when it may drop to the count now (inf: at it now)

    def threads(self, busy: int, cores: int, now: float) -> tuple[int, float | None]:
        """Threads per busy worker with `busy` workers busy at `now` on `cores` cores
        (at least 1), and in how many seconds to ask again (None: nothing pending)."""
        if busy >= self._peak:
            self._peak, self._peak_until = busy, math.inf
        elif self._peak_until == math.inf:
            self._peak_until = now + self.grow_after  # fewer now: more threads, later
        if now >= self._peak_until:
            self._peak, self._peak_until = busy, math.inf
        recheck = None if self._peak_until == math.inf else self._peak_until - now
        return max(1, cores // max(1, self._peak)), recheck


# --- replicas ----------------------------------------------------------------------------

VIRTUAL_NODES = 64  # points per replica on the hash ring: an even split of the keys
LOAD_BOUND = 1.25  # a replica takes a key while its load stays within 1.25x the mean


def affinity_key(body: bytes, length: int = 512) -> bytes:
    """What requests that share a prompt prefix share: the first `length` bytes of the
    body from its conversation on (`messages`, `input`, `prompt`, whichever comes first),
    as sent; the whole start of the body when it has none of them."""
    starts = [
        at for name in (b'"messages"', b'"input"', b'"prompt"') if (at := body.find(name)) >= 0
    ]
    start = min(starts, default=0)
    return body[start : start + length]


def _point(text: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big")


def choose_replica(key: bytes, replicas: Sequence[tuple[str, int]]) -> int:
    """The index of the replica for a request with `key` (`affinity_key`), among
    `replicas` given as (a stable name, requests in flight on it): consistent hashing
    with bounded loads, as KubeAI routes. The key's point on a ring of the replicas'
    points names a replica; one whose load would pass LOAD_BOUND x the mean load (this
    request counted) passes the key on to the next replica clockwise. Requests sharing a
    prefix so go to the replica that has it in its cache while its load allows, and
    adding or removing a replica moves only the keys that were its neighbours'."""
    if len(replicas) <= 1:
        return 0
    total = sum(load for _, load in replicas) + 1
    bound = math.ceil(LOAD_BOUND * total / len(replicas))
    ring = sorted(
        (_point(f"{name}#{i}".encode()), index)
        for index, (name, _load) in enumerate(replicas)
        for i in range(VIRTUAL_NODES)
    )
    start = bisect.bisect(ring, (_point(key), len(replicas)))
    for step in range(len(ring)):
        index = ring[(start + step) % len(ring)][1]
        if replicas[index][1] + 1 <= bound:
            return index
    return min(range(len(replicas)), key=lambda i: replicas[i][1])  # unreachable: bound >= 1


def replicas_wanted(
    current: int, minimum: int, maximum: int, in_flight: int, slots_per_replica: int
) -> int:
    """How many replicas a model should have now: one more than `current` when requests
    queue (more in flight than the replicas have slots), within `minimum`-`maximum`.
    Fewer is the reaper's call (a replica idle for replica_idle_seconds)."""
    if in_flight > current * slots_per_replica and current < maximum:
        return current + 1
    return max(current, minimum)
