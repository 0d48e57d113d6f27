"""Chat Completions and Completions bodies -> the one internal request (``api/request.py``).

Chat messages are already what chat templates read; they keep their order. A leading system
(or developer) message is the system prompt; "developer" anywhere means "system", which many
templates know and few know "developer" by. Function tools go to the template; ``tool_choice``
"required" or a named function makes a call required.
"""

from __future__ import annotations

from typing import Any

from gateway.api import images
from gateway.api.errors import APIError
from gateway.api.family import CHAT, COMPLETIONS
from gateway.api.json_schema import tool_schema
from gateway.api.request import (
    ContentPart,
    Message,
    ModelRequest,
    TextPart,
    Tool,
    ToolCall,
    choose_tools,
    count_images,
    extensions,
)
from gateway.api.structured_output import from_chat
from gateway.chat.request import ChatCompletionRequest, ChatMessage, CompletionRequest
from gateway.http.json_body import quoted

# The legacy API's default, which clients relying on it expect.
DEFAULT_MAX_TOKENS = 16


def chat_request(body: ChatCompletionRequest) -> ModelRequest:
    images.check_parts(sum(1 for m in body.messages if m.role == "user" and isinstance(m.content, list)
                           for part in m.content if part.type == "image_url"), "messages")  # before any is read
    messages = [_message(m, i) for i, m in enumerate(body.messages)]
    system: list[str] = []
    if messages[0].role == "system" and messages[0].name is None:  # a named one stays as it is
        system = [messages.pop(0).text]
    tools, tool_choice = _tools(body)
    count_images(messages, "messages")
    return ModelRequest(
        family=CHAT,
        model=body.model,
        messages=messages,
        system=system,
        tools=tools,
        tool_choice=tool_choice,
        parallel_tool_calls=body.parallel_tool_calls is not False,
        sampling=body.sampling(),
        max_tokens=body.max_completion_tokens or body.max_tokens,
        stop=body.stop_list(),
        constraint=from_chat(body.response_format),
        chat_template_kwargs=body.chat_template_kwargs or {},
        **extensions(body.model_extra),
    )


def completion_request(body: CompletionRequest) -> ModelRequest:
    if body.suffix is not None:
        raise APIError(400, "suffix (fill-in-the-middle) is not supported", param="suffix")
    return ModelRequest(
        family=COMPLETIONS,
        model=body.model,
        prompt=_single_prompt(body.prompt),
        sampling=body.sampling(),
        max_tokens=body.max_tokens or DEFAULT_MAX_TOKENS,
        stop=body.stop_list(),
        **extensions(body.model_extra),
    )


def _message(message: ChatMessage, index: int) -> Message:
    content = message.content
    parts: list[ContentPart] = []
    if isinstance(content, list):
        for j, part in enumerate(content):
            if part.type == "image_url" and message.role == "user":
                image_url = (part.model_extra or {}).get("image_url")
                url = image_url.get("url") if isinstance(image_url, dict) else image_url
                parts.append(images.from_url(url, f"messages.{index}.content.{j}.image_url"))
                continue
            if part.type not in ("text", "input_text") or part.text is None:
                what = " in a user message" if part.type == "image_url" else ""
                raise APIError(400, f"content part type '{part.type}' is not supported{what}; send text",
                               param=f"messages.{index}.content.{j}")
            parts.append(TextPart(part.text))
    elif content:
        parts.append(TextPart(content))
    # The legacy "function" role goes to the template as it is, like every other.
    role = "system" if message.role == "developer" else message.role
    calls = [_tool_call(call, f"messages.{index}.tool_calls.{k}") for k, call in enumerate(message.tool_calls or [])]
    return Message(role=role, content=parts, tool_calls=calls,  # type: ignore[arg-type]
                   tool_call_id=message.tool_call_id, name=message.name)


def _tool_call(call: dict[str, Any], where: str) -> ToolCall:
    function = call.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise APIError(400, "a tool call needs a function with a name", param=f"{where}.function")
    return ToolCall(str(call.get("id") or ""), function["name"], function.get("arguments", ""))


def _tools(body: ChatCompletionRequest) -> tuple[list[Tool], Any]:
    """The tools the template gets, and "auto" or "required", from ``tool_choice``."""
    tools = []
    for index, tool in enumerate(body.tools or []):
        if tool.get("type", "function") != "function":
            continue  # other kinds (custom grammars) have no chat-template form
        function = tool.get("function")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise APIError(400, "a function tool needs a function with a name", param=f"tools.{index}.function")
        description = function.get("description")
        tools.append(Tool(function["name"], tool_schema(function.get("parameters"), f"tools.{index}.function.parameters"),
                          description if isinstance(description, str) else None, function.get("strict") is True))
    choice = body.tool_choice
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        if body.tools and name not in {tool.name for tool in tools}:
            raise APIError(400, f"tool_choice names an unknown function {quoted(name)}", param="tool_choice")
        return choose_tools(tools, "required", {str(name)})
    return choose_tools(tools, choice if choice in ("none", "required") else "auto")


def _single_prompt(prompt: str | list[str]) -> str:
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1:
        return prompt[0]
    raise APIError(400, "send one prompt per request (concurrent requests are batched)", param="prompt")
