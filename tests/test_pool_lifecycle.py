"""The manager's control plane with real worker processes: load, unload, TTL, eviction."""

from __future__ import annotations

import concurrent.futures
import os
import signal
from pathlib import Path

import httpx
import openai
import pytest

from pool_manager.launch import PACKAGE_ROOT, manager_command
from tests.conftest import (
    DEFAULT_MODEL,
    ManagerFactory,
    let_go,
    model_entry,
    pid_alive,
    port_is_free,
    wait_for,
)

CODER = "org/coder:tiny"
HELPER = "helper:1b"


def chat(endpoint: str, model: str, text: str = "Hi", max_tokens: int = 4) -> str:
    client = openai.OpenAI(base_url=f"{endpoint}/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": text}], max_tokens=max_tokens
    )
    return reply.choices[0].message.content or ""


def test_warmup_model_is_hot_at_start_and_pinned(start_manager: ManagerFactory) -> None:
    manager = start_manager(models=[model_entry(DEFAULT_MODEL, warmup=True)])
    model = manager.wait_state(DEFAULT_MODEL, "HOT")
    assert model["warmup"] is True
    assert model["port"] == manager.port_range[0], "lowest free port first"
    assert model["endpoint"] == f"http://127.0.0.1:{model['port']}"
    assert pid_alive(model["pid"])
    assert model["ttl_remaining_seconds"] is None, "pinned models never expire"
    assert chat(model["endpoint"], DEFAULT_MODEL)
    health = manager.request("GET", "/health").json()
    assert health["active_models"] == 1 and health["models_by_state"]["HOT"] == 1


def test_busy_port_is_skipped(start_manager: ManagerFactory) -> None:
    import socket

    from tests.conftest import free_port_range

    start, end = free_port_range(3)
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    squatter.bind(("127.0.0.1", start))
    squatter.listen()
    try:
        manager = start_manager(
            config={"port_range": {"start": start, "end": end}},
            models=[model_entry(DEFAULT_MODEL, warmup=True)],
        )
        model = manager.wait_state(DEFAULT_MODEL, "HOT")
        assert model["port"] == start + 1
    finally:
        squatter.close()


def test_load_unload_and_force_unload(start_manager: ManagerFactory) -> None:
    manager = start_manager(models=[model_entry(CODER), model_entry(HELPER)])
    assert manager.model(CODER)["state"] == "COLD"

    loaded = manager.load(CODER)  # ids with ':' and '/' work in the URL
    assert loaded["state"] == "HOT" and loaded["pid"] and loaded["load_seconds"] > 0
    assert chat(loaded["endpoint"], CODER)
    health = manager.request("GET", f"/models/{CODER}/health").json()
    assert health["healthy"] is True and health["worker"]["model"] == CODER

    unloaded = manager.request("POST", f"/models/{CODER}/unload").json()
    assert unloaded["state"] == "COLD" and unloaded["port"] is None
    wait_for(
        lambda: let_go(manager, CODER, loaded["pid"]),
        10,
        message="the worker to exit or wait as a spare",
    )
    assert port_is_free(loaded["port"])

    second = manager.load(HELPER)
    reply = manager.request("POST", f"/models/{HELPER}/unload", json={"force": True})
    assert reply.status_code == 200 and reply.json()["state"] == "COLD"
    wait_for(lambda: not pid_alive(second["pid"]), 10, message="killed worker to exit")

    again = manager.load(CODER)
    assert again["loaded_at"] != loaded["loaded_at"], "loaded anew"
    assert manager.request("POST", f"/models/{CODER}/load").json()["pid"] == again["pid"]


