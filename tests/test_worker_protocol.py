"""A real worker process against a ROUTER socket the test owns: the protocol without the gateway."""

from __future__ import annotations

import subprocess
import sys
import time

import msgpack
import pytest
import zmq
from processes import REPO_ROOT

from protocol import (
    PROTOCOL_VERSION,
    Accepted,
    Cancel,
    Finished,
    Generate,
    Heartbeat,
    Output,
    ProtocolError,
    Ready,
    SamplingParams,
    decode,
    encode,
)


@pytest.fixture
def worker_and_router(tmp_path, tiny_model_dir):
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    address = f"ipc://{tmp_path}/router.sock"
    router.bind(address)
    log = open(tmp_path / "worker.log", "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "worker", "--model", str(tiny_model_dir), "--served-name", "tiny",
         "--gateway", address, "--heartbeat-interval", "0.5"],
        cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        yield process, router, tmp_path / "worker.log"
    finally:
        process.kill()
        process.wait(10)
        log.close()
        router.close()
        context.term()


def receive(router: zmq.Socket, kind: type, timeout: float = 30.0):
    """The next message of type ``kind`` (others are skipped), with the sender's identity."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if router.poll(100):
            identity, frame = router.recv_multipart()
            message = decode(frame)
            if isinstance(message, kind):
                return identity, message
    raise TimeoutError(f"no {kind.__name__} within {timeout}s")


def test_worker_registers_streams_and_ignores_bad_frames(worker_and_router):
    process, router, log_path = worker_and_router
    identity, ready = receive(router, Ready)
    assert (ready.model, ready.protocol_version, ready.pid) == ("tiny", PROTOCOL_VERSION, process.pid)
    assert (ready.tool_calls, ready.thinking) == (False, False)  # the plain tiny template has neither
    assert identity == ready.worker_id.encode()
    _, heartbeat = receive(router, Heartbeat)
    assert heartbeat.sender == ready.worker_id

    for bad in (b"\xc1nonsense", msgpack.packb({"v": PROTOCOL_VERSION + 1, "t": "cancel", "request_id": "x"}),
                msgpack.packb({"v": PROTOCOL_VERSION, "t": "generate"})):
        with pytest.raises(ProtocolError):
            decode(bad)
        router.send_multipart([identity, bad])

    request = Generate("r1", max_tokens=6, prompt="Once upon a time", sampling=SamplingParams(temperature=0.0))
    router.send_multipart([identity, encode(request)])
    _, accepted = receive(router, Accepted)
    assert accepted.request_id == "r1" and accepted.prompt_tokens > 0
    text, tokens = "", 0
    while True:
        _, message = receive(router, (Output, Finished))
        if isinstance(message, Finished):
            break
        for delta in message.deltas:
            text, tokens = text + delta.text, tokens + delta.token_count
    assert message.finish_reason == "length" and message.completion_tokens == 6 == tokens
    assert text

    long_request = Generate("r2", max_tokens=200, prompt="Once", sampling=SamplingParams(temperature=0.0))
    router.send_multipart([identity, encode(long_request)])
    receive(router, Output)
    router.send_multipart([identity, encode(Cancel("r2"))])
    _, finished = receive(router, Finished)
    assert finished.request_id == "r2" and finished.finish_reason == "cancelled"
    assert finished.completion_tokens < 200

    assert process.poll() is None, "bad frames must not kill the worker"
    log = log_path.read_text()
    assert log.count("dropped a bad frame from the gateway") == 3 and "Traceback" not in log


def test_worker_registers_again_when_the_gateway_goes_quiet(worker_and_router):
    _, router, _ = worker_and_router
    receive(router, Ready)
    # We never answer with heartbeats, as if the gateway had restarted and forgotten the worker.
    _, again = receive(router, Ready, timeout=10)
    assert again.model == "tiny"
