"""OpenAI's `POST /v1/embeddings`: its wire shapes, and the service a worker answers it with.

Shapes follow OpenAI's spelling: `input` is a string, a list of strings, a list of token
ids or a list of token-id lists (at most 2048 inputs, none empty); `encoding_format` is
`float` or `base64` (little-endian float32 bytes, what the `openai` client asks for by
default); `dimensions` must be the model's own size, since these vectors cannot be
shortened. One extension: `truncate` (Ollama's), which cuts an input longer than the
context instead of refusing it.

`EmbeddingService` checks a request, waits for the model's admission queue like any
inference request, and has an `Embedder` compute the vectors off the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator

from model_service.activity import count_usage
from model_service.backends.base import BackendError
from model_service.errors import ApiError
from model_service.limits import Admission

if TYPE_CHECKING:  # the manager imports the shapes; it has no use for numpy
    import numpy as np

log = logging.getLogger(__name__)

MAX_INPUTS = 2048  # OpenAI's limit on inputs per request

TokenIds = list[StrictInt]
Input = str | list[int]  # a text, or its token ids


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    model: str
    input: StrictStr | list[StrictStr] | list[StrictInt] | list[TokenIds]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None
    # Extension (Ollama's `truncate`): cut inputs longer than the context to fit.
    truncate: bool = False

    @field_validator("input", mode="before")
    @classmethod
    def _one_of_the_four_shapes(cls, value: Any) -> Any:
        def token_ids(item: Any) -> bool:
            return isinstance(item, list) and all(
                isinstance(t, int) and not isinstance(t, bool) for t in item
            )

        if isinstance(value, str) or (
            isinstance(value, list)
            and (
                all(isinstance(v, str) for v in value)
                or token_ids(value)
                or all(token_ids(v) for v in value)
            )
        ):
            return value
        raise ValueError(
            "input must be a string, a list of strings, a list of token ids (integers) "
            "or a list of token-id lists"
        )

    def inputs(self) -> list[Input]:
        """The inputs as a list: texts, or token-id lists."""
        value = self.input
        if isinstance(value, str):
            return [value]
        if value and all(isinstance(v, int) for v in value):
            return [[v for v in value if isinstance(v, int)]]  # one input, as token ids
        return [v for v in value if not isinstance(v, int)]


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # a base64 string with encoding_format "base64"


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class CreateEmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class EmbedInputError(Exception):
    """One input cannot be embedded (too long, a token id out of range): the client's fault."""

    def __init__(self, index: int, message: str, code: str) -> None:
        super().__init__(message)
        self.index = index
        self.code = code


@dataclass(frozen=True)
class Embedded:
    vectors: np.ndarray  # (inputs, dimensions) float32, each row of length 1
    token_counts: list[int]  # per input, as embedded (after truncation)


class Embedder(Protocol):
    """What computes embeddings: `model_service.backends.llama_embed.LlamaEmbedder`."""

    dimensions: int

    @property
    def context_length(self) -> int: ...

    async def embed(self, inputs: Sequence[Input], truncate: bool = False) -> Embedded:
        """Raises EmbedInputError (the client's fault) or BackendError."""
        ...

    def describe(self) -> dict[str, Any]:
        """What the worker's /health says about its embeddings."""
        ...


def check_inputs(request: EmbeddingRequest) -> list[Input]:
    """The request's inputs, refused (ApiError 400) when empty or too many."""
    inputs = request.inputs()
    if not inputs:
        raise ApiError(400, "input must not be empty", param="input", code="invalid_value")
    if len(inputs) > MAX_INPUTS:
        raise ApiError(
            400,
            f"input has {len(inputs)} items; at most {MAX_INPUTS} are allowed per request",
            param="input",
            code="invalid_value",
        )
    for index, item in enumerate(inputs):
        if not item:
            raise ApiError(
                400,
                f"input[{index}] is empty; every input needs at least one character or token",
                param=f"input.{index}" if not isinstance(request.input, str) else "input",
                code="invalid_value",
            )
    return inputs


def encode(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    """One vector as OpenAI sends it: floats, or base64 of little-endian float32."""
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode()
    return vector.astype("<f4").tolist()


class EmbeddingService:
    """The worker's embeddings logic. `create` raises ApiError for anything refused."""

    def __init__(
        self,
        model_id: str,
        embedder: Embedder,
        admission: Admission,
        timeout_seconds: float,
        aliases: frozenset[str] = frozenset(),
    ) -> None:
        self.model_id = model_id
        self.embedder = embedder
        self._admission = admission
        self._timeout = timeout_seconds
        self._names = frozenset({model_id, *aliases})

    async def create(self, request: EmbeddingRequest) -> CreateEmbeddingResponse:
        """Embed the request's inputs. Waits for a slot and for the embeddings thread."""
        if request.model not in self._names:
            raise ApiError(
                404,
                f"The model '{request.model}' is not served here; this worker serves "
                f"'{self.model_id}'",
                param="model",
                code="model_not_found",
            )
        inputs = check_inputs(request)
        size = self.embedder.dimensions
        if request.dimensions is not None and request.dimensions != size:
            raise ApiError(
                400,
                f"This model's embeddings have {size} dimensions and cannot be shortened: "
                f"leave dimensions out or set it to {size}.",
                param="dimensions",
                code="invalid_value",
            )
        try:
            async with asyncio.timeout(self._timeout), self._admission.slot():
                embedded = await self.embedder.embed(inputs, truncate=request.truncate)
        except TimeoutError:
            raise ApiError(
                504,
                f"The embeddings did not finish within {self._timeout:g} seconds "
                "(the model's timeout_seconds).",
                type="timeout_error",
                code="timeout",
            ) from None
        except EmbedInputError as exc:
            param = "input" if isinstance(request.input, str) else f"input.{exc.index}"
            raise ApiError(400, str(exc), param=param, code=exc.code) from exc
        except BackendError as exc:
            raise ApiError(
                500, f"embedding failed: {exc}", type="server_error", code="embedding_failed"
            ) from exc
        tokens = sum(embedded.token_counts)
        count_usage(tokens)
        return CreateEmbeddingResponse(
            data=[
                Embedding(index=i, embedding=encode(vector, request.encoding_format))
                for i, vector in enumerate(embedded.vectors)
            ],
            model=self.model_id,
            usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens),
        )
