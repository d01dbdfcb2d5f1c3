"""Prometheus metrics on the manager and on a worker, checked by promtool."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.conftest import DEFAULT_MODEL, ManagerFactory, model_entry, wait_for

PROMTOOL = shutil.which("promtool")


def promtool_problems(text: str) -> str:
    assert PROMTOOL is not None
    checked = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    return "" if checked.returncode == 0 else checked.stdout + checked.stderr


def test_metrics_cover_the_pool_and_the_requests(start_manager: ManagerFactory) -> None:
    manager = start_manager(models=[model_entry(DEFAULT_MODEL, warmup=True)])
    endpoint = manager.wait_state(DEFAULT_MODEL, "HOT")["endpoint"]
    body = {
        "model": DEFAULT_MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
    }
    assert httpx.post(f"{manager.url}/v1/chat/completions", json=body, timeout=60).is_success
    assert (
        httpx.post(
            f"{manager.url}/v1/chat/completions", json={**body, "n": 9}, timeout=60
        ).status_code
        == 400
    )
    manager_text = httpx.get(f"{manager.url}/metrics").text
    for name in (
        "pool_models",
        "pool_model_state",
        "pool_model_loads_total",
        "pool_model_load_duration_seconds_bucket",
        "pool_model_requests_total",
        "pool_model_in_flight_requests",
        "pool_model_memory_rss_bytes",
        "pool_gateway_requests_total",
        "pool_gateway_response_seconds_bucket",
    ):
        assert f"\n{name}" in manager_text, name
    assert f'pool_gateway_requests_total{{model="{DEFAULT_MODEL}",status="400"}} 1.0' in (
        manager_text
    )
    worker_text = httpx.get(f"{endpoint}/metrics").text
    for name in (
        "pool_worker_requests_total",
        "pool_worker_prompt_tokens_total",
        "pool_worker_completion_tokens_total",
        "pool_worker_cached_prompt_tokens_total",
        "pool_worker_time_to_first_token_seconds_bucket",
        "pool_worker_queue_depth",
        "pool_worker_active_sequences",
        "pool_worker_generation_seconds_bucket",
    ):
        assert f"\n{name}" in worker_text, name
    assert (
        f'pool_worker_requests_total{{model="{DEFAULT_MODEL}",route="/v1/chat/completions",'
        'status="200"} 1.0' in worker_text
    )


@pytest.mark.skipif(PROMTOOL is None, reason="promtool (Debian package prometheus) missing")
def test_promtool_accepts_both_exporters(start_manager: ManagerFactory) -> None:
    manager = start_manager(models=[model_entry(DEFAULT_MODEL, warmup=True)])
    endpoint = manager.wait_state(DEFAULT_MODEL, "HOT")["endpoint"]
    httpx.post(
        f"{endpoint}/v1/completions",
        timeout=60,
        json={"model": DEFAULT_MODEL, "prompt": "Hi", "max_tokens": 2},
    )
    assert promtool_problems(httpx.get(f"{manager.url}/metrics").text) == ""
    assert promtool_problems(httpx.get(f"{endpoint}/metrics").text) == ""


def test_request_id_follows_a_request_from_manager_to_worker(
    start_manager: ManagerFactory,
) -> None:
    manager = start_manager(models=[model_entry(DEFAULT_MODEL, warmup=True)])
    manager.wait_state(DEFAULT_MODEL, "HOT")
    body = {
        "model": DEFAULT_MODEL,
        "messages": [{"role": "user", "content": "secret words"}],
        "max_tokens": 2,
    }
    reply = httpx.post(
        f"{manager.url}/v1/chat/completions",
        json=body,
        timeout=60,
        headers={"X-Request-ID": "trace-42"},
    )
    assert reply.headers["x-request-id"] == "trace-42"
    generated = httpx.post(f"{manager.url}/v1/chat/completions", json=body, timeout=60)
    assert len(generated.headers["x-request-id"]) == 32
    lines = [json.loads(line) for line in manager.log().splitlines() if line.startswith("{")]
    tagged = [line for line in lines if line.get("request_id") == "trace-42"]
    assert {line["component"] for line in tagged} == {"manager", "worker"}
    assert any(line["msg"] == "request" and line["status"] == 200 for line in tagged)
    assert "secret words" not in manager.log(), "prompts are not logged"


def test_logs_go_to_rotating_files_when_asked(
    start_manager: ManagerFactory, tmp_path: Path
) -> None:
    log_file = tmp_path / "logs" / "pool.log"
    manager = start_manager(models=[model_entry("m:1")], env={"POOL_LOG_FILE": str(log_file)})
    manager.load("m:1")
    wait_for(
        lambda: log_file.exists() and "model loaded" in log_file.read_text(),
        10,
        message="the manager's log file",
    )
    worker_log = log_file.with_name("pool-m_1.log")
    wait_for(
        lambda: worker_log.exists() and "worker ready" in worker_log.read_text(),
        10,
        message="the worker's log file",
    )
    assert all(json.loads(line) for line in log_file.read_text().splitlines())


def test_grafana_dashboard_and_scrape_config_use_real_metrics(
    start_manager: ManagerFactory,
) -> None:
    import re

    from tests.conftest import REPO

    manager = start_manager(models=[model_entry(DEFAULT_MODEL, warmup=True)])
    endpoint = manager.wait_state(DEFAULT_MODEL, "HOT")["endpoint"]
    httpx.post(
        f"{endpoint}/v1/completions",
        timeout=60,
        json={"model": DEFAULT_MODEL, "prompt": "Hi", "max_tokens": 2},
    )
    targets = httpx.get(f"{manager.url}/metrics/targets").json()
    assert targets == [
        {"targets": [endpoint.removeprefix("http://")], "labels": {"model": DEFAULT_MODEL}}
    ]
    exposed = httpx.get(f"{manager.url}/metrics").text + httpx.get(f"{endpoint}/metrics").text
    dashboard = json.loads((REPO / "docs" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    names = {name for expr in exprs for name in re.findall(r"\bpool_[a-z_]+", expr)}
    missing = sorted(
        n
        for n in names
        if f"# TYPE {n.removesuffix('_bucket')}" not in exposed and f"\n{n}" not in exposed
    )
    assert not missing, f"the dashboard queries metrics nobody exports: {missing}"
    assert "/metrics/targets" in (REPO / "docs" / "prometheus.yml").read_text()
