"""The one request every API family converts its body into, and the one way it becomes the
worker's ``Generate``.

A family reads its own wire format once (``responses/convert.py``, ``chat/convert.py``,
``anthropic/convert.py``) into a ``ModelRequest``: the conversation as ``Message``s with
content parts, tool calls and results, reasoning; the tools offered and the tool choice
already resolved; sampling, the output constraint, stop strings; and the family it came from.
``to_generate`` is then the same for all of them: it folds the system prompt (and the
structured-output instruction) into one leading system message, as most chat templates accept
only one, and only first; and renders messages, tool calls and tools as chat templates expect.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from gateway.api.errors import APIError
from gateway.api.family import ApiFamily
from gateway.api.images import ImagePart, check_count
from gateway.api.structured_output import instruction
from protocol import Generate, SamplingParams

# Token counts beyond any context window are mistakes, and larger integers do not fit the
# worker protocol's: refused at the edge with a 400 naming the field.
TOKEN_LIMIT = (1 << 31) - 1


@dataclass
class TextPart:
    text: str


# What a message's content is made of: text and images (``images.py``).
ContentPart = TextPart | ImagePart


@dataclass
class ToolCall:
    """A call the assistant made earlier in the conversation."""

    id: str
    name: str
    arguments: Any  # the JSON text of the arguments, as clients send it (or an object)


@dataclass
class Message:
    role: Literal["system", "user", "assistant", "tool"]
    content: list[ContentPart] = field(default_factory=list)
    reasoning: str = ""  # the assistant's thinking before this turn
    tool_calls: list[ToolCall] = field(default_factory=list)
    tool_call_id: str | None = None  # role "tool": the call this answers
    name: str | None = None  # role "tool": the tool's name; else a participant's name (Chat)

    @property
    def text(self) -> str:
        return "".join(part.text for part in self.content if isinstance(part, TextPart))

    @property
    def images(self) -> list[ImagePart]:
        return [part for part in self.content if isinstance(part, ImagePart)]


def text_message(role: Literal["system", "user", "assistant", "tool"], text: str) -> Message:
    return Message(role, [TextPart(text)])


def joined(first: list[ContentPart], second: list[ContentPart], separator: str = "\n\n") -> list[ContentPart]:
    """Two messages' parts as one message's, in order: adjacent texts joined by ``separator``,
    empty texts left out."""
    out: list[ContentPart] = []
    for part in [*first, *second]:
        if isinstance(part, TextPart):
            if not part.text:
                continue
            if out and isinstance(out[-1], TextPart):
                out[-1] = TextPart(out[-1].text + separator + part.text)
                continue
        out.append(part)
    return out


def count_images(messages: list[Message], param: str) -> None:
    """The request's images against ``gateway --max-images`` (a 400 naming ``param``)."""
    total = sum(len(message.images) for message in messages)
    if total:
        check_count(total, param)


@dataclass
class Tool:
    """A function the model may call."""

    name: str
    parameters: dict[str, Any]
    description: str | None = ""  # None: the client gave none (the template then shows none)
    strict: bool = False  # the worker constrains its arguments to ``parameters``


@dataclass
class ModelRequest:
    family: ApiFamily
    model: str
    messages: list[Message] = field(default_factory=list)
    # The leading system prompt, in parts joined by a blank line; empty parts are left out.
    # An empty list: no system message (the template's default applies).
    system: list[str] = field(default_factory=list)
    prompt: str | None = None  # raw text, no template (Completions); then ``messages`` is empty
    tools: list[Tool] = field(default_factory=list)
    tool_choice: Literal["auto", "required"] = "auto"
    parallel_tool_calls: bool = True
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int | None = None
    stop: list[str] = field(default_factory=list)
    constraint: dict[str, Any] | None = None  # structured output (structured_output.py)
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    prompt_cache_key: str | None = None  # a conversation's id: requests of one go to the same replica
    count_only: bool = False  # count the prompt's tokens, generate nothing
    # Ollama's keep_alive: seconds an on-demand model stays loaded after this request (0: unload
    # once idle; inf: never unload for idleness); None: the model list's idle_ttl.
    keep_alive: float | None = None
    speculative: bool = True  # False: the worker decodes it without speculative drafts

    @property
    def strict_tools(self) -> bool:
        return any(tool.strict for tool in self.tools)


