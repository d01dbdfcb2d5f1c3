"""The OpenAI Responses API's wire shapes (`/v1/responses`), in one module.

Field names are spelled as OpenAI spells them. Requests tolerate unknown fields (clients
such as Codex CLI send fields this server has no use for). The request's `input`, `tools`
and `text.format` are kept as raw JSON in `ResponsesRequest` and parsed item by item with
`parse_input_item`, `parse_tool` and `parse_text_format`, so that a validation error can
name the exact field (`input.2.call_id`) instead of a union's type tags.

Responses leave as the models below; what `openai`'s `Response` model requires is always
present. Stream events are `StreamEvent` subclasses, each with its `type` and a
`sequence_number` the emitter fills in.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    ValidationError,
    field_validator,
)

from model_service.errors import ApiError

MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512


def new_id(prefix: str) -> str:
    """An id like OpenAI's: `resp_…`, `msg_…`, `fc_…`, `call_…`."""
    return f"{prefix}_{uuid.uuid4().hex}"


class _Tolerant(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False, populate_by_name=True)


# --- request: input items --------------------------------------------------------------------

# Content parts that carry text. `text` appears in some clients' history; `refusal` is an
# assistant part whose words are in `refusal`.
TEXT_PART_TYPES = frozenset({"input_text", "output_text", "text"})
# Parts a text-only local model cannot take: refused with a 400 naming the part.
UNSUPPORTED_PART_TYPES = frozenset({"input_image", "input_file", "input_audio"})


class ContentPart(_Tolerant):
    type: str
    text: str | None = None
    refusal: str | None = None


class MessageItem(_Tolerant):
    """A message: from the user, the system or developer, or an earlier assistant turn."""

    type: Literal["message"] = "message"
    id: str | None = None
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[ContentPart]
    status: str | None = None


class FunctionCallItem(_Tolerant):
    """A call the model made to one of the client's function tools (history)."""

    type: Literal["function_call"]
    id: str | None = None
    call_id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    arguments: str
    status: str | None = None


class FunctionCallOutputItem(_Tolerant):
    """The client's result for a function call."""

    type: Literal["function_call_output"]
    id: str | None = None
    call_id: str = Field(min_length=1)
    output: str | list[ContentPart]
    status: str | None = None


class CustomToolCallItem(_Tolerant):
    """A call the model made to a custom (freeform) tool (history)."""

    type: Literal["custom_tool_call"]
    id: str | None = None
    call_id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    input: str


class CustomToolCallOutputItem(_Tolerant):
    """The client's result for a custom tool call."""

    type: Literal["custom_tool_call_output"]
    id: str | None = None
    call_id: str = Field(min_length=1)
    output: str | list[ContentPart]


InputItem = (
    MessageItem
    | FunctionCallItem
    | FunctionCallOutputItem
    | CustomToolCallItem
    | CustomToolCallOutputItem
)

_ITEM_MODELS: dict[str, type[BaseModel]] = {
    "message": MessageItem,
    "function_call": FunctionCallItem,
    "function_call_output": FunctionCallOutputItem,
    "custom_tool_call": CustomToolCallItem,
    "custom_tool_call_output": CustomToolCallOutputItem,
}

# Items that only matter to OpenAI's own servers or to tools that cannot run here; they are
# dropped from the conversation the model sees: reasoning (no reasoning tokens here,
# encrypted content cannot be read) and the calls and results of hosted tools.
IGNORED_ITEM_TYPES = frozenset(
    {
        "reasoning",
        "compaction",
        "web_search_call",
        "file_search_call",
        "computer_call",
        "computer_call_output",
        "code_interpreter_call",
        "image_generation_call",
        "local_shell_call",
        "local_shell_call_output",
        "shell_call",
        "shell_call_output",
        "apply_patch_call",
        "apply_patch_call_output",
        "mcp_list_tools",
        "mcp_approval_request",
        "mcp_approval_response",
        "mcp_call",
        "tool_search_call",
        "tool_search_output",
    }
)


