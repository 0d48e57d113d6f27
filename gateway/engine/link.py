"""The gateway's end of the ZeroMQ link: the ROUTER socket every worker connects to.

``WorkerLink`` owns the socket, its monitor, CURVE authentication and frame decoding. It
hands each decoded message to ``on_message(identity, message, fd)`` and each dropped
connection to ``on_disconnect(fd)``; what they mean (registration, routing, liveness) is the
engine client's business. It is the counterpart of ``worker/link.py``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import zmq
import zmq.asyncio
from zmq.auth.asyncio import AsyncioAuthenticator
from zmq.utils.monitor import parse_monitor_message

from protocol import Message, ProtocolError, Ready, decode, encode
from protocol.security import CurveServer

log = logging.getLogger(__name__)

# (worker identity, message, fd of its connection: set for Ready, to match a later disconnect)
MessageHandler = Callable[[bytes, Message, "int | None"], None]
DisconnectHandler = Callable[[int], None]


class WorkerLink:
    def __init__(
        self,
        address: str,
        on_message: MessageHandler,
        on_disconnect: DisconnectHandler,
        curve: CurveServer | None = None,
    ):
        self.address = address
        self.curve = curve
        self._on_message = on_message
        self._on_disconnect = on_disconnect
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
            asyncio.create_task(self._monitor_loop(monitor), name="zmq-monitor"),
        ]
        log.info("listening for workers on %s", self.address)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._router.disable_monitor()
        self._router.close(linger=0)
        if self._authenticator is not None:
            self._authenticator.stop()
        self._context.term()

    def send(self, identity: bytes, message: Message) -> None:
        # ROUTER sends never block (frames to a vanished peer are dropped), so this is safe to
        # call from anywhere on the loop, including from a cancelled task's cleanup.
        sent = asyncio.ensure_future(self._router.send_multipart([identity, encode(message)], flags=zmq.NOBLOCK))
        sent.add_done_callback(_log_send_failure)

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
        fd = frame.get(zmq.SRCFD) if isinstance(message, Ready) else None
        try:
            self._on_message(identity, message, fd)
        except Exception:  # one bad message must not stop the loop that serves everyone
            log.exception("failed to handle %s from %r", type(message).__name__, identity)

    async def _monitor_loop(self, monitor: zmq.asyncio.Socket) -> None:
        """A dropped connection is a worker that exited or crashed: report it at once.
        A failed handshake is a worker without an accepted CURVE key: log it."""
        try:
            while True:
                event = parse_monitor_message(await monitor.recv_multipart())
                if event["event"] != zmq.EVENT_DISCONNECTED:
                    log.warning("refused a worker connection on %s: %s (not an authorized CURVE key?)",
                                event["endpoint"].decode(errors="replace"), zmq.Event(event["event"]).name)
                    continue
                self._on_disconnect(int(event["value"]))
        finally:
            monitor.close(linger=0)


def _log_send_failure(future: asyncio.Future) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("send to a worker failed: %s", future.exception())
