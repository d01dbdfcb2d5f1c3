"""A pool many teams share (issue 17): its parts wired together, and their routes.

`Tenancy` holds the store (SQLite, or PostgreSQL with DATABASE_URL), the identities
(named keys, JWT users, the operator's keys), the callers' quotas, the usage ledger and
the accounting that fills it. The routes stay thin: `/keys` (admin) and `/usage`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import time
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, Query
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry
from pydantic import BaseModel, ConfigDict, Field

from model_service.auth import ApiKeys, Role
from model_service.errors import ApiError
from pool_manager.config import Limits
from pool_manager.identity import (
    KEYS_REFRESH_SECONDS,
    Identities,
    current_caller,
    jwt_secret_from_env,
)
from pool_manager.pool import ModelPool
from pool_manager.quotas import Quotas
from pool_manager.redis_sessions import open_session_store
from pool_manager.store import (
    COUNTERS,
    Connected,
    KeyRecord,
    Ledger,
    SqlStore,
    StoreError,
    UsageRow,
    open_store,
)
from pool_manager.usage import TICKET_KEPT_SECONDS, Accounting, UsageMetrics

log = logging.getLogger(__name__)

DATABASE_URL_ENV = "DATABASE_URL"
REDIS_URL_ENV = "REDIS_URL"
LATEST_TIME = 2**40  # unix seconds (year 36812): bounds `since`/`until` for the database


class Tenancy:
    """Owns the shared-service parts; `start` and `stop` run with the app."""

    def __init__(
        self,
        pool: ModelPool,
        store: SqlStore,
        env_keys: ApiKeys,
        jwt_secret: str | None,
        registry: CollectorRegistry,
        redis_url: str | None = None,
    ) -> None:
        self.store = store
        # Chat sessions: in the same database, or in Redis for managers that share them.
        self.sessions = open_session_store(redis_url, store)
        self.identities = Identities(
            store, env_keys, jwt_secret, lambda: pool.config.default_limits
        )
        self.quotas = Quotas()
        self.ledger = Ledger(store)
        self.accounting = Accounting(self.ledger, self.quotas, UsageMetrics(registry))
        pool.request_ended = self.accounting.worker_reported
        self._tasks: list[asyncio.Task[None]] = []

    @classmethod
    def from_environment(
        cls, pool: ModelPool, env_keys: ApiKeys, registry: CollectorRegistry
    ) -> Tenancy:
        """The store DATABASE_URL names, else the SQLite file of config `usage_db`."""
        sqlite_path = Path(pool.config.usage_db)
        if not sqlite_path.is_absolute():
            sqlite_path = pool.registry_dir / sqlite_path
        store = open_store(os.environ.get(DATABASE_URL_ENV) or None, sqlite_path)
        redis_url = os.environ.get(REDIS_URL_ENV) or None
        return cls(pool, store, env_keys, jwt_secret_from_env(), registry, redis_url)

    async def start(self) -> None:
        """Open the store and read the named keys. Raises StoreError: a manager that
        cannot check its keys does not start."""
        await self.store.open()
        if self.sessions is not self.store:
            await self.sessions.open()
        await self.identities.load()
        log.info(
            "stores open",
            extra={"store": self.store.description, "sessions": self.sessions.description},
        )
        self._tasks = [
            asyncio.create_task(self.ledger.run(), name="ledger"),
            asyncio.create_task(self._sweep_tickets(), name="tickets"),
            asyncio.create_task(self._refresh_keys(), name="keys"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task  # the ledger's last flush runs here
        self._tasks = []
        self.accounting.sweep()
        with contextlib.suppress(StoreError):
            await self.ledger.flush()
        if self.sessions is not self.store:
            await self.sessions.close()
        await self.store.close()

    async def _refresh_keys(self) -> None:
        """Read the named keys again now and then, off every request's path."""
        while True:
            await asyncio.sleep(KEYS_REFRESH_SECONDS)
            try:
                await self.identities.load()
            except StoreError as exc:  # the copy held still serves; /health says why
                log.warning("named keys not refreshed", extra={"reason": str(exc)})

    async def _sweep_tickets(self) -> None:
        while True:
            await asyncio.sleep(TICKET_KEPT_SECONDS / 4)
            self.accounting.sweep()

    async def health(self) -> dict[str, dict[str, Any]]:
        """Each dependency in use and whether it answers, for /health."""
        found = {"database": await _pinged(self.store)}
        found["database"]["pending_usage_rows"] = self.ledger.pending_rows
        if self.sessions is not self.store:
            found["redis"] = await _pinged(self.sessions)
        return found


