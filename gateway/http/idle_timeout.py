"""uvicorn's HTTP/1.1 protocol, with an idle timeout from the moment a connection opens.

uvicorn arms its keep-alive timeout only after a response, so a client that connects and
never sends a request holds its socket forever (300 such sockets were all still open after
20 s). Here the same timer also runs from the connection's first moment; uvicorn cancels it
as soon as request bytes arrive, as it does between keep-alive requests.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.h11_impl import H11Protocol


class IdleTimeoutH11Protocol(H11Protocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)
