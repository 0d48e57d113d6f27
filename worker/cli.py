"""``worker --model X``: load one model and serve it to the gateway over ZeroMQ."""

from __future__ import annotations

import argparse
import logging
import os
import queue
import signal
import sys
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

from protocol import PROTOCOL_VERSION, Cancel, Generate, Output, Ready
from protocol.messages import ERROR_SHUTTING_DOWN
from protocol.transport import check_address, default_address
from worker.blas import enable_fast_blas
from worker.link import GatewayLink

# Modules that import mlx are imported only once enable_fast_blas() has chosen the BLAS.
if TYPE_CHECKING:
    from worker.engine import Engine
    from worker.models import LoadedModel

log = logging.getLogger("worker")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="worker", description=__doc__)
    parser.add_argument("--model", default="smollm2-135m",
                        help="model directory, Hugging Face repo id, .gguf file, or built-in name (default: smollm2-135m)")
    parser.add_argument("--gateway", default=None, help=f"gateway ZeroMQ address (default: {default_address()})")
    parser.add_argument("--served-name", default=None, help="model name clients use (default: derived from --model)")
    parser.add_argument("--max-sequences", type=int, default=16, help="sequences decoded together (default: 16)")
    parser.add_argument("--context-length", type=int, default=None, help="override the model's context window")
    parser.add_argument("--prefill-step-size", type=int, default=512, help="prompt tokens per prefill step")
    parser.add_argument("--temperature", type=float, default=None,
                        help="default temperature when a request sets none (default: the model's, else 1.0)")
    parser.add_argument("--top-p", type=float, default=None,
                        help="default top_p when a request sets none (default: the model's, else 1.0)")
    parser.add_argument("--heartbeat-interval", type=float, default=1.0, help="seconds between heartbeats")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, make_logits_processors: Callable | None = None) -> int:
    """Run a worker. ``make_logits_processors(loaded_model)`` is a hook for tests that script output."""
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s worker[%(process)d] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    log.info("BLAS: %s", enable_fast_blas())
    from worker.gguf import ModelLoadError
    from worker.models import load

    try:
        address = check_address(args.gateway or default_address())
        operator = {k: v for k, v in (("temperature", args.temperature), ("top_p", args.top_p)) if v is not None}
        loaded = load(args.model, args.served_name, args.context_length, operator)
    except (ModelLoadError, ValueError, PermissionError) as exc:
        log.error("%s", exc)
        return 2
    processors = make_logits_processors(loaded) if make_logits_processors else None
    return serve(loaded, address, args.max_sequences, args.prefill_step_size, args.heartbeat_interval, processors)


def serve(
    loaded: LoadedModel,
    address: str,
    max_sequences: int,
    prefill_step_size: int,
    heartbeat_interval: float,
    logits_processors: Callable | None = None,
) -> int:
    from worker.engine import Engine

    engine = Engine(loaded, max_sequences, prefill_step_size, logits_processors)
    worker_id = f"{loaded.name}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    ready = Ready(worker_id, loaded.name, PROTOCOL_VERSION, max_sequences, loaded.context_length, os.getpid())
    link = GatewayLink(address, ready, load=lambda: (engine.active, engine.queued), heartbeat_interval=heartbeat_interval)
    stopping = False

    def request_stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        log.info("received %s; stopping", signal.Signals(signum).name)
        stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    link.start()
    log.info("serving %s (context %d, %d sequences, default sampling %s) as %s",
             loaded.name, loaded.context_length, max_sequences, loaded.sampling, worker_id)
    try:
        while not stopping:
            _drain_inbox(link, engine, block=not engine.busy)
            if not engine.busy:
                continue
            result = engine.step()
            if result.deltas:
                link.send(Output(result.deltas))
            for message in (*result.finished, *result.errors):
                link.send(message)
    finally:
        for error in engine.cancel_all(ERROR_SHUTTING_DOWN, "the worker is shutting down"):
            link.send(error)
        link.close()
    return 0


def _drain_inbox(link: GatewayLink, engine: Engine, block: bool) -> None:
    """Apply every waiting Generate/Cancel; wait briefly for one when the engine is idle."""
    try:
        message = link.inbox.get(timeout=0.2) if block else link.inbox.get_nowait()
    except queue.Empty:
        return
    while True:
        if isinstance(message, Generate):
            link.send(engine.submit(message))
        elif isinstance(message, Cancel):
            finished = engine.cancel(message.request_id)
            if finished is not None:
                link.send(finished)
        else:
            log.debug("ignoring %s from the gateway", type(message).__name__)
        try:
            message = link.inbox.get_nowait()
        except queue.Empty:
            return


if __name__ == "__main__":
    sys.exit(main())