def test_extend_ttl_adds_time_capped_at_max(start_manager: ManagerFactory) -> None:
    manager = start_manager(
        config={"min_ttl_minutes": 0, "default_ttl_minutes": 1, "max_ttl_minutes": 3},
        models=[model_entry(CODER)],
    )
    manager.load(CODER)
    before = manager.model(CODER)["ttl_remaining_seconds"]
    assert 40 < before <= 60
    extended = manager.request("POST", f"/models/{CODER}/extend-ttl", json={"minutes": 1})
    assert extended.status_code == 200
    assert before + 50 < extended.json()["ttl_remaining_seconds"] <= before + 60
    capped = manager.request("POST", f"/models/{CODER}/extend-ttl", json={"minutes": 30}).json()
    assert 170 < capped["ttl_remaining_seconds"] <= 180

    bad = manager.request("POST", f"/models/{CODER}/extend-ttl", json={"minutes": -5})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "minutes"
    manager.request("POST", f"/models/{CODER}/unload")
    cold = manager.request("POST", f"/models/{CODER}/extend-ttl", json={"minutes": 1})
    assert cold.status_code == 409 and cold.json()["error"]["code"] == "conflict"


def test_ttl_walks_hot_cooling_cold_and_frees_process_and_port(
    start_manager: ManagerFactory,
) -> None:
    manager = start_manager(
        config={"min_ttl_minutes": 0, "grace_period_seconds": 1.0, "check_interval_seconds": 0.5},
        models=[model_entry(CODER, ttl_minutes=0.03)],  # 1.8 s
    )
    loaded = manager.load(CODER)
    assert chat(loaded["endpoint"], CODER)
    cooling = manager.wait_state(CODER, "COOLING", timeout=20)
    assert cooling["pid"] == loaded["pid"], "still serving while cooling"
    cold = manager.wait_state(CODER, "COLD", timeout=20)
    assert cold["pid"] is None and cold["port"] is None
    wait_for(
        lambda: let_go(manager, CODER, loaded["pid"]),
        10,
        message="the expired worker to exit or wait as a spare",
    )
    assert port_is_free(loaded["port"])
    metrics = manager.request("GET", "/metrics").text
    assert f'pool_model_unloads_total{{model="{CODER}",reason="ttl"}} 1.0' in metrics


def test_request_during_cooling_returns_model_to_hot(start_manager: ManagerFactory) -> None:
    manager = start_manager(
        config={"min_ttl_minutes": 0, "grace_period_seconds": 60, "check_interval_seconds": 0.5},
        models=[model_entry(CODER, ttl_minutes=0.02)],  # 1.2 s
    )
    loaded = manager.load(CODER)
    manager.wait_state(CODER, "COOLING", timeout=20)
    assert chat(loaded["endpoint"], CODER)  # straight to the worker port
    hot = manager.wait_state(CODER, "HOT", timeout=30)
    assert hot["pid"] == loaded["pid"]
    assert hot["ttl_remaining_seconds"] > 0


def test_direct_worker_request_resets_ttl(start_manager: ManagerFactory) -> None:
    manager = start_manager(
        config={"min_ttl_minutes": 0, "grace_period_seconds": 60},
        models=[model_entry(CODER, ttl_minutes=0.25)],  # 15 s
    )
    loaded = manager.load(CODER)
    wait_for(
        lambda: manager.model(CODER)["ttl_remaining_seconds"] < 13.5,
        10,
        message="some TTL to run down",
    )
    chat(loaded["endpoint"], CODER)
    model = manager.model(CODER)
    assert model["ttl_remaining_seconds"] > 14.0, "TTL resets to the full TTL after a request"
    assert model["requests_total"] == 1 and model["last_used"] is not None


def test_lru_eviction_spares_warmup_and_recently_used(start_manager: ManagerFactory) -> None:
    manager = start_manager(
        config={"max_concurrent_models": 3},
        models=[
            model_entry(DEFAULT_MODEL, warmup=True),
            model_entry("a:1"),
            model_entry("b:1"),
            model_entry("c:1"),
        ],
    )
    manager.wait_state(DEFAULT_MODEL, "HOT")
    a = manager.load("a:1")
    b = manager.load("b:1")
    chat(a["endpoint"], "a:1")  # a is now more recently used than b
    manager.load("c:1")
    models = manager.models()
    assert models["b:1"]["state"] == "COLD", "the least recently used idle model goes"
    assert models["a:1"]["state"] == "HOT"
    assert models[DEFAULT_MODEL]["state"] == "HOT", "warmup models are never evicted"
    wait_for(lambda: let_go(manager, "b:1", b["pid"]), 10, message="the evicted worker let b go")
    metrics = manager.request("GET", "/metrics").text
    assert 'pool_model_evictions_total{model="b:1",reason="slots"} 1.0' in metrics


