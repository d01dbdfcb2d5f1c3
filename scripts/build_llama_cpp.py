"""Build and install llama-cpp-python with this project's CPU kernel patches (patches/).

llama.cpp has no fast x86 kernel for Q4_1, the format SmolLM2 ships in.
`patches/llama-cpp-q4_1-repack.patch` adds one: Q4_1 weights are repacked at load into
the layout of llama.cpp's AVX2/AVX-512 Q4_0 kernels (8 rows interleaved), which then
compute each block's `scale * sum(q * x)`, and a small pass adds `min * sum(x)`. Results
match stock llama.cpp's Q4_1 as closely as stock matches full-precision weights
(tests/test_q4_1_kernel.py); docs/BENCHMARKS.md has the speed.

The wheel is built once from the package index's source distribution, patched, with a
local version label naming the patches (`0.3.36+pool.<digest>`), and kept in
~/.cache/model-pool/wheels/<cpu>: later installs, fresh clones included, reuse it. The
build targets this CPU's instruction set (llama.cpp's GGML_NATIVE), so the cache keeps one
wheel per CPU feature set: a home folder shared by different machines never hands one a
wheel that would die on an illegal instruction. The first build compiles llama.cpp (about
5 minutes on 2 cores). `make install` runs this.

Usage: python scripts/build_llama_cpp.py [--install]   (prints the wheel's path)
Standard library only: it runs before the project's dependencies are installed.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
from importlib import metadata
from pathlib import Path

VERSION = "0.3.36"  # pyproject.toml pins the same
ROOT = Path(__file__).resolve().parent.parent
PATCHES = sorted((ROOT / "patches").glob("llama-cpp-*.patch"))


def _log(message: str) -> None:
    print(f"[llama-cpp] {message}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "model-pool"


def patched_version() -> str:
    """The version the patched wheel carries: a local label naming the patches' content."""
    digest = hashlib.sha256()
    for patch in PATCHES:
        digest.update(patch.name.encode() + b"\0" + patch.read_bytes())
    return f"{VERSION}+pool.{digest.hexdigest()[:10]}"


def cpu_key() -> str:
    """Names this CPU's instruction set: the folder of the wheels built for it."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                name, _, value = line.partition(":")
                if name.strip() in ("flags", "Features"):  # x86, ARM
                    flags = " ".join(sorted(value.split()))
                    break
    except OSError:
        pass  # not Linux: the processor's name stands in for its features
    identity = f"{platform.machine()}\0{flags or platform.processor()}"
    return f"{platform.machine()}-{hashlib.sha256(identity.encode()).hexdigest()[:8]}"


def installed_version() -> str | None:
    try:
        return metadata.version("llama_cpp_python")
    except metadata.PackageNotFoundError:
        return None


def fetch_sdist(version: str, folder: Path) -> Path:
    """llama-cpp-python's source distribution, unpacked under `folder` (fetched with pip)."""
    source = folder / f"llama_cpp_python-{version}"
    if source.is_dir():
        return source
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as download:
        _log(f"fetching llama-cpp-python {version}'s source distribution")
        _run(
            [
                *(sys.executable, "-m", "pip", "download", f"llama-cpp-python=={version}"),
                *("--no-binary", ":all:", "--no-deps", "--quiet", "-d", download),
            ]
        )
        archive = next(Path(download).glob("*.tar.gz"))
        with tarfile.open(archive) as tar:
            tar.extractall(folder, filter="data")
    return source


def build_wheel() -> Path:
    """The patched wheel from the cache, built first if it is not there yet."""
    version = patched_version()
    wheels = cache_root() / "wheels" / cpu_key()
    found = sorted(wheels.glob(f"llama_cpp_python-{version}-*.whl"))
    if found:
        return found[-1]
    with tempfile.TemporaryDirectory(prefix="llama-cpp-build-") as work:
        source = fetch_sdist(VERSION, Path(work))
        for patch in PATCHES:
            _log(f"applying {patch.name}")
            _run(["git", "apply", "-p1", str(patch)], cwd=source)
        init = source / "llama_cpp" / "__init__.py"
        text = init.read_text()
        marker = f'__version__ = "{VERSION}"'
        if marker not in text:
            raise RuntimeError(f"{init} does not say {marker}")
        init.write_text(text.replace(marker, f'__version__ = "{version}"'))
        _log("building the patched wheel (about 5 minutes on 2 cores, once)")
        wheels.mkdir(parents=True, exist_ok=True)
        _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(wheels), str(source)])
    found = sorted(wheels.glob(f"llama_cpp_python-{version}-*.whl"))
    if not found:
        raise RuntimeError(f"the build finished without a wheel in {wheels}")
    prune_wheels(wheels.parent, version)
    return found[-1]


def prune_wheels(cache: Path, version: str) -> None:
    """Delete wheels of earlier patches (24 MB each), for any CPU, and those from before
    the per-CPU folders (which CPU they were built for is unknown)."""
    for old in cache.glob(f"*/llama_cpp_python-{VERSION}+pool.*.whl"):
        if not old.name.startswith(f"llama_cpp_python-{version}-"):
            old.unlink(missing_ok=True)
    for unsorted in cache.glob("llama_cpp_python-*.whl"):
        unsorted.unlink(missing_ok=True)


def install() -> None:
    version = patched_version()
    if installed_version() == version:
        return
    wheel = build_wheel()
    _log(f"installing {wheel.name}")
    # A different version from any stock 0.3.36 installed, so pip replaces that one; its
    # dependencies (numpy, jinja2, ...) come from the index as usual.
    _run([sys.executable, "-m", "pip", "install", "--quiet", str(wheel)])


def _run(command: list[str], cwd: Path | None = None) -> None:
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = (done.stdout + done.stderr)[-3000:]
        raise RuntimeError(f"{' '.join(command[:5])} ... failed ({done.returncode}):\n{tail}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--install", action="store_true", help="install it into this Python")
    args = parser.parse_args()
    try:
        if args.install:
            install()
        print(build_wheel())
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
