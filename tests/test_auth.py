"""API keys on the manager and on the worker ports."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.conftest import DEFAULT_MODEL, Manager, ManagerFactory, model_entry

CLIENT_KEY = "client-key-7f3a9c"
ADMIN_KEY = "admin-key-b81d22"


@pytest.fixture
def guarded(start_manager: ManagerFactory) -> Manager:
    manager = start_manager(
        models=[model_entry(DEFAULT_MODEL, warmup=True), model_entry("spare:1")],
        env={"POOL_API_KEY": CLIENT_KEY, "POOL_ADMIN_KEY": ADMIN_KEY},
    )
    manager.wait_state(DEFAULT_MODEL, "HOT")
    return manager


def call(
    manager: Manager,
    method: str,
    path: str,
    key: str | None,
    bearer: bool = False,
    **kwargs: object,
) -> httpx.Response:
    headers = {}
    if key is not None:
        headers = {"Authorization": f"Bearer {key}"} if bearer else {"X-API-Key": key}
    return httpx.request(method, f"{manager.url}{path}", headers=headers, timeout=60, **kwargs)  # type: ignore[arg-type]


ADMIN_ROUTES = [
    ("POST", "/models/spare:1/load", None),
    ("POST", "/models/spare:1/extend-ttl", {"minutes": 1}),
    ("POST", "/models/spare:1/unload", None),
    ("DELETE", "/models/spare:1", None),
    ("POST", "/models/register", model_entry("new:1")),
    ("PATCH", "/config", {"max_concurrent_models": 4}),
]
READ_ROUTES = [
    "/models",
    "/models/spare:1",
    "/config",
    "/metrics",
    f"/models/{DEFAULT_MODEL}/health",
]


def test_keys_guard_every_manager_route(guarded: Manager) -> None:
    assert call(guarded, "GET", "/health", None).status_code == 200
    for path in READ_ROUTES:
        missing = call(guarded, "GET", path, None)
        assert missing.status_code == 401, path
        assert missing.json()["error"]["type"] == "authentication_error"
        assert missing.headers["WWW-Authenticate"] == "Bearer"
        assert call(guarded, "GET", path, "wrong-key").status_code == 401, path
        assert call(guarded, "GET", path, CLIENT_KEY).status_code == 200, path
        assert call(guarded, "GET", path, ADMIN_KEY, bearer=True).status_code == 200, path
    for method, path, body in ADMIN_ROUTES:
        assert call(guarded, method, path, None, json=body).status_code == 401, path
        assert call(guarded, method, path, "nope", json=body).status_code == 401, path
        refused = call(guarded, method, path, CLIENT_KEY, json=body)
        assert refused.status_code == 403, path
        assert refused.json()["error"]["type"] == "permission_error"
    for method, path, body in ADMIN_ROUTES:
        reply = call(guarded, method, path, ADMIN_KEY, bearer=True, json=body)
        assert reply.status_code in (200, 201), (path, reply.text)


def test_worker_port_is_no_back_door(guarded: Manager) -> None:
    endpoint = guarded.model(DEFAULT_MODEL)["endpoint"]
    body = {
        "model": DEFAULT_MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 3,
    }
    assert httpx.post(f"{endpoint}/v1/chat/completions", json=body).status_code == 401
    assert httpx.get(f"{endpoint}/metrics").status_code == 401
    wrong = httpx.post(f"{endpoint}/v1/chat/completions", json=body, headers={"X-API-Key": "guess"})
    assert wrong.status_code == 401
    assert httpx.get(f"{endpoint}/health").status_code == 200
    client = openai.OpenAI(base_url=f"{endpoint}/v1", api_key=CLIENT_KEY, max_retries=0)
    reply = client.chat.completions.create(
        model=DEFAULT_MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3
    )
    assert reply.choices[0].message.content is not None
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{endpoint}/v1", api_key="bad", max_retries=0).models.list()
    assert guarded.model(DEFAULT_MODEL)["requests_total"] == 1, "refused calls are not use"


def test_keys_never_reach_logs_or_errors(guarded: Manager) -> None:
    call(guarded, "GET", "/models", "wrong-key")
    call(guarded, "POST", "/models/spare:1/load", CLIENT_KEY)
    reply = call(guarded, "POST", "/models/spare:1/load", ADMIN_KEY)
    assert reply.status_code == 200
    assert CLIENT_KEY not in reply.text and ADMIN_KEY not in reply.text
    guarded.stop()
    log = (guarded.folder / "manager.log").read_text()
    assert CLIENT_KEY not in log and ADMIN_KEY not in log


def test_open_mode_warns_at_start(start_manager: ManagerFactory) -> None:
    manager = start_manager(models=[model_entry("spare:1")])
    assert httpx.get(f"{manager.url}/models").status_code == 200
    assert "no API keys configured" in manager.log()
