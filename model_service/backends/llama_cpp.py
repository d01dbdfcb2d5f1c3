"""GGUF models run in-process by llama.cpp, many sequences decoded together.

One llama.cpp context holds `slots` sequences, each with its own KV cache of `n_ctx`
cells. Every engine step puts the next token of each decoding sequence, and a chunk of
each new prompt, into one batch, decodes it once, and samples each sequence with its own
sampler chain. A finished sequence keeps its KV cache: the next request that starts with
the same tokens (a long system prompt, a growing chat) only computes what is new.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp._internals import LlamaModel
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar

from model_service.backends.base import (
    Backend,
    BackendError,
    DecodeFailed,
    GrammarFrame,
    PromptTooLong,
    RenderedPrompt,
    SamplingParams,
    TokenScore,
    ToolFormat,
)
from model_service.cpus import idle_cores, usable_cores
from model_service.gguf import check_header, read_metadata
from model_service.tools import template_tool_format
from model_service.weights import (
    WeightsMode,
    cache_dir,
    ensure_served,
    served_path,
    version_key,
)

log = logging.getLogger(__name__)

DEFAULT_CONTEXT = 2048
DEFAULT_SLOTS = 4
TOP_K, MIN_P = 40, 0.05
# How many of the likeliest tokens a grammar is tried on before the whole vocabulary.
GRAMMAR_SHORTLIST = 256
# Busy slots in one run of ids decode in one pass (see `_decode`); each other run costs a
# pass of its own every step, about what 6 prompt tokens cost computed in a batch
# (SmolLM2 on 2 cores: a 1-token pass ~5 ms, a prompt ~1,200 tokens/s). Over a reply
# that is worth more than most cached prefixes: 4 streams decoded 2x as fast in slots
# 0-3 as in 0, 2, 4, 6.
RUN_STEP_COST_TOKENS = 6
# The most steps a slot choice counts on decoding beside the busy slots (a request's
# budget is often the whole context, its reply seldom).
EXPECTED_REPLY_TOKENS = 256


@llama_cpp.llama_log_callback
def _drop_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    """llama.cpp logs every tensor at load; the worker's own logs say what matters."""


_backend_ready = False
_backend_lock = threading.Lock()  # a spare's preloader thread may get here first


def _init_llama_once() -> None:
    global _backend_ready
    with _backend_lock:
        if not _backend_ready:
            llama_cpp.llama_log_set(_drop_log, ctypes.c_void_p(0))
            llama_cpp.llama_backend_init()
            _backend_ready = True


def open_model(path: str) -> LlamaModel:
    """llama.cpp's model (weights and vocabulary; no context) from a GGUF file.

    Raises ValueError or RuntimeError when llama.cpp cannot load it.
    """
    _init_llama_once()
    return LlamaModel(path_model=path, params=llama_cpp.llama_model_default_params(), verbose=False)


_FLASH_ATTN = {
    "auto": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO,
    "off": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED,
    "on": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
}


@dataclass(frozen=True)
class ContextShape:
    """What a llama.cpp context for a model is created with, besides the model and the
    thread count (which can change later): two contexts of one shape are interchangeable."""

    n_ctx: int  # cells per slot
    slots: int
    n_batch: int
    flash_attn: str = "auto"  # "auto", "on" or "off"

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> ContextShape:
        slots = int(settings.get("max_concurrent") or DEFAULT_SLOTS)
        flash_attn = str(settings.get("flash_attn") or "auto")
        if flash_attn not in _FLASH_ATTN:
            raise BackendError(f"flash_attn must be auto, on or off, not {flash_attn!r}")
        return cls(
            n_ctx=int(settings.get("n_ctx") or DEFAULT_CONTEXT),
            slots=slots,
            n_batch=max(int(settings.get("n_batch") or 512), slots),
            flash_attn=flash_attn,
        )


def create_context(model: LlamaModel, shape: ContextShape, threads: int) -> Any:
    """A context of `shape` on `model`: each slot its own KV cache of `n_ctx` cells.

    Most of its cost is llama.cpp zeroing the KV cache (190 MB for SmolLM2 with 8 x 1,024
    cells: 8 ms to 40 ms, by the machine's memory bandwidth). Raises BackendError.
    """
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = shape.n_ctx * shape.slots
    params.n_batch = shape.n_batch
    params.n_ubatch = min(512, shape.n_batch)
    params.n_seq_max = shape.slots
    params.n_threads = params.n_threads_batch = threads
    params.kv_unified = False  # each slot owns n_ctx cells: no slot can starve another
    params.flash_attn_type = _FLASH_ATTN[shape.flash_attn]
    ctx = llama_cpp.llama_init_from_model(model.model, params)
    if not ctx:
        raise BackendError(
            f"llama.cpp could not create a context of {shape.n_ctx} x {shape.slots} tokens"
        )
    return ctx