_DURATION = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_SECONDS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def extensions(extra: dict[str, Any] | None) -> dict[str, Any]:
    """The fields every family takes beyond its vendor's: ``keep_alive`` (Ollama's) and
    ``speculative`` (false: no speculative decoding for this request), as ``ModelRequest`` fields."""
    extra = extra or {}
    speculative = extra.get("speculative", True)
    if not isinstance(speculative, bool):
        raise APIError(400, f"Invalid speculative {repr(speculative)[:64]}: give true or false.", param="speculative")
    return {"keep_alive": keep_alive(extra.get("keep_alive")), "speculative": speculative}


def keep_alive(value: Any) -> float | None:
    """A request's ``keep_alive`` as Ollama takes it: seconds (``300``), a duration (``"5m"``,
    ``"1h"``, ``"90s"``), ``0`` (unload once idle) or a negative value (keep loaded: inf)."""
    if value is None:
        return None
    seconds: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = float(match.group(1)) * _SECONDS[match.group(2)]
    if seconds is None or math.isnan(seconds):
        shown = repr(value)[:64]
        raise APIError(400, f"Invalid keep_alive {shown}: give seconds (300), a duration ('5m', '1h'), 0 to unload "
                            "the model after this request, or -1 to keep it loaded.", param="keep_alive")
    return math.inf if seconds < 0 else seconds


def to_generate(request: ModelRequest, request_id: str, trace_id: str | None = None, cache_scope: str = "") -> Generate:
    """``cache_scope``: the caller (``http.middleware.caller``); its prompts hit only its own
    prefix-cache entries."""
    if request.prompt is not None:
        messages = None
    else:
        messages = [template_message(m) for m in request.messages]
        system = [*request.system, *filter(None, [instruction(request.constraint)])]
        if system:
            messages.insert(0, {"role": "system", "content": "\n\n".join(s for s in system if s)})
    return Generate(
        request_id=request_id,
        messages=messages,
        prompt=request.prompt,
        tools=[template_tool(tool) for tool in request.tools] or None,
        tool_choice=request.tool_choice,
        parallel_tool_calls=request.parallel_tool_calls,
        max_tokens=request.max_tokens,
        sampling=request.sampling,
        stop=list(request.stop),
        chat_template_kwargs=dict(request.chat_template_kwargs),
        prompt_cache_key=request.prompt_cache_key,
        cache_scope=cache_scope,
        trace_id=trace_id,
        count_only=request.count_only,
        constraint=None if request.count_only else request.constraint,  # counting compiles no grammar
        speculative=request.speculative,
    )


def template_message(message: Message) -> dict[str, Any]:
    """The plain ``{role, content, ...}`` dict chat templates expect. With images, ``content`` is a
    list of parts, ``{"type": "text", "text"}`` and ``{"type": "image", "data", "media_type"}``,
    for a vision worker (protocol/README.md); without, the text, as ever."""
    content: Any = message.text
    if message.images:
        content = [{"type": "text", "text": part.text} if isinstance(part, TextPart)
                   else {"type": "image", "data": part.data, "media_type": part.media_type}
                   for part in message.content if not isinstance(part, TextPart) or part.text]
    out: dict[str, Any] = {"role": message.role, "content": content}
    if message.reasoning:
        out["reasoning_content"] = message.reasoning
    if message.tool_calls:
        out["tool_calls"] = [{"id": call.id, "type": "function",
                              "function": {"name": call.name, "arguments": call.arguments}}
                             for call in message.tool_calls]
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    if message.name is not None:
        out["name"] = message.name
    return out


def template_tool(tool: Tool) -> dict[str, Any]:
    function: dict[str, Any] = {"name": tool.name}
    if tool.description is not None:
        function["description"] = tool.description
    function["parameters"] = tool.parameters
    if tool.strict:
        function["strict"] = True
    return {"type": "function", "function": function}


def choose_tools(tools: list[Tool], mode: str,
                 named: set[str] | None = None) -> tuple[list[Tool], Literal["auto", "required"]]:
    """The tools offered and the worker's choice, from a family's ``tool_choice`` read as a mode
    ("auto", "required", "none") and the names it allows (None: all)."""
    if mode == "none" or not tools:
        return [], "auto"
    if named is not None:
        missing = named - {tool.name for tool in tools}
        if missing:
            raise APIError(400, f"tool_choice names unknown tools: {', '.join(sorted(missing))}", param="tool_choice")
        tools = [tool for tool in tools if tool.name in named]
    return tools, "required" if mode == "required" else "auto"
