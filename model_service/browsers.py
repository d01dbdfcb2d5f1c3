"""Requests a web page makes the user's browser send are refused, keys or no keys.

With no keys set (the default `make run`), anything that reaches the port could load and
unload models; a web page the user visits can reach 127.0.0.1 through the browser: with
a cross-origin "simple" POST (no preflight), or by DNS rebinding (its own host name
pointed at 127.0.0.1, so the browser sends `Host: evil.example`). As Ollama does, two
headers decide:

- `Host` must name this machine: an IP address (rebinding needs a DNS name), `localhost`
  or a `*.localhost` name, or one of the configured `allowed_hosts`;
- `Origin`, when a browser sends one, must be this server's own origin (the dashboard
  at /ui) or one of the configured `allowed_origins`.

Anything else gets 403 in OpenAI's error shape. Clients that are not browsers send no
`Origin` and the host they connected to, so they pass.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from model_service.activity import ASGIApp, Receive, Scope, Send
from model_service.errors import ApiError


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return str(value.decode("latin-1")).strip()
    return None


def _hostname(host: str) -> str:
    """`host` without its port (`[::1]:8050` -> `::1`)."""
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def host_allowed(host: str, allowed: frozenset[str]) -> bool:
    name = _hostname(host).lower().rstrip(".")
    if name in allowed or name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class BrowserGuard:
    """Refuses a foreign `Host` or `Origin` (see the module's docstring) with 403."""

    def __init__(
        self,
        app: ASGIApp,
        allowed_hosts: Iterable[str] = (),
        allowed_origins: Iterable[str] = (),
    ) -> None:
        self._app = app
        self._hosts = frozenset(h.lower().rstrip(".") for h in allowed_hosts)
        self._origins = frozenset(o.rstrip("/").lower() for o in allowed_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            refusal = self._refusal(scope)
            if refusal is not None:
                error = ApiError(403, refusal, type="permission_error", code="forbidden")
                await error.response()(scope, receive, send)
                return
        await self._app(scope, receive, send)

    def _refusal(self, scope: Scope) -> str | None:
        host = _header(scope, b"host") or ""
        if host and not host_allowed(host, self._hosts):
            return (
                f"Host '{host}' is not this server's: requests must name it by an IP "
                "address, localhost, or a name in allowed_hosts (this guards against "
                "DNS rebinding)."
            )
        origin = _header(scope, b"origin")
        if origin is None or origin.lower() in self._origins:
            return None
        own = {f"http://{host}".lower(), f"https://{host}".lower()}
        if origin.rstrip("/").lower() in own:
            return None
        return (
            f"Origin '{origin}' may not call this server: a web page's requests are "
            "refused unless its origin is in allowed_origins."
        )
