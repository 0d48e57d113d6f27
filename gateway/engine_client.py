"""The gateway's side of the ZeroMQ link: one ROUTER socket that every worker connects to.

``EngineClient.open`` sends a Generate to the least-loaded live worker of a model and
returns a ``RequestStream`` of that request's messages (Accepted, Deltas, then Finished, or
a ``RequestFailed``). Background tasks route every frame from the workers to its stream,
send heartbeats, and notice dead workers two ways: at once when a worker's connection drops
(a crash), and after missed heartbeats (a hang). A request whose worker died before it
produced any output is sent to another worker of its model, or waits for the restarted one;
otherwise it fails with ``worker_crashed``. No client waits on a worker that is gone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Protocol

import zmq
import zmq.asyncio
from zmq.auth.asyncio import AsyncioAuthenticator
from zmq.utils.monitor import parse_monitor_message

from gateway.registry import DRAINING, WorkerInfo, WorkerRegistry
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
from protocol.security import CurveServer
from protocol.transport import HEARTBEAT_INTERVAL_S, HEARTBEAT_MISSES_ALLOWED

log = logging.getLogger(__name__)

# Error codes the gateway itself gives (beside the workers' in protocol.messages).
ERROR_NO_WORKER = "no_worker"  # a known model has no live worker, and none came in time
ERROR_GATEWAY_SHUTTING_DOWN = "gateway_shutting_down"
ERROR_QUEUE_FULL = "rate_limit_exceeded"  # OpenAI's code, which clients retry on


class NoWorker(LookupError):
    """The model has never had a worker here (an unknown model)."""


class Overloaded(Exception):
    """The model's queue is full."""

    def __init__(self, model: str, limit: int):
        super().__init__(f"model '{model}' has {limit} requests queued or running; try again shortly")


class RequestFailed(Exception):
    def __init__(self, error: Error):
        super().__init__(error.message)
        self.error = error


class Observer(Protocol):
    """Where token timings and worker changes are reported (gateway.metrics.GatewayMetrics)."""

    def first_token(self, model: str, seconds: float) -> None: ...
    def tokens(self, model: str, count: int, seconds_since_previous: float | None) -> None: ...
    def worker_registered(self, model: str) -> None: ...
    def worker_lost(self, model: str, reason: str) -> None: ...


class _NoObserver:
    def first_token(self, model: str, seconds: float) -> None:
        pass

    def tokens(self, model: str, count: int, seconds_since_previous: float | None) -> None:
        pass

    def worker_registered(self, model: str) -> None:
        pass

    def worker_lost(self, model: str, reason: str) -> None:
        pass


