"""The admission queue: loads that wait for room instead of being refused (issue 16).

A model that cannot be placed now (every loaded model busy, memory short) waits here,
up to `admission_timeout_seconds`, until a request ends or a model unloads, instead of
answering 503 at once. The queue is bounded (`admission_queue_max`); past it a load is
refused with 503 and Retry-After. Order: pinned (warmup) models first (they never wait
behind a swap), then the registry's `priority` (high, normal, low), then arrival. Only
the first waiter tries to make room, so a later load never takes the room an earlier one
waited for.

This module is the policy, with no processes or clocks: `ModelPool` owns the queue, and
decides when a waiter tries again (on every change that may free room).
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass, field

# Rank of each class: lower goes first.
PINNED_RANK = 0
PRIORITY_RANK = {"high": 1, "normal": 2, "low": 3}


class QueueFull(Exception):
    """`admission_queue_max` loads are waiting already."""


@dataclass(frozen=True, order=True)
class Ticket:
    """One load's place in the queue; ordered by class, then arrival."""

    rank: int
    seq: int
    model_id: str = field(compare=False)


class AdmissionQueue:
    """Loads waiting for room, first in line first. Not thread-safe: one event loop."""

    def __init__(self, max_waiting: int) -> None:
        self.max_waiting = max_waiting
        self._waiting: list[Ticket] = []  # kept sorted
        self._arrivals = itertools.count()

    def __len__(self) -> int:
        return len(self._waiting)

    def enter(self, model_id: str, rank: int) -> Ticket:
        """A place for a load of `model_id`. Raises QueueFull."""
        if len(self._waiting) >= self.max_waiting:
            raise QueueFull(f"{len(self._waiting)} loads are waiting for room already")
        ticket = Ticket(rank, next(self._arrivals), model_id)
        bisect.insort(self._waiting, ticket)
        return ticket

    def leave(self, ticket: Ticket) -> None:
        """The load got its room, or gave up; idempotent."""
        index = bisect.bisect_left(self._waiting, ticket)
        if index < len(self._waiting) and self._waiting[index] == ticket:
            del self._waiting[index]

    def is_first(self, ticket: Ticket) -> bool:
        return bool(self._waiting) and self._waiting[0] == ticket

    def ahead_of(self, ticket: Ticket) -> int:
        """How many loads wait before this one."""
        return bisect.bisect_left(self._waiting, ticket)

    def waiting(self) -> list[str]:
        """The models waiting, first first."""
        return [ticket.model_id for ticket in self._waiting]


def rank_of(priority: str, pinned: bool) -> int:
    return PINNED_RANK if pinned else PRIORITY_RANK.get(priority, PRIORITY_RANK["normal"])
