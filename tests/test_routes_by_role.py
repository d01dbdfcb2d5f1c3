"""Every route, tried with every role: generated from the live route tables.

The manager's routes come from its app as built in this process (the raw routes that
the OpenAPI schema leaves out, such as /api/* and /v1/messages, included); the worker's
from its own /openapi.json. Each route is called on a running manager with keys set,
with no key, a wrong key, and every kind of credential of both roles (the operator's
keys, named keys, JWT users; a revoked key and expired or forged tokens refused), in
both header forms. A route
that needs a role refuses the roles below it (401 without a valid key, 403 for the
client key on an admin route) and lets its role through (any answer but 401/403).

The expected role of a route is written here as the rule the docs state, apart from the
code that enforces it: /health, /ready and /ui are open; /events and every change
outside the inference APIs need the admin key; reads and the inference APIs (/v1/*,
/api/*) need the client key.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute
from starlette.routing import Route, WebSocketRoute
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from pool_manager.api import create_app
from pool_manager.config import ConfigStore, ModelSpec, PoolConfig
from pool_manager.identity import sign_jwt
from pool_manager.metrics import PoolMetrics
from pool_manager.pool import ModelPool
from tests.conftest import DEFAULT_MODEL, Manager, ManagerFactory, model_entry

CLIENT_KEY = "client-key-routes-41c2"
JWT_SECRET = "jwt-secret-routes-" + "3" * 16
ADMIN_KEY = "admin-key-routes-9e07"
SPARE = "spare:1"
# What a path parameter is replaced with (a registered model, mostly).
PARAMETERS = {"model_id": SPARE, "name": SPARE, "response_id": "resp_none"}
OPEN = {"/health", "/ready", "/ui"}


def expected_role(method: str, path: str) -> str:
    if path in OPEN or path.startswith("/ui/"):
        return "open"
    if path == "/events" or path == "/keys" or path.startswith("/keys/"):
        return "admin"
    if method in ("GET", "HEAD") or path.startswith(("/v1/", "/api/")):
        return "client"
    return "admin"


def manager_routes(tmp_path: Path) -> list[tuple[str, str]]:
    """(method, path template) of every route the manager's app has."""
    store = ConfigStore(tmp_path / "config.json", tmp_path / "registry.json")
    spec = ModelSpec(model_id=SPARE, model_path="unused.gguf")
    pool = ModelPool(store, PoolConfig(), [spec], PoolMetrics())
    app = create_app(pool)
    routes = []
    for route in app.routes:
        if isinstance(route, APIRoute | Route) and route.methods:
            for method in sorted(route.methods - {"HEAD", "OPTIONS"}):
                routes.append((method, route.path))
    return sorted(set(routes))


def concrete(path: str) -> str:
    return re.sub(r"\{(\w+)(:path)?\}", lambda m: PARAMETERS.get(m.group(1), "x"), path)


def attempt(base: str, method: str, path: str, headers: dict[str, str]) -> int:
    """The status of one call; a body of `{}` keeps every route from doing real work."""
    body: dict[str, Any] | None = {} if method in ("POST", "PUT", "PATCH") else None
    if path == "/events":  # an endless stream: the status line is enough
        with httpx.stream("GET", base + path, headers=headers, timeout=30) as reply:
            return reply.status_code
    return httpx.request(method, base + path, headers=headers, json=body, timeout=60).status_code


def key_forms(key: str) -> list[tuple[str, dict[str, str]]]:
    return [("X-API-Key", {"X-API-Key": key}), ("Bearer", {"Authorization": f"Bearer {key}"})]


@dataclass
class Credentials:
    """Who may call: each client and admin credential of every kind, by name."""

    clients: dict[str, str] = field(default_factory=lambda: {"the client key": CLIENT_KEY})
    admins: dict[str, str] = field(default_factory=lambda: {"the admin key": ADMIN_KEY})
    refused: dict[str, str] = field(default_factory=lambda: {"a wrong key": "wrong"})


def check_route(
    base: str, method: str, path: str, role: str, credentials: Credentials | None = None
) -> list[str]:
    """What is wrong with one route's answers to every role (nothing: [])."""
    credentials = credentials or Credentials()
    wrong = []

    def expect(headers: dict[str, str], refused_with: int | None, who: str) -> None:
        status = attempt(base, method, path, headers)
        if refused_with is None and status in (401, 403):
            wrong.append(f"{method} {path}: {who} refused with {status}")
        if refused_with is not None and status != refused_with:
            wrong.append(f"{method} {path}: {who} got {status}, not {refused_with}")

    needs_key = None if role == "open" else 401
    expect({}, needs_key, "no key")
    for who, key in credentials.refused.items():
        expect({"X-API-Key": key}, needs_key, who)
    for who, key in credentials.clients.items():
        for form, headers in key_forms(key):
            expect(headers, 403 if role == "admin" else None, f"{who} ({form})")
    for who, key in credentials.admins.items():
        for form, headers in key_forms(key):
            expect(headers, None, f"{who} ({form})")
    return wrong


