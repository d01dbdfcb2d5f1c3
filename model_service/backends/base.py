"""The small interface every backend implements.

A backend is driven from exactly one thread, the worker's engine thread: nothing here
needs to be thread-safe, and every method may block.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any


class BackendError(Exception):
    """The backend cannot do what was asked (bad file, bad grammar, ...)."""


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8
    top_p: float = 0.95
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # Constrained decoding: a JSON schema, or {} for "any JSON object".
    json_schema: dict[str, Any] | None = None


@dataclass(frozen=True)
class RenderedPrompt:
    tokens: list[int]
    stop: list[str] = field(default_factory=list)


class Backend(ABC):
    """One model, loaded into this process."""

    @property
    @abstractmethod
    def context_length(self) -> int:
        """How many tokens (prompt plus completion) one sequence can hold."""

    @abstractmethod
    def load(self) -> None:
        """Load the weights. Blocks; raises BackendError with a readable reason."""

    @abstractmethod
    def unload(self) -> None:
        """Free the weights. Blocks."""

    @abstractmethod
    def render_chat(self, messages: list[dict[str, str]]) -> RenderedPrompt:
        """Apply the model's chat template and tokenize. Raises BackendError."""

    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Tokenize a raw completion prompt (with BOS where the model wants one)."""

    @abstractmethod
    def check_sampling(self, params: SamplingParams) -> None:
        """Raise BackendError when `params` cannot be honoured (say, a bad schema)."""

    @abstractmethod
    def generate(self, tokens: list[int], params: SamplingParams) -> Generator[bytes, None, None]:
        """Yield the bytes of each new token; return at end of generation.

        The caller stops early by closing the generator.
        """
