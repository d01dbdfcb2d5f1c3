"""The L1 response cache (issue 17): which requests it keeps, its bounds, and end to end
a hit that is byte-identical and never reaches the worker."""

from __future__ import annotations

from typing import Any

import httpx

from pool_manager.response_cache import (
    ResponseCache,
    SemanticCache,
    cache_ttl,
    request_key,
    single_turn,
)
from tests.conftest import DEFAULT_MODEL, ManagerFactory, model_entry, wait_for

PATH = "/v1/chat/completions"
ASK = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "temperature": 0}


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


def test_only_deterministic_single_answers_have_a_key() -> None:
    key = request_key(PATH, "m", ASK)
    assert key is not None
    # Key order and the caller's alias for the model do not matter; content does.
    reordered = {"temperature": 0, "messages": ASK["messages"], "model": "alias"}
    assert request_key(PATH, "m", reordered) == key
    assert request_key(PATH, "m", {**ASK, "max_tokens": 5}) != key
    assert request_key(PATH, "other", ASK) != key
    assert request_key(PATH, "m", {**ASK, "temperature": 0.7}) is None
    assert request_key(PATH, "m", {**ASK, "temperature": 0.7, "seed": 3}) is not None
    assert request_key(PATH, "m", {**ASK, "stream": True}) is None
    assert request_key(PATH, "m", {**ASK, "n": 2}) is None
    assert request_key("/v1/embeddings", "m", ASK) is None


def test_the_request_header_wins_over_the_models_ttl() -> None:
    assert cache_ttl({}, None) is None
    assert cache_ttl({}, 60.0) == 60.0
    assert cache_ttl({"x-pool-cache-ttl": "5"}, None) == 5.0
    assert cache_ttl({"x-pool-cache-ttl": "5"}, 60.0) == 5.0
    assert cache_ttl({"x-pool-cache": "off"}, 60.0) is None
    assert cache_ttl({"x-pool-cache-ttl": "soon"}, 60.0) is None
    assert cache_ttl({"x-pool-cache-ttl": "0"}, 60.0) is None


def test_entries_expire_and_the_least_recently_used_go_first() -> None:
    clock = Clock()
    body = b'{"usage": {"prompt_tokens": 3, "completion_tokens": 2}}' + b" " * 700
    cache = ResponseCache(max_bytes=3 * (len(body) + 256), clock=clock)
    for name in "abc":
        cache.put(name, body, {"content-type": "application/json", "date": "x"}, ttl=10)
    assert cache.get("a") is not None  # a is now the most recently used
    cache.put("d", body, {}, ttl=10)
    assert cache.get("b") is None and cache.entries == 3
    hit = cache.get("a")
    assert (
        hit is not None and hit.body == body and hit.headers == {"content-type": "application/json"}
    )
    assert (hit.prompt_tokens, hit.completion_tokens) == (3, 2)
    clock.now += 10.5
    assert cache.get("a") is None and cache.entries == 2
    cache.put("huge", b"{}" + b" " * cache.max_bytes, {}, ttl=10)
    assert cache.get("huge") is None, "one reply larger than the cache is not kept"
    assert (cache.hits, cache.misses) == (2, 3)


def test_a_hit_is_byte_identical_and_skips_the_worker(start_manager: ManagerFactory) -> None:
    manager = start_manager(
        models=[model_entry(DEFAULT_MODEL, warmup=True, cache_ttl_seconds=300)],
        config={"spare_workers": 0},
    )
    manager.wait_state(DEFAULT_MODEL, "HOT")
    endpoint = manager.model(DEFAULT_MODEL)["endpoint"]

    def served() -> int:
        count: int = httpx.get(f"{endpoint}/health", timeout=10).json()["requests_served"]
        return count

    def ask(body: dict[str, Any], **headers: str) -> httpx.Response:
        return httpx.post(f"{manager.url}{PATH}", json=body, headers=headers, timeout=60)

    body = {
        "model": DEFAULT_MODEL,
        "messages": [{"role": "user", "content": "Name a color."}],
        "temperature": 0,
        "max_tokens": 8,
    }
    first = ask(body)
    assert first.status_code == 200 and first.headers["x-pool-cache"] == "miss"
    wait_for(lambda: served() == 1, 10, message="the worker to count the first request")
    second = ask({**body, "model": DEFAULT_MODEL})
    assert second.headers["x-pool-cache"] == "hit"
    assert second.content == first.content
    assert served() == 1, "a hit reached the worker"
    # Not deterministic, or asked not to: the worker answers.
    sampled = ask({**body, "temperature": 0.8})
    assert "x-pool-cache" not in sampled.headers
    skipped = ask(body, **{"x-pool-cache": "off"})
    assert "x-pool-cache" not in skipped.headers
    wait_for(lambda: served() == 3, 10, message="the worker to answer the uncached two")
    metrics = manager.request("GET", "/metrics").text
    assert (
        f'pool_response_cache_lookups_total{{model="{DEFAULT_MODEL}",result="hit"}} 1.0' in metrics
    )
    assert (
        f'pool_response_cache_lookups_total{{model="{DEFAULT_MODEL}",result="miss"}} 1.0' in metrics
    )
    wait_for(
        lambda: manager.request("GET", "/usage").json()["totals"]["requests"] == 4,
        10,
        message="four requests booked, the hit included",
    )
    totals = manager.request("GET", "/usage").json()["totals"]
    assert (totals["errors"], totals["cache_hits"]) == (0, 1)