class RequestStream:
    """The events of one request, in the order its worker produced them."""

    def __init__(self, client: EngineClient, request: Generate, model: str):
        self.request = request
        self.model = model
        self._opened_at = time.monotonic()
        self._last_output_at: float | None = None
        self.worker: WorkerInfo | None = None
        self.prompt_tokens = 0
        self.finished: Finished | None = None
        self._client = client
        self._queue: asyncio.Queue[Message] = asyncio.Queue()
        self._closed = False

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def produced_output(self) -> bool:
        """Once true, a worker death can no longer be hidden by a retry."""
        return self._last_output_at is not None

    def deliver(self, message: Message) -> None:
        if isinstance(message, Delta):
            now = time.monotonic()
            observer = self._client.observer
            if self._last_output_at is None:
                observer.first_token(self.model, now - self._opened_at)
                observer.tokens(self.model, message.token_count, None)
            else:
                observer.tokens(self.model, message.token_count, now - self._last_output_at)
            self._last_output_at = now
        self._queue.put_nowait(message)

    async def wait_accepted(self) -> None:
        while True:
            message = await self._queue.get()
            if isinstance(message, Error):
                self._closed = True
                raise RequestFailed(message)
            if isinstance(message, Accepted):
                self.prompt_tokens = message.prompt_tokens
                return

    async def batches(self) -> AsyncIterator[list[Delta]]:
        """The deltas, in lists of whatever arrived together: a client that falls behind (or a
        busy gateway) gets them in fewer, larger writes. Ends at Finished; raises on an Error."""
        while self.finished is None:
            messages = [await self._queue.get()]
            while not self._queue.empty():
                messages.append(self._queue.get_nowait())
            deltas: list[Delta] = []
            for message in messages:
                if isinstance(message, Delta):
                    deltas.append(message)
                elif isinstance(message, Finished):
                    self.finished = message
                    self._closed = True
                    break
                elif isinstance(message, Error):
                    self._closed = True
                    if deltas:
                        yield deltas
                    raise RequestFailed(message)
                # An Accepted here comes from a retry on another worker: nothing to do.
            if deltas:
                yield deltas

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
        queue_timeout: float = 30.0,
        max_queue: int = 64,
        curve: CurveServer | None = None,
    ):
        self.address = address
        self.curve = curve
        self.observer: Observer = _NoObserver()  # the app puts its metrics here
        self.registry = WorkerRegistry()
        self.queue_timeout = queue_timeout
        self.max_queue = max_queue  # per model, beyond what its workers decode at once
        self._heartbeat_interval = heartbeat_interval
        self._dead_after = heartbeat_interval * misses_allowed
        self._streams: dict[str, RequestStream] = {}
        self._context = zmq.asyncio.Context()
        self._router = self._context.socket(zmq.ROUTER)
        self._authenticator: AsyncioAuthenticator | None = None
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        self._router.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a reconnecting worker keeps its identity
        self._router.setsockopt(zmq.LINGER, 0)
        if self.curve is not None:
            # ZeroMQ asks this authenticator (ZAP) about every CURVE handshake.
            self._authenticator = AsyncioAuthenticator(self._context)
            self._authenticator.start()
            self._authenticator.configure_curve(domain="*", location=str(self.curve.authorized_dir))
            self.curve.apply(self._router)
        monitor = self._router.get_monitor_socket(
            zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)
        self._router.bind(self.address)
        self._tasks = [
            asyncio.create_task(self._receive_loop(), name="zmq-receive"),
            asyncio.create_task(self._heartbeat_loop(), name="zmq-heartbeat"),
            asyncio.create_task(self._monitor_loop(monitor), name="zmq-monitor"),
        ]
        log.info("listening for workers on %s", self.address)

    def fail_all(self, code: str, message: str) -> None:
        """End every open request now (the gateway is stopping): each gets a terminal error."""
        for stream in list(self._streams.values()):
            stream.deliver(Error(code, message, stream.request_id))
            self._forget(stream)

    async def close(self) -> None:
        self.fail_all(ERROR_GATEWAY_SHUTTING_DOWN, "the gateway is shutting down")
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._router.disable_monitor()
        self._router.close(linger=0)
        if self._authenticator is not None:
            self._authenticator.stop()
        self._context.term()

    def load(self, model: str) -> int:
        """Requests of ``model`` running, queued in workers, or waiting for a worker."""
        return sum(1 for s in self._streams.values() if s.model == model)

    def waiting_for_worker(self, model: str) -> int:
        return sum(1 for s in self._streams.values() if s.model == model and s.worker is None)

    def models_with_requests(self) -> set[str]:
        return {s.model for s in self._streams.values()}

    def admit(self, model: str) -> None:
        """Raise NoWorker for a model never served here, Overloaded when its queue is full."""
        if not self.registry.is_known(model):
            raise NoWorker(model)
        limit = self.registry.capacity(model) + self.max_queue
        if self.load(model) >= limit:
            raise Overloaded(model, limit)

    async def open(self, model: str, request: Generate) -> RequestStream:
        """Send ``request`` to the least-loaded worker of ``model``.

        Waits up to ``queue_timeout`` for a worker when the model is known but has none live
        (a restart); raises NoWorker for a model never served here, Overloaded past the queue.
        """
        self.admit(model)
        stream = RequestStream(self, request, model)
        self._streams[request.request_id] = stream
        try:
            await self._dispatch_to_worker(stream)
        except BaseException:
            self._forget(stream)
            raise
        return stream

    async def submit(self, model: str, request: Generate) -> RequestStream:
        """``open``, then wait until the worker accepted the request (or raise its error)."""
        stream = await self.open(model, request)
        try:
            await stream.wait_accepted()
        except BaseException:
            stream.close()
            raise
        return stream

    async def _dispatch_to_worker(self, stream: RequestStream) -> None:
        worker = self.registry.pick(stream.model, stream.request.prompt_cache_key)
        if worker is None:
            log.info("no live worker for %s; request %s waits up to %.0fs", stream.model, stream.request_id,
                     self.queue_timeout)
            worker = await self.registry.wait_for(stream.model, self.queue_timeout)
        if stream.request_id not in self._streams:
            return  # closed while waiting
        if worker is None:
            message = f"no live worker for model '{stream.model}' within {self.queue_timeout:.0f}s"
            stream.deliver(Error(ERROR_NO_WORKER, message, stream.request_id))
            self._forget(stream)
            return
        stream.worker = worker
        worker.in_flight.add(stream.request_id)
        self._send(worker.identity, stream.request)

    def cancel(self, stream: RequestStream) -> None:
        if stream.worker is not None and stream.request_id in stream.worker.in_flight:
            self._send(stream.worker.identity, Cancel(stream.request_id))
        self._forget(stream)

    def _forget(self, stream: RequestStream) -> None:
        self._streams.pop(stream.request_id, None)
        if stream.worker is not None:
            stream.worker.in_flight.discard(stream.request_id)

    def _send(self, identity: bytes, message: Message) -> None:
        # ROUTER sends never block (frames to a vanished peer are dropped), so this is safe to
        # call from anywhere on the loop, including from a cancelled task's cleanup.
        future = self._router.send_multipart([identity, encode(message)], flags=zmq.NOBLOCK)
        future.add_done_callback(_log_send_failure)

    # --- receiving ----------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        while True:
            self._handle_frames(await self._router.recv_multipart(copy=False))
            # Whatever else is waiting, without a trip through the event loop per frame.
            for _ in range(1000):
                frames = self._receive_now()
                if frames is None:
                    break
                self._handle_frames(frames)

    def _receive_now(self) -> list[zmq.Frame] | None:
        """A waiting multipart message, read synchronously (zmq.Socket.recv: not the asyncio one)."""
        try:
            frames = [zmq.Socket.recv(self._router, zmq.NOBLOCK, copy=False)]
        except zmq.Again:
            return None
        while self._router.getsockopt(zmq.RCVMORE):
            frames.append(zmq.Socket.recv(self._router, 0, copy=False))
        return frames

    def _handle_frames(self, frames: list[zmq.Frame]) -> None:
        if len(frames) != 2:
            log.warning("dropped a message of %d frames", len(frames))
            return
        identity, frame = frames[0].bytes, frames[1]
        try:
            message = decode(frame.buffer)
        except ProtocolError as exc:
            log.warning("dropped a bad frame from %r: %s", identity, exc)
            return
        try:
            self._dispatch(identity, message, frame)
        except Exception:  # one bad message must not stop the loop that serves everyone
            log.exception("failed to handle %s from %r", type(message).__name__, identity)

    def _dispatch(self, identity: bytes, message: Message, frame: zmq.Frame) -> None:
        if isinstance(message, Ready):
            self._register(identity, message, frame.get(zmq.SRCFD))
            return
        worker = self.registry.get(identity)
        if worker is None:
            return  # not registered (yet, or any more): it will send Ready again
        worker.last_seen = time.monotonic()
        if isinstance(message, Heartbeat):
            worker.active, worker.queued, worker.stats = message.active, message.queued, message.stats
        elif isinstance(message, Output):
            for delta in message.deltas:
                self._route(worker, delta.request_id, delta)
        elif isinstance(message, Error) and message.request_id is None:
            if message.code == ERROR_SHUTTING_DOWN:
                worker.state = DRAINING
                log.info("worker %s (model %s) is draining: no new requests", worker.worker_id, worker.model)
            else:
                log.error("worker %s reports: %s (%s)", worker.worker_id, message.message, message.code)
        elif isinstance(message, (Accepted, Finished, Error)):
            self._route(worker, message.request_id, message)

    def _route(self, worker: WorkerInfo, request_id: str, message: Message) -> None:
        stream = self._streams.get(request_id)
        if stream is None or stream.worker is not worker:
            if not isinstance(message, (Finished, Error)):
                # Output for a request we no longer track (its client left, or we gave up on this
                # worker while it was unreachable): stop it.
                self._send(worker.identity, Cancel(request_id))
            return
        if isinstance(message, Error) and message.code == ERROR_SHUTTING_DOWN and not stream.produced_output:
            worker.in_flight.discard(request_id)
            self._retry(stream)  # it reached a draining worker: try another
            return
        stream.deliver(message)
        if isinstance(message, (Finished, Error)):
            self._forget(stream)

    def _register(self, identity: bytes, ready: Ready, fd: int | None) -> None:
        if ready.protocol_version != PROTOCOL_VERSION:
            log.error("worker %r speaks protocol %d, not %d: ignored", identity, ready.protocol_version, PROTOCOL_VERSION)
            return
        worker, new = self.registry.register(identity, ready, fd)
        self._send(identity, Heartbeat("gateway"))
        if new:
            log.info("worker %s registered: model %s, pid %d, context %d, %d sequences",
                     worker.worker_id, worker.model, worker.pid, worker.context_length, worker.max_sequences)
            self.observer.worker_registered(worker.model)

    # --- liveness ----------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self._heartbeat_interval)
            for worker in self.registry.stale(self._dead_after):
                self._declare_dead(worker, f"sent no heartbeat for {self._dead_after:.1f}s", kind="hang")
            for worker in self.registry.all():
                self._send(worker.identity, Heartbeat("gateway"))

    async def _monitor_loop(self, monitor: zmq.asyncio.Socket) -> None:
        """A dropped connection is a worker that exited or crashed: act on it at once.
        A failed handshake is a worker without an accepted CURVE key: log it."""
        try:
            while True:
                event = parse_monitor_message(await monitor.recv_multipart())
                if event["event"] != zmq.EVENT_DISCONNECTED:
                    log.warning("refused a worker connection on %s: %s (not an authorized CURVE key?)",
                                event["endpoint"].decode(errors="replace"), zmq.Event(event["event"]).name)
                    continue
                fd = int(event["value"])
                for worker in self.registry.with_fd(fd):
                    self._declare_dead(worker, "its connection closed", kind="exit")
        finally:
            monitor.close(linger=0)

    def _declare_dead(self, worker: WorkerInfo, reason: str, kind: str) -> None:
        if self.registry.remove(worker.identity) is None:
            return
        log.warning("worker %s (model %s, pid %d) is gone: %s; %d requests in flight",
                    worker.worker_id, worker.model, worker.pid, reason, len(worker.in_flight))
        self.observer.worker_lost(worker.model, kind)
        for request_id in list(worker.in_flight):
            stream = self._streams.get(request_id)
            if stream is None:
                continue
            if stream.produced_output:
                message = f"the worker serving model '{worker.model}' stopped ({reason})"
                stream.deliver(Error(ERROR_WORKER_CRASHED, message, request_id))
                self._forget(stream)
            else:
                self._retry(stream)  # nothing reached the client yet: run it elsewhere
        worker.in_flight.clear()

    def _retry(self, stream: RequestStream) -> None:
        log.info("request %s had no output yet; sending it to another worker of %s", stream.request_id, stream.model)
        stream.worker = None
        task = asyncio.create_task(self._dispatch_to_worker(stream), name=f"retry-{stream.request_id}")
        task.add_done_callback(_log_task_failure)


def _log_send_failure(future: asyncio.Future) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("send to a worker failed: %s", future.exception())


def _log_task_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("retry failed: %s", task.exception())
