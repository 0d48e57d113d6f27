"""The Embeddings API's request body, and its conversion to the worker's Embed.

OpenAI's fields: ``model``, ``input`` (a string, a list of strings, a list of token ids, or a
list of token-id lists), ``encoding_format`` (``float``, the default, or ``base64``: each
vector's little-endian float32 bytes), ``dimensions`` (shorter vectors, for models trained for
it) and ``user`` (accepted, unused). One field of ours: ``truncate`` (default false): an input
over the model's window is cut to it instead of refused with a 400. Unknown fields are ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from gateway.api.errors import APIError
from gateway.http.json_body import OptionalInteger
from protocol.messages import Embed

MAX_INPUTS = 2048  # inputs in one request, as OpenAI's API allows
MAX_DIMENSIONS = 1 << 16


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    model: str
    input: Any  # checked by ``inputs`` below, with messages that name what is wrong
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: OptionalInteger = Field(default=None, ge=1, le=MAX_DIMENSIONS)
    user: str | None = None
    truncate: bool = False


def inputs(body: EmbeddingRequest) -> tuple[list[str] | None, list[list[int]] | None]:
    """(texts, token lists): exactly one is set. Raises APIError (400, ``param`` ``input``)."""
    value = body.input
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise _bad("input must be a string, an array of strings, an array of token ids, or an array of "
                   "arrays of token ids")
    if not value:
        raise _bad("input must not be empty")
    if len(value) > MAX_INPUTS:
        raise _bad(f"input has {len(value)} items; at most {MAX_INPUTS} are allowed in one request")
    if all(isinstance(item, str) for item in value):
        for index, text in enumerate(value):
            if not text:
                raise _bad(f"input[{index}] is an empty string" if len(value) > 1 else "input must not be an empty string")
        return list(value), None
    if all(_is_token(item) for item in value):
        return None, [list(value)]
    if all(isinstance(item, list) for item in value):
        for index, tokens in enumerate(value):
            if not tokens:
                raise _bad(f"input[{index}] is an empty array of token ids")
            if not all(_is_token(t) for t in tokens):
                raise _bad(f"input[{index}] must hold token ids (integers of 0 or more) only")
        return None, [list(tokens) for tokens in value]
    raise _bad("input must be a string, an array of strings, an array of token ids, or an array of arrays of token "
               "ids, not a mix of them")


def to_embed(body: EmbeddingRequest, request_id: str, trace_id: str | None) -> Embed:
    texts, tokens = inputs(body)
    return Embed(request_id, texts=texts, tokens=tokens, dimensions=body.dimensions, truncate=body.truncate,
                 trace_id=trace_id)


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 31


def _bad(message: str) -> APIError:
    return APIError(400, message, param="input")
