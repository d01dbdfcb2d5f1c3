"""API keys for the manager and the workers.

Two keys from the environment, never from files: `POOL_API_KEY` (clients: inference and
reads) and `POOL_ADMIN_KEY` (operators: everything that changes state; also accepted
wherever the client key is). Sent as `X-API-Key: KEY` or `Authorization: Bearer KEY`.
Missing key: 401. A key of the wrong role: 403. Comparison is constant-time. A role
whose key is not configured is open (with no keys at all, everything is, on loopback).
The role a request's key grants is kept in its scope (`caller_role`), for the routes
whose answer depends on who asks (/health's detail, Ollama's keep_alive).
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from model_service.activity import ASGIApp, Receive, Scope, Send
from model_service.errors import ApiError

CLIENT_KEY_ENV = "POOL_API_KEY"
ADMIN_KEY_ENV = "POOL_ADMIN_KEY"


class Role(Enum):
    OPEN = "open"
    CLIENT = "client"
    ADMIN = "admin"


@dataclass(frozen=True)
class ApiKeys:
    client: str | None = None
    admin: str | None = None

    @classmethod
    def from_env(cls) -> ApiKeys:
        return cls(
            client=os.environ.get(CLIENT_KEY_ENV) or None,
            admin=os.environ.get(ADMIN_KEY_ENV) or None,
        )

    @property
    def enabled(self) -> bool:
        return bool(self.client or self.admin)

    def accepted(self, role: Role) -> list[str]:
        """The keys that grant `role`; empty means the role is open."""
        if role is Role.OPEN:
            return []
        if role is Role.ADMIN:
            return [k for k in (self.admin or self.client,) if k]
        return [k for k in (self.client, self.admin) if k] if self.client else []

    def grants(self, presented: str | None, role: Role) -> bool:
        """Whether `presented` (or no key, where `role` is open) grants `role`."""
        accepted = self.accepted(role)
        if not accepted:
            return True
        if not presented:
            return False
        # Compare against every accepted key, always, so timing says nothing.
        return any([hmac.compare_digest(presented.encode(), key.encode()) for key in accepted])

    def role_of(self, presented: str | None) -> Role:
        """The highest role `presented` grants."""
        for role in (Role.ADMIN, Role.CLIENT):
            if self.grants(presented, role):
                return role
        return Role.OPEN

    def check(self, presented: str | None, role: Role) -> None:
        """Raise ApiError 401/403 unless `presented` grants `role`."""
        accepted = self.accepted(role)
        if not accepted:
            return
        if not presented:
            raise ApiError(
                401,
                "Missing API key: send it as 'Authorization: Bearer KEY' or 'X-API-Key: KEY'.",
                type="authentication_error",
                code="missing_api_key",
            )
        if self.grants(presented, role):
            return
        known = [k for k in (self.client, self.admin) if k]
        if any([hmac.compare_digest(presented.encode(), k.encode()) for k in known]):
            raise ApiError(
                403,
                f"This key may not do this: the {role.value} key is required.",
                type="permission_error",
                code="insufficient_permissions",
            )
        raise ApiError(401, "Invalid API key.", type="authentication_error", code="invalid_api_key")


def caller_role(scope: Scope) -> Role:
    """The role the request's key granted (set by AuthMiddleware; none there: open)."""
    role = scope.get("state", {}).get("role")
    return role if isinstance(role, Role) else Role.OPEN


def presented_key(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"x-api-key":
            return value.decode("latin-1").strip() or None
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


class AuthMiddleware:
    """Checks every HTTP request against the role `role_for(method, path)` demands."""

    def __init__(self, app: ASGIApp, keys: ApiKeys, role_for: Callable[[str, str], Role]) -> None:
        self._app = app
        self._keys = keys
        self._role_for = role_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            presented = presented_key(scope)
            if self._keys.enabled:
                role = self._role_for(scope["method"], scope["path"])
                try:
                    self._keys.check(presented, role)
                except ApiError as exc:
                    response = exc.response()
                    if exc.status == 401:
                        response.headers["WWW-Authenticate"] = "Bearer"
                    await response(scope, receive, send)
                    return
            scope.setdefault("state", {})["role"] = self._keys.role_of(presented)
        await self._app(scope, receive, send)