def test_pool_full_of_pinned_models_answers_503(start_manager: ManagerFactory) -> None:
    manager = start_manager(
        config={"max_concurrent_models": 1},
        models=[model_entry(DEFAULT_MODEL, warmup=True), model_entry(CODER)],
    )
    manager.wait_state(DEFAULT_MODEL, "HOT")
    reply = manager.request("POST", f"/models/{CODER}/load")
    assert reply.status_code == 503
    assert reply.json()["error"]["code"] == "pool_full"
    assert int(reply.headers["Retry-After"]) > 0
    assert manager.model(CODER)["state"] == "COLD"


def test_concurrent_loads_share_one_process(start_manager: ManagerFactory) -> None:
    manager = start_manager(models=[model_entry(CODER)])
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        views = list(pool.map(lambda _: manager.load(CODER), range(4)))
    assert len({v["pid"] for v in views}) == 1
    metrics = manager.request("GET", "/metrics").text
    assert f'pool_model_loads_total{{model="{CODER}",result="ok"}} 1.0' in metrics


def test_killed_worker_is_noticed_and_reloads(start_manager: ManagerFactory) -> None:
    manager = start_manager(models=[model_entry(CODER)])
    loaded = manager.load(CODER)
    os.kill(loaded["pid"], signal.SIGKILL)
    cold = manager.wait_state(CODER, "COLD", timeout=10)  # noticed at once (waitpid)
    assert cold["port"] is None and cold["crashes"] == 1
    assert "exited unexpectedly" in cold["last_error"]
    assert port_is_free(loaded["port"])
    again = manager.load(CODER)
    assert again["pid"] != loaded["pid"]
    assert chat(again["endpoint"], CODER)
    metrics = manager.request("GET", "/metrics").text
    assert f'pool_worker_crashes_total{{model="{CODER}"}} 1.0' in metrics


def test_killed_warmup_worker_comes_back(start_manager: ManagerFactory) -> None:
    manager = start_manager(models=[model_entry(DEFAULT_MODEL, warmup=True)])
    first = manager.wait_state(DEFAULT_MODEL, "HOT")
    os.kill(first["pid"], signal.SIGKILL)
    back = wait_for(
        lambda: (
            (m := manager.model(DEFAULT_MODEL))["state"] == "HOT" and m["pid"] != first["pid"] and m
        ),
        30,
        message="the warmup model to be reloaded",
    )
    manager.seen_worker_pids.add(back["pid"])
    assert chat(back["endpoint"], DEFAULT_MODEL)


def test_sigint_stops_manager_and_every_worker(start_manager: ManagerFactory) -> None:
    manager = start_manager(models=[model_entry(DEFAULT_MODEL, warmup=True), model_entry(CODER)])
    manager.wait_state(DEFAULT_MODEL, "HOT")
    manager.load(CODER)
    pids = [m["pid"] for m in manager.models().values()]
    assert manager.stop(signal.SIGINT) == 0
    wait_for(lambda: not any(pid_alive(p) for p in pids), 10, message="workers to exit")


def test_killed_manager_leaves_no_orphan_workers(start_manager: ManagerFactory) -> None:
    manager = start_manager(models=[model_entry(DEFAULT_MODEL, warmup=True)])
    pid = manager.wait_state(DEFAULT_MODEL, "HOT")["pid"]
    assert manager.process is not None
    manager.process.kill()
    manager.process.wait()
    wait_for(lambda: not pid_alive(pid), 15, message="the orphaned worker to exit")