def _first_decode(ctx: Any, slots: int) -> None:
    """Decode one token in every slot of a new context, then forget it: a context made
    ahead whose first decode came with its first request made that request 2-4x slower
    in a third of cold starts (the first decode's one-time costs: its buffers' pages,
    llama.cpp's threads); measured with a spare's context, first request median 52 ms
    with outliers to 132 ms, against 42 ms and none above 47 with this."""
    batch = llama_cpp.llama_batch_init(slots, 0, 1)
    try:
        for slot in range(slots):
            batch.token[slot] = 0
            batch.pos[slot] = 0
            batch.n_seq_id[slot] = 1
            batch.seq_id[slot][0] = slot
            batch.logits[slot] = 1
        batch.n_tokens = slots
        llama_cpp.llama_decode(ctx, batch)  # a failure here costs only the warming
    finally:
        llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), False)


class Preloaded:
    """A model a spare loaded ahead and, for the likeliest one, its context made ahead too.

    Owned by the spare's preloader thread until `take`n; then by the backend that loads it.
    """

    def __init__(
        self, model: LlamaModel, context: Any = None, shape: ContextShape | None = None
    ) -> None:
        """`context`, of `shape`: one made for `model` already (a recycled worker's, so
        warm: it has decoded)."""
        self.model = model
        self._context: Any = context
        self._shape: ContextShape | None = shape if context is not None else None
        self._warm = context is not None
        # The preloader thread's warming decode against the backend's `take_context`.
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: str) -> Preloaded:
        return cls(open_model(path))

    @property
    def shape(self) -> ContextShape | None:
        """The shape of the context it holds (None: none)."""
        return self._shape

    def fit(self, shape: ContextShape | None) -> None:
        """Hold a context of `shape` (None: none), warmed if the cores are idle now (else
        `warm` later). Raises BackendError."""
        with self._lock:
            if shape == self._shape:
                return
            self._free_context()  # first: its memory serves the new one
            if shape is not None:
                self._context = create_context(self.model, shape, usable_cores())
                self._shape, self._warm = shape, False
        chat_formatter(self.model, self.model.metadata())  # compiled into the cache
        self.warm()

    def warm(self) -> bool:
        """Give the context its first decode now if the cores are idle; whether nothing
        is left to warm. Without it, the model's first request took ~100-140 ms instead of
        ~40 in a third to two thirds of cold starts.

        Only on idle cores: beside busy workers the preloader's nice-19 thread got so
        little CPU, its two compute threads meeting at every barrier, that the decode took
        a median 0.6 s (up to 2.4 s) in the swap benchmark, and loads waited for it."""
        if self._warm or self._context is None:
            return True
        threads = usable_cores()
        if idle_cores() < threads - 0.5:
            return False
        with self._lock:
            if self._context is not None and not self._warm:
                _first_decode(self._context, self._shape.slots if self._shape else 1)
                self._warm = True
        return True

    def take_context(self, shape: ContextShape) -> Any:
        """The context made ahead if it has `shape` (the caller then owns it), else None.
        Waits for a warming decode under way (started on idle cores: milliseconds)."""
        with self._lock:
            if self._context is None or shape != self._shape:
                self._free_context()
                return None
            context, self._context, self._shape = self._context, None, None
            return context

    def close(self) -> None:
        with self._lock:
            self._free_context()
        self.model.close()

    def _free_context(self) -> None:
        if self._context is not None:
            llama_cpp.llama_free(self._context)
        self._context, self._shape = None, None


def chat_formatter(model: LlamaModel, metadata: dict[str, Any]) -> Jinja2ChatFormatter | None:
    """The model's chat template, compiled (None if the file has none)."""
    template = metadata.get("tokenizer.chat_template")
    if not template:
        return None
    eos, bos = model.token_eos(), model.token_bos()
    return _compiled_template(
        template,
        model.token_get_text(eos) if eos != -1 else "",
        model.token_get_text(bos) if bos != -1 else "",
        eos,
    )


@lru_cache(maxsize=16)
def _compiled_template(template: str, eos: str, bos: str, eos_id: int) -> Jinja2ChatFormatter:
    """Cached: compiling takes ~5 ms, which a spare pays ahead for its likeliest model.
    A formatter keeps no state between calls, so the backend can use the one compiled
    on the preloader's thread."""
    return Jinja2ChatFormatter(
        template=template, eos_token=eos, bos_token=bos, stop_token_ids=[eos_id]
    )


