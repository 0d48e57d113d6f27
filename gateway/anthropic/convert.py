"""An Anthropic Messages body -> the one internal request (``api/request.py``).

``to_request`` reads a ``MessagesRequest`` or a ``CountTokensRequest`` leniently:

- ``system`` (a string or text blocks; ``cache_control`` ignored) becomes ONE leading system
  message. Claude Code's ``x-anthropic-billing-header: cc_version=...`` block is left out: it
  is billing metadata that differs between conversations, and at the very front of the prompt
  it would keep every session from sharing the cached system prompt and tools (~10k tokens).
- ``system`` messages at the head of ``messages`` join it. A ``system`` message after a turn
  (Claude Code sends its environment block after the first user message) stays where it is,
  as user text in ``<system-reminder>`` tags (how Claude Code itself marks harness text in
  user turns), merged with the user turn around it. Moved into the leading system message it
  would be prefix-stable only until a later turn adds another one: then the first message
  changes and the whole cached prompt is lost. In place, a conversation that only grows
  renders a prompt that only grows. It is user text, not a system message, because many
  templates (Mistral, Gemma) refuse a system message anywhere but first.
- ``tool_use`` blocks become the assistant's ``tool_calls`` (ids kept); each ``tool_result``
  becomes a ``tool`` message right after the assistant turn that made the call, and the text
  of the same user message follows as a user message. ``is_error: true`` prefixes the result
  with "Error: " (templates have no field for it) unless it already says so, as Claude Code's
  ``<tool_use_error>`` results do.
- ``thinking`` blocks become the turn's ``reasoning_content``; with ``display: "omitted"`` the
  text is empty and read back from our signature (``signature.py``). ``redacted_thinking`` (and a
  signature that is not ours) carries nothing we can read: dropped.
- ``image`` blocks (base64; a URL only with ``gateway --allow-image-urls``) in user messages and in
  tool results become images of the user turn (a tool result's follow its results: chat templates
  take images in user turns); a text-only model refuses them (400). Documents that are not text
  are a 400. Every other
  block a local model cannot use (``server_tool_use``, ``web_search_tool_result``, ...) is
  skipped and logged. Consecutive messages of one role merge: templates want alternation.

Tools and ``tool_choice`` are read in ``tools.py``; ``thinking`` turns ``enable_thinking`` on
(``enabled``, ``adaptive``) or off (``disabled``) and, absent, leaves the template's default.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from gateway.anthropic.request import MessagesBody, MessagesRequest
from gateway.anthropic.signature import thinking_from_signature
from gateway.anthropic.tools import resolve_tools
from gateway.api import images
from gateway.api.errors import APIError
from gateway.api.family import MESSAGES
from gateway.api.images import ImagePart
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
from gateway.api.structured_output import from_messages
from gateway.http.json_body import quoted, shown
from protocol import SamplingParams

log = logging.getLogger(__name__)

_BILLING_PREFIX = "x-anthropic-billing-header:"
_ERROR_MARKS = ("error", "<tool_use_error>")


def to_request(body: MessagesBody, session: str | None = None) -> ModelRequest:
    """``session``: the conversation's id (Claude Code's session header), a prefix-cache hint."""
    images.check_parts(_image_blocks(body.messages), "messages")  # before any is read or fetched
    messages: list[Message] = []
    system = [_system_text(body.system, "system")]
    call_names: dict[str, str] = {}
    for index, message in enumerate(body.messages):
        if message.get("role") == "system" and not messages:  # before any turn: part of the system prompt
            system.append(_system_text(message.get("content"), f"messages.{index}.content"))
        else:
            _add_message(messages, message, f"messages.{index}", call_names)
    tools = resolve_tools(body.tools, body.tool_choice, body.messages)
    count_images(messages, "messages")
    kwargs = _template_switches(body.thinking)
    kwargs.update(body.chat_template_kwargs or {})
    if session is None and isinstance((body.metadata or {}).get("user_id"), str):
        session = (body.metadata or {})["user_id"]
    counting = not isinstance(body, MessagesRequest)  # count_tokens: nothing is generated
    return ModelRequest(
        family=MESSAGES,
        model=body.model,
        messages=messages,
        system=[text for text in system if text],
        tools=tools.tools,
        tool_choice=tools.tool_choice,
        parallel_tool_calls=tools.parallel,
        sampling=SamplingParams(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k),
        max_tokens=None if counting else body.max_tokens,  # type: ignore[attr-defined]
        stop=list(body.stop_sequences or []),
        constraint=from_messages(body.output_config, body.output_format),
        chat_template_kwargs=kwargs,
        prompt_cache_key=session,
        count_only=counting,
        **extensions(body.model_extra),
    )


def omits_thinking(body: MessagesBody) -> bool:
    """``thinking.display: "omitted"``: thinking travels only in the block's signature."""
    thinking = body.thinking
    return isinstance(thinking, dict) and thinking.get("type") in ("enabled", "adaptive") \
        and thinking.get("display") == "omitted"


