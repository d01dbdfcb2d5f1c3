"""Embeddings everywhere: OpenAI's /v1/embeddings on a worker port and through the
manager, Ollama's /api/embed and /api/embeddings, an embedding-only model, and the two
remote backends, with the official `openai` and `ollama` clients and the real SmolLM2.

SmolLM2 is a chat model: its embeddings are its hidden states, mean-pooled (no trained
embedding model ships in a package here). They still behave as embeddings must: the same
text gives the same vector, related texts lie closer than unrelated ones.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import httpx
import llama_cpp
import numpy as np
import ollama
import openai
import pytest

from model_service.backends.llama_embed import pooling_for
from model_service.model_files import package_file
from pool_manager.ports import free_port
from tests.conftest import (
    DEFAULT_MODEL,
    SMOLLM2_FILE,
    Manager,
    ManagerFactory,
    free_port_range,
    model_entry,
    pid_alive,
    wait_for,
    write_setup,
)

EMBED = "embed/smol:1"  # the same weights, registered as an embedding model
COLD = "cold/smol:1"  # a chat model nothing loads but the cold-start test
FAR_OPENAI = "far/openai:1"  # the `openai` backend, pointed at this pool's own /v1
FAR_OLLAMA = "far/ollama:1"  # the `ollama` backend, pointed at this pool's own /api
N_CTX = 1024
DIMENSIONS = 576  # SmolLM2-135M's hidden size

CAT = "The cat sat on the mat."
KITTEN = "A kitten is sitting on a rug."
TAXES = "Quarterly tax filings are due in April."


def entry(model_id: str, **overrides: Any) -> dict[str, Any]:
    return model_entry(model_id, **{"n_ctx": N_CTX, "timeout_seconds": 120, **overrides})


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Manager]:
    folder = tmp_path_factory.mktemp("embeddings-pool")
    port, port_range = free_port(), free_port_range(8)
    config = {
        "port": port,
        "port_range": {"start": port_range[0], "end": port_range[1]},
        "graceful_shutdown_seconds": 5,
        "load_timeout_seconds": 120,
    }
    models = [
        entry(DEFAULT_MODEL, warmup=True),
        entry(EMBED, model_type="embedding"),
        entry(COLD),
        {
            "model_id": FAR_OPENAI,
            "backend": "openai",
            "base_url": f"http://127.0.0.1:{port}/v1",
            "remote_model": DEFAULT_MODEL,
        },
        {
            "model_id": FAR_OLLAMA,
            "backend": "ollama",
            "base_url": f"http://127.0.0.1:{port}",
            "remote_model": DEFAULT_MODEL,
        },
    ]
    write_setup(folder, config, models)
    manager = Manager(folder, port, port_range).start()
    manager.wait_state(DEFAULT_MODEL, "HOT", timeout=120)
    yield manager
    manager.models()  # note the workers' pids
    assert manager.stop() == 0
    leftovers = [pid for pid in manager.seen_worker_pids if pid_alive(pid)]
    assert not leftovers, f"worker processes outlived their manager: {leftovers}"


@pytest.fixture(scope="module")
def worker_url(pool: Manager) -> str:
    endpoint: str = pool.model(DEFAULT_MODEL)["endpoint"]
    return endpoint


def openai_client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer() -> llama_cpp.Llama:
    """SmolLM2's vocabulary, in this process: the count usage must match."""
    return llama_cpp.Llama(
        model_path=str(package_file(SMOLLM2_FILE)), vocab_only=True, verbose=False
    )


def tokens_of(tokenizer: llama_cpp.Llama, text: str) -> list[int]:
    return list(tokenizer.tokenize(text.encode(), add_bos=True, special=False))


