"""Read a GGUF file's header without loading the model.

Enough to size a model before loading it (layers, widths, heads) and to say clearly
when a file is not GGUF or is cut short. Big arrays (the vocabulary) are skipped, not read.
"""

from __future__ import annotations

import struct
from functools import lru_cache
from pathlib import Path
from typing import Any, BinaryIO

from model_service.backends.base import BackendError

_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9


class _Truncated(Exception):
    pass


def _read(f: BinaryIO, size: int) -> bytes:
    data = f.read(size)
    if len(data) != size:
        raise _Truncated
    return data


def _unpack(f: BinaryIO, fmt: str) -> Any:
    return struct.unpack(fmt, _read(f, struct.calcsize(fmt)))[0]


def _string(f: BinaryIO) -> str:
    return _read(f, _unpack(f, "<Q")).decode("utf-8", errors="replace")


def _value(f: BinaryIO, kind: int, keep: bool) -> Any:
    if kind in _SCALARS:
        return _unpack(f, _SCALARS[kind])
    if kind == _STRING:
        return _string(f)
    if kind == _ARRAY:
        item_kind, count = _unpack(f, "<I"), _unpack(f, "<Q")
        if not keep and item_kind in _SCALARS:
            f.seek(count * struct.calcsize(_SCALARS[item_kind]), 1)
            return None
        items = [_value(f, item_kind, keep) for _ in range(count)]
        return items if keep else None
    raise ValueError(f"unknown GGUF value type {kind}")


def check_header(path: Path) -> None:
    """Cheap check (first bytes only) that `path` is a GGUF file. Raises BackendError."""
    try:
        with path.open("rb") as f:
            head = f.read(24)
    except FileNotFoundError:
        raise BackendError(f"model file not found: {path}") from None
    if head[:4] != b"GGUF"[: len(head[:4])] or not head:
        raise BackendError(f"{path} is not a GGUF file (bad magic number)")
    if len(head) < 24:
        raise BackendError(f"{path} is truncated (the GGUF header ends early)")
    version = struct.unpack("<I", head[4:8])[0]
    if version not in (2, 3):
        raise BackendError(f"{path}: unsupported GGUF version {version}")


@lru_cache(maxsize=32)
def _cached_metadata(path: Path, mtime_ns: int, size: int) -> dict[str, Any]:
    return _read_metadata(path)


def read_metadata(path: Path) -> dict[str, Any]:
    """Scalar and string metadata of a GGUF file (arrays skipped), cached per file version.

    Raises BackendError for a file that is missing, not GGUF, or truncated.
    """
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise BackendError(f"model file not found: {path}") from None
    return _cached_metadata(path, stat.st_mtime_ns, stat.st_size)


def _read_metadata(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            if f.read(4) != b"GGUF":
                raise BackendError(f"{path} is not a GGUF file (bad magic number)")
            version = _unpack(f, "<I")
            if version not in (2, 3):
                raise BackendError(f"{path}: unsupported GGUF version {version}")
            _tensors, kv_count = _unpack(f, "<Q"), _unpack(f, "<Q")
            if kv_count > 1_000_000:
                raise BackendError(f"{path}: corrupt GGUF header ({kv_count} metadata keys)")
            metadata: dict[str, Any] = {}
            for _ in range(kv_count):
                key = _string(f)
                kind = _unpack(f, "<I")
                value = _value(f, kind, keep=False)
                if value is not None:
                    metadata[key] = value
            return metadata
    except FileNotFoundError:
        raise BackendError(f"model file not found: {path}") from None
    except _Truncated:
        raise BackendError(f"{path} is truncated (the GGUF header ends early)") from None
    except (ValueError, OverflowError, MemoryError) as exc:
        raise BackendError(f"{path}: corrupt GGUF header: {exc}") from None


# Memory beyond weights and KV cache: the Python process with its imports, plus llama.cpp's
# compute buffers. Measured: a SmolLM2-135M worker with n_ctx 8192 uses ~360 MB RSS.
PROCESS_OVERHEAD_BYTES = 120 * 2**20


def estimate_memory_bytes(path: Path, n_ctx: int, weights_bytes: int | None = None) -> int:
    """Weights (the file, or `weights_bytes`) + an f16 KV cache for `n_ctx` tokens +
    process overhead.

    Raises BackendError when the file cannot be read as GGUF.
    """
    metadata = read_metadata(path)
    arch = metadata.get("general.architecture", "llama")
    layers = int(metadata.get(f"{arch}.block_count", 0))
    width = int(metadata.get(f"{arch}.embedding_length", 0))
    heads = int(metadata.get(f"{arch}.attention.head_count", 0) or 1)
    kv_heads = int(metadata.get(f"{arch}.attention.head_count_kv", heads) or heads)
    head_dim = int(metadata.get(f"{arch}.attention.key_length", width // heads if heads else 0))
    kv_cache = 2 * layers * n_ctx * head_dim * kv_heads * 2  # K and V, 2 bytes each
    if weights_bytes is None:
        weights_bytes = path.stat().st_size
    return weights_bytes + kv_cache + PROCESS_OVERHEAD_BYTES
