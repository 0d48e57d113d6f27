"""A worker with no model: answers every Generate with N one-token deltas as fast as the
protocol allows. Measures what the gateway alone can frame (bench/run.py --only framing)."""

from __future__ import annotations

import argparse
import os
import time

import zmq

from protocol import PROTOCOL_VERSION, Accepted, Delta, Finished, Generate, Heartbeat, Output, Ready, decode, encode


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gateway", required=True)
    parser.add_argument("--served-name", default="synthetic")
    parser.add_argument("--tokens", type=int, default=2000, help="deltas per request")
    args = parser.parse_args()
    worker_id = f"{args.served_name}-{os.getpid()}"
    context = zmq.Context()
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.IDENTITY, worker_id.encode())
    dealer.connect(args.gateway)
    dealer.send(encode(Ready(worker_id, args.served_name, PROTOCOL_VERSION, 64, 1 << 20, os.getpid())))
    running: dict[str, int] = {}  # request id -> tokens left
    asked: dict[str, int] = {}  # request id -> tokens it gets in all
    next_heartbeat = 0.0
    while True:
        timeout = 0 if running else 100
        if dealer.poll(timeout):
            while True:
                try:
                    message = decode(dealer.recv(zmq.NOBLOCK))
                except zmq.Again:
                    break
                if isinstance(message, Generate):
                    asked[message.request_id] = running[message.request_id] = message.max_tokens or args.tokens
                    dealer.send(encode(Accepted(message.request_id, 10)))
                elif not isinstance(message, Heartbeat):  # a Cancel
                    running.pop(getattr(message, "request_id", ""), None)
                    asked.pop(getattr(message, "request_id", ""), None)
        if running:  # one "engine step": a token for every running request, in one frame
            dealer.send(encode(Output([Delta(rid, " tok", token_count=1) for rid in running])))
            for rid in list(running):
                running[rid] -= 1
                if running[rid] <= 0:
                    del running[rid]
                    dealer.send(encode(Finished(rid, "length", 10, asked.pop(rid))))
        now = time.monotonic()
        if now >= next_heartbeat:
            dealer.send(encode(Heartbeat(worker_id, len(running), 0)))
            next_heartbeat = now + 1.0


if __name__ == "__main__":
    main()
