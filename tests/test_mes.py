"""Seed 000's Model Execution Service API on the manager: /v1/inference, /ready, /v1/status."""

from __future__ import annotations

from pathlib import Path

import httpx
import jsonschema

from pool_manager.mes import extract_json
from tests.conftest import DEFAULT_MODEL, ManagerFactory, model_entry

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 30},
        "sunny": {"type": "boolean"},
    },
    "required": ["city", "sunny"],
    "additionalProperties": False,
}


def test_inference_plain_and_with_schema(start_manager: ManagerFactory) -> None:
    manager = start_manager(models=[model_entry(DEFAULT_MODEL, warmup=True)])
    manager.wait_state(DEFAULT_MODEL, "HOT")
    plain = httpx.post(
        f"{manager.url}/v1/inference",
        timeout=60,
        json={
            "model_id": DEFAULT_MODEL,
            "prompt": "Say hello.",
            "system_prompt": "Be brief.",
            "max_tokens": 12,
        },
    ).json()
    assert plain["success"] is True and isinstance(plain["output"], str) and plain["output"]
    assert plain["usage"]["completion_tokens"] > 0 and plain["latency_ms"] > 0
    assert plain["model_id"] == DEFAULT_MODEL
    shaped = httpx.post(
        f"{manager.url}/v1/inference",
        timeout=60,
        json={
            "model_id": DEFAULT_MODEL,
            "prompt": "Describe the weather in Paris as JSON.",
            "json_schema": SCHEMA,
            "max_tokens": 80,
            "temperature": 0,
        },
    ).json()
    assert shaped["success"] is True, shaped
    jsonschema.validate(shaped["output"], SCHEMA)


def test_inference_errors(start_manager: ManagerFactory) -> None:
    manager = start_manager(models=[model_entry(DEFAULT_MODEL, warmup=True)])
    manager.wait_state(DEFAULT_MODEL, "HOT")
    unknown = httpx.post(f"{manager.url}/v1/inference", json={"model_id": "nope", "prompt": "x"})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    for bad in (
        {"model_id": DEFAULT_MODEL},
        {"model_id": DEFAULT_MODEL, "prompt": "x", "json_schema": {"type": "nonsense"}},
        {"model_id": DEFAULT_MODEL, "prompt": "x", "temperature": -1},
    ):
        reply = httpx.post(f"{manager.url}/v1/inference", json=bad)
        assert reply.status_code == 400, reply.text
        assert reply.json()["error"]["type"] == "invalid_request_error"


def test_ready_and_status(start_manager: ManagerFactory) -> None:
    manager = start_manager(models=[model_entry(DEFAULT_MODEL, warmup=True), model_entry("x:1")])
    manager.wait_state(DEFAULT_MODEL, "HOT")
    ready = httpx.get(f"{manager.url}/ready")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    status = httpx.get(f"{manager.url}/v1/status").json()
    assert status["models_loaded"] == [DEFAULT_MODEL]
    assert status["gpu_available"] is False and status["memory_available_gb"] > 0
    assert status["backends"] == {"llama_cpp": True} and status["version"]
    manager.request("POST", f"/models/{DEFAULT_MODEL}/unload")
    not_ready = httpx.get(f"{manager.url}/ready")
    assert not_ready.status_code == 503 and DEFAULT_MODEL in not_ready.json()["reason"]


def test_extract_json_from_fences() -> None:
    assert extract_json('{"a": 1}') == {"a": 1}
    assert extract_json('Here:\n```json\n{"a": [1, 2]}\n```\nDone.') == {"a": [1, 2]}
    assert extract_json("```\n[true]\n```") == [True]


def test_inference_names_the_model_that_answered(
    start_manager: ManagerFactory, tmp_path: Path
) -> None:
    broken = model_entry("broken:1", fallbacks=[DEFAULT_MODEL])
    del broken["package_file"]
    broken["model_path"] = str(tmp_path / "missing.gguf")  # its load fails
    manager = start_manager(models=[model_entry(DEFAULT_MODEL, warmup=True), broken])
    manager.wait_state(DEFAULT_MODEL, "HOT")
    reply = httpx.post(
        f"{manager.url}/v1/inference",
        json={"model_id": "broken:1", "prompt": "Say hi", "max_tokens": 4},
        timeout=60,
    ).json()
    assert reply["success"] is True and reply["model_id"] == DEFAULT_MODEL, reply
