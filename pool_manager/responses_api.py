"""The OpenAI Responses API on the manager's port: `/v1/responses`, as Codex CLI and the
OpenAI Agents SDK use it.

A request is translated to an OpenAI chat-completions request and sent through the
gateway, so a COLD model loads on demand and a model's fallback chain applies; the reply
is translated back into a response object, or a stream of typed Responses events.

- `instructions` becomes the first system message (and is not carried over by
  `previous_response_id`, as at OpenAI); `developer` messages become system messages.
- `function_call` items become an assistant message's `tool_calls` (consecutive calls
  merged into one message), `function_call_output` items become `tool` messages.
- Function tools pass through. Custom (freeform) tools become function tools with one
  string parameter, `input`, and their calls come back as `custom_tool_call` items.
  Hosted tools (web search, file search, computer use, code interpreter, image
  generation, MCP, local shell, ...) cannot run here: they are left out and named in the
  `x-pool-ignored-tools` reply header; forcing one with `tool_choice` is a 400.
- `reasoning` items in the input are dropped; no reasoning items are produced.

Stored responses (`store`, default true) live in memory in `ResponseStore`, an LRU bounded
by count and size (the config's `responses_max_stored`, default 1000, and
`responses_max_stored_mb`, default 256); they do not survive a manager restart.
Errors use OpenAI's shape; a failure in the middle of a stream ends it with
`response.failed`. A client that goes away closes the relayed stream, which stops the
generation.
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from model_service.errors import ApiError, not_found
from pool_manager.config import PoolConfig
from pool_manager.gateway import JSON_REQUEST, Gateway
from pool_manager.pool import ModelPool
from pool_manager.responses_protocol import (
    AllowedToolsChoice,
    ClientTool,
    ContentPartEvent,
    CustomTool,
    CustomToolCallInputDeltaEvent,
    CustomToolCallInputDoneEvent,
    CustomToolCallItem,
    CustomToolCallOutputItem,
    DeletedResponse,
    FunctionCallArgumentsDeltaEvent,
    FunctionCallArgumentsDoneEvent,
    FunctionCallItem,
    FunctionCallOutputItem,
    IncompleteDetails,
    InputItem,
    InputItemList,
    InputTokensDetails,
    ItemStatus,
    JsonObjectTextFormat,
    JsonSchemaTextFormat,
    MessageItem,
    NamedToolChoice,
    OutputCustomToolCall,
    OutputFunctionCall,
    OutputItemEvent,
    OutputMessage,
    OutputText,
    OutputTextDeltaEvent,
    OutputTextDoneEvent,
    ResponseErrorInfo,
    ResponseLifecycleEvent,
    ResponseObject,
    ResponsesRequest,
    ResponseUsage,
    StreamEvent,
    TextFormat,
    content_text,
    new_id,
    parse_input_item,
    parse_request,
    parse_text_format,
    parse_tool,
    parse_tool_choice,
)
from pool_manager.sse import close_stream, sse_payloads

log = logging.getLogger(__name__)

DEFAULT_MAX_STORED = 1000
DEFAULT_MAX_STORED_BYTES = 256 * 2**20
# Chat-completions fields a worker may name in an error, as the Responses field they came from.
_CHAT_TO_RESPONSES_PARAM = {
    "messages": "input",
    "max_tokens": "max_output_tokens",
    "max_completion_tokens": "max_output_tokens",
    "response_format": "text.format",
}
_ID_PREFIXES = {
    "message": "msg",
    "function_call": "fc",
    "function_call_output": "fco",
    "custom_tool_call": "ctc",
    "custom_tool_call_output": "ctco",
}
OutputItemModel = OutputMessage | OutputFunctionCall | OutputCustomToolCall


# --- the store ----------------------------------------------------------------------------------


@dataclass
class StoredResponse:
    """A response as GET returns it, and the conversation it answered (its input items,
    earlier turns' included, instructions excluded) for `previous_response_id`."""

    response: ResponseObject
    context: list[dict[str, Any]]
    # What it holds in JSON bytes, conversation included: earlier turns' items are shared
    # with the responses before it, so this over-counts a chain, never under-counts it.
    size: int = field(init=False)

    def __post_init__(self) -> None:
        self.size = len(json.dumps(self.context)) + len(self.response.model_dump_json())

    def conversation(self) -> list[dict[str, Any]]:
        """The items a follow-up request continues: the context, then this output."""
        return [*self.context, *(item_dict(o) for o in self.response.output)]


class ResponseStore:
    """The stored responses, in memory: the only owner of them.

    Bounded by count and by size: beyond `max_items` responses or `max_bytes` of JSON,
    the least recently used (stored or read) go. Nothing blocks; nothing is written to
    disk, so a manager restart forgets them all.
    """

    def __init__(
        self, max_items: int = DEFAULT_MAX_STORED, max_bytes: int = DEFAULT_MAX_STORED_BYTES
    ) -> None:
        if max_items < 0 or max_bytes < 0:
            raise ValueError("max_items and max_bytes must not be negative")
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def bytes(self) -> int:
        return self._bytes

    def put(self, stored: StoredResponse) -> None:
        """Keep `stored` (one larger than `max_bytes` is not kept); evict the LRU beyond."""
        self.delete(stored.response.id)
        if stored.size > self.max_bytes:
            return
        self._items[stored.response.id] = stored
        self._bytes += stored.size
        while len(self._items) > self.max_items or self._bytes > self.max_bytes:
            _, evicted = self._items.popitem(last=False)
            self._bytes -= evicted.size

    def get(self, response_id: str) -> StoredResponse | None:
        stored = self._items.get(response_id)
        if stored is not None:
            self._items.move_to_end(response_id)
        return stored

    def delete(self, response_id: str) -> bool:
        stored = self._items.pop(response_id, None)
        if stored is None:
            return False
        self._bytes -= stored.size
        return True


def store_for(config: PoolConfig) -> ResponseStore:
    """A store bounded as the config says (`responses_max_stored`, `..._mb`)."""
    return ResponseStore(config.responses_max_stored, config.responses_max_stored_mb * 2**20)


# --- translation: request -----------------------------------------------------------------------


@dataclass
class ToolPlan:
    """The request's tools as the chat request carries them, and what the reply echoes."""

    chat_tools: list[dict[str, Any]] = field(default_factory=list)
    chat_tool_choice: str | dict[str, Any] | None = None
    custom_names: frozenset[str] = frozenset()
    ignored: list[str] = field(default_factory=list)
    echo_tools: list[dict[str, Any]] = field(default_factory=list)
    echo_choice: str | dict[str, Any] = "auto"


def plan_tools(raw_tools: Sequence[Any], raw_choice: Any) -> ToolPlan:
    """Function and custom tools as chat tools; hosted tools set aside. Raises ApiError."""
    plan = ToolPlan()
    tools: list[ClientTool] = []
    for index, raw in enumerate(raw_tools):
        tool = parse_tool(raw, f"tools.{index}")
        if isinstance(tool, str):
            plan.ignored.append(tool)
            continue
        if any(t.name == tool.name for t in tools):
            raise ApiError(
                400,
                f"tools.{index}.name: a tool named {tool.name!r} is already listed",
                param=f"tools.{index}.name",
                code="invalid_value",
            )
        tools.append(tool)
    choice = parse_tool_choice(raw_choice)
    plan.echo_choice = choice if isinstance(choice, str) else choice.model_dump(exclude_none=True)
    mode: str | dict[str, Any]
    if isinstance(choice, AllowedToolsChoice):
        allowed = {t.get("name") for t in choice.tools if t.get("type") in ("function", "custom")}
        tools = [t for t in tools if t.name in allowed]
        mode = choice.mode
    elif isinstance(choice, NamedToolChoice):
        if not any(t.name == choice.name and t.type == choice.type for t in tools):
            raise ApiError(
                400,
                f"tool_choice: no {choice.type} tool named {choice.name!r} in tools",
                param="tool_choice",
                code="invalid_value",
            )
        mode = {"type": "function", "function": {"name": choice.name}}
    else:
        mode = choice
    if not tools:
        if mode != "auto" and mode != "none":
            raise ApiError(
                400,
                "tool_choice: a tool call was required, but there is no function or custom "
                "tool this server can offer the model",
                param="tool_choice",
                code="invalid_value",
            )
        return plan
    plan.chat_tools = [_chat_tool(t) for t in tools]
    plan.chat_tool_choice = mode
    plan.custom_names = frozenset(t.name for t in tools if isinstance(t, CustomTool))
    plan.echo_tools = [t.model_dump(by_alias=True, exclude_none=True) for t in tools]
    return plan


def _chat_tool(tool: ClientTool) -> dict[str, Any]:
    if isinstance(tool, CustomTool):
        description = tool.description or ""
        grammar = tool.format or {}
        if grammar.get("type") == "grammar" and isinstance(grammar.get("definition"), str):
            # No grammar engine for Lark or regex here: the model is told instead.
            syntax = grammar.get("syntax", "")
            description += f"\n\nThe input follows this {syntax} grammar:\n{grammar['definition']}"
        function: dict[str, Any] = {
            "name": tool.name,
            "description": description.strip(),
            "parameters": {
                "type": "object",
                "properties": {"input": {"type": "string"}},
                "required": ["input"],
                "additionalProperties": False,
            },
        }
        return {"type": "function", "function": function}
    function = {
        "name": tool.name,
        "parameters": tool.parameters or {"type": "object", "properties": {}},
    }
    if tool.description is not None:
        function["description"] = tool.description
    if tool.strict is not None:
        function["strict"] = tool.strict
    return {"type": "function", "function": function}


def chat_response_format(text_format: TextFormat) -> dict[str, Any] | None:
    """`text.format` as chat's `response_format` (None for plain text)."""
    if isinstance(text_format, JsonObjectTextFormat):
        return {"type": "json_object"}
    if isinstance(text_format, JsonSchemaTextFormat):
        schema: dict[str, Any] = {"name": text_format.name, "schema": text_format.json_schema}
        if text_format.description is not None:
            schema["description"] = text_format.description
        if text_format.strict is not None:
            schema["strict"] = text_format.strict
        return {"type": "json_schema", "json_schema": schema}
    return None


def parse_items(raw_input: str | list[Any], param: str = "input") -> list[InputItem]:
    """`input` as items: a string is one user message; ignored types are dropped."""
    if isinstance(raw_input, str):
        return [MessageItem(role="user", content=raw_input)]
    items = []
    for index, raw in enumerate(raw_input):
        item = parse_input_item(raw, f"{param}.{index}")
        if item is not None:
            items.append(item)
    return items


def chat_messages(instructions: str | None, items: Sequence[InputItem]) -> list[dict[str, Any]]:
    """The conversation as chat-completions messages. Pure."""
    messages: list[dict[str, Any]] = []
    if instructions:
        messages.append({"role": "system", "content": instructions})
    for item in items:
        if isinstance(item, MessageItem):
            role = "system" if item.role == "developer" else item.role
            messages.append({"role": role, "content": content_text(item.content)})
        elif isinstance(item, FunctionCallItem):
            _add_tool_call(messages, item.call_id, item.name, item.arguments)
        elif isinstance(item, CustomToolCallItem):
            _add_tool_call(messages, item.call_id, item.name, json.dumps({"input": item.input}))
        elif isinstance(item, FunctionCallOutputItem | CustomToolCallOutputItem):
            messages.append(
                {"role": "tool", "tool_call_id": item.call_id, "content": content_text(item.output)}
            )
    return messages


def _add_tool_call(messages: list[dict[str, Any]], call_id: str, name: str, arguments: str) -> None:
    """A call joins the assistant message just before it (its text, or earlier calls)."""
    call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
    last = messages[-1] if messages else None
    if last is not None and last["role"] == "assistant":
        last.setdefault("tool_calls", []).append(call)
        if not last.get("content"):
            last["content"] = None
        return
    messages.append({"role": "assistant", "content": None, "tool_calls": [call]})


def item_dict(item: InputItem | OutputItemModel) -> dict[str, Any]:
    """An item as stored and listed by input_items: with an id, and content as parts."""
    data = item.model_dump(mode="json", by_alias=True, exclude_none=True)
    if not data.get("id"):
        data["id"] = new_id(_ID_PREFIXES.get(data["type"], "item"))
    if isinstance(item, MessageItem) and isinstance(item.content, str):
        part = "output_text" if item.role == "assistant" else "input_text"
        data["content"] = [{"type": part, "text": item.content}]
    return data


@dataclass
class ChatPlan:
    """One Responses request, translated: what is sent, and what the reply needs."""

    chat: dict[str, Any]
    tools: ToolPlan
    text_format: TextFormat
    context: list[dict[str, Any]]  # earlier turns' items, then this request's input


def plan_chat(request: ResponsesRequest, history: Sequence[dict[str, Any]] = ()) -> ChatPlan:
    """The chat-completions request for `request`, after `history` (a stored
    conversation's items). Pure; raises ApiError (400) naming the offending field."""
    _refuse_unsupported(request)
    earlier = parse_items(list(history), "previous_response_id")
    new = parse_items(request.input)
    messages = chat_messages(request.instructions, [*earlier, *new])
    if not messages:
        raise ApiError(
            400, "input: there is nothing to respond to", param="input", code="invalid_value"
        )
    tools = plan_tools(request.tools, request.tool_choice)
    text_format = parse_text_format(request.text.format if request.text else None)
    chat: dict[str, Any] = {"model": request.model, "messages": messages}
    if request.max_output_tokens is not None:
        chat["max_tokens"] = request.max_output_tokens
    for name in ("temperature", "top_p", "user"):
        value = getattr(request, name)
        if value is not None:
            chat[name] = value
    if tools.chat_tools:
        chat["tools"] = tools.chat_tools
        chat["tool_choice"] = tools.chat_tool_choice
        if request.parallel_tool_calls is not None:
            chat["parallel_tool_calls"] = request.parallel_tool_calls
    response_format = chat_response_format(text_format)
    if response_format is not None:
        chat["response_format"] = response_format
    if request.stream:
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    context = [*history, *(item_dict(item) for item in new)]
    return ChatPlan(chat, tools, text_format, context)


def response_base(
    request: ResponsesRequest, plan: ChatPlan, response_id: str, created_at: int
) -> ResponseObject:
    """The response object before any output: what the request asked for, echoed."""
    text: dict[str, Any] = {"format": plan.text_format.model_dump(by_alias=True, exclude_none=True)}
    if request.text is not None and request.text.verbosity is not None:
        text["verbosity"] = request.text.verbosity
    reasoning = request.reasoning or {}
    return ResponseObject(
        id=response_id,
        created_at=created_at,
        status="in_progress",
        instructions=request.instructions,
        max_output_tokens=request.max_output_tokens,
        max_tool_calls=request.max_tool_calls,
        model=request.model,
        parallel_tool_calls=request.parallel_tool_calls is not False,
        previous_response_id=request.previous_response_id,
        prompt_cache_key=request.prompt_cache_key,
        reasoning={"effort": reasoning.get("effort"), "summary": reasoning.get("summary")},
        safety_identifier=request.safety_identifier,
        store=request.store is not False,
        temperature=request.temperature,
        text=text,
        tool_choice=plan.tools.echo_choice,
        tools=plan.tools.echo_tools,
        top_logprobs=request.top_logprobs,
        top_p=request.top_p,
        user=request.user,
        metadata=request.metadata or {},
    )


# --- translation: reply -------------------------------------------------------------------------


def _custom_input(arguments: str) -> str:
    """A custom tool's input from the JSON arguments the model produced for it."""
    try:
        value = json.loads(arguments)
    except ValueError:
        return arguments
    if isinstance(value, dict) and isinstance(value.get("input"), str):
        return value["input"]
    return arguments


def tool_call_item(
    call_id: Any, name: str, arguments: str, status: ItemStatus, custom_names: frozenset[str]
) -> OutputFunctionCall | OutputCustomToolCall:
    call_id = call_id if isinstance(call_id, str) and call_id else new_id("call")
    if name in custom_names:
        return OutputCustomToolCall(
            id=new_id("ctc"),
            call_id=call_id,
            name=name,
            input=_custom_input(arguments),
            status=status,
        )
    return OutputFunctionCall(
        id=new_id("fc"), call_id=call_id, name=name, arguments=arguments, status=status
    )


def output_items(
    message: dict[str, Any], finish_reason: str | None, custom_names: frozenset[str]
) -> list[OutputItemModel]:
    """A chat completion's message as Responses output items. Pure."""
    status: ItemStatus = "incomplete" if finish_reason == "length" else "completed"
    content = message.get("content")
    calls = message.get("tool_calls") or []
    items: list[OutputItemModel] = []
    if content or not calls:
        text = content if isinstance(content, str) else ""
        items.append(
            OutputMessage(id=new_id("msg"), status=status, content=[OutputText(text=text)])
        )
    for call in calls:
        function = call.get("function") or {}
        items.append(
            tool_call_item(
                call.get("id"),
                str(function.get("name") or ""),
                str(function.get("arguments") or ""),
                status,
                custom_names,
            )
        )
    return items


def response_usage(usage: Any) -> ResponseUsage | None:
    """Chat's `usage` as the Responses API counts it."""
    if not isinstance(usage, dict):
        return None
    prompt = int(usage.get("prompt_tokens") or 0)
    completion = int(usage.get("completion_tokens") or 0)
    details = usage.get("prompt_tokens_details") or {}
    cached = int(details.get("cached_tokens") or 0) if isinstance(details, dict) else 0
    return ResponseUsage(
        input_tokens=prompt,
        input_tokens_details=InputTokensDetails(cached_tokens=cached),
        output_tokens=completion,
        total_tokens=int(usage.get("total_tokens") or prompt + completion),
    )


def finished_response(
    base: ResponseObject,
    output: list[OutputItemModel],
    finish_reason: str | None,
    usage: ResponseUsage | None,
) -> ResponseObject:
    """The response once generation ended: completed, or incomplete at the token limit."""
    cut = finish_reason == "length"
    return base.model_copy(
        update={
            "status": "incomplete" if cut else "completed",
            "completed_at": int(time.time()),
            "incomplete_details": IncompleteDetails(reason="max_output_tokens") if cut else None,
            "output": output,
            "usage": usage,
        }
    )


def failed_response(
    base: ResponseObject, output: list[OutputItemModel], message: str
) -> ResponseObject:
    return base.model_copy(
        update={
            "status": "failed",
            "error": ResponseErrorInfo(code="server_error", message=message),
            "output": output,
        }
    )


class ResponseEventStream:
    """OpenAI chat-completion chunks in, Responses stream events (SSE bytes) out.

    Pure bookkeeping, no I/O: `start()`, then `feed(chunk)` per chunk, then `finish()`
    (or `fail(message)`). Items open on their first fragment and close when the next item
    opens or the stream ends; every event carries the next `sequence_number`.
    """

    def __init__(self, base: ResponseObject, custom_names: frozenset[str]) -> None:
        self._base = base
        self._custom_names = custom_names
        self._sequence = 0
        self._output: list[OutputItemModel] = []
        self._open: int | None = None  # the output index of the item still receiving
        self._calls: dict[int, int] = {}  # chat tool_call index -> output index
        self._custom_arguments: dict[int, str] = {}  # output index -> raw JSON so far
        self.finish_reason: str | None = None
        self.usage: ResponseUsage | None = None
        self.final: ResponseObject | None = None

    def _emit(self, event: StreamEvent) -> bytes:
        event.sequence_number = self._sequence
        self._sequence += 1
        return f"event: {event.type}\ndata: {event.model_dump_json()}\n\n".encode()

    def start(self) -> list[bytes]:
        return [
            self._emit(ResponseLifecycleEvent(type="response.created", response=self._base)),
            self._emit(ResponseLifecycleEvent(type="response.in_progress", response=self._base)),
        ]

    def feed_data(self, data: bytes) -> list[bytes]:
        """One `data:` payload of the chat stream: a chunk, or the worker's error (which
        fails the response)."""
        try:
            chunk = json.loads(data)
        except ValueError:
            return []
        if not isinstance(chunk, dict):
            return []
        error = chunk.get("error")
        if error is not None:
            message = error.get("message") if isinstance(error, dict) else error
            return self.fail(str(message or "generation failed"))
        try:
            return self.feed(chunk)
        except (ValueError, LookupError, TypeError, AttributeError):
            return self.fail("the model's stream could not be read")

    def feed(self, chunk: dict[str, Any]) -> list[bytes]:
        """One chat-completion chunk's events (often none: usage, roles, finish)."""
        events: list[bytes] = []
        usage = response_usage(chunk.get("usage"))
        if usage is not None:
            self.usage = usage
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            text = delta.get("content")
            if isinstance(text, str) and text:
                events += self._text(text)
            for call in delta.get("tool_calls") or []:
                events += self._tool_call(call)
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        return events

    def _text(self, text: str) -> list[bytes]:
        events: list[bytes] = []
        item = self._output[self._open] if self._open is not None else None
        if not isinstance(item, OutputMessage):
            events += self._close_open("completed")
            item = OutputMessage(id=new_id("msg"), status="in_progress", content=[])
            events += self._open_item(item)
            item.content.append(OutputText(text=""))
            events.append(
                self._part_event("response.content_part.added", len(self._output) - 1, item)
            )
        item.content[0].text += text
        assert self._open is not None
        events.append(
            self._emit(
                OutputTextDeltaEvent(
                    item_id=item.id, output_index=self._open, content_index=0, delta=text
                )
            )
        )
        return events

    def _tool_call(self, call: dict[str, Any]) -> list[bytes]:
        events: list[bytes] = []
        function = call.get("function") or {}
        raw_index = call.get("index")
        index = raw_index if isinstance(raw_index, int) else 0
        position = self._calls.get(index)
        if position is None:
            events += self._close_open("completed")
            name = str(function.get("name") or "")
            opened = tool_call_item(call.get("id"), name, "", "in_progress", self._custom_names)
            events += self._open_item(opened)
            position = len(self._output) - 1
            self._calls[index] = position
        arguments = function.get("arguments")
        if not isinstance(arguments, str) or not arguments:
            return events
        item = self._output[position]
        if isinstance(item, OutputFunctionCall):
            item.arguments += arguments
            events.append(
                self._emit(
                    FunctionCallArgumentsDeltaEvent(
                        item_id=item.id, output_index=position, delta=arguments
                    )
                )
            )
        else:  # a custom tool's input is inside JSON: sent whole when the call closes
            self._custom_arguments[position] = self._custom_arguments.get(position, "") + arguments
        return events

    def _open_item(self, item: OutputItemModel) -> list[bytes]:
        self._output.append(item)
        self._open = len(self._output) - 1
        return [
            self._emit(
                OutputItemEvent(
                    type="response.output_item.added", output_index=self._open, item=item
                )
            )
        ]

    def _part_event(self, kind: Any, position: int, item: OutputMessage) -> bytes:
        return self._emit(
            ContentPartEvent(
                type=kind,
                item_id=item.id,
                output_index=position,
                content_index=0,
                part=item.content[0],
            )
        )

    def _close_open(self, status: ItemStatus) -> list[bytes]:
        if self._open is None:
            return []
        position, item = self._open, self._output[self._open]
        events: list[bytes] = []
        if isinstance(item, OutputMessage):
            part = item.content[0]
            events.append(
                self._emit(
                    OutputTextDoneEvent(
                        item_id=item.id, output_index=position, content_index=0, text=part.text
                    )
                )
            )
            events.append(self._part_event("response.content_part.done", position, item))
        elif isinstance(item, OutputFunctionCall):
            events.append(
                self._emit(
                    FunctionCallArgumentsDoneEvent(
                        item_id=item.id,
                        output_index=position,
                        name=item.name,
                        arguments=item.arguments,
                    )
                )
            )
        else:
            item.input = _custom_input(self._custom_arguments.get(position, ""))
            if item.input:
                events.append(
                    self._emit(
                        CustomToolCallInputDeltaEvent(
                            item_id=item.id, output_index=position, delta=item.input
                        )
                    )
                )
            events.append(
                self._emit(
                    CustomToolCallInputDoneEvent(
                        item_id=item.id, output_index=position, input=item.input
                    )
                )
            )
        item.status = status
        events.append(
            self._emit(
                OutputItemEvent(type="response.output_item.done", output_index=position, item=item)
            )
        )
        self._open = None
        return events

    def finish(self) -> list[bytes]:
        """The closing events: the last item done, then response.completed/incomplete."""
        events: list[bytes] = []
        if not self._output:  # nothing generated: still one (empty) message, as unstreamed
            events += self._text_item_without_text()
        status: ItemStatus = "incomplete" if self.finish_reason == "length" else "completed"
        events += self._close_open(status)
        self.final = finished_response(self._base, self._output, self.finish_reason, self.usage)
        cut = self.final.status == "incomplete"
        events.append(
            self._emit(
                ResponseLifecycleEvent(
                    type="response.incomplete" if cut else "response.completed",
                    response=self.final,
                )
            )
        )
        return events

    def _text_item_without_text(self) -> list[bytes]:
        item = OutputMessage(id=new_id("msg"), status="in_progress", content=[])
        events = self._open_item(item)
        item.content.append(OutputText(text=""))
        events.append(self._part_event("response.content_part.added", len(self._output) - 1, item))
        return events

    def fail(self, message: str) -> list[bytes]:
        """The closing event of a stream that broke: response.failed, with the error."""
        if self._open is not None:
            self._output[self._open].status = "incomplete"
            self._open = None
        self.final = failed_response(self._base, self._output, message)
        return [self._emit(ResponseLifecycleEvent(type="response.failed", response=self.final))]


# --- the routes -----------------------------------------------------------------------------------


class ResponsesApi:
    """The handlers: parse, translate, relay through the gateway, translate back, store."""

    def __init__(self, pool: ModelPool, gateway: Gateway, store: ResponseStore) -> None:
        self._pool = pool
        self._gateway = gateway
        self.store = store

    async def create(self, request: Request) -> Response:
        raw = await request.body()
        try:
            payload = json.loads(raw)
        except ValueError:
            raise ApiError(400, "request body is not valid JSON", code="invalid_json") from None
        body = parse_request(payload)
        self._pool.resolve(body.model)  # an unknown model is a 404 before anything else
        history: list[dict[str, Any]] = []
        if body.previous_response_id is not None:
            history = self._stored(body.previous_response_id, previous=True).conversation()
        plan = plan_chat(body, history)
        base = response_base(body, plan, new_id("resp"), int(time.time()))
        if plan.tools.ignored:
            log.info("hosted tools ignored", extra={"tools": plan.tools.ignored})
        reply = await self._gateway.relay(
            "/v1/chat/completions", json.dumps(plan.chat).encode(), JSON_REQUEST
        )
        headers = _reply_headers(reply, plan.tools)
        if reply.status_code != 200:
            if isinstance(reply, StreamingResponse):
                await close_stream(reply.body_iterator)
                raise ApiError(502, "the worker failed", type="server_error", code="worker_failed")
            return _relayed_error(reply)
        if body.stream:
            if not isinstance(reply, StreamingResponse):
                raise ApiError(
                    502, "the worker did not stream", type="server_error", code="worker_failed"
                )
            events = ResponseEventStream(base, plan.tools.custom_names)
            return StreamingResponse(
                self._stream(reply.body_iterator, events, plan.context),
                media_type="text/event-stream",
                headers={**headers, "Cache-Control": "no-cache"},
            )
        if isinstance(reply, StreamingResponse):
            await close_stream(reply.body_iterator)
            raise ApiError(502, "the worker streamed unasked", type="server_error")
        final = _from_completion(bytes(reply.body), base, plan.tools.custom_names)
        self._keep(final, plan.context)
        return JSONResponse(final.model_dump(mode="json"), headers=headers)

    async def _stream(
        self, chunks: AsyncIterable[Any], events: ResponseEventStream, context: list[dict[str, Any]]
    ) -> AsyncIterator[bytes]:
        """The Responses events for one relayed chat stream; closing it closes the relay."""
        try:
            for event in events.start():
                yield event
            done = False
            async for data in sse_payloads(chunks):
                if data == b"[DONE]":
                    done = True
                    break
                for event in events.feed_data(data):
                    yield event
                if events.final is not None:
                    return  # the worker reported an error: the stream has failed
            if done or events.finish_reason is not None:
                closing = events.finish()
            else:
                closing = events.fail("the model's stream ended early")
            for event in closing:
                yield event
            assert events.final is not None
            if events.final.status != "failed":
                self._keep(events.final, context)
        finally:
            await close_stream(chunks)

    def _keep(self, response: ResponseObject, context: list[dict[str, Any]]) -> None:
        if response.store:
            self.store.put(StoredResponse(response, context))

    def _stored(self, response_id: str, *, previous: bool = False) -> StoredResponse:
        stored = self.store.get(response_id)
        if stored is None:
            if previous:
                raise ApiError(
                    404,
                    f"Previous response with id '{response_id}' not found.",
                    param="previous_response_id",
                    code="previous_response_not_found",
                )
            raise not_found(f"Response with id '{response_id}' not found.")
        return stored

    def get(self, response_id: str) -> dict[str, Any]:
        return self._stored(response_id).response.model_dump(mode="json")

    def delete(self, response_id: str) -> dict[str, Any]:
        if not self.store.delete(response_id):
            raise not_found(f"Response with id '{response_id}' not found.")
        return DeletedResponse(id=response_id).model_dump()

    def input_items(
        self, response_id: str, limit: int, order: str, after: str | None
    ) -> dict[str, Any]:
        """The items the response answered (earlier turns' included), paged like OpenAI's."""
        if not 1 <= limit <= 100:
            raise ApiError(400, "limit: between 1 and 100", param="limit", code="invalid_value")
        if order not in ("asc", "desc"):
            raise ApiError(400, "order: 'asc' or 'desc'", param="order", code="invalid_value")
        items = self._stored(response_id).context
        items = list(reversed(items)) if order == "desc" else list(items)
        if after is not None:
            ids = [item.get("id") for item in items]
            if after not in ids:
                raise ApiError(400, f"after: no item '{after}' in this response", param="after")
            items = items[ids.index(after) + 1 :]
        page = items[:limit]
        return InputItemList(
            data=page,
            first_id=page[0]["id"] if page else None,
            last_id=page[-1]["id"] if page else None,
            has_more=len(items) > limit,
        ).model_dump()


def _refuse_unsupported(body: ResponsesRequest) -> None:
    """Features that would change the answer's meaning and that this server lacks."""
    for name, value, why in (
        ("background", body.background, "background responses are not supported"),
        (
            "conversation",
            body.conversation,
            "server-side conversations are not supported; use previous_response_id",
        ),
        ("prompt", body.prompt, "stored prompt templates are not supported"),
    ):
        if value:
            raise ApiError(400, f"{name}: {why}", param=name, code="unsupported_parameter")


def _from_completion(
    content: bytes, base: ResponseObject, custom: frozenset[str]
) -> ResponseObject:
    try:
        payload = json.loads(content)
        choice = payload["choices"][0]
        finish_reason = choice.get("finish_reason")
        return finished_response(
            base,
            output_items(choice["message"], finish_reason, custom),
            finish_reason,
            response_usage(payload.get("usage")),
        )
    except (ValueError, LookupError, TypeError, AttributeError):
        raise ApiError(
            502,
            "the worker's reply was not a chat completion",
            type="server_error",
            code="worker_failed",
        ) from None


def _reply_headers(reply: Response, tools: ToolPlan) -> dict[str, str]:
    headers = {
        name: reply.headers[name]
        for name in ("x-pool-model", "x-pool-fallback-from")
        if name in reply.headers
    }
    if tools.ignored:
        headers["x-pool-ignored-tools"] = ",".join(tools.ignored)
    return headers


def _relayed_error(reply: Response) -> Response:
    """A worker's (or the gateway's) error, with chat field names as Responses names."""
    headers = {k: v for k, v in reply.headers.items() if k in ("retry-after", "x-pool-model")}
    try:
        payload = json.loads(bytes(reply.body))
        error = payload["error"]
        param = error.get("param")
    except (ValueError, KeyError, TypeError, AttributeError):
        error = {"message": f"the model failed with status {reply.status_code}"}
        error.update(type="server_error", param=None, code=None)
        return JSONResponse({"error": error}, reply.status_code, headers=headers)
    if isinstance(param, str):
        head = param.split(".", 1)[0]
        if head in _CHAT_TO_RESPONSES_PARAM:
            error["param"] = _CHAT_TO_RESPONSES_PARAM[head]
            message = error.get("message")
            if isinstance(message, str) and message.startswith(param):
                error["message"] = error["param"] + message[len(param) :]
    return JSONResponse({"error": error}, reply.status_code, headers=headers)


def install_responses_routes(
    app: FastAPI, pool: ModelPool, gateway: Gateway, store: ResponseStore | None = None
) -> ResponsesApi:
    """Add `/v1/responses` (create, get, delete, input_items) to the manager's app."""
    api = ResponsesApi(pool, gateway, store or store_for(pool.config))

    @app.post("/v1/responses", response_model=None)
    async def create_response(request: Request) -> Any:
        return await api.create(request)

    @app.get("/v1/responses/{response_id}")
    async def get_response(response_id: str) -> dict[str, Any]:
        return api.get(response_id)

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str) -> dict[str, Any]:
        return api.delete(response_id)

    @app.get("/v1/responses/{response_id}/input_items")
    async def list_input_items(
        response_id: str, limit: int = 20, order: str = "desc", after: str | None = None
    ) -> dict[str, Any]:
        return api.input_items(response_id, limit, order, after)

    return api
