"""A pool many teams share (issue 17), end to end with the real model: named keys and
JWT users, their limits on every inference surface, the usage ledger, on SQLite and on a
real PostgreSQL server (tests/pg_server.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from pool_manager.identity import sign_jwt
from tests.conftest import DEFAULT_MODEL, Manager, ManagerFactory, model_entry, wait_for
from tests.pg_server import PostgresServer

ADMIN_KEY = "admin-key-tenancy-5d1a"
CLIENT_KEY = "client-key-tenancy-77c0"
JWT_SECRET = "jwt-secret-tenancy-" + "9" * 16
CHAT = {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "Count to five."}]}


@pytest.fixture(params=["sqlite", "postgresql"])
def shared_pool(request: pytest.FixtureRequest, start_manager: ManagerFactory) -> Iterator[Manager]:
    """A manager with the operator's keys and a JWT secret, its usage and keys in SQLite
    (the default) or in a fresh PostgreSQL database."""
    env = {"POOL_ADMIN_KEY": ADMIN_KEY, "POOL_API_KEY": CLIENT_KEY, "POOL_JWT_SECRET": JWT_SECRET}
    if request.param == "postgresql":
        server: PostgresServer = request.getfixturevalue("postgres_server")
        env["DATABASE_URL"] = server.create_database("tenancy")
    manager = start_manager(
        models=[model_entry(DEFAULT_MODEL, warmup=True)], env=env, config={"spare_workers": 0}
    )
    manager.wait_state(DEFAULT_MODEL, "HOT")
    yield manager


def make_key(manager: Manager, name: str, **body: Any) -> str:
    reply = manager.request("POST", "/keys", json={"name": name, **body})
    assert reply.status_code == 201, reply.text
    key: str = reply.json()["key"]
    return key


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def post_chat(manager: Manager, key: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(
        manager.url + "/v1/chat/completions", json=body, headers=bearer(key), timeout=60
    )


def usage_of(manager: Manager, caller: str) -> dict[str, int]:
    reply = manager.request("GET", "/usage", params={"caller": caller})
    assert reply.status_code == 200, reply.text
    totals: dict[str, int] = reply.json()["totals"]
    return totals


# One request on each inference surface, as its own clients send it.
SURFACES: dict[str, tuple[str, dict[str, Any]]] = {
    "openai chat": ("/v1/chat/completions", {**CHAT, "max_tokens": 4}),
    "openai completions": (
        "/v1/completions",
        {"model": DEFAULT_MODEL, "prompt": "Hi", "max_tokens": 4},
    ),
    "responses": ("/v1/responses", {"model": DEFAULT_MODEL, "input": "Hi", "max_output_tokens": 4}),
    "anthropic": (
        "/v1/messages",
        {"model": DEFAULT_MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]},
    ),
    "mes": ("/v1/inference", {"model_id": DEFAULT_MODEL, "prompt": "Hi", "max_tokens": 4}),
    "ollama chat": (
        "/api/chat",
        {"model": DEFAULT_MODEL, "stream": False, "messages": [{"role": "user", "content": "Hi"}]},
    ),
    "ollama generate": ("/api/generate", {"model": DEFAULT_MODEL, "prompt": "Hi", "stream": False}),
}


def test_a_key_over_its_hourly_quota_is_refused_on_every_surface(shared_pool: Manager) -> None:
    manager = shared_pool
    key = make_key(manager, "quota", limits={"requests_per_hour": len(SURFACES)})
    # Each surface once within the quota: all answer, and say what is left.
    for name, (path, body) in SURFACES.items():
        reply = httpx.post(manager.url + path, json=body, headers=bearer(key), timeout=60)
        assert reply.status_code == 200, (name, reply.text)
    client = openai.OpenAI(base_url=manager.url + "/v1", api_key=key, max_retries=0)
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(**CHAT, max_tokens=4)  # type: ignore[call-overload]
    headers = refused.value.response.headers
    assert 3000 < int(headers["retry-after"]) <= 3600
    assert headers["x-ratelimit-limit-requests"] == str(len(SURFACES))
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.value.body["code"] == "rate_limit_exceeded"  # type: ignore[index]
    for name, (path, body) in SURFACES.items():
        reply = httpx.post(manager.url + path, json=body, headers=bearer(key), timeout=60)
        assert reply.status_code == 429, (name, reply.text)
        assert int(reply.headers["retry-after"]) > 3000, name
    # Its refusals are in its usage; another caller is not limited by them.
    wait_for(
        lambda: usage_of(manager, "key:quota")["refusals"] == len(SURFACES) + 1,
        10,
        message="the refusals to be booked",
    )
    assert usage_of(manager, "key:quota")["requests"] == len(SURFACES)
    other = post_chat(manager, CLIENT_KEY, {**CHAT, "max_tokens": 2})
    assert other.status_code == 200


def test_two_keys_usage_adds_up_to_what_their_clients_counted(shared_pool: Manager) -> None:
    manager = shared_pool
    keys = {name: make_key(manager, name, limits={}) for name in ("alice", "bob")}
    counted: dict[str, dict[str, int]] = {}
    for round_, (name, key) in enumerate(keys.items()):
        client = openai.OpenAI(base_url=manager.url + "/v1", api_key=key, max_retries=0)
        prompt = completion = 0
        requests = 3 + round_
        for i in range(requests):
            if i % 2:  # streamed, its usage in the last chunk
                stream = client.chat.completions.create(
                    **CHAT, max_tokens=6 + i, stream=True, stream_options={"include_usage": True}
                )  # type: ignore[call-overload]
                usage = [c.usage for c in stream if c.usage is not None][-1]
            else:
                usage = client.chat.completions.create(**CHAT, max_tokens=6 + i).usage  # type: ignore[call-overload]
            assert usage is not None
            prompt += usage.prompt_tokens
            completion += usage.completion_tokens
        embedded = client.embeddings.create(model=DEFAULT_MODEL, input=["one", "two words"])
        prompt += embedded.usage.prompt_tokens
        counted[f"key:{name}"] = {
            "requests": requests + 1,
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "errors": 0,
        }

    def booked() -> dict[str, dict[str, int]]:
        return {
            caller: {k: usage_of(manager, caller)[k] for k in counted[caller]} for caller in counted
        }

    wait_for(lambda: booked() == counted, 10, message=f"usage to add up to {counted}")
    # A client key sees its own usage only.
    alice = httpx.get(manager.url + "/usage", headers=bearer(keys["alice"]), timeout=10)
    assert {row["caller"] for row in alice.json()["usage"]} == {"key:alice"}
    other = httpx.get(
        manager.url + "/usage",
        params={"caller": "key:bob"},
        headers=bearer(keys["alice"]),
        timeout=10,
    )
    assert other.status_code == 403
    # Prometheus has the same counts.
    metrics = manager.request("GET", "/metrics").text
    line = f'pool_usage_requests_total{{caller="key:bob",model="{DEFAULT_MODEL}",outcome="ok"}}'
    assert f"{line} {float(counted['key:bob']['requests'])}" in metrics


def test_keys_are_made_shown_once_changed_and_revoked(shared_pool: Manager) -> None:
    manager = shared_pool
    created = manager.request("POST", "/keys", json={"name": "ci-bot", "role": "client"})
    assert created.status_code == 201
    key = created.json()["key"]
    assert key.startswith("pool-") and created.json()["prefix"] == key[:8]
    listed = manager.request("GET", "/keys").json()["keys"]
    assert [k["name"] for k in listed] == ["ci-bot"]
    assert key not in json.dumps(listed) and "digest" not in listed[0]
    again = manager.request("POST", "/keys", json={"name": "ci-bot"})
    assert again.status_code == 409 and again.json()["error"]["code"] == "conflict"
    bad = manager.request("POST", "/keys", json={"name": "no spaces", "limits": {"x": 1}})
    assert bad.status_code == 400
    # A client key may infer but not make keys; the key works until revoked.
    chat = post_chat(manager, key, {**CHAT, "max_tokens": 2})
    assert chat.status_code == 200
    assert httpx.get(manager.url + "/keys", headers=bearer(key), timeout=10).status_code == 403
    changed = manager.request("PATCH", "/keys/ci-bot", json={"limits": {"concurrent_requests": 3}})
    assert changed.json()["limits"] == {"concurrent_requests": 3}
    assert manager.request("DELETE", "/keys/ci-bot").status_code == 200
    assert manager.request("DELETE", "/keys/ci-bot").status_code == 404
    gone = post_chat(manager, key, CHAT)
    assert gone.status_code == 401
    assert key not in manager.log(), "a key reached the log"


def test_jwt_users_are_who_their_token_says(shared_pool: Manager) -> None:
    manager = shared_pool
    now = time.time()
    user = sign_jwt({"sub": "dave", "exp": now + 600}, JWT_SECRET)
    admin = sign_jwt({"sub": "erin", "role": "admin", "exp": now + 600}, JWT_SECRET)
    chat = post_chat(manager, user, {**CHAT, "max_tokens": 2})
    assert chat.status_code == 200
    assert int(chat.headers["x-ratelimit-limit-requests"]) == 100  # the seed's default
    assert httpx.get(manager.url + "/keys", headers=bearer(user), timeout=10).status_code == 403
    assert httpx.get(manager.url + "/keys", headers=bearer(admin), timeout=10).status_code == 200
    expired = sign_jwt({"sub": "dave", "exp": now - 3600}, JWT_SECRET)
    refused = post_chat(manager, expired, CHAT)
    assert refused.status_code == 401 and "expired" in refused.json()["error"]["message"]
    forged = sign_jwt({"sub": "dave", "role": "admin", "exp": now + 600}, "not the secret")
    assert httpx.get(manager.url + "/keys", headers=bearer(forged), timeout=10).status_code == 401
    wait_for(lambda: usage_of(manager, "user:dave")["requests"] == 1, 10, message="dave's usage")
    # The issuer sets a user's own limits in the token.
    frugal = sign_jwt(
        {"sub": "fay", "exp": now + 600, "limits": {"requests_per_hour": 1}}, JWT_SECRET
    )
    assert post_chat(manager, frugal, {**CHAT, "max_tokens": 2}).status_code == 200
    again = post_chat(manager, frugal, {**CHAT, "max_tokens": 2})
    assert again.status_code == 429 and again.headers["x-ratelimit-limit-requests"] == "1"


def test_a_concurrency_limit_holds_while_a_stream_runs(shared_pool: Manager) -> None:
    manager = shared_pool
    key = make_key(manager, "one-at-a-time", limits={"concurrent_requests": 1})
    body = {**CHAT, "max_tokens": 200, "temperature": 0, "stream": True}
    with httpx.stream(
        "POST", manager.url + "/v1/chat/completions", json=body, headers=bearer(key), timeout=60
    ) as streaming:
        assert streaming.status_code == 200
        lines = streaming.iter_lines()
        next(line for line in lines if line.startswith("data: "))  # it is generating
        second = post_chat(manager, key, {**CHAT, "max_tokens": 2})
        assert second.status_code == 429
        assert second.json()["error"]["type"] == "concurrent_requests"
        for _ in lines:
            pass
    after = post_chat(manager, key, {**CHAT, "max_tokens": 2})
    assert after.status_code == 200


def test_usage_survives_a_restart_and_health_names_the_store(shared_pool: Manager) -> None:
    manager = shared_pool
    key = make_key(manager, "durable", limits={})
    for _ in range(2):
        reply = post_chat(manager, key, {**CHAT, "max_tokens": 3})
        assert reply.status_code == 200
    wait_for(lambda: usage_of(manager, "key:durable")["requests"] == 2, 10, message="usage")
    before = usage_of(manager, "key:durable")
    health = manager.request("GET", "/health").json()
    database = health["dependencies"]["database"]
    assert database["ok"] is True and health["status"] == "healthy"
    kind = "postgresql" if "DATABASE_URL" in manager.env else "sqlite"
    assert database["store"].startswith(kind)
    assert manager.stop() == 0
    manager.start()
    assert usage_of(manager, "key:durable") == before
    # The key itself survived too.
    again = post_chat(manager, key, {**CHAT, "max_tokens": 2})
    assert again.status_code == 200


def test_poolctl_makes_keys_and_shows_usage(shared_pool: Manager) -> None:
    manager = shared_pool
    env = {**os.environ, "POOL_URL": manager.url, "POOL_ADMIN_KEY": ADMIN_KEY}

    def poolctl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pool_manager.cli", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    made = poolctl("keys", "create", "from-cli", "--requests-per-hour", "5")
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert key.startswith("pool-") and "shown only now" in made.stderr
    listed = poolctl("keys", "list")
    assert "from-cli" in listed.stdout and "5 req/h" in listed.stdout and key not in listed.stdout
    reply = post_chat(manager, key, {**CHAT, "max_tokens": 2})
    assert reply.headers["x-ratelimit-remaining-requests"] == "4"
    wait_for(lambda: usage_of(manager, "key:from-cli")["requests"] == 1, 10, message="usage")
    shown = poolctl("usage", "--caller", "key:from-cli")
    assert shown.returncode == 0, shown.stderr
    row = next(line for line in shown.stdout.splitlines() if line.startswith("key:from-cli"))
    assert row.split()[2] == "1"
    assert poolctl("keys", "delete", "from-cli").returncode == 0
    assert poolctl("keys", "delete", "from-cli").returncode == 1
