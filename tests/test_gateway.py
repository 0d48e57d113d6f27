"""The real gateway and worker processes, over HTTP, ZeroMQ and the tiny model."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import httpx
import msgpack
import pytest
import zmq
from conftest import TINY, TINY_LONG
from processes import REPO_ROOT
from sse import chat_text, read_sse, stream_chat

from protocol import PROTOCOL_VERSION

HELLO = [{"role": "user", "content": "What is the capital of France?"}]


def post(stack, path: str, body, timeout: float | httpx.Timeout = 60) -> httpx.Response:
    return httpx.post(f"{stack.base_url}{path}", json=body, timeout=timeout)


def workers_by_model(stack) -> dict[str, dict]:
    return {w["model"]: w for w in httpx.get(f"{stack.base_url}/v1/workers").json()["data"]}


def test_models_health_and_workers(tiny_stack):
    models = httpx.get(f"{tiny_stack.base_url}/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == [TINY, TINY_LONG]
    assert all(m["object"] == "model" for m in models["data"])
    assert httpx.get(f"{tiny_stack.base_url}/v1/models/{TINY}").json()["id"] == TINY
    health = httpx.get(f"{tiny_stack.base_url}/health").json()
    assert health["status"] == "ok" and health["workers"] == 2
    workers = workers_by_model(tiny_stack)
    assert workers[TINY]["context_length"] == 256 and workers[TINY_LONG]["context_length"] == 100000
    assert workers[TINY]["last_heartbeat_s"] < 2
    # What the worker told the gateway about its model: the plain tiny template has no tool-call
    # format and no thinking switch (the scripted "qwen" variant has both: tests/test_codex.py).
    assert (workers[TINY]["tool_calls"], workers[TINY]["thinking"]) == (False, False)


def test_chat_completion(tiny_stack):
    r = post(tiny_stack, "/v1/chat/completions", {"model": TINY, "messages": HELLO, "max_tokens": 7, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == TINY
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"]
    assert choice["finish_reason"] == "length"
    usage = body["usage"]
    assert usage["completion_tokens"] == 7 and usage["prompt_tokens"] > 5
    assert usage["total_tokens"] == usage["prompt_tokens"] + 7


def test_streaming_chat_matches_non_streaming(tiny_stack):
    request = {"model": TINY, "messages": HELLO, "max_tokens": 10, "temperature": 0}
    expected = post(tiny_stack, "/v1/chat/completions", request).json()
    events, done = stream_chat(tiny_stack.base_url, {**request, "stream_options": {"include_usage": True}})
    assert done
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chat_text(events) == expected["choices"][0]["message"]["content"]
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert events[-1]["choices"] == [] and events[-1]["usage"] == expected["usage"]
    assert len({e["id"] for e in events}) == 1


def test_completions(tiny_stack):
    request = {"model": TINY, "prompt": "Once upon a time", "max_tokens": 6, "temperature": 0}
    body = post(tiny_stack, "/v1/completions", request).json()
    assert body["object"] == "text_completion"
    assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 6
    with httpx.stream("POST", f"{tiny_stack.base_url}/v1/completions", json={**request, "stream": True}) as r:
        events, done = read_sse(r)
    assert done
    assert "".join(e["choices"][0]["text"] for e in events) == body["choices"][0]["text"]
    echoed = post(tiny_stack, "/v1/completions", {**request, "echo": True}).json()
    assert echoed["choices"][0]["text"] == "Once upon a time" + body["choices"][0]["text"]


def test_stop_strings_end_the_output(tiny_stack):
    request = {"model": TINY, "messages": HELLO, "max_tokens": 20, "temperature": 0}
    full = post(tiny_stack, "/v1/chat/completions", request).json()["choices"][0]["message"]["content"]
    stop = full[4:7]
    body = post(tiny_stack, "/v1/chat/completions", {**request, "stop": [stop]}).json()
    assert body["choices"][0]["message"]["content"] == full[: full.index(stop)]
    assert body["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize(
    "path, body, status, param, code",
    [
        ("/v1/chat/completions", {"model": "nope", "messages": HELLO}, 404, "model", "model_not_found"),
        ("/v1/chat/completions", {"model": TINY, "messages": []}, 400, "messages", None),
        ("/v1/chat/completions", {"messages": HELLO}, 400, "model", None),
        ("/v1/chat/completions", {"model": TINY, "messages": HELLO, "temperature": 9}, 400, "temperature", None),
        ("/v1/chat/completions", {"model": TINY, "messages": HELLO, "max_tokens": 0}, 400, "max_tokens", None),
        ("/v1/chat/completions", {"model": TINY, "messages": HELLO, "n": 3}, 400, "n", None),
        ("/v1/chat/completions", {"model": TINY, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:,"}}]}]}, 400, "messages.0.content.0.image_url", None),
        ("/v1/chat/completions", {"model": TINY, "messages": [{"role": "user", "content": "word " * 400}]},
         400, "messages", "context_length_exceeded"),
        ("/v1/chat/completions", {"model": TINY, "messages": [{"role": "function", "content": "x"}]},
         400, "messages", "template_error"),
        ("/v1/completions", {"model": TINY, "prompt": "word " * 400}, 400, "prompt", "context_length_exceeded"),
        ("/v1/completions", {"model": TINY, "prompt": ["a", "b"]}, 400, "prompt", None),
        ("/v1/completions", {"model": TINY, "prompt": "a", "suffix": "b"}, 400, "suffix", None),
    ],
    ids=["unknown-model", "no-messages", "no-model", "temperature", "max-tokens", "n", "image",
         "context-length", "template", "completions-context-length", "many-prompts", "suffix"],
)
def test_bad_requests_get_openai_errors(tiny_stack, path, body, status, param, code):
    for stream in (False, True):
        r = post(tiny_stack, path, {**body, "stream": stream})
        assert r.status_code == status, r.text
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["message"] and error["type"] == "invalid_request_error"
        assert (error["param"], error["code"]) == (param, code)


def test_malformed_json_and_unknown_routes(tiny_stack):
    r = httpx.post(f"{tiny_stack.base_url}/v1/chat/completions", content=b"{not json",
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.get(f"{tiny_stack.base_url}/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"


def test_concurrent_streams_get_the_same_output_as_alone(tiny_stack):
    prompts = [f"Question {i}: tell me about {topic}" for i, topic in
               enumerate(["the sea", "France", "Python", "stars", "cafés", "日本", "batches"])]
    requests = [{"model": TINY, "messages": [{"role": "user", "content": p}], "max_tokens": 24, "temperature": 0}
                for p in prompts]
    alone = [chat_text(stream_chat(tiny_stack.base_url, r)[0]) for r in requests]
    together: list[str | None] = [None] * len(requests)

    def run(i: int) -> None:
        events, done = stream_chat(tiny_stack.base_url, requests[i])
        together[i] = chat_text(events) if done else None

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert together == alone
    assert len(set(alone)) > 1


def wait_until_idle(stack, model: str, timeout: float = 3.0) -> float:
    """Seconds until the worker of ``model`` reports no active sequences (via its heartbeat)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        worker = workers_by_model(stack)[model]
        if worker["active"] == 0 and worker["in_flight"] == 0:
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"{model} still busy after {timeout}s: {workers_by_model(stack)[model]}")


