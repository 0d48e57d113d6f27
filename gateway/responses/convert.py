"""Responses input items -> the one internal request (``api/request.py``).

``normalize_input`` turns a request's ``input`` (a string or items in any of the shapes
clients send) into uniform stored items with ids. ``to_request`` reads a whole conversation
(previous items, then this request's) into messages:

- ``instructions`` and every system/developer message become the system prompt (one leading
  system message: many templates accept only one, and only first);
- consecutive ``function_call`` items become one assistant message with several tool calls;
- ``function_call_output`` becomes a ``tool`` message, matched to its call by ``call_id``;
- ``reasoning`` items are attached to the assistant turn they led to (``reasoning_content``),
  never an error, whatever they carry;
- a ``compaction`` item (ours: ``compaction_item.py``) becomes a user message with its summary,
  in its place.
"""

from __future__ import annotations

import base64
import json
import logging
from typing import Any

from gateway.api import images
from gateway.api.errors import APIError
from gateway.api.family import RESPONSES
from gateway.api.ids import new_id
from gateway.api.request import (
    ContentPart,
    Message,
    ModelRequest,
    TextPart,
    ToolCall,
    count_images,
    extensions,
    joined,
    text_message,
)
from gateway.api.structured_output import from_responses
from gateway.http.json_body import quoted
from gateway.responses import compaction_item
from gateway.responses.request import ResponsesRequest
from gateway.responses.tools import ToolSet
from protocol import SamplingParams

log = logging.getLogger(__name__)

_ITEM_ID_PREFIXES = {
    "message": "msg",
    "function_call": "fc",
    "function_call_output": "fco",
    "custom_tool_call": "ctc",
    "custom_tool_call_output": "ctco",
    "reasoning": "rs",
}
_IGNORED_ITEMS = {  # hosted-tool history and other items a local model cannot use
    "local_shell_call", "local_shell_call_output", "web_search_call", "file_search_call",
    "computer_call", "computer_call_output", "image_generation_call", "code_interpreter_call",
    "shell_call", "shell_call_output", "apply_patch_call", "apply_patch_call_output", "mcp_list_tools",
    "mcp_approval_request", "mcp_approval_response", "mcp_call", "tool_search_call", "tool_search_output",
    "additional_tools", "compaction_trigger", "program", "program_output",
}


def item_type(item: dict[str, Any]) -> str | None:
    """``type`` may be absent: a role makes it a message, a bare id an item reference."""
    kind = item.get("type")
    if kind:
        return kind
    if "role" in item:
        return "message"
    if "id" in item:
        return "item_reference"
    return None