def parse_input_item(raw: Any, param: str) -> InputItem | None:
    """One `input` item as its model; None for an ignored type. Raises ApiError (400)."""
    if not isinstance(raw, dict):
        raise ApiError(400, f"{param}: each input item must be a JSON object", param=param)
    kind = raw.get("type", "message")  # a bare {"role", "content"} is a message
    if not isinstance(kind, str):
        raise _invalid(f"{param}.type", "the item type must be a string")
    if kind in IGNORED_ITEM_TYPES:
        return None
    model = _ITEM_MODELS.get(kind)
    if model is None:
        if kind == "item_reference":
            raise _invalid(
                f"{param}.type",
                "item_reference is not supported by this server: send the item itself, "
                "or use previous_response_id",
            )
        raise _invalid(f"{param}.type", f"unsupported input item type {kind!r}")
    item = _validate(model, raw, param)
    parts = getattr(item, "content", None) or getattr(item, "output", None)
    if isinstance(parts, list):
        field = "content" if isinstance(item, MessageItem) else "output"
        for index, part in enumerate(parts):
            _check_part(part, f"{param}.{field}.{index}")
    return item


def _check_part(part: ContentPart, param: str) -> None:
    if part.type in UNSUPPORTED_PART_TYPES:
        raise _invalid(
            f"{param}.type", f"{part.type} is not supported: the models here read text only"
        )
    if part.type in TEXT_PART_TYPES:
        if part.text is None:
            raise _invalid(f"{param}.text", "a text part needs `text`")
    elif part.type == "refusal":
        if part.refusal is None:
            raise _invalid(f"{param}.refusal", "a refusal part needs `refusal`")
    else:
        raise _invalid(f"{param}.type", f"unsupported content part type {part.type!r}")


def part_text(part: ContentPart) -> str:
    if part.type == "refusal":
        return part.refusal or ""
    return part.text or ""


def content_text(content: str | list[ContentPart]) -> str:
    """A message's (or a tool result's) content as plain text: text parts joined."""
    if isinstance(content, str):
        return content
    return "".join(part_text(part) for part in content)


# --- request: tools, tool_choice, text.format ---------------------------------------------------


class FunctionTool(_Tolerant):
    type: Literal["function"]
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class CustomTool(_Tolerant):
    """A freeform tool (Codex's `apply_patch`): its input is one string, not JSON."""

    type: Literal["custom"]
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = None
    format: dict[str, Any] | None = None


ClientTool = FunctionTool | CustomTool

# Tools OpenAI runs on its side (or a client runs through typed items that only OpenAI's
# models are trained to produce). No model here can use them, so they are left out of the
# request and named in the `x-pool-ignored-tools` reply header; a request may still force
# one with `tool_choice`, which is refused.
IGNORED_TOOL_TYPES = frozenset(
    {
        "web_search",
        "web_search_2025_08_26",
        "web_search_preview",
        "web_search_preview_2025_03_11",
        "file_search",
        "computer",
        "computer_use_preview",
        "code_interpreter",
        "image_generation",
        "mcp",
        "local_shell",
        "shell",
        "apply_patch",
        "tool_search",
        "namespace",
        "programmatic_tool_calling",
    }
)


def parse_tool(raw: Any, param: str) -> ClientTool | str:
    """A function or custom tool as its model, or the type name of an ignored tool.

    Raises ApiError (400) for a malformed tool or an unknown tool type.
    """
    if not isinstance(raw, dict):
        raise ApiError(400, f"{param}: each tool must be a JSON object", param=param)
    kind = raw.get("type")
    if kind == "function":
        return _validate(FunctionTool, raw, param)
    if kind == "custom":
        return _validate(CustomTool, raw, param)
    if isinstance(kind, str) and kind in IGNORED_TOOL_TYPES:
        return kind
    raise _invalid(f"{param}.type", f"unsupported tool type {kind!r}")


class NamedToolChoice(_Tolerant):
    type: Literal["function", "custom"]
    name: str = Field(min_length=1)


class AllowedToolsChoice(_Tolerant):
    type: Literal["allowed_tools"]
    mode: Literal["auto", "required"]
    tools: list[dict[str, Any]]


ToolChoice = Literal["auto", "none", "required"] | NamedToolChoice | AllowedToolsChoice


def parse_tool_choice(raw: Any) -> ToolChoice:
    """`tool_choice` as its model. Raises ApiError (400); forcing a hosted tool is refused."""
    if raw is None:
        return "auto"
    if isinstance(raw, str):
        if raw in ("auto", "none", "required"):
            return raw  # type: ignore[return-value]
        raise _invalid("tool_choice", "expected 'auto', 'none', 'required' or an object")
    if not isinstance(raw, dict):
        raise _invalid("tool_choice", "expected 'auto', 'none', 'required' or an object")
    kind = raw.get("type")
    if kind in ("function", "custom"):
        return _validate(NamedToolChoice, raw, "tool_choice")
    if kind == "allowed_tools":
        return _validate(AllowedToolsChoice, raw, "tool_choice")
    raise _invalid(
        "tool_choice",
        f"{kind!r} is a tool this server cannot run; only function and custom tools "
        "can be called here",
    )


