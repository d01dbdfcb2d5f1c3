"""Cluster mode on a real two-node Ray cluster on loopback (pool_manager/local_cluster.py): the
manager joins it, places each model's worker on a node by Ray resources, serves the real
model through 8050 with the official `openai` client, and when a node dies loads its
models again on the node that is left, losing only what was generating there.
"""

from __future__ import annotations

import concurrent.futures
import json
import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest

from pool_manager.local_cluster import LocalRayCluster, node_address
from tests.conftest import Manager, ManagerFactory, model_entry, pid_alive, wait_for

PINNED_TO_A = "on-a:1"  # asks for node A's label resource: runs there or nowhere
PREFERS_B = "prefers-b:1"  # prefers node B (soft): runs on A when B is gone


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[LocalRayCluster]:
    pytest.importorskip("ray", reason="Ray is not installed: pip install '.[cluster]'")
    with LocalRayCluster.start(nodes=2) as cluster:
        yield cluster


def _cluster_manager(
    start_manager: ManagerFactory,
    cluster: LocalRayCluster,
    models: list[dict[str, Any]],
    ports: int = 4,
    env: dict[str, str] | None = None,
    **config: Any,
) -> Manager:
    """`ports`: the port range, each node's own (its workers bind there, on its address)."""
    full = {"cluster": {"address": cluster.address}, "load_timeout_seconds": 90, **config}
    return start_manager(config=full, models=models, ports=ports, env=env)


def _one_on_a_one_preferring_b(
    start_manager: ManagerFactory, cluster: LocalRayCluster, pinned: bool = False, ports: int = 4
) -> Manager:
    """PINNED_TO_A, which needs node A's label (pinned: a warmup model), and PREFERS_B."""
    on_a = model_entry(PINNED_TO_A, placement={"resources": {"node_a": 0.1}}, warmup=pinned)
    prefers_b = model_entry(PREFERS_B, placement={"node": cluster.node_ids["node_b"]})
    return _cluster_manager(start_manager, cluster, [on_a, prefers_b], ports)


def _chat(client: openai.OpenAI, model: str, text: str = "Say hi.") -> str:
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": text}], max_tokens=8
    )
    return reply.choices[0].message.content or ""


