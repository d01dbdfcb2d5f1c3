"""`poolctl`, the operators' CLI, run as a real process against real managers."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from model_service.model_files import package_file
from tests.conftest import (
    DEFAULT_MODEL,
    REPO,
    SMOLLM2_FILE,
    Manager,
    ManagerFactory,
    free_port,
    let_go,
    model_entry,
    pid_alive,
    wait_for,
)

CODER = "org/coder:tiny"
HELPER = "helper:1b"
CLIENT_KEY = "client-key-poolctl-41c7"
ADMIN_KEY = "admin-key-poolctl-9e02"
HOT_LINE = re.compile(r"^(\S+) is HOT on (http://127\.0\.0\.1:\d+) \(loaded in \d+\.\d\d s\)$")


def poolctl(
    *args: str,
    manager: Manager | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `python -m pool_manager.cli ARGS` with no keys in its environment but `env`."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("POOL_")}
    if manager is not None:
        base["POOL_URL"] = manager.url
    return subprocess.run(
        [sys.executable, "-m", "pool_manager.cli", *args],
        cwd=cwd or REPO,
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=180,
    )


def ok(*args: str, manager: Manager, **kwargs: Any) -> str:
    """Run poolctl, assert it succeeded quietly, and return its stdout."""
    done = poolctl(*args, manager=manager, **kwargs)
    assert done.returncode == 0, (done.returncode, done.stdout, done.stderr)
    assert done.stderr == "", "nothing on stderr (no spinner without a TTY)"
    return done.stdout


def table_rows(output: str) -> dict[str, list[str]]:
    """A table printed by poolctl, as {first cell: cells}; the header row is checked apart."""
    lines = output.splitlines()
    return {cells[0]: cells for cells in (re.split(r" {3,}", line) for line in lines[1:])}


def test_ps_models_load_extend_unload(start_manager: ManagerFactory) -> None:
    manager = start_manager(
        models=[
            model_entry(DEFAULT_MODEL, warmup=True, tags=["general", "small"]),
            model_entry(CODER, ttl_minutes=10),
            model_entry(HELPER),
        ]
    )
    manager.wait_state(DEFAULT_MODEL, "HOT")

    models = ok("models", manager=manager)
    assert re.split(r" {3,}", models.splitlines()[0]) == [
        "MODEL",
        "STATE",
        "BACKEND",
        "WARMUP",
        "TTL",
        "TAGS",
    ]
    rows = table_rows(models)
    assert rows[DEFAULT_MODEL] == [DEFAULT_MODEL, "HOT", "llama_cpp", "yes", "15m", "general,small"]
    assert rows[CODER] == [CODER, "COLD", "llama_cpp", "no", "10m", "-"]
    as_json = json.loads(ok("models", "--json", manager=manager))
    assert {m["model_id"] for m in as_json["models"]} == {DEFAULT_MODEL, CODER, HELPER}

    ps = ok("ps", manager=manager)
    assert re.split(r" {3,}", ps.splitlines()[0]) == [
        "MODEL",
        "STATE",
        "PORT",
        "TTL LEFT",
        "MEMORY",
        "IN-FLIGHT",
        "LAST USED",
    ]
    rows = table_rows(ps)
    assert set(rows) == {DEFAULT_MODEL}, "ps shows only models holding a worker"
    warm = manager.model(DEFAULT_MODEL)
    assert rows[DEFAULT_MODEL][1:4] == ["HOT", str(warm["port"]), "pinned"]
    assert re.fullmatch(r"\d+(\.\d)? MB", rows[DEFAULT_MODEL][4])
    assert rows[DEFAULT_MODEL][5:] == ["0", "never"]

    # load: one line with the endpoint and the load time; ids with ':' and '/' as they are
    line = ok("load", CODER, manager=manager).strip()
    match = HOT_LINE.match(line)
    assert match and match.group(1) == CODER, line
    loaded = manager.model(CODER)
    assert loaded["state"] == "HOT" and match.group(2) == loaded["endpoint"]
    again = ok("load", CODER, manager=manager).strip()
    assert again == f"{CODER} is HOT on {loaded['endpoint']} (already loaded)"

    reply = httpx.post(
        f"{loaded['endpoint']}/v1/completions",
        json={"model": CODER, "prompt": "Hello", "max_tokens": 2},
        timeout=60,
    )
    assert reply.status_code == 200, reply.text
    rows = table_rows(ok("ps", manager=manager))
    assert set(rows) == {DEFAULT_MODEL, CODER}
    coder = rows[CODER]
    assert coder[1:3] == ["HOT", str(loaded["port"])]
    assert re.fullmatch(r"(9m[0-5]\ds|10m00s)", coder[3]), coder
    assert re.fullmatch(r"(\d+s ago|just now)", coder[6]), coder
    ps_json = json.loads(ok("--json", "ps", manager=manager))
    assert {m["model_id"] for m in ps_json["models"]} == {DEFAULT_MODEL, CODER}

    before = manager.model(CODER)["ttl_remaining_seconds"]
    extended = ok("extend-ttl", CODER, "5", manager=manager).strip()
    assert re.fullmatch(rf"{re.escape(CODER)}: TTL left 1[45]m\d\ds", extended), extended
    assert manager.model(CODER)["ttl_remaining_seconds"] > before + 250

    out = ok("unload", CODER, manager=manager).strip()
    assert out == f"{CODER} unloaded; it is COLD"
    cold = manager.model(CODER)
    assert cold["state"] == "COLD" and cold["pid"] is None
    wait_for(lambda: let_go(manager, CODER, loaded["pid"]), 10, message="the worker to let it go")

    helper = json.loads(ok("load", HELPER, "--json", manager=manager))
    assert helper["state"] == "HOT" and helper["model_id"] == HELPER
    manager.seen_worker_pids.add(helper["pid"])
    out = ok("unload", "--force", HELPER, manager=manager).strip()
    assert out == f"{HELPER} force-unloaded; it is COLD"
    assert manager.model(HELPER)["state"] == "COLD"
    wait_for(lambda: not pid_alive(helper["pid"]), 10, message="killed worker to exit")
    assert set(table_rows(ok("ps", manager=manager))) == {DEFAULT_MODEL}


def test_register_from_flags_and_file_then_rm(
    start_manager: ManagerFactory, tmp_path: Path
) -> None:
    manager = start_manager(models=[model_entry(CODER)])

    out = ok(
        "register",
        "--id",
        "team/smollm2:flags",
        "--package-file",
        SMOLLM2_FILE,
        "--ttl-minutes",
        "7",
        "--n-ctx",
        "512",
        "--warmup",
        manager=manager,
    )
    assert out.strip() == "team/smollm2:flags registered; it is COLD"
    model = manager.model("team/smollm2:flags")
    assert model["state"] == "COLD" and model["ttl_minutes"] == 7
    saved = {m["model_id"]: m for m in json.loads(manager.registry_path.read_text())["models"]}
    entry = saved["team/smollm2:flags"]
    assert entry["n_ctx"] == 512 and entry["warmup"] is True
    assert entry["package_file"] == SMOLLM2_FILE

    # A relative --model-path is taken from poolctl's own working folder.
    gguf = package_file(SMOLLM2_FILE)
    out = ok(
        "register", "--id", "local:1", "--model-path", gguf.name, manager=manager, cwd=gguf.parent
    )
    assert out.strip() == "local:1 registered; it is COLD"
    saved = {m["model_id"]: m for m in json.loads(manager.registry_path.read_text())["models"]}
    assert Path(saved["local:1"]["model_path"]) == gguf.resolve()

    entry_file = tmp_path / "entry.json"
    entry_file.write_text(json.dumps(model_entry("team/smollm2:file", tags=["from-file"])))
    registered = json.loads(ok("register", str(entry_file), "--json", manager=manager))
    assert registered["model_id"] == "team/smollm2:file" and registered["tags"] == ["from-file"]

    dup = poolctl("register", str(entry_file), manager=manager)
    assert dup.returncode == 1 and dup.stdout == ""
    assert dup.stderr.strip() == (
        "poolctl: model 'team/smollm2:file' is already registered; send replace=true to "
        "update it (HTTP 409 conflict); add --replace to update it"
    )
    entry_file.write_text(json.dumps(model_entry("team/smollm2:file", tags=["replaced"])))
    out = ok("register", str(entry_file), "--replace", manager=manager)
    assert out.strip() == "team/smollm2:file registered (replaced); it is COLD"
    assert manager.model("team/smollm2:file")["tags"] == ["replaced"]

    missing = poolctl("register", "--id", "gone:1", "--model-path", "/nope.gguf", manager=manager)
    assert missing.returncode == 1
    assert "model file not found" in missing.stderr and "HTTP 400 invalid_value" in missing.stderr

    manager.load("team/smollm2:file")
    out = ok("rm", "team/smollm2:file", manager=manager)
    assert out.strip() == "team/smollm2:file removed"
    assert "team/smollm2:file" not in manager.models()
    ids = {m["model_id"] for m in json.loads(manager.registry_path.read_text())["models"]}
    assert ids == {CODER, "team/smollm2:flags", "local:1"}
    assert ok("rm", "local:1", "--json", manager=manager).strip().startswith("{")
    gone = poolctl("rm", "local:1", manager=manager)
    assert gone.returncode == 1
    assert gone.stderr == "poolctl: model 'local:1' is not registered (HTTP 404 model_not_found)\n"


def test_config_get_and_set(start_manager: ManagerFactory) -> None:
    manager = start_manager(models=[model_entry(CODER)])

    lines = ok("config", "get", manager=manager).splitlines()
    assert f"port = {manager.port}" in lines
    assert f"port_range.start = {manager.port_range[0]}" in lines
    assert "auto_unload = true" in lines and "log_level = DEBUG" in lines
    assert ok("config", "get", "port_range.end", manager=manager).strip() == str(
        manager.port_range[1]
    )
    assert (
        json.loads(ok("config", "get", "--json", manager=manager))
        == manager.request("GET", "/config").json()
    )
    assert json.loads(ok("--json", "config", "get", "port_range", manager=manager)) == {
        "start": manager.port_range[0],
        "end": manager.port_range[1],
    }

    assert ok("config", "set", "default_ttl_minutes", "20", manager=manager).strip() == (
        "default_ttl_minutes = 20.0"
    )
    assert ok("config", "set", "log_level", "INFO", manager=manager).strip() == "log_level = INFO"
    assert ok("config", "set", "auto_unload", "false", manager=manager).strip() == (
        "auto_unload = false"
    )
    new_end = manager.port_range[1] - 1
    out = ok("config", "set", "port_range.end", str(new_end), manager=manager)
    assert out.strip() == f"port_range.end = {new_end}"
    out = ok("config", "set", "warmup_models", "[]", "--json", manager=manager)
    assert json.loads(out)["warmup_models"] == []

    config = manager.request("GET", "/config").json()
    assert config["default_ttl_minutes"] == 20 and config["log_level"] == "INFO"
    assert config["auto_unload"] is False
    assert config["port_range"] == {"start": manager.port_range[0], "end": new_end}
    on_disk = json.loads(manager.config_path.read_text())
    assert on_disk["default_ttl_minutes"] == 20 and on_disk["port_range"]["end"] == new_end

    bad = poolctl("config", "set", "max_concurrent_models", "0", manager=manager)
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr.startswith("poolctl: max_concurrent_models: Input should be greater")
    assert bad.stderr.strip().endswith("(HTTP 400 invalid_value)")
    unknown = poolctl("config", "get", "no_such_key", manager=manager)
    assert (unknown.returncode, unknown.stderr) == (1, "poolctl: no config key 'no_such_key'\n")
    assert manager.request("GET", "/config").json()["max_concurrent_models"] >= 1


def test_health_and_errors(start_manager: ManagerFactory) -> None:
    manager = start_manager(models=[model_entry(CODER)])

    health = ok("health", manager=manager).splitlines()
    assert health[0] == "status: healthy"
    assert f"url: {manager.url}" in health
    assert "models: 1 registered, 0 holding a worker (1 COLD)" in health
    as_json = json.loads(ok("health", "--json", manager=manager))
    assert as_json["status"] == "healthy" and as_json["total_models"] == 1

    unknown = poolctl("load", "nope:1b", manager=manager)
    assert unknown.returncode == 1 and unknown.stdout == ""
    assert (
        unknown.stderr == "poolctl: model 'nope:1b' is not registered (HTTP 404 model_not_found)\n"
    )
    not_loaded = poolctl("extend-ttl", CODER, "5", manager=manager)
    assert not_loaded.returncode == 1
    assert not_loaded.stderr == (
        f"poolctl: model '{CODER}' is COLD, not loaded (HTTP 409 conflict)\n"
    )

    # --url wins over POOL_URL; a free port means nothing listens there.
    url = f"http://127.0.0.1:{free_port()}"
    for command in (["ps"], ["health"], ["load", CODER], ["config", "set", "a", "1"]):
        down = poolctl("--url", url, *command, manager=manager)
        assert down.returncode == 3, (command, down.stderr)
        assert down.stdout == ""
        assert down.stderr == (
            f"poolctl: cannot reach the pool manager at {url}: connection refused\n"
        )
    down = poolctl("ps", env={"POOL_URL": url})
    assert down.returncode == 3 and url in down.stderr

    for usage in (
        [],
        ["frobnicate"],
        ["load"],
        ["extend-ttl", CODER, "soon"],
        ["register"],
        ["register", "--id", "x:1"],
        ["register", "--id", "x:1", "--model-path", "a", "--package-file", "b"],
        ["config"],
    ):
        bad = poolctl(*usage, manager=manager)
        assert bad.returncode == 2, (usage, bad.stderr)


def test_keys_from_the_environment(start_manager: ManagerFactory) -> None:
    manager = start_manager(
        models=[model_entry(CODER)],
        env={"POOL_API_KEY": CLIENT_KEY, "POOL_ADMIN_KEY": ADMIN_KEY},
    )
    admin = {"POOL_ADMIN_KEY": ADMIN_KEY, "POOL_API_KEY": CLIENT_KEY}

    line = ok("load", CODER, manager=manager, env=admin).strip()
    assert HOT_LINE.match(line), line
    manager.models()  # note the worker's pid for the fixture's clean-up check
    assert CODER in table_rows(ok("ps", manager=manager, env=admin))
    assert CODER in table_rows(ok("ps", manager=manager, env={"POOL_API_KEY": CLIENT_KEY}))

    missing = poolctl("ps", manager=manager)
    assert missing.returncode == 1 and missing.stdout == ""
    assert missing.stderr.count("\n") == 1
    assert missing.stderr.startswith("poolctl: Missing API key")
    assert "(HTTP 401 missing_api_key)" in missing.stderr
    assert "set POOL_ADMIN_KEY" in missing.stderr

    wrong = poolctl("unload", CODER, manager=manager, env={"POOL_ADMIN_KEY": "not-the-key"})
    assert wrong.returncode == 1
    assert wrong.stderr.startswith("poolctl: Invalid API key. (HTTP 401 invalid_api_key)")
    client_only = poolctl("unload", CODER, manager=manager, env={"POOL_API_KEY": CLIENT_KEY})
    assert client_only.returncode == 1
    assert "(HTTP 403 insufficient_permissions)" in client_only.stderr
    for done in (missing, wrong, client_only):
        assert ADMIN_KEY not in done.stdout + done.stderr
        assert CLIENT_KEY not in done.stdout + done.stderr

    assert ok("health", manager=manager).startswith("status: healthy"), "/health needs no key"
    out = ok("unload", CODER, manager=manager, env=admin)
    assert out.strip() == f"{CODER} unloaded; it is COLD"
    config = ok("config", "set", "default_ttl_minutes", "9", manager=manager, env=admin)
    assert config.strip() == "default_ttl_minutes = 9.0"


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "poolctl"
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    for command in ("ps", "models", "load", "unload", "extend-ttl", "register", "rm", "config"):
        assert command in done.stdout
