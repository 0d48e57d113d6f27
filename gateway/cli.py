"""``gateway``: the OpenAI-compatible HTTP server that routes requests to model workers."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
from pathlib import Path

import uvicorn

from gateway.api import images
from gateway.api.errors import GATEWAY_SHUTTING_DOWN
from gateway.app import create_app
from gateway.engine.aliases import ModelAliases
from gateway.engine.client import EngineClient
from gateway.http.idle_timeout import IdleTimeoutH11Protocol
from gateway.models.catalog import load_catalog, parse_size
from gateway.models.manager import ModelManager, default_budget
from gateway.responses.store import MemoryStore, ResponseStore, SQLiteStore
from gateway.responses.websocket_routes import ConnectionLimit
from protocol.logs import configure as configure_logging
from protocol.security import CurveServer
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
    parser.add_argument("--model-alias", action="append", default=[], metavar="PATTERN=MODEL",
                        help="answer requests for model names matching PATTERN (shell-style, e.g. 'claude-*') with "
                             "MODEL (repeatable; first match wins)")
    parser.add_argument("--max-websockets", type=int, default=64,
                        help="open WebSocket connections (Responses over WebSocket) at once; more are closed with "
                             "1013 (default: 64)")
    parser.add_argument("--max-websocket-queue", type=int, default=8,
                        help="frames a WebSocket connection may queue behind its running response; more get an error "
                             "frame (429, websocket_queue_full) and are dropped (default: 8)")
    parser.add_argument("--max-websocket-queue-mb", type=float, default=None,
                        help="megabytes those queued frames may hold together (default: --max-request-mb, one "
                             "frame's worth)")
    parser.add_argument("--send-timeout", "--websocket-send-timeout", dest="send_timeout", type=float, default=30.0,
                        help="seconds a send on a stream (SSE or WebSocket) may wait for a client that reads nothing; "
                             "then its generation is stopped and the connection dropped (WebSocket: closed with "
                             "1008) (default: 30; 0: wait forever)")
    parser.add_argument("--max-request-mb", type=int, default=4,
                        help="largest request body (413 beyond) and WebSocket frame (closed with 1009); 4 MB "
                             "holds ~1M tokens of text (default: 4)")
    parser.add_argument("--max-connections", type=int, default=256,
                        help="open HTTP connections at once; beyond it new requests get 503 (default: 256)")
    parser.add_argument("--idle-timeout", type=int, default=15,
                        help="seconds a connection may stay open with no request in progress (default: 15)")
    parser.add_argument("--store", choices=["sqlite", "memory"], default="sqlite",
                        help="where stored Responses live (default: sqlite in --data-dir)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="directory for the response store (default: ~/.local/share/mlx-gateway)")
    parser.add_argument("--store-max-responses", type=int, default=10_000, help="oldest are evicted beyond this")
    parser.add_argument("--store-max-mb", type=int, default=1024, help="oldest are evicted beyond this size")
    parser.add_argument("--api-key", action="append", default=[],
                        help="require 'Authorization: Bearer KEY' on /v1/* (repeatable; also MLX_GATEWAY_API_KEYS, "
                             "comma-separated)")
    parser.add_argument("--api-key-file", type=Path, default=None, help="a file of API keys, one per line")
    parser.add_argument("--protect-metrics", action="store_true", help="require an API key for /metrics and /health too")
    parser.add_argument("--curve-secret-key", type=Path, default=None, metavar="FILE",
                        help="the gateway's CURVE key pair (.key_secret): required for tcp:// beyond loopback")
    parser.add_argument("--curve-authorized-keys", type=Path, default=None, metavar="DIR",
                        help="directory of the workers' CURVE public keys (.key) to accept")
    parser.add_argument("--keepalive", type=float, default=10.0, metavar="SECONDS",
                        help="seconds of silence (a long prefill, a model load) before a stream gets a keep-alive: "
                             "an SSE comment, Anthropic's ping, or on the Responses API a response.in_progress "
                             "event, which Codex counts against its 300 s idle timeout (default: 10)")
    parser.add_argument("--models", type=Path, default=None, metavar="FILE",
                        help="a TOML list of models served on demand: each loads (in a worker process this gateway "
                             "starts) when a request needs it, and unloads when idle or to make room (see README)")
    parser.add_argument("--memory-budget", default=None, metavar="SIZE",
                        help="memory the models may hold together, e.g. 96G (default: 3/4 of this machine's); "
                             "the least recently used idle on-demand models are unloaded to stay within it")
    parser.add_argument("--load-timeout", type=float, default=300.0, metavar="SECONDS",
                        help="how long a model load may take (waiting for room included) before its requests fail "
                             "(default: 300)")
    parser.add_argument("--max-image-mb", type=float, default=images.DEFAULT_MAX_IMAGE_BYTES / (1 << 20), metavar="MB",
                        help="the largest image a request may send, in MB of image data (default 20; a request body "
                             "is also bounded by --max-request-mb)")
    parser.add_argument("--max-image-pixels", type=int, default=images.DEFAULT_MAX_IMAGE_PIXELS, metavar="N",
                        help="the most pixels (width x height, read from the image's header) an image may have "
                             f"(default {images.DEFAULT_MAX_IMAGE_PIXELS:,}: 8K)")
    parser.add_argument("--max-images", type=int, default=images.DEFAULT_MAX_IMAGES, metavar="N",
                        help=f"images one request may carry, its whole conversation (default {images.DEFAULT_MAX_IMAGES})")
    parser.add_argument("--allow-image-urls", action="store_true",
                        help="fetch http(s) image URLs that requests send (off by default, when they get a 400: a "
                             "server that fetches any URL can be turned against the network it sits in)")
    parser.add_argument("--image-url-timeout", type=float, default=images.DEFAULT_URL_TIMEOUT, metavar="SECONDS",
                        help="with --allow-image-urls: seconds one image fetch may take (default 10)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-format", default="text", choices=["text", "json"])
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging("gateway", args.log_level, args.log_format)
    try:
        address = check_address(args.zmq or default_address())
        api_keys = _api_keys(args)
        curve = _curve(args, address)
        aliases = ModelAliases.parse(args.model_alias)
        if not 0 < args.keepalive < float("inf"):
            raise ValueError("--keepalive must be a number of seconds more than 0")
        if min(args.max_image_mb, args.max_image_pixels, args.max_images, args.image_url_timeout) <= 0:
            raise ValueError("--max-image-mb, --max-image-pixels, --max-images and --image-url-timeout must be above 0")
        images.configure(images.ImageLimits(int(args.max_image_mb * (1 << 20)), args.max_image_pixels, args.max_images,
                                            args.allow_image_urls, args.image_url_timeout))
        catalog = load_catalog(args.models) if args.models else None
        budget = parse_size(args.memory_budget, "--memory-budget") if args.memory_budget else default_budget()
        if catalog is not None and curve is not None:
            raise ValueError("--models starts its workers on this machine: use an ipc:// or loopback --zmq address "
                             "without CURVE (workers on other machines connect as before)")
    except (ValueError, PermissionError, OSError) as exc:
        log.error("%s", exc)
        return 2
    if not api_keys and not _is_loopback(args.host):
        log.warning("listening on %s with no API key: anyone who can reach it can use the models "
                    "(set --api-key)", args.host)
    store = _open_store(args)
    engine = EngineClient(address, heartbeat_interval=args.heartbeat_interval, misses_allowed=args.heartbeat_misses,
                          queue_timeout=args.queue_timeout, max_queue=args.max_queue, curve=curve,
                          aliases=aliases)
    models = None
    if catalog is not None:
        models = ModelManager(catalog, engine.registry, engine.load, address, budget, args.load_timeout)
    queue_mb = args.max_request_mb if args.max_websocket_queue_mb is None else args.max_websocket_queue_mb
    websockets = ConnectionLimit(args.max_websockets, args.max_request_mb << 20, args.max_websocket_queue,
                                 int(queue_mb * (1 << 20)), args.send_timeout)
    app = create_app(engine, store, api_keys, args.protect_metrics, websockets, args.max_request_mb << 20, models,
                     args.keepalive)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, log_config=None,
                            timeout_graceful_shutdown=10, ws_max_size=websockets.max_frame_bytes + 1024,
                            # Frames read ahead of the app, per connection (uvicorn's default, 32, is 32
                            # frames of up to --max-request-mb each: 128 MB from one flooding client).
                            ws_max_queue=4,
                            http=IdleTimeoutH11Protocol, timeout_keep_alive=args.idle_timeout,
                            limit_concurrency=args.max_connections)
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
                self._engine.fail_all, GATEWAY_SHUTTING_DOWN, "the gateway is shutting down")
        super().handle_exit(sig, frame)


def _api_keys(args: argparse.Namespace) -> list[str]:
    keys = list(args.api_key)
    keys += [k for k in os.environ.get("MLX_GATEWAY_API_KEYS", "").split(",") if k.strip()]
    if args.api_key_file is not None:
        keys += args.api_key_file.read_text().split()
    keys = [k.strip() for k in keys if k.strip()]
    if keys:
        log.info("API keys required on /v1/* (%d keys)", len(keys))
    return keys


def _curve(args: argparse.Namespace, address: str) -> CurveServer | None:
    if args.curve_secret_key or args.curve_authorized_keys:
        if not (args.curve_secret_key and args.curve_authorized_keys):
            raise ValueError("CURVE needs both --curve-secret-key and --curve-authorized-keys")
        log.info("workers must authenticate with CURVE (keys in %s)", args.curve_authorized_keys)
        return CurveServer.load(args.curve_secret_key, args.curve_authorized_keys)
    if address.startswith("tcp://") and not _is_loopback(address[6:].rsplit(":", 1)[0].strip("[]")):
        raise ValueError(f"{address} reaches beyond this machine: give --curve-secret-key and "
                         "--curve-authorized-keys (make them with mlx-gateway-keys)")
    return None


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
