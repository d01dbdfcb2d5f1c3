"""GGUF models run in-process by llama.cpp through llama-cpp-python."""

from __future__ import annotations

import ctypes
import json
import os
import random
from collections.abc import Generator
from functools import lru_cache
from pathlib import Path
from typing import Any

import llama_cpp
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar

from model_service.backends.base import Backend, BackendError, RenderedPrompt, SamplingParams
from model_service.gguf import read_metadata

DEFAULT_CONTEXT = 2048


@lru_cache(maxsize=64)
def _grammar_for(schema_json: str) -> LlamaGrammar:
    # Compiling a schema into a grammar takes milliseconds; agents repeat their schemas.
    if schema_json == "{}":
        return LlamaGrammar.from_string(JSON_GBNF, verbose=False)
    return LlamaGrammar.from_json_schema(schema_json, verbose=False)


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


class LlamaCppBackend(Backend):
    def __init__(self, settings: dict[str, Any]) -> None:
        self._model_path = str(settings["model_path"])
        self._n_ctx = int(settings.get("n_ctx") or DEFAULT_CONTEXT)
        self._n_threads = int(settings.get("n_threads") or os.cpu_count() or 1)
        self._n_batch = int(settings.get("n_batch") or 512)
        self._llama: llama_cpp.Llama | None = None
        self._formatter: Jinja2ChatFormatter | None = None
        self._pieces: _TokenPieces | None = None
        self._bos_for_completions = True

    @property
    def context_length(self) -> int:
        return self._n_ctx

    @property
    def llama(self) -> llama_cpp.Llama:
        if self._llama is None:
            raise BackendError("model is not loaded")
        return self._llama

    def load(self) -> None:
        # The header check gives a clear reason for a missing, truncated or foreign file,
        # where llama.cpp would only say it failed.
        read_metadata(Path(self._model_path))
        try:
            llama = llama_cpp.Llama(
                model_path=self._model_path,
                n_ctx=self._n_ctx,
                n_threads=self._n_threads,
                n_threads_batch=self._n_threads,
                n_batch=self._n_batch,
                verbose=False,
            )
        except (ValueError, RuntimeError) as exc:
            raise BackendError(f"llama.cpp could not load {self._model_path}: {exc}") from exc
        self._llama = llama
        self._formatter = self._chat_formatter(llama)
        self._pieces = _TokenPieces(llama._model.vocab)

    @staticmethod
    def _chat_formatter(llama: llama_cpp.Llama) -> Jinja2ChatFormatter | None:
        template = llama.metadata.get("tokenizer.chat_template")
        if not template:
            return None
        model = llama._model
        eos, bos = llama.token_eos(), llama.token_bos()
        return Jinja2ChatFormatter(
            template=template,
            eos_token=model.token_get_text(eos) if eos != -1 else "",
            bos_token=model.token_get_text(bos) if bos != -1 else "",
            stop_token_ids=[eos],
        )

    def unload(self) -> None:
        if self._llama is not None:
            self._llama.close()
            self._llama = None

    def render_chat(self, messages: list[dict[str, str]]) -> RenderedPrompt:
        if self._formatter is None:
            # No template in the file: a plain transcript is the least surprising prompt.
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
            return RenderedPrompt(tokens=self.tokenize(text), stop=["\nuser:"])
        try:
            rendered = self._formatter(messages=messages)  # type: ignore[arg-type]
        except Exception as exc:  # jinja raises many kinds; all mean "bad messages"
            raise BackendError(f"the chat template rejected the messages: {exc}") from exc
        tokens = self.llama.tokenize(
            rendered.prompt.encode(), add_bos=not rendered.added_special, special=True
        )
        stops = rendered.stop if isinstance(rendered.stop, list) else [rendered.stop or ""]
        return RenderedPrompt(tokens=tokens, stop=[s for s in stops if s])

    def tokenize(self, text: str) -> list[int]:
        return self.llama.tokenize(text.encode(), add_bos=self._bos_for_completions, special=False)

    def check_sampling(self, params: SamplingParams) -> None:
        if params.json_schema is None:
            return
        try:
            _grammar_for(json.dumps(params.json_schema, sort_keys=True))
        except Exception as exc:
            raise BackendError(f"response_format schema is not supported: {exc}") from exc

    def generate(self, tokens: list[int], params: SamplingParams) -> Generator[bytes, None, None]:
        llama = self.llama
        llama.set_seed(params.seed if params.seed is not None else random.getrandbits(31))
        grammar = None
        if params.json_schema is not None:
            grammar = _grammar_for(json.dumps(params.json_schema, sort_keys=True))
        vocab = llama._model.vocab
        to_piece = self._pieces
        assert to_piece is not None
        for token in llama.generate(
            tokens,
            temp=params.temperature,
            top_p=params.top_p,
            presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty,
            grammar=grammar,
        ):
            if llama_cpp.llama_vocab_is_eog(vocab, token):
                return
            yield to_piece(token)
