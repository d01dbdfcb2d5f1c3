"""Who used how much of which model (issue 17): every request is booked once.

The gateway opens a ticket for each request it relays (its caller, its grant of the
caller's limits) and sends the ticket to the worker in `x-pool-ticket`. The worker
reports the request's end with its status and tokens (model_service/activity.py); that
report books it, under the ticket's caller. A request sent straight to a worker's port
has no ticket: it is booked under `worker-port`. A request the manager answers itself
(refused, model not found, no worker could be reached) is booked by the gateway.

Booking is in memory (the Ledger writes batches every second), so it never waits for the
database.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter

from model_service.auth import Role
from model_service.contract import EndEvent
from pool_manager.identity import Caller
from pool_manager.quotas import Grant, Quotas
from pool_manager.store import Ledger, UsageRow

WORKER_PORT_CALLER = Caller("worker-port", Role.CLIENT)
TICKET_KEPT_SECONDS = 60.0  # a worker's `end` report comes within milliseconds of the reply
MAX_OPEN_TICKETS = 100_000


@dataclass
class Ticket:
    caller: Caller
    model_id: str
    grant: Grant
    closed_at: float | None = None
    booked: bool = False  # a worker reported it, or the manager answered it


class UsageMetrics:
    """The ledger's counters for Prometheus, by caller and model."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "pool_usage_requests",
            "Requests booked to callers, by outcome (ok, error, refused).",
            ["caller", "model", "outcome"],
            registry=registry,
        )
        self.cache_lookups = Counter(
            "pool_response_cache_lookups",
            "Response cache lookups, by result (hit, miss: L1; semantic_hit, semantic_miss: L2).",
            ["model", "result"],
            registry=registry,
        )
        self.tokens = Counter(
            "pool_usage_tokens",
            "Tokens booked to callers, by kind (prompt, completion, cached).",
            ["caller", "model", "kind"],
            registry=registry,
        )


class Accounting:
    """Owns the open tickets; books each request into the ledger, the metrics and the
    caller's token window. One event loop; nothing here waits."""

    def __init__(self, ledger: Ledger, quotas: Quotas, metrics: UsageMetrics) -> None:
        self._ledger = ledger
        self._quotas = quotas
        self._metrics = metrics
        self._tickets: OrderedDict[str, Ticket] = OrderedDict()

    def open(self, caller: Caller, model_id: str, grant: Grant) -> str:
        """A ticket for a request about to be relayed; `close` it when its reply is over."""
        self.sweep()
        ticket = secrets.token_hex(16)
        self._tickets[ticket] = Ticket(caller, model_id, grant)
        return ticket

    def close(self, ticket: str, *, failed: bool = False) -> None:
        """The reply is over (sent, failed, or its client left): the caller's concurrency
        slot is free. `failed`: the manager answered with an error of its own, booked
        now unless a worker reported the request already. Otherwise the ticket waits a
        minute for the worker's report."""
        entry = self._tickets.get(ticket)
        if entry is None or entry.closed_at is not None:
            return
        entry.grant.release()
        entry.closed_at = time.monotonic()
        if failed and not entry.booked:
            entry.booked = True
            self._book(entry.caller, entry.model_id, outcome="error")

    def sweep(self) -> None:
        """Forget tickets closed a minute ago. One no worker reported (it died in the
        middle) is booked as an error then: every request is booked once."""
        now = time.monotonic()
        while self._tickets:
            oldest = next(iter(self._tickets.values()))
            crowded = len(self._tickets) >= MAX_OPEN_TICKETS
            recent = oldest.closed_at is None or now - oldest.closed_at < TICKET_KEPT_SECONDS
            if recent and not crowded:
                break
            _, entry = self._tickets.popitem(last=False)
            entry.grant.release()
            if not entry.booked:
                self._book(entry.caller, entry.model_id, outcome="error")

    @property
    def open_tickets(self) -> int:
        return len(self._tickets)

    def worker_reported(self, model_id: str, event: EndEvent) -> None:
        """A worker finished a request: book it (pool.request_ended)."""
        entry = self._tickets.get(event.ticket) if event.ticket else None
        if entry is not None:
            entry.booked = True
        caller = entry.caller if entry is not None else WORKER_PORT_CALLER
        ok = 0 < event.status < 400
        self._book(
            caller,
            model_id,
            outcome="ok" if ok else "error",
            prompt=event.prompt_tokens,
            completion=event.completion_tokens,
            cached=event.cached_tokens,
        )
        self._quotas.charge_tokens(caller, model_id, event.prompt_tokens + event.completion_tokens)

    def cache_looked_up(self, model_id: str, result: str) -> None:
        """hit, miss (L1), semantic_hit, semantic_miss (L2)."""
        self._metrics.cache_lookups.labels(model_id, result).inc()

    def cache_hit(self, caller: Caller, model_id: str) -> None:
        """A request answered from the L1 cache: a request, no tokens, one cache hit."""
        self._book(caller, model_id, outcome="cache_hit")

    def refused(self, caller: Caller, model_id: str) -> None:
        """A request refused for the caller's limits (429): booked as a refusal."""
        self._book(caller, model_id, outcome="refused")

    def _book(
        self,
        caller: Caller,
        model_id: str,
        *,
        outcome: str,
        prompt: int = 0,
        completion: int = 0,
        cached: int = 0,
    ) -> None:
        now = int(time.time())
        refused = outcome == "refused"
        self._ledger.book(
            UsageRow(
                caller=caller.id,
                model=model_id,
                hour=now - now % 3600,
                requests=0 if refused else 1,
                prompt_tokens=prompt,
                completion_tokens=completion,
                cached_tokens=cached,
                errors=1 if outcome == "error" else 0,
                refusals=1 if refused else 0,
                cache_hits=1 if outcome == "cache_hit" else 0,
            )
        )
        self._metrics.requests.labels(caller.id, model_id, outcome).inc()
        for kind, count in (("prompt", prompt), ("completion", completion), ("cached", cached)):
            if count:
                self._metrics.tokens.labels(caller.id, model_id, kind).inc(count)
