"""Who is calling (issue 17): the operator's keys, named keys, JWT users.

Three kinds of credential, all sent as `Authorization: Bearer ...` or `X-API-Key: ...`:

- `POOL_API_KEY` / `POOL_ADMIN_KEY` from the environment (the operator's; no limits);
- named keys, made by an admin over REST or `poolctl keys create` and shown once: only
  their SHA-256 is stored (they are 43 random characters: a slow hash would add nothing
  but latency), each with a role and limits;
- JWT bearer tokens signed HS256 with `POOL_JWT_SECRET`: `sub` names the user, the `role`
  claim ("client", the default, or "admin") their role, an optional `limits` claim their
  limits (the issuer holds the secret, so it sets them; default: `default_limits`); `exp`
  is required.

A caller is named in usage and limits as `env:client`, `env:admin`, `key:NAME`,
`user:SUB`, or `open` (no credentials exist at all: everything is open, on loopback).
`Identities` owns the named keys: the store holds them, this keeps a copy to check each
request without a database round trip.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from pydantic import ValidationError

from model_service.activity import ASGIApp, Receive, Scope, Send
from model_service.auth import ApiKeys, Role, presented_key
from model_service.errors import ApiError
from pool_manager.config import Limits
from pool_manager.store import KeyExists, KeyRecord, Store

log = logging.getLogger(__name__)

JWT_SECRET_ENV = "POOL_JWT_SECRET"
KEY_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
KEY_PREFIX = "pool-"
JWT_LEEWAY_SECONDS = 30  # clocks differ a little between the issuer and us
KEYS_REFRESH_SECONDS = 30.0  # keys made or deleted by another manager on the same store


@dataclass(frozen=True)
class Caller:
    """Who sent a request: named in usage as `id`; `limits` None: unlimited."""

    id: str
    role: Role
    limits: Limits | None = None


OPEN_CALLER = Caller("open", Role.ADMIN)
# Set by CallerMiddleware for the request being handled (the translating APIs call the
# gateway in the same task, so it follows them there).
current_caller: ContextVar[Caller] = ContextVar("current_caller", default=OPEN_CALLER)


def new_key() -> str:
    """A fresh named key: 'pool-' and 256 random bits."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class JwtError(ValueError):
    """A bearer token that looked like a JWT but is not one we accept (the message says
    why, without echoing the token)."""


