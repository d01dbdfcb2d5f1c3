"""The swap benchmark: more models than fit, traffic that jumps between them (issue 16).

Both sides run on the same files, in one run, their rounds interleaved in rotating order:
the pool, measured through its manager's `/v1/chat/completions` (the endpoint agents are
told to use), and llama.cpp's `llama-server` in router mode, built from the llama.cpp
llama-cpp-python vendors with this project's kernel patches (the same kernels as the
pool's workers), once with one thread per instance and once with two. What it measures:

- **swap**: `MODELS` models, each on its own byte-for-byte copy of SmolLM2's file (its own
  inode and page cache), `SLOTS_TAKEN` of them loaded at most (`max_concurrent_models`;
  the router's `--models-max`). `CLIENTS` clients send `requests` short streamed chat
  completions between them, each for a model drawn from a Zipf popularity (seeded: every
  side gets the same sequence), each client sending its next request when its last one
  ended. Per side and round: wall time, completed requests per second, latency and time
  to first token (p50/p95/p99), loads and evictions, and every request that did not
  complete, by kind.
- **memory**: the same two models loaded on one side at a time and idle: PSS (and RSS) of
  every process. The pool's manager and workers make the pool's figure; its spare
  workers are a line of their own, measured once holding no weights and once with the
  weights they load ahead.
- **cold starts in succession**: every model COLD, then `SUCCESSION` requests, each for
  another COLD model, sent 1 s apart without waiting for the earlier ones; time to first
  token of each. The pool with room for them all; the router with `--models-max` as many.

`--quick` (CI) runs the pool side only, on fewer requests, and fails when any request
fails, as the full run does; with `--router` or `--build-router` the router runs too.
`--write-docs` writes docs/bench_swap.json and the swap section of docs/BENCHMARKS.md;
`python scripts/doc_sections.py` renders that section again from the JSON.
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
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import doc_sections
import httpx
import llama_router
import psutil
from bench_common import cpu_model, git
from bench_harness import (
    LOAD_TIMEOUT_S,
    SAMPLING,
    THREADS,
    Manager,
    StreamResult,
    all_idle,
    file_copies,
    log,
    machine_busy_seconds,
    model_file,
    stream_http,
    wait_until_quiet,
)
from bench_measure import question

from model_service.preload import FREE_DELAY_SECONDS
from pool_manager.ports import free_port, free_port_range
from pool_manager.spares import BURST_HOLD_SECONDS, SURPLUS_GRACE_SECONDS

REPO = Path(__file__).resolve().parent.parent
DOCS_JSON = REPO / "docs" / "bench_swap.json"
SECTION = "swap"

MODELS = 4  # models in the swap workload
SUCCESSION = 5  # cold starts in succession (one more model, registered for that phase)
SLOTS_TAKEN = 2  # max_concurrent_models / --models-max in the swap workload
CLIENTS = 4
ZIPF_S = 1.0  # popularity of the k-th model ~ 1 / k**s: 48 %, 24 %, 16 %, 12 % for 4
SLOWEST_KEPT = 10  # requests per run whose time is split in the JSON
MAX_TOKENS = 16  # short replies: the swaps, not the decoding, are what is measured
N_CTX, SLOTS = 2048, 4  # per model: 4 sequences of 2,048 tokens (8,192 cells), both sides
SUCCESSION_GAP_S = 1.0
REQUEST_TIMEOUT_S = 180.0
MB = 2**20

# Targets of issue 16, against the router with one thread per instance.
TARGET_RPS_RATIO = 1.5
TARGET_P99_RATIO = 0.5
TARGET_SUCCESSION_RATIO = 0.3
TARGET_MEMORY_RATIO = 1.5


@dataclass(frozen=True)
class Plan:
    requests: int
    rounds: int
    succession_rounds: int

    @staticmethod
    def make(quick: bool) -> Plan:
        return Plan(40, 1, 1) if quick else Plan(200, 3, 3)


def model_ids(count: int) -> list[str]:
    return [f"swap-{i}" for i in range(1, count + 1)]


def zipf_sequence(models: list[str], count: int, seed: int) -> list[str]:
    """`count` model names drawn with popularity ~ 1 / rank**ZIPF_S (rank 1 = first)."""
    weights = [1 / (rank**ZIPF_S) for rank in range(1, len(models) + 1)]
    return random.Random(seed).choices(models, weights=weights, k=count)


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100), linear between the two nearest; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def spread(values: list[float]) -> dict[str, Any]:
    """Milliseconds: n, p50, p95, p99, max of seconds `values`."""
    ms = [v * 1000 for v in values]
    return {
        "n": len(ms),
        **{f"p{q}": _round(percentile(ms, q)) for q in (50, 95, 99)},
        "max": _round(max(ms)) if ms else None,
    }


def _round(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


def failure_kind(result: StreamResult) -> str | None:
    """None for a complete reply, else what went wrong in a few words: 'HTTP 503
    pool_full', 'timeout', a transport error's name, 'incomplete'."""
    if result.error is None:
        return None if result.done else "incomplete stream"
    if result.error.startswith("HTTP "):
        status, _, body = result.error.partition(": ")
        try:
            code = json.loads(body).get("error", {}).get("code")
        except (ValueError, AttributeError):
            code = None
        return f"{status} {code}" if code else status
    if result.error.startswith("no end within"):
        return "timeout"
    return result.error.split(":", 1)[0]


# --- the two sides ---------------------------------------------------------------------------


class SwapManager(Manager):
    """The benchmark's manager with the swap workload's registry: every model on its own
    copy of the file, the same context shape as the router's instances, no warmup."""

    def __init__(self, folder: Path, copies: list[Path]) -> None:
        super().__init__(folder, q8_0_copy=copies[0])
        self.copies = copies
        # Room for every model at once, and then some: ports are not what is measured.
        self.port_range = free_port_range(2 * len(copies))

    def config(self) -> dict[str, Any]:
        return {
            **super().config(),
            "max_concurrent_models": SLOTS_TAKEN,
            "admission_timeout_seconds": REQUEST_TIMEOUT_S,
        }

    def registry(self) -> list[dict[str, Any]]:
        common = {
            "backend": "llama_cpp",
            "n_ctx": N_CTX,
            "n_threads": THREADS,
            "max_concurrent": SLOTS,
            "max_queue": 64,
            "timeout_seconds": REQUEST_TIMEOUT_S,
            "ttl_minutes": 60,
            "warmup": False,
        }
        names = model_ids(len(self.copies))
        return [
            {"model_id": name, **common, "model_path": str(path)}
            for name, path in zip(names, self.copies, strict=True)
        ]