def vectors(reply: Any) -> np.ndarray:
    """The `data` of an OpenAI reply (client object or JSON), as float32 rows, by index."""
    data = reply["data"] if isinstance(reply, dict) else [d.model_dump() for d in reply.data]
    rows = []
    for position, item in enumerate(sorted(data, key=lambda d: d["index"])):
        assert item["index"] == position and item["object"] == "embedding"
        value = item["embedding"]
        if isinstance(value, str):
            rows.append(np.frombuffer(base64.b64decode(value), dtype="<f4"))
        else:
            rows.append(np.asarray(value, dtype=np.float32))
    return np.stack(rows)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def post(url: str, body: dict[str, Any], path: str = "/v1/embeddings") -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=120)


# --- OpenAI's /v1/embeddings -----------------------------------------------------------------


@pytest.mark.parametrize("where", ["manager", "worker"])
def test_openai_client_string_and_list(pool: Manager, worker_url: str, where: str) -> None:
    client = openai_client(pool.url if where == "manager" else worker_url)
    one = client.embeddings.create(model=DEFAULT_MODEL, input=CAT)  # base64 on the wire
    assert one.object == "list" and one.model == DEFAULT_MODEL and len(one.data) == 1
    single = np.asarray(one.data[0].embedding, dtype=np.float32)
    assert single.shape == (DIMENSIONS,)
    assert abs(np.linalg.norm(single) - 1) < 1e-5, "normalized, as OpenAI's are"

    many = client.embeddings.create(model=DEFAULT_MODEL, input=[CAT, KITTEN, TAXES])
    rows = vectors(many)
    assert rows.shape == (3, DIMENSIONS)
    assert cosine(rows[0], single) > 0.999, "a text's vector does not depend on its batch"
    assert many.usage.prompt_tokens == many.usage.total_tokens > one.usage.prompt_tokens


def test_manager_and_worker_port_give_the_same_vectors(pool: Manager, worker_url: str) -> None:
    body = {"model": DEFAULT_MODEL, "input": [CAT, TAXES]}
    through = post(pool.url, body)
    direct = post(worker_url, body)
    assert through.status_code == direct.status_code == 200, through.text
    assert through.headers["x-pool-model"] == DEFAULT_MODEL
    assert np.array_equal(vectors(through.json()), vectors(direct.json()))


def test_float_and_base64_are_the_same_vectors(pool: Manager) -> None:
    body = {"model": DEFAULT_MODEL, "input": [CAT, KITTEN]}
    as_floats = post(pool.url, {**body, "encoding_format": "float"}).json()
    as_base64 = post(pool.url, {**body, "encoding_format": "base64"}).json()
    assert isinstance(as_floats["data"][0]["embedding"], list)
    assert isinstance(as_base64["data"][0]["embedding"], str)
    assert np.array_equal(vectors(as_floats), vectors(as_base64)), "the same float32 bits"
    client = openai_client(pool.url)
    decoded = vectors(client.embeddings.create(model=DEFAULT_MODEL, input=[CAT, KITTEN]))
    assert np.array_equal(decoded, vectors(as_floats)), "what the openai client decodes"


def test_same_text_same_vector_and_similar_texts_closer(pool: Manager) -> None:
    first = vectors(post(pool.url, {"model": DEFAULT_MODEL, "input": CAT}).json())[0]
    again = vectors(post(pool.url, {"model": DEFAULT_MODEL, "input": CAT}).json())[0]
    assert cosine(first, again) > 0.99999
    cat, kitten, taxes = vectors(
        post(pool.url, {"model": DEFAULT_MODEL, "input": [CAT, KITTEN, TAXES]}).json()
    )
    assert cosine(cat, kitten) > cosine(cat, taxes) + 0.05
    assert cosine(cat, kitten) > cosine(kitten, taxes) + 0.05


