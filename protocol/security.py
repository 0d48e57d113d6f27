"""CURVE for the ZeroMQ link when a worker is on another machine (``tcp://``).

Keys are ZeroMQ certificate files (``zmq.auth``): ``NAME.key`` holds a public key and
``NAME.key_secret`` the key pair. The gateway is the CURVE server: it proves itself with its
key pair and accepts the workers whose public keys sit in its authorized-keys directory. A
worker is a client: its own key pair plus the gateway's public key.

``mlx-gateway-keys DIR`` makes a gateway pair and a worker pair, and authorizes the worker.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth


def _key_pair(secret_file: Path) -> tuple[bytes, bytes]:
    if not secret_file.is_file():
        raise ValueError(f"CURVE key file not found: {secret_file}")
    public, secret = zmq.auth.load_certificate(str(secret_file))
    if secret is None:
        raise ValueError(f"{secret_file} holds no secret key (use the .key_secret file)")
    return public, secret


def _public_key(file: Path) -> bytes:
    if not file.is_file():
        raise ValueError(f"CURVE public key file not found: {file}")
    public, _ = zmq.auth.load_certificate(str(file))
    return public


@dataclass(frozen=True)
class CurveServer:
    """The gateway's side: its key pair, and the directory of worker public keys it accepts."""

    public: bytes
    secret: bytes
    authorized_dir: Path

    @classmethod
    def load(cls, secret_file: Path, authorized_dir: Path) -> CurveServer:
        if not authorized_dir.is_dir():
            raise ValueError(f"authorized-keys directory not found: {authorized_dir}")
        return cls(*_key_pair(secret_file), authorized_dir)

    def apply(self, socket: zmq.Socket) -> None:
        socket.curve_secretkey = self.secret
        socket.curve_publickey = self.public
        socket.curve_server = True


@dataclass(frozen=True)
class CurveClient:
    """A worker's side: its key pair, and the gateway's public key."""

    public: bytes
    secret: bytes
    server_public: bytes

    @classmethod
    def load(cls, secret_file: Path, server_key_file: Path) -> CurveClient:
        return cls(*_key_pair(secret_file), _public_key(server_key_file))

    def apply(self, socket: zmq.Socket) -> None:
        socket.curve_secretkey = self.secret
        socket.curve_publickey = self.public
        socket.curve_serverkey = self.server_public


def generate_keys(out_dir: Path, worker_names: list[str]) -> None:
    """A gateway key pair, one pair per worker, and authorized/ holding the workers' public keys."""
    out_dir.mkdir(parents=True, exist_ok=True)
    out_dir.chmod(0o700)
    authorized = out_dir / "authorized"
    authorized.mkdir(exist_ok=True)
    for name in ["gateway", *worker_names]:
        if (out_dir / f"{name}.key_secret").exists():
            raise ValueError(f"{out_dir / name}.key_secret exists; not overwriting keys")
        zmq.auth.create_certificates(str(out_dir), name)
        (out_dir / f"{name}.key_secret").chmod(0o600)
    for name in worker_names:
        shutil.copy(out_dir / f"{name}.key", authorized / f"{name}.key")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mlx-gateway-keys", description=generate_keys.__doc__)
    parser.add_argument("directory", type=Path, help="where to write the keys (created 0700)")
    parser.add_argument("--worker", action="append", default=None,
                        help="a worker key pair to make and authorize (repeatable; default: one named 'worker')")
    args = parser.parse_args(argv)
    workers = args.worker or ["worker"]
    try:
        generate_keys(args.directory, workers)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    d = args.directory
    print(f"gateway: --curve-secret-key {d}/gateway.key_secret --curve-authorized-keys {d}/authorized")
    for name in workers:
        print(f"worker {name}: --curve-secret-key {d}/{name}.key_secret --curve-server-key {d}/gateway.key "
              f"(copy both files to the worker's machine)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