def _client(manager: Manager) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{manager.url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_each_model_runs_on_the_node_its_placement_asks_for(
    start_manager: ManagerFactory, ray_cluster: LocalRayCluster
) -> None:
    ids = ray_cluster.node_ids
    manager = _one_on_a_one_preferring_b(start_manager, ray_cluster, ports=1)
    client = _client(manager)
    assert _chat(client, PINNED_TO_A) and _chat(client, PREFERS_B)
    models = manager.models()
    assert models[PINNED_TO_A]["node"]["node_id"] == ids["node_a"]
    assert models[PREFERS_B]["node"]["node_id"] == ids["node_b"]
    assert models[PINNED_TO_A]["node"]["address"] == node_address(0)
    assert models[PREFERS_B]["node"]["address"] == node_address(1)
    assert models[PINNED_TO_A]["port"] == models[PREFERS_B]["port"], "one port, two nodes"
    for model in models.values():
        assert model["state"] == "HOT"
        assert model["endpoint"] == f"http://{model['node']['address']}:{model['port']}"
        assert model["memory_rss_mb"] is None, "a node's pid is not measured here"
    health = manager.request("GET", "/health").json()
    assert health["cluster"]["alive"] == 2
    assert {n["node_id"] for n in health["cluster"]["nodes"]} == set(ids.values())
    # Unloading ends the worker's process on its node, and its actor with it.
    pid = models[PREFERS_B]["pid"]
    assert manager.request("POST", f"/models/{PREFERS_B}/unload").status_code == 200
    wait_for(lambda: not pid_alive(pid), 30, message="the unloaded worker's process to exit")
    # Loaded again, and again: a new worker process on its node each time, on the same
    # port there (the one of the range), which the last one's connections left in TIME_WAIT.
    for _ in range(2):
        assert _chat(client, PREFERS_B)
        again = manager.model(PREFERS_B)
        assert (
            again["node"]["node_id"] == ids["node_b"] and again["port"] == models[PREFERS_B]["port"]
        )
        assert manager.request("POST", f"/models/{PREFERS_B}/unload").status_code == 200


def test_a_model_no_node_has_room_for_fails_to_load_with_a_clear_error(
    start_manager: ManagerFactory, ray_cluster: LocalRayCluster
) -> None:
    manager = _cluster_manager(
        start_manager,
        ray_cluster,
        [model_entry("nowhere:1", placement={"resources": {"node_z": 1}})],
        load_timeout_seconds=3,
        max_load_failures=1,
    )
    reply = manager.request("POST", "/models/nowhere:1/load", timeout=60)
    assert reply.status_code == 503, reply.text
    assert "could not place the worker on the cluster" in reply.json()["error"]["message"]


ADMIN_KEY = "admin-key-cluster-" + "1" * 16
CLIENT_KEY = "client-key-cluster-" + "2" * 16


def test_the_pool_s_rules_hold_with_every_worker_on_a_node(
    start_manager: ManagerFactory, ray_cluster: LocalRayCluster
) -> None:
    """Auth, quotas, LRU, drain, fallbacks, TTL and metrics, as on one machine."""
    models = [
        model_entry("first:1", ttl_minutes=0.03, timeout_seconds=120),  # TTL 1.8 s
        model_entry("second:1", timeout_seconds=120),
        model_entry("nowhere:1", placement={"resources": {"node_z": 1}}, fallbacks=["second:1"]),
    ]
    manager = _cluster_manager(
        start_manager,
        ray_cluster,
        models,
        env={"POOL_ADMIN_KEY": ADMIN_KEY, "POOL_API_KEY": CLIENT_KEY},
        max_concurrent_models=1,
        min_ttl_minutes=0,
        grace_period_seconds=1.0,
        check_interval_seconds=0.5,
        graceful_shutdown_seconds=60,
        load_timeout_seconds=5,
    )
    chat = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4}
    url = f"{manager.url}/v1/chat/completions"
    # Auth: no key, no answer; the client key gets one, from a worker on a node.
    assert httpx.post(url, json={"model": "first:1", **chat}, timeout=60).status_code == 401
    client = openai.OpenAI(base_url=f"{manager.url}/v1", api_key=CLIENT_KEY, max_retries=0)
    assert client.chat.completions.create(model="first:1", **chat).choices  # type: ignore[call-overload]
    assert manager.model("first:1")["node"] is not None
    # Quotas: a named key over its hourly requests is refused with 429.
    made = manager.request("POST", "/keys", json={"name": "q", "limits": {"requests_per_hour": 1}})
    assert made.status_code == 201, made.text
    limited = {"Authorization": f"Bearer {made.json()['key']}"}
    first = {"model": "first:1", **chat}
    assert httpx.post(url, json=first, headers=limited, timeout=60).is_success
    refused = httpx.post(url, json=first, headers=limited, timeout=60)
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) > 0
    # LRU: one model at a time, so a request for another evicts the idle one.
    assert client.chat.completions.create(model="second:1", **chat).choices  # type: ignore[call-overload]
    assert manager.model("first:1")["state"] == "COLD"
    assert manager.model("second:1")["node"] is not None
    # Drain: an unload lets the stream under way finish.
    stream = client.chat.completions.create(
        model="second:1",
        messages=[{"role": "user", "content": "Tell a long story."}],
        max_tokens=200,
        temperature=0,
        stream=True,
    )
    chunks = iter(stream)
    next(chunks)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        unloading = pool.submit(manager.request, "POST", "/models/second:1/unload")
        manager.wait_state("second:1", "UNLOADING", timeout=30)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices]
        assert finish[-1] == "length", "the stream ran to its end"
        assert unloading.result(timeout=60).status_code == 200
    manager.wait_state("second:1", "COLD", timeout=30)
    # Fallback: no node can take nowhere:1 (it needs a node_z), second:1 answers for it.
    reply = httpx.post(
        url,
        json={"model": "nowhere:1", **chat},
        headers={"Authorization": f"Bearer {CLIENT_KEY}"},
        timeout=120,
    )
    assert reply.status_code == 200, reply.text
    assert reply.headers["x-pool-fallback-from"] == "nowhere:1"
    # TTL: first:1, used again, walks COOLING to COLD by itself.
    assert client.chat.completions.create(model="first:1", **chat).choices  # type: ignore[call-overload]
    manager.wait_state("first:1", "COOLING", timeout=30)
    manager.wait_state("first:1", "COLD", timeout=30)
    # Metrics count all of it.
    metrics = manager.request("GET", "/metrics").text
    assert 'pool_model_unloads_total{model="first:1",reason="ttl"} 1.0' in metrics
    assert 'pool_model_evictions_total{model="first:1"' in metrics
    fell_back = 'pool_fallbacks_total{fallback="second:1",model="nowhere:1",reason="load_failed"}'
    assert f"{fell_back} 1.0" in metrics