class JsonSchemaTextFormat(_Tolerant):
    type: Literal["json_schema"]
    name: str = "response"
    description: str | None = None
    # `schema` shadows a BaseModel attribute, hence the alias.
    json_schema: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class JsonObjectTextFormat(_Tolerant):
    type: Literal["json_object"]


class PlainTextFormat(_Tolerant):
    type: Literal["text"]


TextFormat = PlainTextFormat | JsonObjectTextFormat | JsonSchemaTextFormat

_FORMAT_MODELS: dict[str, type[BaseModel]] = {
    "text": PlainTextFormat,
    "json_object": JsonObjectTextFormat,
    "json_schema": JsonSchemaTextFormat,
}


def parse_text_format(raw: Any) -> TextFormat:
    """`text.format` as its model (absent: plain text). Raises ApiError (400)."""
    if raw is None:
        return PlainTextFormat(type="text")
    kind = raw.get("type") if isinstance(raw, dict) else None
    model = _FORMAT_MODELS.get(kind) if isinstance(kind, str) else None
    if model is None:
        raise _invalid("text.format.type", "expected 'text', 'json_object' or 'json_schema'")
    return _validate(model, raw, "text.format")


class TextConfig(_Tolerant):
    format: dict[str, Any] | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ResponsesRequest(_Tolerant):
    """`POST /v1/responses`. Fields with no effect here are accepted (docs/API.md)."""

    model: str = Field(min_length=1)
    input: str | list[Any] = Field(default_factory=list)
    instructions: str | None = None
    tools: list[Any] = Field(default_factory=list)
    tool_choice: str | dict[str, Any] | None = None
    # Strict, as OpenAI: "10" is not 10 and "yes" is not true (400 invalid_type).
    parallel_tool_calls: StrictBool | None = None
    max_output_tokens: StrictInt | None = Field(default=None, ge=1)
    max_tool_calls: StrictInt | None = Field(default=None, ge=1)
    temperature: StrictFloat | None = Field(default=None, ge=0.0, le=2.0)
    top_p: StrictFloat | None = Field(default=None, gt=0.0, le=1.0)
    top_logprobs: StrictInt | None = Field(default=None, ge=0, le=20)
    text: TextConfig | None = None
    store: StrictBool | None = None
    previous_response_id: str | None = None
    stream: StrictBool | None = None
    stream_options: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    reasoning: dict[str, Any] | None = None
    include: list[str] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    prompt_cache_key: str | None = None
    service_tier: str | None = None
    background: StrictBool | None = None
    # Server-side conversations and stored prompt templates live on OpenAI's side only.
    conversation: Any = None
    prompt: Any = None

    @field_validator("metadata")
    @classmethod
    def _metadata_limits(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is None:
            return None
        if len(value) > MAX_METADATA_PAIRS:
            raise ValueError(f"at most {MAX_METADATA_PAIRS} key-value pairs")
        for key, text in value.items():
            if len(key) > MAX_METADATA_KEY:
                raise ValueError(f"keys are at most {MAX_METADATA_KEY} characters")
            if len(text) > MAX_METADATA_VALUE:
                raise ValueError(f"values are at most {MAX_METADATA_VALUE} characters")
        return value


def parse_request(raw: Any) -> ResponsesRequest:
    """The request body as a `ResponsesRequest`. Raises ApiError (400) naming the field."""
    if not isinstance(raw, dict):
        raise ApiError(400, "request body must be a JSON object", code="invalid_json")
    return _validate(ResponsesRequest, raw, "")


# --- responses --------------------------------------------------------------------------------


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)


ItemStatus = Literal["in_progress", "completed", "incomplete"]


class OutputMessage(BaseModel):
    type: Literal["message"] = "message"
    id: str
    status: ItemStatus
    role: Literal["assistant"] = "assistant"
    content: list[OutputText]


class OutputFunctionCall(BaseModel):
    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str
    status: ItemStatus


class OutputCustomToolCall(BaseModel):
    type: Literal["custom_tool_call"] = "custom_tool_call"
    id: str
    call_id: str
    name: str
    input: str
    status: ItemStatus


OutputItem = Annotated[
    OutputMessage | OutputFunctionCall | OutputCustomToolCall, Field(discriminator="type")
]


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0
    cache_write_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class ResponseErrorInfo(BaseModel):
    code: str
    message: str


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens", "content_filter"]