def _b64decode(segment: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (binascii.Error, ValueError) as exc:
        raise JwtError("malformed token: a segment is not base64url") from exc


def _b64encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def looks_like_jwt(token: str) -> bool:
    return token.count(".") == 2 and not token.startswith(KEY_PREFIX)


@dataclass(frozen=True)
class JwtClaims:
    subject: str
    role: Role
    limits: Limits | None = None  # the `limits` claim: the issuer's limits for this user


def verify_jwt(token: str, secret: str, now: float | None = None) -> JwtClaims:
    """Check an HS256 token's signature and times; raises JwtError. Only HS256 is
    accepted (never `none`, never another algorithm named by the token)."""
    try:
        header_part, claims_part, signature_part = token.split(".")
    except ValueError:
        raise JwtError("malformed token: a JWT has three parts") from None
    try:
        header = json.loads(_b64decode(header_part))
        claims = json.loads(_b64decode(claims_part))
    except ValueError as exc:
        raise JwtError("malformed token: a part is not JSON") from exc
    if not isinstance(header, dict) or header.get("alg") != "HS256":
        raise JwtError("unsupported token: only HS256 is accepted")
    expected = hmac.new(
        secret.encode(), f"{header_part}.{claims_part}".encode(), hashlib.sha256
    ).digest()
    if not hmac.compare_digest(expected, _b64decode(signature_part)):
        raise JwtError("invalid token signature")
    if not isinstance(claims, dict):
        raise JwtError("malformed token: its claims are not an object")
    now = time.time() if now is None else now
    expires = claims.get("exp")
    if not isinstance(expires, (int, float)) or isinstance(expires, bool):
        raise JwtError("the token has no 'exp' claim")
    if now > expires + JWT_LEEWAY_SECONDS:
        raise JwtError("the token has expired")
    not_before = claims.get("nbf")
    if isinstance(not_before, (int, float)) and now + JWT_LEEWAY_SECONDS < not_before:
        raise JwtError("the token is not valid yet")
    subject = claims.get("sub")
    if not isinstance(subject, str) or not subject or len(subject) > 256:
        raise JwtError("the token has no 'sub' claim")
    role = claims.get("role", "client")
    if role not in ("client", "admin"):
        raise JwtError("the token's 'role' claim must be 'client' or 'admin'")
    limits = None
    if claims.get("limits") is not None:
        try:
            limits = Limits.model_validate(claims["limits"])
        except ValidationError as exc:
            raise JwtError(
                f"the token's 'limits' claim is not valid: {exc.errors()[0]['msg']}"
            ) from None
    return JwtClaims(subject, Role.ADMIN if role == "admin" else Role.CLIENT, limits)


def sign_jwt(claims: dict[str, Any], secret: str) -> str:
    """An HS256 token for `claims` (for poolctl and tests; issuers have their own)."""
    header = _b64encode(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = _b64encode(json.dumps(claims).encode())
    signature = hmac.new(secret.encode(), f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{_b64encode(signature)}"


def _missing_key() -> ApiError:
    return ApiError(
        401,
        "Missing API key: send it as 'Authorization: Bearer KEY' or 'X-API-Key: KEY'.",
        type="authentication_error",
        code="missing_api_key",
    )


def _invalid_key(why: str = "Invalid API key.") -> ApiError:
    return ApiError(401, why, type="authentication_error", code="invalid_api_key")


class Identities:
    """The credentials the manager accepts, and who each one is.

    Owns the copy of the named keys (the store is the record); `identify` never touches
    the database except for a key it has not seen (made by another manager).
    """

    def __init__(
        self,
        store: Store,
        env_keys: ApiKeys,
        jwt_secret: str | None,
        default_limits: Callable[[], Limits],
    ) -> None:
        self._store = store
        self._env = env_keys
        self._jwt_secret = jwt_secret
        self._default_limits = default_limits
        self._keys: dict[str, KeyRecord] = {}  # by digest

    async def load(self) -> None:
        """Read the named keys from the store: at start, then every KEYS_REFRESH_SECONDS
        (Tenancy), so a key deleted by another manager sharing the store goes too.
        Raises StoreError."""
        records = await self._store.keys()
        self._keys = {r.digest: r for r in records}

    @property
    def enabled(self) -> bool:
        """Whether any credential exists; with none, everything is open."""
        return bool(self._env.enabled or self._jwt_secret or self._keys)

    def open_for(self, role: Role) -> bool:
        """Whether `role`'s routes need no key. The client routes stay open with only an
        admin key set (as before named keys); a named key or JWT closes them."""
        if role is Role.OPEN or not self.enabled:
            return True
        if role is Role.CLIENT:
            return not (self._env.client or self._jwt_secret or self._keys)
        return False

    async def identify(self, presented: str | None) -> Caller | None:
        """The caller `presented` names; None: no credential sent. Raises ApiError 401
        for one that is not valid."""
        if presented is None:
            return None
        env_role = self._env.role_of(presented) if self._env.enabled else Role.OPEN
        if self._env.enabled and self._env_match(presented):
            return Caller(f"env:{env_role.value}", env_role)
        if self._jwt_secret and looks_like_jwt(presented):
            try:
                claims = verify_jwt(presented, self._jwt_secret)
            except JwtError as exc:
                raise _invalid_key(f"Invalid token: {exc}.") from None
            limits = claims.limits if claims.limits is not None else self._default_limits()
            return Caller(f"user:{claims.subject}", claims.role, limits)
        record = await self._named_key(key_digest(presented))
        if record is None:
            raise _invalid_key()
        # A key's own limits; {} stored: the config's default_limits.
        own = Limits.model_validate(record.limits) if record.limits else self._default_limits()
        role = Role.ADMIN if record.role == "admin" else Role.CLIENT
        return Caller(f"key:{record.name}", role, own)

    def _env_match(self, presented: str) -> bool:
        known = [k for k in (self._env.client, self._env.admin) if k]
        return any([hmac.compare_digest(presented.encode(), k.encode()) for k in known])

    async def _named_key(self, digest: str) -> KeyRecord | None:
        """The copy's record; one it lacks (made by another manager since the last
        `load`) is looked up in the store."""
        record = self._keys.get(digest)
        if record is None:
            record = await self._store.key_by_digest(digest)
            if record is not None:
                self._keys[digest] = record
        return record

    # --- admin ---------------------------------------------------------------------------

    def named_keys(self) -> list[KeyRecord]:
        return sorted(self._keys.values(), key=lambda r: r.name)

    async def create_key(
        self, name: str, role: str, limits: Limits | None
    ) -> tuple[KeyRecord, str]:
        """Make a named key; returns its record and the key itself (shown once).
        Raises ApiError 400/409, StoreError."""
        if not KEY_NAME_PATTERN.match(name):
            raise ApiError(
                400,
                "name: 1 to 64 letters, digits, '_', '.' or '-', starting with a letter or digit",
                param="name",
                code="invalid_value",
            )
        if role == "client" and not self._has_admin_credential():
            # Else the first named key would close the admin routes to everyone.
            raise ApiError(
                409,
                "Make an admin key first (role 'admin'), or set POOL_ADMIN_KEY: a client "
                "key would close the admin routes with no admin credential to open them.",
                type="invalid_request_error",
                code="no_admin_credential",
            )
        key = new_key()
        record = KeyRecord(
            name=name,
            role=role,
            digest=key_digest(key),
            prefix=key[:8],
            limits=_stored(limits),
            created_at=time.time(),
        )
        try:
            await self._store.add_key(record)
        except KeyExists:
            raise ApiError(
                409,
                f"a key named '{name}' exists already",
                type="invalid_request_error",
                param="name",
                code="conflict",
            ) from None
        self._keys[record.digest] = record
        log.info("key created", extra={"key": name, "role": role})
        return record, key

    def _has_admin_credential(self) -> bool:
        return bool(
            self._env.admin
            or self._jwt_secret
            or any(r.role == "admin" for r in self._keys.values())
        )

    async def update_key(
        self, name: str, role: str | None, limits: Limits | None
    ) -> KeyRecord | None:
        stored = _stored(limits) if limits is not None else None
        record = await self._store.update_key(name, role=role, limits=stored)
        if record is not None:
            self._keys = {d: r for d, r in self._keys.items() if r.name != name}
            self._keys[record.digest] = record
        return record

    async def delete_key(self, name: str) -> bool:
        deleted = await self._store.delete_key(name)
        self._keys = {d: r for d, r in self._keys.items() if r.name != name}
        if deleted:
            log.info("key deleted", extra={"key": name})
        return deleted


def _stored(limits: Limits | None) -> dict[str, Any]:
    """Limits as the store keeps them: {} for "the default limits"; set limits in full,
    nulls included, so that "no limit at all" is not mistaken for the default."""
    return limits.model_dump() if limits is not None else {}


class CallerMiddleware:
    """Checks every HTTP request against the role `role_for(method, path)` demands and
    says who sent it: `scope["state"]["role"]` and `current_caller`."""

    def __init__(
        self, app: ASGIApp, identities: Identities, role_for: Callable[[str, str], Role]
    ) -> None:
        self._app = app
        self._identities = identities
        self._role_for = role_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self._app(scope, receive, send)
            return
        try:
            caller = await self._caller(scope)
        except ApiError as exc:
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008, "reason": exc.message})
                return
            response = exc.response()
            if exc.status == 401:
                response.headers["WWW-Authenticate"] = "Bearer"
            await response(scope, receive, send)
            return
        scope.setdefault("state", {})["role"] = caller.role
        token = current_caller.set(caller)
        try:
            await self._app(scope, receive, send)
        finally:
            current_caller.reset(token)

    async def _caller(self, scope: Scope) -> Caller:
        identities = self._identities
        if not identities.enabled:
            return OPEN_CALLER
        needed = self._role_for(scope.get("method", "GET"), scope["path"])
        presented = presented_key(scope)
        if presented is None and scope["type"] == "websocket":
            presented = _query_token(scope)  # browsers cannot set a WebSocket's headers
        if identities.open_for(needed):
            # Open route: a credential sent is still who the caller is (for usage), and
            # one that is not valid is ignored, as before named keys.
            try:
                caller = await identities.identify(presented)
            except ApiError:
                caller = None
            return caller or Caller("open", Role.CLIENT if needed is Role.CLIENT else Role.OPEN)
        caller = await identities.identify(presented)
        if caller is None:
            raise _missing_key()
        if needed is Role.ADMIN and caller.role is not Role.ADMIN:
            raise ApiError(
                403,
                "This key may not do this: the admin role is required.",
                type="permission_error",
                code="insufficient_permissions",
            )
        return caller


def _query_token(scope: Scope) -> str | None:
    """`?token=...` of a WebSocket's URL (seed 003's `/ws?token=<jwt>`)."""
    for pair in scope.get("query_string", b"").decode("latin-1").split("&"):
        name, _, value = pair.partition("=")
        if name == "token" and value:
            return unquote(value)
    return None


def jwt_secret_from_env() -> str | None:
    return os.environ.get(JWT_SECRET_ENV) or None