@pytest.fixture
def node_b_back(ray_cluster: LocalRayCluster) -> Iterator[None]:
    """For a test that kills or freezes node B: a new node B for the tests after it.
    Listed after `start_manager`, so that it ends first: a frozen worker is killed
    before the manager's teardown looks for workers left behind."""
    yield
    ray_cluster.kill_frozen()
    ray_cluster.revive("node_b")


def test_a_lost_node_s_model_comes_back_on_another_node_and_only_what_ran_there_is_lost(
    start_manager: ManagerFactory, ray_cluster: LocalRayCluster, node_b_back: None
) -> None:
    ids = ray_cluster.node_ids
    manager = _one_on_a_one_preferring_b(start_manager, ray_cluster, pinned=True)
    client = _client(manager)
    assert _chat(client, PREFERS_B)
    assert manager.model(PREFERS_B)["node"]["node_id"] == ids["node_b"]
    events = _EventLog(manager)

    results: list[str] = []
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            try:
                _chat(client, PREFERS_B)
                results.append("ok")
            except openai.APIError as exc:
                results.append(f"failed: {exc}")

    _lose_node_b_under_traffic(
        manager, ids, traffic, 2, stop, results, lambda: ray_cluster.kill("node_b")
    )
    failed = [r for r in results if r != "ok"]
    # Two clients: at most the two requests generating on node B when it died fail.
    assert len(failed) <= 2, failed
    assert results[-4:] == ["ok"] * 4
    assert manager.model(PINNED_TO_A)["state"] == "HOT", "node A's model never noticed"
    lost = events.wait_for(lambda e: e.get("type") == "node" and e["change"] == "lost")
    assert lost["node"]["node_id"] == ids["node_b"]
    assert events.wait_for(lambda e: e.get("model") == PREFERS_B and e.get("detail") == "node lost")
    events.close()


def test_requests_queued_on_a_frozen_node_are_sent_again_at_once(
    start_manager: ManagerFactory, ray_cluster: LocalRayCluster, node_b_back: None
) -> None:
    """A node that hangs (or loses its network) resets no connection: without the pool
    breaking them when Ray declares the node dead, the requests queued there would wait
    out their idle timeout (timeout_seconds 300 here). One slot, four streaming clients:
    only the stream generating on node B when it froze may fail."""
    ids = ray_cluster.node_ids
    entry = model_entry(
        PREFERS_B,
        placement={"node": ids["node_b"]},
        max_concurrent=1,
        timeout_seconds=300,
    )
    manager = _cluster_manager(start_manager, ray_cluster, [entry])
    client = _client(manager)
    assert _chat(client, PREFERS_B)
    assert manager.model(PREFERS_B)["node"]["node_id"] == ids["node_b"]

    results: list[str] = []
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            try:
                stream = client.chat.completions.create(
                    model=PREFERS_B,
                    messages=[{"role": "user", "content": "Count to twenty."}],
                    max_tokens=24,
                    stream=True,
                )
                pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
                results.append("ok" if pieces else "empty")
            except openai.APIError as exc:
                results.append(f"failed: {exc}")

    _lose_node_b_under_traffic(
        manager, ids, traffic, 4, stop, results, lambda: ray_cluster.freeze("node_b")
    )
    failed = [r for r in results if r != "ok"]
    assert len(failed) <= 1, f"more than the one generating stream lost: {failed}"


