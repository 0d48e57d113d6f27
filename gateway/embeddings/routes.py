"""POST /v1/embeddings: OpenAI's Embeddings API.

The reply is OpenAI's: ``{"object": "list", "data": [{"object": "embedding", "index", "embedding"}],
"model", "usage": {"prompt_tokens", "total_tokens"}}``, each ``embedding`` a list of floats or,
with ``encoding_format: "base64"``, the base64 of its little-endian float32 bytes. Requests that
reach a worker together are embedded together (worker/embeddings.py). Errors have OpenAI's shape
and are never 500s for a bad request: an empty or malformed ``input``, too many inputs, an input
over the model's window (unless ``truncate``), a ``dimensions`` the model cannot give, a text model.
"""

from __future__ import annotations

import base64
import struct
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from gateway.api.errors import APIError, EngineError
from gateway.api.family import ApiFamily
from gateway.api.generation import bind_request_id, engine
from gateway.embeddings.request import EmbeddingRequest, to_embed
from gateway.engine.client import EngineClient, WrongModelKind
from protocol.messages import ERROR_INVALID_REQUEST, Embeddings

router = APIRouter()

EMBEDDINGS = ApiFamily("embeddings", "/v1/embeddings", "input", None, "openai", "emb")


@router.post("/v1/embeddings")
async def create_embeddings(body: EmbeddingRequest, request: Request) -> JSONResponse:
    request_id = EMBEDDINGS.new_id()
    trace_id = bind_request_id(request, request_id, body.model)
    embed = to_embed(body, request_id, trace_id)
    client = engine(request)
    _check_model(client, body.model, body.dimensions)
    try:
        reply = await client.embed(body.model, embed)
    except WrongModelKind as exc:
        raise _wrong_kind(exc.message) from None
    except EngineError as exc:
        error = EMBEDDINGS.error(exc)
        if exc.code == ERROR_INVALID_REQUEST and "dimensions" in exc.message:
            error.param = "dimensions"
        raise error from None
    # Off the event loop: 2048 vectors of 1024 floats take seconds to build and serialize.
    return await run_in_threadpool(_json_reply, reply, body.model, body.encoding_format)


def _json_reply(reply: Embeddings, model: str, encoding_format: str) -> JSONResponse:
    return JSONResponse(reply_body(reply, model, encoding_format))  # serialized here


def reply_body(reply: Embeddings, model: str, encoding_format: str) -> dict[str, Any]:
    """OpenAI's reply; ``reply.vectors`` holds little-endian float32s, as base64 sends them."""
    size = reply.dimensions * 4
    unpack = struct.Struct(f"<{reply.dimensions}f").unpack
    data: list[dict[str, Any]] = []
    for index in range(len(reply.vectors) // size if size else 0):
        vector = reply.vectors[index * size:(index + 1) * size]
        embedding: list[float] | str = (base64.b64encode(vector).decode("ascii") if encoding_format == "base64"
                                        else list(unpack(vector)))
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    usage = {"prompt_tokens": reply.prompt_tokens, "total_tokens": reply.prompt_tokens}
    return {"object": "list", "data": data, "model": model, "usage": usage}


def _check_model(client: EngineClient, model: str, dimensions: int | None) -> None:
    """What the gateway knows of the model's live workers refuses a request at once: a text model,
    or a ``dimensions`` its vectors cannot have (a model loaded on demand is checked by its worker)."""
    served = client.resolve(model)
    workers = [w for w in client.registry.all() if w.model == served and w.serving]
    if not workers:
        return
    embedding = [w for w in workers if w.kind == "embedding"]
    if not embedding:
        raise _wrong_kind(f"'{model}' is a text-generation model, not an embedding model: it cannot serve "
                          "/v1/embeddings")
    if dimensions is None:
        return
    size = min(w.embedding_size for w in embedding)
    if dimensions > size:
        raise APIError(400, f"dimensions must be at most {size} for '{model}'", param="dimensions")
    if dimensions != size and not all(w.matryoshka for w in embedding):
        raise APIError(400, f"'{model}' does not support dimensions: its vectors have {size} dimensions "
                            "(only models trained for shorter vectors, such as Qwen3-Embedding, do)",
                       param="dimensions")


def _wrong_kind(message: str) -> APIError:
    return APIError(400, message, param="model", code="model_not_supported")
