"""A web page's requests are refused, keys or no keys: foreign Origin and Host get 403."""

from __future__ import annotations

import httpx
import pytest

from model_service.browsers import host_allowed
from tests.conftest import DEFAULT_MODEL, Manager, ManagerFactory, model_entry

COLD = "cold:1"


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("127.0.0.1:8050", True),
        ("localhost:8050", True),
        ("app.localhost", True),
        ("[::1]:8050", True),
        ("192.168.1.20:8050", True),  # an address: DNS rebinding needs a name
        ("evil.example:8050", False),
        ("localhost.evil.example", False),
        ("pool.internal:8050", True),  # in allowed_hosts
    ],
)
def test_host_names(host: str, allowed: bool) -> None:
    assert host_allowed(host, frozenset({"pool.internal"})) is allowed


@pytest.fixture
def open_pool(start_manager: ManagerFactory) -> Manager:
    """No keys, as `make run` starts it: only the guard stands between a page and it."""
    manager = start_manager(
        config={"allowed_origins": ["https://ops.example"], "allowed_hosts": ["pool.lan"]},
        models=[model_entry(DEFAULT_MODEL, warmup=True), model_entry(COLD)],
    )
    manager.wait_state(DEFAULT_MODEL, "HOT")
    return manager


def test_a_web_page_cannot_drive_an_open_pool(open_pool: Manager) -> None:
    load = f"{open_pool.url}/models/{COLD}/load"
    chat = {
        "model": DEFAULT_MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 1,
    }
    # A cross-origin "simple" POST, as a page's form or fetch sends it, and a chat.
    for origin in ("https://evil.example", "http://127.0.0.1:1", "null"):
        refused = httpx.post(load, headers={"Origin": origin}, timeout=30)
        assert refused.status_code == 403, origin
        assert refused.json()["error"]["type"] == "permission_error"
        relayed = httpx.post(
            f"{open_pool.url}/v1/chat/completions", json=chat, headers={"Origin": origin}
        )
        assert relayed.status_code == 403, origin
    assert open_pool.model(COLD)["state"] == "COLD", "nothing was loaded"
    # DNS rebinding: the page's own host name, pointed at 127.0.0.1.
    rebound = httpx.get(f"{open_pool.url}/models", headers={"Host": "evil.example"})
    assert rebound.status_code == 403 and "DNS rebinding" in rebound.json()["error"]["message"]


def test_own_origin_allowed_origins_and_plain_clients_pass(open_pool: Manager) -> None:
    port = open_pool.port
    own = {"Origin": f"http://127.0.0.1:{port}"}  # the dashboard at /ui
    assert httpx.get(f"{open_pool.url}/models", headers=own).status_code == 200
    assert httpx.get(
        f"{open_pool.url}/health", headers={"Origin": "https://ops.example"}
    ).is_success
    for host in (f"localhost:{port}", f"pool.lan:{port}"):
        assert httpx.get(f"{open_pool.url}/models", headers={"Host": host}).status_code == 200
    loaded = httpx.post(f"{open_pool.url}/models/{COLD}/load", timeout=60)  # no Origin: a tool
    assert loaded.status_code == 200 and loaded.json()["state"] == "HOT"
