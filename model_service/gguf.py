"""Read a GGUF file's header without loading the model.

Enough to size a model before loading it (layers, widths, heads) and to say clearly
when a file is not GGUF or is cut short. Big arrays (the vocabulary) are skipped, not read.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Tensor:
    """One tensor as the GGUF header lists it: its data's size comes from the offsets."""

    name: str
    dims: tuple[int, ...]
    type: int  # ggml's type id (GGML_TYPE_*)
    nbytes: int


@lru_cache(maxsize=32)
def _cached_tensors(path: Path, mtime_ns: int, size: int) -> tuple[Tensor, ...]:
    return _read_header(path, with_tensors=True)[1]


def read_tensors(path: Path) -> tuple[Tensor, ...]:
    """The tensors a GGUF file holds (names, shapes, types, sizes), cached per version.

    Raises BackendError like `read_metadata`."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise BackendError(f"model file not found: {path}") from None
    return _cached_tensors(path, stat.st_mtime_ns, stat.st_size)


def _read_metadata(path: Path) -> dict[str, Any]:
    return _read_header(path, with_tensors=False)[0]


def _read_header(path: Path, with_tensors: bool) -> tuple[dict[str, Any], tuple[Tensor, ...]]:
    try:
        with path.open("rb") as f:
            if f.read(4) != b"GGUF":
                raise BackendError(f"{path} is not a GGUF file (bad magic number)")
            version = _unpack(f, "<I")
            if version not in (2, 3):
                raise BackendError(f"{path}: unsupported GGUF version {version}")
            n_tensors, kv_count = _unpack(f, "<Q"), _unpack(f, "<Q")
            if kv_count > 1_000_000 or n_tensors > 1_000_000:
                raise BackendError(f"{path}: corrupt GGUF header ({kv_count} metadata keys)")
            metadata: dict[str, Any] = {}
            for _ in range(kv_count):
                key = _string(f)
                kind = _unpack(f, "<I")
                value = _value(f, kind, keep=False)
                if value is not None:
                    metadata[key] = value
            if not with_tensors:
                return metadata, ()
            return metadata, _tensor_infos(f, n_tensors, metadata, path.stat().st_size)
    except FileNotFoundError:
        raise BackendError(f"model file not found: {path}") from None
    except _Truncated:
        raise BackendError(f"{path} is truncated (the GGUF header ends early)") from None
    except (ValueError, OverflowError, MemoryError) as exc:
        raise BackendError(f"{path}: corrupt GGUF header: {exc}") from None


def _tensor_infos(
    f: BinaryIO, count: int, metadata: dict[str, Any], file_size: int
) -> tuple[Tensor, ...]:
    infos: list[tuple[int, str, tuple[int, ...], int]] = []
    for _ in range(count):
        name = _string(f)
        n_dims = _unpack(f, "<I")
        if n_dims > 8:
            raise ValueError(f"tensor {name!r} has {n_dims} dimensions")
        dims = tuple(_unpack(f, "<Q") for _ in range(n_dims))
        kind, offset = _unpack(f, "<I"), _unpack(f, "<Q")
        infos.append((offset, name, dims, kind))
    alignment = int(metadata.get("general.alignment") or 32)
    data_size = file_size - -(-f.tell() // alignment) * alignment
    infos.sort()
    ends = [offset for offset, *_ in infos[1:]] + [data_size]
    return tuple(
        Tensor(name, dims, kind, max(0, end - offset))
        for (offset, name, dims, kind), end in zip(infos, ends, strict=True)
    )


# The worker besides its model's buffers: Python with FastAPI and llama.cpp imported (a
# spare without a reserve: ~75 MB RSS, a third of it shared libraries), the vocabulary on
# the heap (~16 MB for SmolLM2's 49,152 tokens), the saved chat opening, the allocator's
# slack. Fitted to measured worker RSS (docs/ARCHITECTURE.md, "Memory").
PROCESS_OVERHEAD_BYTES = 110 * 2**20

# ggml types that llama.cpp's CPU backend copies into repacked buffers at load, for its
# fast matrix kernels (AVX2 or NEON): Q4_0 and Q4_K in stock llama.cpp, Q4_1 with this
# project's patch (model_service/weights.py says when it is there).
GGML_Q4_0, GGML_Q4_1, GGML_Q4_K = 2, 3, 12
STOCK_REPACKED_TYPES = frozenset({GGML_Q4_0, GGML_Q4_K})


def resident_weights_bytes(path: Path, repacked_types: frozenset[int]) -> int:
    """What a model's weights keep resident once llama.cpp has loaded `path`.

    The whole file stays mapped (llama.cpp reads it all in at load), and the matrices of
    a type in `repacked_types` are copied once more into repacked buffers (all but the
    token embeddings, which are looked up by row, not multiplied). Measured on SmolLM2:
    the Q4_1 file (92 MiB) mapped + 63 MiB repacked; the Q8_0 copy (136 MiB) mapped only.
    """
    repacked = sum(
        t.nbytes
        for t in read_tensors(path)
        if t.type in repacked_types and len(t.dims) >= 2 and t.name != "token_embd.weight"
    )
    return path.stat().st_size + repacked


def vocab_size(path: Path) -> int:
    """Tokens in the model's vocabulary (from its token embeddings' shape), 0 if unknown."""
    for tensor in read_tensors(path):
        if tensor.name == "token_embd.weight" and len(tensor.dims) >= 2:
            return tensor.dims[1]
    return 0


def kv_cache_bytes(metadata: dict[str, Any], cells: int) -> int:
    """An f16 K and V cache of `cells` tokens, all layers."""
    arch = metadata.get("general.architecture", "llama")
    layers = int(metadata.get(f"{arch}.block_count", 0))
    width = int(metadata.get(f"{arch}.embedding_length", 0))
    heads = int(metadata.get(f"{arch}.attention.head_count", 0) or 1)
    kv_heads = int(metadata.get(f"{arch}.attention.head_count_kv", heads) or heads)
    head_dim = int(metadata.get(f"{arch}.attention.key_length", width // heads if heads else 0))
    return 2 * layers * cells * head_dim * kv_heads * 2  # K and V, 2 bytes each


def compute_buffer_bytes(metadata: dict[str, Any], n_vocab: int, n_ubatch: int) -> int:
    """llama.cpp's compute buffer as it allocates it, for its worst case: the logits of a
    full ubatch (n_vocab x n_ubatch floats) and the activations beside them. SmolLM2 at
    n_ubatch 512: 98 MiB to 103 MiB by context shape, as llama.cpp reports it. Only what
    a request's graphs use of it is ever written (`compute_written_bytes`)."""
    width = _width(metadata)
    return 4 * n_ubatch * (n_vocab + 4 * width)


