"""The unified OpenAI endpoint on the manager's port, with the official `openai` client."""

from __future__ import annotations

import concurrent.futures
import os
import re
import signal
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import DEFAULT_MODEL, ManagerFactory, model_entry, wait_for

COLD = "team/cold:1"


def client_for(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_cold_model_loads_on_demand_and_streams_through(start_manager: ManagerFactory) -> None:
    manager = start_manager(models=[model_entry(COLD, aliases=["coldie"])])
    assert manager.model(COLD)["state"] == "COLD"
    client = client_for(manager.url)
    reply = client.chat.completions.create(
        model=COLD, messages=[{"role": "user", "content": "Say hi"}], max_tokens=6
    )
    assert reply.model == COLD and reply.choices[0].message.content
    assert manager.model(COLD)["state"] == "HOT"
    pieces = [
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model="coldie",
            messages=[{"role": "user", "content": "Count"}],
            max_tokens=8,
            stream=True,
        )
        if c.choices
    ]
    assert "".join(pieces).strip(), "streaming works through the manager, by alias too"
    completion = client.completions.create(model=COLD, prompt="The sky is", max_tokens=4)
    assert completion.usage is not None and completion.usage.completion_tokens > 0
    raw = httpx.post(
        f"{manager.url}/v1/completions", json={"model": COLD, "prompt": "Hi", "max_tokens": 2}
    )
    assert raw.headers["x-pool-model"] == COLD
    assert manager.model(COLD)["requests_total"] == 4, "requests through the manager count"


def test_the_reply_says_how_long_it_waited_for_its_model(start_manager: ManagerFactory) -> None:
    """Server-Timing's `pool-wait`: the time the pool took to place the model (here the
    load a COLD model needs), apart from the worker's own; near nothing once HOT."""
    manager = start_manager(models=[model_entry(COLD)])
    body = {"model": COLD, "prompt": "Hi", "max_tokens": 2}
    loading = httpx.post(f"{manager.url}/v1/completions", json=body, timeout=120)
    hot = httpx.post(f"{manager.url}/v1/completions", json=body, timeout=120)
    waits = [pool_wait(r.headers["server-timing"]) for r in (loading, hot)]
    assert waits[0] > 10 * waits[1], f"a load ({waits[0]} s) against none ({waits[1]} s)"
    assert waits[0] < 120


def pool_wait(server_timing: str) -> float:
    """Seconds from `pool-wait;dur=<ms>`, the reply's Server-Timing metric."""
    match = re.fullmatch(r"pool-wait;dur=([0-9.]+)", server_timing)
    assert match is not None, server_timing
    return float(match.group(1)) / 1000


def test_concurrent_first_requests_share_one_load(start_manager: ManagerFactory) -> None:
    manager = start_manager(models=[model_entry(COLD)])
    client = client_for(manager.url)

    def ask(i: int) -> str:
        reply = client.completions.create(model=COLD, prompt=f"{i}:", max_tokens=3)
        return reply.choices[0].text

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(ask, range(4)))
    metrics = manager.request("GET", "/metrics").text
    assert f'pool_model_loads_total{{model="{COLD}",result="ok"}} 1.0' in metrics


def test_models_list_has_both_shapes(start_manager: ManagerFactory) -> None:
    manager = start_manager(models=[model_entry(DEFAULT_MODEL, warmup=True), model_entry(COLD)])
    manager.wait_state(DEFAULT_MODEL, "HOT")
    ids = {m.id for m in client_for(manager.url).models.list().data}
    assert ids == {DEFAULT_MODEL, COLD}
    body = httpx.get(f"{manager.url}/v1/models").json()
    states = {m["id"]: m["loaded"] for m in body["models"]}
    assert states == {DEFAULT_MODEL: True, COLD: False}