def test_token_input_and_usage_match_the_tokenizer(
    pool: Manager, tokenizer: llama_cpp.Llama
) -> None:
    texts = [CAT, TAXES]
    counts = [len(tokens_of(tokenizer, t)) for t in texts]
    by_text = post(pool.url, {"model": DEFAULT_MODEL, "input": texts}).json()
    assert by_text["usage"] == {"prompt_tokens": sum(counts), "total_tokens": sum(counts)}

    token_lists = [tokens_of(tokenizer, t) for t in texts]
    by_tokens = post(pool.url, {"model": DEFAULT_MODEL, "input": token_lists}).json()
    assert by_tokens["usage"]["prompt_tokens"] == sum(counts)
    for a, b in zip(vectors(by_text), vectors(by_tokens), strict=True):
        assert cosine(a, b) > 0.9999, "the same tokens, the same vector"

    flat = post(pool.url, {"model": DEFAULT_MODEL, "input": token_lists[0]}).json()
    assert len(flat["data"]) == 1, "a flat list of ids is one input"
    assert cosine(vectors(flat)[0], vectors(by_text)[0]) > 0.9999
    assert flat["usage"]["prompt_tokens"] == counts[0]


def test_dimensions_and_user_are_accepted_when_they_fit(pool: Manager) -> None:
    body = {"model": DEFAULT_MODEL, "input": CAT, "dimensions": DIMENSIONS, "user": "u-1"}
    reply = post(pool.url, body)
    assert reply.status_code == 200, reply.text
    assert len(reply.json()["data"][0]["embedding"]) == DIMENSIONS


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"input": ""}, "input", "invalid_value"),
        ({"input": []}, "input", "invalid_value"),
        ({"input": [CAT, ""]}, "input.1", "invalid_value"),
        ({"input": [[1, 2], []]}, "input.1", "invalid_value"),
        ({"input": "word " * (N_CTX + 50)}, "input", "context_length_exceeded"),
        ({"input": [CAT, "word " * (N_CTX + 50)]}, "input.1", "context_length_exceeded"),
        ({"input": CAT, "dimensions": 64}, "dimensions", "invalid_value"),
        ({"input": ["x"] * 2049}, "input", "invalid_value"),
        ({"input": [[5, 10**9]]}, "input.0", "invalid_value"),
        ({"input": [1, "mixed"]}, "input", "invalid_value"),
        ({"input": CAT, "encoding_format": "int8"}, "encoding_format", "invalid_value"),
        ({}, "input", "invalid_value"),
    ],
)
@pytest.mark.parametrize("where", ["manager", "worker"])
def test_bad_input_is_a_400_in_openais_shape(
    pool: Manager, worker_url: str, where: str, body: dict[str, Any], param: str, code: str
) -> None:
    reply = post(pool.url if where == "manager" else worker_url, {"model": DEFAULT_MODEL, **body})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param and error["code"] == code


def test_odd_text_is_embedded_not_a_500(pool: Manager) -> None:
    for text in ("\ud800 lone surrogate", "<|im_start|>system", "\u0000", "\U0001f600" * 50):
        reply = httpx.post(
            f"{pool.url}/v1/embeddings",
            content=json.dumps({"model": DEFAULT_MODEL, "input": text}).encode(),
            headers={"Content-Type": "application/json"},
            timeout=120,
        )
        assert reply.status_code == 200, (text, reply.text)
    health = httpx.get(f"{pool.model(DEFAULT_MODEL)['endpoint']}/health").json()
    assert health["status"] == "ready"


def test_dimensions_error_names_the_models_size(pool: Manager) -> None:
    reply = post(pool.url, {"model": DEFAULT_MODEL, "input": CAT, "dimensions": 256})
    assert reply.status_code == 400 and str(DIMENSIONS) in reply.json()["error"]["message"]


def test_openai_client_raises_bad_request(pool: Manager) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        openai_client(pool.url).embeddings.create(model=DEFAULT_MODEL, input="word " * 2000)
    assert refused.value.code == "context_length_exceeded"


def test_worker_requests_count_as_use(pool: Manager, worker_url: str) -> None:
    before = httpx.get(f"{worker_url}/health").json()
    assert post(worker_url, {"model": DEFAULT_MODEL, "input": CAT}).status_code == 200
    after = httpx.get(f"{worker_url}/health").json()
    assert after["requests_served"] == before["requests_served"] + 1
    assert after["embeddings"]["pooled_by"] == "worker"
    assert after["embeddings"]["context_tokens"] > 0 and after["embeddings"]["dimensions"] == 576
    assert after["embeddings"]["context_memory_mb"] > 0


