"""The worker's engine loop: requests in from the gateway link, one engine step, outputs out.

Everything MLX happens on the thread that runs ``Worker.run`` (the one that loaded the model).
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import signal
import time
import uuid

from protocol import PROTOCOL_VERSION, Cancel, Error, Generate, Output, Ready
from protocol.messages import ERROR_SHUTTING_DOWN
from worker.engine import Engine, LogitsProcessorsFactory
from worker.link import GatewayLink
from worker.models import LoadedModel

log = logging.getLogger("worker")


class Worker:
    """The engine loop: requests in from the link, one engine step, outputs out, repeat.

    SIGTERM (or SIGINT) drains: the gateway is told to send nothing new, running requests get
    up to ``drain_timeout`` to finish, the rest fail cleanly; a second signal stops at once.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        address: str,
        args: argparse.Namespace,
        logits_processors: LogitsProcessorsFactory | None = None,
    ):
        self.engine = Engine(loaded, args.max_sequences, args.prefill_step_size, logits_processors)
        _apply_memory_limits(args)  # after the engine: its BatchGenerator sets mlx-lm's wired limit
        worker_id = f"{loaded.name}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        ready = Ready(worker_id, loaded.name, PROTOCOL_VERSION, args.max_sequences, loaded.context_length, os.getpid())
        self.link = GatewayLink(address, ready, load=lambda: (self.engine.active, self.engine.queued),
                                heartbeat_interval=args.heartbeat_interval,
                                stalled_for=self._stalled_for, stall_timeout=args.stall_timeout)
        self.loaded = loaded
        self.drain_timeout = args.drain_timeout
        self.drain_deadline: float | None = None  # set once draining
        self.stop_now = False
        self._tick = time.monotonic()

    def _stalled_for(self) -> float:
        return time.monotonic() - self._tick

    def _on_signal(self, signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        if self.drain_deadline is None:
            log.info("received %s: draining (up to %.0fs); send it again to stop now", name, self.drain_timeout)
            self.drain_deadline = time.monotonic() + self.drain_timeout
        else:
            log.info("received %s again: stopping now", name)
            self.stop_now = True

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        self.link.start()
        loaded = self.loaded
        log.info("serving %s (context %d, %d sequences, default sampling %s) as %s", loaded.name,
                 loaded.context_length, self.engine.max_sequences, loaded.sampling, self.link.worker_id)
        announced = False
        engine = self.engine
        try:
            while not self.stop_now:
                self._tick = time.monotonic()
                if self.drain_deadline is not None:
                    if not announced:
                        self.link.send(Error(ERROR_SHUTTING_DOWN, "draining before shutdown"))
                        announced = True
                    if not engine.busy or time.monotonic() > self.drain_deadline:
                        break
                self._drain_inbox(block=not engine.busy)
                if not engine.busy:
                    continue
                result = engine.step()
                if result.deltas:
                    self.link.send(Output(result.deltas))
                for message in (*result.finished, *result.errors):
                    self.link.send(message)
        finally:
            for error in engine.cancel_all(ERROR_SHUTTING_DOWN, "the worker is shutting down"):
                self.link.send(error)
            self.link.close()
            log.info("stopped")
        return 0

    def _drain_inbox(self, block: bool) -> None:
        """Apply every waiting Generate/Cancel; wait briefly for one when the engine is idle."""
        link = self.link
        try:
            message = link.inbox.get(timeout=0.2) if block else link.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._apply(message)
            try:
                message = link.inbox.get_nowait()
            except queue.Empty:
                return

    def _apply(self, message: object) -> None:
        link, engine = self.link, self.engine
        if isinstance(message, Generate):
            if self.drain_deadline is not None:
                link.send(Error(ERROR_SHUTTING_DOWN, "this worker is shutting down", message.request_id))
            else:
                link.send(engine.submit(message))
        elif isinstance(message, Cancel):
            finished = engine.cancel(message.request_id)
            if finished is not None:
                link.send(finished)
        else:
            log.debug("ignoring %s from the gateway", type(message).__name__)



def _apply_memory_limits(args: argparse.Namespace) -> None:
    import mlx.core as mx

    gib = 1 << 30
    if args.memory_limit is not None:
        mx.set_memory_limit(int(args.memory_limit * gib))
    if args.cache_limit is not None:
        mx.set_cache_limit(int(args.cache_limit * gib))
    if args.wired_limit is not None:
        mx.set_wired_limit(int(args.wired_limit * gib))
    limits = {name: getattr(args, name) for name in ("memory_limit", "cache_limit", "wired_limit")}
    if any(v is not None for v in limits.values()):
        log.info("memory limits (GB): %s", {k: v for k, v in limits.items() if v is not None})