# --- L2: semantic ---------------------------------------------------------------------------


def chat_request(*messages: tuple[str, str], **extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": r, "content": c} for r, c in messages], **extra}


def test_only_a_single_question_is_answered_by_similarity() -> None:
    asked = single_turn(chat_request(("system", "Be brief."), ("user", "Hi there")))
    assert asked is not None and asked[0] == "Hi there"
    same_context = single_turn(chat_request(("system", "Be brief."), ("user", "Hello")))
    other_system = single_turn(chat_request(("system", "Be long."), ("user", "Hi there")))
    other_settings = single_turn(chat_request(("user", "Hi there"), max_tokens=5))
    assert same_context is not None and same_context[1] == asked[1]
    assert other_system is not None and other_system[1] != asked[1]
    assert other_settings is not None and other_settings[1] != asked[1]
    multi_turn = chat_request(("user", "Hi"), ("assistant", "Hello"), ("user", "More"))
    for refused in (
        multi_turn,
        chat_request(("user", "Hi"), stream=True),
        chat_request(("user", "Hi"), n=2),
        chat_request(("user", "Hi"), tools=[{"type": "function"}]),
        chat_request(("user", [{"type": "text", "text": "Hi"}])),  # type: ignore[arg-type]
        chat_request(("assistant", "Hi")),
    ):
        assert single_turn(refused) is None, refused


def test_the_nearest_prompt_above_the_threshold_answers() -> None:
    clock = Clock()
    cache = SemanticCache(max_entries=3, clock=clock)
    body = b'{"usage": {"prompt_tokens": 1, "completion_tokens": 1}}'
    cache.put("m", "ctx", [1.0, 0.0, 0.0], body, {}, ttl=10)
    cache.put("m", "ctx", [0.0, 1.0, 0.0], body + b" ", {}, ttl=20)
    found = cache.lookup("m", "ctx", [0.1, 1.0, 0.0], threshold=0.9)
    assert found is not None and found[0].body == body + b" " and 0.99 < found[1] <= 1.0
    assert cache.lookup("m", "ctx", [0.0, 0.0, 1.0], threshold=0.5) is None
    assert cache.lookup("m", "other", [1.0, 0.0, 0.0], threshold=0.5) is None
    assert cache.lookup("other", "ctx", [1.0, 0.0, 0.0], threshold=0.5) is None
    clock.now += 15  # the first has expired, the second not
    assert cache.lookup("m", "ctx", [1.0, 0.0, 0.0], threshold=0.99) is None
    assert cache.entries == 1
    for i in range(4):
        cache.put("m", f"c{i}", [1.0, float(i), 0.0], body, {}, ttl=60)
    assert cache.entries == 3


def test_a_similar_question_gets_the_kept_answer(start_manager: ManagerFactory) -> None:
    semantic = {"embedding_model": DEFAULT_MODEL, "threshold": 0.97, "ttl_seconds": 600}
    manager = start_manager(
        models=[model_entry(DEFAULT_MODEL, warmup=True, semantic_cache=semantic)],
        config={"spare_workers": 0},
    )
    manager.wait_state(DEFAULT_MODEL, "HOT")

    def ask(prompt: str) -> httpx.Response:
        body = {
            "model": DEFAULT_MODEL,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 12,
        }
        return httpx.post(f"{manager.url}{PATH}", json=body, timeout=60)

    first = ask("What is the capital city of France?")
    assert first.status_code == 200 and first.headers["x-pool-cache"] == "semantic-miss"
    near = ask("What is the capital city of France ?")
    assert near.headers["x-pool-cache"] == "semantic-hit", near.headers
    assert float(near.headers["x-pool-cache-similarity"]) >= 0.97
    assert near.content == first.content
    far = ask("Write two lines of a poem about winter dogs and snow.")
    assert far.headers["x-pool-cache"] == "semantic-miss", far.headers.get(
        "x-pool-cache-similarity"
    )
    assert far.content != first.content
    # A conversation is never answered from it.
    turns = {
        "model": DEFAULT_MODEL,
        "messages": [
            {"role": "user", "content": "What is the capital city of France?"},
            {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": "What is the capital city of France?"},
        ],
        "max_tokens": 4,
    }
    conversation = httpx.post(f"{manager.url}{PATH}", json=turns, timeout=60)
    assert "x-pool-cache" not in conversation.headers
    metrics = manager.request("GET", "/metrics").text
    assert (
        f'pool_response_cache_lookups_total{{model="{DEFAULT_MODEL}",result="semantic_hit"}} 1.0'
        in metrics
    )
