"""The operator dashboard at `/ui`: one static page, no build step.

The page itself is open (see `manager_role`); everything it shows comes from the API it
calls with the admin key: `GET /events` (read with `fetch()`, so it can send
`Authorization`), `GET /health`, `GET /models/{id}/health` (tokens/s), and the load,
unload and extend-ttl routes. Its script and style are inline, so one route serves it;
the Content-Security-Policy allows exactly those two blocks (by hash) and same-origin
`fetch()`, nothing else.
"""

from __future__ import annotations

import base64
import hashlib
import re
from importlib import resources

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

PAGE = "dashboard.html"

_INLINE = re.compile(r"<(script|style)>(.*?)</\1>", re.DOTALL)


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def content_security_policy(page: str) -> str:
    """A policy that allows the page's own inline <script> and <style> blocks and no others."""
    sources: dict[str, list[str]] = {"script": [], "style": []}
    for tag, body in _INLINE.findall(page):
        sources[tag].append(_sha256(body))
    scripts = " ".join(sources["script"]) or "'none'"
    styles = " ".join(sources["style"]) or "'none'"
    return "; ".join(
        [
            "default-src 'none'",
            f"script-src {scripts}",
            f"style-src {styles}",
            "connect-src 'self'",
            "img-src 'self' data:",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )


def load_page() -> str:
    return (resources.files("pool_manager") / "static" / PAGE).read_text(encoding="utf-8")


def install_ui(app: FastAPI) -> None:
    """Serve the dashboard at GET /ui."""
    page = load_page()
    headers = {
        "Content-Security-Policy": content_security_policy(page),
        "Cache-Control": "no-cache",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }

    @app.get("/ui", include_in_schema=False)
    async def dashboard() -> HTMLResponse:
        return HTMLResponse(page, headers=headers)
