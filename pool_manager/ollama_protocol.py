"""The Ollama wire protocol: the request and reply shapes of the `/api/...` routes.

Field names are spelled as Ollama spells them (its `api/types.go`). Unknown request fields
are tolerated, as Ollama's JSON decoding tolerates them (`template`, `context`, options such
as `num_ctx`, ...); wrong types are refused by validation, which `parse_request` turns into
Ollama's error, a 400 `{"error": "message"}` (OllamaError), with the message each field
has always had here. The routes in `ollama_api.py` decide what the pool can serve and
translate to OpenAI; nothing here knows about the pool.
"""

from __future__ import annotations

import json
import math
import re
from typing import Annotated, Any, ClassVar, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationError,
    field_validator,
)


class OllamaError(Exception):
    """An error returned in Ollama's shape: `{"error": message}` with `status`."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


# --- keep_alive --------------------------------------------------------------------------------

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


def keep_alive_seconds(value: Any) -> float | None:
    """`keep_alive` in seconds: a number of seconds or a Go duration ("5m", "1h30m", "-1").

    None when absent. Raises ValueError for anything else.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"invalid keep_alive: {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        try:
            seconds = float(text)  # Ollama reads a bare number as seconds
        except ValueError:
            seconds = _go_duration(text)
    else:
        raise ValueError(f"invalid keep_alive: {value!r}")
    if not math.isfinite(seconds):
        raise ValueError(f"invalid keep_alive: {value!r}")
    return seconds


def _go_duration(text: str) -> float:
    sign = -1.0 if text.startswith("-") else 1.0
    body = text.lstrip("+-")
    if not body:
        raise ValueError(f"invalid keep_alive duration {text!r}")
    if body == "0":
        return 0.0
    position, total = 0, 0.0
    while position < len(body):
        part = _DURATION_PART.match(body, position)
        if part is None:
            raise ValueError(f"invalid keep_alive duration {text!r}")
        total += float(part.group(1)) * _DURATION_UNITS[part.group(2)]
        position = part.end()
    return sign * total


# Seconds after validation; None when the request has none.
KeepAlive = Annotated[float | None, BeforeValidator(keep_alive_seconds)]


# --- requests ----------------------------------------------------------------------------------


