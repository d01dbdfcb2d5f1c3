"""Embeddings from a GGUF model: a llama.cpp context and a thread of their own.

`LlamaEmbedder` owns one llama.cpp context created with `embeddings = True`, and the one
thread that ever touches it (a context must not be used from two threads at once; the
model's weights are read-only and are shared with the generation context, if any).
Requests reach the thread through a queue; the thread takes every request waiting,
tokenizes their inputs, packs them into as few decodes as fit, and hands each request
its vectors back on its event loop. Nothing here runs on the event loop.

Two ways to pool, chosen by whoever builds the embedder:
- `pool_in_llama=True` (models whose registry `model_type` is "embedding"): llama.cpp
  pools, with the GGUF's own pooling and any projection layers the file carries. A
  sequence must then sit in one micro-batch, so a decode holds `cells` tokens.
- `pool_in_llama=False` (the side context of a generative model): llama.cpp returns each
  token's hidden state and the pooling is done here. A causal model's states do not
  depend on how its tokens were split into decodes, so decodes stay small (`CHUNK`
  tokens). That matters: llama.cpp computes and stores the logits of every token of an
  embedding decode (n_vocab floats each: 192 KiB for SmolLM2), so the chunk bounds the
  buffer at 48 MiB however long the input.

Every vector leaves L2-normalized, as OpenAI's and Ollama's do.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import queue
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import llama_cpp
import numpy as np
from llama_cpp._internals import LlamaModel

from model_service import sandbox
from model_service.backends.base import BackendError
from model_service.backends.llama_cpp import ContextShape, open_model
from model_service.cpus import usable_cores
from model_service.embeddings import Embedded, EmbedInputError, Input
from model_service.gguf import check_header, read_metadata
from model_service.weights import cache_dir, ensure_served, served_path

log = logging.getLogger(__name__)

Pooling = Literal["mean", "cls", "last"]
POOLINGS: tuple[Pooling, ...] = ("mean", "cls", "last")
_LLAMA_POOLING = {
    "mean": llama_cpp.LLAMA_POOLING_TYPE_MEAN,
    "cls": llama_cpp.LLAMA_POOLING_TYPE_CLS,
    "last": llama_cpp.LLAMA_POOLING_TYPE_LAST,
}
# The GGUF's `<arch>.pooling_type` (llama.cpp's enum llama_pooling_type).
_GGUF_POOLING: dict[int, Pooling] = {1: "mean", 2: "cls", 3: "last"}

CHUNK = 256  # tokens per decode when pooling here (see the module's docstring)
MIN_CELLS = 256  # the smallest context made: short requests do not recreate it
ROUND_TOKENS = 1024  # a context grows to hold this many tokens of short inputs at once
MAX_SEQUENCES = 64  # inputs per decode
# Beyond the KV cache and the outputs, a context's graphs and the heap arena of the thread
# that makes it (glibc maps 64 MB of address space for each thread's arena).
CONTEXT_ROOM_MARGIN_BYTES = 80 * 2**20


def pooling_of(model: LlamaModel, override: str | None) -> Pooling:
    """The pooling for `model`: see `pooling_for` (reads two metadata keys, no file)."""
    metadata = {}
    arch = _meta(model, "general.architecture")
    if arch is not None:
        metadata["general.architecture"] = arch
        stored = _meta(model, f"{arch}.pooling_type")
        if stored is not None:
            metadata[f"{arch}.pooling_type"] = stored
    return pooling_for(metadata, override)


def _meta(model: LlamaModel, key: str) -> str | None:
    buffer = ctypes.create_string_buffer(256)
    size = llama_cpp.llama_model_meta_val_str(model.model, key.encode(), buffer, len(buffer))
    return buffer.value.decode(errors="replace") if size >= 0 else None


def pooling_for(metadata: Mapping[str, Any], override: str | None) -> Pooling:
    """The registry's `pooling` if set, else the GGUF's `pooling_type`, else mean.

    Raises BackendError for an unknown override.
    """
    if override is not None:
        if override not in POOLINGS:
            raise BackendError(f"pooling must be mean, cls or last, not {override!r}")
        return override
    arch = metadata.get("general.architecture", "")
    stored = metadata.get(f"{arch}.pooling_type")
    try:
        return _GGUF_POOLING.get(int(stored), "mean") if stored is not None else "mean"
    except (TypeError, ValueError):
        return "mean"


@dataclass
class _Job:
    inputs: Sequence[Input]
    truncate: bool
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Embedded]
    tokens: list[list[int]] = field(default_factory=list)


def _settle(future: asyncio.Future[Embedded], result: Embedded | BaseException) -> None:
    if future.done():
        return  # the caller gave up (timeout, client gone)
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


class LlamaEmbedder:
    """Embeds inputs with `model` on a context of its own, on a thread of its own.

    `limit`: the longest input, in tokens (the registry's n_ctx). The context is made on
    the first request, sized to it (at least MIN_CELLS tokens, at most `limit`), and
    made again, larger, when a later request needs more; `cells_at_start` makes it at
    `start()` instead. `close_model`: the embedder owns `model` and frees it at close.
    """

    def __init__(
        self,
        model: LlamaModel,
        *,
        limit: int,
        threads: int,
        pooling: Pooling,
        pool_in_llama: bool,
        close_model: bool = False,
        cells_at_start: int = 0,
    ) -> None:
        self._model = model
        self._limit = limit
        self._threads = max(1, threads)
        self.pooling: Pooling = pooling
        self._pool_in_llama = pool_in_llama
        self._close_model = close_model
        self._cells_at_start = min(cells_at_start, limit)
        self.dimensions = int(llama_cpp.llama_model_n_embd_out(model.model))
        self.vocab_size = int(llama_cpp.llama_vocab_n_tokens(model.vocab))
        self._encoder_only = bool(
            llama_cpp.llama_model_has_encoder(model.model)
            and not llama_cpp.llama_model_has_decoder(model.model)
        )
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="embeddings", daemon=True)
        self._started = False
        self._closed = False
        # Owned by the embeddings thread; read (racily, for /health) elsewhere.
        self._ctx: Any = None
        self._batch: Any = None
        self._threads_wanted: int | None = None  # set by set_threads, applied by the thread
        self._cells = 0
        self._n_batch = 0
        self.busy = False
        self.inputs_embedded = 0
        self.tokens_embedded = 0

    @property
    def context_length(self) -> int:
        return self._limit

    def start(self) -> None:
        """Start the thread (making the context first when `cells_at_start` says so).

        Raises BackendError when that context cannot be made.
        """
        if self._cells_at_start:
            self._resize(self._cells_at_start)  # before the thread exists: no race
        self._started = True
        self._thread.start()

    async def embed(self, inputs: Sequence[Input], truncate: bool = False) -> Embedded:
        """Embed `inputs` (texts or token ids). Waits for the embeddings thread.

        Raises EmbedInputError for an input that cannot be embedded (longer than the
        context without `truncate`, a token id not in the vocabulary) and BackendError
        when llama.cpp fails.
        """
        if self._closed:
            raise BackendError("the model is being unloaded")
        if not self._started:
            self.start()
        loop = asyncio.get_running_loop()
        job = _Job(inputs, truncate, loop, loop.create_future())
        self._jobs.put(job)
        return await job.future

    def set_threads(self, threads: int) -> None:
        """Compute with `threads` threads (at most the registry's) from the next batch on.

        Any thread may call it: the manager shares the cores among busy workers.
        """
        self._threads_wanted = max(1, threads)

    def close(self, timeout: float = 30.0) -> None:
        """Stop the thread after the work it has, free the context (and the model if
        owned). Blocks up to `timeout` for the thread."""
        self._closed = True
        if self._started:
            self._jobs.put(None)
            self._thread.join(timeout)
        else:
            self._free_context()
        if self._close_model:
            self._model.close()

    def describe(self) -> dict[str, Any]:
        """What /health shows: the pooling, the context's size and memory."""
        return {
            "pooling": self.pooling,
            "pooled_by": "llama.cpp" if self._pool_in_llama else "worker",
            "dimensions": self.dimensions,
            "context_tokens": self._cells,
            "batch_tokens": self._n_batch,
            "context_memory_mb": round(self._memory_bytes() / 2**20, 1),
            "inputs_embedded": self.inputs_embedded,
            "tokens_embedded": self.tokens_embedded,
        }

    def _memory_bytes(self) -> int:
        """The context's KV cache (f16) plus its output buffers: logits (n_vocab floats,
        for models with an output head) and embeddings, one row per token of a decode.
        Compute buffers (a few MB) are left out."""
        if not self._cells:
            return 0
        model = self._model.model
        layers = llama_cpp.llama_model_n_layer(model)
        heads = max(1, llama_cpp.llama_model_n_head(model))
        kv_heads = llama_cpp.llama_model_n_head_kv(model)
        head_dim = llama_cpp.llama_model_n_embd(model) // heads
        kv = 2 * layers * kv_heads * head_dim * 2 * self._cells
        outputs = 4 * self._n_batch * (self.vocab_size + self.dimensions)
        return int(kv + outputs)

    # --- the embeddings thread -------------------------------------------------------------

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._jobs.get()
            if first is None:
                break
            jobs = [first]
            while True:  # everything waiting joins this round: one set of decodes
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stopping = True
                    break
                jobs.append(job)
            self.busy = True
            try:
                self._serve(jobs)
            except Exception as exc:  # the thread must outlive any one request
                log.exception("embeddings failed")
                for job in jobs:
                    self._reply(job, BackendError(f"embedding failed: {exc}"))
            finally:
                self.busy = False
        while True:  # requests that arrived as we stopped
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                self._reply(job, BackendError("the model is being unloaded"))
        self._free_context()

    def _serve(self, jobs: list[_Job]) -> None:
        if self._threads_wanted is not None and self._ctx is not None:
            threads, self._threads_wanted = min(self._threads_wanted, self._threads), None
            llama_cpp.llama_set_n_threads(self._ctx, threads, threads)
        ready = []
        for job in jobs:
            if job.future.done():
                continue  # its caller gave up (timeout, client gone) while it waited
            try:
                job.tokens = [
                    self._tokens(i, item, job.truncate) for i, item in enumerate(job.inputs)
                ]
            except EmbedInputError as exc:
                self._reply(job, exc)
                continue
            ready.append(job)
        if not ready:
            return
        sequences = [tokens for job in ready for tokens in job.tokens]
        try:
            vectors = self._embed(sequences)
        except Exception as exc:
            log.exception("embedding failed")
            # A MemoryError stays one: the worker answers it by exiting (out of memory).
            error = exc if isinstance(exc, BackendError | MemoryError) else BackendError(str(exc))
            for job in ready:
                self._reply(job, error)
            return
        self.inputs_embedded += len(sequences)
        self.tokens_embedded += sum(len(s) for s in sequences)
        start = 0
        for job in ready:
            end = start + len(job.tokens)
            counts = [len(tokens) for tokens in job.tokens]
            self._reply(job, Embedded(vectors[start:end], counts))
            start = end

    @staticmethod
    def _reply(job: _Job, result: Embedded | BaseException) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
            job.loop.call_soon_threadsafe(_settle, job.future, result)

    def _tokens(self, index: int, item: Input, truncate: bool) -> list[int]:
        if isinstance(item, str):
            # Special tokens as the model wants them (BOS, or BERT's CLS and SEP); text
            # that looks like a special token stays text. A lone surrogate (JSON allows
            # "\ud800") is no UTF-8: it becomes "?".
            data = item.encode("utf-8", errors="replace")
            tokens = self._model.tokenize(data, add_bos=True, special=False)
        else:
            tokens = list(item)
            bad = next((t for t in tokens if not 0 <= t < self.vocab_size), None)
            if bad is not None:
                raise EmbedInputError(
                    index,
                    f"input[{index}] has the token id {bad}, which is not in this model's "
                    f"vocabulary (0 to {self.vocab_size - 1})",
                    "invalid_value",
                )
        if not tokens:
            raise EmbedInputError(index, f"input[{index}] has no tokens", "invalid_value")
        if len(tokens) > self._limit:
            if truncate:
                return tokens[: self._limit]
            raise EmbedInputError(
                index,
                f"This model's maximum context length is {self._limit} tokens, but "
                f"input[{index}] has {len(tokens)} tokens. Shorten the input.",
                "context_length_exceeded",
            )
        return tokens

    def _embed(self, sequences: list[list[int]]) -> np.ndarray:
        longest = max(len(s) for s in sequences)
        total = sum(len(s) for s in sequences)
        wanted = _next_power_of_two(max(MIN_CELLS, longest, min(total, ROUND_TOKENS)))
        if wanted > self._cells and self._cells < self._limit:
            self._resize(min(wanted, self._limit))
        out = np.empty((len(sequences), self.dimensions), dtype=np.float32)
        for first, last in self._rounds(sequences):
            out[first:last] = self._embed_round(sequences[first:last])
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-12)

    def _rounds(self, sequences: list[list[int]]) -> list[tuple[int, int]]:
        """Consecutive runs of sequences that fit the context together."""
        rounds, first, used = [], 0, 0
        for i, tokens in enumerate(sequences):
            if i > first and (used + len(tokens) > self._cells or i - first >= MAX_SEQUENCES):
                rounds.append((first, i))
                first, used = i, 0
            used += len(tokens)
        rounds.append((first, len(sequences)))
        return rounds

    def _embed_round(self, sequences: list[list[int]]) -> np.ndarray:
        memory = llama_cpp.llama_get_memory(self._ctx)
        if memory:
            llama_cpp.llama_memory_clear(memory, True)
        stream = [
            (token, position, seq)
            for seq, tokens in enumerate(sequences)
            for position, token in enumerate(tokens)
        ]
        if self._pool_in_llama:
            self._decode(stream)  # the round fits one decode: cells == n_batch
            return np.stack([self._pooled(seq) for seq in range(len(sequences))])
        states = np.empty((len(stream), self.dimensions), dtype=np.float32)
        for start in range(0, len(stream), self._n_batch):
            piece = stream[start : start + self._n_batch]
            self._decode(piece)
            rows = llama_cpp.llama_get_embeddings(self._ctx)
            if not rows:
                raise BackendError("llama.cpp returned no embeddings")
            view = np.ctypeslib.as_array(rows, shape=(len(piece), self.dimensions))
            states[start : start + len(piece)] = view
        pooled = np.empty((len(sequences), self.dimensions), dtype=np.float32)
        offset = 0
        for seq, tokens in enumerate(sequences):
            rows = states[offset : offset + len(tokens)]
            if self.pooling == "mean":
                pooled[seq] = rows.mean(axis=0)
            elif self.pooling == "cls":
                pooled[seq] = rows[0]
            else:
                pooled[seq] = rows[-1]
            offset += len(tokens)
        return pooled

    def _pooled(self, seq: int) -> np.ndarray:
        vector = llama_cpp.llama_get_embeddings_seq(self._ctx, seq)
        if not vector:
            raise BackendError("llama.cpp returned no pooled embedding")
        return np.ctypeslib.as_array(vector, shape=(self.dimensions,)).copy()

    def _decode(self, items: list[tuple[int, int, int]]) -> None:
        batch = self._batch
        for i, (token, position, seq) in enumerate(items):
            batch.token[i] = token
            batch.pos[i] = position
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = 1
        batch.n_tokens = len(items)
        run = llama_cpp.llama_encode if self._encoder_only else llama_cpp.llama_decode
        status = run(self._ctx, batch)
        if status != 0:
            raise BackendError(f"llama.cpp failed to compute embeddings (status {status})")

    def _resize(self, cells: int) -> None:
        """Make the context (again) with room for `cells` tokens. Raises BackendError."""
        self._free_context()
        n_batch = cells if self._pool_in_llama else min(cells, CHUNK)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = cells
        params.n_batch = params.n_ubatch = n_batch
        params.n_seq_max = MAX_SEQUENCES
        params.kv_unified = True  # the sequences of a round share the cells as they need
        params.n_threads = params.n_threads_batch = min(
            self._threads_wanted or self._threads, self._threads
        )
        params.embeddings = True
        params.pooling_type = (
            _LLAMA_POOLING[self.pooling]
            if self._pool_in_llama
            else llama_cpp.LLAMA_POOLING_TYPE_NONE
        )
        self._check_room(cells, n_batch)
        ctx = llama_cpp.llama_init_from_model(self._model.model, params)
        if not ctx:
            message = f"llama.cpp could not create an embeddings context of {cells} tokens"
            if sandbox.address_space_limited():
                # Under the worker's memory ceiling that is the ceiling's doing.
                raise MemoryError(message)
            raise BackendError(message)
        self._ctx = ctx
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self._cells, self._n_batch = cells, n_batch
        log.info(
            "embeddings context made",
            extra={"tokens": cells, "memory_mb": round(self._memory_bytes() / 2**20, 1)},
        )

    def _check_room(self, cells: int, n_batch: int) -> None:
        """Raise MemoryError when the worker's address-space ceiling leaves less room than
        a context of `cells` tokens needs. Checked first because llama.cpp does not fail
        cleanly there: a buffer it gets, then a small allocation after it that it does
        not (a ggml context's) aborts the process (GGML_ASSERT) instead of returning NULL."""
        left = sandbox.address_space_left()
        if left is None:
            return
        model = self._model.model
        layers = int(llama_cpp.llama_model_n_layer(model))
        width = int(llama_cpp.llama_model_n_embd(model))
        heads = max(1, int(llama_cpp.llama_model_n_head(model)))
        kv_width = width * int(llama_cpp.llama_model_n_head_kv(model)) // heads
        kv_cache = 0 if self._encoder_only else 2 * layers * cells * kv_width * 2  # f16 K, V
        outputs = 4 * n_batch * (self.vocab_size + 4 * width)  # as gguf.compute_buffer_bytes
        need = kv_cache + outputs + CONTEXT_ROOM_MARGIN_BYTES
        if left < need:
            raise MemoryError(
                f"an embeddings context of {cells} tokens needs about {need >> 20} MB and "
                f"the worker's memory ceiling leaves {left >> 20} MB"
            )

    def _free_context(self) -> None:
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx is not None:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        self._cells = self._n_batch = 0


class EmbeddingModel:
    """A registry entry with `model_type: "embedding"`: its weights and an embedder made
    to pool in llama.cpp, with a context of the entry's n_ctx made at load. No
    generation context: such a worker serves /v1/embeddings only.

    `preloaded`: the weights, if a spare loaded them ahead (a `Preloaded`).
    """

    load_phases: Mapping[str, float] = MappingProxyType({})

    def __init__(self, settings: dict[str, Any], preloaded: Any = None) -> None:
        self._settings = settings
        self._preloaded = preloaded
        self.weights_preloaded = False
        self.context_preloaded = False
        self.embedder: LlamaEmbedder | None = None

    def load(self) -> None:
        """Open the weights and make the context. Blocks; raises BackendError."""
        started = time.perf_counter()
        settings = self._settings
        path = Path(str(settings["model_path"]))
        preloaded, self._preloaded = self._preloaded, None
        model: LlamaModel | None = None
        if preloaded is not None:
            model = preloaded.model
            with contextlib.suppress(BackendError):
                # A generation context made ahead for this file is of no use here.
                spare_context = preloaded.take_context(ContextShape.from_settings(settings))
                if spare_context is not None:
                    llama_cpp.llama_free(spare_context)
        self.weights_preloaded = model is not None
        if model is None:
            check_header(path)
            planned = settings.get("served_model_path") or served_path(
                path,
                settings.get("weights") or "auto",
                cache_dir(settings.get("weights_cache_dir")),
            )
            served = ensure_served(path, Path(str(planned)))
            try:
                model = open_model(str(served))
            except (ValueError, RuntimeError) as exc:
                read_metadata(path)  # names the problem (say, a truncated file) if it can
                raise BackendError(f"llama.cpp could not load {path}: {exc}") from exc
        model_at = time.perf_counter()
        limit = int(settings.get("n_ctx") or 2048)
        embedder = LlamaEmbedder(
            model,
            limit=limit,
            threads=int(settings.get("n_threads") or usable_cores()),
            pooling=pooling_of(model, settings.get("pooling")),
            pool_in_llama=True,
            close_model=True,
            cells_at_start=limit,
        )
        try:
            embedder.start()
        except BackendError:
            model.close()
            raise
        self.embedder = embedder
        self.load_phases = {
            "load_model": model_at - started,
            "create_context": time.perf_counter() - model_at,
        }

    def unload(self) -> None:
        if self.embedder is not None:
            self.embedder.close()
            self.embedder = None