async def _pinged(store: Connected) -> dict[str, Any]:
    try:
        await store.ping()
    except StoreError as exc:
        return {"ok": False, "store": store.description, "error": str(exc)}
    return {"ok": True, "store": store.description}


class KeyCreate(BaseModel):
    """`limits` omitted or null: the config's default_limits; {}: none at all."""

    model_config = ConfigDict(extra="forbid")
    name: str
    role: str = Field(default="client", pattern="^(client|admin)$")
    limits: Limits | None = None


class KeyUpdate(BaseModel):
    """`limits` omitted or null: unchanged; {}: lift them all."""

    model_config = ConfigDict(extra="forbid")
    role: str | None = Field(default=None, pattern="^(client|admin)$")
    limits: Limits | None = None


def key_view(record: KeyRecord) -> dict[str, Any]:
    """A named key as the API shows it: never the key, never its hash. `limits` null:
    the config's default_limits apply."""
    return {
        "name": record.name,
        "role": record.role,
        "prefix": record.prefix,
        "limits": _compact(record.limits) if record.limits else None,  # None: the default
        "created_at": dt.datetime.fromtimestamp(record.created_at, dt.UTC).isoformat(),
    }


def _compact(limits: dict[str, Any]) -> dict[str, Any]:
    """The limits that are set (a key with none shows {})."""
    shown = {k: v for k, v in limits.items() if v is not None and k != "models"}
    models = {m: _compact(v) for m, v in (limits.get("models") or {}).items()}
    return {**shown, "models": models} if models else shown


def _usage_view(row: UsageRow) -> dict[str, Any]:
    counts = {name: getattr(row, name) for name in COUNTERS}
    return {"caller": row.caller, "model": row.model, "hour": row.hour, **counts}


def _store_unavailable(exc: StoreError) -> ApiError:
    return ApiError(
        503, f"the usage store is unavailable: {exc}", type="server_error", code="store_down"
    )


def add_tenancy_routes(app: FastAPI, tenancy: Tenancy) -> None:
    identities = tenancy.identities

    @app.get("/keys")
    async def list_keys() -> dict[str, Any]:
        """The named keys (admin): names, roles, limits, the first characters of each."""
        return {"keys": [key_view(r) for r in identities.named_keys()]}

    @app.post("/keys", status_code=201)
    async def create_key(body: KeyCreate) -> dict[str, Any]:
        """A new named key (admin). The reply is the only time the key is shown."""
        try:
            record, key = await identities.create_key(body.name, body.role, body.limits)
        except StoreError as exc:
            raise _store_unavailable(exc) from exc
        return {**key_view(record), "key": key}

    @app.patch("/keys/{name}")
    async def update_key(name: str, body: KeyUpdate) -> dict[str, Any]:
        """Change a named key's role or limits (admin); `limits: {}` lifts them all."""
        try:
            record = await identities.update_key(name, body.role, body.limits)
        except StoreError as exc:
            raise _store_unavailable(exc) from exc
        if record is None:
            raise _no_such_key(name)
        return key_view(record)

    @app.delete("/keys/{name}")
    async def delete_key(name: str) -> dict[str, Any]:
        """Revoke a named key (admin): refused from the next request on."""
        try:
            deleted = await identities.delete_key(name)
        except StoreError as exc:
            raise _store_unavailable(exc) from exc
        if not deleted:
            raise _no_such_key(name)
        return {"name": name, "deleted": True}

    @app.get("/usage")
    async def usage(
        caller: Annotated[str | None, Query(max_length=300)] = None,
        model: Annotated[str | None, Query(max_length=300)] = None,
        since: Annotated[int | None, Query(ge=0, le=LATEST_TIME)] = None,
        until: Annotated[int | None, Query(ge=0, le=LATEST_TIME)] = None,
    ) -> JSONResponse:
        """Usage per caller, model and hour (`hour`: unix seconds of its start) and the
        totals. An admin sees everyone's (filter with `caller`); others their own."""
        who = current_caller.get()
        if who.role is not Role.ADMIN:
            if caller not in (None, who.id):
                raise ApiError(
                    403,
                    "Only an admin may read another caller's usage.",
                    type="permission_error",
                    param="caller",
                    code="insufficient_permissions",
                )
            caller = who.id
        try:
            rows = await tenancy.ledger.usage(caller=caller, model=model, since=since, until=until)
        except StoreError as exc:
            raise _store_unavailable(exc) from exc
        totals = {name: sum(getattr(r, name) for r in rows) for name in COUNTERS}
        return JSONResponse(
            {"usage": [_usage_view(r) for r in rows], "totals": totals, "as_of": time.time()}
        )


def _no_such_key(name: str) -> ApiError:
    return ApiError(
        404, f"no key named '{name}'", type="invalid_request_error", code="key_not_found"
    )