ResponseStatus = Literal["in_progress", "completed", "incomplete", "failed"]


class ResponseObject(BaseModel):
    """The response object: returned, streamed in lifecycle events, stored, fetched."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    completed_at: int | None = None
    status: ResponseStatus
    background: bool = False
    error: ResponseErrorInfo | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    max_tool_calls: int | None = None
    model: str
    output: list[OutputItem] = Field(default_factory=list)
    parallel_tool_calls: bool = True
    previous_response_id: str | None = None
    prompt_cache_key: str | None = None
    reasoning: dict[str, Any] = Field(default_factory=lambda: {"effort": None, "summary": None})
    safety_identifier: str | None = None
    service_tier: str = "default"
    store: bool = True
    temperature: float | None = None
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    tool_choice: str | dict[str, Any] = "auto"
    tools: list[dict[str, Any]] = Field(default_factory=list)
    top_logprobs: int | None = None
    top_p: float | None = None
    truncation: Literal["auto", "disabled"] = "disabled"
    usage: ResponseUsage | None = None
    user: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)


class DeletedResponse(BaseModel):
    id: str
    object: Literal["response"] = "response"
    deleted: Literal[True] = True


class InputItemList(BaseModel):
    object: Literal["list"] = "list"
    data: list[dict[str, Any]]
    first_id: str | None
    last_id: str | None
    has_more: bool


# --- stream events ------------------------------------------------------------------------------


class StreamEvent(BaseModel):
    """One SSE event; the emitter sets `sequence_number` (0, 1, 2, ... per stream)."""

    type: str
    sequence_number: int = 0


class ResponseLifecycleEvent(StreamEvent):
    """response.created / in_progress / completed / incomplete / failed."""

    type: Literal[
        "response.created",
        "response.in_progress",
        "response.completed",
        "response.incomplete",
        "response.failed",
    ]
    response: ResponseObject


class OutputItemEvent(StreamEvent):
    type: Literal["response.output_item.added", "response.output_item.done"]
    output_index: int
    item: OutputItem


class ContentPartEvent(StreamEvent):
    type: Literal["response.content_part.added", "response.content_part.done"]
    item_id: str
    output_index: int
    content_index: int
    part: OutputText


class OutputTextDeltaEvent(StreamEvent):
    type: Literal["response.output_text.delta"] = "response.output_text.delta"
    item_id: str
    output_index: int
    content_index: int
    delta: str
    logprobs: list[Any] = Field(default_factory=list)


class OutputTextDoneEvent(StreamEvent):
    type: Literal["response.output_text.done"] = "response.output_text.done"
    item_id: str
    output_index: int
    content_index: int
    text: str
    logprobs: list[Any] = Field(default_factory=list)


class FunctionCallArgumentsDeltaEvent(StreamEvent):
    type: Literal["response.function_call_arguments.delta"] = (
        "response.function_call_arguments.delta"
    )
    item_id: str
    output_index: int
    delta: str


class FunctionCallArgumentsDoneEvent(StreamEvent):
    type: Literal["response.function_call_arguments.done"] = "response.function_call_arguments.done"
    item_id: str
    output_index: int
    name: str
    arguments: str


class CustomToolCallInputDeltaEvent(StreamEvent):
    type: Literal["response.custom_tool_call_input.delta"] = "response.custom_tool_call_input.delta"
    item_id: str
    output_index: int
    delta: str


class CustomToolCallInputDoneEvent(StreamEvent):
    type: Literal["response.custom_tool_call_input.done"] = "response.custom_tool_call_input.done"
    item_id: str
    output_index: int
    input: str


# --- validation errors as OpenAI 400s -------------------------------------------------------------


def _invalid(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param, code="invalid_value")


# Union members and validators show up in pydantic's error locations as type tags
# ("str", "list[any]", "function-after[...]"); a field name never looks like one.
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "dict", "list", "none"})


def _param(prefix: str, loc: tuple[Any, ...]) -> str:
    parts = [prefix] if prefix else []
    for piece in loc:
        if isinstance(piece, int):
            parts.append(str(piece))
        elif isinstance(piece, str) and not (
            piece.lower() in _TYPE_TAGS or "[" in piece or "-" in piece
        ):
            parts.append(piece)
    return ".".join(parts)


def _validate(model: type[BaseModel], raw: Any, param: str) -> Any:
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = _param(param, tuple(first.get("loc", ())))
        if first.get("type") == "missing":
            message = "a value is required"
        else:
            message = str(first.get("msg", "invalid value"))
        raise _invalid(where or param or "body", message) from None