def can_preload() -> bool:
    """Whether loading weights ahead costs only host memory: not on a GPU build, where
    llama.cpp would put them in GPU memory for a model that is not running."""
    return not llama_cpp.llama_supports_gpu_offload()


@lru_cache(maxsize=64)
def _grammar_text(schema_json: str, frame: GrammarFrame | None = None) -> str:
    """GBNF for a JSON schema ("{}" means any JSON object), maybe framed by text (each
    value between `frame.before` and `frame.after`); cached, agents repeat schemas."""
    if schema_json == "{}":
        grammar = JSON_GBNF
    else:
        grammar = LlamaGrammar.from_json_schema(schema_json, verbose=False)._grammar
    if frame is None:
        return grammar
    # The schema's root becomes one framed item of a new root.
    item = re.sub(r"^root ::=", "framed-value ::=", grammar, count=1, flags=re.MULTILINE)
    block = f"{json.dumps(frame.before)} framed-value {json.dumps(frame.after)}"
    root = f'root ::= {block} ("\\n" {block})*' if frame.repeat else f"root ::= {block}"
    return f"{root}\n{item}"


class _TokenPieces:
    """Token id -> its bytes, cached: the same few thousand tokens recur constantly."""

    def __init__(self, vocab: Any) -> None:
        self._vocab = vocab
        self._pieces: dict[int, bytes] = {}

    def __call__(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            size = 64
            while True:
                buffer = ctypes.create_string_buffer(size)
                n = llama_cpp.llama_token_to_piece(self._vocab, token, buffer, size, 0, False)
                if n >= 0:
                    break
                size = -n  # a negative result is the size the piece needs
            piece = self._pieces[token] = buffer.raw[:n]
        return piece


# llama.cpp's llama_token_data, as numpy lays it out: one row per vocabulary entry.
_TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])


class _Candidates:
    """The whole vocabulary as llama.cpp's token-data array, filled from one step's
    logits, for sampling that llama_sampler_sample cannot do alone (see `_sample_bound`)."""

    def __init__(self, n_vocab: int) -> None:
        self._rows = np.zeros(n_vocab, dtype=_TOKEN_DATA)
        self._ids = np.arange(n_vocab, dtype=np.int32)
        self._pointer = self._rows.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token_data))

    def fill(self, logits: np.ndarray, best: int | None = None) -> llama_cpp.llama_token_data_array:
        """The array of every token, or of the `best` likeliest only (unordered)."""
        rows = self._rows
        if best is None:
            rows["id"] = self._ids  # samplers sort the rows in place: reset every time
            rows["logit"] = logits
            size = len(rows)
        else:
            ids = np.argpartition(logits, -best)[-best:]
            rows["id"][:best] = ids
            rows["logit"][:best] = logits[ids]
            size = best
        rows["p"][:size] = 0.0
        return llama_cpp.llama_token_data_array(
            data=self._pointer, size=size, selected=-1, sorted=False
        )


def _selected(array: llama_cpp.llama_token_data_array) -> int:
    return int(array.data[array.selected].id)


def _grammar_allows(grammar: Any, token: int) -> bool:
    """Whether the grammar, in its present state, accepts `token` next."""
    single = llama_cpp.llama_token_data(id=token, logit=1.0, p=0.0)
    array = llama_cpp.llama_token_data_array(
        data=ctypes.pointer(single), size=1, selected=-1, sorted=False
    )
    llama_cpp.llama_sampler_apply(grammar, ctypes.byref(array))
    return bool(np.isfinite(single.logit))


class _Sequence:
    """One slot's state: what its KV cache holds and what it must decode next."""

    def __init__(self) -> None:
        self.cached: list[int] = []  # tokens whose KV entries are in the cache, in order
        self.pending: list[int] = []  # tokens to decode next (a prompt's rest, or 1 token)
        self.sampler: Any = None
        self.grammar: Any = None  # constrained decoding: checked apart from `sampler`
        # Whether the reply is over once the grammar may end (nothing but whitespace
        # could follow); not so for framed replies that may repeat (parallel calls).
        self.grammar_ends = False
        # No penalties in the chain: accepting a token leaves it as it was.
        self.stateless_chain = True
        self.top_logprobs: int | None = None  # report logprobs (with this many alternatives)
        self.score: TokenScore | None = None  # the last sampled token's, when reported
        self.last_used = 0  # when a request last took this slot (a counter)

    def close(self) -> None:
        for sampler in (self.sampler, self.grammar):
            if sampler is not None:
                llama_cpp.llama_sampler_free(sampler)
        self.sampler = self.grammar = self.score = None
        self.pending = []