# --- messages ---------------------------------------------------------------------


def _add_message(out: list[Message], message: dict[str, Any], where: str, call_names: dict[str, str]) -> None:
    role = message.get("role")
    if role not in ("user", "assistant", "system"):
        raise APIError(400, f"unknown message role {quoted(role)}", param=f"{where}.role")
    content = message.get("content")
    if isinstance(content, str):
        content = [{"type": "text", "text": content}]
    elif content is None:
        content = []
    elif not isinstance(content, list):
        raise APIError(400, "message content must be a string or a list of blocks", param=f"{where}.content")

    texts: list[str] = []
    parts: list[ContentPart] = []  # texts and images in order, for a message with images
    reasoning: list[str] = []
    calls: list[ToolCall] = []
    results: list[Message] = []
    for j, block in enumerate(content):
        at = f"{where}.content.{j}"
        if not isinstance(block, dict):
            raise APIError(400, "each content block must be an object", param=at)
        kind = block.get("type")
        if kind == "tool_use" and role == "assistant":
            calls.append(_tool_call(block, at, call_names))
        elif kind == "tool_result" and role == "user":
            results.append(_tool_result(block, at, call_names, parts))
        elif kind == "image" and role == "user":
            parts.append(_image(block, at))
        elif kind == "thinking" and role == "assistant":
            text = block.get("thinking") or thinking_from_signature(block.get("signature"))
            if isinstance(text, str) and text:
                reasoning.append(text)
        elif kind == "redacted_thinking":
            log.debug("redacted_thinking block carries nothing a local model can read; dropped")
        else:
            text = _block_text(block, at)
            if text:
                texts.append(text)
                parts.append(TextPart(text))

    if role == "assistant":
        _append(out, Message("assistant", [TextPart("\n\n".join(texts))], "\n\n".join(reasoning), calls))
        return
    for result in results:
        _append_tool(out, result)
    if any(isinstance(part, ImagePart) for part in parts):  # images (a user message's, or its tool results')
        _append(out, Message("user", joined(parts, [])))
    elif texts:
        text = "\n\n".join(texts)
        if role == "system":
            text = f"<system-reminder>\n{text}\n</system-reminder>"
        _append(out, text_message("user", text))


def _block_text(block: dict[str, Any], at: str) -> str:
    """The text of a block that reads as text; "" (and a log line) for one a model cannot use."""
    kind = block.get("type")
    if kind == "text":
        text = block.get("text")
        if not isinstance(text, str):
            raise APIError(400, "a text block needs text", param=f"{at}.text")
        return text
    if kind == "image":
        raise APIError(400, "image content is supported in user messages and tool results only", param=at)
    if kind == "document":
        return _document_text(block, at)
    if kind == "tool_reference":  # a ToolSearch result: the tool is now offered (see _referenced_tools)
        return f"Tool loaded: {block.get('tool_name')}"
    log.info("content block type %r has no meaning for a local model; skipped", kind)
    return ""


def _document_text(block: dict[str, Any], at: str) -> str:
    source = block.get("source")
    if not isinstance(source, dict):
        source = {}
    if source.get("type") == "text" and isinstance(source.get("data"), str):
        body = source["data"]
    elif source.get("type") == "content":
        inner = source.get("content")
        if isinstance(inner, str):
            body = inner
        elif isinstance(inner, list):
            body = "\n\n".join(_inner_texts(inner, f"{at}.source.content"))
        else:
            raise APIError(400, "a content document's source.content must be a string or a list of blocks",
                           param=f"{at}.source.content")
    else:
        raise APIError(400, f"document source {quoted(source.get('type'))} is not supported: this model reads text only",
                       param=at)
    title = block.get("title")
    return f"{title}\n\n{body}" if isinstance(title, str) and title else body


def _inner_texts(blocks: list[Any], at: str) -> list[str]:
    """The text of each block inside a document or a tool result (each must be an object)."""
    texts = []
    for k, block in enumerate(blocks):
        if not isinstance(block, dict):
            raise APIError(400, "each content block must be an object", param=f"{at}.{k}")
        texts.append(_block_text(block, f"{at}.{k}"))
    return texts


def _tool_call(block: dict[str, Any], at: str, call_names: dict[str, str]) -> ToolCall:
    call_id, name = block.get("id"), block.get("name")
    if not isinstance(call_id, str) or not call_id:
        raise APIError(400, "a tool_use block needs an id", param=f"{at}.id")
    if not isinstance(name, str) or not name:
        raise APIError(400, "a tool_use block needs a name", param=f"{at}.name")
    call_names[call_id] = name
    arguments = json.dumps(block.get("input") or {}, ensure_ascii=False)
    return ToolCall(call_id, name, arguments)


