"""Tool schemas clients send: checked to be JSON Schema before a model ever sees them.

A tool whose ``parameters`` is not a valid schema is a client's mistake that would otherwise
surface as a confused model or a template error; OpenAI answers it with a 400 naming the
field, and so do we. Bodies nest at most 64 levels (``http/json_body.py``), so a schema never
recurses the checker past Python's limit; a RecursionError is a 400 here all the same.
"""

from __future__ import annotations

from typing import Any

from jsonschema import SchemaError
from jsonschema.validators import validator_for

from gateway.api.errors import APIError

EMPTY_OBJECT: dict[str, Any] = {"type": "object", "properties": {}}


def tool_schema(schema: Any, param: str) -> dict[str, Any]:
    """``schema`` if it is a JSON Schema object (an empty object schema when absent); else a 400."""
    if schema is None:
        return dict(EMPTY_OBJECT)
    if not isinstance(schema, dict):
        raise APIError(400, "a tool's schema must be a JSON Schema object", param=param)
    try:
        validator_for(schema).check_schema(schema)
    except SchemaError as exc:
        where = "/".join(str(part) for part in exc.path)
        raise APIError(400, f"invalid JSON Schema{f' at {where}' if where else ''}: {exc.message}",
                       param=param) from None
    except RecursionError:
        raise APIError(400, "the JSON Schema nests too deeply to be checked", param=param) from None
    return schema