def test_gateway_errors_are_openai_errors(start_manager: ManagerFactory) -> None:
    manager = start_manager(
        config={"max_concurrent_models": 1},
        models=[model_entry(DEFAULT_MODEL, warmup=True), model_entry(COLD)],
    )
    manager.wait_state(DEFAULT_MODEL, "HOT")
    client = client_for(manager.url)
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert missing.value.body["code"] == "model_not_found"  # type: ignore[index]
    with pytest.raises(openai.InternalServerError) as full:
        client.chat.completions.create(model=COLD, messages=[{"role": "user", "content": "x"}])
    assert full.value.status_code == 503
    assert full.value.response.headers["Retry-After"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=DEFAULT_MODEL, messages=[], max_tokens=2)
    bad = httpx.post(
        f"{manager.url}/v1/chat/completions",
        content=b"{nope",
        headers={"Content-Type": "application/json"},
    )
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"


def test_disconnect_through_the_manager_stops_generation(start_manager: ManagerFactory) -> None:
    manager = start_manager(models=[model_entry(COLD, n_ctx=2048)])
    body = {
        "model": COLD,
        "messages": [{"role": "user", "content": "A very long story."}],
        "max_tokens": 1500,
        "stream": True,
    }
    with httpx.stream("POST", f"{manager.url}/v1/chat/completions", json=body, timeout=60) as reply:
        for n, _ in enumerate(reply.iter_lines()):
            if n > 10:
                break
    endpoint = manager.model(COLD)["endpoint"]

    def settled() -> dict[str, object] | None:
        health: dict[str, object] = httpx.get(f"{endpoint}/health").json()
        return health if not health["generating"] and health["in_flight"] == 0 else None

    health = wait_for(settled, 30, message="the abandoned generation to stop")
    assert int(health["tokens_generated"]) < 300  # type: ignore[call-overload]


def test_worker_killed_mid_stream_ends_with_an_error_event(start_manager: ManagerFactory) -> None:
    manager = start_manager(models=[model_entry(COLD, n_ctx=2048)])
    pid = manager.load(COLD)["pid"]
    body = {
        "model": COLD,
        "messages": [{"role": "user", "content": "A very long story."}],
        "max_tokens": 1500,
        "stream": True,
    }
    lines = []
    with httpx.stream("POST", f"{manager.url}/v1/chat/completions", json=body, timeout=60) as reply:
        for line in reply.iter_lines():
            lines.append(line)
            if len(lines) == 6:
                os.kill(pid, signal.SIGKILL)
    events = [line for line in lines if line.startswith("data: ")]
    assert '"code": "worker_failed"' in events[-1], events[-1]
    manager.wait_state(COLD, "COLD", timeout=30)
    again = client_for(manager.url).completions.create(model=COLD, prompt="Hi", max_tokens=2)
    assert again.choices, "the next request reloads the model"


def test_fallback_chain_serves_when_the_model_cannot_load(
    start_manager: ManagerFactory, tmp_path: Path
) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 40)
    manager = start_manager(
        config={"max_load_failures": 1, "failure_cooldown_seconds": 600},
        models=[
            {
                "model_id": "primary:1",
                "model_path": str(broken),
                "fallbacks": ["missing:1", "backup:1"],
            },
            model_entry("backup:1"),
        ],
    )
    client = client_for(manager.url)
    for _ in range(2):  # first a load failure, then the FAILED state: both fall back
        raw = client.chat.completions.with_raw_response.create(
            model="primary:1", messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
        reply = raw.parse()
        assert reply.model == "backup:1"
        assert raw.headers["x-pool-model"] == "backup:1"
        assert raw.headers["x-pool-fallback-from"] == "primary:1"
    assert manager.model("primary:1")["state"] == "FAILED"
    metrics = manager.request("GET", "/metrics").text
    assert (
        'pool_fallbacks_total{fallback="backup:1",model="primary:1",reason="load_failed"} 2.0'
        in metrics
    )


def test_exhausted_fallback_chain_returns_the_last_error(
    start_manager: ManagerFactory, tmp_path: Path
) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a model")
    manager = start_manager(
        models=[
            {"model_id": "a:1", "model_path": str(broken), "fallbacks": ["b:1"]},
            {"model_id": "b:1", "model_path": str(broken)},
        ],
    )
    reply = httpx.post(
        f"{manager.url}/v1/chat/completions",
        timeout=60,
        json={"model": "a:1", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert reply.status_code == 503
    assert "'b:1' failed to load" in reply.json()["error"]["message"]
