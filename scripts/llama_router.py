"""llama.cpp's own `llama-server` in router mode, for scripts/bench.py's side-by-side run.

`build()` compiles the `llama-server` target from the llama.cpp that llama-cpp-python
vendors (its source distribution, fetched with pip from the package index). By default
with this project's kernel patches (patches/*.patch, applied with `git apply -p1` in the
unpacked source distribution's root before cmake, exactly as scripts/build_llama_cpp.py
builds the pool's wheel), so a side-by-side run compares the same weights on the same
kernels; `build(patched=False)` builds stock llama.cpp. Each once, into its own cache
folder outside the repository (the patched one named after the patches' digest,
`build_llama_cpp.patched_version()`): about 6 minutes on 2 cores.
`batched_bench()` runs llama.cpp's `llama-batched-bench` tool from the same build: its bare
decode loop (no server, no sampling), the most any server on these kernels could deliver.
`Router` runs it with `--models-dir` (a folder of links to the GGUF files, each model's
name is its file name without `.gguf`), loads models on demand as the router does, and
stops it and every instance it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
from build_llama_cpp import PATCHES, VERSION, cache_root, fetch_sdist, patched_version

START_TIMEOUT_S = 60.0
STATUS_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
# The anchor's settings (SPEC §9): 8 slots over an 8,192-token context, 2 threads (for
# prompts too, `-tb`: as the pool's workers, n_threads = n_threads_batch = 2).
ROUTER_ARGS = ("-np", "8", "-t", "2", "-tb", "2", "-c", "8192", "--models-max", "4")
CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",
    "-DLLAMA_CURL=OFF",  # no downloads: models come from --models-dir
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",  # the prebuilt web UI would be downloaded
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
)


def _log(message: str) -> None:
    print(f"[llama-router] {message}", file=sys.stderr, flush=True)


def default_build_dir(patched: bool = True) -> Path:
    """The cache folder of one build: stock, or patched (named after the patches' digest)."""
    return cache_root() / f"llama-server-{patched_version() if patched else VERSION}"


def build(folder: Path | None = None, patched: bool = True, target: str = "llama-server") -> Path:
    """The `target` binary (llama-server, or another of llama.cpp's tools such as
    llama-batched-bench), built into `folder` first if it is not there yet.

    `patched`: apply patches/*.patch to the source first (as the pool's wheel is built).
    Raises RuntimeError (with the tool's output's end) if a step fails.
    """
    folder = folder or default_build_dir(patched)
    binary = folder / "build" / "bin" / target
    if binary.is_file():
        return binary
    source = _source(folder, patched)
    llama_cpp = source / "vendor" / "llama.cpp"
    if not (folder / "build" / "CMakeCache.txt").is_file():
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        _log(f"configuring {'patched' if patched else 'stock'} llama.cpp (cmake) in {folder}")
        build_dir = str(folder / "build")
        _run(["cmake", "-S", str(llama_cpp), "-B", build_dir, *generator, *CMAKE_OPTIONS])
    _log(f"building {target} (about 6 minutes on 2 cores, less beside an earlier build)")
    jobs = str(len(os.sched_getaffinity(0)))
    _run(["cmake", "--build", str(folder / "build"), "--target", target, "-j", jobs])
    if not binary.is_file():
        raise RuntimeError(f"the build finished without {binary}")
    return binary


def _source(folder: Path, patched: bool) -> Path:
    """The unpacked source distribution under `folder`, patched if asked (once: a marker
    file names the patches applied, so a half-patched tree is never built)."""
    source = folder / f"llama_cpp_python-{VERSION}"
    marker = folder / "patched"
    if patched and source.is_dir() and not marker.is_file():
        shutil.rmtree(source)  # unpacked but not (fully) patched: start again
    if not source.is_dir():
        stock = default_build_dir(patched=False) / source.name
        if stock != source and stock.is_dir():  # the stock build's copy: no download
            shutil.copytree(stock, source, symlinks=True)
        else:
            source = fetch_sdist(VERSION, folder)
        if patched:
            for patch in PATCHES:
                _log(f"applying {patch.name}")
                _run(["git", "apply", "-p1", str(patch)], cwd=source)
            marker.write_text("".join(f"{p.name}\n" for p in PATCHES))
    return source


def patches_applied(binary: Path) -> list[str]:
    """The patches a build was made with (empty for a stock build)."""
    marker = binary.parent.parent.parent / "patched"
    return marker.read_text().split() if marker.is_file() else []


def _run(command: list[str], cwd: Path | None = None) -> None:
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = (done.stdout + done.stderr)[-2000:]
        raise RuntimeError(f"{' '.join(command[:4])} ... failed ({done.returncode}):\n{tail}")


def batched_bench(
    binary: Path,
    model: Path,
    streams: int,
    prompt_tokens: int,
    tokens: int,
    threads: int,
    cells: int,
) -> dict[str, Any]:
    """One run of llama.cpp's `llama-batched-bench` (built by `build(target=...)`): its bare
    decode loop, no server and no sampling. `streams` prompts of `prompt_tokens` each are
    decoded in one batch, then `tokens` steps of one token per stream, in a context of
    `cells` split evenly among the streams (as llama-server's `-np`). Returns the tool's
    JSON row: `t_pp` and `t_tg` (seconds for the prompts and for the steps), `t` (both).
    Raises RuntimeError when the tool fails."""
    command = [
        str(binary),
        "-m", str(model),
        "-c", str(cells),
        "-npl", str(streams),
        "-npp", str(prompt_tokens),
        "-ntg", str(tokens),
        "-t", str(threads),
        "-tb", str(threads),
        "--output-format", "jsonl",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    rows = [json.loads(x) for x in done.stdout.splitlines() if x.startswith("{")]
    if done.returncode != 0 or len(rows) != 1:
        tail = done.stderr[-800:]
        raise RuntimeError(f"llama-batched-bench failed ({done.returncode}): {tail}")
    return dict(rows[0])


def version(binary: Path) -> str:
    done = subprocess.run([str(binary), "--version"], capture_output=True, text=True, check=False)
    lines = [x for x in (done.stdout + done.stderr).splitlines() if x.startswith("version")]
    return lines[0] if lines else "unknown"


class Router:
    """One `llama-server` router process on a loopback port, and its model instances."""

    def __init__(
        self,
        binary: Path,
        folder: Path,
        port: int,
        models: dict[str, Path],
        args: tuple[str, ...] = ROUTER_ARGS,
    ) -> None:
        self.binary = binary
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.models_dir = folder / "router-models"
        self.log_path = folder / "llama-server.log"
        self.models = models  # name -> GGUF file
        self.process: subprocess.Popen[bytes] | None = None
        self.args = ["--models-dir", str(self.models_dir), *args]
        self.api = httpx.AsyncClient(base_url=self.url, timeout=30.0, trust_env=False)

    async def start(self) -> None:
        self.models_dir.mkdir(parents=True, exist_ok=True)
        for name, path in self.models.items():
            (self.models_dir / f"{name}.gguf").symlink_to(path.resolve())
        command = [str(self.binary), "--host", "127.0.0.1", "--port", str(self.port), *self.args]
        with self.log_path.open("ab") as log:
            # Its own session: stop() signals the router and the instances it spawned.
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.process.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if (await self.api.get("/models")).status_code == 200:
                    return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"llama-server did not answer within {START_TIMEOUT_S:g} s")

    async def status(self, name: str) -> str | None:
        reply = await self.api.get("/models")
        reply.raise_for_status()
        for entry in reply.json().get("data", []):
            if entry.get("id") == name:
                status: Any = entry.get("status") or {}
                return str(status.get("value")) if isinstance(status, dict) else str(status)
        return None

    async def unload(self, name: str) -> None:
        """Unload `name` and wait until the router says it is unloaded."""
        if await self.status(name) != "unloaded":
            await self.api.post("/models/unload", json={"model": name})
        await self._wait_status(name, "unloaded")

    async def load(self, name: str) -> None:
        """Load `name` and wait until the router says it is loaded."""
        if await self.status(name) != "loaded":
            await self.api.post("/models/load", json={"model": name})
        await self._wait_status(name, "loaded")

    async def _wait_status(self, name: str, wanted: str) -> None:
        deadline = time.monotonic() + STATUS_TIMEOUT_S
        while time.monotonic() < deadline:
            if await self.status(name) == wanted:
                return
            await asyncio.sleep(0.05)
        raise RuntimeError(f"llama-server: {name} not {wanted} within {STATUS_TIMEOUT_S:g} s")

    def pids(self) -> list[int]:
        """The router and the instances it runs."""
        if self.process is None:
            return []
        with contextlib.suppress(psutil.Error):
            router = psutil.Process(self.process.pid)
            return [router.pid, *(c.pid for c in router.children(recursive=True))]
        return []

    async def stop(self) -> list[str]:
        """SIGTERM the router's process group, SIGKILL what is left; returns problems."""
        problems: list[str] = []
        await self.api.aclose()
        if self.process is None:
            return problems
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            await asyncio.to_thread(self.process.wait, STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            problems.append(f"llama-server did not exit within {STOP_TIMEOUT_S:g} s of SIGTERM")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)  # instances left behind, if any
        if self.process.poll() is None:
            self.process.wait(10)
        return problems
