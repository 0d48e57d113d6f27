"""Structured output: each API's way of asking for JSON, as the one ``constraint`` the worker takes.

The worker constrains decoding to it (``worker/constraints.py``), so the reply always parses and
matches the schema; a schema it cannot apply is a 400 naming this field, before any generation.
What each API sends:

- Responses ``text.format``: ``{"type": "json_schema", "name", "schema", "strict"}`` or
  ``{"type": "json_object"}`` (``"text"``: free).
- Chat Completions ``response_format``: ``{"type": "json_schema", "json_schema": {"name",
  "schema", "strict"}}`` or ``{"type": "json_object"}``.
- Messages ``output_config.format`` (and the beta's ``output_format``):
  ``{"type": "json_schema", "schema"}``.

``strict: false`` is constrained too: a schema is a schema. The model is also told, in one
line, what to write (a grammar decides the form; the model still has to pick the values).
"""

from __future__ import annotations

import json
from typing import Any

from gateway.api.errors import APIError
from gateway.api.json_schema import tool_schema
from gateway.http.json_body import quoted

OBJECT: dict[str, Any] = {"type": "object"}


def from_responses(text: Any) -> dict[str, Any] | None:
    """Responses ``text.format`` -> the worker's constraint (None: free text)."""
    if text is None:
        return None
    if not isinstance(text, dict):
        raise APIError(400, "text must be an object", param="text")
    fmt = text.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise APIError(400, "text.format must be an object", param="text.format")
    return _constraint(fmt.get("type"), fmt.get("schema"), "text.format")


def from_chat(response_format: Any) -> dict[str, Any] | None:
    """Chat Completions ``response_format`` -> the worker's constraint (None: free text)."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise APIError(400, "response_format must be an object", param="response_format")
    kind = response_format.get("type")
    schema = None
    if kind == "json_schema":
        inner = response_format.get("json_schema")
        if not isinstance(inner, dict):
            raise APIError(400, "a json_schema response_format needs json_schema: {name, schema}",
                           param="response_format.json_schema")
        schema = inner.get("schema")
        if schema is None:  # OpenAI accepts a missing schema: any JSON object then
            schema = OBJECT
    return _constraint(kind, schema, "response_format", "response_format.json_schema.schema")


def from_messages(output_config: Any, output_format: Any) -> dict[str, Any] | None:
    """Messages ``output_config.format`` (or the beta's ``output_format``) -> the constraint."""
    fmt, param = output_format, "output_format"
    if isinstance(output_config, dict) and output_config.get("format") is not None:
        fmt, param = output_config["format"], "output_config.format"
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise APIError(400, f"{param} must be an object", param=param)
    if fmt.get("type") != "json_schema":
        raise APIError(400, f"{param}.type must be 'json_schema'", param=f"{param}.type")
    return _constraint("json_schema", fmt.get("schema"), param)


def _constraint(kind: Any, schema: Any, param: str, schema_param: str | None = None) -> dict[str, Any] | None:
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        if not isinstance(schema, dict):
            raise APIError(400, "a json_schema format needs a schema (a JSON Schema object)",
                           param=schema_param or f"{param}.schema")
        return {"type": "json_schema", "schema": tool_schema(schema, schema_param or f"{param}.schema")}
    raise APIError(400, f"unsupported format type {quoted(kind)}: use 'text', 'json_schema' or 'json_object'",
                   param=f"{param}.type")


def instruction(constraint: dict[str, Any] | None) -> str | None:
    """One line for the model: the grammar fixes the form, the model still picks the values."""
    if constraint is None:
        return None
    if constraint["type"] == "json_schema":
        schema = json.dumps(constraint["schema"], ensure_ascii=False, separators=(",", ":"))
        return f"Respond with only a JSON object that matches this JSON schema: {schema}"
    if constraint["type"] == "json_object":
        return "Respond with only a valid JSON object."
    return None