class LlamaCppBackend(Backend):
    def __init__(self, settings: dict[str, Any], preloaded: Preloaded | None = None) -> None:
        """`preloaded`: the served file's model, loaded ahead by a spare (`preload`)."""
        self._preloaded = preloaded
        self.weights_preloaded = False  # whether load() used `preloaded`
        self.context_preloaded = False  # whether it also had the context made ahead
        self._model_path = str(settings["model_path"])
        self._weights: WeightsMode = settings.get("weights") or "auto"
        self._weights_cache = settings.get("weights_cache_dir")
        # The manager says which file to load (it has read the header already); a
        # standalone worker works it out.
        self.served_path: str | None = settings.get("served_model_path")
        self._shape = ContextShape.from_settings(settings)
        self._n_threads = int(settings.get("n_threads") or usable_cores())
        self._model: LlamaModel | None = None
        self._ctx: Any = None
        self._memory: Any = None
        self._batch: Any = None
        self._sequences = [_Sequence() for _ in range(self._shape.slots)]
        self._uses = 0
        self._formatter: Jinja2ChatFormatter | None = None
        # The registry's chat_template, in place of the file's own (None: the file's).
        self._template_override: str | None = settings.get("chat_template")
        self._template: str | None = None
        self._opening: list[int] | None = None  # to compute and save in warm_up
        self._pieces: _TokenPieces | None = None
        self._candidates: _Candidates | None = None  # made on first use

    @property
    def context_length(self) -> int:
        return self._shape.n_ctx

    @property
    def slots(self) -> int:
        return self._shape.slots

    @property
    def model(self) -> LlamaModel:
        if self._model is None:
            raise BackendError("model is not loaded")
        return self._model

    # --- load / unload ----------------------------------------------------------------------

    def load(self) -> None:
        # The header check gives a clear reason for a missing, truncated or foreign file,
        # where llama.cpp would only say it failed.
        started = time.perf_counter()
        path = Path(self._model_path)
        preloaded, self._preloaded = self._preloaded, None
        model = preloaded.model if preloaded is not None else None
        ctx = preloaded.take_context(self._shape) if preloaded is not None else None
        self.weights_preloaded = model is not None
        self.context_preloaded = ctx is not None
        if model is None:
            check_header(path)
            served = self.served_path
            if served is None:
                planned = served_path(path, self._weights, cache_dir(self._weights_cache))
            else:
                planned = Path(served)
            self.served_path = str(ensure_served(path, planned))
        weights_at = time.perf_counter()
        if model is None:
            try:
                model = open_model(str(self.served_path))
            except (ValueError, RuntimeError) as exc:
                read_metadata(path)  # names the problem (say, a truncated file) if it can
                raise BackendError(f"llama.cpp could not load {self._model_path}: {exc}") from exc
        model_at = time.perf_counter()
        if ctx is None:
            try:
                ctx = create_context(model, self._shape, self._n_threads)
            except BackendError:
                model.close()
                raise
        else:
            llama_cpp.llama_set_n_threads(ctx, self._n_threads, self._n_threads)
        self._model, self._ctx = model, ctx
        context_at = time.perf_counter()
        self._memory = llama_cpp.llama_get_memory(ctx)
        self._batch = llama_cpp.llama_batch_init(self._shape.n_batch, 0, 1)
        self._formatter = self._chat_formatter(model, model.metadata())
        self._pieces = _TokenPieces(model.vocab)
        self._restore_opening()
        self.load_phases = {
            "prepare_weights": weights_at - started,
            "load_model": model_at - weights_at,
            "create_context": context_at - model_at,
            "chat_template": time.perf_counter() - context_at,  # and the opening's cache
        }

    def set_threads(self, threads: int) -> None:
        """Never more than the registry's n_threads; at least one."""
        if self._ctx is not None:
            n = max(1, min(threads, self._n_threads))
            llama_cpp.llama_set_n_threads(self._ctx, n, n)

    # --- the chat template's opening, kept across processes -----------------------------

    def _restore_opening(self) -> None:
        """Put the KV cache of the chat template's opening into slot 0, from a saved file.

        Every chat prompt starts with the same tokens (SmolLM2's template opens with a
        default system message: 24 tokens, ~60 ms to compute on 2 cores, most of a cold
        start's first request). The first worker of a model computes them once it is up
        (`warm_up`) and saves their KV cache next to the weights; later workers read it
        back here in well under a millisecond, and requests reuse it like any cached
        prefix. Without a saved file, or with one that does not fit, nothing is restored.
        """
        opening = self._opening_tokens()
        if len(opening) < 2:
            return
        self._opening = opening
        path = self._opening_file(opening)
        if not path.exists():
            return
        tokens = (llama_cpp.llama_token * len(opening))()
        count = ctypes.c_size_t(0)
        read = llama_cpp.llama_state_seq_load_file(
            self._ctx, str(path).encode(), 0, tokens, len(opening), ctypes.byref(count)
        )
        if read and list(tokens[: count.value]) == opening:
            self._sequences[0].cached = list(opening)
            self._opening = None  # nothing left to save
        else:
            llama_cpp.llama_memory_seq_rm(self._memory, 0, -1, -1)

    def warm_up(self) -> None:
        """Compute and save the opening when no saved one was found (engine thread)."""
        opening, self._opening = self._opening, None
        if opening is None or len(opening) > self._shape.n_batch:
            return
        slot = self._sequences[0]
        slot.cached, slot.pending = [], list(opening)
        try:
            self._decode([0])
        except BackendError:
            llama_cpp.llama_memory_seq_rm(self._memory, 0, -1, -1)
            slot.cached, slot.pending = [], []
            return
        path = self._opening_file(opening)
        # Written beside and renamed: a worker reading it never sees half a file.
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tokens = (llama_cpp.llama_token * len(opening))(*opening)
            if llama_cpp.llama_state_seq_save_file(
                self._ctx, str(tmp).encode(), 0, tokens, len(opening)
            ):
                os.replace(tmp, path)
        except OSError as exc:
            log.warning("could not save the chat opening's cache", extra={"reason": str(exc)})
        finally:
            tmp.unlink(missing_ok=True)

    def _opening_tokens(self) -> list[int]:
        """The tokens every chat prompt starts with: where two different ones part."""
        if self._formatter is None:
            return []
        one = self.render_chat([{"role": "user", "content": "a"}]).tokens
        two = self.render_chat([{"role": "user", "content": "b"}]).tokens
        return one[: _common_prefix(one, two)]

    def _opening_file(self, opening: list[int]) -> Path:
        """Keyed by the weights file (path, size, time) and the tokens themselves."""
        served = Path(self.served_path or self._model_path)
        digest = version_key(served, opening)
        return cache_dir(self._weights_cache) / f"{served.stem}.opening.{digest}.kv"

    def _chat_formatter(
        self, model: LlamaModel, metadata: dict[str, Any]
    ) -> Jinja2ChatFormatter | None:
        if self._template_override:
            metadata = {**metadata, "tokenizer.chat_template": self._template_override}
        self._template = metadata.get("tokenizer.chat_template")
        try:
            return chat_formatter(model, metadata)
        except Exception as exc:  # jinja's syntax errors and the like
            raise BackendError(f"the chat template does not compile: {exc}") from exc

    @property
    def tool_format(self) -> ToolFormat:
        return template_tool_format(self._template)

    def release_model(self) -> Preloaded | None:
        """Free all but the weights and the context, and hand those over as if loaded
        ahead (the caller owns them now): a worker handed back to the spares keeps its
        model, and making the same context again would only zero its KV cache anew."""
        if self._model is None:
            return None
        kept = Preloaded(self._model, self._ctx, self._shape)
        self._model = self._ctx = None
        self.unload()
        return kept

    def unload(self) -> None:
        for sequence in self._sequences:
            sequence.close()
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx is not None:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        if self._model is not None:
            self._model.close()
            self._model = None

    # --- prompts ----------------------------------------------------------------------------

    def render_chat(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> RenderedPrompt:
        if self._formatter is None:
            # No template in the file: a plain transcript is the least surprising prompt.
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
            return RenderedPrompt(tokens=self.tokenize(text), stop=["\nuser:"])
        try:
            rendered = self._formatter(messages=messages, tools=tools)  # type: ignore[arg-type]
        except Exception as exc:  # jinja raises many kinds; all mean "bad messages"
            raise BackendError(f"the chat template rejected the messages: {exc}") from exc
        data = rendered.prompt.encode()
        self._check_prompt_size(data)
        tokens = self.model.tokenize(data, add_bos=not rendered.added_special, special=True)
        stops = rendered.stop if isinstance(rendered.stop, list) else [rendered.stop or ""]
        return RenderedPrompt(tokens=tokens, stop=[s for s in stops if s])

    def tokenize(self, text: str, bos: bool = True) -> list[int]:
        data = text.encode()
        self._check_prompt_size(data)
        return self.model.tokenize(data, add_bos=bos, special=False)

    def _check_prompt_size(self, data: bytes) -> None:
        """Raises PromptTooLong for text that cannot fit in `n_ctx` tokens, before the
        seconds tokenizing megabytes would take: a token covers at most
        `_longest_token_bytes` bytes of text."""
        context = self._shape.n_ctx
        if len(data) <= context:
            return  # fewer bytes than tokens allowed: always worth tokenizing
        longest = self._longest_token_bytes
        if longest is not None and len(data) > context * longest:
            raise PromptTooLong(len(data), context, longest)

    @cached_property
    def _longest_token_bytes(self) -> int | None:
        """The most text bytes one token stands for, or None when that does not bound a
        prompt's token count (computed on first use: ~49k calls for SmolLM2).

        For BPE and SentencePiece vocabularies every byte of text lands in some token and
        a token stands for its own piece (special tokens, parsed in rendered prompts,
        included). Not so for WordPiece and Unigram, which drop or merge whitespace when
        normalizing, nor for special tokens with lstrip/rstrip, which swallow the
        whitespace next to them.
        """
        vocab = self.model.vocab
        if llama_cpp.llama_vocab_type(vocab) not in (
            llama_cpp.LLAMA_VOCAB_TYPE_BPE,
            llama_cpp.LLAMA_VOCAB_TYPE_SPM,
        ):
            return None
        strips = llama_cpp.LLAMA_TOKEN_ATTR_LSTRIP | llama_cpp.LLAMA_TOKEN_ATTR_RSTRIP
        size = 256
        buffer = ctypes.create_string_buffer(size)
        longest = 1
        for token in range(llama_cpp.llama_vocab_n_tokens(vocab)):
            if llama_cpp.llama_vocab_get_attr(vocab, token) & strips:
                return None
            n = llama_cpp.llama_token_to_piece(vocab, token, buffer, size, 0, True)
            if n < 0:  # longer than the buffer: -n is its size
                n = -n
            longest = max(longest, n)
        return longest

    def check_sampling(self, params: SamplingParams) -> None:
        if params.json_schema is None:
            return
        try:
            _grammar_text(json.dumps(params.json_schema), params.json_frame)
        except Exception as exc:
            raise BackendError(f"response_format schema is not supported: {exc}") from exc
        if params.grammar_primed:
            self._free_grammar(self._grammar(params))  # the primed tokens fit the grammar

    # --- batched generation -----------------------------------------------------------------

    def token_bytes(self, token: int) -> bytes:
        assert self._pieces is not None
        return self._pieces(token)

    def is_end(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.model.vocab, token))

    def pick_slot(self, free: list[int], tokens: list[int], beside: int) -> int:
        """The free slot where the prompt saves the most and costs the least, in prompt
        tokens: its cached prefix of `tokens` is not computed again; the rest of its
        cache (another conversation's) is lost; and a slot that starts a new run of busy
        ids costs a pass of its own each step it decodes beside them (`beside`: its
        budget or the longest of theirs left, whichever is shorter; EXPECTED_REPLY_TOKENS
        at most), RUN_STEP_COST_TOKENS a step (one that joins two runs saves as much).

        So two agents taking turns keep a slot each: sharing only the chat template's
        first tokens is not worth the other's cache (which longest-prefix-wins gave
        away, and each turn then computed its whole prompt). And concurrent requests sit
        side by side unless a cached prefix is worth more than the extra passes. Among
        slots of equal worth, the one used least recently (an empty one first).
        """
        self._uses += 1
        busy = set(range(self._shape.slots)).difference(free)
        runs_now = _runs(busy)
        steps = min(beside, EXPECTED_REPLY_TOKENS)

        def worth(slot: int) -> tuple[int, int]:
            cached = self._sequences[slot].cached
            shared = _common_prefix(cached, tokens)
            lost = len(cached) - shared
            passes = _runs(busy | {slot}) - runs_now  # with none busy, `steps` is 0
            cost = passes * steps * RUN_STEP_COST_TOKENS
            return shared - lost - cost, -self._sequences[slot].last_used

        best = max(free, key=worth)
        self._sequences[best].last_used = self._uses
        return best

    def open_sequence(self, slot: int, tokens: list[int], params: SamplingParams) -> int:
        """Start generating for `tokens` in `slot`; returns how many were already cached."""
        sequence = self._sequences[slot]
        # Keep the cached prefix; at least the last prompt token is decoded again, since
        # sampling needs its logits.
        reused = min(_common_prefix(sequence.cached, tokens), len(tokens) - 1)
        if not llama_cpp.llama_memory_seq_rm(self._memory, slot, reused, -1):
            llama_cpp.llama_memory_seq_rm(self._memory, slot, -1, -1)
            reused = 0
        sequence.cached = tokens[:reused]
        sequence.pending = tokens[reused:]
        sequence.sampler = self._sampler(params)
        sequence.grammar = self._grammar(params)
        sequence.grammar_ends = params.json_frame is None or not params.json_frame.repeat
        sequence.stateless_chain = not (params.presence_penalty or params.frequency_penalty)
        sequence.top_logprobs = params.top_logprobs
        return reused

    def close_sequence(self, slot: int) -> None:
        """Free the slot; its KV cache stays for prefix reuse."""
        self._sequences[slot].close()

    def step(self, slots: list[int]) -> dict[int, int]:
        """Decode one batch for `slots`; return the token sampled for each that got one.

        Prompts are fed in chunks so one long prompt does not stall the others' streams;
        a slot still in its prompt gets no token this step. Raises BackendError.
        """
        sampled: dict[int, int] = {}
        for slot, index in self._decode(slots).items():
            sequence = self._sequences[slot]
            if sequence.grammar is None:
                token = int(llama_cpp.llama_sampler_sample(sequence.sampler, self._ctx, index))
            else:
                token = self._sample_bound(sequence, index)
            if sequence.top_logprobs is not None:
                sequence.score = self._score(index, token, sequence.top_logprobs)
            sequence.pending = [token]
            sampled[slot] = token
        return sampled

    def _logits(self, index: int) -> np.ndarray:
        pointer = llama_cpp.llama_get_logits_ith(self._ctx, index)
        return np.ctypeslib.as_array(pointer, shape=(self.model.n_vocab(),))

    def _sample_bound(self, sequence: _Sequence, index: int) -> int:
        """Sample under a grammar, checking the grammar only where it matters.

        Applying a grammar to the whole vocabulary costs more than decoding a token of a
        small model (6.5 ms for SmolLM2's 49,152 tokens). As llama.cpp's own sampler
        does, sample without it first and keep the token if the grammar accepts it
        (nearly always, once a model follows the format). Otherwise apply the grammar to
        the likeliest tokens only and sample among those it allows: top_k keeps no more
        than 40 anyway, so only a grammar that allows none of them costs a full pass.
        """
        if self._candidates is None:
            self._candidates = _Candidates(self.model.n_vocab())
        logits = self._logits(index)
        if sequence.stateless_chain:
            # llama.cpp samples (and accepts, which changes nothing here) in one call.
            token = int(llama_cpp.llama_sampler_sample(sequence.sampler, self._ctx, index))
        else:  # penalties remember accepted tokens: accept only the token kept
            array = self._candidates.fill(logits)
            llama_cpp.llama_sampler_apply(sequence.sampler, ctypes.byref(array))
            token = _selected(array)
        if not _grammar_allows(sequence.grammar, token):
            allowed = self._sample_allowed(sequence, logits, GRAMMAR_SHORTLIST)
            if allowed is None:
                allowed = self._sample_allowed(sequence, logits, None)
            assert allowed is not None, "a grammar that allows no token"
            token = allowed
            if sequence.stateless_chain:
                llama_cpp.llama_sampler_accept(sequence.sampler, token)
        llama_cpp.llama_sampler_accept(sequence.grammar, token)
        if not sequence.stateless_chain:
            llama_cpp.llama_sampler_accept(sequence.sampler, token)
        return token

    def _sample_allowed(
        self, sequence: _Sequence, logits: np.ndarray, best: int | None
    ) -> int | None:
        """Sample among the `best` likeliest tokens (None: all) that the grammar allows;
        None when it allows none of them."""
        assert self._candidates is not None
        array = self._candidates.fill(logits, best)
        llama_cpp.llama_sampler_apply(sequence.grammar, ctypes.byref(array))
        rows = np.ctypeslib.as_array(array.data, shape=(array.size,))
        if not np.isfinite(rows["logit"]).any():
            return None
        llama_cpp.llama_sampler_apply(sequence.sampler, ctypes.byref(array))
        return _selected(array)

    def reply_complete(self, slot: int) -> bool:
        sequence = self._sequences[slot]
        if sequence.grammar is None or not sequence.grammar_ends:
            return False
        return _grammar_allows(sequence.grammar, self.model.token_eos())

    def _score(self, index: int, token: int, alternatives: int) -> TokenScore:
        """The model's log-probability of `token` and of its likeliest alternatives."""
        logits = self._logits(index).astype(np.float64)
        peak = logits.max()
        logprobs = logits - (peak + np.log(np.exp(logits - peak).sum()))
        top: list[tuple[int, float]] = []
        if alternatives:
            best = np.argpartition(-logprobs, alternatives)[:alternatives]
            best = best[np.argsort(-logprobs[best])]
            top = [(int(t), float(logprobs[t])) for t in best]
        return TokenScore(token, float(logprobs[token]), top)

    def token_score(self, slot: int) -> TokenScore | None:
        return self._sequences[slot].score

    def _decode(self, slots: list[int]) -> dict[int, int]:
        """Decode what `slots` have pending (as much as one batch holds); returns, for
        each slot whose pending tokens are all in, the batch index of its logits."""
        batch = self._batch
        budget = self._shape.n_batch
        takes: dict[int, int] = {}
        # Decoding slots first, one token each, so streams keep flowing while prompts load.
        for slot in sorted(slots, key=lambda s: len(self._sequences[s].pending) > 1):
            count = min(len(self._sequences[slot].pending), budget)
            if not count:
                break
            takes[slot] = count
            budget -= count
        n = 0
        sample_at: dict[int, int] = {}
        # In slot order: with one KV stream per slot, llama.cpp computes a run of
        # consecutive sequence ids in one pass, and splits the batch wherever ids go
        # backwards or skip (measured: 8 shuffled slots decode 1.5x slower than in order).
        for slot in sorted(takes):
            sequence = self._sequences[slot]
            position = len(sequence.cached)
            for offset, token in enumerate(sequence.pending[: takes[slot]]):
                batch.token[n] = token
                batch.pos[n] = position + offset
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = slot
                batch.logits[n] = 0
                n += 1
            if takes[slot] == len(sequence.pending):
                batch.logits[n - 1] = 1
                sample_at[slot] = n - 1
        batch.n_tokens = n
        status = llama_cpp.llama_decode(self._ctx, batch)
        if status != 0:
            self._undo_decode(list(takes))
            raise DecodeFailed(f"llama_decode failed with status {status}", sorted(takes))
        # Only now are the tokens in the KV cache: a later prompt may reuse them.
        for slot, count in takes.items():
            sequence = self._sequences[slot]
            sequence.cached.extend(sequence.pending[:count])
            del sequence.pending[:count]
        return sample_at

    def _undo_decode(self, slots: list[int]) -> None:
        """After a failed decode: drop every cell the batch may have written for `slots`.

        llama.cpp may have kept the ubatches that ran before the one that failed; their
        cells are past what each slot records as cached, so removing from there leaves
        exactly the cached tokens, which the next prompt may still reuse.
        """
        for slot in slots:
            sequence = self._sequences[slot]
            if not llama_cpp.llama_memory_seq_rm(self._memory, slot, len(sequence.cached), -1):
                llama_cpp.llama_memory_seq_rm(self._memory, slot, -1, -1)
                sequence.cached = []

    def _grammar(self, params: SamplingParams) -> Any:
        """The grammar sampler for constrained decoding (None when unconstrained), past
        the primed tokens. Raises BackendError if they do not fit it."""
        if params.json_schema is None:
            return None
        # sort_keys would reorder properties, and with them the order the model writes.
        text = _grammar_text(json.dumps(params.json_schema), params.json_frame)
        grammar = llama_cpp.llama_sampler_init_grammar(self.model.vocab, text.encode(), b"root")
        for token in params.grammar_primed:
            # llama.cpp aborts the process on a token its grammar cannot take: ask first.
            if not _grammar_allows(grammar, token):
                self._free_grammar(grammar)
                raise BackendError("the reply's fixed opening does not fit its grammar")
            llama_cpp.llama_sampler_accept(grammar, token)
        return grammar

    @staticmethod
    def _free_grammar(grammar: Any) -> None:
        if grammar is not None:
            llama_cpp.llama_sampler_free(grammar)

    def _sampler(self, params: SamplingParams) -> Any:
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())

        def add(sampler: Any) -> None:
            llama_cpp.llama_sampler_chain_add(chain, sampler)

        if params.presence_penalty or params.frequency_penalty:
            add(
                llama_cpp.llama_sampler_init_penalties(
                    self.model.n_vocab(),
                    64,
                    1.0,
                    params.frequency_penalty,
                    params.presence_penalty,
                )
            )
        if params.temperature <= 0:
            add(llama_cpp.llama_sampler_init_greedy())
            return chain
        add(llama_cpp.llama_sampler_init_top_k(TOP_K))
        add(llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
        add(llama_cpp.llama_sampler_init_min_p(MIN_P, 1))
        add(llama_cpp.llama_sampler_init_temp(params.temperature))
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(4), "little")
        add(llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        return chain


def _runs(slots: set[int]) -> int:
    """How many runs of consecutive ids `slots` make: llama.cpp decodes each in a pass."""
    return sum(1 for slot in slots if slot - 1 not in slots)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