def test_unknown_model_is_404_in_openai_shape(start_manager: ManagerFactory) -> None:
    manager = start_manager(models=[model_entry(CODER)])
    for method, path, body in [
        ("POST", "/models/nope:1/load", None),
        ("POST", "/models/nope:1/unload", None),
        ("GET", "/models/nope:1/health", None),
        ("DELETE", "/models/nope:1", None),
        ("GET", "/models/nope:1", None),
        ("POST", "/models/nope:1/extend-ttl", {"minutes": 1}),
    ]:
        reply = manager.request(method, path, json=body)
        assert reply.status_code == 404, (method, path, reply.text)
        error = reply.json()["error"]
        assert error["code"] == "model_not_found" and "nope:1" in error["message"]
    assert manager.request("GET", "/no/such/route").status_code == 404


def test_bad_bodies_are_400(start_manager: ManagerFactory) -> None:
    manager = start_manager(models=[model_entry(CODER)])
    cases = [
        ("POST", "/models/register", {"content": b"{not json"}),
        ("POST", "/models/register", {"json": {"model_id": "x"}}),
        ("POST", "/models/register", {"json": {**model_entry("bad id!")}}),
        ("POST", "/models/register", {"json": {**model_entry("x:1"), "n_ctx": "big"}}),
        ("POST", "/models/register", {"json": {**model_entry("x:1"), "surprise": 1}}),
        ("POST", "/models/register", {"json": {**model_entry("x:1"), "flash_attn": "maybe"}}),
        (
            "POST",
            "/models/register",
            {"json": {"model_id": "x:1", "model_path": "/nonexistent/model.gguf"}},
        ),
        ("POST", f"/models/{CODER}/unload", {"json": {"force": "very"}}),
        ("POST", f"/models/{CODER}/extend-ttl", {"json": {}}),
        ("PATCH", "/config", {"json": {"max_concurrent_models": 0}}),
        ("PATCH", "/config", {"json": {"no_such_setting": 1}}),
        ("PATCH", "/config", {"json": [1, 2]}),
    ]
    for method, path, kwargs in cases:
        headers = {"Content-Type": "application/json"}
        reply = manager.request(method, path, headers=headers, **kwargs)
        assert reply.status_code == 400, (path, kwargs, reply.text)
        error = reply.json()["error"]
        assert error["type"] == "invalid_request_error" and error["message"]
    assert manager.request("GET", "/config").json()["max_concurrent_models"] == 5


def test_register_delete_and_config_survive_restart(start_manager: ManagerFactory) -> None:
    manager = start_manager(models=[model_entry(CODER)])
    new_model = model_entry("team/agent:v2", ttl_minutes=7, tags=["x"])
    created = manager.request("POST", "/models/register", json=new_model)
    assert created.status_code == 201 and created.json()["state"] == "COLD"
    duplicate = manager.request("POST", "/models/register", json=new_model)
    assert duplicate.status_code == 409
    replaced = manager.request(
        "POST",
        "/models/register",
        params={"replace": "true"},
        json={**new_model, "ttl_minutes": 9},
    )
    assert replaced.status_code == 201 and replaced.json()["ttl_minutes"] == 9
    patched = manager.request("PATCH", "/config", json={"max_concurrent_models": 7})
    assert patched.status_code == 200 and patched.json()["max_concurrent_models"] == 7
    loaded = manager.load(CODER)
    assert manager.request("DELETE", f"/models/{CODER}").status_code == 200
    wait_for(lambda: not pid_alive(loaded["pid"]), 10, message="deleted model's worker to exit")

    assert manager.stop() == 0
    manager.start()
    models = manager.models()
    assert set(models) == {"team/agent:v2"}
    assert models["team/agent:v2"]["ttl_minutes"] == 9
    assert models["team/agent:v2"]["tags"] == ["x"]
    assert manager.request("GET", "/config").json()["max_concurrent_models"] == 7
    leftovers = list(manager.folder.glob(".*.tmp"))
    assert not leftovers, f"temporary files left behind: {leftovers}"


