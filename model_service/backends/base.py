"""The small interface every backend implements.

A backend is driven by the worker's engine thread. `render_chat`, `tokenize` and
`check_sampling` are also called on other threads (the worker runs them off its event
loop, `asyncio.to_thread`), at the same time as the engine: they only read the
vocabulary. Everything else is called from the engine thread alone and may block.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal


class BackendError(Exception):
    """The backend cannot do what was asked (bad file, bad grammar, ...)."""


class PromptTooLong(BackendError):
    """A prompt refused before tokenizing: its text is longer than `n_ctx` tokens could
    be (`context` tokens of at most `longest_token` bytes each)."""

    def __init__(self, size: int, context: int, longest_token: int) -> None:
        super().__init__(
            f"This model's maximum context length is {context} tokens, but the prompt is "
            f"{size} bytes long: more than {context} tokens of this model's vocabulary "
            f"(at most {longest_token} bytes each). Shorten the prompt."
        )


class DecodeFailed(BackendError):
    """One step's decode failed. The sequences in `slots` were in it: their caches are
    back to what they held before the step, and they cannot go on; other slots can."""

    def __init__(self, message: str, slots: list[int]) -> None:
        super().__init__(message)
        self.slots = slots


# How a chat template writes tool calls (model_service/tools.py has both formats).
ToolFormat = Literal["generic", "hermes"]


@dataclass(frozen=True)
class GrammarFrame:
    """A constrained reply that is not bare JSON: each JSON value between `before` and
    `after`, repeated (joined by newlines) when `repeat` (a template's tool-call tags)."""

    before: str
    after: str
    repeat: bool


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8
    top_p: float = 0.95
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # Constrained decoding: a JSON schema, or {} for "any JSON object", maybe framed.
    json_schema: dict[str, Any] | None = None
    json_frame: GrammarFrame | None = None
    # Report each token's log-probability, with this many likeliest alternatives.
    top_logprobs: int | None = None
    # The prompt's last tokens, already part of the constrained reply (a tool call's
    # fixed opening): the grammar starts after them.
    grammar_primed: tuple[int, ...] = ()


@dataclass(frozen=True)
class TokenScore:
    """A sampled token's log-probability and its likeliest alternatives (id, logprob)."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass(frozen=True)
class RenderedPrompt:
    tokens: list[int]
    stop: list[str] = field(default_factory=list)


class Backend(ABC):
    """One model, loaded into this process."""

    # Seconds each step of `load` took, by name (the cold-start breakdown).
    load_phases: Mapping[str, float] = MappingProxyType({})

    @property
    @abstractmethod
    def context_length(self) -> int:
        """How many tokens (prompt plus completion) one sequence can hold."""

    def set_threads(self, threads: int) -> None:  # noqa: B027  (only local compute has threads)
        """Compute with at most `threads` threads (engine thread, between steps)."""

    def warm_up(self) -> None:  # noqa: B027  (optional: most backends have nothing to do)
        """Work the first request would otherwise do (engine thread, before any job)."""

    @abstractmethod
    def load(self) -> None:
        """Load the weights. Blocks; raises BackendError with a readable reason."""

    @abstractmethod
    def unload(self) -> None:
        """Free the weights. Blocks."""

    @property
    def tool_format(self) -> ToolFormat:
        """How the model's chat template writes tool calls: "generic" (it does not; the
        prompt offers tools in the generic format) or "hermes" (see model_service/tools)."""
        return "generic"

    @abstractmethod
    def render_chat(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> RenderedPrompt:
        """Apply the model's chat template (with `tools`, natively) and tokenize.
        Raises BackendError."""

    @abstractmethod
    def tokenize(self, text: str, bos: bool = True) -> list[int]:
        """Tokenize a raw completion prompt (with BOS where the model wants one, unless
        `bos` is False: text that continues a prompt)."""

    @abstractmethod
    def check_sampling(self, params: SamplingParams) -> None:
        """Raise BackendError when `params` cannot be honoured (say, a bad schema)."""

    # --- batched generation: the engine thread drives these, one step at a time ---------

    @property
    @abstractmethod
    def slots(self) -> int:
        """How many sequences can be generated at once."""

    @abstractmethod
    def pick_slot(self, free: list[int], tokens: list[int], beside: int) -> int:
        """Choose one of the `free` slots for a prompt of `tokens` (say, the one caching
        its prefix) that may decode `beside` steps alongside the busy slots."""

    @abstractmethod
    def open_sequence(self, slot: int, tokens: list[int], params: SamplingParams) -> int:
        """Start a sequence for prompt `tokens`; return how many prompt tokens were cached."""

    @abstractmethod
    def step(self, slots: list[int]) -> dict[int, int]:
        """Advance every open sequence in `slots` by one decode; return sampled tokens.

        A slot still reading its prompt may get no token. Raises BackendError.
        """

    def reply_complete(self, slot: int) -> bool:
        """Whether the reply in `slot` is over though no end token was sampled: its
        grammar allows nothing more (decoding the end token would be a wasted step)."""
        return False

    def token_score(self, slot: int) -> TokenScore | None:
        """The last token sampled in `slot`, scored (when its params asked for that)."""
        return None

    @abstractmethod
    def close_sequence(self, slot: int) -> None:
        """End the sequence in `slot` (finished or abandoned)."""

    @abstractmethod
    def is_end(self, token: int) -> bool:
        """Whether `token` ends generation (end of turn or of text)."""

    @abstractmethod
    def token_bytes(self, token: int) -> bytes:
        """The bytes a token stands for (one UTF-8 character may span tokens)."""
