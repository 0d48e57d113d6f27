"""Responses over a WebSocket (GET /v1/responses upgraded), with the `websockets` client.

The same gateway, scripted worker and event checks as the SSE tests: each frame is one event,
the same objects in the same order.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest
from conftest import SCRIPTED, TINY_LONG
from processes import Stack
from responses_sse import check_stream, post_stream
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

MODEL = SCRIPTED
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}


def ws_url(stack: Stack) -> str:
    return stack.base_url.replace("http://", "ws://") + "/v1/responses"


def create(socket: ClientConnection, **body) -> list[dict]:
    """Send one response.create; the events up to its terminal one (or an error frame)."""
    socket.send(json.dumps({"type": "response.create", "model": MODEL, **NO_THINKING, **body}))
    events = []
    while True:
        event = json.loads(socket.recv(timeout=60))
        events.append(event)
        if event["type"] in ("response.completed", "response.incomplete", "response.failed", "error"):
            return events


def _shape(events: list[dict]) -> list[str]:
    """Event types, a run of deltas as one."""
    types = [e["type"] for e in events]
    return [t for i, t in enumerate(types) if not (t.endswith(".delta") and i and types[i - 1] == t)]


def _text(events: list[dict]) -> str:
    return "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")


def test_two_responses_on_one_connection_match_sse_and_continue_without_store(scripted_stack):
    with connect(ws_url(scripted_stack)) as socket:
        first = create(socket, input="SCRIPT:The password is swordfish.", store=False)
        assert first[-1]["type"] == "response.completed"
        check_stream(first)  # the same rules (and the SDK's strict types) as every SSE stream
        sse = post_stream(scripted_stack.base_url, {"model": MODEL, "input": "SCRIPT:The password is swordfish.",
                                                    **NO_THINKING})
        # The same events; how many deltas carry the text depends on how many tokens each decode
        # step brought (speculative decoding's wide steps bring several, as the worker's timing decides).
        assert _shape(first) == _shape(sse)
        assert _text(first) == _text(sse) == "The password is swordfish."
        # store: false, yet the connection keeps its last response to continue from.
        response_id = first[-1]["response"]["id"]
        second = create(socket, input="SCRIPT:You said swordfish.", previous_response_id=response_id, store=False)
        assert second[-1]["type"] == "response.completed", second[-1]
        assert second[-1]["response"]["previous_response_id"] == response_id
        # The first turn is in the second's prompt: more input tokens than the new message alone.
        assert second[-1]["response"]["usage"]["input_tokens"] > first[-1]["response"]["usage"]["input_tokens"]
    # Not stored: over HTTP it does not exist.
    assert httpx.get(f"{scripted_stack.base_url}/v1/responses/{response_id}").status_code == 404


def test_a_prewarm_creates_a_response_without_generating(scripted_stack):
    """Codex opens a connection with ``generate: false`` and waits for it (15 s at most)."""
    with connect(ws_url(scripted_stack)) as socket:
        started = time.monotonic()
        warm = create(socket, input="word " * 2000, generate=False, store=False)
        assert time.monotonic() - started < 1.0  # no prefill of the 2,000 words
        assert [e["type"] for e in warm] == ["response.created", "response.in_progress", "response.completed"]
        assert warm[-1]["response"]["output"] == []
        # What follows continues from it: its input is part of the context.
        then = create(socket, input="SCRIPT:Warm.", previous_response_id=warm[-1]["response"]["id"], store=False)
        assert then[-1]["type"] == "response.completed" and then[-1]["response"]["usage"]["input_tokens"] > 2000


def test_a_failed_continuation_evicts_the_response_it_continued_from(scripted_stack):
    """Open Responses' websocket-failed-continuation-evicts-cache: a tool output for no call,
    continuing from the connection's last response, is refused over the WebSocket as over HTTP,
    and that response can no longer be continued from."""
    with connect(ws_url(scripted_stack)) as socket:
        first = create(socket, input="SCRIPT:Ready.", store=False)
        response_id = first[-1]["response"]["id"]
        dangling = create(socket, previous_response_id=response_id, store=False,
                          input=[{"type": "function_call_output", "call_id": "call_nowhere", "output": "x"}])
        assert dangling[-1]["type"] == "error" and dangling[-1]["status"] == 400, dangling[-1]
        assert "call_nowhere" in dangling[-1]["error"]["message"]
        again = create(socket, input="SCRIPT:Again.", previous_response_id=response_id, store=False)
        assert again[-1]["error"]["code"] == "previous_response_not_found", again[-1]
        assert create(socket, input="SCRIPT:Still here.")[-1]["type"] == "response.completed"


def test_bad_frames_get_error_frames_and_the_connection_stays(scripted_stack):
    with connect(ws_url(scripted_stack)) as socket:
        socket.send("{not json")
        assert json.loads(socket.recv(timeout=10))["error"]["type"] == "invalid_request_error"
        socket.send(json.dumps({"type": "response.cancel"}))
        assert json.loads(socket.recv(timeout=10))["error"]["param"] == "type"
        socket.send(json.dumps({"type": "response.create", "input": "hi"}))  # no model
        error = json.loads(socket.recv(timeout=10))
        assert (error["type"], error["status"], error["error"]["param"]) == ("error", 400, "model")
        unknown = create(socket, input="hi", previous_response_id="resp_nowhere")
        assert unknown[-1]["error"]["code"] == "previous_response_not_found"
        assert create(socket, model="nope", input="hi")[-1]["status"] == 404
        assert create(socket, input="SCRIPT:Still here.")[-1]["type"] == "response.completed"


def test_closing_the_socket_stops_the_generation(tiny_stack):
    with connect(ws_url(tiny_stack)) as socket:
        socket.send(json.dumps({"type": "response.create", "model": TINY_LONG, "input": "go on",
                                "max_output_tokens": 50_000}))
        while json.loads(socket.recv(timeout=60))["type"] != "response.output_text.delta":
            pass
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        workers = httpx.get(f"{tiny_stack.base_url}/v1/workers").json()["data"]
        if all(w["in_flight"] == 0 and w["active"] == 0 for w in workers if w["model"] == TINY_LONG):
            return
        time.sleep(0.1)
    raise AssertionError(f"the generation kept running after the client left: {workers}")


def test_a_worker_crash_fails_the_response_and_the_connection_stays(fresh_stack, tiny_model_dir):
    fresh_stack.start_gateway()
    worker = fresh_stack.start_worker(str(tiny_model_dir), TINY_LONG, "--context-length", "100000",
                                      "--max-output-tokens", "0")
    fresh_stack.wait_for_models(TINY_LONG)
    with connect(ws_url(fresh_stack)) as socket:
        socket.send(json.dumps({"type": "response.create", "model": TINY_LONG, "input": "go on",
                                "max_output_tokens": 50_000}))
        events = []
        while True:
            events.append(json.loads(socket.recv(timeout=60)))
            if events[-1]["type"] == "response.output_text.delta" and len(events) == 8:
                worker.kill()
            if events[-1]["type"] == "response.failed":
                break
        assert events[-1]["response"]["error"]["code"] == "worker_crashed"
        fresh_stack.remove(worker)
        fresh_stack.start_worker(str(tiny_model_dir), TINY_LONG, "--context-length", "100000",
                                 "--max-output-tokens", "0")
        fresh_stack.wait_for_models(TINY_LONG)
        again = create(socket, model=TINY_LONG, input="hello", max_output_tokens=3)
        assert again[-1]["type"] == "response.incomplete"


def health_ok(stack: Stack) -> bool:
    try:
        return httpx.get(f"{stack.base_url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_keys_connection_limit_and_frame_size(tmp_path, tiny_model_dir):
    stack = Stack(tmp_path)
    try:
        stack.start_gateway("--api-key", "sk-ws", "--max-websockets", "2", "--max-request-mb", "1")
        deadline = time.monotonic() + 30
        while not health_ok(stack):
            assert time.monotonic() < deadline, stack.logs()
            time.sleep(0.1)
        with pytest.raises(InvalidStatus) as refused:
            connect(ws_url(stack), open_timeout=10)
        assert refused.value.response.status_code == 401
        headers = {"Authorization": "Bearer sk-ws"}
        with connect(ws_url(stack), additional_headers=headers), connect(ws_url(stack), additional_headers=headers):
            with connect(ws_url(stack), additional_headers=headers) as third:
                with pytest.raises(ConnectionClosed) as closed:
                    third.recv(timeout=10)
                assert closed.value.rcvd.code == 1013
        with connect(ws_url(stack), additional_headers=headers, max_size=None) as socket:
            socket.send(json.dumps({"type": "response.create", "model": "x", "input": "a" * (2 << 20)}))
            with pytest.raises(ConnectionClosed) as closed:
                socket.recv(timeout=10)
            assert closed.value.rcvd.code == 1009
    finally:
        stack.stop()
