"""Tool calling for models run here: the prompt that offers tools, the grammar that
constrains the reply, and the parser that turns the reply into OpenAI `tool_calls`.

The generic format (llama.cpp's idea for templates that know no tools): the tools are
described in the system message, and the model answers with one JSON object, either
`{"tool_calls": [{"name": ..., "arguments": {...}}]}` or `{"response": "text"}`. A
grammar built from the tools' JSON schemas allows only those two shapes (`auto`), only
calls (`required`), or only calls of one function (a named `tool_choice`), so even a tiny
model returns a call whose arguments parse and validate. With `none`, or with no tools,
nothing is constrained. History round-trips: an assistant message's `tool_calls` are
rendered in the same JSON, and `tool` messages carry the call's name and result.

The native format: a chat template that knows tools and writes calls as
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (Hermes, Qwen 2.5 and 3,
SmolLM3, many fine-tunes) is rendered with the request's `tools` and the history's
`tool_calls`, as llama.cpp's `--jinja` does; `required` and named calls are constrained
to such blocks, and `auto` is free text whose blocks are read as calls. Templates that
know tools in another syntax use the generic format.

`ToolReplyParser` reads the reply as it streams and yields content text, the start of
each call (id, name) and its arguments in fragments, the way OpenAI streams them.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from model_service.backends.base import GrammarFrame, ToolFormat
from model_service.errors import ApiError
from model_service.protocol import ChatCompletionRequest, ChatMessage, Tool

Message = dict[str, Any]
HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"


def template_tool_format(template: str | None) -> ToolFormat:
    """Which format a chat template's tool calls take (generic when it knows none)."""
    if template and "tools" in template and HERMES_OPEN in template:
        return "hermes"
    return "generic"


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _bad_tools(message: str, param: str = "tools") -> ApiError:
    return ApiError(400, message, param=param, code="invalid_value")


def _hoist_definitions(schema: dict[str, Any], prefix: str, into: dict[str, Any]) -> Any:
    """`schema` with its `$defs` moved into `into` under `prefix`-ed names, refs rewritten.

    Each tool's parameters become one branch of a bigger schema, whose `$defs` live at
    the root: pydantic-made schemas (the Agents SDK's, pydantic-ai's) refer to `#/$defs/X`.
    """
    local: dict[str, Any] = {}
    for key in ("$defs", "definitions"):
        local.update(schema.get(key) or {})

    def rewrite(node: Any) -> Any:
        if isinstance(node, dict):
            out = {}
            for key, value in node.items():
                if key in ("$defs", "definitions"):
                    continue
                if key == "$ref" and isinstance(value, str):
                    name = value.rsplit("/", 1)[-1]
                    if value.startswith(("#/$defs/", "#/definitions/")) and name in local:
                        value = f"#/$defs/{prefix}{name}"
                    elif value == "#":
                        raise _bad_tools("a tool's parameters may not refer to themselves ('#')")
                out[key] = rewrite(value)
            return out
        if isinstance(node, list):
            return [rewrite(item) for item in node]
        return node

    for name, definition in local.items():
        into[f"{prefix}{name}"] = rewrite(definition)
    return rewrite(schema)