def test_manager_metrics_expose_states(start_manager: ManagerFactory) -> None:
    manager = start_manager(models=[model_entry(DEFAULT_MODEL, warmup=True), model_entry(CODER)])
    manager.wait_state(DEFAULT_MODEL, "HOT")
    text = httpx.get(f"{manager.url}/metrics").text
    assert 'pool_models{state="HOT"} 1.0' in text
    assert 'pool_models{state="COLD"} 1.0' in text
    assert f'pool_model_state{{model="{CODER}",state="COLD"}} 1.0' in text
    assert f'pool_model_memory_rss_bytes{{model="{DEFAULT_MODEL}"}}' in text
    assert "pool_model_load_duration_seconds_bucket" in text


def test_unload_drains_a_stream_in_progress(start_manager: ManagerFactory) -> None:
    # A drain waits up to graceful_shutdown_seconds; give this one plenty.
    manager = start_manager(
        config={"graceful_shutdown_seconds": 60},
        models=[model_entry(CODER, timeout_seconds=120)],
    )
    loaded = manager.load(CODER)
    body = {
        "model": CODER,
        "messages": [{"role": "user", "content": "Tell a long story."}],
        "max_tokens": 300,
        "temperature": 0,
        "stream": True,
    }
    lines: list[str] = []
    with httpx.stream(
        "POST", f"{loaded['endpoint']}/v1/chat/completions", json=body, timeout=60
    ) as reply:
        stream = reply.iter_lines()
        while len([line for line in lines if line]) < 3:
            lines.append(next(stream))
        wait_for(lambda: manager.model(CODER)["in_flight"] == 1, 30, message="in-flight count")
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            unloading = pool.submit(manager.request, "POST", f"/models/{CODER}/unload")
            manager.wait_state(CODER, "UNLOADING", timeout=30)
            late = {**body, "stream": False, "max_tokens": 1}

            def refused() -> httpx.Response | None:
                reply = httpx.post(f"{loaded['endpoint']}/v1/chat/completions", json=late)
                return reply if reply.status_code == 503 else None

            late_reply = wait_for(refused, 30, message="a request during UNLOADING to get 503")
            assert late_reply.headers["Retry-After"] == "1"
            assert late_reply.json()["error"]["code"] == "model_unloading"
            lines.extend(stream)  # the rest of the stream still arrives
            assert unloading.result(timeout=30).json()["state"] == "COLD"
    events = [line for line in lines if line]
    assert events[-1] == "data: [DONE]"
    assert '"finish_reason":"length"' in events[-2]
    assert len(events) >= 300, "every token of the drained request was delivered"