class _Tolerant(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


class Options(_Tolerant):
    """The model `options` with an OpenAI counterpart; the others (`num_ctx`, `top_k`,
    ...) are tolerated and have no effect."""

    temperature: StrictFloat | None = None
    top_p: StrictFloat | None = None
    seed: StrictInt | None = Field(default=None, ge=-(2**63), le=2**63 - 1)  # Go's int
    presence_penalty: StrictFloat | None = None
    frequency_penalty: StrictFloat | None = None
    stop: StrictStr | list[StrictStr] | None = None
    # -1: no limit, -2: fill the context; Ollama clients also send it as a float.
    num_predict: StrictInt | StrictFloat | None = None


class ToolCallFunction(_Tolerant):
    name: StrictStr = Field(min_length=1)
    # An object in Ollama; a JSON string as OpenAI-minded clients send it is taken too.
    arguments: dict[str, Any] | StrictStr | None = None


class ToolCall(_Tolerant):
    """A call in an assistant message of the history."""

    function: ToolCallFunction
    id: StrictStr | None = None  # an extension: Ollama's calls have no ids


class Message(_Tolerant):
    role: StrictStr
    content: StrictStr | None = None
    images: list[StrictStr] | None = None  # base64; the route refuses them
    thinking: StrictStr | None = None
    tool_calls: list[ToolCall] | None = None
    # A `tool` message: the function it answers (`name` in older clients), or the id.
    tool_name: StrictStr | None = None
    name: StrictStr | None = None
    tool_call_id: StrictStr | None = None


class ToolFunction(_Tolerant):
    name: StrictStr
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None


class Tool(_Tolerant):
    """Ollama's tools are OpenAI's function tools."""

    type: StrictStr | None = "function"
    function: ToolFunction


class _GenerationRequest(_Tolerant):
    """What /api/chat and /api/generate share."""

    model: StrictStr = Field(min_length=1)
    stream: StrictBool = True
    keep_alive: KeepAlive = None
    options: Options | None = None
    # "json", or a JSON schema the reply must follow.
    format: StrictStr | dict[str, Any] | None = None
    think: StrictBool | StrictStr | None = None  # true/false, or "high", "medium", "low"

    @field_validator("stream", mode="before")
    @classmethod
    def _stream_default(cls, value: Any) -> Any:
        return True if value is None else value  # null means the default, as in Ollama

    @field_validator("format")
    @classmethod
    def _known_format(cls, value: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
        if isinstance(value, str) and value not in ("", "json"):
            raise ValueError(_FORMAT_MESSAGE)
        return value


class ChatRequest(_GenerationRequest):
    """`POST /api/chat`. No messages: load the model (with keep_alive 0: unload it)."""

    messages: list[Message] | None = None
    tools: list[Tool] | None = None
    tool_choice: StrictStr | dict[str, Any] | None = None  # an extension: Ollama has none


class GenerateRequest(_GenerationRequest):
    """`POST /api/generate`. No prompt: load the model (with keep_alive 0: unload it)."""

    prompt: StrictStr | None = None
    system: StrictStr | None = None
    raw: StrictBool | None = None  # no template: the prompt goes to the model as it is
    suffix: StrictStr | None = None
    images: list[StrictStr] | None = None


class EmbedRequest(_Tolerant):
    """`POST /api/embed`. No input ("" or []): load the model."""

    model: StrictStr = Field(min_length=1)
    input: StrictStr | list[StrictStr] | None = None
    truncate: StrictBool | None = None  # None: true, as in Ollama
    dimensions: StrictInt | None = Field(default=None, ge=0)  # 0: the model's own size
    options: Options | None = None
    keep_alive: KeepAlive = None

    @property
    def texts(self) -> list[str]:
        if not self.input:
            return []
        return [self.input] if isinstance(self.input, str) else self.input


class EmbeddingsRequest(_Tolerant):
    """`POST /api/embeddings`, Ollama's older route: one `prompt`."""

    model: StrictStr = Field(min_length=1)
    prompt: StrictStr | None = None
    options: Options | None = None
    keep_alive: KeepAlive = None


class ShowRequest(_Tolerant):
    """`POST /api/show`; older clients send `name`."""

    model: StrictStr | None = None
    name: StrictStr | None = None
    verbose: StrictBool | None = None

    @property
    def model_name(self) -> str | None:
        return self.model or self.name


# --- replies -----------------------------------------------------------------------------------


class OllamaReply(BaseModel):
    """A reply object; `wire()` gives its JSON, `line()` its NDJSON line."""

    # Ollama leaves out empty optional fields of its streamed objects (`omitempty`).
    omit_none: ClassVar[bool] = False

    def wire(self) -> dict[str, Any]:
        """The reply as JSON-ready data."""
        return self.model_dump(mode="json", exclude_none=self.omit_none)

    def line(self) -> bytes:
        """The reply as one NDJSON line."""
        return json.dumps(self.wire()).encode() + b"\n"


class ReplyFunction(BaseModel):
    name: str
    arguments: dict[str, Any]


class ReplyToolCall(OllamaReply):
    function: ReplyFunction


class ReplyMessage(BaseModel):
    role: str = "assistant"
    content: str = ""
    tool_calls: list[ReplyToolCall] | None = None


class _Generated(OllamaReply):
    """The fields of every chat and generate object; the durations on the last only."""

    omit_none: ClassVar[bool] = True

    model: str
    created_at: str
    done: bool = False
    done_reason: str | None = None  # "stop", "length", "load", "unload"
    total_duration: int | None = None  # nanoseconds, as all durations
    load_duration: int | None = None
    prompt_eval_count: int | None = None
    prompt_eval_duration: int | None = None
    eval_count: int | None = None
    eval_duration: int | None = None


class ChatReply(_Generated):
    """One /api/chat object: a streamed piece, or (`done`) the last or only one."""

    message: ReplyMessage = Field(default_factory=ReplyMessage)


class GenerateReply(_Generated):
    """One /api/generate object: a streamed piece, or (`done`) the last or only one."""

    response: str = ""


class ErrorReply(OllamaReply):
    """An error, as a reply or as the last line of a stream."""

    error: str


class EmbedReply(OllamaReply):
    model: str
    embeddings: list[list[float]]
    total_duration: int = 0
    load_duration: int = 0
    prompt_eval_count: int = 0


class EmbeddingsReply(OllamaReply):
    embedding: list[float]


class ModelDetails(BaseModel):
    parent_model: str = ""
    format: str = ""
    family: str = ""
    families: list[str] | None = None
    parameter_size: str = ""
    quantization_level: str = ""


class TagsEntry(BaseModel):
    name: str
    model: str
    modified_at: str
    size: int
    digest: str
    details: ModelDetails


class TagsReply(OllamaReply):
    """`GET /api/tags`: every model the pool knows."""

    models: list[TagsEntry]


class PsEntry(BaseModel):
    name: str
    model: str
    size: int
    digest: str
    details: ModelDetails
    expires_at: str
    size_vram: int
    context_length: int


class PsReply(OllamaReply):
    """`GET /api/ps`: the loaded models."""

    models: list[PsEntry]


class ShowReply(OllamaReply):
    license: str
    modelfile: str
    parameters: str
    template: str
    details: ModelDetails
    model_info: dict[str, Any]
    capabilities: list[str]
    modified_at: str


class VersionReply(OllamaReply):
    version: str


# --- validation errors as Ollama's 400s ----------------------------------------------------------

_FORMAT_MESSAGE = 'invalid format: expected "json" or a JSON schema'
_INPUT_MESSAGE = "invalid input type: a string or a list of strings"
_TOOLS_MESSAGE = "tools must be a list of JSON objects"
_CALL_MESSAGE = "each tool call needs a function"

# The message for a wrong value at a location ("*": any list index); elsewhere pydantic's.
_MESSAGES: dict[tuple[str, ...], str] = {
    ("model",): "model is required",
    ("name",): "model is required",
    ("stream",): "stream must be true or false",
    ("options",): "options must be a JSON object",
    ("options", "num_predict"): "options.num_predict must be an integer",
    ("format",): _FORMAT_MESSAGE,
    ("messages",): "messages must be a list",
    ("messages", "*"): "each message must be a JSON object",
    ("messages", "*", "role"): "each message needs a role",
    ("messages", "*", "content"): "message content must be a string",
    ("messages", "*", "tool_calls"): "tool_calls must be a list",
    ("messages", "*", "tool_calls", "*"): _CALL_MESSAGE,
    ("messages", "*", "tool_calls", "*", "function"): _CALL_MESSAGE,
    ("messages", "*", "tool_calls", "*", "function", "name"): (
        "each tool call needs a function name"
    ),
    ("tools",): _TOOLS_MESSAGE,
    ("tools", "*"): _TOOLS_MESSAGE,
    ("prompt",): "prompt must be a string",
    ("input",): _INPUT_MESSAGE,
    ("input", "*"): _INPUT_MESSAGE,
    ("truncate",): "truncate must be true or false",
    ("dimensions",): "dimensions must be a positive integer",
}

# Union members show up in pydantic's error locations as type tags ("str", "list[str]",
# "function-after[...]"); a field name never looks like one.
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "dict", "list", "none"})