@dataclass(frozen=True)
class ToolPlan:
    """What a chat request asks of tools: which are offered and how the reply is bound."""

    tools: tuple[Tool, ...]
    choice: str  # "auto", "required", "none", or "function" (a named one)
    named: str | None = None
    parallel: bool = True
    # The answer's own schema (response_format json_schema): the `response` value then.
    response_schema: dict[str, Any] | None = None
    format: ToolFormat = "generic"

    @classmethod
    def from_request(
        cls,
        request: ChatCompletionRequest,
        response_schema: dict[str, Any] | None,
        format: ToolFormat = "generic",
    ) -> ToolPlan | None:
        """None when the request offers no tools. Raises ApiError for a bad choice."""
        tools = tuple(request.tools or ())
        choice = request.tool_choice
        if not tools:
            if choice not in (None, "none", "auto"):
                raise _bad_tools("tool_choice requires tools: none were given", param="tool_choice")
            return None
        names = [tool.function.name for tool in tools]
        if len(set(names)) != len(names):
            raise _bad_tools("each tool needs a name of its own: two tools share one")
        if choice is None or isinstance(choice, str):
            parallel = bool(request.parallel_tool_calls)
            return cls(tools, choice or "auto", None, parallel, response_schema, format)
        if choice.function.name not in names:
            raise _bad_tools(
                f"tool_choice names the function '{choice.function.name}', which is not "
                "among the tools",
                param="tool_choice",
            )
        parallel = bool(request.parallel_tool_calls)
        return cls(tools, "function", choice.function.name, parallel, None, format)

    @property
    def active(self) -> bool:
        """Whether the reply may hold calls (and is read for them)."""
        return self.choice != "none"

    @property
    def constrained(self) -> bool:
        """Whether a grammar binds the reply. Native `auto` is the model's free text."""
        return self.active and not (self.format == "hermes" and self.choice == "auto")

    def _offered(self) -> list[Tool]:
        if self.named is None:
            return list(self.tools)
        return [tool for tool in self.tools if tool.function.name == self.named]

    # --- the grammar ---------------------------------------------------------------------

    def schema(self) -> dict[str, Any]:
        """The JSON schema the reply (or, natively, each framed call) is held to."""
        definitions: dict[str, Any] = {}
        branches = []
        for number, tool in enumerate(self._offered()):
            parameters = _hoist_definitions(tool.function.parameters, f"tool{number}_", definitions)
            branches.append(
                {
                    "type": "object",
                    "properties": {"name": {"const": tool.function.name}, "arguments": parameters},
                    "required": ["name", "arguments"],
                }
            )
        call: dict[str, Any] = branches[0] if len(branches) == 1 else {"anyOf": branches}
        if self.format == "hermes":
            return {**call, "$defs": definitions} if definitions else call
        calls: dict[str, Any] = {"type": "array", "items": call, "minItems": 1}
        if not self.parallel:
            calls["maxItems"] = 1
        call_reply = {
            "type": "object",
            "properties": {"tool_calls": calls},
            "required": ["tool_calls"],
        }
        schema: dict[str, Any]
        if self.choice == "auto":
            answer: dict[str, Any] = {"type": "string"}
            if self.response_schema is not None:  # {} is json_object: any object
                answer = self.response_schema or {"type": "object"}
            text_reply = {
                "type": "object",
                "properties": {"response": answer},
                "required": ["response"],
            }
            schema = {"anyOf": [call_reply, text_reply]}
        else:
            schema = call_reply
        if definitions:
            schema["$defs"] = definitions
        return schema

    def frame(self) -> GrammarFrame | None:
        if self.format != "hermes":
            return None
        return GrammarFrame(f"{HERMES_OPEN}\n", f"\n{HERMES_CLOSE}", self.parallel)

    def reply_opening(self) -> str:
        """The reply's first characters, fixed by the grammar: they are put in the prompt
        (and the grammar primed with them) rather than sampled, since a model's own first
        choice rarely matches them and every mismatch costs a pass over the vocabulary."""
        if self.format == "hermes":
            start = f"{HERMES_OPEN}\n"
            if self.named is not None:
                return f'{start}{{"name": {json.dumps(self.named)}, "arguments": '
            return f'{start}{{"name": "' if self.choice == "required" else ""
        if self.named is not None:
            return f'{{"tool_calls": [{{"name": {json.dumps(self.named)}, "arguments": '
        if self.choice == "required":
            return '{"tool_calls": [{"name": "'
        return '{"'

    # --- the prompt ------------------------------------------------------------------------

    def template_tools(self) -> list[dict[str, Any]]:
        """The offered tools as a native template takes them (OpenAI's shape)."""
        return [tool.model_dump(exclude_none=True) for tool in self._offered()]

    def instructions(self) -> str:
        described = [
            {
                "name": tool.function.name,
                "description": tool.function.description or "",
                "parameters": tool.function.parameters,
            }
            for tool in self._offered()
        ]
        lines = ["You can call these tools (each with a JSON schema of its arguments):"]
        lines += [json.dumps(tool, ensure_ascii=False) for tool in described]
        calls = '{"tool_calls": [{"name": "<tool name>", "arguments": {<its arguments>}}]}'
        if self.choice == "auto":
            lines.append(
                f"Reply with one JSON object: {calls} to call tools, or "
                '{"response": "<your answer>"} to answer directly. When a tool has '
                "returned what the user asked for, answer with its result."
            )
        elif self.named is not None:
            lines.append(f"Call the tool {self.named}. Reply with one JSON object: {calls}")
        else:
            lines.append(f"Call one or more tools. Reply with one JSON object: {calls}")
        return "\n".join(lines)