def _lose_node_b_under_traffic(
    manager: Manager,
    ids: dict[str, str],
    traffic: Callable[[], None],
    clients: int,
    stop: threading.Event,
    results: list[str],
    lose: Callable[[], None],
) -> None:
    """`clients` threads run `traffic` (each result appended to `results`) while node B is
    lost; returns once PREFERS_B serves from node A and 8 more requests have ended."""
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        runs = [pool.submit(traffic) for _ in range(clients)]
        try:
            wait_for(lambda: len(results) >= 4, 60, message="traffic before node B is lost")
            lose()
            lost_at = len(results)
            wait_for(
                lambda: (
                    (m := manager.model(PREFERS_B))["node"] is not None
                    and m["node"]["node_id"] == ids["node_a"]
                ),
                90,
                interval=0.2,
                message=f"{PREFERS_B} on node A",
            )
            wait_for(
                lambda: len(results) >= lost_at + 8,
                90,
                message="traffic after node B was lost (requests stuck there?)",
            )
        finally:
            stop.set()  # the clients stop whatever happened, so the pool can shut down
        for run in runs:
            run.result(timeout=150)


class _EventLog:
    """GET /events read on a thread from now on; `wait_for` finds an event in it."""

    def __init__(self, manager: Manager) -> None:
        self._events: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._url = f"{manager.url}/events"
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        with httpx.stream("GET", self._url, timeout=None) as reply:
            for line in reply.iter_lines():
                if self._stop.is_set():
                    return
                if line.startswith("data:"):
                    self._events.append(json.loads(line[5:]))

    def wait_for(self, match: Any, timeout: float = 60) -> dict[str, Any]:
        found: dict[str, Any] = wait_for(
            lambda: next((e for e in list(self._events) if match(e)), None),
            timeout,
            message="an event",
        )
        return found

    def close(self) -> None:
        self._stop.set()  # the reader ends at the stream's next line (a snapshot, 2 s)


def test_a_replica_set_serves_one_model_from_both_nodes(
    start_manager: ManagerFactory, ray_cluster: LocalRayCluster
) -> None:
    manager = _cluster_manager(
        start_manager, ray_cluster, [model_entry("replicated:1", replicas=2, warmup=True)]
    )
    wait_for(
        lambda: len(manager.model("replicated:1")["replicas"]) == 2, 120, message="two replicas"
    )
    replicas = manager.model("replicated:1")["replicas"]
    assert {r["node"]["node_id"] for r in replicas} == set(ray_cluster.node_ids.values())
    client = _client(manager)
    served_before = [_served(r) for r in replicas]
    for i in range(20):
        reply = client.chat.completions.create(
            model="replicated:1",
            messages=[{"role": "user", "content": f"Conversation {i}: say hi."}],
            max_tokens=1,
        )
        assert reply.choices
    grown = [_served(r) - before for r, before in zip(replicas, served_before, strict=True)]
    assert sum(grown) == 20 and min(grown) > 0, f"both nodes serve: {grown}"


def _served(replica: dict[str, Any]) -> int:
    served: int = httpx.get(f"{replica['endpoint']}/health", timeout=10).json()["requests_served"]
    return served