def test_cold_model_loads_on_demand_for_embeddings(pool: Manager) -> None:
    assert pool.model(COLD)["state"] == "COLD"
    reply = openai_client(pool.url).embeddings.create(model=COLD, input=CAT)
    assert reply.model == COLD and len(reply.data[0].embedding) == DIMENSIONS
    assert pool.model(COLD)["state"] == "HOT"
    assert pool.model(COLD)["requests_total"] == 1


def test_unknown_model_is_404(pool: Manager, worker_url: str) -> None:
    for url in (pool.url, worker_url):
        reply = post(url, {"model": "nope", "input": CAT})
        assert reply.status_code == 404, reply.text
        assert reply.json()["error"]["code"] == "model_not_found"


def test_keys_guard_the_embeddings_routes(start_manager: ManagerFactory) -> None:
    keys = {"POOL_API_KEY": "client-key-e1", "POOL_ADMIN_KEY": "admin-key-e2"}
    manager = start_manager(models=[entry(DEFAULT_MODEL, warmup=True)], env=keys)
    worker = manager.wait_state(DEFAULT_MODEL, "HOT")["endpoint"]
    body = {"model": DEFAULT_MODEL, "input": CAT}
    client_key = {"Authorization": f"Bearer {keys['POOL_API_KEY']}"}
    for url, path in (
        (manager.url, "/v1/embeddings"),
        (worker, "/v1/embeddings"),
        (manager.url, "/api/embed"),
        (manager.url, "/api/embeddings"),
    ):
        payload = body if path == "/v1/embeddings" else {"model": DEFAULT_MODEL, "input": CAT}
        if path == "/api/embeddings":
            payload = {"model": DEFAULT_MODEL, "prompt": CAT}
        missing = httpx.post(f"{url}{path}", json=payload, timeout=60)
        assert missing.status_code == 401, (url, path, missing.text)
        allowed = httpx.post(f"{url}{path}", json=payload, headers=client_key, timeout=60)
        assert allowed.status_code == 200, (url, path, allowed.text)


# --- an embedding-only model ------------------------------------------------------------------


def test_embedding_model_embeds_and_refuses_chat(pool: Manager) -> None:
    client = openai_client(pool.url)
    texts = [CAT, KITTEN, TAXES]
    pooled_by_llama = vectors(client.embeddings.create(model=EMBED, input=texts))
    pooled_here = vectors(client.embeddings.create(model=DEFAULT_MODEL, input=texts))
    for a, b in zip(pooled_by_llama, pooled_here, strict=True):
        assert cosine(a, b) > 0.999, "llama.cpp's mean pooling and the worker's agree"

    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=EMBED, messages=[{"role": "user", "content": "hi"}])
    assert refused.value.code == "model_not_chat"
    completions = post(pool.url, {"model": EMBED, "prompt": "x"}, "/v1/completions")
    assert completions.status_code == 400
    assert completions.json()["error"]["code"] == "model_not_chat"
    ollama_chat = post(
        pool.url,
        {"model": EMBED, "messages": [{"role": "user", "content": "hi"}], "stream": False},
        "/api/chat",
    )
    assert ollama_chat.status_code == 400 and "embedding model" in ollama_chat.json()["error"]

    health = httpx.get(f"{pool.model(EMBED)['endpoint']}/health").json()
    assert health["embeddings"]["pooled_by"] == "llama.cpp"
    assert health["embeddings"]["context_tokens"] == N_CTX, "made at load, the entry's n_ctx"
    assert pool.model(EMBED)["state"] == "HOT"
    assert ollama.Client(host=pool.url).show(EMBED).capabilities == ["embedding"]