def prompt_messages(request: ChatCompletionRequest, plan: ToolPlan | None) -> list[Message]:
    """The request's messages as the chat template takes them (role and text; natively,
    with the history's calls as the template expects them)."""
    if plan is not None and plan.format == "hermes":
        return [_native(message) for message in request.messages]
    names = _call_names(request.messages)
    tools_on = plan is not None and plan.active
    messages = [_render(message, names, tools_on) for message in request.messages]
    if tools_on:
        assert plan is not None
        offer = plan.instructions()
        if messages[0]["role"] in ("system", "developer"):
            messages[0] = {"role": "system", "content": f"{messages[0]['content']}\n\n{offer}"}
        else:
            messages.insert(0, {"role": "system", "content": offer})
    return messages


def tool_results_as_user(messages: list[Message]) -> list[Message]:
    """For templates that refuse a `tool` role: each result as a user message."""
    return [
        {"role": "user", "content": f"Tool result: {m['content']}"} if m["role"] == "tool" else m
        for m in messages
    ]


def _call_names(messages: list[ChatMessage]) -> dict[str, str]:
    """Call id -> function name, from the assistant messages' `tool_calls`."""
    return {
        call.id: call.function.name for message in messages for call in message.tool_calls or ()
    }


def _render(message: ChatMessage, names: dict[str, str], tools_on: bool) -> Message:
    text = message.text()
    if message.role == "assistant" and message.tool_calls:
        calls = [
            {"name": call.function.name, "arguments": _arguments_value(call.function.arguments)}
            for call in message.tool_calls
        ]
        return {"role": "assistant", "content": json.dumps({"tool_calls": calls})}
    if message.role == "assistant" and tools_on:
        # Earlier answers in the reply format the model is asked for now.
        return {"role": "assistant", "content": json.dumps({"response": text})}
    if message.role == "tool":
        name = names.get(message.tool_call_id or "", message.name or "the tool")
        return {"role": "tool", "content": f"{name} returned: {text}"}
    return {"role": message.role, "content": text}


def _native(message: ChatMessage) -> Message:
    """A message as Hugging Face chat templates take it: calls with arguments as objects."""
    out: Message = {"role": message.role, "content": message.text()}
    if message.tool_calls:
        out["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {
                    "name": call.function.name,
                    "arguments": _arguments_value(call.function.arguments),
                },
            }
            for call in message.tool_calls
        ]
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    if message.name is not None:
        out["name"] = message.name
    return out


