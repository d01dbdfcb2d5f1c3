"""Remote backends: a pool whose model is served by another server.

No remote account or Ollama server exists here, so the "remote" is another pool: its
worker port speaks the OpenAI API (for the `openai` backend), and its manager speaks the
Ollama API (for the `ollama` backend). Real inference happens at the far end.
"""

from __future__ import annotations

import openai
import pytest

from pool_manager.ports import free_port
from tests.conftest import DEFAULT_MODEL, ManagerFactory, model_entry

UPSTREAM_KEY = "upstream-key-5c1e"


def client_for(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def far_model(endpoint: str, **extra: str) -> dict[str, str]:
    """Registry entry `far:1`: the default model of another pool's worker, as an openai backend."""
    return {
        "model_id": "far:1",
        "backend": "openai",
        "base_url": f"{endpoint}/v1",
        "remote_model": DEFAULT_MODEL,
        **extra,
    }


def test_openai_backend_through_another_pools_worker(start_manager: ManagerFactory) -> None:
    upstream = start_manager(
        models=[model_entry(DEFAULT_MODEL, warmup=True)],
        env={"POOL_API_KEY": UPSTREAM_KEY, "POOL_ADMIN_KEY": "upstream-admin"},
    )
    endpoint = upstream.wait_state(DEFAULT_MODEL, "HOT")["endpoint"]
    pool = start_manager(
        models=[far_model(endpoint, api_key_env="POOL_SECRET_UPSTREAM")],
        env={"POOL_SECRET_UPSTREAM": UPSTREAM_KEY},
    )
    client = client_for(pool.url)
    reply = client.chat.completions.create(
        model="far:1", messages=[{"role": "user", "content": "Say hi"}], max_tokens=6
    )
    assert reply.model == "far:1" and reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.completion_tokens > 0
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model="far:1",
            messages=[{"role": "user", "content": "Count"}],
            max_tokens=8,
            stream=True,
        )
        if c.choices
    )
    assert streamed.strip()
    far = pool.model("far:1")
    assert far["state"] == "HOT" and far["backend"] == "openai" and far["requests_total"] == 2
    assert upstream.model(DEFAULT_MODEL)["requests_total"] == 2, "the far end did the work"


def test_unreachable_remote_fails_with_a_clear_reason(start_manager: ManagerFactory) -> None:
    from tests.conftest import free_port

    pool = start_manager(
        models=[
            {
                "model_id": "gone:1",
                "backend": "openai",
                "base_url": f"http://127.0.0.1:{free_port()}/v1",
            },
            {
                "model_id": "nokey:1",
                "backend": "openai",
                "base_url": "http://127.0.0.1:9/v1",
                "api_key_env": "POOL_SECRET_NOT_SET",
            },
        ]
    )
    gone = pool.request("POST", "/models/gone:1/load")
    assert gone.status_code == 503 and "not reachable" in gone.json()["error"]["message"]
    nokey = pool.request("POST", "/models/nokey:1/load")
    assert nokey.status_code == 503
    assert "POOL_SECRET_NOT_SET" in nokey.json()["error"]["message"]


def test_ollama_backend_through_another_pools_ollama_api(start_manager: ManagerFactory) -> None:
    upstream = start_manager(models=[model_entry(DEFAULT_MODEL, warmup=True)])
    upstream.wait_state(DEFAULT_MODEL, "HOT")
    assert upstream.request("GET", "/api/version").status_code == 200
    pool = start_manager(
        config={"ollama_base_url": upstream.url},
        models=[{"model_id": "llama-ish:1", "backend": "ollama", "remote_model": DEFAULT_MODEL}],
    )
    client = client_for(pool.url)
    reply = client.chat.completions.create(
        model="llama-ish:1", messages=[{"role": "user", "content": "Say hi"}], max_tokens=6
    )
    assert reply.choices[0].message.content and reply.model == "llama-ish:1"
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model="llama-ish:1",
            messages=[{"role": "user", "content": "Count"}],
            max_tokens=8,
            stream=True,
        )
        if c.choices
    )
    assert streamed.strip()
    completion = client.completions.create(model="llama-ish:1", prompt="The sky is", max_tokens=4)
    assert completion.choices[0].text is not None
    assert pool.request("POST", "/models/llama-ish:1/unload").json()["state"] == "COLD"

    # GET /v1/status asks each remote server the registry uses whether it is up.
    status = pool.request("GET", "/v1/status").json()
    assert status["backends"] == {"llama_cpp": True, "ollama": True}
    assert status["ollama_running"] is True
    gone = {
        "model_id": "gone:1",
        "backend": "ollama",
        "base_url": f"http://127.0.0.1:{free_port()}",
    }
    assert pool.request("POST", "/models/register", json=gone).status_code == 201
    status = pool.request("GET", "/v1/status").json()
    assert status["backends"]["ollama"] is False and status["ollama_running"] is False


def test_an_upstream_error_in_a_stream_reaches_the_client(start_manager: ManagerFactory) -> None:
    upstream = start_manager(models=[model_entry(DEFAULT_MODEL, warmup=True, n_ctx=256)])
    endpoint = upstream.wait_state(DEFAULT_MODEL, "HOT")["endpoint"]
    pool = start_manager(models=[far_model(endpoint)])
    client = client_for(pool.url)
    too_long = "word " * 600  # more than the far end's 256-token context
    with pytest.raises(openai.APIError) as refused:
        for _chunk in client.chat.completions.create(
            model="far:1",
            messages=[{"role": "user", "content": too_long}],
            max_tokens=4,
            stream=True,
        ):
            pass
    assert "context" in str(refused.value).lower(), "the far end's own reason comes through"
