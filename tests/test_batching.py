"""Continuous batching and prefix reuse in one worker (real model, real processes)."""

from __future__ import annotations

import concurrent.futures
import threading
import time

import httpx
import openai

from tests.conftest import ManagerFactory, model_entry

MODEL = "batch:1"
LONG_SYSTEM_PROMPT = " ".join(
    f"Rule {i}: answer briefly, politely and only about the topic asked." for i in range(90)
)


def test_concurrent_streams_are_decoded_together(start_manager: ManagerFactory) -> None:
    manager = start_manager(models=[model_entry(MODEL, max_concurrent=4, n_ctx=512)])
    endpoint = manager.load(MODEL)["endpoint"]
    client = openai.OpenAI(base_url=f"{endpoint}/v1", api_key="unused", max_retries=0)
    start = threading.Barrier(4)
    first_token: dict[int, float] = {}
    finished: dict[int, float] = {}
    usage: dict[int, int] = {}

    def stream(i: int) -> str:
        start.wait()
        pieces = []
        for chunk in client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"Tell story number {i} about a fox."}],
            max_tokens=60,
            temperature=0.8,
            stream=True,
            stream_options={"include_usage": True},
        ):
            if chunk.usage:
                usage[i] = chunk.usage.completion_tokens
            if chunk.choices and chunk.choices[0].delta.content:
                first_token.setdefault(i, time.monotonic())
                pieces.append(chunk.choices[0].delta.content)
        finished[i] = time.monotonic()
        return "".join(pieces)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        texts = list(pool.map(stream, range(4)))
    assert all(text.strip() for text in texts)
    assert set(usage) == {0, 1, 2, 3} and all(0 < n <= 60 for n in usage.values())
    # Every stream had its first token before any stream ended: they ran side by side.
    assert max(first_token.values()) < min(finished.values())


def test_more_requests_than_slots_all_complete(start_manager: ManagerFactory) -> None:
    manager = start_manager(models=[model_entry(MODEL, max_concurrent=2, n_ctx=256)])
    endpoint = manager.load(MODEL)["endpoint"]

    def ask(i: int) -> dict[str, object]:
        reply = httpx.post(
            f"{endpoint}/v1/completions",
            json={
                "model": MODEL,
                "prompt": f"{i} apples and",
                "max_tokens": 12 + i,
                "temperature": 0,
            },
            timeout=120,
        )
        assert reply.status_code == 200, reply.text
        body: dict[str, object] = reply.json()
        return body

    with concurrent.futures.ThreadPoolExecutor(7) as pool:
        replies = list(pool.map(ask, range(7)))
    for i, reply in enumerate(replies):
        usage = reply["usage"]
        assert isinstance(usage, dict)
        assert 0 < usage["completion_tokens"] <= 12 + i


def test_repeated_long_system_prompt_is_served_from_cache(start_manager: ManagerFactory) -> None:
    manager = start_manager(models=[model_entry(MODEL, max_concurrent=2, n_ctx=2048)])
    endpoint = manager.load(MODEL)["endpoint"]
    client = openai.OpenAI(base_url=f"{endpoint}/v1", api_key="unused", max_retries=0)

    def ask(question: str) -> openai.types.CompletionUsage:
        reply = client.chat.completions.create(
            model=MODEL,
            messages=[
                {"role": "system", "content": LONG_SYSTEM_PROMPT},
                {"role": "user", "content": question},
            ],
            max_tokens=8,
        )
        assert reply.usage is not None
        return reply.usage

    first = ask("What is a fox?")
    assert first.prompt_tokens > 900
    assert first.prompt_tokens_details is not None
    # Nothing of the system prompt is cached yet; at most the chat template's opening is.
    assert first.prompt_tokens_details.cached_tokens < 10
    second = ask("What is a wolf?")
    assert second.prompt_tokens_details is not None
    cached = second.prompt_tokens_details.cached_tokens
    assert cached > 0.9 * first.prompt_tokens, (cached, first.prompt_tokens)
    assert cached < second.prompt_tokens, "the new question itself is computed"


def test_two_busy_models_share_the_cores(start_manager: ManagerFactory) -> None:
    """Two workers with two threads each on a 2-core machine: spinning threads that wait
    for each other made both crawl (requests timed out). The manager now splits the
    cores among the workers that are generating, so both finish."""
    threads = 2
    manager = start_manager(
        models=[model_entry(m, n_threads=threads, timeout_seconds=30) for m in ("one:1", "two:1")]
    )
    for model_id in ("one:1", "two:1"):
        manager.load(model_id)

    def story(model_id: str) -> dict[str, object]:
        reply = httpx.post(
            f"{manager.url}/v1/chat/completions",
            json={
                "model": model_id,
                "messages": [{"role": "user", "content": "Tell me a long story."}],
                "max_tokens": 150,
                "temperature": 0.9,
            },
            timeout=120,
        )
        assert reply.status_code == 200, reply.text
        usage: dict[str, object] = reply.json()["usage"]
        return usage

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        usages = list(pool.map(story, ["one:1", "two:1"]))
    assert all(int(str(u["completion_tokens"])) > 0 for u in usages)
