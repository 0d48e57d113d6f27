"""What an operator sharing the gateway relies on: bounded input, private files, closed idle
sockets, and an OpenAPI document that says what the server really answers."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import TINY
from processes import Stack

from gateway.responses.store import SQLiteStore, StoredResponse

HELLO = [{"role": "user", "content": "Hello"}]
HUGE = 10**30
ROUTES = {
    "/v1/chat/completions": ({"model": TINY, "messages": HELLO}, "max_tokens"),
    "/v1/completions": ({"model": TINY, "prompt": "Hi"}, "max_tokens"),
    "/v1/responses": ({"model": TINY, "input": "Hi"}, "max_output_tokens"),
    "/v1/messages": ({"model": TINY, "messages": HELLO}, "max_tokens"),
}


def stored_responses(stack: Stack) -> float:
    for line in httpx.get(f"{stack.base_url}/metrics").text.splitlines():
        if line.startswith("mlxgw_stored_responses "):
            return float(line.split()[1])
    raise AssertionError("no mlxgw_stored_responses")


@pytest.mark.parametrize("path", list(ROUTES))
def test_a_huge_max_tokens_is_a_400_naming_the_field(tiny_stack, path):
    body, field = ROUTES[path]
    before = stored_responses(tiny_stack)
    for stream in (False, True):
        r = httpx.post(f"{tiny_stack.base_url}{path}", json={**body, field: HUGE, "stream": stream}, timeout=30)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and field in error.get("param", error["message"])
    assert stored_responses(tiny_stack) == before  # nothing stored for a request refused at the edge


@pytest.mark.parametrize("path", list(ROUTES))
def test_an_oversized_body_is_refused_at_once(tiny_stack, path):
    body, _ = ROUTES[path]
    padding = "word " * (1 << 20)  # 5 MB, over the default 4 MB limit
    started = time.monotonic()
    r = httpx.post(f"{tiny_stack.base_url}{path}", json={**body, "padding": padding}, timeout=30)
    assert r.status_code == 413 and time.monotonic() - started < 2.0, r.text
    if path == "/v1/messages":
        assert r.json()["error"]["type"] == "request_too_large"
    else:
        assert r.json()["error"]["code"] == "request_too_large"


def test_the_store_is_private_to_its_user(tmp_path):
    path = tmp_path / "data" / "nested" / "responses.db"

    async def use() -> None:
        store = SQLiteStore(path)
        await store.put(StoredResponse({"id": "resp_1", "output": []}, [], []))
        await store.close()

    asyncio.run(use())
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    for name in ("responses.db", "responses.db-wal", "responses.db-shm"):
        if (path.parent / name).exists():
            assert stat.S_IMODE((path.parent / name).stat().st_mode) == 0o600, name
    # An existing database made before this (0644) is tightened on open.
    os.chmod(path, 0o644)
    asyncio.run(use())
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_an_idle_connection_is_closed(tmp_path):
    stack = Stack(tmp_path)
    try:
        stack.start_gateway("--idle-timeout", "1")
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"{stack.base_url}/health", timeout=2)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, stack.logs()
                time.sleep(0.1)
        with socket.create_connection(("127.0.0.1", stack.port), timeout=10) as idle:
            started = time.monotonic()
            assert idle.recv(1) == b""  # closed by the server, having sent nothing
            assert 0.5 < time.monotonic() - started < 5
    finally:
        stack.stop()


def test_openapi_says_what_the_server_answers(tiny_stack):
    schema = httpx.get(f"{tiny_stack.base_url}/openapi.json").json()
    assert '"422"' not in str(schema).replace("'", '"')
    responses = schema["paths"]["/v1/responses"]["post"]["responses"]
    assert {"200", "400", "401", "404", "413", "429", "500", "503"} <= set(responses)
    assert responses["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/OpenAIError")
    assert "text/event-stream" in responses["200"]["content"]
    messages = schema["paths"]["/v1/messages"]["post"]["responses"]
    assert "529" in messages and messages["400"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/AnthropicError")


def test_schemathesis_finds_no_server_error_or_undocumented_status(tiny_stack, tmp_path):
    """Generated requests against every operation of the live gateway and its worker: no 500,
    no status, content type or ``Allow`` header the schema does not document. Besides the bodies
    the schema describes, ``schemathesis_hooks.py`` sends them with a lone surrogate in a string
    and with a value buried 100 arrays deep."""
    command = [str(Path(sys.executable).parent / "schemathesis"), "run", f"{tiny_stack.base_url}/openapi.json",
               "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,unsupported_method,"
               "allow_header_conformance", "--max-examples", "10", "--request-timeout", "60",
               "--generation-deterministic"]
    env = dict(os.environ, SCHEMATHESIS_HOOKS=str(Path(__file__).parent / "schemathesis_hooks.py"))
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
    assert " passed" in result.stdout


def test_a_background_response_survives_a_gateway_kill_as_failed(fresh_stack, tiny_model_dir):
    fresh_stack.start_gateway()
    fresh_stack.start_worker(str(tiny_model_dir), "tiny-long", "--context-length", "100000",
                             "--max-output-tokens", "0")
    fresh_stack.wait_for_models("tiny-long")
    url = f"{fresh_stack.base_url}/v1/responses"
    queued = httpx.post(url, json={"model": "tiny-long", "input": "go on", "background": True,
                                   "max_output_tokens": 50_000}, timeout=30).json()
    assert queued["status"] in ("queued", "in_progress")
    gateway = next(p for p in fresh_stack.processes if p.name == "gateway")
    gateway.kill()
    fresh_stack.remove(gateway)
    fresh_stack.start_gateway()
    fresh_stack.wait_for_models("tiny-long")
    after = httpx.get(f"{url}/{queued['id']}", timeout=10)
    assert after.status_code == 200, after.text
    assert after.json()["status"] == "failed" and after.json()["error"]["code"] == "gateway_restarted"
    cancelled = httpx.post(f"{url}/{queued['id']}/cancel", timeout=10)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "failed"


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/responses", {"input": "Hi", "max_output_tokens": "4"}, "max_output_tokens"),
        ("/v1/responses", {"input": "Hi", "stream": "yes"}, "stream"),
        ("/v1/responses", {"input": "Hi", "temperature": "0.5"}, "temperature"),
        ("/v1/chat/completions", {"messages": HELLO, "max_tokens": "4"}, "max_tokens"),
        ("/v1/chat/completions", {"messages": HELLO, "stream": "yes"}, "stream"),
        ("/v1/completions", {"prompt": "Hi", "max_tokens": "4"}, "max_tokens"),
        ("/v1/messages", {"messages": HELLO, "max_tokens": "4"}, "max_tokens"),
        ("/v1/responses", {"input": "Hi", "tools": [{"type": "function", "name": "f",
                                                     "parameters": {"type": "objekt"}}]}, "tools[0].parameters"),
        ("/v1/chat/completions", {"messages": HELLO, "tools": [{"type": "function", "function": {
            "name": "f", "parameters": {"properties": 7}}}]}, "tools.0.function.parameters"),
        ("/v1/messages", {"messages": HELLO, "max_tokens": 4, "tools": [{"name": "f", "input_schema": {
            "type": "object", "required": "x"}}]}, "tools.0.input_schema"),
        ("/v1/responses", {"input": "Hi", "tools": [{"type": "function", "name": "f"}],
                           "tool_choice": {"type": "function", "name": "g"}}, "tool_choice"),
        ("/v1/chat/completions", {"messages": HELLO, "tools": [{"type": "function", "function": {"name": "f"}}],
                                  "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice"),
        ("/v1/responses", {"input": [{"type": "brand_new_item", "x": 1}]}, "input"),
    ],
    ids=["string-number", "string-bool", "string-float", "chat-string-number", "chat-string-bool",
         "completions-string-number", "messages-string-number", "responses-schema", "chat-schema", "messages-schema",
         "responses-unknown-tool", "chat-unknown-tool", "unknown-item"],
)
def test_mistakes_are_400s_naming_the_field(tiny_stack, path, body, param):
    r = httpx.post(f"{tiny_stack.base_url}{path}", json={"model": TINY, **body}, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    if path == "/v1/messages":
        assert error["type"] == "invalid_request_error" and param.split(".")[0] in error["message"]
    else:
        assert error["param"] == param, error
        assert "empty conversation" not in error["message"]


def test_a_huge_prompt_is_tokenized_beside_running_streams(tiny_stack):
    """Building a multi-MB prompt takes the tokenizer seconds: meanwhile a running stream
    keeps receiving tokens (asserted on tokens received against its own pace)."""

    received: list[float] = []
    started = threading.Event()

    def stream() -> None:
        body = {"model": "tiny-long", "messages": HELLO, "max_tokens": 3000, "stream": True, "temperature": 0}
        with httpx.stream("POST", f"{tiny_stack.base_url}/v1/chat/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if '"content":' in line:
                    received.append(time.monotonic())
                    started.set()

    runner = threading.Thread(target=stream)
    runner.start()
    try:
        assert started.wait(60)
        words = " ".join(f"w{n % 50_000}" for n in range(450_000))  # ~3.5 MB, past the context
        sent = time.monotonic()
        r = httpx.post(f"{tiny_stack.base_url}/v1/chat/completions", timeout=120,
                       json={"model": "tiny-long", "messages": [{"role": "user", "content": words}]})
        answered = time.monotonic()
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        before = sum(1 for t in received if sent - 1.0 < t < sent)  # tokens per second, undisturbed
        during = sum(1 for t in received if sent < t < answered)
        print(f"tokenizing took {answered - sent:.2f}s; the stream received {during} tokens meanwhile "
              f"({before}/s before)")
        # Tokenized on the engine thread, the stream got ~1/10 of its pace (44 tokens in 5 s).
        assert during >= 0.25 * before * (answered - sent)
    finally:
        runner.join(120)
