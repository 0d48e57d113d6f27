"""The gateway's engine client against DEALER stand-ins: real ZeroMQ sockets, no model.

Each stand-in plays a worker by hand (Ready, Accepted, Output, Finished, or silence), so
the retry and dead-worker paths are exercised exactly, and fast.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import zmq
import zmq.asyncio

from gateway.api.errors import NO_WORKER, QUEUE_FULL, WORKER_CRASHED, EngineError
from gateway.app import create_app
from gateway.engine.client import EngineClient
from gateway.responses.store import MemoryStore
from protocol import (
    PROTOCOL_VERSION,
    Accepted,
    Delta,
    Error,
    Finished,
    Generate,
    Heartbeat,
    Message,
    Output,
    Ready,
    decode,
    encode,
)
from protocol.messages import ERROR_SHUTTING_DOWN

MODEL = "m"


class StandIn:
    """A DEALER that registers as a worker of MODEL and answers only when told to."""

    def __init__(self, context: zmq.asyncio.Context, address: str, name: str, max_sequences: int = 4,
                 **ready: Any):
        self.name = name
        self.socket = context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.IDENTITY, name.encode())
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(address)
        self.ready = dataclasses.replace(Ready(name, MODEL, PROTOCOL_VERSION, max_sequences, 4096, os.getpid()), **ready)

    async def register(self) -> None:
        await self.send(self.ready)

    async def send(self, message: Message) -> None:
        await self.socket.send(encode(message))

    async def receive(self, kind: type, timeout: float = 5.0) -> Message:
        """The next message of ``kind`` from the gateway (heartbeats skipped)."""
        async def next_of_kind() -> Message:
            while True:
                message = decode(await self.socket.recv())
                if isinstance(message, kind):
                    return message

        return await asyncio.wait_for(next_of_kind(), timeout)

    def crash(self) -> None:
        self.socket.close(linger=0)


def run(test: Callable[[EngineClient, Callable[..., Awaitable[StandIn]]], Awaitable[None]],
        tmp_path: Path, **client_options: float) -> None:
    """Run ``test(client, new_worker)`` on a fresh loop with a started engine client.
    ``new_worker(name, **ready)`` registers a stand-in; ``ready`` overrides fields of its Ready."""

    async def main() -> None:
        address = f"ipc://{tmp_path / 'gateway.sock'}"
        client = EngineClient(address, **client_options)  # type: ignore[arg-type]
        context = zmq.asyncio.Context()
        stand_ins: list[StandIn] = []

        async def new_worker(name: str, **ready: Any) -> StandIn:
            worker = StandIn(context, address, name, **ready)
            stand_ins.append(worker)
            await worker.register()
            for _ in range(200):
                if client.registry.get(name.encode()) is not None:
                    return worker
                await asyncio.sleep(0.01)
            raise AssertionError(f"{name} did not register")

        await client.start()
        try:
            await test(client, new_worker)
        finally:
            await client.close()
            for worker in stand_ins:
                worker.socket.close(linger=0)
            context.term()

    asyncio.run(main())


def generate(request_id: str) -> Generate:
    return Generate(request_id=request_id, messages=[{"role": "user", "content": "hi"}], max_tokens=4)


async def read_all(stream) -> str:
    text = ""
    async for batch in stream.batches():
        text += "".join(delta.text for delta in batch)
    return text


def test_a_request_whose_worker_dies_before_output_runs_on_another_replica(tmp_path):
    async def test(client: EngineClient, new_worker) -> None:
        first = await new_worker("first")
        submitted = asyncio.ensure_future(client.submit(MODEL, generate("r1")))
        await first.receive(Generate)  # the first replica got it ... and dies before accepting
        second = await new_worker("second")
        first.crash()
        request = await second.receive(Generate)
        assert request.request_id == "r1"
        await second.send(Accepted("r1", 3))
        stream = await submitted
        assert stream.worker is not None and stream.worker.worker_id == "second"
        await second.send(Output([Delta("r1", "hello", token_count=1)]))
        await second.send(Finished("r1", "stop", 3, 1))
        assert await read_all(stream) == "hello"
        assert client.load(MODEL) == 0

    run(test, tmp_path)


def test_a_worker_that_dies_after_output_fails_its_stream_with_worker_crashed(tmp_path):
    async def test(client: EngineClient, new_worker) -> None:
        worker = await new_worker("only")
        await new_worker("spare")  # a replica is there, but output already reached the client
        submitted = asyncio.ensure_future(client.submit(MODEL, generate("r1")))
        assert (await worker.receive(Generate)).request_id == "r1"  # equal load: the first registered
        await worker.send(Accepted("r1", 3))
        stream = await submitted
        await worker.send(Output([Delta("r1", "partial", token_count=1)]))
        batches = stream.batches()
        first = await batches.__anext__()
        assert first[0].text == "partial"
        worker.crash()
        with pytest.raises(EngineError) as failure:
            await asyncio.wait_for(batches.__anext__(), 5)
        assert failure.value.code == WORKER_CRASHED
        assert client.load(MODEL) == 0

    run(test, tmp_path)


def test_a_silent_worker_is_declared_dead_after_missed_heartbeats(tmp_path):
    async def test(client: EngineClient, new_worker) -> None:
        worker = await new_worker("hangs")
        submitted = asyncio.ensure_future(client.submit(MODEL, generate("r1")))
        await worker.receive(Generate)
        await worker.send(Accepted("r1", 3))
        stream = await submitted
        await worker.send(Output([Delta("r1", "x", token_count=1)]))
        # ... and then nothing, not even heartbeats: the socket stays open (a hang, not a crash).
        with pytest.raises(EngineError) as failure:
            await asyncio.wait_for(read_all(stream), 5)
        assert failure.value.code == WORKER_CRASHED and "heartbeat" in failure.value.message
        assert client.registry.get(b"hangs") is None

    run(test, tmp_path, heartbeat_interval=0.1, misses_allowed=3)


def test_no_worker_in_time_and_a_full_queue_are_engine_errors(tmp_path):
    async def test(client: EngineClient, new_worker) -> None:
        worker = await new_worker("w")
        worker.crash()
        for _ in range(200):
            if not client.registry.all():
                break
            await asyncio.sleep(0.01)
        with pytest.raises(EngineError) as failure:
            await client.submit(MODEL, generate("r1"))
        assert failure.value.code == NO_WORKER
        client.max_queue = 0
        await new_worker("w2")  # capacity 4, no queue beyond it
        pending = [asyncio.ensure_future(client.submit(MODEL, generate(f"q{i}"))) for i in range(4)]
        await asyncio.sleep(0.05)
        with pytest.raises(EngineError) as failure:
            await client.submit(MODEL, generate("one-too-many"))
        assert failure.value.code == QUEUE_FULL
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    run(test, tmp_path, queue_timeout=0.3)


def test_a_worker_error_before_acceptance_is_raised_by_submit(tmp_path):
    async def test(client: EngineClient, new_worker) -> None:
        worker = await new_worker("w")
        submitted = asyncio.ensure_future(client.submit(MODEL, generate("r1")))
        await worker.receive(Generate)
        await worker.send(Error("context_length_exceeded", "too long", "r1"))
        with pytest.raises(EngineError) as failure:
            await submitted
        assert failure.value.code == "context_length_exceeded" and client.load(MODEL) == 0

    run(test, tmp_path)


def test_a_draining_worker_shows_draining_and_gets_no_new_requests(tmp_path):
    async def test(client: EngineClient, new_worker) -> None:
        app = create_app(client, MemoryStore())
        draining = await new_worker("draining")
        await draining.send(Error(ERROR_SHUTTING_DOWN, "draining before shutdown"))
        await draining.send(Heartbeat("draining"))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as http:
            for _ in range(200):
                workers = (await http.get("/v1/workers")).json()["data"]
                if workers and workers[0]["state"] == "draining":
                    break
                await asyncio.sleep(0.01)
            assert [w["state"] for w in workers] == ["draining"]
            assert (await http.get("/v1/models")).json()["data"] == []
            health = (await http.get("/health")).json()
            assert (health["workers"], health["draining"]) == (0, 1)
            assert 'mlxgw_live_workers{model="m"} 0.0' in (await http.get("/metrics")).text
            # A new request waits for a ready worker rather than going to the draining one.
            submitted = asyncio.ensure_future(client.submit(MODEL, generate("r1")))
            ready = await new_worker("ready")
            assert (await ready.receive(Generate)).request_id == "r1"
            await ready.send(Accepted("r1", 1))
            stream = await submitted
            assert stream.worker is not None and stream.worker.worker_id == "ready"
            stream.close()

    run(test, tmp_path)