def compute_written_bytes(
    metadata: dict[str, Any], n_vocab: int, n_ubatch: int, n_ctx: int, n_seq: int
) -> int:
    """What a worker's requests write of the compute buffer, and so keep resident: a
    full ubatch's attention scores against one sequence's context (n_ubatch x n_ctx x
    heads floats) and activations, and the logits of one token per sequence (the engine
    asks for no more). The worst case's logits of a whole ubatch are never written."""
    arch = metadata.get("general.architecture", "llama")
    heads = int(metadata.get(f"{arch}.attention.head_count", 0) or 1)
    return 4 * (n_ubatch * n_ctx * heads + n_ubatch * 4 * _width(metadata) + n_seq * n_vocab)


def _width(metadata: dict[str, Any]) -> int:
    arch = metadata.get("general.architecture", "llama")
    return int(metadata.get(f"{arch}.embedding_length", 0))


@dataclass(frozen=True)
class MemoryEstimate:
    """What a worker serving one model holds (RSS), by part, in bytes."""

    weights: int  # resident: the mapped file, and `repacked`
    repacked: int  # of `weights`, the copies llama.cpp repacks onto the heap
    kv_cache: int
    compute: int  # what requests write of the compute buffer
    process: int = PROCESS_OVERHEAD_BYTES

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.compute + self.process

    @property
    def written_at_load(self) -> int:
        """Heap a load writes whole: the repacked weights and the KV cache (zeroed). A
        spare maps this much ahead (model_service/heap.py) so the load faults none of it."""
        return self.repacked + self.kv_cache


def estimate_memory(
    path: Path,
    cells: int,
    n_seq: int = 1,
    weights_bytes: int | None = None,
    repacked_bytes: int = 0,
    n_ubatch: int = 512,
    n_vocab: int | None = None,
) -> MemoryEstimate:
    """The RSS of a worker serving the model in `path`, by part: its weights
    (`weights_bytes`, by default the file's size, of which `repacked_bytes` on the heap),
    an f16 KV cache of `cells` tokens (n_ctx x `n_seq` slots), what requests write of
    the compute buffer, and the process (PROCESS_OVERHEAD_BYTES).

    Within 15 % of measured RSS for the shapes tests/test_memory.py loads. `n_vocab`:
    the vocabulary's size when `path` is not the file served (a widened copy not made
    yet); by default read from `path`. Raises BackendError when the file cannot be read
    as GGUF.
    """
    metadata = read_metadata(path)
    if weights_bytes is None:
        weights_bytes = path.stat().st_size
    if n_vocab is None:
        n_vocab = vocab_size(path)
    n_seq = max(1, n_seq)
    return MemoryEstimate(
        weights=weights_bytes,
        repacked=repacked_bytes,
        kv_cache=kv_cache_bytes(metadata, cells),
        compute=compute_written_bytes(metadata, n_vocab, n_ubatch, cells // n_seq, n_seq),
    )
