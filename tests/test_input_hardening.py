"""Hostile input, each exactly as it was reproduced against a gateway: lone surrogates, deep
nesting, malformed blocks, huge names, WebSocket frames that crashed the handler, a frame flood
and a client that never reads. Each is a 4xx in the API's own error shape (or an error frame),
never a 500 or a dropped connection, and the connection stays usable after.

One stack for the module, its gateway with small WebSocket limits (2 queued frames of 1 MB
together, a 2 s send timeout) and a ``tiny-long`` worker whose output only its context bounds.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import TINY, TINY_LONG
from processes import Stack
from websockets.sync.client import connect
from websockets.sync.connection import Connection

from gateway.api.errors import APIError
from gateway.http.json_body import (
    MAX_DEPTH,
    check_json,
    load_json,
    lone_surrogate_path,
    nesting_depth,
)

SEND_TIMEOUT_S = 2
HELLO = [{"role": "user", "content": "Hello"}]
TERMINAL = {"response.completed", "response.incomplete", "response.failed", "error"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Stack]:
    stack = Stack(tmp_path_factory.mktemp("hardened"))
    try:
        stack.start_gateway("--send-timeout", str(SEND_TIMEOUT_S), "--max-websocket-queue", "2",
                            "--max-websocket-queue-mb", "1")
        stack.start_worker(str(tiny_model_dir), TINY, "--max-sequences", "8")
        stack.start_worker(str(tiny_model_dir), TINY_LONG, "--context-length", "100000", "--max-output-tokens", "0")
        stack.wait_for_models(TINY, TINY_LONG)
        yield stack
    finally:
        stack.stop()


def post_raw(stack: Stack, path: str, body: bytes) -> httpx.Response:
    return httpx.post(f"{stack.base_url}{path}", content=body, headers={"content-type": "application/json"},
                      timeout=60)


def assert_refused(response: httpx.Response, path: str, param: str | None, code: str | None = None,
                   status: int = 400) -> str:
    """The API's own error shape, naming ``param``; returns the message."""
    assert response.status_code == status, response.text
    body = response.json()
    if path.startswith("/v1/messages"):
        assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error", body
        assert param is None or param in body["error"]["message"], body
        return str(body["error"]["message"])
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error", body
    assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return str(error["message"])


def deep_schema(levels: int) -> dict:
    """A JSON Schema ``levels`` objects deep: 2 * levels + 1 levels of JSON."""
    schema: dict = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


# --- the checks themselves ------------------------------------------------------------


def test_nesting_depth_reads_the_raw_text():
    assert nesting_depth(b'{"a": [1, {"b": "[[[[{{{{"}], "c": "\\"]]]"}') == 3
    assert nesting_depth(b"[" * 100_000) == 100_000  # unclosed: what a parser would recurse into
    assert nesting_depth(b'"unterminated [[[[') == 0
    assert nesting_depth(b"5") == 0
    nested = json.dumps(json.loads("[" * 64 + "]" * 64)).encode()
    check_json(nested)  # 64 levels pass
    with pytest.raises(APIError) as refused:
        check_json(b'{"metadata": ' + b"[" * 65 + b"]" * 65 + b"}")
    assert refused.value.param == "metadata.0.0.0.0.0.0.0"


def test_a_4mb_adversarial_body_is_measured_quickly():
    chains = (b"[" * 64 + b"]" * 64 + b",") * 30_000
    quoted = b'"\\' * 2_000_000  # escapes that never end a string
    for body in (b"[" + chains[:-1] + b"]", quoted + b"[" * 100):
        started = time.monotonic()
        nesting_depth(body)
        assert time.monotonic() - started < 5


