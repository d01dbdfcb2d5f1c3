"""This project's Q4_1 kernel for llama.cpp (patches/, built by scripts/build_llama_cpp.py).

Checked against an independent path: llama.cpp's stock Q8_0 kernels on the Q8_0 copy of
the same weights. A Q4_1 block widened to Q8_0 is within an 8-bit step of itself, so the
two must agree closely (measured: mean KL 0.007 nats, top-1 0.95 to 0.97); a wrong
kernel gives garbage (a bug during development gave KL 25). Batches of 1 token (GEMV), 7
(GEMM for 4 columns, GEMV for the other 3) and 64 (GEMM) each take their own code path.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from model_service.model_files import package_file
from model_service.weights import ensure_served, fast_q4_1, widened_path
from tests.conftest import SMOLLM2_FILE

llama_cpp = pytest.importorskip("llama_cpp")

TEXT = (Path(__file__).resolve().parent.parent / "docs" / "ARCHITECTURE.md").read_text()[:2000]
TOKENS = 96


def _has_avx2() -> bool:
    try:
        return "avx2" in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False


def _log_probs(path: Path, batch: int) -> tuple[np.ndarray, list[int]]:
    llm = llama_cpp.Llama(
        str(path), n_ctx=256, n_batch=batch, logits_all=True, n_threads=2, verbose=False
    )
    try:
        tokens = llm.tokenize(TEXT.encode())[:TOKENS]
        llm.eval(tokens)
        logits = np.array(llm.scores[: len(tokens)], dtype=np.float64)
    finally:
        llm.close()
    logits -= logits.max(axis=1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(axis=1, keepdims=True)), tokens


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    return float((np.exp(p) * (p - q)).sum(axis=1).mean())


@pytest.fixture(scope="module")
def q8_0_reference(tmp_path_factory: pytest.TempPathFactory) -> Iterator[np.ndarray]:
    source = package_file(SMOLLM2_FILE)
    copy = ensure_served(source, widened_path(source, tmp_path_factory.mktemp("weights")))
    assert copy != source, "the Q8_0 copy could not be written"
    log_probs, _ = _log_probs(copy, 64)
    yield log_probs


@pytest.mark.skipif(not _has_avx2(), reason="the kernel is for CPUs with AVX2")
def test_the_installed_llama_cpp_has_the_q4_1_kernel() -> None:
    assert fast_q4_1(), "llama-cpp-python is a stock build: run `make install`"


@pytest.mark.skipif(not _has_avx2(), reason="the kernel is for CPUs with AVX2")
@pytest.mark.parametrize("batch", [1, 7, 64])
def test_q4_1_on_the_kernel_agrees_with_the_stock_q8_0_kernels(
    q8_0_reference: np.ndarray, batch: int
) -> None:
    q4_1, tokens = _log_probs(package_file(SMOLLM2_FILE), batch)
    assert len(tokens) == TOKENS
    assert _kl(q8_0_reference, q4_1) < 0.02
    agreement = float((q8_0_reference.argmax(axis=1) == q4_1.argmax(axis=1)).mean())
    assert agreement > 0.85


ROOT = Path(__file__).resolve().parent.parent


def _build_script() -> Any:
    spec = importlib.util.spec_from_file_location(
        "build_llama_cpp", ROOT / "scripts" / "build_llama_cpp.py"
    )
    assert spec is not None and spec.loader is not None
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    return build


def test_the_patched_build_is_the_version_pyproject_pins() -> None:
    build = _build_script()
    assert f'"llama-cpp-python=={build.VERSION}"' in (ROOT / "pyproject.toml").read_text()
    assert metadata.version("llama_cpp_python") == build.patched_version(), "run `make install`"


def test_the_wheel_cache_keeps_the_current_patches_for_every_cpu(tmp_path: Path) -> None:
    """Wheels are built for one CPU's instruction set, so each CPU has its own folder;
    pruning drops earlier patches' wheels and those of the folder-less layout."""
    build = _build_script()
    assert build.cpu_key() == build.cpu_key()  # stable: later installs find the wheel
    current = build.patched_version()
    older = f"{build.VERSION}+pool.0000000000"
    names = {
        "cpu-a/keep": f"llama_cpp_python-{current}-py3-none-linux_x86_64.whl",
        "cpu-b/keep": f"llama_cpp_python-{current}-py3-none-linux_x86_64.whl",
        "cpu-a/drop": f"llama_cpp_python-{older}-py3-none-linux_x86_64.whl",
        "unsorted/drop": f"llama_cpp_python-{current}-py3-none-linux_x86_64.whl",
    }
    files = {}
    for key, name in names.items():
        folder = tmp_path if key.startswith("unsorted") else tmp_path / key.split("/")[0]
        folder.mkdir(exist_ok=True)
        files[key] = folder / name
        files[key].write_bytes(b"wheel")
    build.prune_wheels(tmp_path, current)
    assert {key for key, path in files.items() if path.exists()} == {"cpu-a/keep", "cpu-b/keep"}