def test_pooling_comes_from_the_registry_then_the_gguf() -> None:
    assert pooling_for({}, None) == "mean"
    assert pooling_for({"general.architecture": "bert", "bert.pooling_type": 2}, None) == "cls"
    assert pooling_for({"general.architecture": "qwen3", "qwen3.pooling_type": "3"}, None) == (
        "last"
    )
    assert pooling_for({"general.architecture": "bert", "bert.pooling_type": 2}, "mean") == "mean"
    assert pooling_for({"general.architecture": "bert", "bert.pooling_type": 0}, None) == "mean"


def test_registry_refuses_an_unknown_pooling(pool: Manager) -> None:
    spec = entry("bad/pooling:1", pooling="max")
    reply = pool.request("POST", "/models/register", json=spec)
    assert reply.status_code == 400, reply.text
    assert "pooling" in reply.json()["error"]["message"]


# --- Ollama's /api/embed and /api/embeddings ----------------------------------------------------


def test_ollama_embed_and_embeddings(pool: Manager, tokenizer: llama_cpp.Llama) -> None:
    client = ollama.Client(host=pool.url, timeout=120)
    reference = vectors(post(pool.url, {"model": DEFAULT_MODEL, "input": [CAT, TAXES]}).json())

    one = client.embed(model=DEFAULT_MODEL, input=CAT)
    assert one.model == DEFAULT_MODEL and len(one.embeddings) == 1
    assert cosine(np.asarray(one.embeddings[0]), reference[0]) > 0.9999
    assert one.prompt_eval_count == len(tokens_of(tokenizer, CAT))
    assert one.total_duration and one.total_duration > 0 and one.load_duration == 0

    both = client.embed(model=DEFAULT_MODEL, input=[CAT, TAXES])
    assert len(both.embeddings) == 2
    for got, want in zip(both.embeddings, reference, strict=True):
        assert cosine(np.asarray(got), want) > 0.9999

    legacy = client.embeddings(model=DEFAULT_MODEL, prompt=TAXES)
    assert cosine(np.asarray(legacy.embedding), reference[1]) > 0.9999
    assert client.embeddings(model=DEFAULT_MODEL, prompt="").embedding == []


def test_ollama_embed_truncates_by_default(pool: Manager) -> None:
    client = ollama.Client(host=pool.url, timeout=120)
    long_text = "word " * (N_CTX + 100)
    cut = client.embed(model=DEFAULT_MODEL, input=long_text)
    assert cut.prompt_eval_count == N_CTX, "cut to the context, as Ollama does"
    with pytest.raises(ollama.ResponseError) as refused:
        client.embed(model=DEFAULT_MODEL, input=long_text, truncate=False)
    assert refused.value.status_code == 400 and "context length" in refused.value.error
    with pytest.raises(ollama.ResponseError) as wrong_size:
        client.embed(model=DEFAULT_MODEL, input=CAT, dimensions=8)
    assert wrong_size.value.status_code == 400 and str(DIMENSIONS) in wrong_size.value.error
    with pytest.raises(ollama.ResponseError) as missing:
        client.embed(model="nope", input=CAT)
    assert missing.value.status_code == 404
    bad = post(pool.url, {"model": DEFAULT_MODEL, "input": [1, 2]}, "/api/embed")
    assert bad.status_code == 400 and isinstance(bad.json()["error"], str)


def test_ollama_embed_loads_and_keep_alive_applies(pool: Manager) -> None:
    client = ollama.Client(host=pool.url, timeout=120)
    pool.request("POST", f"/models/{EMBED}/unload")
    pool.wait_state(EMBED, "COLD", timeout=30)
    loaded = client.embed(model=EMBED, input="")  # Ollama's way to load a model
    assert loaded.embeddings == [] and pool.model(EMBED)["state"] == "HOT"

    reply = client.embed(model=EMBED, input=[CAT], keep_alive="40m")
    assert len(reply.embeddings[0]) == DIMENSIONS
    assert 2300 < pool.model(EMBED)["ttl_remaining_seconds"] <= 2400

    client.embed(model=EMBED, input=CAT, keep_alive=0)
    pool.wait_state(EMBED, "COLD", timeout=30)
    again = client.embeddings(model=EMBED, prompt=KITTEN)
    assert len(again.embedding) == DIMENSIONS, "loaded again on demand"
    assert pool.model(EMBED)["state"] == "HOT"