def test_lone_surrogates_are_found_with_their_path():
    assert lone_surrogate_path({"a": ["ok", "\U0001f600", {"b": "x\ud800"}]}) == "a.2.b"
    assert lone_surrogate_path({"a": {"\udc00key": 1}}) == "a.\\udc00key"
    assert lone_surrogate_path({"a": "é", "b": "😀"}) is None
    assert load_json('{"a": "\\ud83d\\ude00"}') == {"a": "😀"}  # an escaped pair is one character
    with pytest.raises(APIError) as refused:
        load_json(b'{"a": ["\xed\xa0\x80"]}')
    assert refused.value.param == "a.0"


def test_utf16_bodies_are_checked_alike():
    """JSON readers take UTF-16 and UTF-32 too (FastAPI's does): the checks read them as UTF-8."""
    raw_surrogate = '{"a": "'.encode("utf-16-le") + b"\x00\xd8" + '"}'.encode("utf-16-le")
    for body, param in ((raw_surrogate, "a"), ('{"b": ["\\udfff"]}'.encode("utf-16"), "b.0"),
                        (("[" * 100 + "]" * 100).encode("utf-32"), "0.0.0.0.0.0.0.0")):
        with pytest.raises(APIError) as refused:
            check_json(body)
        assert refused.value.param == param


# --- 1. lone surrogates ---------------------------------------------------------------

MESSAGES = b'{"model":"%s","max_tokens":2,"messages":[{"role":"user","content":"hi"}],%s}'
SURROGATE_BODIES = [
    # The reproducer, exactly.
    ("/v1/messages", b'{"model":"smollm2-135m","max_tokens":2,"messages":[{"role":"user","content":"\\ud800"}]}',
     "messages.0.content"),
    ("/v1/messages", b'{"model":"tiny","max_tokens":2,"messages":[{"role":"user","content":"\xed\xa0\x80"}]}',
     "messages.0.content"),
    ("/v1/messages", MESSAGES % (b"tiny", b'"system":"\\ud800"'), "system"),
    ("/v1/messages", MESSAGES % (b"tiny", b'"stop_sequences":["\\udfff"]'), "stop_sequences.0"),
    ("/v1/messages", MESSAGES % (b"tiny", b'"tools":[{"name":"f\\ud800","input_schema":{"type":"object"}}]'),
     "tools.0.name"),
    ("/v1/messages", MESSAGES % (b"\\ud800", b'"stream":true'), "model"),
    ("/v1/messages/count_tokens", b'{"model":"tiny","messages":[{"role":"user","content":"hi"}],"system":"\\ud800"}',
     "system"),
    ("/v1/chat/completions", b'{"model":"tiny","messages":[{"role":"user","content":"\\ud800"}]}',
     "messages.0.content"),
    ("/v1/chat/completions", b'{"model":"tiny","messages":[{"role":"user","content":"hi"}],"stop":["\\udfff"]}',
     "stop.0"),
    ("/v1/chat/completions", b'{"model":"tiny","messages":[{"role":"user","content":"hi"}],'
                             b'"tools":[{"type":"function","function":{"name":"\\ud800"}}]}', "tools.0.function.name"),
    ("/v1/chat/completions", b'{"model":"\\ud800","messages":[{"role":"user","content":"hi"}]}', "model"),
    ("/v1/chat/completions", b'{"model":"tiny","messages":[{"role":"user","content":"hi"}],'
                             b'"metadata":{"\\ud800":"key"}}', "metadata.\\ud800"),
    ("/v1/completions", b'{"model":"tiny","prompt":"\\ud800","max_tokens":2}', "prompt"),
    ("/v1/completions", '{"model":"tiny","prompt":"\\ud800","max_tokens":2}'.encode("utf-16"), "prompt"),
    ("/v1/responses", b'{"model":"tiny","input":"\\ud800","max_output_tokens":2}', "input"),
    ("/v1/responses", b'{"model":"tiny","input":"hi","instructions":"\xed\xb0\x80","stream":true}', "instructions"),
    ("/v1/responses/compact", b'{"model":"tiny","input":"\\ud800"}', "input"),
]


