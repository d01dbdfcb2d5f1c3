"""The engine's prefix cache after a failed decode (real SmolLM2, in this process).

A slot records which tokens its KV cache holds, and the next prompt that starts with
them skips computing them. That record must move only once llama_decode has written
the cells: a prompt reusing cells a failed decode never wrote would be computed against
nothing, and its reply would be wrong without any error.

The failure is real: a prompt holding a token id outside the vocabulary makes llama.cpp
reject the whole batch (the HTTP API only takes text, so only an in-process caller can
send one).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from model_service.backends.base import Backend, DecodeFailed, RenderedPrompt, SamplingParams
from model_service.backends.llama_cpp import LlamaCppBackend
from model_service.engine import Engine, EngineError, Finished
from model_service.model_files import package_file
from tests.conftest import SMOLLM2_FILE

GREEDY = SamplingParams(temperature=0)
STORY = "The quick brown fox jumps over the lazy dog. Once upon a time, in a small village"


@contextmanager
def running_engine(cache: Path) -> Iterator[Engine]:
    backend = LlamaCppBackend(
        {
            "model_path": str(package_file(SMOLLM2_FILE)),
            "n_ctx": 256,
            "max_concurrent": 2,
            "n_threads": 2,
            "weights_cache_dir": str(cache),
        }
    )
    backend.load()
    engine = Engine(backend)
    engine.start()
    try:
        yield engine
    finally:
        engine.stop(timeout=60)
        backend.unload()


async def generate(engine: Engine, tokens: list[int]) -> tuple[str, Finished]:
    stream = engine.submit(tokens, GREEDY, 16, [])
    text = await stream.text()
    assert stream.result is not None
    return text, stream.result


def tokens(engine: Engine, *texts: str) -> list[int]:
    """The texts as one prompt: BOS (where the model has one) before the first only."""
    result: list[int] = []
    for i, text in enumerate(texts):
        result += engine.backend.tokenize(text, bos=i == 0)
    return result


def invalid_token(engine: Engine) -> int:
    backend = engine.backend
    assert isinstance(backend, LlamaCppBackend)
    return int(backend.model.n_vocab()) + 7


async def test_a_failed_prompt_leaves_no_cached_tokens_behind(tmp_path: Path) -> None:
    """The failed prompt's slot was empty: nothing of it may count as cached."""
    with running_engine(tmp_path) as fresh:
        good = tokens(fresh, STORY, " there lived")
        expected = await generate(fresh, good)

    with running_engine(tmp_path) as engine:
        bad = [*tokens(engine, STORY), invalid_token(engine)]
        with pytest.raises(EngineError, match="llama_decode failed"):
            await generate(engine, bad)
        # The same prefix again: all of it must be computed, as on a fresh slot.
        # (Finished holds cached_tokens: none of the story may count as cached.)
        assert await generate(engine, good) == expected


async def test_a_failed_prompt_keeps_the_prefix_that_was_really_cached(tmp_path: Path) -> None:
    """The failed prompt extended a cached prefix: that prefix stays usable, the rest is
    gone, and the next prompt gets what it would have got without the failure."""
    with running_engine(tmp_path) as fresh:
        first = tokens(fresh, STORY, " there lived")
        second = tokens(fresh, STORY, " far away, a baker", " baked bread")
        expected = [await generate(fresh, first), await generate(fresh, second)]
        story = len(tokens(fresh, STORY))

    with running_engine(tmp_path) as engine:
        got = [await generate(engine, first)]
        bad = [*tokens(engine, STORY, " far away, a baker"), invalid_token(engine)]
        with pytest.raises(EngineError, match="llama_decode failed"):
            await generate(engine, bad)
        got.append(await generate(engine, second))
    assert got == expected
    # The second prompt really reused the story's cells (it is the case worth testing).
    assert expected[1][1].cached_tokens >= story


# --- the engine's side, with a stand-in backend: only the failed batch's requests fail ---


class OneFailedStep(Backend):
    """Two slots; the second step fails for slot 1 only (as if slot 0 was not in it)."""

    def __init__(self) -> None:
        self.steps = 0
        self.closed: list[int] = []

    context_length = 64
    slots = 2

    def load(self) -> None: ...
    def unload(self) -> None: ...
    def render_chat(self, messages: Any, tools: Any = None) -> RenderedPrompt:
        raise NotImplementedError

    def tokenize(self, text: str, bos: bool = True) -> list[int]:
        raise NotImplementedError

    def check_sampling(self, params: SamplingParams) -> None: ...
    def pick_slot(self, free: list[int], tokens: list[int], beside: int) -> int:
        return min(free)

    def open_sequence(self, slot: int, tokens: list[int], params: SamplingParams) -> int:
        return 0

    def step(self, slots: list[int]) -> dict[int, int]:
        self.steps += 1
        if self.steps == 2:
            raise DecodeFailed("llama_decode failed with status 1", [1])
        return {slot: 65 for slot in slots}  # "A"

    def close_sequence(self, slot: int) -> None:
        self.closed.append(slot)

    def is_end(self, token: int) -> bool:
        return False

    def token_bytes(self, token: int) -> bytes:
        return bytes([token])


async def test_only_the_requests_in_the_failed_batch_fail() -> None:
    backend = OneFailedStep()
    engine = Engine(backend)
    first = engine.submit([1], GREEDY, 4, [])
    second = engine.submit([2], GREEDY, 4, [])
    engine.start()
    try:
        with pytest.raises(EngineError, match="status 1"):
            await second.text()
        assert await first.text() == "AAAA"
    finally:
        engine.stop()
    assert first.result is not None and first.result.completion_tokens == 4
    assert backend.closed.count(1) == 1


class SlotChoices(OneFailedStep):
    """Records what the engine tells pick_slot; every step succeeds."""

    def __init__(self) -> None:
        super().__init__()
        self.beside: list[int] = []

    def pick_slot(self, free: list[int], tokens: list[int], beside: int) -> int:
        self.beside.append(beside)
        return min(free)

    def step(self, slots: list[int]) -> dict[int, int]:
        return {slot: 65 for slot in slots}


async def test_a_slot_choice_counts_only_the_steps_beside_the_running_requests() -> None:
    """A slot apart from the busy ones costs a pass per step they decode together: at
    most the new request's budget, and no longer than the longest of theirs left."""
    backend = SlotChoices()
    engine = Engine(backend)
    short = engine.submit([1], GREEDY, 4, [])
    long = engine.submit([2], GREEDY, 40, [])
    engine.start()
    try:
        assert await short.text() == "AAAA"
        assert await long.text() == "A" * 40
    finally:
        engine.stop()
    # The first found no one running; the second could decode 4 steps beside the first.
    assert backend.beside == [0, 4]
