"""The SSE sender: keep-alives through long silences (a long prefill), in each API's own form."""

from __future__ import annotations

import asyncio

import httpx
from starlette.applications import Starlette
from starlette.routing import Route

from gateway.anthropic.routes import PING
from gateway.http.sse import SSE_COMMENT, EventStreamResponse, sse_event


def body_with_keepalive(keepalive: bytes) -> bytes:
    async def slow():
        yield sse_event({"type": "first"})
        await asyncio.sleep(0.5)  # silence: keep-alives go out meanwhile
        yield sse_event({"type": "last"})

    async def endpoint(request):
        return EventStreamResponse(slow(), keepalive_s=0.1, keepalive=keepalive)

    async def fetch() -> bytes:
        app = Starlette(routes=[Route("/", endpoint)])
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return (await client.get("/")).content

    return asyncio.run(fetch())


def test_silences_get_comment_lines_by_default():
    body = body_with_keepalive(SSE_COMMENT)
    first, rest = body.split(b"event: first", 1)
    assert first == b"" and rest.count(SSE_COMMENT) >= 2 and rest.endswith(sse_event({"type": "last"}))


def test_the_messages_api_gets_ping_events():
    body = body_with_keepalive(PING)
    assert body.count(b'event: ping\ndata: {"type":"ping"}\n\n') >= 2 and SSE_COMMENT not in body
