"""The gateway's engine client: admission, routing to workers, retries, per-request streams.

``EngineClient.submit`` sends a Generate to the least-loaded live worker of a model, waits
until the worker accepted it, and returns a ``RequestStream`` of its output (Deltas, then
Finished). Every failure, before or during the stream, is one ``EngineError`` whose code says
why (``gateway/errors.py``). Dead workers are noticed two ways: at once when a worker's
connection drops (a crash, reported by the ``WorkerLink``), and after missed heartbeats (a
hang). A request whose worker died before it produced any output is sent to another worker of
its model, or waits for the restarted one; otherwise it fails with ``worker_crashed``. No
client waits on a worker that is gone. The socket itself lives in ``worker_link.py``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Protocol

from gateway.api.errors import (
    GATEWAY_SHUTTING_DOWN,
    MODEL_LOAD_FAILED,
    NO_WORKER,
    QUEUE_FULL,
    REQUEST_CANCELLED,
    WORKER_CRASHED,
    EngineError,
    model_not_found,
)
from gateway.engine.aliases import ModelAliases
from gateway.engine.link import WorkerLink
from gateway.engine.registry import WorkerInfo, WorkerRegistry, WorkerState
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
    Ready,
)
from protocol.messages import ERROR_INVALID_REQUEST, ERROR_SHUTTING_DOWN, Embed, Embeddings
from protocol.security import CurveServer
from protocol.transport import HEARTBEAT_INTERVAL_S, HEARTBEAT_MISSES_ALLOWED

log = logging.getLogger(__name__)


class Observer(Protocol):
    """Where token timings and worker changes are reported (gateway.status.metrics.GatewayMetrics)."""

    def first_token(self, model: str, seconds: float) -> None: ...
    def tokens(self, model: str, count: int, seconds_since_previous: float | None) -> None: ...
    def worker_registered(self, model: str) -> None: ...
    def worker_lost(self, model: str, reason: str) -> None: ...
    def request_failed(self, model: str, request_id: str, code: str, message: str) -> None: ...


class _NoObserver:
    def first_token(self, model: str, seconds: float) -> None:
        pass

    def tokens(self, model: str, count: int, seconds_since_previous: float | None) -> None:
        pass

    def worker_registered(self, model: str) -> None:
        pass

    def worker_lost(self, model: str, reason: str) -> None:
        pass

    def request_failed(self, model: str, request_id: str, code: str, message: str) -> None:
        pass


class OnDemand(Protocol):
    """Models loaded when a request needs them (gateway.models.manager.ModelManager)."""

    def manages(self, model: str) -> bool: ...
    def needs_load(self, model: str) -> bool: ...
    async def ensure_loaded(self, model: str) -> None: ...
    def request_started(self, model: str) -> None: ...
    def request_ended(self, model: str, keep_alive: float | None) -> None: ...


# What a stream's queue carries: the worker's messages for this request, or the gateway's
# own verdict on it (worker gone, no worker, shutting down).
StreamItem = Accepted | Delta | Finished | Error | EngineError


class RequestStream:
    """The events of one request, in the order its worker produced them."""

    def __init__(self, client: EngineClient, request: Generate, model: str):
        self.request = request
        self.model = model
        self._opened_at = time.monotonic()
        self._first_output_at: float | None = None
        self._last_output_at = 0.0
        self._output_tokens = 0
        self.worker: WorkerInfo | None = None
        self.prompt_tokens = 0
        self.finished: Finished | None = None
        self.keep_alive: float | None = None  # seconds its model stays loaded after it (on-demand models)
        self._client = client
        self._queue: asyncio.Queue[StreamItem] = asyncio.Queue()
        self._closed = False
        self.ended = asyncio.Event()  # it got its terminal item, or was closed

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def produced_output(self) -> bool:
        """Once true, a worker death can no longer be hidden by a retry."""
        return self._first_output_at is not None

    @property
    def output_tokens(self) -> int:
        return self._output_tokens

    @property
    def started_output_at(self) -> float | None:
        return self._first_output_at

    @property
    def opened_at(self) -> float:
        return self._opened_at

    def deliver(self, item: StreamItem) -> None:
        if isinstance(item, Accepted):
            self.prompt_tokens = item.prompt_tokens
        elif isinstance(item, Finished):
            self.ended.set()
        elif isinstance(item, (Error, EngineError)):
            self.ended.set()
            self._client.observer.request_failed(self.model, self.request.trace_id or self.request_id,
                                                 item.code, item.message)
        if isinstance(item, Delta):
            now = time.monotonic()
            self._output_tokens += item.token_count
            observer = self._client.observer
            if self._first_output_at is None:
                self._first_output_at = now
                observer.first_token(self.model, now - self._opened_at)
                observer.tokens(self.model, item.token_count, None)
            else:
                observer.tokens(self.model, item.token_count, now - self._last_output_at)
            self._last_output_at = now
        self._queue.put_nowait(item)

    async def wait_accepted(self) -> None:
        while True:
            item = await self._queue.get()
            if isinstance(item, (Error, EngineError)):
                self._closed = True
                raise _as_failure(item)
            if isinstance(item, Accepted):
                self.prompt_tokens = item.prompt_tokens
                return

    async def batches(self) -> AsyncIterator[list[Delta]]:
        """The deltas, in lists of whatever arrived together: a client that falls behind (or a
        busy gateway) gets them in fewer, larger writes. Ends at Finished; raises EngineError."""
        while self.finished is None:
            items = [await self._queue.get()]
            while not self._queue.empty():
                items.append(self._queue.get_nowait())
            deltas: list[Delta] = []
            for item in items:
                if isinstance(item, Delta):
                    deltas.append(item)
                elif isinstance(item, Finished):
                    self.finished = item
                    self._closed = True
                    break
                elif isinstance(item, (Error, EngineError)):
                    self._closed = True
                    if deltas:
                        yield deltas
                    raise _as_failure(item)
                # An Accepted here comes from a retry on another worker: nothing to do.
            if deltas:
                yield deltas

    def close(self) -> None:
        """Stop the request if it is still running (client gone, or the route failed)."""
        self.ended.set()
        if not self._closed:
            self._closed = True
            self._client.cancel(self)


class WrongModelKind(EngineError):
    """An embedding request for a text model (``/v1/embeddings`` answers a 400 naming ``model``)."""


class EmbedCall:
    """One Embed in flight: its worker and the future its reply (or failure) resolves."""

    def __init__(self, request: Embed, model: str):
        self.request = request
        self.model = model
        self.worker: WorkerInfo | None = None
        self.reply: asyncio.Future[Embeddings | Error | EngineError] = asyncio.get_running_loop().create_future()

    @property
    def request_id(self) -> str:
        return self.request.request_id

    def resolve(self, item: Embeddings | Error | EngineError) -> None:
        if not self.reply.done():
            self.reply.set_result(item)


def _as_failure(item: Error | EngineError) -> EngineError:
    if isinstance(item, EngineError):
        return item
    return EngineError(item.code, item.message, item.prompt_tokens, item.context_length)


class EngineClient:
    def __init__(
        self,
        address: str,
        heartbeat_interval: float = HEARTBEAT_INTERVAL_S,
        misses_allowed: int = HEARTBEAT_MISSES_ALLOWED,
        queue_timeout: float = 30.0,
        max_queue: int = 64,
        curve: CurveServer | None = None,
        aliases: ModelAliases | None = None,
    ):
        self.aliases = aliases or ModelAliases()
        self.observer: Observer = _NoObserver()  # the app puts its metrics here
        self.on_demand: OnDemand | None = None  # set when the gateway serves a model list (--models)
        self.registry = WorkerRegistry()
        self.queue_timeout = queue_timeout
        self.max_queue = max_queue  # per model, beyond what its workers decode at once
        self.link = WorkerLink(address, self._on_message, self._on_disconnect, curve)
        self._heartbeat_interval = heartbeat_interval
        self._dead_after = heartbeat_interval * misses_allowed
        self._streams: dict[str, RequestStream] = {}
        self._embeds: dict[str, EmbedCall] = {}  # embedding requests in flight (``embed``)
        self._heartbeats: asyncio.Task | None = None

    async def start(self) -> None:
        await self.link.start()
        self._heartbeats = asyncio.create_task(self._heartbeat_loop(), name="zmq-heartbeat")

    def fail_all(self, code: str, message: str) -> None:
        """End every open request now (the gateway is stopping): each gets a terminal error."""
        for stream in list(self._streams.values()):
            stream.deliver(EngineError(code, message))
            self._forget(stream)
        for call in list(self._embeds.values()):
            call.resolve(EngineError(code, message))

    async def close(self) -> None:
        self.fail_all(GATEWAY_SHUTTING_DOWN, "the gateway is shutting down")
        if self._heartbeats is not None:
            self._heartbeats.cancel()
            await asyncio.gather(self._heartbeats, return_exceptions=True)
        await self.link.close()

    def load(self, model: str) -> int:
        """Requests of ``model`` running, queued in workers, or waiting for a worker."""
        return (sum(1 for s in self._streams.values() if s.model == model)
                + sum(1 for c in self._embeds.values() if c.model == model))

    def waiting_for_worker(self, model: str) -> int:
        return sum(1 for s in self._streams.values() if s.model == model and s.worker is None)

    def streams(self) -> list[RequestStream]:
        """The requests open now (for the status page)."""
        return list(self._streams.values())

    def cancel_request(self, request_id: str, reason: str) -> bool:
        """Stop a request by its id (an operator's action): its client gets ``reason`` as an error."""
        stream = self._streams.get(request_id)
        if stream is None:
            return False
        if stream.worker is not None and stream.request_id in stream.worker.in_flight:
            self.link.send(stream.worker.identity, Cancel(stream.request_id))
        stream.deliver(EngineError(REQUEST_CANCELLED, reason))
        self._forget(stream)
        return True

    def models_with_requests(self) -> set[str]:
        return {s.model for s in self._streams.values()}

    def resolve(self, model: str) -> str:
        """The served model a requested name means: itself if a worker ever served it, else
        what the operator's aliases make of it."""
        return model if self.registry.is_known(model) else self.aliases.resolve(model)

    def needs_load(self, model: str) -> bool:
        """Its next request waits for a model load (a listed model with no live worker)."""
        return self.on_demand is not None and self.on_demand.needs_load(self.resolve(model))

    def admit(self, model: str) -> None:
        """Raise EngineError for a model never served here, or when its queue is full."""
        served = self.resolve(model)
        if not self.registry.is_known(served):
            raise model_not_found(model)
        limit = self.registry.capacity(served) + self.max_queue
        if self.load(served) >= limit:
            raise EngineError(QUEUE_FULL, f"model '{model}' has {limit} requests queued or running; "
                                          "try again shortly")

    async def submit(self, model: str, request: Generate, keep_alive: float | None = None) -> RequestStream:
        """Send ``request`` to the least-loaded worker of ``model`` and wait until it accepted it.

        Loads a listed model that is not loaded (``on_demand``); waits up to ``queue_timeout``
        for a worker when another model is known but has none live (a restart). Raises
        EngineError: unknown model, queue full, a failed load, or the worker's refusal.
        ``keep_alive``: seconds an on-demand model stays loaded after this request.
        """
        self.admit(model)
        model = self.resolve(model)
        stream = RequestStream(self, request, model)
        stream.keep_alive = keep_alive
        self._streams[request.request_id] = stream
        if self.on_demand is not None:
            self.on_demand.request_started(model)
        try:
            await self._dispatch_to_worker(stream)
            await stream.wait_accepted()
        except BaseException:
            stream.close()
            self._forget(stream)
            raise
        return stream

    async def _dispatch_to_worker(self, stream: RequestStream) -> None:
        worker = self.registry.pick(stream.model, stream.request.prompt_cache_key)
        if worker is None and self.on_demand is not None and self.on_demand.manages(stream.model):
            # Wait for the load, or until the request ends meanwhile (its client left, an operator
            # cancelled it, the gateway is stopping): the load goes on for whoever else waits.
            loading = asyncio.ensure_future(self.on_demand.ensure_loaded(stream.model))
            ended = asyncio.ensure_future(stream.ended.wait())
            try:
                await asyncio.wait({loading, ended}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                ended.cancel()
                if not loading.done():
                    loading.cancel()
            if loading.cancelled() or stream.request_id not in self._streams:
                return
            failure = loading.exception()
            if failure is not None:
                if not isinstance(failure, EngineError):
                    log.error("loading %s failed: %r", stream.model, failure)
                    failure = EngineError(MODEL_LOAD_FAILED, f"model '{stream.model}' failed to load: {failure}")
                stream.deliver(failure)
                self._forget(stream)
                return
            worker = self.registry.pick(stream.model, stream.request.prompt_cache_key)
        if worker is None:
            log.info("no live worker for %s; request %s waits up to %.0fs", stream.model, stream.request_id,
                     self.queue_timeout)
            worker = await self.registry.wait_for(stream.model, self.queue_timeout)
        if stream.request_id not in self._streams:
            return  # closed while waiting
        if worker is None:
            message = f"no live worker for model '{stream.model}' within {self.queue_timeout:.0f}s"
            stream.deliver(EngineError(NO_WORKER, message))
            self._forget(stream)
            return
        stream.worker = worker
        worker.in_flight.add(stream.request_id)
        self.link.send(worker.identity, stream.request)

    def cancel(self, stream: RequestStream) -> None:
        if stream.worker is not None and stream.request_id in stream.worker.in_flight:
            self.link.send(stream.worker.identity, Cancel(stream.request_id))
        self._forget(stream)

    # --- embeddings -----------------------------------------------------------------------

    async def embed(self, model: str, request: Embed, keep_alive: float | None = None) -> Embeddings:
        """Send ``request`` to an embedding worker of ``model`` and wait for its vectors. Raises
        EngineError: unknown model, queue full, a failed load, no worker, the worker's refusal,
        ``worker_crashed`` when its worker dies meanwhile, and ``WrongModelKind`` for a text model.
        A worker that was draining when the request reached it passes it to another."""
        self.admit(model)
        model = self.resolve(model)
        call = EmbedCall(request, model)
        self._embeds[request.request_id] = call
        if self.on_demand is not None:
            self.on_demand.request_started(model)
        try:
            for _ in range(8):
                worker = await self._embedding_worker(model)
                call.worker = worker
                worker.in_flight.add(request.request_id)
                self.link.send(worker.identity, request)
                reply = await call.reply
                worker.in_flight.discard(request.request_id)
                if isinstance(reply, Error) and reply.code == ERROR_SHUTTING_DOWN:
                    call.reply = asyncio.get_running_loop().create_future()
                    call.worker = None
                    continue  # it reached a draining worker: try another
                break
            if isinstance(reply, Embeddings):
                return reply
            raise _as_failure(reply)
        except EngineError as failure:
            self.observer.request_failed(model, request.trace_id or request.request_id, failure.code, failure.message)
            raise
        finally:
            self._embeds.pop(request.request_id, None)
            worker_now = call.worker
            if worker_now is not None and request.request_id in worker_now.in_flight:
                worker_now.in_flight.discard(request.request_id)
                self.link.send(worker_now.identity, Cancel(request.request_id))  # its client left
            if self.on_demand is not None:
                self.on_demand.request_ended(model, keep_alive)

    async def _embedding_worker(self, model: str) -> WorkerInfo:
        """The least-loaded live worker of ``model`` (loading it, or waiting for one, as ``submit``
        does); WrongModelKind if it serves text."""
        worker = self.registry.pick(model)
        if worker is None and self.on_demand is not None and self.on_demand.manages(model):
            try:
                await self.on_demand.ensure_loaded(model)
            except EngineError:
                raise
            except Exception as exc:
                log.error("loading %s failed: %r", model, exc)
                raise EngineError(MODEL_LOAD_FAILED, f"model '{model}' failed to load: {exc}") from None
            worker = self.registry.pick(model)
        if worker is None:
            log.info("no live worker for %s; an embedding request waits up to %.0fs", model, self.queue_timeout)
            worker = await self.registry.wait_for(model, self.queue_timeout)
        if worker is None:
            raise EngineError(NO_WORKER, f"no live worker for model '{model}' within {self.queue_timeout:.0f}s")
        if worker.kind != "embedding":
            raise WrongModelKind(ERROR_INVALID_REQUEST, f"'{model}' is a text-generation model, not an embedding "
                                                        "model: it cannot serve /v1/embeddings")
        return worker

    def _route_embedding(self, worker: WorkerInfo, message: Embeddings | Error) -> bool:
        """An embedding worker's reply (or refusal) to its EmbedCall; False if it is no Embed's."""
        call = self._embeds.get(message.request_id or "")
        if call is None:
            return isinstance(message, Embeddings)
        if call.worker is worker:
            call.resolve(message)
        return True

    def _forget(self, stream: RequestStream) -> None:
        forgotten = self._streams.pop(stream.request_id, None)
        if stream.worker is not None:
            stream.worker.in_flight.discard(stream.request_id)
        if forgotten is not None and self.on_demand is not None:
            self.on_demand.request_ended(stream.model, stream.keep_alive)

    # --- what the workers send ------------------------------------------------------------

    def _on_message(self, identity: bytes, message: Message, fd: int | None) -> None:
        if isinstance(message, Ready):
            self._register(identity, message, fd)
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
                worker.state = WorkerState.DRAINING
                log.info("worker %s (model %s) is draining: no new requests", worker.worker_id, worker.model)
            else:
                log.error("worker %s reports: %s (%s)", worker.worker_id, message.message, message.code)
        elif isinstance(message, (Embeddings, Error)) and self._route_embedding(worker, message):
            return
        elif isinstance(message, (Accepted, Finished, Error)):
            self._route(worker, message.request_id, message)

    def _route(self, worker: WorkerInfo, request_id: str | None, message: Accepted | Delta | Finished | Error) -> None:
        stream = self._streams.get(request_id or "")
        if stream is None or stream.worker is not worker:
            if request_id is not None and not isinstance(message, (Finished, Error)):
                # Output for a request we no longer track (its client left, or we gave up on this
                # worker while it was unreachable): stop it.
                self.link.send(worker.identity, Cancel(request_id))
            return
        if isinstance(message, Error) and message.code == ERROR_SHUTTING_DOWN and not stream.produced_output:
            worker.in_flight.discard(stream.request_id)
            self._retry(stream)  # it reached a draining worker: try another
            return
        stream.deliver(message)
        if isinstance(message, (Finished, Error)):
            self._forget(stream)

    def _register(self, identity: bytes, ready: Ready, fd: int | None) -> None:
        if ready.protocol_version != PROTOCOL_VERSION:
            log.error("worker %r speaks protocol %d, not %d: ignored", identity, ready.protocol_version,
                      PROTOCOL_VERSION)
            return
        worker, new = self.registry.register(identity, ready, fd)
        self.link.send(identity, Heartbeat("gateway"))
        if new:
            log.info("worker %s registered: model %s, pid %d, context %d, %d sequences",
                     worker.worker_id, worker.model, worker.pid, worker.context_length, worker.max_sequences)
            self.observer.worker_registered(worker.model)

    def _on_disconnect(self, fd: int) -> None:
        """A dropped connection is a worker that exited or crashed."""
        for worker in self.registry.with_fd(fd):
            self._declare_dead(worker, "its connection closed", kind="exit")

    # --- liveness ----------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self._heartbeat_interval)
            for worker in self.registry.stale(self._dead_after):
                self._declare_dead(worker, f"sent no heartbeat for {self._dead_after:.1f}s", kind="hang")
            for worker in self.registry.all():
                self.link.send(worker.identity, Heartbeat("gateway"))

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
                stream.deliver(EngineError(WORKER_CRASHED, message))
                self._forget(stream)
            else:
                self._retry(stream)  # nothing reached the client yet: run it elsewhere
        for call in list(self._embeds.values()):
            if call.worker is worker:
                call.resolve(EngineError(WORKER_CRASHED, f"the worker serving model '{worker.model}' stopped ({reason})"))
        worker.in_flight.clear()

    def _retry(self, stream: RequestStream) -> None:
        log.info("request %s had no output yet; sending it to another worker of %s", stream.request_id, stream.model)
        stream.worker = None
        task = asyncio.create_task(self._dispatch_to_worker(stream), name=f"retry-{stream.request_id}")
        task.add_done_callback(_log_task_failure)


def _log_task_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("retry failed: %s", task.exception())