def test_force_unload_ends_a_stream_with_an_error_not_a_hang(
    start_manager: ManagerFactory,
) -> None:
    # One slot: the second request waits in the queue (with a slot of its own, its five
    # tokens could finish before the unload, and the test would race).
    manager = start_manager(models=[model_entry(CODER, max_concurrent=1)])
    loaded = manager.load(CODER)
    client = openai.OpenAI(
        base_url=f"{loaded['endpoint']}/v1", api_key="unused", max_retries=0, timeout=30
    )
    stream = client.chat.completions.create(
        model=CODER,
        messages=[{"role": "user", "content": "Tell a very long story."}],
        max_tokens=900,
        stream=True,
    )
    next(iter(stream))
    waiting = {"model": CODER, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        queued = pool.submit(
            httpx.post, f"{loaded['endpoint']}/v1/chat/completions", json=waiting, timeout=30
        )
        wait_for(lambda: manager.model(CODER)["in_flight"] == 2, 10, message="2 in flight")
        reply = manager.request("POST", f"/models/{CODER}/unload", json={"force": True})
        assert reply.json()["state"] == "COLD"
        refused = queued.result(timeout=30)
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "model_unloaded"
    with pytest.raises(openai.APIError) as ended:
        for _ in stream:
            pass
    assert "force-unloaded" in str(ended.value), "the stream ends with an error event saying why"


def test_taken_manager_port_fails_fast_and_starts_nothing(start_manager: ManagerFactory) -> None:
    import subprocess

    manager = start_manager(models=[model_entry(DEFAULT_MODEL, warmup=True)])
    manager.wait_state(DEFAULT_MODEL, "HOT")
    second = subprocess.run(
        manager_command(manager.config_path, manager.registry_path),
        cwd=PACKAGE_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode == 3
    assert f"cannot listen on 127.0.0.1:{manager.port}" in second.stderr
    assert "worker ready" not in second.stderr, "no worker may start for a doomed manager"


def test_command_line_overrides_are_not_saved_by_patch(start_manager: ManagerFactory) -> None:
    import json

    from tests.conftest import free_port

    manager = start_manager(models=[model_entry(CODER)])
    saved_port = manager.port
    assert manager.stop() == 0
    manager.port = free_port()
    manager.env["POOL_PORT"] = str(manager.port)
    manager.start()
    assert manager.request("GET", "/config").json()["port"] == manager.port
    assert manager.request("PATCH", "/config", json={"grace_period_seconds": 5}).status_code == 200
    on_disk = json.loads(manager.config_path.read_text())
    assert on_disk["port"] == saved_port and on_disk["grace_period_seconds"] == 5


def test_corrupt_model_file_fails_then_failed_state_then_reset(
    start_manager: ManagerFactory, tmp_path: Path
) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\x00" * 64)
    manager = start_manager(
        config={"max_load_failures": 2, "failure_cooldown_seconds": 600},
        models=[{"model_id": "broken:1", "model_path": str(broken)}],
    )
    first = manager.request("POST", "/models/broken:1/load")
    assert first.status_code == 503
    assert first.json()["error"]["code"] == "model_load_failed"
    assert "broken.gguf" in first.json()["error"]["message"]
    assert manager.model("broken:1")["state"] == "COLD"
    assert manager.request("POST", "/models/broken:1/load").status_code == 503
    failed = manager.model("broken:1")
    assert failed["state"] == "FAILED" and failed["failures"] == 2
    assert failed["retry_after_seconds"] > 500 and "broken.gguf" in failed["last_error"]
    refused = manager.request("POST", "/models/broken:1/load")
    assert refused.status_code == 503 and int(refused.headers["Retry-After"]) > 500
    reset = manager.request("POST", "/models/broken:1/unload").json()
    assert reset["state"] == "COLD" and reset["failures"] == 0
    assert manager.request("GET", "/health").status_code == 200, "the manager survives"


def test_extension_survives_the_next_request(start_manager: ManagerFactory) -> None:
    manager = start_manager(
        config={"min_ttl_minutes": 0, "max_ttl_minutes": 10}, models=[model_entry(CODER)]
    )
    loaded = manager.load(CODER)
    extended = manager.request("POST", f"/models/{CODER}/extend-ttl", json={"minutes": 5})
    assert extended.json()["ttl_remaining_seconds"] > 500
    chat(loaded["endpoint"], CODER)
    assert manager.model(CODER)["ttl_remaining_seconds"] > 500


def test_transient_load_failures_are_retried_then_failed(start_manager: ManagerFactory) -> None:
    # No spares: each try starts a process, whose imports alone take far over 50 ms (a
    # spare with the weights loaded ahead can serve within 50 ms).
    manager = start_manager(
        config={"load_timeout_seconds": 0.05, "max_load_failures": 3, "spare_workers": 0},
        models=[model_entry(CODER)],
    )
    reply = manager.request("POST", f"/models/{CODER}/load")
    assert reply.status_code == 503
    assert "not ready after" in reply.json()["error"]["message"]
    assert int(reply.headers["Retry-After"]) > 0
    model = manager.model(CODER)
    assert model["state"] == "FAILED" and model["failures"] == 3, "three tries in one call"
    metrics = manager.request("GET", "/metrics").text
    assert f'pool_model_loads_total{{model="{CODER}",result="failed"}} 3.0' in metrics


def test_crash_loop_backs_off_to_failed_then_recovers(start_manager: ManagerFactory) -> None:
    manager = start_manager(
        config={"max_load_failures": 2, "failure_cooldown_seconds": 2},
        models=[model_entry(DEFAULT_MODEL, warmup=True)],
    )
    first = manager.wait_state(DEFAULT_MODEL, "HOT")
    os.kill(first["pid"], signal.SIGKILL)
    second = wait_for(
        lambda: (
            (m := manager.model(DEFAULT_MODEL))["state"] == "HOT" and m["pid"] != first["pid"] and m
        ),
        30,
        message="the first automatic reload",
    )
    os.kill(second["pid"], signal.SIGKILL)
    failed = manager.wait_state(DEFAULT_MODEL, "FAILED", timeout=30)
    assert failed["crashes"] == 2 and failed["retry_after_seconds"] <= 2
    back = manager.wait_state(DEFAULT_MODEL, "HOT", timeout=30)  # after the cooldown
    manager.seen_worker_pids.add(back["pid"])
    assert back["pid"] not in (first["pid"], second["pid"])
    assert chat(back["endpoint"], DEFAULT_MODEL)


def test_registry_edits_are_picked_up_without_dropping_loaded_models(
    start_manager: ManagerFactory,
) -> None:
    import json

    manager = start_manager(models=[model_entry(DEFAULT_MODEL, warmup=True), model_entry(CODER)])
    hot = manager.wait_state(DEFAULT_MODEL, "HOT")
    coder = manager.load(CODER)
    registry = json.loads(manager.registry_path.read_text())
    registry["models"] = [m for m in registry["models"] if m["model_id"] != CODER]
    registry["models"].append(model_entry("fresh:1", tags=["new"]))
    registry["models"][0]["ttl_minutes"] = 7
    manager.registry_path.write_text(json.dumps(registry))
    # A model removed from the file is drained, unloaded and forgotten.
    models = wait_for(
        lambda: "fresh:1" in (m := manager.models()) and CODER not in m and m,
        30,
        message="the edit to be applied",
    )
    wait_for(lambda: not pid_alive(coder["pid"]), 15, message="the removed model's worker")
    assert models[DEFAULT_MODEL]["pid"] == hot["pid"], "models that stay keep their worker"
    assert models["fresh:1"]["state"] == "COLD" and models["fresh:1"]["tags"] == ["new"]

    manager.registry_path.write_text("{ this is not json")
    manager.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
    health = wait_for(
        lambda: (h := manager.request("GET", "/health").json())["last_reload_error"] and h,
        15,
        message="the bad edit to be refused",
    )
    assert "not valid JSON" in health["last_reload_error"]
    assert set(manager.models()) == {DEFAULT_MODEL, "fresh:1"}, "the running registry stays"
    reply = manager.request("POST", "/reload")
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "invalid_config"


def test_models_removed_together_drain_together(start_manager: ManagerFactory) -> None:
    import json

    manager = start_manager(
        config={"graceful_shutdown_seconds": 60},
        models=[model_entry("a:1"), model_entry("b:1")],
    )
    endpoints = {m: manager.load(m)["endpoint"] for m in ("a:1", "b:1")}

    def long_stream(model_id: str) -> int:
        client = openai.OpenAI(base_url=f"{endpoints[model_id]}/v1", api_key="x", max_retries=0)
        stream = client.chat.completions.create(
            model=model_id,
            messages=[{"role": "user", "content": "Tell a very long story."}],
            max_tokens=120,
            temperature=0.9,
            stream=True,
        )
        return sum(1 for chunk in stream if chunk.choices and chunk.choices[0].delta.content)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        running = [pool.submit(long_stream, m) for m in endpoints]
        wait_for(
            lambda: all(manager.model(m)["in_flight"] for m in endpoints), 30, message="streams"
        )
        manager.registry_path.write_text(json.dumps({"models": []}))
        manager.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        # Both drain at once: each is UNLOADING while the other's stream still runs.
        wait_for(
            lambda: [m["state"] for m in manager.models().values()] == ["UNLOADING"] * 2,
            30,
            message="both models draining at the same time",
        )
        assert all(f.result(timeout=120) > 0 for f in running), "the drains let both finish"
    wait_for(lambda: not manager.models(), 30, message="both models forgotten")
