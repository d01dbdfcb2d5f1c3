"""The OpenAI wire protocol: every request and response shape, in one module.

Field names are spelled exactly as OpenAI spells them. Unknown request fields are
tolerated (OpenAI ignores fields it does not know); wrong types and out-of-range values
are refused by validation and reported as OpenAI-style 400 errors by `errors.py`.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError

MAX_STOP_SEQUENCES = 4
MAX_CHOICES = 8  # `n`: parallel sequences of one batch, at most this many
MAX_TOP_LOGPROBS = 20
MAX_MESSAGES = 2048  # as OpenAI: a longer history is refused before it is rendered
# Seeds are 64-bit signed integers, as OpenAI's (the sampler uses their low 32 bits).
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
# Numbers are strict: "10" is not 10 and "yes" is not true (OpenAI refuses both with 400
# invalid_type). A float field still takes an integer (1 is 1.0), as JSON has one number.
StrictFloat = Annotated[float, Field(strict=True)]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# --- requests -------------------------------------------------------------------------


class _Tolerant(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


class TextContentPart(_Tolerant):
    type: Literal["text"]
    text: str


class FunctionCall(_Tolerant):
    name: str = Field(min_length=1)
    arguments: str = "{}"  # JSON text, as OpenAI sends it


class ToolCall(_Tolerant):
    """A call the assistant made, in a request's history or in a reply."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Tolerant):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    # Only an assistant message (one that calls tools) may leave its content out.
    content: str | list[TextContentPart] | None = Field(default=None, validate_default=True)
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant messages
    tool_call_id: str | None = None  # tool messages: which call this answers

    @field_validator("content")
    @classmethod
    def _content_required(
        cls, value: str | list[TextContentPart] | None, info: ValidationInfo
    ) -> str | list[TextContentPart] | None:
        role = info.data.get("role")
        if value is None and role is not None and role != "assistant":
            raise PydanticCustomError(
                "content_required",
                "Invalid value for 'content': a {role} message needs a string or a list of "
                "text parts, got null.",
                {"role": role},
            )
        return value

    def text(self) -> str:
        """The message's content as plain text (text parts joined)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(_Tolerant):
    include_usage: StrictBool = False


class JsonSchemaFormat(_Tolerant):
    name: str = "response"
    description: str | None = None
    # `schema` shadows a BaseModel attribute, hence the alias.
    json_schema: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Tolerant):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class FunctionDefinition(_Tolerant):
    # Anthropic allows 128 characters (Claude Code's MCP tools run long); OpenAI 64.
    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None


class Tool(_Tolerant):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Tolerant):
    name: str


class NamedToolChoice(_Tolerant):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class SamplingFields(_Tolerant):
    """Sampling parameters shared by chat and plain completions."""

    model: str
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: StrictFloat | None = Field(default=None, ge=0.0, le=2.0)
    top_p: StrictFloat | None = Field(default=None, gt=0.0, le=1.0)
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP_SEQUENCES)] | None = None
    seed: StrictInt | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    n: StrictInt = Field(default=1, ge=1, le=MAX_CHOICES)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    presence_penalty: StrictFloat | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: StrictFloat | None = Field(default=None, ge=-2.0, le=2.0)
    user: str | None = None

    def stop_sequences(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        return [s for s in stops if s]


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(default=None, max_length=128)
    tool_choice: ToolChoice | None = None
    # Unset means one call per reply, as llama.cpp's server does: small models asked for
    # a list of calls tend to repeat calls until max_tokens. True allows several.
    parallel_tool_calls: StrictBool | None = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(SamplingFields):
    # One prompt per request: a string, or a list holding exactly one string.
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]
    echo: StrictBool = False
    response_format: ResponseFormat | None = None
    # Legacy completions: the number of most likely tokens to list per position.
    logprobs: StrictInt | None = Field(default=None, ge=0, le=5)

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def token_limit(self) -> int | None:
        # OpenAI's legacy completions default to 16 tokens.
        return self.max_tokens if self.max_tokens is not None else 16


# --- responses ------------------------------------------------------------------------

FinishReason = Literal["stop", "length", "tool_calls"]


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens whose KV cache was reused, not recomputed


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    """One fragment of a streamed call: `id` and name come first, arguments after."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChunkDelta
    finish_reason: FinishReason | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    """The legacy completions shape: parallel lists, one entry per generated token."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: FinishReason | None
    logprobs: CompletionLogprobs | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "model-pool"


class TokenCount(BaseModel):
    object: Literal["token_count"] = "token_count"
    model: str
    prompt_tokens: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# The frame that ends every OpenAI SSE stream.
SSE_DONE = b"data: [DONE]\n\n"


def new_completion_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def unix_now() -> int:
    return int(time.time())