def normalize_input(raw: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Uniform items with ids. ``item_reference`` items are kept for the caller to resolve."""
    if isinstance(raw, str):
        raw = [{"role": "user", "content": raw}] if raw else []
    images.check_parts(sum(1 for item in raw if isinstance(item, dict) and isinstance(item.get("content"), list)
                           for part in item["content"] if isinstance(part, dict) and part.get("type") == "input_image"),
                       "input")  # before any is read or fetched
    items = []
    for index, item in enumerate(raw):
        if not isinstance(item, dict):
            raise APIError(400, "each input item must be an object", param=f"input[{index}]")
        kind = item_type(item)
        if kind is None:
            raise APIError(400, "input item has no type", param=f"input[{index}]")
        if kind == "message":
            item = _normalize_message(item, index)
        elif kind in ("function_call", "custom_tool_call", "function_call_output", "custom_tool_call_output"):
            if not isinstance(item.get("call_id"), str):
                raise APIError(400, f"{kind} needs a call_id", param=f"input[{index}].call_id")
            if kind == "function_call" and not isinstance(item.get("name"), str):
                raise APIError(400, "function_call needs a name", param=f"input[{index}].name")
            item = {**item, "type": kind}
        elif kind == "compaction":
            item = compaction_item.checked_input_item(item, index)
        elif kind != "item_reference":
            item = {**item, "type": kind}
        if kind in _ITEM_ID_PREFIXES:
            # Listed back by input_items, where ids and statuses are required.
            item.setdefault("status", "completed")
            if not item.get("id"):
                item["id"] = new_id(_ITEM_ID_PREFIXES[kind])
        items.append(item)
    return items


def _normalize_message(item: dict[str, Any], index: int) -> dict[str, Any]:
    role = item.get("role")
    if role not in ("user", "assistant", "system", "developer"):
        raise APIError(400, f"unknown message role {quoted(role)}", param=f"input[{index}].role")
    content = item.get("content")
    part_type = "output_text" if role == "assistant" else "input_text"
    if isinstance(content, str):
        content = [{"type": part_type, "text": content}]
    elif content is None:
        content = []
    elif not isinstance(content, list):
        raise APIError(400, "message content must be a string or a list of parts", param=f"input[{index}].content")
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text"):
            text = part.get("text")
            if not isinstance(text, str):
                raise APIError(400, "a text part needs text", param=f"input[{index}].content[{j}].text")
            normalized: dict[str, Any] = {"type": part_type, "text": text}
            if role == "assistant":
                normalized["annotations"] = part.get("annotations") or []
            parts.append(normalized)
        elif kind == "refusal":
            parts.append(part)
        elif kind == "input_image" and role == "user":
            parts.append(_input_image(part, f"input[{index}].content[{j}]"))
        elif kind == "input_image":
            raise APIError(400, "input_image is supported in user messages only", param=f"input[{index}].content[{j}]")
        elif kind in ("input_file", "input_audio"):
            raise APIError(400, f"{kind} is not supported: this server reads text and images",
                           param=f"input[{index}].content[{j}]")
        else:
            raise APIError(400, f"unknown content part type {quoted(kind)}", param=f"input[{index}].content[{j}]")
    return {**item, "type": "message", "role": role, "content": parts}


def _input_image(part: dict[str, Any], at: str) -> dict[str, Any]:
    """An ``input_image`` part, checked (``api/images.py``) and kept as a data URL: a fetched URL
    (``--allow-image-urls``) is fetched once, not again when a later response continues from it."""
    if part.get("file_id") is not None:
        raise APIError(400, "input_image file_id is not supported (this server has no Files API): send the image "
                       "as a data: URL in image_url", param=f"{at}.file_id")
    url = part.get("image_url")
    image = images.from_url(url, f"{at}.image_url")
    if not (isinstance(url, str) and url[:5].lower() == "data:"):
        url = f"data:{image.media_type};base64,{base64.b64encode(image.data).decode()}"
    return {"type": "input_image", "image_url": url, "detail": part.get("detail") or "auto"}


def _user_message(item: dict[str, Any]) -> Message:
    """A user message item: its text, and its images where they stand."""
    parts: list[ContentPart] = []
    for part in item.get("content") or []:
        if part.get("type") == "input_image":
            parts.append(images.from_url(part.get("image_url"), "input"))
        else:
            parts.append(TextPart(part.get("text") or part.get("refusal") or ""))
    return Message("user", joined(parts, [], ""))


def message_text(item: dict[str, Any]) -> str:
    return "".join(p.get("text") or p.get("refusal") or "" for p in item.get("content") or [])


def _output_text(output: Any) -> str:
    if isinstance(output, str):
        return output
    if isinstance(output, list):
        return "".join(p.get("text") or "" for p in output if isinstance(p, dict))
    return json.dumps(output)


def _reasoning_text(item: dict[str, Any]) -> str:
    parts = item.get("content") or item.get("summary") or []
    text = "".join(p.get("text") or "" for p in parts if isinstance(p, dict))
    if not text and isinstance(item.get("encrypted_content"), str):
        text = item["encrypted_content"]  # ours: the raw thinking, round-tripped
    return text


# reasoning.effort -> the chat template's thinking switch
_THINKING_OFF = {"none", "minimal"}


def to_request(body: ResponsesRequest, context: list[dict[str, Any]], tools: ToolSet) -> ModelRequest:
    """``context``: every item the model sees (the previous response's, then this input's)."""
    constraint = from_responses(body.text)
    system, messages = _conversation(body.instructions, context)
    count_images(messages, "input")
    if not messages and not system and constraint is None:
        unknown = sorted({str(item_type(item)) for item in context})
        raise APIError(400, "input holds nothing the model can read" + (f" (item types: {', '.join(unknown)})"
                                                                         if unknown else ""), param="input")
    template_kwargs = {}
    effort = (body.reasoning or {}).get("effort")
    if effort is not None:
        template_kwargs["enable_thinking"] = effort not in _THINKING_OFF
    template_kwargs.update(body.chat_template_kwargs or {})
    return ModelRequest(
        family=RESPONSES,
        model=body.model,
        messages=messages,
        system=system,
        tools=tools.tools,
        tool_choice=tools.tool_choice,
        parallel_tool_calls=tools.parallel,
        sampling=SamplingParams(temperature=body.temperature, top_p=body.top_p,
                                presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty),
        max_tokens=body.max_output_tokens,
        constraint=constraint,
        chat_template_kwargs=template_kwargs,
        prompt_cache_key=body.prompt_cache_key,
        **extensions(body.model_extra),
    )


def _conversation(instructions: str | None, items: list[dict[str, Any]]) -> tuple[list[str], list[Message]]:
    """(the system prompt's parts, the messages) of a conversation."""
    system: list[str] = [instructions] if instructions else []
    messages: list[Message] = []
    pending_reasoning = ""
    call_names: dict[str, str] = {}

    def assistant_turn() -> Message:
        """The assistant message to add to: the last one, if the turn is still going."""
        nonlocal pending_reasoning
        if messages and messages[-1].role == "assistant":
            message = messages[-1]
        else:
            message = text_message("assistant", "")
            messages.append(message)
        if pending_reasoning:
            message.reasoning += pending_reasoning
            pending_reasoning = ""
        return message

    for item in items:
        kind = item_type(item)
        if kind == "message":
            role, text = item["role"], message_text(item)
            if role in ("system", "developer"):
                system.append(text)
            elif role == "assistant":
                message = assistant_turn()
                message.content = [TextPart(message.text + text)]
            elif any(part.get("type") == "input_image" for part in item.get("content") or []):
                messages.append(_user_message(item))
            else:
                messages.append(text_message("user", text))
        elif kind in ("function_call", "custom_tool_call"):
            name = item.get("name") or ""
            if kind == "custom_tool_call":
                arguments: Any = {"input": item.get("input") or ""}
            else:
                arguments = item.get("arguments") or "{}"
            call_names[item["call_id"]] = name
            assistant_turn().tool_calls.append(ToolCall(item["call_id"], name, arguments))
        elif kind in ("function_call_output", "custom_tool_call_output"):
            call_id = item["call_id"]
            messages.append(Message("tool", [TextPart(_output_text(item.get("output")))], tool_call_id=call_id,
                                    name=call_names.get(call_id)))
        elif kind == "reasoning":
            pending_reasoning += _reasoning_text(item)
        elif kind == "compaction":
            # The summary stands where the history it replaces stood; why a user message: see
            # compaction_item.context_message.
            messages.append(compaction_item.context_message(item))
        elif kind in _IGNORED_ITEMS:
            log.debug("input item %s has no meaning for a local model; skipped", kind)
        else:
            log.info("unknown input item type %r; skipped", kind)
    if pending_reasoning:
        assistant_turn()
    return system, messages