# --- the remote backends -----------------------------------------------------------------------


def test_openai_backend_forwards_embeddings(pool: Manager, tokenizer: llama_cpp.Llama) -> None:
    client = openai_client(pool.url)
    local = vectors(client.embeddings.create(model=DEFAULT_MODEL, input=[CAT, TAXES]))
    far = client.embeddings.create(model=FAR_OPENAI, input=[CAT, TAXES])
    assert far.model == FAR_OPENAI
    assert np.allclose(vectors(far), local, atol=1e-6)
    by_tokens = client.embeddings.create(model=FAR_OPENAI, input=[tokens_of(tokenizer, CAT)])
    assert cosine(vectors(by_tokens)[0], local[0]) > 0.9999
    too_long = post(pool.url, {"model": FAR_OPENAI, "input": "word " * 2000})
    assert too_long.status_code == 400, "the far end's 400 comes back"


def test_ollama_backend_translates_embeddings(pool: Manager, tokenizer: llama_cpp.Llama) -> None:
    client = openai_client(pool.url)
    local = vectors(client.embeddings.create(model=DEFAULT_MODEL, input=[CAT, TAXES]))
    far = client.embeddings.create(model=FAR_OLLAMA, input=[CAT, TAXES])  # base64 asked
    assert far.model == FAR_OLLAMA
    assert np.allclose(vectors(far), local, atol=1e-6)
    counts = sum(len(tokens_of(tokenizer, t)) for t in (CAT, TAXES))
    assert far.usage.prompt_tokens == counts
    as_floats = post(pool.url, {"model": FAR_OLLAMA, "input": CAT}).json()
    assert isinstance(as_floats["data"][0]["embedding"], list)
    refused = post(pool.url, {"model": FAR_OLLAMA, "input": [[1, 2, 3]]})
    assert refused.status_code == 400 and "token ids" in refused.json()["error"]["message"]
    too_long = post(pool.url, {"model": FAR_OLLAMA, "input": "word " * 2000})
    assert too_long.status_code == 400, "OpenAI's rule: too long is refused, not cut"


def test_openapi_declares_the_route(pool: Manager, worker_url: str) -> None:
    for url in (pool.url, worker_url):
        schema = httpx.get(f"{url}/openapi.json").json()
        operation = schema["paths"]["/v1/embeddings"]["post"]
        assert "400" in operation["responses"] and "200" in operation["responses"]


def test_metrics_count_embeddings(worker_url: str) -> None:
    # A request is counted once its reply is sent: it may land just after the client has it.
    line = f'model="{DEFAULT_MODEL}",route="/v1/embeddings",status="200"'
    wait_for(
        lambda: line in httpx.get(f"{worker_url}/metrics").text,
        10,
        message="the embeddings route in the worker's metrics",
    )


def test_concurrent_requests_are_batched_without_mixing(pool: Manager) -> None:
    import concurrent.futures

    texts = [f"Item number {i} is a {'cat' if i % 2 else 'tax form'}." for i in range(12)]
    alone = vectors(post(pool.url, {"model": DEFAULT_MODEL, "input": texts}).json())

    def ask(i: int) -> np.ndarray:
        reply = post(pool.url, {"model": DEFAULT_MODEL, "input": texts[i]})
        assert reply.status_code == 200, reply.text
        return vectors(reply.json())[0]

    with concurrent.futures.ThreadPoolExecutor(6) as executor:
        together = list(executor.map(ask, range(len(texts))))
    for i, vector in enumerate(together):
        assert cosine(vector, alone[i]) > 0.999, f"request {i} got its own vector back"
