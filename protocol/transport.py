"""Where the gateway's ROUTER socket lives, and the liveness timings both sides use."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

HEARTBEAT_INTERVAL_S = 1.0
HEARTBEAT_MISSES_ALLOWED = 3


def runtime_dir() -> Path:
    """A private (0700) directory for the ipc socket, per user."""
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    path = Path(base) / f"mlx-gateway-{os.getuid()}"
    path.mkdir(mode=0o700, exist_ok=True)
    if path.stat().st_uid != os.getuid():
        raise PermissionError(f"{path} belongs to another user")
    path.chmod(0o700)
    return path


def default_address() -> str:
    return f"ipc://{runtime_dir() / 'gateway.sock'}"


def check_address(address: str) -> str:
    """Accept ipc:// anywhere and tcp:// as given; refuse anything else early and clearly."""
    if address.startswith("ipc://") or address.startswith("tcp://"):
        return address
    raise ValueError(f"unsupported ZeroMQ address {address!r}: use ipc://PATH or tcp://HOST:PORT")