@dataclass
class Side:
    """One side of the comparison, as the workload sees it."""

    key: str
    label: str
    url: str  # chat completions
    reset: Callable[[], Awaitable[None]]  # every model unloaded, the side idle
    counters: Callable[[], Awaitable[dict[str, int]]]  # loads and evictions so far
    pids: Callable[[], list[int]]  # every process of the side
    notes: dict[str, Any] = field(default_factory=dict)


def pool_side(manager: SwapManager) -> Side:
    async def reset() -> None:
        for name in model_ids(len(manager.copies)):
            if (await manager.model(name))["state"] != "COLD":
                reply = await manager.api.post(f"/models/{name}/unload", timeout=LOAD_TIMEOUT_S)
                reply.raise_for_status()
        await _steady_spares(manager)

    async def counters() -> dict[str, int]:
        text = (await manager.api.get("/metrics")).text
        return {
            "loads": _metric_sum(text, "pool_model_loads_total", 'result="ok"'),
            "evictions": _metric_sum(text, "pool_model_evictions_total"),
        }

    def pids() -> list[int]:
        assert manager.pid is not None
        return [manager.pid, *(c.pid for c in manager.note_children())]

    return Side(
        "pool",
        "pool, through the manager (8050's /v1)",
        f"{manager.url}/v1/chat/completions",
        reset,
        counters,
        pids,
    )


