"""The Anthropic Messages wire protocol: every request, response and stream event shape.

Field names are spelled as Anthropic spells them (the `anthropic` SDK's `*Param` names for
what a client sends). Unknown request fields are tolerated (`cache_control`, `citations`,
`context_management`, ...); wrong types and unknown content block types are refused by
validation, which the routes in `anthropic_api.py` answer as a 400 `invalid_request_error`.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt

# --- requests -------------------------------------------------------------------------------


class _Tolerant(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


class TextBlockParam(_Tolerant):
    type: Literal["text"]
    text: str


class ImageBlockParam(_Tolerant):
    """Accepted by validation so that the route can say clearly it is not supported."""

    type: Literal["image"]
    source: dict[str, Any] = Field(default_factory=dict)


class DocumentBlockParam(_Tolerant):
    """Accepted by validation so that the route can say clearly it is not supported."""

    type: Literal["document"]
    source: dict[str, Any] = Field(default_factory=dict)


class ToolUseBlockParam(_Tolerant):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any] = Field(default_factory=dict)


ToolResultContent = Annotated[
    TextBlockParam | ImageBlockParam | DocumentBlockParam, Field(discriminator="type")
]


class ToolResultBlockParam(_Tolerant):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[ToolResultContent] | None = None
    is_error: bool = False


class ThinkingBlockParam(_Tolerant):
    """A thinking block sent back in the history; the pool's models never produce one."""

    type: Literal["thinking"]
    thinking: str = ""
    signature: str | None = None


class RedactedThinkingBlockParam(_Tolerant):
    type: Literal["redacted_thinking"]
    data: str = ""


ContentBlockParam = Annotated[
    TextBlockParam
    | ImageBlockParam
    | DocumentBlockParam
    | ToolUseBlockParam
    | ToolResultBlockParam
    | ThinkingBlockParam
    | RedactedThinkingBlockParam,
    Field(discriminator="type"),
]


class MessageParam(_Tolerant):
    role: Literal["user", "assistant"]
    content: str | list[ContentBlockParam]


class ToolParam(_Tolerant):
    """A client tool (`type` absent or "custom") or a server tool (`type` such as
    "web_search_20250305"), which the pool cannot run and leaves out."""

    name: str = Field(min_length=1, max_length=128)
    type: str | None = None
    description: str | None = None
    input_schema: dict[str, Any] | None = None

    @property
    def is_client_tool(self) -> bool:
        return self.type in (None, "custom")


class ToolChoiceAuto(_Tolerant):
    type: Literal["auto"]
    disable_parallel_tool_use: bool | None = None


class ToolChoiceAny(_Tolerant):
    type: Literal["any"]
    disable_parallel_tool_use: bool | None = None


class ToolChoiceTool(_Tolerant):
    type: Literal["tool"]
    name: str
    disable_parallel_tool_use: bool | None = None


class ToolChoiceNone(_Tolerant):
    type: Literal["none"]


ToolChoice = Annotated[
    ToolChoiceAuto | ToolChoiceAny | ToolChoiceTool | ToolChoiceNone, Field(discriminator="type")
]


class Metadata(_Tolerant):
    user_id: str | None = None


class _PromptFields(_Tolerant):
    """What /v1/messages and /v1/messages/count_tokens share."""

    model: str = Field(min_length=1)
    messages: list[MessageParam] = Field(min_length=1)
    system: str | list[TextBlockParam] | None = None
    tools: list[ToolParam] | None = None
    tool_choice: ToolChoice | None = None
    # Extended thinking: accepted and ignored (the pool's models do not think aloud).
    thinking: dict[str, Any] | None = None


class MessagesRequest(_PromptFields):
    # Strict: "10" is not 10 and "yes" is not true (Anthropic refuses both).
    max_tokens: StrictInt = Field(ge=1)
    stop_sequences: list[str] | None = None
    stream: StrictBool = False
    temperature: StrictFloat | None = Field(default=None, ge=0.0, le=1.0)
    top_p: StrictFloat | None = Field(default=None, gt=0.0, le=1.0)
    # Accepted and ignored: the workers' OpenAI protocol has no top-k.
    top_k: StrictInt | None = Field(default=None, ge=0)
    metadata: Metadata | None = None


class CountTokensRequest(_PromptFields):
    pass


# --- responses ------------------------------------------------------------------------------

StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]


class TextBlock(BaseModel):
    type: Literal["text"] = "text"
    text: str


class ToolUseBlock(BaseModel):
    type: Literal["tool_use"] = "tool_use"
    id: str
    name: str
    input: dict[str, Any]


ContentBlock = TextBlock | ToolUseBlock


class Usage(BaseModel):
    # Anthropic's input_tokens leaves out the cached part: the prompt is the sum of the three.
    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0


class Message(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[ContentBlock]
    stop_reason: StopReason | None = None
    stop_sequence: str | None = None
    usage: Usage


class CountTokensResponse(BaseModel):
    input_tokens: int


ErrorType = Literal[
    "invalid_request_error",
    "authentication_error",
    "permission_error",
    "not_found_error",
    "request_too_large",
    "rate_limit_error",
    "api_error",
    "timeout_error",
    "overloaded_error",
]


class ErrorDetail(BaseModel):
    type: ErrorType
    message: str


class ErrorResponse(BaseModel):
    type: Literal["error"] = "error"
    error: ErrorDetail


# --- stream events (`event: <type>` and `data: <the event as JSON>`) -------------------------


class MessageStartEvent(BaseModel):
    type: Literal["message_start"] = "message_start"
    message: Message


class PingEvent(BaseModel):
    type: Literal["ping"] = "ping"


class ContentBlockStartEvent(BaseModel):
    type: Literal["content_block_start"] = "content_block_start"
    index: int
    content_block: ContentBlock


class TextDelta(BaseModel):
    type: Literal["text_delta"] = "text_delta"
    text: str


class InputJsonDelta(BaseModel):
    type: Literal["input_json_delta"] = "input_json_delta"
    partial_json: str


class ContentBlockDeltaEvent(BaseModel):
    type: Literal["content_block_delta"] = "content_block_delta"
    index: int
    delta: TextDelta | InputJsonDelta


class ContentBlockStopEvent(BaseModel):
    type: Literal["content_block_stop"] = "content_block_stop"
    index: int


class MessageDelta(BaseModel):
    stop_reason: StopReason | None
    stop_sequence: str | None = None


class MessageDeltaEvent(BaseModel):
    type: Literal["message_delta"] = "message_delta"
    delta: MessageDelta
    usage: Usage  # cumulative, as Anthropic now sends it (input_tokens included)


class MessageStopEvent(BaseModel):
    type: Literal["message_stop"] = "message_stop"


class ErrorEvent(BaseModel):
    type: Literal["error"] = "error"
    error: ErrorDetail


StreamEvent = (
    MessageStartEvent
    | PingEvent
    | ContentBlockStartEvent
    | ContentBlockDeltaEvent
    | ContentBlockStopEvent
    | MessageDeltaEvent
    | MessageStopEvent
    | ErrorEvent
)


def new_message_id() -> str:
    return f"msg_{uuid.uuid4().hex[:24]}"


def new_tool_use_id() -> str:
    return f"toolu_{uuid.uuid4().hex[:24]}"
