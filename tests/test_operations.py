"""What an operator relies on: API keys, CURVE for remote workers, /metrics, request ids in logs."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import pytest
from conftest import TINY
from processes import Stack, free_port
from prometheus_client.parser import text_string_to_metric_families

from protocol.security import generate_keys

KEY = "sk-local-test-123"
HELLO = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir) -> Iterator[Stack]:
    """A gateway that requires API keys (one given as a flag, one in a file), JSON logs."""
    stack = Stack(tmp_path_factory.mktemp("keyed"))
    key_file = stack.workdir / "keys.txt"
    key_file.write_text("sk-from-file\n")
    try:
        stack.start_gateway("--api-key", KEY, "--api-key-file", str(key_file), "--log-format", "json")
        stack.start_worker(str(tiny_model_dir), TINY, "--log-format", "json")
        deadline = time.monotonic() + 60
        while not stack_models(stack):
            assert time.monotonic() < deadline, stack.logs()
            time.sleep(0.2)
        yield stack
    finally:
        stack.stop()


def stack_models(stack: Stack) -> list[str]:
    try:
        r = httpx.get(f"{stack.base_url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=2)
        return [m["id"] for m in r.json()["data"]] if r.status_code == 200 else []
    except httpx.HTTPError:
        return []


ROUTES = [
    ("GET", "/v1/models", None),
    ("GET", "/v1/workers", None),
    ("POST", "/v1/chat/completions", {"model": TINY, "messages": HELLO, "max_tokens": 2}),
    ("POST", "/v1/completions", {"model": TINY, "prompt": "Hi", "max_tokens": 2}),
    ("POST", "/v1/responses", {"model": TINY, "input": "Hi", "max_output_tokens": 2}),
    ("GET", "/v1/responses/resp_nope", None),
]


@pytest.mark.parametrize("method, path, body", ROUTES, ids=[f"{m} {p}" for m, p, _ in ROUTES])
def test_every_v1_route_needs_a_key(keyed, method, path, body):
    url = f"{keyed.base_url}{path}"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": "Basic x"}):
        r = httpx.request(method, url, json=body, headers=headers)
        assert r.status_code == 401, (headers, r.text)
        assert r.json()["error"]["code"] == "invalid_api_key" and r.json()["error"]["type"] == "invalid_request_error"
    for key in (KEY, "sk-from-file"):
        r = httpx.request(method, url, json=body, headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == (404 if path.endswith("resp_nope") else 200), r.text


def test_the_messages_api_takes_its_own_key_header_and_answers_in_its_shape(keyed):
    url = f"{keyed.base_url}/v1/messages?beta=true"
    body = {"model": TINY, "max_tokens": 2, "messages": HELLO}
    for headers in ({}, {"x-api-key": "wrong"}, {"Authorization": "Bearer wrong"}):
        r = httpx.post(url, json=body, headers=headers)
        assert r.status_code == 401 and r.json()["type"] == "error", r.text
        assert r.json()["error"]["type"] == "authentication_error"
    for headers in ({"x-api-key": KEY}, {"Authorization": f"Bearer {KEY}"}):
        r = httpx.post(url, json=body, headers=headers, timeout=30)
        assert r.status_code == 200 and r.json()["type"] == "message", r.text


def test_health_and_metrics_stay_open(keyed):
    assert httpx.get(f"{keyed.base_url}/health").status_code == 200
    assert httpx.get(f"{keyed.base_url}/metrics").status_code == 200


def metric_samples(base_url: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(f"{base_url}/metrics").text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def metric(samples, name: str, **labels) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and all(dict(ls).get(k) == v2
                                                                         for k, v2 in labels.items()))


def test_metrics_parse_and_move(keyed):
    auth = {"Authorization": f"Bearer {KEY}"}
    before = metric_samples(keyed.base_url)
    with httpx.stream("POST", f"{keyed.base_url}/v1/chat/completions", headers=auth, json={
            "model": TINY, "messages": HELLO, "max_tokens": 12, "temperature": 0, "stream": True}) as r:
        assert len([line for line in r.iter_lines() if line.startswith("data: ")]) > 10
    r = httpx.post(f"{keyed.base_url}/v1/responses", headers=auth,
                   json={"model": TINY, "input": "Hi", "max_output_tokens": 5})
    assert r.status_code == 200
    httpx.post(f"{keyed.base_url}/v1/chat/completions", json={"model": TINY, "messages": HELLO})  # a 401
    time.sleep(1.2)  # a heartbeat brings the worker's figures
    after = metric_samples(keyed.base_url)

    def moved(name: str, **labels) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert moved("mlxgw_requests_total", route="/v1/chat/completions", model=TINY, status="200") == 1
    assert moved("mlxgw_requests_total", route="/v1/responses", model=TINY, status="200") == 1
    assert moved("mlxgw_requests_total", status="401") >= 1
    assert moved("mlxgw_output_tokens_total", model=TINY) == 17
    assert moved("mlxgw_time_to_first_token_seconds_count", model=TINY) == 2
    assert moved("mlxgw_inter_token_latency_seconds_count", model=TINY) == 15
    assert metric(after, "mlxgw_live_workers", model=TINY) == 1
    assert metric(after, "mlxgw_in_flight_requests", model=TINY) == 0
    assert metric(after, "mlxgw_stored_responses") >= 1
    assert metric(after, "mlxgw_worker_generated_tokens", model=TINY) >= 17
    assert metric(after, "mlxgw_worker_active_memory_bytes", model=TINY) > 0
    assert ("mlxgw_worker_tokens_per_second", (("model", TINY),)) not in after  # labelled by worker too
    assert any(name == "mlxgw_worker_batch_size" for name, _ in after)


def test_request_ids_are_returned_and_found_in_both_logs(keyed):
    auth = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(f"{keyed.base_url}/v1/chat/completions", headers={**auth, "x-request-id": "trace-4242"},
                   json={"model": TINY, "messages": HELLO, "max_tokens": 3})
    assert r.headers["x-request-id"] == "trace-4242"
    r = httpx.post(f"{keyed.base_url}/v1/responses", headers=auth, json={"model": TINY, "input": "Hi",
                                                                        "max_output_tokens": 3})
    response_id = r.json()["id"]
    assert r.headers["x-request-id"] == response_id, "a Responses request is known by its response id"
    time.sleep(0.3)
    for request_id in ("trace-4242", response_id):
        for process in keyed.processes:
            lines = [json.loads(line) for line in process.log().splitlines() if line.startswith("{")]
            mine = [line for line in lines if line.get("request_id") == request_id]
            assert mine, f"{request_id} not in {process.name}'s log"
    worker_lines = [json.loads(x) for x in keyed.processes[1].log().splitlines() if x.startswith("{")]
    finished = [x for x in worker_lines if x.get("request_id") == response_id and "finished" in x["message"]]
    assert finished and finished[0]["process"] == "worker" and finished[0]["level"] == "info"
    invalid = httpx.get(f"{keyed.base_url}/health", headers={"x-request-id": "bad id with spaces"})
    assert invalid.headers["x-request-id"].startswith("req_")


def test_curve_refuses_a_worker_with_the_wrong_key_and_serves_the_right_one(tmp_path, tiny_model_dir):
    keys = tmp_path / "keys"
    generate_keys(keys, ["good"])
    generate_keys(tmp_path / "other", ["stranger"])  # a pair the gateway never authorized
    port = free_port()
    stack = Stack(tmp_path / "stack")
    stack.workdir.mkdir()
    address = f"tcp://127.0.0.1:{port}"
    try:
        stack._spawn("gateway", ["gateway", "--port", str(stack.port), "--zmq", address,
                                 "--heartbeat-interval", "0.5", "--data-dir", str(tmp_path / "data"),
                                 "--curve-secret-key", str(keys / "gateway.key_secret"),
                                 "--curve-authorized-keys", str(keys / "authorized")])
        common = ["worker", "--model", str(tiny_model_dir), "--gateway", address, "--heartbeat-interval", "0.5",
                  "--curve-server-key", str(keys / "gateway.key")]
        stranger = stack._spawn("stranger", [*common, "--served-name", "stranger",
                                             "--curve-secret-key", str(tmp_path / "other" / "stranger.key_secret")])
        stack._spawn("good", [*common, "--served-name", "good", "--curve-secret-key", str(keys / "good.key_secret")])
        stack.wait_for_models("good", timeout=60)
        r = httpx.post(f"{stack.base_url}/v1/chat/completions", json={"model": "good", "messages": HELLO,
                                                                       "max_tokens": 3})
        assert r.status_code == 200
        time.sleep(1.5)
        assert [m["id"] for m in httpx.get(f"{stack.base_url}/v1/models").json()["data"]] == ["good"]
        gateway_log = stack.processes[0].log()
        assert "refused a worker connection" in gateway_log
        assert "refused this worker's handshake" in stranger.log()
    finally:
        stack.stop()


def test_tcp_beyond_loopback_without_curve_is_refused(tmp_path):
    import subprocess
    import sys

    from processes import REPO_ROOT

    result = subprocess.run([sys.executable, "-m", "gateway", "--zmq", "tcp://0.0.0.0:5999", "--port", "0",
                             "--store", "memory"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--curve-secret-key" in result.stderr and "Traceback" not in result.stderr


def test_stored_responses_belong_to_the_key_that_made_them(keyed):
    a, b = ({"Authorization": f"Bearer {key}"} for key in (KEY, "sk-from-file"))
    url = f"{keyed.base_url}/v1/responses"
    made = httpx.post(url, json={"model": TINY, "input": "A secret for A", "max_output_tokens": 2}, headers=a,
                      timeout=30).json()
    rid, item_id = made["id"], made["output"][0]["id"]
    assert httpx.get(f"{url}/{rid}", headers=a).status_code == 200
    for method, path in (("GET", f"/{rid}"), ("GET", f"/{rid}/input_items"), ("DELETE", f"/{rid}"),
                         ("POST", f"/{rid}/cancel")):
        r = httpx.request(method, url + path, headers=b)
        assert r.status_code == 404 and "A secret" not in r.text, (method, path, r.text)
    chained = httpx.post(url, json={"model": TINY, "input": "go on", "previous_response_id": rid}, headers=b, timeout=30)
    assert chained.status_code == 400 and chained.json()["error"]["code"] == "previous_response_not_found"
    referenced = httpx.post(url, json={"model": TINY, "input": [{"type": "item_reference", "id": item_id}]},
                            headers=b, timeout=30)
    assert referenced.status_code == 400
    # A's own: still there, and A can chain from it and delete it.
    r = httpx.post(url, json={"model": TINY, "input": "go on", "previous_response_id": rid, "max_output_tokens": 2},
                   headers=a, timeout=30)
    assert r.status_code == 200, r.text
    assert httpx.delete(f"{url}/{rid}", headers=a).json()["deleted"] is True


# --- one key never reaches another's data ------------------------------------------------

OTHER_KEY = "sk-from-file"


def as_key(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_an_item_id_another_key_reuses_stays_mine(keyed):
    """Item ids come from clients: key B storing an item under key A's id must not take A's."""
    url = f"{keyed.base_url}/v1/responses"
    mine = {"type": "message", "id": "msg_shared_id", "role": "user", "content": "A's words"}
    r = httpx.post(url, json={"model": TINY, "input": [mine], "max_output_tokens": 2}, headers=as_key(KEY), timeout=60)
    assert r.status_code == 200, r.text
    theirs = {**mine, "content": "B's words"}
    r = httpx.post(url, json={"model": TINY, "input": [theirs], "max_output_tokens": 2}, headers=as_key(OTHER_KEY),
                   timeout=60)
    assert r.status_code == 200, r.text
    for key, words in ((KEY, "A's words"), (OTHER_KEY, "B's words")):
        reference = {"model": TINY, "input": [{"type": "item_reference", "id": "msg_shared_id"}], "max_output_tokens": 2}
        r = httpx.post(url, json=reference, headers=as_key(key), timeout=60)
        assert r.status_code == 200, r.text
        items = httpx.get(f"{url}/{r.json()['id']}/input_items", headers=as_key(key), timeout=10).json()["data"]
        assert items[0]["content"][0]["text"] == words


@pytest.mark.parametrize("api", ["chat", "responses", "messages"])
def test_prefix_cache_hits_stay_within_a_key(keyed, api):
    """Key B must learn nothing of key A's prompt from cache hits: B's first request on A's
    prompt is served from no cache of A's, and A's own repeat is served from its cache."""
    secret = f"The vault PIN for {api} is 48213. " + " ".join(f"word{i}" for i in range(30))  # the tiny window: 256
    question = [{"role": "user", "content": "What is the PIN?"}]
    path, body = {
        "chat": ("/v1/chat/completions", {"max_tokens": 1, "messages": [{"role": "system", "content": secret}, *question]}),
        "responses": ("/v1/responses", {"max_output_tokens": 1, "instructions": secret, "input": question}),
        "messages": ("/v1/messages", {"max_tokens": 1, "system": secret, "messages": question}),
    }[api]

    def cached(key: str) -> tuple[int, int]:
        r = httpx.post(f"{keyed.base_url}{path}", json={"model": TINY, **body}, headers=as_key(key), timeout=60)
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        if api == "chat":
            return usage["prompt_tokens_details"]["cached_tokens"], usage["prompt_tokens"]
        if api == "responses":
            return usage["input_tokens_details"]["cached_tokens"], usage["input_tokens"]
        hit = usage["cache_read_input_tokens"]
        return hit, hit + usage["input_tokens"]

    cached(KEY)  # A's prompt, now in A's cache
    seen_by_other, prompt_tokens = cached(OTHER_KEY)
    assert seen_by_other < 16, "B was served from A's cache"  # at most a template's shared opening
    hit, _ = cached(KEY)
    assert hit >= prompt_tokens - 2