async def _steady_spares(manager: Manager) -> None:
    """Wait for the configured number of spares, ready: unloaded workers come back as
    spares and a burst of loads keeps one more, and that surplus goes after a while.
    Runs and memory start from the steady state, not from that surplus."""
    spares = int(manager.config()["spare_workers"])
    await _wait_for(
        lambda: _spare_count(manager),
        lambda n: n <= spares,
        BURST_HOLD_SECONDS + SURPLUS_GRACE_SECONDS + 10,
    )
    await manager.wait_spare()


async def _spare_count(manager: Manager) -> int:
    return int((await manager.health())["spare_workers"])


async def _wait_for(
    probe: Callable[[], Awaitable[Any]], done: Callable[[Any], bool], timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while not done(await probe()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"not settled within {timeout:g} s")
        await asyncio.sleep(0.1)


def _metric_sum(text: str, name: str, label: str = "") -> int:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and label in line:
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


class RouterWatch:
    """Counts a router's loads and evictions: the instances it starts and stops, seen by
    polling its process tree (llama-server reports neither)."""

    def __init__(self, router: llama_router.Router) -> None:
        self.router = router
        self.started: set[int] = set()
        self.stopped: set[int] = set()
        self._task: asyncio.Task[None] | None = None

    def instances(self) -> set[int]:
        assert self.router.process is not None
        return set(self.router.pids()) - {self.router.process.pid}

    async def _poll(self) -> None:
        while True:
            now = self.instances()
            self.stopped |= self.started - now
            self.started |= now
            await asyncio.sleep(0.02)

    def start(self) -> None:
        self.started = self.instances()
        self._task = asyncio.create_task(self._poll())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


def router_side(key: str, label: str, router: llama_router.Router, names: list[str]) -> Side:
    watch = RouterWatch(router)

    async def reset() -> None:
        for name in names:
            await router.unload(name)
        await _wait_idle(router.pids())
        await watch.stop()
        watch.start()

    async def counters() -> dict[str, int]:
        return {"loads": len(watch.started), "evictions": len(watch.stopped)}

    side = Side(key, label, f"{router.url}/v1/chat/completions", reset, counters, router.pids)
    side.notes["args"] = ["--models-dir", "MODELS_DIR", *router.args[2:]]
    return side


async def _wait_idle(pids: list[int], timeout: float = 30.0) -> None:
    processes = []
    for pid in pids:
        try:
            processes.append(psutil.Process(pid))
        except psutil.Error:
            continue
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await all_idle(processes):
            return
    raise RuntimeError(f"processes {pids} not idle within {timeout:g} s")


# --- the measurements ------------------------------------------------------------------------


def request_body(model: str, i: int) -> dict[str, Any]:
    return {
        "model": model,
        "messages": question(i),
        "max_tokens": MAX_TOKENS,
        "stream": True,
        "stream_options": {"include_usage": True},
        "seed": 1000 + i,
        **SAMPLING,
    }


def new_client() -> httpx.AsyncClient:
    """A new connection per request, on both sides alike."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(REQUEST_TIMEOUT_S, connect=30.0),
        limits=httpx.Limits(max_keepalive_connections=0),
        trust_env=False,
    )


async def swap_run(side: Side, sequence: list[str], names: dict[str, str]) -> dict[str, Any]:
    """The workload once on `side` (reset first): CLIENTS clients through `sequence`."""
    await side.reset()
    before = await side.counters()
    results: list[tuple[str, StreamResult]] = []
    queue = list(enumerate(sequence))
    queue.reverse()

    async def client(http: httpx.AsyncClient) -> None:
        while queue:
            i, model = queue.pop()
            result = await stream_http(http, side.url, request_body(names[model], i))
            results.append((model, result))

    async with new_client() as http:
        busy_before = machine_busy_seconds()
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(CLIENTS)))
        wall = time.perf_counter() - started
        cpu = machine_cpu(machine_busy_seconds() - busy_before, wall)
    after = await side.counters()
    done = [r for _, r in results if failure_kind(r) is None]
    failures = Counter(kind for _, r in results if (kind := failure_kind(r)) is not None)
    latencies = [r.ended_at - r.sent_at for r in done if r.ended_at is not None]
    ttfts = [t for r in done if (t := r.ttft_s) is not None]
    waits = [w for r in done if (w := r.pool_wait_s) is not None]
    return {
        "requests": len(results),
        "completed": len(done),
        "failed_by_kind": dict(failures),
        "wall_s": round(wall, 2),
        "completed_per_s": round(len(done) / wall, 3),
        "latency_ms": spread(latencies),
        "ttft_ms": spread(ttfts),
        # The pool's own Server-Timing (none from the router): where its tail goes.
        "pool_wait_ms": spread(waits) if waits else None,
        "slowest": slowest(done),
        "loads": after["loads"] - before["loads"],
        "evictions": after["evictions"] - before["evictions"],
        "machine_cpu": cpu,
        "busy_core_s_per_completed": round(cpu["busy_core_s"] / len(done), 3) if done else None,
    }


def machine_cpu(busy_s: float, wall_s: float) -> dict[str, float]:
    """The whole machine's CPU over a round (`busy_s`, from machine_busy_seconds, in
    `wall_s`): busy and idle core-seconds and the busy share. Whether a side is bound by
    the cores; llama.cpp's threads spin a little while they wait, and that counts as busy
    on both sides alike."""
    capacity = wall_s * (psutil.cpu_count() or 1)
    return {
        "busy_core_s": round(busy_s, 1),
        "idle_core_s": round(max(0.0, capacity - busy_s), 1),
        "busy_share": round(min(1.0, busy_s / capacity), 3) if capacity > 0 else 0.0,
    }


def slowest(done: list[StreamResult], count: int = SLOWEST_KEPT) -> list[dict[str, Any]]:
    """The slowest requests, each split into the pool's wait to place the model and the
    rest (the worker's queue and generation, the relay)."""
    ended = [(r.ended_at - r.sent_at, r) for r in done if r.ended_at is not None]
    ended.sort(key=lambda pair: pair[0], reverse=True)
    return [
        {
            "latency_ms": _round(latency * 1000),
            "ttft_ms": _round(r.ttft_s * 1000) if r.ttft_s is not None else None,
            "pool_wait_ms": _round(r.pool_wait_s * 1000) if r.pool_wait_s is not None else None,
        }
        for latency, r in ended[:count]
    ]


async def succession_run(side: Side, models: list[str]) -> dict[str, Any]:
    """Every model COLD, then one request each, SUCCESSION_GAP_S apart: TTFT of each."""
    await side.reset()

    async def one(http: httpx.AsyncClient, i: int, model: str) -> StreamResult:
        await asyncio.sleep(i * SUCCESSION_GAP_S)
        body = {**request_body(model, 300 + i), "max_tokens": 1}
        return await stream_http(http, side.url, body)

    async with new_client() as http:
        results = await asyncio.gather(*(one(http, i, m) for i, m in enumerate(models)))
    ttfts = [r.ttft_s for r in results]
    return {
        "ttft_ms": [_round(t * 1000) if t is not None else None for t in ttfts],
        "failed_by_kind": dict(Counter(k for r in results if (k := failure_kind(r)))),
    }


def pss_mb(pids: list[int]) -> dict[str, float]:
    """PSS and RSS in MB summed over `pids` (gone ones count nothing)."""
    pss = rss = 0
    for pid in pids:
        try:
            info = psutil.Process(pid).memory_full_info()
        except psutil.Error:
            continue
        pss += getattr(info, "pss", 0)
        rss += info.rss
    return {"pss_mb": round(pss / MB, 1), "rss_mb": round(rss / MB, 1)}


async def pool_memory(manager: SwapManager, loaded: list[str]) -> dict[str, Any]:
    """`loaded` HOT and idle, nothing else: the manager, workers and fork server (its
    imports' pages are shared with the workers it forked: PSS splits them), then the
    spares without weights ahead and with them."""
    worker_pids: list[int] = []
    for name in loaded:
        reply = await manager.api.post(f"/models/{name}/load", timeout=LOAD_TIMEOUT_S)
        reply.raise_for_status()
        worker_pids.append(int(reply.json()["pid"]))
    fork_server: int | None = (await manager.health())["fork_server_pid"]
    pool_pids = [*worker_pids, *([fork_server] if fork_server else [])]

    async def spare_pids() -> list[int]:
        return [c.pid for c in manager.note_children() if c.pid not in pool_pids]

    await _configure(manager, spare_preload=0)
    await asyncio.sleep(FREE_DELAY_SECONDS + 1)  # a worker frees what its spare held ahead
    await _steady_spares(manager)
    assert manager.pid is not None
    pool = pss_mb([manager.pid, *pool_pids])
    spares_bare = pss_mb(await spare_pids())
    await _configure(manager, spare_preload=4)
    others = [n for n in model_ids(len(manager.copies)) if n not in loaded]
    await manager.wait_spare(preloaded=others[0])
    await asyncio.sleep(1.0)
    spares_ahead = pss_mb(await spare_pids())
    return {
        "pool": pool,
        "workers": len(worker_pids),
        "fork_server": fork_server is not None,
        "spares_no_weights_ahead": spares_bare,
        "spares_with_weights_ahead": spares_ahead,
    }


async def router_memory(router: llama_router.Router, loaded: list[str]) -> dict[str, Any]:
    for name in loaded:
        await router.load(name)
    await _wait_idle(router.pids())
    return {"router": pss_mb(router.pids()), "instances": len(router.pids()) - 1}


async def _configure(manager: Manager, **changes: Any) -> None:
    reply = await manager.api.patch("/config", json=changes)
    reply.raise_for_status()


# --- the run ---------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> dict[str, Any]:
    plan = Plan.make(args.quick)
    folder = Path(tempfile.mkdtemp(prefix="bench-swap-"))
    copies = file_copies(model_file(), SUCCESSION)
    names = model_ids(SUCCESSION)
    swap_models = names[:MODELS]
    results: dict[str, Any] = {
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpu": cpu_model(), "cores": psutil.cpu_count()},
        "quick": args.quick,
        "workload": {
            "models": MODELS,
            "slots": SLOTS_TAKEN,
            "clients": CLIENTS,
            "requests": plan.requests,
            "rounds": plan.rounds,
            "zipf_s": ZIPF_S,
            "max_tokens": MAX_TOKENS,
            "n_ctx_per_sequence": N_CTX,
            "sequences_per_model": SLOTS,
            "pool_threads_per_worker": THREADS,
            "succession": SUCCESSION,
            "succession_gap_s": SUCCESSION_GAP_S,
        },
        "problems": [],
    }
    if args.wait_quiet:
        waited, busy = wait_until_quiet(args.wait_quiet, 2.0)
        results["waited_for_quiet_s"], results["busy_cores_at_start"] = waited, busy
    manager = SwapManager(folder / "pool", copies)
    (folder / "pool").mkdir()
    routers: dict[str, llama_router.Router] = {}
    try:
        await manager.start()
        sides = [pool_side(manager)]
        if args.router is not None:
            for threads in (1, 2):
                key = f"router_t{threads}"
                router_args = router_arguments(threads, SLOTS_TAKEN)
                routers[key] = await start_router(args.router, folder / key, copies, router_args)
                label = f"llama-server router, {threads} thread(s) per instance"
                sides.append(router_side(key, label, routers[key], swap_models))
            routers["router_succession"] = await start_router(
                args.router, folder / "succession", copies, router_arguments(1, SUCCESSION)
            )
            results["router"] = {
                "binary": str(args.router),
                "version": llama_router.version(args.router),
                "patches": llama_router.patches_applied(args.router),
                "args": {k: s.notes["args"] for s in sides[1:] for k in [s.key]},
            }
        sequence = zipf_sequence(swap_models, plan.requests, seed=16)
        results["sequence_counts"] = dict(Counter(sequence))
        same_names = {name: name for name in names}
        swap: dict[str, list[dict[str, Any]]] = {side.key: [] for side in sides}
        for r in range(plan.rounds):
            for side in sides[r % len(sides) :] + sides[: r % len(sides)]:
                log(f"swap round {r + 1}/{plan.rounds}: {side.label}")
                swap[side.key].append(await swap_run(side, sequence, same_names))
        results["swap"] = {key: summarize_swap(runs) for key, runs in swap.items()}

        await _configure(manager, max_concurrent_models=SUCCESSION)
        succession_sides = [sides[0]]
        if "router_succession" in routers:
            succession_sides.append(
                router_side(
                    "router_t1",
                    "llama-server router, 1 thread per instance, --models-max 5",
                    routers["router_succession"],
                    names,
                )
            )
        succession: dict[str, list[dict[str, Any]]] = {s.key: [] for s in succession_sides}
        for r in range(plan.succession_rounds):
            for side in succession_sides[r % 2 :] + succession_sides[: r % 2]:
                log(f"cold starts in succession, round {r + 1}: {side.label}")
                succession[side.key].append(await succession_run(side, names))
        results["succession"] = {k: summarize_succession(v) for k, v in succession.items()}

        log("memory: the pool")
        await sides[0].reset()
        for router in routers.values():
            for name in names:
                await router.unload(name)
        loaded = swap_models[:SLOTS_TAKEN]
        results["memory"] = {"loaded": loaded, **await pool_memory(manager, loaded)}
        if "router_t1" in routers:
            log("memory: the router")
            await sides[0].reset()
            # The pool's spare would map the same files, and share their pages (PSS).
            await _configure(manager, spare_preload=0)
            await manager.wait_spare()
            results["memory"].update(await router_memory(routers["router_t1"], loaded))
    finally:
        for router in routers.values():
            results["problems"] += await router.stop()
        results["problems"] += await manager.stop()
        if args.keep:
            log(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)
    results["failed_requests"] = count_pool_failures(results)
    results["checks"] = checks(results)
    return results


def router_arguments(threads: int, models_max: int) -> tuple[str, ...]:
    return (
        *("-np", str(SLOTS), "-c", str(N_CTX * SLOTS)),
        *("-t", str(threads), "-tb", str(threads)),
        *("--models-max", str(models_max)),
    )


async def start_router(
    binary: Path, folder: Path, copies: list[Path], args: tuple[str, ...]
) -> llama_router.Router:
    folder.mkdir(parents=True)
    models = dict(zip(model_ids(len(copies)), copies, strict=True))
    router = llama_router.Router(binary, folder, free_port(), models, args=args)
    log(f"starting llama-server (router mode) on {router.url}: {' '.join(args)}")
    await router.start()
    return router


def summarize_swap(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def med(key: str, *path: str) -> float | None:
        values = []
        for run_ in runs:
            value: Any = run_[key]
            for step in path:
                value = value[step]
            if value is not None:
                values.append(value)
        return _round(statistics.median(values), 3) if values else None

    return {
        "runs": runs,
        "completed_per_s": med("completed_per_s"),
        "wall_s": med("wall_s"),
        "latency_p50_ms": med("latency_ms", "p50"),
        "latency_p95_ms": med("latency_ms", "p95"),
        "latency_p99_ms": med("latency_ms", "p99"),
        "ttft_p50_ms": med("ttft_ms", "p50"),
        "loads": med("loads"),
        "evictions": med("evictions"),
        "busy_share": med("machine_cpu", "busy_share"),
        "busy_core_s_per_completed": med("busy_core_s_per_completed"),
        "failed": sum(sum(r["failed_by_kind"].values()) for r in runs),
    }


def summarize_succession(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ttfts = [t for run_ in runs for t in run_["ttft_ms"] if t is not None]
    return {
        "runs": runs,
        "ttft_ms_median": _round(statistics.median(ttfts)) if ttfts else None,
        "ttft_ms_max": max(ttfts) if ttfts else None,
        "failed": sum(sum(r["failed_by_kind"].values()) for r in runs),
    }


def count_pool_failures(results: dict[str, Any]) -> int:
    """Requests that failed on the pool's side (the figure every run must keep at 0)."""
    return int(results["swap"]["pool"]["failed"] + results["succession"]["pool"]["failed"])


def ratio(ours: float | None, theirs: float | None) -> float | None:
    return None if ours is None or not theirs else round(ours / theirs, 2)


def checks(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets against the router with one thread per instance; None where
    the router did not run."""
    swap, succession, memory = results["swap"], results["succession"], results["memory"]
    pool, router = swap["pool"], swap.get("router_t1")
    failed = results["failed_requests"]
    rows = [("no refused or failed request (pool)", failed, "0", failed == 0)]
    if router is not None:
        rps = ratio(pool["completed_per_s"], router["completed_per_s"])
        p99 = ratio(pool["latency_p99_ms"], router["latency_p99_ms"])
        cold = ratio(
            succession["pool"]["ttft_ms_median"], succession["router_t1"]["ttft_ms_median"]
        )
        mem = ratio(memory["pool"]["pss_mb"], memory["router"]["pss_mb"])
        rows += [
            ("completed requests per second", rps, f">= {TARGET_RPS_RATIO}x", _ge(rps, 1.5)),
            ("latency p99", p99, f"<= {TARGET_P99_RATIO}x", _le(p99, TARGET_P99_RATIO)),
            (
                "five cold starts 1 s apart, median TTFT",
                cold,
                f"<= {TARGET_SUCCESSION_RATIO}x",
                _le(cold, TARGET_SUCCESSION_RATIO),
            ),
            ("memory, PSS (spares apart)", mem, f"<= {TARGET_MEMORY_RATIO}x", _le(mem, 1.5)),
        ]
    return [{"name": n, "value": v, "target": t, "ok": ok} for n, v, t, ok in rows]


def _ge(value: float | None, floor: float) -> bool | None:
    return None if value is None else value >= floor


def _le(value: float | None, ceiling: float) -> bool | None:
    return None if value is None else value <= ceiling


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/bench_swap.py", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="40 requests, one round")
    router = parser.add_mutually_exclusive_group()
    router.add_argument("--router", type=Path, metavar="LLAMA_SERVER", help="its binary")
    router.add_argument(
        "--build-router",
        action="store_true",
        help="build llama-server with this project's kernel patches (cached; ~6 minutes once)",
    )
    parser.add_argument("--json-out", type=Path, help="write the run here as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs)")
    parser.add_argument(
        "--write-docs",
        action="store_true",
        help="docs/bench_swap.json and its BENCHMARKS.md section",
    )
    parser.add_argument(
        "--wait-quiet", type=float, default=0.0, metavar="SECONDS", help="wait for a quiet machine"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.build_router:
        args.router = llama_router.build(patched=True)
    results = asyncio.run(run(args))
    text = json.dumps(results, indent=2) + "\n"
    if args.json_out:
        args.json_out.write_text(text)
    if args.write_docs:
        DOCS_JSON.write_text(text)
        doc_sections.write_section(SECTION, doc_sections.swap_section(results))
    for check in results["checks"]:
        log(f"{check['name']}: {check['value']} (target {check['target']}): {check['ok']}")
    for phase in ("swap", "succession"):
        for side, found in results[phase].items():
            for i, run_ in enumerate(found["runs"]):
                if run_["failed_by_kind"]:
                    log(f"{phase}, {side}, round {i + 1}: not completed {run_['failed_by_kind']}")
    for problem in results["problems"]:
        log(f"problem: {problem}")
    ok = results["failed_requests"] == 0 and not results["problems"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
