"""Weights in a form llama.cpp's CPU kernels run fast.

Stock llama.cpp has fast x86 kernels (repacked weights, AVX-512/AVX2 matrix products)
for Q8_0 but none for Q4_1, the format SmolLM2 ships in. This project's build of
llama-cpp-python adds one (patches/llama-cpp-q4_1-repack.patch, built by
scripts/build_llama_cpp.py): with it, Q4_1 is served as stored, repacked at load, and
decodes faster than any other form of the same weights (docs/BENCHMARKS.md).

Without that kernel (a stock llama-cpp-python, or a CPU without AVX2), `weights: auto`
widens Q4_1 to Q8_0 instead: prompts are read 2.1x faster and 8 sequences decode 1.2x to
1.3x faster than stock Q4_1. Widening keeps the model: an 8-bit step is 1/16 of a 4-bit
one (perplexity on docs/ARCHITECTURE.md 41.24 as stored, 41.32 widened; narrowing to
Q4_0 instead would give 48.9, llama.cpp's Q4_K_M mix 44.2). The widened copy is written
once (about 0.5 s for that model) into a cache folder, keyed by the source's path, size
and modification time, and loaded from there. `weights: "as_stored"` in the registry
turns this off.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import tempfile
from pathlib import Path
from typing import Literal

from model_service.cpus import usable_cores
from model_service.gguf import (
    GGML_Q4_1,
    STOCK_REPACKED_TYPES,
    read_metadata,
    resident_weights_bytes,
)

log = logging.getLogger(__name__)

WeightsMode = Literal["auto", "as_stored"]

# general.file_type values (llama.cpp's LLAMA_FTYPE_MOSTLY_*): Q4_1, whose stock CPU
# kernels are slow, and Q8_0.
_LLAMA_FTYPE_MOSTLY_Q4_1 = 3
_LLAMA_FTYPE_MOSTLY_Q8_0 = 7
# Q8_0 stores 34 bytes per 32 weights, Q4_1 20: the widened file's size at most.
WIDENED_SIZE_FACTOR = 34 / 20


def cache_dir(configured: str | None = None) -> Path:
    """The folder for widened copies: the setting, else $POOL_WEIGHTS_CACHE, else XDG's."""
    if configured:
        return Path(configured).expanduser()
    if env := os.environ.get("POOL_WEIGHTS_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "model-pool" / "weights"


# A function only this project's patched llama.cpp has (scripts/build_llama_cpp.py).
_Q4_1_KERNEL_SYMBOL = b"ggml_gemv_q4_1_8x8_q8_0"


@functools.cache
def fast_q4_1() -> bool:
    """Whether the installed llama.cpp runs Q4_1 on repacked AVX2 kernels here.

    Looks for the patch's kernel in llama.cpp's CPU library file, without loading it
    (the manager asks too, and does not load llama.cpp), and for AVX2 on this CPU.
    """
    library = _ggml_cpu_library()
    if library is None:
        return False
    try:
        has_kernel = _Q4_1_KERNEL_SYMBOL in library.read_bytes()
        cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return False
    flags = next((line for line in cpuinfo if line.startswith("flags")), "")
    return has_kernel and "avx2" in flags.split()


def _ggml_cpu_library() -> Path | None:
    # llama_cpp loads its libraries from $LLAMA_CPP_LIB_PATH when set, else from its lib/.
    folder = os.environ.get("LLAMA_CPP_LIB_PATH")
    if not folder:
        spec = importlib.util.find_spec("llama_cpp")
        if spec is None or spec.origin is None:
            return None
        folder = str(Path(spec.origin).parent / "lib")
    library = Path(folder) / "libggml-cpu.so"
    return library if library.is_file() else None


def needs_widening(source: Path, mode: WeightsMode) -> bool:
    """Whether `source` would be served from a widened Q8_0 copy."""
    if mode != "auto":
        return False
    is_q4_1 = read_metadata(source).get("general.file_type") == _LLAMA_FTYPE_MOSTLY_Q4_1
    return is_q4_1 and not fast_q4_1()


def version_key(path: Path, *extra: object) -> str:
    """A short digest of this version of `path` (its real path, size and modification
    time) and `extra`: names of cache files that a changed file must not match."""
    stat = path.stat()
    parts = [str(path.resolve()), str(stat.st_size), str(stat.st_mtime_ns), *map(str, extra)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def widened_path(source: Path, folder: Path) -> Path:
    """Where the Q8_0 copy of `source` lives; a changed source gets a new name."""
    return folder / f"{source.stem}.{version_key(source)}.q8_0.gguf"


def served_path(source: Path, mode: WeightsMode, folder: Path) -> Path:
    """The file a worker loads for `source`: its widened copy's path, or `source`."""
    return widened_path(source, folder) if needs_widening(source, mode) else source


def served_size(source: Path, mode: WeightsMode, folder: Path) -> tuple[int, int]:
    """Bytes the weights a worker loads for `source` keep resident (the memory estimate),
    and of those, the bytes on the heap.

    The served file stays mapped, all of it; the matrices llama.cpp repacks at load
    (Q4_0 and Q4_K, and Q4_1 on the patched kernel) are resident twice, mapped and
    repacked on the heap (model_service.gguf.resident_weights_bytes). A widened copy not
    made yet counts the most it can take (Q8_0 is not repacked).
    """
    target = served_path(source, mode, folder)
    if not target.exists():
        return int(source.stat().st_size * WIDENED_SIZE_FACTOR), 0
    repacked = STOCK_REPACKED_TYPES | ({GGML_Q4_1} if fast_q4_1() else set())
    resident = resident_weights_bytes(target, frozenset(repacked))
    return resident, resident - target.stat().st_size


def ensure_served(source: Path, target: Path) -> Path:
    """`target` (made from `source` now if missing, which blocks), or `source` itself.

    When the copy cannot be written (read-only or full disk), logs why and returns
    `source`: slower, but the model still loads.
    """
    if target == source or target.exists():
        return target
    try:
        _widen(source, target)
    except OSError as exc:
        log.warning(
            "weights not widened; loading them as stored",
            extra={"source": str(source), "reason": str(exc)},
        )
        return source
    return target


def _widen(source: Path, target: Path) -> None:
    import llama_cpp  # the manager imports this module without llama.cpp

    target.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the target and renamed: two workers converting at once both finish,
    # and nobody ever loads half a file.
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = _LLAMA_FTYPE_MOSTLY_Q8_0
        params.allow_requantize = True
        params.nthread = usable_cores()
        status = llama_cpp.llama_model_quantize(str(source).encode(), tmp.encode(), params)
        os.chmod(tmp, 0o644)  # a cache like any other file, not a secret
        if status != 0:
            raise OSError(f"llama.cpp could not convert the weights (status {status})")
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
    log.info("weights widened to Q8_0 for fast CPU kernels", extra={"path": str(target)})