def _arguments_value(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments  # shown as the string it was


# --- reading the reply ---------------------------------------------------------------------


@dataclass
class CallStart:
    index: int
    id: str
    name: str


@dataclass
class ArgumentsDelta:
    index: int
    text: str


@dataclass
class ParsedCall:
    id: str
    name: str | None = None
    arguments: str = ""
    complete: bool = False


@dataclass
class _Value:
    """Scanning one raw JSON value (the arguments, or a structured response)."""

    depth: int = 0
    in_string: bool = False
    escaped: bool = False
    started: bool = False


Event = str | CallStart | ArgumentsDelta

_WS = " \t\r\n"


class ToolReplyParser:
    """Reads a reply piece by piece. `feed` returns what is new: content text (str),
    `CallStart`s and `ArgumentsDelta`s. Generic: text that is not the expected JSON
    (which the grammar rules out) is passed on as content. Native: text outside
    `<tool_call>` blocks is content; each block holds one call's JSON."""

    def __init__(self, format: ToolFormat = "generic") -> None:
        self.native = format == "hermes"
        self._buffer = ""
        self._at = 0
        self._state = "text" if self.native else "start"
        self._value = _Value()
        self._value_is_arguments = False
        self._key: str | None = None
        self.content = ""
        self.calls: list[ParsedCall] = []
        self._announced = 0  # calls whose CallStart went out

    def feed(self, text: str) -> list[Event]:
        self._buffer += text
        events: list[Event] = []
        while self._advance(events):
            pass
        return events

    # One step of the scanner; False when it needs more text.
    def _advance(self, events: list[Event]) -> bool:
        state = self._state
        if state in ("done", "raw"):
            rest = self._buffer[self._at :]
            self._at = len(self._buffer)
            if state == "raw" and rest:
                self._emit_content(rest, events)
            return False
        if state == "response":
            return self._scan_string_response(events)
        if state == "value":
            return self._scan_value(events)
        if state == "text":
            return self._scan_text(events)
        at = self._skip_ws(self._at)
        if at >= len(self._buffer):
            return False
        char = self._buffer[at]
        if state == "start":
            if char != "{":
                self._state = "raw"
                return True
            self._at, self._state = at + 1, "key"
            return True
        if state == "key":
            return self._read_top_key(at, events)
        if state == "calls":
            if char == ",":
                self._at = at + 1
            elif char == "{":
                self.calls.append(ParsedCall(id=new_call_id()))
                self._at, self._state = at + 1, "call"
            else:  # "]" ends the list; what follows is the object's close
                self._at, self._state = at + 1, "done"
            return True
        if state == "call":
            return self._read_call_key(at, char, events)
        if state == "block":  # inside <tool_call>: one call object
            if char != "{":
                self._state = "raw"
                return True
            self.calls.append(ParsedCall(id=new_call_id()))
            self._at, self._state = at + 1, "call"
            return True
        if state == "block_end":
            end = at + len(HERMES_CLOSE)
            if self._buffer[at:end] == HERMES_CLOSE[: len(self._buffer) - at]:
                if end > len(self._buffer):
                    return False  # the closing tag is still arriving
                self._at, self._state = end, "text"
            else:
                self._state = "raw"
            return True
        raise AssertionError(state)

    def _scan_text(self, events: list[Event]) -> bool:
        """Content up to a `<tool_call>`; a possible start of one is held back."""
        text = self._buffer
        found = text.find(HERMES_OPEN, self._at)
        if found >= 0:
            if found > self._at:
                self._emit_content(text[self._at : found], events)
            self._at, self._state = found + len(HERMES_OPEN), "block"
            return True
        keep = 0
        for size in range(min(len(HERMES_OPEN) - 1, len(text) - self._at), 0, -1):
            if text.endswith(HERMES_OPEN[:size]):
                keep = size
                break
        if len(text) - keep > self._at:
            self._emit_content(text[self._at : len(text) - keep], events)
            self._at = len(text) - keep
        return False

    def _skip_ws(self, at: int) -> int:
        while at < len(self._buffer) and self._buffer[at] in _WS:
            at += 1
        return at

    def _read_key(self, at: int) -> tuple[str, int] | None:
        """A JSON string at `at`, then ':' : (the key, where its value starts)."""
        end = _string_end(self._buffer, at)
        if end is None:
            return None
        colon = self._skip_ws(end)
        if colon >= len(self._buffer):
            return None
        value_at = self._skip_ws(colon + 1)
        if value_at >= len(self._buffer):
            return None
        return json.loads(self._buffer[at:end]), value_at

    def _read_top_key(self, at: int, events: list[Event]) -> bool:
        if self._buffer[at] != '"':
            self._state = "raw"
            return True
        read = self._read_key(at)
        if read is None:
            return False
        key, value_at = read
        opener = self._buffer[value_at]
        if key == "tool_calls" and opener == "[":
            self._at, self._state = value_at + 1, "calls"
        elif key == "response" and opener == '"':
            self._at, self._state = value_at + 1, "response"
        elif key == "response":
            self._at, self._state = value_at, "value"
            self._value, self._value_is_arguments = _Value(), False
        else:
            self._state = "raw"
        return True

    def _read_call_key(self, at: int, char: str, events: list[Event]) -> bool:
        call = self.calls[-1]
        if char == ",":
            self._at = at + 1
            return True
        if char == "}":
            call.complete = call.name is not None
            self._at, self._state = at + 1, "block_end" if self.native else "calls"
            return True
        if char != '"':
            self._state = "raw"
            return True
        read = self._read_key(at)
        if read is None:
            return False
        key, value_at = read
        if key == "name":
            end = _string_end(self._buffer, value_at)
            if end is None:
                return False
            call.name = str(json.loads(self._buffer[value_at:end]))
            self._at = end
            self._announce(events)
            return True
        self._at, self._state = value_at, "value"
        self._value, self._value_is_arguments = _Value(), key == "arguments"
        return True

    def _announce(self, events: list[Event]) -> None:
        call = self.calls[-1]
        index = len(self.calls) - 1
        if self._announced <= index and call.name is not None:
            events.append(CallStart(index, call.id, call.name))
            self._announced = index + 1
            if call.arguments:  # arguments came before the name
                events.append(ArgumentsDelta(index, call.arguments))

    def _scan_value(self, events: list[Event]) -> bool:
        """Pass a raw JSON value through until it ends; False when it needs more."""
        value, text, at = self._value, self._buffer, self._at
        ended = False
        while at < len(text):
            char = text[at]
            at += 1
            if value.in_string:
                if value.escaped:
                    value.escaped = False
                elif char == "\\":
                    value.escaped = True
                elif char == '"':
                    value.in_string = False
                    ended = value.depth == 0
            elif char == '"':
                value.in_string = True
            elif char in "{[":
                value.depth += 1
            elif char in "}]":
                value.depth -= 1
                ended = value.depth == 0
            elif value.depth == 0 and char in ",}" + _WS and value.started:
                at -= 1  # a bare number or literal ended: the char is not ours
                ended = True
            value.started = True
            if ended:
                break
        piece = text[self._at : at]
        self._at = at
        if piece:
            if self._value_is_arguments:
                call = self.calls[-1]
                call.arguments += piece
                if call.name is not None:
                    events.append(ArgumentsDelta(len(self.calls) - 1, piece))
            elif not self.calls:  # a structured `response`: the answer's JSON text
                self._emit_content(piece, events)
        if ended:
            self._state = "call" if self.calls else "done"
        return ended

    def finish(self) -> list[Event]:
        """What is left once the reply is over: held-back text that began no call."""
        events: list[Event] = []
        if self._state == "text" and self._at < len(self._buffer):
            self._emit_content(self._buffer[self._at :], events)
            self._at = len(self._buffer)
        return events

    def _scan_string_response(self, events: list[Event]) -> bool:
        text, at = self._buffer, self._at
        start = at
        closed = False
        while at < len(text):
            char = text[at]
            if char == '"':
                closed = True
                break
            if char == "\\":
                size = _escape_size(text, at)
                if size is None:
                    break
                at += size
            else:
                at += 1
        if at > start:
            self._emit_content(json.loads(f'"{text[start:at]}"'), events)
        self._at = at + 1 if closed else at
        if closed:
            self._state = "done"
        return closed

    def _emit_content(self, text: str, events: list[Event]) -> None:
        self.content += text
        if events and isinstance(events[-1], str):
            events[-1] += text
        else:
            events.append(text)

    def finished_calls(self) -> list[ParsedCall]:
        """The calls whose JSON closed (a reply cut by max_tokens may end inside one)."""
        return [call for call in self.calls if call.complete]


def _string_end(text: str, at: int) -> int | None:
    """Where the JSON string starting at `at` (a quote) ends, past its closing quote."""
    i = at + 1
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
        elif char == '"':
            return i + 1
        else:
            i += 1
    return None


def _escape_size(text: str, at: int) -> int | None:
    """The length of the escape at `at` (a backslash), None if it is not all here yet.
    A UTF-16 high surrogate waits for its low half: alone it decodes to nothing useful."""
    if at + 1 >= len(text):
        return None
    if text[at + 1] != "u":
        return 2
    if at + 6 > len(text):
        return None
    if 0xD800 <= int(text[at + 2 : at + 6], 16) < 0xDC00:
        return 12 if at + 12 <= len(text) else None
    return 6


@dataclass
class ToolReply:
    """A finished reply: its text and its calls."""

    content: str | None
    calls: list[ParsedCall] = field(default_factory=list)


def read_reply(text: str, format: ToolFormat = "generic") -> ToolReply:
    parser = ToolReplyParser(format)
    parser.feed(text)
    parser.finish()
    calls = parser.finished_calls()
    content = parser.content.strip() if parser.native else parser.content
    return ToolReply(content or (None if calls else ""), calls)
