"""The Responses API: POST /v1/responses and /v1/responses/compact, and GET, DELETE, input_items
and cancel by id."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response

from gateway.api.errors import APIError
from gateway.api.family import RESPONSES
from gateway.api.generation import ClientDisconnected, bind_request_id, drain, with_heartbeats
from gateway.http.middleware import caller
from gateway.http.sse import event_stream, keepalive_interval
from gateway.responses import compaction
from gateway.responses.request import ResponsesRequest
from gateway.responses.service import ResponsesService, response_not_found

router = APIRouter()


def _service(request: Request) -> ResponsesService:
    service: ResponsesService = request.app.state.responses
    return service


def _owner(request: Request) -> str:
    return caller(request.scope)


@router.post("/v1/responses")
async def create_response(body: ResponsesRequest, request: Request) -> Response:
    service = _service(request)
    response_id = RESPONSES.new_id()
    trace_id = bind_request_id(request, response_id, body.model)
    run = await service.prepare(body, response_id, trace_id, owner=_owner(request))
    if body.background:
        await service.start_background(run)
        if body.stream:
            return event_stream(service.follow(run))
        return JSONResponse(run.state.to_dict())
    if body.stream:
        every = keepalive_interval(request)
        return event_stream(with_heartbeats(service.events(run), run.builder.heartbeat, every), every=every)
    try:
        await drain(service.events(run), run.builder, request)
    except ClientDisconnected:
        return Response(status_code=499)
    return JSONResponse(run.state.to_dict())


@router.post("/v1/responses/compact")
async def compact_response(body: compaction.CompactRequest, request: Request) -> Response:
    """Summarise a conversation into one ``compaction`` item (see responses/compaction.py)."""
    service = _service(request)
    response_id = RESPONSES.new_id()
    trace_id = bind_request_id(request, response_id, body.model)
    run = await service.prepare(compaction.compact_body(body), response_id, trace_id, owner=_owner(request))
    try:
        await drain(service.events(run), run.builder, request)
    except ClientDisconnected:
        return Response(status_code=499)
    return JSONResponse(compaction.compacted_response(run.state))


@router.get("/v1/responses/{response_id}")
async def get_response(
    response_id: str, request: Request, stream: bool = False, starting_after: int = -1
) -> Response:
    service, owner = _service(request), _owner(request)
    run = service.background_run(response_id, owner)
    if stream and run is not None:
        return event_stream(service.follow(run, starting_after))
    return JSONResponse(await service.retrieve(response_id, owner))


@router.delete("/v1/responses/{response_id}")
async def delete_response(response_id: str, request: Request) -> dict[str, Any]:
    service, owner = _service(request), _owner(request)
    if service.background_run(response_id, owner) is not None:
        await service.cancel(response_id, owner)
    if not await service.store.delete(response_id, owner):
        raise response_not_found(response_id)
    return {"id": response_id, "object": "response", "deleted": True}


@router.post("/v1/responses/{response_id}/cancel")
async def cancel_response(response_id: str, request: Request) -> dict[str, Any]:
    return await _service(request).cancel(response_id, _owner(request))


@router.get("/v1/responses/{response_id}/input_items")
async def list_input_items(
    response_id: str,
    request: Request,
    after: str | None = None,
    before: str | None = None,
    limit: int = Query(default=20, ge=1, le=100),
    order: Literal["asc", "desc"] = "desc",
) -> dict[str, Any]:
    service, owner = _service(request), _owner(request)
    run = service.background_run(response_id, owner)
    if run is not None:
        items = run.input_items
    else:
        stored = await service.store.get(response_id, owner)
        if stored is None:
            raise response_not_found(response_id)
        items = stored.input_items
    items = list(reversed(items)) if order == "desc" else list(items)
    ids = [item.get("id") for item in items]
    if after is not None:
        if after not in ids:
            raise APIError(400, f"No input item with id '{after}' in this response.", param="after")
        items = items[ids.index(after) + 1:]
    if before is not None:
        ids = [item.get("id") for item in items]
        if before not in ids:
            raise APIError(400, f"No input item with id '{before}' in this response.", param="before")
        items = items[: ids.index(before)]
    page = items[:limit]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0].get("id") if page else None,
        "last_id": page[-1].get("id") if page else None,
        "has_more": len(items) > limit,
    }
