"""Replicas of one model on one machine (issue 18, point 2): real workers, the real
model, requests through 8050 with the official `openai` client. Cluster mode places the
same replicas on Ray nodes (tests/test_cluster.py).
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
from typing import Any

import httpx
import openai

from tests.conftest import Manager, ManagerFactory, model_entry, pid_alive, wait_for

MODEL = "replicated:1"
SYSTEM = "You are a terse assistant for the warehouse team. Answer in one short sentence."


def _client(manager: Manager) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{manager.url}/v1", api_key="unused", max_retries=0)


def _replicas(manager: Manager) -> list[dict[str, Any]]:
    replicas: list[dict[str, Any]] = manager.model(MODEL)["replicas"]
    return replicas


def _served(replica: dict[str, Any]) -> int:
    """Requests the replica's worker has served (its own /health)."""
    served: int = httpx.get(f"{replica['endpoint']}/health", timeout=10).json()["requests_served"]
    return served


def _ask(client: openai.OpenAI, question: str, system: str = SYSTEM, tokens: int = 4) -> Any:
    return client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
        max_tokens=tokens,
        temperature=0,
    )


def test_requests_sharing_a_prefix_go_to_one_replica_and_hit_its_cache(
    start_manager: ManagerFactory,
) -> None:
    manager = start_manager(models=[model_entry(MODEL, replicas=2, warmup=True)])
    wait_for(lambda: len(_replicas(manager)) == 2, 120, message="two replicas")
    replicas = _replicas(manager)
    assert len({r["port"] for r in replicas}) == 2 and all(r["pid"] for r in replicas)
    client = _client(manager)
    before = [_served(r) for r in replicas]
    cached = []
    for _ in range(5):
        reply = _ask(client, "Where are the pallets?")
        details = reply.usage.prompt_tokens_details
        cached.append(details.cached_tokens if details else 0)
    grown = [_served(r) - b for r, b in zip(replicas, before, strict=True)]
    assert sorted(grown) == [0, 5], f"one prefix, one replica: {grown}"
    assert all(c > 0 for c in cached[1:]), f"the prefix cache hit after the first: {cached}"
    # Other conversations spread over both (20 prefixes: all on one is a 1 in 500,000 case).
    for i in range(20):
        _ask(client, "Hello", system=f"Conversation {i}: you help team {i}.", tokens=1)
    spread = [_served(r) - b - g for r, b, g in zip(replicas, before, grown, strict=True)]
    assert min(spread) > 0 and sum(spread) == 20, spread


def test_queued_requests_add_a_replica_and_an_idle_one_goes(
    start_manager: ManagerFactory,
) -> None:
    manager = start_manager(
        config={"replica_idle_seconds": 1},
        # One slot each; a long timeout, as the queued requests wait their turn.
        models=[
            model_entry(MODEL, max_replicas=2, max_concurrent=1, timeout_seconds=300, warmup=True)
        ],
    )
    manager.wait_state(MODEL, "HOT", timeout=120)
    assert len(_replicas(manager)) == 1
    client = _client(manager)

    def long_one(i: int) -> str:
        return _ask(client, f"Count to forty, please ({i}).", tokens=32).choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        runs = [pool.submit(long_one, i) for i in range(3)]
        wait_for(lambda: len(_replicas(manager)) == 2, 120, message="a second replica")
        assert all(run.result(timeout=120) for run in runs)
    extra = [r for r in _replicas(manager) if r["pid"] != manager.model(MODEL)["pid"]]
    wait_for(lambda: len(_replicas(manager)) == 1, 60, message="the idle replica to go")
    assert manager.model(MODEL)["state"] == "HOT"
    if extra:
        wait_for(lambda: not pid_alive(extra[0]["pid"]), 30, message="its process to exit")


def test_when_the_model_s_worker_dies_a_replica_takes_over(
    start_manager: ManagerFactory,
) -> None:
    manager = start_manager(models=[model_entry(MODEL, replicas=2, warmup=True)])
    wait_for(lambda: len(_replicas(manager)) == 2, 120, message="two replicas")
    first = manager.model(MODEL)
    survivor = next(r for r in first["replicas"] if r["pid"] != first["pid"])
    os.kill(first["pid"], signal.SIGKILL)
    wait_for(
        lambda: manager.model(MODEL)["pid"] == survivor["pid"], 30, message="the replica's takeover"
    )
    assert manager.model(MODEL)["state"] == "HOT", "no reload: a replica was serving"
    client = _client(manager)
    assert _ask(client, "Still there?").choices[0].message.content
    # Back to two (the registry's `replicas`) once requests come.
    wait_for(lambda: len(_replicas(manager)) == 2, 120, message="a new second replica")
    assert _ask(client, "And now?").choices[0].message.content
