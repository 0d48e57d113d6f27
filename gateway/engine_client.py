"""The gateway's side of the ZeroMQ link: one ROUTER socket that every worker connects to.

``EngineClient.submit`` sends a Generate to the least-loaded live worker of a model and
returns a ``RequestStream`` of that request's Delta messages, ended by Finished or by a
``RequestFailed`` error. A background task reads every frame from the workers and routes
it to its stream; another sends heartbeats and declares silent workers dead, failing
their in-flight requests so no client waits on a worker that is gone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import zmq
import zmq.asyncio

from gateway.registry import WorkerInfo, WorkerRegistry
from protocol import (
    PROTOCOL_VERSION,
    Accepted,
    Cancel,
    Delta,
    Error,
    Finished,
    Generate,
    Heartbeat,
    Message,
    Output,
    ProtocolError,
    Ready,
    decode,
    encode,
)
from protocol.messages import ERROR_SHUTTING_DOWN, ERROR_WORKER_CRASHED
from protocol.transport import HEARTBEAT_INTERVAL_S, HEARTBEAT_MISSES_ALLOWED

log = logging.getLogger(__name__)


class NoWorker(LookupError):
    """No live worker serves the requested model."""


class RequestFailed(Exception):
    def __init__(self, error: Error):
        super().__init__(error.message)
        self.error = error


class RequestStream:
    """The events of one request, in the order its worker produced them."""

    def __init__(self, client: EngineClient, request_id: str, worker: WorkerInfo):
        self.request_id = request_id
        self.worker = worker
        self.prompt_tokens = 0
        self.finished: Finished | None = None
        self._client = client
        self._queue: asyncio.Queue[Message] = asyncio.Queue()
        self._closed = False

    def deliver(self, message: Message) -> None:
        self._queue.put_nowait(message)

    async def wait_accepted(self) -> None:
        message = await self._queue.get()
        if isinstance(message, Error):
            self._closed = True
            raise RequestFailed(message)
        if not isinstance(message, Accepted):
            raise RuntimeError(f"expected Accepted, got {type(message).__name__}")
        self.prompt_tokens = message.prompt_tokens

    async def __aiter__(self) -> AsyncIterator[Delta]:
        while self.finished is None:
            message = await self._queue.get()
            if isinstance(message, Delta):
                yield message
            elif isinstance(message, Finished):
                self.finished = message
                self._closed = True
            elif isinstance(message, Error):
                self._closed = True
                raise RequestFailed(message)

    def close(self) -> None:
        """Stop the request if it is still running (client gone, or the route failed)."""
        if not self._closed:
            self._closed = True
            self._client.cancel(self)


class EngineClient:
    def __init__(
        self,
        address: str,
        heartbeat_interval: float = HEARTBEAT_INTERVAL_S,
        misses_allowed: int = HEARTBEAT_MISSES_ALLOWED,
    ):
        self.address = address
        self.registry = WorkerRegistry()
        self._heartbeat_interval = heartbeat_interval
        self._dead_after = heartbeat_interval * misses_allowed
        self._streams: dict[str, RequestStream] = {}
        self._context = zmq.asyncio.Context()
        self._router = self._context.socket(zmq.ROUTER)
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        self._router.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a reconnecting worker keeps its identity
        self._router.setsockopt(zmq.LINGER, 0)
        self._router.bind(self.address)
        self._tasks = [
            asyncio.create_task(self._receive_loop(), name="zmq-receive"),
            asyncio.create_task(self._heartbeat_loop(), name="zmq-heartbeat"),
        ]
        log.info("listening for workers on %s", self.address)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for stream in list(self._streams.values()):
            stream.deliver(Error(ERROR_SHUTTING_DOWN, "the gateway is shutting down", stream.request_id))
        self._router.close(linger=0)
        self._context.term()

    def context_length(self, model: str) -> int | None:
        worker = self.registry.pick(model)
        return worker.context_length if worker else None

    def open(self, model: str, request: Generate) -> RequestStream:
        """Send ``request`` to the least-loaded worker of ``model``."""
        worker = self.registry.pick(model)
        if worker is None:
            raise NoWorker(model)
        stream = RequestStream(self, request.request_id, worker)
        self._streams[request.request_id] = stream
        worker.in_flight.add(request.request_id)
        self._send(worker.identity, request)
        return stream

    async def submit(self, model: str, request: Generate) -> RequestStream:
        """``open``, then wait until the worker accepted the request (or raise its error)."""
        stream = self.open(model, request)
        try:
            await stream.wait_accepted()
        except BaseException:
            stream.close()
            raise
        return stream

    def cancel(self, stream: RequestStream) -> None:
        self._send(stream.worker.identity, Cancel(stream.request_id))
        self._forget(stream)

    def _forget(self, stream: RequestStream) -> None:
        self._streams.pop(stream.request_id, None)
        stream.worker.in_flight.discard(stream.request_id)

    def _send(self, identity: bytes, message: Message) -> None:
        # ROUTER sends never block (frames to a vanished peer are dropped), so this is safe to
        # call from anywhere on the loop, including from a cancelled task's cleanup.
        future = self._router.send_multipart([identity, encode(message)], flags=zmq.NOBLOCK)
        future.add_done_callback(_log_send_failure)

    async def _receive_loop(self) -> None:
        while True:
            frames = await self._router.recv_multipart()
            if len(frames) != 2:
                log.warning("dropped a message of %d frames", len(frames))
                continue
            identity, frame = frames
            try:
                message = decode(frame)
            except ProtocolError as exc:
                log.warning("dropped a bad frame from %r: %s", identity, exc)
                continue
            try:
                self._dispatch(identity, message)
            except Exception:  # one bad message must not stop the loop that serves everyone
                log.exception("failed to handle %s from %r", type(message).__name__, identity)

    def _dispatch(self, identity: bytes, message: Message) -> None:
        if isinstance(message, Ready):
            self._register(identity, message)
            return
        worker = self.registry.get(identity)
        if worker is None:
            return  # not registered (yet, or any more): it will send Ready again
        worker.last_seen = time.monotonic()
        if isinstance(message, Heartbeat):
            worker.active, worker.queued = message.active, message.queued
        elif isinstance(message, Output):
            for delta in message.deltas:
                stream = self._streams.get(delta.request_id)
                if stream is not None:
                    stream.deliver(delta)
        elif isinstance(message, (Accepted, Finished, Error)):
            if message.request_id is None:
                log.error("worker %s reports: %s (%s)", worker.worker_id, message.message, message.code)
                return
            stream = self._streams.get(message.request_id)
            if stream is None:
                return
            stream.deliver(message)
            if not isinstance(message, Accepted):
                self._forget(stream)

    def _register(self, identity: bytes, ready: Ready) -> None:
        if ready.protocol_version != PROTOCOL_VERSION:
            log.error("worker %r speaks protocol %d, not %d: ignored", identity, ready.protocol_version, PROTOCOL_VERSION)
            return
        known = self.registry.get(identity) is not None
        worker = self.registry.register(identity, ready)
        self._send(identity, Heartbeat("gateway"))
        if not known:
            log.info("worker %s registered: model %s, pid %d, context %d, %d sequences",
                     worker.worker_id, worker.model, worker.pid, worker.context_length, worker.max_sequences)

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self._heartbeat_interval)
            for worker in self.registry.stale(self._dead_after):
                self._declare_dead(worker)
            for worker in self.registry.all():
                self._send(worker.identity, Heartbeat("gateway"))

    def _declare_dead(self, worker: WorkerInfo) -> None:
        self.registry.remove(worker.identity)
        log.warning("worker %s (model %s, pid %d) stopped responding; failing %d requests",
                    worker.worker_id, worker.model, worker.pid, len(worker.in_flight))
        for request_id in list(worker.in_flight):
            stream = self._streams.pop(request_id, None)
            if stream is not None:
                message = f"the worker serving model '{worker.model}' stopped responding"
                stream.deliver(Error(ERROR_WORKER_CRASHED, message, request_id))
        worker.in_flight.clear()


def _log_send_failure(future: asyncio.Future) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("send to a worker failed: %s", future.exception())