_Request = TypeVar("_Request", bound=BaseModel)
_MESSAGE_LIST = TypeAdapter(list[Message])


def _location(loc: tuple[Any, ...]) -> list[str | int]:
    return [
        piece
        for piece in loc
        if isinstance(piece, int)
        or not (piece.lower() in _TYPE_TAGS or "[" in piece or "-" in piece)
    ]


def _refusal(exc: ValidationError, prefix: tuple[str, ...] = ()) -> OllamaError:
    """The first of pydantic's errors as Ollama's 400, in the words this API has always used."""
    first = exc.errors()[0]
    where = [*prefix, *_location(tuple(first.get("loc", ())))]
    if first.get("type") == "value_error":  # our validators' own words
        return OllamaError(400, str(first.get("ctx", {}).get("error", first["msg"])))
    key = tuple("*" if isinstance(piece, int) else piece for piece in where)
    if key in _MESSAGES:
        return OllamaError(400, _MESSAGES[key])
    dotted = ".".join(str(piece) for piece in where)
    message = "a value is required" if first.get("type") == "missing" else first["msg"]
    return OllamaError(400, f"{dotted}: {message}" if dotted else message)


def parse_request(model: type[_Request], raw: bytes) -> _Request:
    """A request body (JSON bytes; empty means `{}`) as `model`.

    Raises OllamaError 400 when it is not JSON, not an object, or not the model's shape.
    """
    try:
        body = json.loads(raw) if raw.strip() else {}
    except ValueError as exc:
        raise OllamaError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise OllamaError(400, "request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise _refusal(exc) from None


def parse_messages(raw: Any) -> list[Message]:
    """Chat messages (parsed ones pass as they are). Raises OllamaError 400."""
    try:
        return _MESSAGE_LIST.validate_python(raw)
    except ValidationError as exc:
        raise _refusal(exc, ("messages",)) from None