@pytest.mark.parametrize("path, body, param", SURROGATE_BODIES, ids=[
    "messages-reproducer", "messages-raw-bytes", "messages-system", "messages-stop", "messages-tool-name",
    "messages-model", "count-tokens-system", "chat-content", "chat-stop", "chat-tool-name", "chat-model",
    "chat-key", "completions-prompt", "completions-utf16", "responses-input", "responses-instructions-stream",
    "compact-input"])
def test_a_lone_surrogate_is_a_400_naming_the_field(stack, path, body, param):
    message = assert_refused(post_raw(stack, path, body), path, param, "invalid_unicode")
    assert "surrogate" in message
    # With no content type FastAPI still reads JSON: the check must too.
    bare = httpx.post(f"{stack.base_url}{path}", content=body, timeout=60)
    assert_refused(bare, path, param, "invalid_unicode")
    # The gateway is fine: the same route answers a good request.
    ok = httpx.post(f"{stack.base_url}/v1/chat/completions", json={"model": TINY, "messages": HELLO,
                                                                    "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200, ok.text


# --- 2. deep nesting ------------------------------------------------------------------

DEEP = deep_schema(150)
DEEP_BODIES = [
    ("/v1/messages", {"max_tokens": 2, "messages": HELLO, "tools": [{"name": "f", "input_schema": DEEP}]}, "tools"),
    ("/v1/messages", {"max_tokens": 2, "messages": HELLO, "output_config": {"format": {
        "type": "json_schema", "schema": DEEP}}}, "output_config"),
    ("/v1/responses", {"input": "hi", "tools": [{"type": "function", "name": "f", "parameters": DEEP}]},
     "tools.0.parameters.properties.a.properties.a.properties"),
    ("/v1/responses", {"input": "hi", "text": {"format": {"type": "json_schema", "name": "x", "schema": DEEP}}},
     "text.format.schema.properties.a.properties.a.properties"),
    ("/v1/chat/completions", {"messages": HELLO, "tools": [{"type": "function", "function": {
        "name": "f", "parameters": DEEP}}]}, "tools.0.function.parameters.properties.a.properties.a"),
    ("/v1/chat/completions", {"messages": HELLO, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": DEEP}}}, "response_format.json_schema.schema.properties.a.properties.a.properties"),
    ("/v1/responses/compact", {"input": "hi", "tools": [{"type": "function", "name": "f", "parameters": DEEP}]},
     "tools.0.parameters.properties.a.properties.a.properties"),
]


@pytest.mark.parametrize("path, body, param", DEEP_BODIES, ids=[
    "messages-tool", "messages-format", "responses-tool", "responses-format", "chat-tool", "chat-format",
    "compact-tool"])
def test_a_150_level_schema_is_a_400(stack, path, body, param):
    for stream in (False, True):
        r = httpx.post(f"{stack.base_url}{path}", json={"model": TINY, **body, "stream": stream}, timeout=60)
        message = assert_refused(r, path, None if path.startswith("/v1/messages") else param, "nesting_too_deep")
        assert f"more than {MAX_DEPTH} levels" in message and param in message


def test_nesting_up_to_the_limit_is_served(stack):
    # 3 levels of body around 61 of schema: 64 in all, the limit.
    tools = [{"name": "f", "input_schema": deep_schema(30)}]
    r = httpx.post(f"{stack.base_url}/v1/messages", json={"model": TINY, "max_tokens": 2, "messages": HELLO,
                                                          "tools": tools}, timeout=60)
    assert r.status_code == 200, r.text
    tools = [{"name": "f", "input_schema": {"type": "object", "properties": {"a": deep_schema(30)}}}]
    r = httpx.post(f"{stack.base_url}/v1/messages", json={"model": TINY, "max_tokens": 2, "messages": HELLO,
                                                          "tools": tools}, timeout=60)
    assert_refused(r, "/v1/messages", "tools.0.input_schema")


@pytest.mark.parametrize("body", [b"[" * 100_000, b'{"model": "tiny", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}"],
                         ids=["unclosed", "closed"])
def test_a_deeply_nested_body_is_a_400(stack, body):
    for path in ("/v1/chat/completions", "/v1/messages", "/v1/responses"):
        r = post_raw(stack, path, body)
        assert r.status_code == 400, r.text
        assert "64 levels" in r.text


def compaction(payload: bytes) -> str:
    return "mlxgw.compaction.v1:" + base64.urlsafe_b64encode(payload).decode()


@pytest.mark.parametrize("payload", [
    b'{"summary": "x", "pad": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b"[" * 100_000,
    b'{"summary": "\\ud800"}',
], ids=["deep-closed", "deep-unclosed", "surrogate"])
def test_a_forged_compaction_item_is_a_400(stack, payload):
    item = {"type": "compaction", "encrypted_content": compaction(payload)}
    for path, extra in (("/v1/responses", {"max_output_tokens": 2}), ("/v1/responses/compact", {})):
        r = httpx.post(f"{stack.base_url}{path}", json={"model": TINY, "input": [item, *HELLO], **extra},
                       timeout=60)
        assert_refused(r, path, "input[0].encrypted_content", "invalid_encrypted_content")


# --- 3. a document whose content is not a list ----------------------------------------


def test_a_document_whose_content_is_not_a_list_is_a_400(stack):
    document = {"type": "document", "source": {"type": "content", "content": 5}}
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        r = httpx.post(f"{stack.base_url}{path}", json={"model": TINY, "max_tokens": 2, "messages": [
            {"role": "user", "content": [document]}]}, timeout=60)
        assert_refused(r, path, "messages.0.content.0.source.content")
    listed = {"type": "document", "source": {"type": "content", "content": ["not a block"]}}
    r = httpx.post(f"{stack.base_url}/v1/messages", json={"model": TINY, "max_tokens": 2, "messages": [
        {"role": "user", "content": [listed]}]}, timeout=60)
    assert_refused(r, "/v1/messages", "messages.0.content.0.source.content.0")


# --- 7. an unknown model's name is not echoed whole -----------------------------------


def test_the_404_for_a_huge_model_name_is_short(stack):
    name = "m" * (1 << 20)
    for path, body in (("/v1/chat/completions", {"messages": HELLO}), ("/v1/messages", {"messages": HELLO,
                                                                                        "max_tokens": 2}),
                       ("/v1/responses", {"input": "hi"})):
        r = httpx.post(f"{stack.base_url}{path}", json={"model": name, **body}, timeout=60)
        assert r.status_code == 404 and len(r.content) < 2000, (r.status_code, len(r.content))
        assert "m" * 256 + "…" in r.text
    with connect(ws_url(stack)) as ws:
        ws.send(json.dumps({"type": "response.create", "model": name, "input": "hi"}))
        error = json.loads(ws.recv(timeout=60))
        assert error["status"] == 404 and len(error["error"]["message"]) < 2000


# --- 8. what the schema says is what the server does ----------------------------------


@pytest.mark.parametrize("path, body, field", [
    ("/v1/chat/completions", {"messages": HELLO}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi"}, "max_tokens"),
    ("/v1/messages", {"messages": HELLO}, "max_tokens"),
    ("/v1/responses", {"input": "hi"}, "max_output_tokens"),
])
def test_an_integral_float_is_an_integer(stack, path, body, field):
    ok = httpx.post(f"{stack.base_url}{path}", json={"model": TINY, **body, field: 3.0}, timeout=60)
    assert ok.status_code == 200, ok.text
    for bad in (3.5, "3", True):
        r = httpx.post(f"{stack.base_url}{path}", json={"model": TINY, **body, field: bad}, timeout=60)
        assert_refused(r, path, field)


def test_a_405_lists_every_method_of_the_path(stack):
    r = httpx.request("OPTIONS", f"{stack.base_url}/v1/responses/resp_x", timeout=30)
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"
    assert {"GET", "DELETE"} <= {m.strip() for m in r.headers["allow"].split(",")}
    r = httpx.request("PUT", f"{stack.base_url}/v1/chat/completions", timeout=30)
    assert r.status_code == 405 and r.headers["allow"] == "POST"


def test_openapi_documents_the_metrics_content_type(stack):
    schema = httpx.get(f"{stack.base_url}/openapi.json", timeout=30).json()
    documented = schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    served = httpx.get(f"{stack.base_url}/metrics", timeout=30).headers["content-type"]
    assert list(documented) == [served]
    max_tokens = schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]["max_tokens"]
    assert {"minimum": 1, "type": "integer"}.items() <= max_tokens["anyOf"][0].items()


# --- 4. WebSocket frames that crashed the handler -------------------------------------


def ws_url(stack: Stack) -> str:
    return stack.base_url.replace("http://", "ws://") + "/v1/responses"


def until_terminal(ws: Connection, timeout: float = 60) -> list[dict]:
    events = []
    while True:
        events.append(json.loads(ws.recv(timeout=timeout)))
        if events[-1]["type"] in TERMINAL:
            return events


def create(ws: Connection, **body) -> list[dict]:
    ws.send(json.dumps({"type": "response.create", "model": TINY, **body}))
    return until_terminal(ws)


def test_bad_websocket_frames_get_error_frames_and_the_connection_stays(stack):
    frames: list[tuple[str | bytes, str | None, str | None]] = [
        ("[" * 100_000, "0.0.0.0.0.0.0.0", "nesting_too_deep"),
        (json.dumps({"type": "response.create", "model": TINY, "input": "hi",
                     "metadata": {"a": json.loads("[" * 100 + "]" * 100)}}), "metadata.a.0.0.0.0.0.0", "nesting_too_deep"),
        ('{"type":"response.create","model":"\\ud800","input":"hi"}', "model", "invalid_unicode"),
        ('{"type":"response.create","model":"tiny","input":"hi","instructions":"\\udc00"}', "instructions",
         "invalid_unicode"),
        (json.dumps({"type": "response.create", "model": TINY, "input": "hi", "tools": [
            {"type": "function", "name": "f", "parameters": DEEP}]}),
         "tools.0.parameters.properties.a.properties.a.properties", "nesting_too_deep"),
        (json.dumps({"type": "response.create", "model": TINY, "input": [
            {"type": "compaction", "encrypted_content": compaction(b"[" * 100_000)}]}),
         "input[0].encrypted_content", "invalid_encrypted_content"),
        (json.dumps({"type": "x" * 100_000}), "type", None),
        (b'{"type":"response.create","model":"tiny","input":"\xed\xa0\x80"}', "input", "invalid_unicode"),
    ]
    with connect(ws_url(stack), max_size=None) as ws:
        for frame, param, code in frames:
            ws.send(frame)
            error = json.loads(ws.recv(timeout=60))
            assert (error["type"], error["status"]) == ("error", 400), error
            assert (error["error"]["param"], error["error"]["code"]) == (param, code), error
            assert len(error["error"]["message"]) < 1000
            # The connection stays usable: a following valid response.create works.
            assert create(ws, input="hi", max_output_tokens=2)[-1]["type"] == "response.incomplete"


# --- 5. frames queued behind a running response ---------------------------------------


def test_frames_queued_behind_a_running_response_are_bounded(stack):
    padding = "x" * (600 << 10)  # two of these are more than the 1 MB the queue may hold
    small = json.dumps({"type": "response.create", "model": TINY, "input": "hi", "max_output_tokens": 2})
    big = json.dumps({"type": "response.create", "model": TINY, "input": "hi", "max_output_tokens": 2,
                      "padding": padding})
    with connect(ws_url(stack), max_size=None) as ws:
        ws.send(json.dumps({"type": "response.create", "model": TINY_LONG, "input": "go on",
                            "max_output_tokens": 3000}))
        while json.loads(ws.recv(timeout=60))["type"] != "response.output_text.delta":
            pass
        # Queued: big (600 KB), then small; refused: the second big (over 1 MB together), and the
        # second small (a third frame).
        for frame in (big, big, small, small):
            ws.send(frame)
        terminals: list[str] = []
        refused: list[dict] = []
        while len(terminals) < 3:
            event = json.loads(ws.recv(timeout=120))
            if event["type"] == "error":
                assert (event["status"], event["error"]["code"]) == (429, "websocket_queue_full"), event
                refused.append(event)
            elif event["type"] in TERMINAL:
                terminals.append(event["type"])
        assert len(refused) == 2
        # The running one (3000 tokens, unless the model ends first) and the two queued.
        assert terminals[0] in ("response.completed", "response.incomplete")
        assert terminals[1:] == ["response.incomplete"] * 2
        assert create(ws, input="hi", max_output_tokens=2)[-1]["type"] == "response.incomplete"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the gateway's memory from /proc")
def test_a_frame_flood_leaves_the_gateways_memory_bounded(stack):
    """The reproducer: sixty ~3.9 MB frames behind a running response took the gateway from 96 to
    323 MB. Now all but the queue's few are refused, and the gateway's memory stays put."""
    gateway = next(p for p in stack.processes if p.name == "gateway").popen.pid
    flood = json.dumps({"type": "response.create", "model": TINY, "input": "hi", "max_output_tokens": 2,
                        "padding": "x" * (3_900 << 10)})
    with connect(ws_url(stack), max_size=None) as ws:
        ws.send(json.dumps({"type": "response.create", "model": TINY_LONG, "input": "go on",
                            "max_output_tokens": 2000}))
        while json.loads(ws.recv(timeout=60))["type"] != "response.output_text.delta":
            pass
        before = rss_mb(gateway)
        for _ in range(60):
            ws.send(flood)
        refused, peak = 0, before
        while refused < 58:  # the queue (2 frames, 1 MB: the first waiting frame may be any size) holds one
            event = json.loads(ws.recv(timeout=120))
            refused += event["type"] == "error" and event["error"]["code"] == "websocket_queue_full"
            peak = max(peak, rss_mb(gateway))
        print(f"gateway RSS {before:.0f} MB before the flood, {peak:.0f} MB at most during it")
        assert peak - before < 60, f"the gateway grew from {before:.0f} to {peak:.0f} MB"


# --- 6. a client that stops reading ---------------------------------------------------


def masked_text_frame(text: str) -> bytes:
    payload, mask = text.encode(), os.urandom(4)
    size = len(payload)
    if size < 126:
        head = bytes([0x81, 0x80 | size])
    elif size < 1 << 16:
        head = bytes([0x81, 0x80 | 126]) + struct.pack("!H", size)
    else:
        head = bytes([0x81, 0x80 | 127]) + struct.pack("!Q", size)
    return head + mask + bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))


def close_code(stream: bytes) -> int | None:
    """The code of the close frame in a server's frame stream (unmasked frames), if it has
    arrived whole."""
    at = 0
    while True:
        if at + 2 > len(stream):
            return None
        opcode, size = stream[at] & 0x0F, stream[at + 1] & 0x7F
        at += 2
        extended = {126: 2, 127: 8}.get(size, 0)
        if at + extended > len(stream):
            return None
        if extended:
            size = int.from_bytes(stream[at:at + extended], "big")
            at += extended
        if opcode == 0x8:
            return int.from_bytes(stream[at:at + 2], "big") if at + 2 <= len(stream) else None
        at += size


def long_generation_running(stack: Stack) -> bool:
    workers = httpx.get(f"{stack.base_url}/v1/workers", timeout=10).json()["data"]
    return any(w["active"] or w["in_flight"] for w in workers if w["model"] == TINY_LONG)


def generation_stops(stack: Stack) -> float:
    """Wait for the long generation to start, then to stop (for a client that reads nothing);
    returns how long it ran."""
    deadline = time.monotonic() + 60
    while not long_generation_running(stack):
        assert time.monotonic() < deadline, "the generation never started"
        time.sleep(0.1)
    started = time.monotonic()
    while long_generation_running(stack):
        assert time.monotonic() < started + 90, "the generation went on for a client that reads nothing"
        time.sleep(0.2)
    return time.monotonic() - started


def test_an_sse_client_that_stops_reading_is_dropped_and_its_generation_stopped(stack):
    """The same over HTTP: a streamed chat completion whose client reads nothing."""
    body = json.dumps({"model": TINY_LONG, "messages": HELLO, "max_tokens": 50_000, "stream": True}).encode()
    with socket.socket() as raw:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        raw.settimeout(60)
        raw.connect(("127.0.0.1", stack.port))
        raw.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{stack.port}\r\n"
                    f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        print(f"stopped {generation_stops(stack):.1f}s after it started")
    assert "read nothing of its stream for 2 s" in stack.logs()
    # Streams of clients that read go on as before.
    with httpx.stream("POST", f"{stack.base_url}/v1/chat/completions", timeout=60,
                      json={"model": TINY, "messages": HELLO, "max_tokens": 3, "stream": True}) as reply:
        assert [line for line in reply.iter_lines() if line][-1] == "data: [DONE]"


def test_a_client_that_stops_reading_is_stopped_and_closed(stack):
    """A raw client with a tiny receive buffer asks for a long generation, then reads nothing."""
    with socket.socket() as raw:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        raw.settimeout(60)
        raw.connect(("127.0.0.1", stack.port))
        key = base64.b64encode(os.urandom(16)).decode()
        raw.sendall(f"GET /v1/responses HTTP/1.1\r\nHost: 127.0.0.1:{stack.port}\r\nUpgrade: websocket\r\n"
                    f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
        handshake = b""
        while b"\r\n\r\n" not in handshake:
            handshake += raw.recv(1)
        assert handshake.startswith(b"HTTP/1.1 101"), handshake
        # ~300 tokens a second here: 50,000 would run for minutes if nothing stopped it.
        raw.sendall(masked_text_frame(json.dumps({"type": "response.create", "model": TINY_LONG, "input": "go on",
                                                  "max_output_tokens": 50_000})))
        stopped_after = generation_stops(stack)
        # Now read: whatever was sent, then the end of the connection (a 1008 close frame, unless
        # the close could not get through and the connection was dropped).
        received = b""
        try:
            while close_code(received) is None and (chunk := raw.recv(1 << 16)):
                received += chunk
        except ConnectionResetError:
            pass
        code = close_code(received)
        assert code in (1008, None), code
        print(f"stopped {stopped_after:.1f}s after it started; {len(received)} bytes unread; close code {code}")
    assert "read nothing for 2 s" in stack.logs()
    # The gateway serves WebSockets as before.
    with connect(ws_url(stack)) as ws:
        assert create(ws, input="hi", max_output_tokens=2)[-1]["type"] == "response.incomplete"


def test_a_body_refused_before_routing_is_counted_under_its_route(stack):
    deep = b'{"model": "tiny", "messages": ' + b"[" * 200 + b"]" * 200 + b"}"
    assert post_raw(stack, "/v1/chat/completions", deep).status_code == 400
    metrics = httpx.get(f"{stack.base_url}/metrics", timeout=30).text
    assert 'mlxgw_requests_total{model="",route="/v1/chat/completions",status="400"}' in metrics \
        or 'mlxgw_requests_total{route="/v1/chat/completions",model="",status="400"}' in metrics, \
        [line for line in metrics.splitlines() if line.startswith("mlxgw_requests_total")]