def test_a_disconnected_stream_frees_its_slot(tiny_stack):
    # 50,000 tokens would take minutes; the worker must drop the sequence when the client leaves.
    request = {"model": TINY_LONG, "messages": HELLO, "max_tokens": 50_000, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{tiny_stack.base_url}/v1/chat/completions", json=request, timeout=30) as r:
        lines = r.iter_lines()
        received = [next(lines) for _ in range(10)]
        assert any(line.startswith("data: ") for line in received)
        time.sleep(1.5)  # a heartbeat reports the sequence as active
        assert workers_by_model(tiny_stack)[TINY_LONG]["active"] == 1
    wait_until_idle(tiny_stack, TINY_LONG)


def test_a_disconnected_non_streaming_request_frees_its_slot(tiny_stack):
    request = {"model": TINY_LONG, "messages": HELLO, "max_tokens": 50_000, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        post(tiny_stack, "/v1/chat/completions", request, timeout=httpx.Timeout(30, read=2))
    wait_until_idle(tiny_stack, TINY_LONG)


def test_bad_frames_do_not_hurt_the_gateway(tiny_stack):
    context = zmq.Context()
    rogue = context.socket(zmq.DEALER)
    rogue.setsockopt(zmq.LINGER, 0)
    rogue.connect(tiny_stack.zmq_address)
    try:
        for frames in ([b"\xc1garbage"], [msgpack.packb({"v": PROTOCOL_VERSION + 7, "t": "ready"})],
                       [msgpack.packb({"v": PROTOCOL_VERSION, "t": "nonsense"})],
                       [msgpack.packb({"v": PROTOCOL_VERSION, "t": "output", "deltas": [{"x": 1}]})],
                       [b"two", b"frames"]):
            rogue.send_multipart(frames)
        time.sleep(0.5)
    finally:
        rogue.close()
        context.term()
    r = post(tiny_stack, "/v1/chat/completions", {"model": TINY, "messages": HELLO, "max_tokens": 3})
    assert r.status_code == 200
    gateway_log = next(p for p in tiny_stack.processes if p.name == "gateway").log()
    assert "dropped a bad frame" in gateway_log and "Traceback" not in gateway_log


def test_killed_worker_ends_its_streams_with_an_error(fresh_stack, tiny_model_dir):
    fresh_stack.start_gateway()
    worker = fresh_stack.start_worker(str(tiny_model_dir), TINY_LONG, "--context-length", "100000", "--max-output-tokens", "0")
    fresh_stack.wait_for_models(TINY_LONG)
    request = {"model": TINY_LONG, "messages": HELLO, "max_tokens": 50_000, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{fresh_stack.base_url}/v1/chat/completions", json=request, timeout=30) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
        worker.kill()
        killed_at = time.monotonic()
        rest = list(lines)
    elapsed = time.monotonic() - killed_at
    assert elapsed < 3.0, f"the stream took {elapsed:.1f}s to end after the worker died"
    data = [line for line in rest if line.startswith("data: ")]
    assert data[-1] == "data: [DONE]"
    assert '"code":"worker_crashed"' in data[-2]
    assert httpx.get(f"{fresh_stack.base_url}/health").json()["workers"] == 0
    # A model that had a worker waits --queue-timeout for one to come back, then gets a 503.
    started = time.monotonic()
    r = post(fresh_stack, "/v1/chat/completions", {"model": TINY_LONG, "messages": HELLO})
    assert r.status_code == 503 and r.json()["error"]["code"] == "no_worker"
    assert time.monotonic() - started >= fresh_stack.queue_timeout * 0.9


def test_worker_reports_a_missing_model_without_a_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "worker", "--model", str(tmp_path / "missing.gguf"), "--gateway", f"ipc://{tmp_path}/s"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "GGUF file not found" in result.stderr and "Traceback" not in result.stderr


def test_killed_worker_fails_a_responses_stream(fresh_stack, tiny_model_dir):
    fresh_stack.start_gateway()
    worker = fresh_stack.start_worker(str(tiny_model_dir), TINY_LONG, "--context-length", "100000", "--max-output-tokens", "0")
    fresh_stack.wait_for_models(TINY_LONG)
    body = {"model": TINY_LONG, "input": "Tell me a story", "max_output_tokens": 50_000, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", f"{fresh_stack.base_url}/v1/responses", json=body, timeout=30) as r:
        lines = r.iter_lines()
        while "output_text.delta" not in next(lines):
            pass
        worker.kill()
        killed_at = time.monotonic()
        rest = [line for line in lines if line.startswith("data: ")]
    assert time.monotonic() - killed_at < 3.0
    final = json.loads(rest[-1][len("data: "):])
    assert final["type"] == "response.failed"
    assert final["response"]["error"]["code"] == "worker_crashed"
    assert final["response"]["output"][0]["status"] == "incomplete", "the open message is closed, not dropped"


def test_replicas_share_load_and_a_dead_replicas_waiting_work_moves_over(fresh_stack, tiny_model_dir):
    fresh_stack.start_gateway()
    first = fresh_stack.start_worker(str(tiny_model_dir), TINY_LONG, "--context-length", "100000",
                                     "--max-output-tokens", "0", "--max-sequences", "1")
    fresh_stack.wait_for_models(TINY_LONG)
    fresh_stack.start_worker(str(tiny_model_dir), TINY_LONG, "--context-length", "100000",
                             "--max-output-tokens", "0", "--max-sequences", "1")
    base = fresh_stack.base_url
    fresh_stack_wait(fresh_stack, lambda ws: len(ws) == 2)

    # Least-loaded routing: two long streams land on different replicas.
    stop_streaming = threading.Event()
    streams = [hold_long_stream(base, stop_streaming) for _ in range(2)]
    fresh_stack_wait(fresh_stack, lambda ws: sorted(w["active"] for w in ws) == [1, 1])

    # A background request and a blocking one wait behind the streams (no output yet) ...
    background, blocking, results = start_background_and_blocking(fresh_stack, tokens=5)
    fresh_stack_wait(fresh_stack, lambda ws: sum(w["in_flight"] for w in ws) == 4)
    # ... then the first replica dies: whatever waited there moves to the other, which frees up
    # when the streams stop.
    first.kill()
    stop_streaming.set()
    for thread in streams:
        thread.join(30)
    blocking.join(60)
    assert results and results[0].status_code == 200, results and results[0].text
    assert results[0].json()["usage"]["completion_tokens"] == 5
    deadline = time.monotonic() + 20
    done = httpx.get(f"{base}/v1/responses/{background['id']}").json()
    while done["status"] in ("queued", "in_progress") and time.monotonic() < deadline:
        time.sleep(0.1)
        done = httpx.get(f"{base}/v1/responses/{background['id']}").json()
    assert done["status"] == "incomplete" and done["usage"]["output_tokens"] == 5


def test_crash_fails_blocking_and_background_requests_that_had_output(fresh_stack, tiny_model_dir):
    fresh_stack.start_gateway()
    worker = fresh_stack.start_worker(str(tiny_model_dir), TINY_LONG, "--context-length", "100000", "--max-output-tokens", "0")
    fresh_stack.wait_for_models(TINY_LONG)
    base = fresh_stack.base_url
    background, blocking, results = start_background_and_blocking(fresh_stack, tokens=50_000)
    fresh_stack_wait(fresh_stack, lambda ws: ws and ws[0]["active"] == 2)
    time.sleep(0.5)  # both have produced output by now
    worker.kill()
    blocking.join(10)
    assert results[0].status_code == 503 and results[0].json()["error"]["code"] == "worker_crashed"
    stored = httpx.get(f"{base}/v1/responses/{background['id']}").json()
    assert stored["status"] == "failed" and stored["error"]["code"] == "worker_crashed"


def hold_long_stream(base: str, stop: threading.Event) -> threading.Thread:
    """A streamed chat request of 50,000 tokens, read on a thread until ``stop`` is set."""

    def read() -> None:
        body = {"model": TINY_LONG, "messages": HELLO, "max_tokens": 50_000, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=60) as r:
            for _ in r.iter_lines():
                if stop.is_set():
                    return

    thread = threading.Thread(target=read)
    thread.start()
    return thread


def start_background_and_blocking(stack, tokens: int) -> tuple[dict, threading.Thread, list[httpx.Response]]:
    """A background /v1/responses request, and a blocking chat request on a thread (its reply
    lands in the returned list), both for ``tokens`` tokens of TINY_LONG."""
    background = httpx.post(f"{stack.base_url}/v1/responses", json={
        "model": TINY_LONG, "input": "hi", "background": True, "max_output_tokens": tokens, "temperature": 0}).json()
    results: list[httpx.Response] = []
    blocking = threading.Thread(target=lambda: results.append(post(stack, "/v1/chat/completions", {
        "model": TINY_LONG, "messages": HELLO, "max_tokens": tokens, "temperature": 0}, timeout=60)))
    blocking.start()
    return background, blocking, results


def fresh_stack_workers(stack) -> list[dict]:
    return httpx.get(f"{stack.base_url}/v1/workers").json()["data"]


def fresh_stack_wait(stack, predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate(fresh_stack_workers(stack)):
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out: {fresh_stack_workers(stack)}")


def test_prompt_cache_key_routes_a_conversation_back_to_its_cache(fresh_stack, tiny_model_dir):
    fresh_stack.start_gateway()
    fresh_stack.start_worker(str(tiny_model_dir), TINY_LONG, "--context-length", "100000", "--max-output-tokens", "0")
    fresh_stack.wait_for_models(TINY_LONG)
    fresh_stack.start_worker(str(tiny_model_dir), TINY_LONG, "--context-length", "100000", "--max-output-tokens", "0")
    fresh_stack_wait(fresh_stack, lambda ws: len(ws) == 2)
    base = fresh_stack.base_url
    turn = {"model": TINY_LONG, "input": "The same long conversation " * 10, "max_output_tokens": 4,
            "temperature": 0, "prompt_cache_key": "thread-7"}
    assert httpx.post(f"{base}/v1/responses", json=turn).status_code == 200  # lands on the first worker
    stop = threading.Event()
    thread = hold_long_stream(base, stop)  # makes the first worker the more loaded one
    try:
        fresh_stack_wait(fresh_stack, lambda ws: sorted(w["in_flight"] for w in ws) == [0, 1])
        again = httpx.post(f"{base}/v1/responses", json=turn).json()
        other = httpx.post(f"{base}/v1/responses", json={**turn, "prompt_cache_key": "thread-8"}).json()
    finally:
        stop.set()
        thread.join(30)
    assert again["usage"]["input_tokens_details"]["cached_tokens"] > 0, "routed to the worker with its cache"
    assert other["usage"]["input_tokens_details"]["cached_tokens"] == 0, "a new key goes to the idle worker"
