"""The worker's connection to the gateway, on its own I/O thread.

The engine thread never touches the DEALER socket: it reads decoded requests from
``inbox`` (a queue.Queue) and hands outgoing messages to ``send``, which pushes them over
an inproc socket to this thread. So socket I/O never blocks the engine loop, and the
heartbeat keeps going during a long engine step.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable

import zmq
from zmq.utils.monitor import parse_monitor_message

from protocol import Heartbeat, Message, ProtocolError, Ready, decode, encode
from protocol.security import CurveClient
from protocol.transport import HEARTBEAT_INTERVAL_S, HEARTBEAT_MISSES_ALLOWED

log = logging.getLogger(__name__)

MAX_REGISTER_BACKOFF_S = 10.0


class GatewayLink:
    def __init__(
        self,
        address: str,
        ready: Ready,
        load: Callable[[], tuple[int, int, dict[str, float]]],
        heartbeat_interval: float = HEARTBEAT_INTERVAL_S,
        stalled_for: Callable[[], float] | None = None,
        stall_timeout: float = 300.0,
        curve: CurveClient | None = None,
    ):
        self.address = address
        # What the gateway sent, for the engine thread; the worker also posts its own finished
        # side work here (prompts built off the engine thread), so one queue wakes the loop.
        self.inbox: queue.Queue[object] = queue.Queue()
        self._ready = ready
        self._load = load  # () -> (active, queued, engine figures), for each heartbeat
        self._curve = curve
        self._interval = heartbeat_interval
        # A watchdog: heartbeats come from this thread, so an engine stuck in one step would
        # still look alive. Past stall_timeout we exit, and the supervisor restarts us.
        self._stalled_for = stalled_for
        self._stall_timeout = stall_timeout
        self._context = zmq.Context()
        self._outbox_address = f"inproc://worker-outbox-{ready.worker_id}"
        self._pull = self._context.socket(zmq.PULL)
        self._pull.bind(self._outbox_address)
        self._push = self._context.socket(zmq.PUSH)  # used only by the engine thread
        self._push.connect(self._outbox_address)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gateway-link", daemon=True)

    @property
    def worker_id(self) -> str:
        return self._ready.worker_id

    def start(self) -> None:
        self._thread.start()

    def send(self, message: Message) -> None:
        """Called from the engine thread; never blocks on the network."""
        self._push.send(encode(message))

    def close(self, timeout: float = 2.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        self._push.close(linger=0)
        self._context.term()

    def _run(self) -> None:
        dealer = self._context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.IDENTITY, self._ready.worker_id.encode())
        dealer.setsockopt(zmq.LINGER, 1000)  # flush final messages on shutdown
        dealer.setsockopt(zmq.SNDHWM, 100_000)
        if self._curve is not None:
            self._curve.apply(dealer)
        monitor = dealer.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                                            | zmq.EVENT_HANDSHAKE_SUCCEEDED)
        dealer.connect(self.address)
        poller = zmq.Poller()
        poller.register(dealer, zmq.POLLIN)
        poller.register(self._pull, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)

        dealer.send(encode(self._ready))
        log.info("registering with the gateway at %s", self.address)
        now = time.monotonic()
        last_heard = now  # from the gateway
        next_heartbeat = now + self._interval
        register_backoff = self._interval
        next_register = now + HEARTBEAT_MISSES_ALLOWED * self._interval
        try:
            while not self._stop.is_set():
                events = dict(poller.poll(timeout=100))
                if self._pull in events:
                    for _ in range(1000):  # forward what is there, without starving the reader
                        try:
                            frame = self._pull.recv(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._forward(dealer, frame)
                if monitor in events:
                    self._on_monitor_event(monitor)
                if dealer in events:
                    while True:
                        try:
                            frame = dealer.recv(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        if self._receive(frame):
                            last_heard = time.monotonic()
                            register_backoff = self._interval
                now = time.monotonic()
                if self._stalled_for is not None and self._stalled_for() > self._stall_timeout:
                    log.critical("the engine has been stuck for %.0fs; exiting so the supervisor restarts it",
                                 self._stalled_for())
                    os._exit(3)
                if now >= next_heartbeat:
                    active, queued, stats = self._load()
                    self._forward(dealer, encode(Heartbeat(self._ready.worker_id, active, queued, stats)))
                    next_heartbeat = now + self._interval
                silent = now - last_heard > HEARTBEAT_MISSES_ALLOWED * self._interval
                if silent and now >= next_register:
                    # The gateway is gone or was restarted and does not know us: register again.
                    log.warning("no word from the gateway for %.1fs; registering again", now - last_heard)
                    self._forward(dealer, encode(self._ready))
                    register_backoff = min(register_backoff * 2, MAX_REGISTER_BACKOFF_S)
                    next_register = now + register_backoff
        finally:
            # Let anything the engine sent last (its final errors) reach the gateway.
            while True:
                try:
                    self._forward(dealer, self._pull.recv(zmq.NOBLOCK))
                except zmq.Again:
                    break
            dealer.disable_monitor()
            monitor.close(linger=0)
            dealer.close()
            self._pull.close(linger=0)

    def _on_monitor_event(self, monitor: zmq.Socket) -> None:
        event = parse_monitor_message(monitor.recv_multipart())["event"]
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            log.info("connected to the gateway%s", " (CURVE)" if self._curve else "")
        else:
            log.error("the gateway refused this worker's handshake (%s): check the CURVE keys",
                      zmq.Event(event).name)

    def _forward(self, dealer: zmq.Socket, frame: bytes) -> None:
        try:
            dealer.send(frame, zmq.NOBLOCK)
        except zmq.Again:
            log.warning("gateway not reachable; dropped a %d-byte message", len(frame))

    def _receive(self, frame: bytes) -> bool:
        """Route one frame from the gateway; True if it was a valid message."""
        try:
            message = decode(frame)
        except ProtocolError as exc:
            log.warning("dropped a bad frame from the gateway: %s", exc)
            return False
        if not isinstance(message, Heartbeat):
            self.inbox.put(message)
        return True
