"""The Ollama-compatible routes (`/api/...`) on the manager's port, with the official client."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import httpx
import ollama
import pytest

from model_service.model_files import package_file
from tests.conftest import (
    DEFAULT_MODEL,
    SMOLLM2_FILE,
    Manager,
    ManagerFactory,
    model_entry,
    wait_for,
)

COLD = "team/cold:1"
UNTAGGED = "tiny"  # Ollama clients may call it "tiny:latest"
SHORT = {"num_predict": 8, "temperature": 0, "seed": 1}
HELLO = [{"role": "user", "content": "Say hello"}]


def entry(model_id: str, **overrides: object) -> dict[str, object]:
    """A registry entry with room for a slow, shared test machine."""
    return model_entry(model_id, **{"timeout_seconds": 120, **overrides})


HOT_DEFAULT = [entry(DEFAULT_MODEL, warmup=True)]


def client_for(manager: Manager) -> ollama.Client:
    return ollama.Client(host=manager.url, timeout=120)


def ndjson(reply: httpx.Response) -> list[dict[str, object]]:
    assert reply.headers["content-type"].startswith("application/x-ndjson"), reply.text
    return [json.loads(line) for line in reply.text.splitlines() if line]


def test_version_list_ps_and_show(start_manager: ManagerFactory) -> None:
    manager = start_manager(
        models=[entry(DEFAULT_MODEL, warmup=True), entry(COLD), entry(UNTAGGED)]
    )
    manager.wait_state(DEFAULT_MODEL, "HOT")
    client = client_for(manager)
    assert httpx.get(f"{manager.url}/api/version").json()["version"]

    listed = {m.model: m for m in client.list().models}
    assert set(listed) == {DEFAULT_MODEL, COLD, UNTAGGED}
    model = listed[COLD]
    assert model.size == package_file(SMOLLM2_FILE).stat().st_size
    assert model.digest and len(model.digest) == 64 and model.modified_at
    assert model.details is not None
    assert model.details.format == "gguf" and model.details.family == "llama"
    assert model.details.parameter_size == "135M"
    assert model.details.quantization_level == "Q4_1"

    now = dt.datetime.now(dt.UTC)
    running = client.ps().models
    assert [m.model for m in running] == [DEFAULT_MODEL], "only loaded models"
    assert running[0].size and running[0].size > 50 * 2**20, "the worker's memory"
    assert running[0].size_vram is not None and running[0].context_length == 1024
    assert running[0].expires_at and running[0].expires_at > now + dt.timedelta(days=365), (
        "a warmup model never expires"
    )

    shown = client.show(DEFAULT_MODEL)
    assert shown.details and shown.details.quantization_level == "Q4_1"
    assert shown.template and "<|im_start|>" in shown.template
    assert shown.modelinfo and shown.modelinfo["general.architecture"] == "llama"
    assert shown.capabilities == ["completion", "tools"]
    assert shown.parameters and "num_ctx 1024" in shown.parameters
    assert client.show(f"{UNTAGGED}:latest").details, "':latest' names an untagged model"

    # An empty generate loads the model (Ollama's way to preload one).
    loaded = client.generate(model=COLD)
    assert loaded.done and loaded.done_reason == "load" and loaded.response == ""
    assert manager.model(COLD)["state"] == "HOT"
    expires = {m.model: m.expires_at for m in client.ps().models}[COLD]
    ttl_and_grace = dt.timedelta(minutes=15, seconds=120)  # the default TTL and grace period
    assert expires is not None
    assert now + ttl_and_grace - dt.timedelta(minutes=1) < expires < now + 2 * ttl_and_grace


def test_chat_streamed_and_not(start_manager: ManagerFactory) -> None:
    manager = start_manager(models=HOT_DEFAULT)
    manager.wait_state(DEFAULT_MODEL, "HOT")
    client = client_for(manager)

    reply = client.chat(model=DEFAULT_MODEL, messages=HELLO, options=SHORT)
    assert reply.done and reply.done_reason == "length"
    assert reply.message.role == "assistant" and reply.message.content
    assert reply.eval_count == 8 and reply.prompt_eval_count and reply.prompt_eval_count > 5
    assert reply.total_duration and reply.eval_duration and reply.load_duration == 0

    parts = list(client.chat(model=DEFAULT_MODEL, messages=HELLO, options=SHORT, stream=True))
    assert len(parts) >= 3
    assert not any(p.done for p in parts[:-1]) and parts[-1].done
    assert parts[-1].done_reason == "length" and parts[-1].eval_count == 8
    assert parts[-1].message.content == ""
    text = "".join(p.message.content or "" for p in parts)
    assert text == reply.message.content, "the same greedy answer, streamed"

    # Over plain HTTP, "stream" defaults to true (NDJSON), as in Ollama.
    body = {"model": DEFAULT_MODEL, "messages": HELLO, "options": {"num_predict": 4}}
    lines = ndjson(httpx.post(f"{manager.url}/api/chat", json=body, timeout=60))
    assert lines[-1]["done"] is True and lines[-1]["eval_count"] == 4
    assert all(line["done"] is False for line in lines[:-1])
    assert lines[0]["model"] == DEFAULT_MODEL and lines[0]["created_at"]


def test_generate_streamed_and_not(start_manager: ManagerFactory) -> None:
    manager = start_manager(models=HOT_DEFAULT)
    manager.wait_state(DEFAULT_MODEL, "HOT")
    client = client_for(manager)

    reply = client.generate(
        model=DEFAULT_MODEL, prompt="Name a colour.", system="Answer in one word.", options=SHORT
    )
    assert reply.done and reply.response and reply.done_reason in ("stop", "length")
    assert reply.eval_count and reply.eval_count <= 8

    parts = list(
        client.generate(model=DEFAULT_MODEL, prompt="Count to ten:", options=SHORT, stream=True)
    )
    assert parts[-1].done and parts[-1].eval_count == 8 and parts[-1].done_reason == "length"
    assert "".join(p.response or "" for p in parts[:-1]).strip()

    # raw: no chat template, the prompt goes to the model as it is.
    raw = client.generate(model=DEFAULT_MODEL, prompt="1, 2, 3, 4,", raw=True, options=SHORT)
    assert raw.response and raw.prompt_eval_count and raw.prompt_eval_count < 12
    assert raw.eval_count == 8, "raw generation is not cut at 16 tokens or by the template"


def test_format_json_and_schema(start_manager: ManagerFactory) -> None:
    manager = start_manager(models=HOT_DEFAULT)
    manager.wait_state(DEFAULT_MODEL, "HOT")
    client = client_for(manager)
    schema = {
        "type": "object",
        "properties": {"sunny": {"type": "boolean"}},
        "required": ["sunny"],
        "additionalProperties": False,
    }
    ask = [{"role": "user", "content": "Is the sky blue on a clear day? Answer in JSON."}]
    reply = client.chat(model=DEFAULT_MODEL, messages=ask, format=schema, options={"seed": 3})
    assert reply.done_reason == "stop"
    assert isinstance(json.loads(reply.message.content or "")["sunny"], bool)

    generated = client.generate(
        model=DEFAULT_MODEL, prompt="A JSON object, please.", format="json", options=SHORT
    )
    assert (generated.response or "").lstrip().startswith("{"), "decoding constrained to JSON"


def test_keep_alive_maps_onto_the_ttl(start_manager: ManagerFactory) -> None:
    manager = start_manager(models=[entry(COLD)])
    client = client_for(manager)

    reply = client.chat(model=COLD, messages=HELLO, options=SHORT, keep_alive="30m")
    assert reply.load_duration and reply.load_duration > 0, "the COLD model loaded on demand"
    remaining = manager.model(COLD)["ttl_remaining_seconds"]
    assert 1700 < remaining <= 1800, remaining

    list(client.chat(model=COLD, messages=HELLO, options=SHORT, keep_alive=-1, stream=True))
    remaining = manager.model(COLD)["ttl_remaining_seconds"]
    assert 3500 < remaining <= 3600, "negative: as long as max_ttl_minutes allows"

    client.chat(model=COLD, messages=HELLO, options=SHORT, keep_alive="2m")
    remaining = wait_for(
        lambda: (r := manager.model(COLD)["ttl_remaining_seconds"]) <= 120 and r,
        10,
        message="a shorter keep_alive to shorten the TTL",
    )
    assert 100 < remaining <= 120, remaining

    reply = client.chat(model=COLD, messages=HELLO, options=SHORT, keep_alive=0)
    assert reply.done and reply.message.content, "the request is answered, then the model goes"
    manager.wait_state(COLD, "COLD", timeout=30)

    assert client.generate(model=COLD, keep_alive="10m").done_reason == "load"
    assert manager.model(COLD)["state"] == "HOT"
    unloaded = client.generate(model=COLD, prompt="", keep_alive=0)
    assert unloaded.done and unloaded.done_reason == "unload"
    assert manager.model(COLD)["state"] == "COLD"
    assert client.ps().models == []


def test_errors_have_ollamas_shape(start_manager: ManagerFactory) -> None:
    manager = start_manager(models=HOT_DEFAULT)
    manager.wait_state(DEFAULT_MODEL, "HOT")
    client = client_for(manager)

    for call in (
        lambda: client.chat(model="nope", messages=HELLO),
        lambda: list(client.chat(model="nope", messages=HELLO, stream=True)),
        lambda: client.generate(model="nope", prompt="x"),
        lambda: client.show("nope"),
    ):
        with pytest.raises(ollama.ResponseError) as missing:
            call()
        assert missing.value.status_code == 404
        assert missing.value.error == "model 'nope' not found"

    with pytest.raises(ollama.ResponseError) as invalid:
        client.chat(model=DEFAULT_MODEL, messages=HELLO, options={"temperature": 5})
    assert invalid.value.status_code == 400 and "temperature" in invalid.value.error

    for path, content in (
        ("/api/chat", b"{nope"),
        ("/api/generate", b"[1, 2]"),
        ("/api/show", b"{}"),
        ("/api/chat", json.dumps({"model": DEFAULT_MODEL, "keep_alive": "soon"}).encode()),
        (
            "/api/generate",
            json.dumps({"model": DEFAULT_MODEL, "prompt": "x", "format": 1}).encode(),
        ),
    ):
        bad = httpx.post(f"{manager.url}{path}", content=content, timeout=30)
        assert bad.status_code == 400, (path, content, bad.text)
        assert isinstance(bad.json()["error"], str)


def test_disconnect_stops_generation(start_manager: ManagerFactory) -> None:
    manager = start_manager(models=[entry(COLD, n_ctx=2048)])
    body = {
        "model": COLD,
        "messages": [{"role": "user", "content": "A very long story."}],
        "options": {"num_predict": 1500},
    }
    with httpx.stream("POST", f"{manager.url}/api/chat", json=body, timeout=60) as reply:
        for n, _ in enumerate(reply.iter_lines()):
            if n > 10:
                break
    endpoint = manager.model(COLD)["endpoint"]

    def settled() -> dict[str, object] | None:
        health: dict[str, object] = httpx.get(f"{endpoint}/health").json()
        return health if not health["generating"] and health["in_flight"] == 0 else None

    health = wait_for(settled, 30, message="the abandoned generation to stop")
    assert int(str(health["tokens_generated"])) < 300


def test_fallback_chain_applies(start_manager: ManagerFactory, tmp_path: Path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a model")
    manager = start_manager(
        config={"max_load_failures": 1, "failure_cooldown_seconds": 600},
        models=[
            {"model_id": "primary:1", "model_path": str(broken), "fallbacks": [COLD]},
            entry(COLD),
        ],
    )
    client = client_for(manager)
    listed = {m.model: m for m in client.list().models}
    assert listed["primary:1"].size == len(b"not a model")
    assert listed["primary:1"].details and listed["primary:1"].details.format == ""
    reply = client.chat(model="primary:1", messages=HELLO, options=SHORT, keep_alive="40m")
    assert reply.model == "primary:1" and reply.message.content
    assert reply.load_duration and reply.load_duration > 0, "the fallback loaded on demand"
    assert 2300 < manager.model(COLD)["ttl_remaining_seconds"] <= 2400, "keep_alive: the server"