@pytest.fixture
def guarded(start_manager: ManagerFactory) -> Manager:
    manager = start_manager(
        models=[model_entry(DEFAULT_MODEL, warmup=True), model_entry(SPARE)],
        env={
            "POOL_API_KEY": CLIENT_KEY,
            "POOL_ADMIN_KEY": ADMIN_KEY,
            "POOL_JWT_SECRET": JWT_SECRET,
        },
    )
    manager.wait_state(DEFAULT_MODEL, "HOT")
    return manager


def every_kind_of_credential(manager: Manager) -> Credentials:
    """The operator's keys, named keys and JWT users of both roles (issue 17), and
    credentials that must be refused: a revoked key, an expired or forged token."""
    credentials = Credentials()
    limitless = {"limits": {}}  # a long run of requests: no 429 in the way of the check
    for role, kind in (("client", credentials.clients), ("admin", credentials.admins)):
        made = manager.request(
            "POST", "/keys", json={"name": f"{role}-key", "role": role, **limitless}
        )
        assert made.status_code == 201, made.text
        kind[f"a named {role} key"] = made.json()["key"]
        token = sign_jwt(
            {"sub": f"{role}-user", "role": role, "exp": time.time() + 3600}, JWT_SECRET
        )
        kind[f"a JWT {role}"] = token
    revoked = manager.request("POST", "/keys", json={"name": "revoked", "role": "admin"}).json()
    assert manager.request("DELETE", "/keys/revoked").status_code == 200
    credentials.refused["a revoked key"] = revoked["key"]
    expired = {"sub": "late", "role": "admin", "exp": time.time() - 3600}
    credentials.refused["an expired JWT"] = sign_jwt(expired, JWT_SECRET)
    forged = {"sub": "mallory", "role": "admin", "exp": time.time() + 3600}
    credentials.refused["a forged JWT"] = sign_jwt(forged, "not the secret")
    return credentials


def test_every_manager_route_against_every_role(guarded: Manager, tmp_path: Path) -> None:
    routes = manager_routes(tmp_path)
    paths = {path for _, path in routes}
    # The table is the live one: the surfaces this project serves are all in it.
    for needed in ("/v1/chat/completions", "/v1/messages", "/v1/responses", "/api/chat"):
        assert needed in paths, needed
    for needed in ("/keys", "/usage"):
        assert needed in paths, needed
    credentials = every_kind_of_credential(guarded)
    wrong = []
    # Changes last, so that a DELETE or unload does not hide a later route's answer.
    for method, path in sorted(routes, key=lambda r: (r[0] != "GET", r[0] == "DELETE")):
        role = expected_role(method, path)
        wrong += check_route(guarded.url, method, concrete(path), role, credentials)
    assert not wrong, "\n".join(wrong)


def test_every_worker_route_against_every_role(guarded: Manager) -> None:
    endpoint = guarded.model(DEFAULT_MODEL)["endpoint"]
    schema = httpx.get(f"{endpoint}/openapi.json", headers={"X-API-Key": CLIENT_KEY}).json()
    routes = [(m.upper(), p) for p, item in schema["paths"].items() for m in item]
    assert ("POST", "/v1/chat/completions") in routes and ("POST", "/v1/embeddings") in routes
    wrong = []
    for method, path in [*routes, ("GET", "/openapi.json")]:
        role = "open" if path == "/health" else "client"
        # A worker knows one key, the client's; the admin key is not valid there.
        wrong += [
            line
            for line in check_route(endpoint, method, concrete(path), role)
            if "admin key" not in line
        ]
    assert not wrong, "\n".join(wrong)


def manager_websocket_routes(tmp_path: Path) -> list[str]:
    """The path of every WebSocket route of the manager's app (seed 003's /ws)."""
    store = ConfigStore(tmp_path / "config.json", tmp_path / "registry.json")
    spec = ModelSpec(model_id=SPARE, model_path="unused.gguf")
    app = create_app(ModelPool(store, PoolConfig(), [spec], PoolMetrics()))
    return sorted(route.path for route in app.routes if isinstance(route, WebSocketRoute))


def test_every_websocket_route_against_every_role(guarded: Manager, tmp_path: Path) -> None:
    """A WebSocket route needs a client credential (any kind, in a header or `?token=`):
    the handshake is refused (403) without one or with one that is not valid."""
    paths = manager_websocket_routes(tmp_path)
    assert "/ws" in paths
    credentials = every_kind_of_credential(guarded)
    base = guarded.url.replace("http://", "ws://")
    wrong = []
    for path in paths:
        for who, key in {"no key": "", **credentials.refused}.items():
            url = f"{base}{path}" + (f"?token={key}" if key else "")
            try:
                connect(url, open_timeout=10).close()
                wrong.append(f"{path}: {who} was let in")
            except InvalidStatus as refused:
                if refused.response.status_code != 403:
                    wrong.append(f"{path}: {who} got {refused.response.status_code}")
        for who, key in {**credentials.clients, **credentials.admins}.items():
            for form, url, headers in (
                ("query", f"{base}{path}?token={key}", {}),
                ("header", f"{base}{path}", {"Authorization": f"Bearer {key}"}),
            ):
                try:
                    connect(url, additional_headers=headers, open_timeout=10).close()
                except InvalidStatus as refused:
                    status = refused.response.status_code
                    wrong.append(f"{path}: {who} ({form}) refused with {status}")
    assert not wrong, "\n".join(wrong)