def _image_blocks(messages: list[Any]) -> int:
    """The image blocks of the messages, and of their tool results."""
    count = 0
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        for block in content if isinstance(content, list) else ():
            if not isinstance(block, dict):
                continue
            if block.get("type") == "image":
                count += 1
            elif block.get("type") == "tool_result" and isinstance(block.get("content"), list):
                count += sum(1 for inner in block["content"] if isinstance(inner, dict) and inner.get("type") == "image")
    return count


def _image(block: dict[str, Any], at: str) -> ImagePart:
    """An ``image`` block: ``source`` base64 (``media_type``, ``data``), or a URL (``--allow-image-urls``)."""
    source = block.get("source")
    if not isinstance(source, dict):
        raise APIError(400, "an image block needs a source", param=f"{at}.source")
    kind = source.get("type")
    if kind == "base64":
        return images.from_base64(source.get("data"), source.get("media_type"), f"{at}.source.data")
    if kind == "url":
        return images.from_url(source.get("url"), f"{at}.source.url")
    raise APIError(400, f"image source type {quoted(kind)} is not supported: send base64 data", param=f"{at}.source")


def _tool_result(block: dict[str, Any], at: str, call_names: dict[str, str],
                 image_parts: list[ContentPart] | None = None) -> Message:
    """``image_parts``: where the result's images go (they follow the results, in the user message:
    chat templates take images in user turns)."""
    call_id = block.get("tool_use_id")
    if not isinstance(call_id, str) or not call_id:
        raise APIError(400, "a tool_result block needs a tool_use_id", param=f"{at}.tool_use_id")
    if call_id not in call_names:  # Anthropic's words
        raise APIError(400, f"{at}: unexpected `tool_use_id` found in `tool_result` blocks: {shown(call_id)}. Each "
                       "`tool_result` block must have a corresponding `tool_use` block in the previous message.")
    content = block.get("content")
    if isinstance(content, str):
        text = content
    elif isinstance(content, list):
        if image_parts is not None:
            for k, inner in enumerate(content):
                if isinstance(inner, dict) and inner.get("type") == "image":
                    image_parts.append(_image(inner, f"{at}.content.{k}"))
            content = [inner for inner in content if not (isinstance(inner, dict) and inner.get("type") == "image")]
        text = "\n\n".join(p for p in _inner_texts(content, f"{at}.content") if p)
    else:
        text = "" if content is None else json.dumps(content, ensure_ascii=False)
    if block.get("is_error") and not text.lstrip().lower().startswith(_ERROR_MARKS):
        text = f"Error: {text}" if text else "Error"
    return Message("tool", [TextPart(text)], tool_call_id=call_id, name=call_names.get(call_id))


def _append(out: list[Message], message: Message) -> None:
    """Add a user or assistant message, merged into the last one if it has the same role."""
    last = out[-1] if out else None
    if last is None or last.role != message.role:
        out.append(message)
        return
    if last.images or message.images:
        last.content = joined(last.content, message.content)
    else:
        last.content = [TextPart("\n\n".join(text for text in (last.text, message.text) if text))]
    last.reasoning = "\n\n".join(text for text in (last.reasoning, message.reasoning) if text)
    last.tool_calls.extend(message.tool_calls)


def _append_tool(out: list[Message], message: Message) -> None:
    """A tool result goes right after the assistant turn (and results) it answers, before any
    user text in between (a system message placed between a call and its result)."""
    at = len(out)
    while at > 0 and out[at - 1].role == "user":
        at -= 1
    if at > 0 and out[at - 1].role in ("assistant", "tool"):
        out.insert(at, message)
    else:
        out.append(message)


def _system_text(system: Any, where: str) -> str:
    if isinstance(system, str) or system is None:
        return system or ""
    if not isinstance(system, list):
        raise APIError(400, "system must be a string or a list of text blocks", param=where)
    texts = []
    for j, block in enumerate(system):
        if not isinstance(block, dict):
            raise APIError(400, "each content block must be an object", param=f"{where}.{j}")
        text = _block_text(block, f"{where}.{j}")
        if text and not text.startswith(_BILLING_PREFIX):
            texts.append(text)
    return "\n\n".join(texts)


# --- thinking -----------------------------------------------------------------------


def _template_switches(thinking: dict[str, Any] | None) -> dict[str, Any]:
    """The template's thinking switch. ``budget_tokens`` is not enforced: the worker has no
    thinking budget; ``max_tokens`` still bounds thinking and answer together."""
    if not isinstance(thinking, dict):
        return {}
    kind = thinking.get("type")
    if kind in ("enabled", "adaptive"):
        return {"enable_thinking": True}
    if kind == "disabled":
        return {"enable_thinking": False}
    log.info("thinking type %r is unknown; the template's default applies", kind)
    return {}
