"""``gateway``: the OpenAI-compatible HTTP server that routes requests to model workers."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import sys
from pathlib import Path

import uvicorn

from gateway.app import create_app
from gateway.engine_client import ERROR_GATEWAY_SHUTTING_DOWN, EngineClient
from gateway.responses.store import MemoryStore, ResponseStore, SQLiteStore
from protocol.transport import check_address, default_address

log = logging.getLogger("gateway")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gateway", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default: 8000)")
    parser.add_argument("--zmq", default=None, help="ZeroMQ address workers connect to (default: ipc in a private dir)")
    parser.add_argument("--heartbeat-interval", type=float, default=1.0, help="seconds between heartbeats")
    parser.add_argument("--heartbeat-misses", type=int, default=3,
                        help="missed heartbeats before a silent worker is declared dead (default: 3)")
    parser.add_argument("--queue-timeout", type=float, default=30.0,
                        help="seconds a request waits for a worker of its model to (re)appear (default: 30)")
    parser.add_argument("--max-queue", type=int, default=64,
                        help="requests per model beyond what its workers decode at once; more get 429 (default: 64)")
    parser.add_argument("--store", choices=["sqlite", "memory"], default="sqlite",
                        help="where stored Responses live (default: sqlite in --data-dir)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="directory for the response store (default: ~/.local/share/mlx-gateway)")
    parser.add_argument("--store-max-responses", type=int, default=10_000, help="oldest are evicted beyond this")
    parser.add_argument("--store-max-mb", type=int, default=1024, help="oldest are evicted beyond this size")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s gateway[%(process)d] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        address = check_address(args.zmq or default_address())
    except (ValueError, PermissionError) as exc:
        log.error("%s", exc)
        return 2
    if not _is_loopback(args.host):
        log.warning("listening on %s: anyone who can reach this address can use the models", args.host)
    store = _open_store(args)
    engine = EngineClient(address, heartbeat_interval=args.heartbeat_interval, misses_allowed=args.heartbeat_misses,
                          queue_timeout=args.queue_timeout, max_queue=args.max_queue)
    app = create_app(engine, store)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, log_config=None,
                            timeout_graceful_shutdown=10)
    GatewayServer(config, engine).run()
    return 0


class GatewayServer(uvicorn.Server):
    """uvicorn, but SIGTERM/SIGINT first end every open stream with a terminal event.

    uvicorn waits for open connections before it shuts down, and a generation can run for
    minutes; failing the open requests lets each stream close properly, at once.
    """

    def __init__(self, config: uvicorn.Config, engine: EngineClient):
        super().__init__(config)
        self._engine = engine
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame) -> None:
        if self._loop is not None and not self.should_exit:
            log.info("stopping: ending every open request with an error event")
            self._loop.call_soon_threadsafe(
                self._engine.fail_all, ERROR_GATEWAY_SHUTTING_DOWN, "the gateway is shutting down")
        super().handle_exit(sig, frame)


def _open_store(args: argparse.Namespace) -> ResponseStore:
    limits = {"max_responses": args.store_max_responses, "max_bytes": args.store_max_mb << 20}
    if args.store == "memory":
        return MemoryStore(**limits)
    data_dir = args.data_dir or Path(os.environ.get("MLX_GATEWAY_DATA", Path.home() / ".local/share/mlx-gateway"))
    path = data_dir / "responses.db"
    log.info("storing responses in %s", path)
    return SQLiteStore(path, **limits)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
