"""Fault isolation under a real supervisor: crashes, hangs, restarts, overload, shutdown.

Two models (the tiny model under two names) each have a worker under supervisord, which
restarts whatever dies, as deploy/supervisord.conf does in production.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from supervised import Supervised

pytestmark = pytest.mark.slow
A, B = "model-a", "model-b"


class StreamRun(threading.Thread):
    """One streaming /v1/responses request on a thread, recording events and when it ended."""

    def __init__(self, base_url: str, body: dict):
        super().__init__(daemon=True)
        self.base_url, self.body = base_url, {**body, "stream": True}
        self.events: list[dict] = []
        self.status_code = 0
        self.ended_at = 0.0
        self.producing = threading.Event()
        self.failure: BaseException | None = None

    def run(self) -> None:
        try:
            with httpx.stream("POST", f"{self.base_url}/v1/responses", json=self.body, timeout=120) as r:
                self.status_code = r.status_code
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        event = json.loads(line[6:])
                        self.events.append(event)
                        if event["type"] == "response.output_text.delta":
                            self.producing.set()
        except BaseException as exc:  # recorded for the test to report
            self.failure = exc
        finally:
            self.ended_at = time.monotonic()
            self.producing.set()

    @property
    def terminal(self) -> dict | None:
        return self.events[-1] if self.events and self.events[-1]["type"].startswith("response.") and \
            self.events[-1]["type"] in ("response.completed", "response.incomplete", "response.failed") else None


def long_body(model: str, tokens: int = 50_000) -> dict:
    return {"model": model, "input": "Tell me a long story", "max_output_tokens": tokens, "temperature": 0}


@pytest.fixture
def supervised(tmp_path: Path, tiny_model_dir: Path) -> Iterator[Supervised]:
    sup = Supervised(tmp_path, gateway_args=["--queue-timeout", "30"], workers={
        A: ["--model", str(tiny_model_dir), "--context-length", "100000", "--max-sequences", "4"],
        B: ["--model", str(tiny_model_dir), "--context-length", "100000", "--max-sequences", "4"],
    })
    try:
        sup.start()
        sup.wait_for_models(A, B)
        yield sup
    finally:
        sup.stop()


def respond(sup: Supervised, model: str, tokens: int = 5, timeout: float = 60) -> httpx.Response:
    body = {"model": model, "input": "Hello", "max_output_tokens": tokens, "temperature": 0}
    return httpx.post(f"{sup.base_url}/v1/responses", json=body, timeout=timeout)


def test_kill_9_a_worker_mid_stream_under_load_on_two_models(supervised):
    sup = supervised
    a_streams = [StreamRun(sup.base_url, long_body(A)) for _ in range(3)]
    b_streams = [StreamRun(sup.base_url, long_body(B, tokens=400)) for _ in range(3)]
    for run in a_streams + b_streams:
        run.start()
    for run in a_streams:
        assert run.producing.wait(30), "model A never produced output"
    old_pid = sup.pid(f"worker-{A}")
    os.kill(old_pid, signal.SIGKILL)
    killed_at = time.monotonic()
    for run in a_streams + b_streams:
        run.join(60)
    for run in a_streams:
        assert run.failure is None and run.terminal is not None, run.events[-3:]
        assert run.terminal["type"] == "response.failed"
        assert run.terminal["response"]["error"]["code"] == "worker_crashed"
        assert run.ended_at - killed_at < 3.0, f"a stream took {run.ended_at - killed_at:.1f}s to fail"
    for run in b_streams:
        assert run.terminal is not None and run.terminal["type"] == "response.incomplete", "B must be unaffected"
        assert run.terminal["response"]["usage"]["output_tokens"] == 400
    # The supervisor restarts A; it registers again and serves.
    sup.wait_until(lambda: any(w["pid"] != old_pid for w in sup.workers_of(A)), 60, "A to come back")
    r = respond(sup, A)
    assert r.status_code == 200 and r.json()["status"] == "incomplete"
    assert httpx.get(f"{sup.base_url}/health").json()["status"] == "ok"


def test_requests_queued_in_a_killed_worker_complete_after_the_restart(supervised):
    sup = supervised
    running = [StreamRun(sup.base_url, long_body(A)) for _ in range(4)]  # fill A's 4 slots
    for run in running:
        run.start()
    for run in running:
        assert run.producing.wait(30)
    queued: list[httpx.Response | BaseException] = []

    def ask() -> None:
        try:
            queued.append(respond(sup, A, tokens=8, timeout=90))
        except BaseException as exc:
            queued.append(exc)

    askers = [threading.Thread(target=ask) for _ in range(3)]
    for t in askers:
        t.start()
    sup.wait_until(lambda: any(w["queued"] == 3 for w in sup.workers_of(A)), 10, "3 requests queued in A")
    os.kill(sup.pid(f"worker-{A}"), signal.SIGKILL)
    for t in askers:
        t.join(90)
    for run in running:
        run.join(30)
    assert all(run.terminal["type"] == "response.failed" for run in running), "these had produced output"
    assert len(queued) == 3
    for r in queued:
        assert isinstance(r, httpx.Response) and r.status_code == 200, r
        assert r.json()["status"] == "incomplete" and r.json()["usage"]["output_tokens"] == 8


def test_gateway_restart_while_workers_stay_up(supervised):
    sup = supervised
    worker_pids = {m: sup.pid(f"worker-{m}") for m in (A, B)}
    gateway_pid = sup.pid("gateway")
    os.kill(gateway_pid, signal.SIGKILL)
    sup.wait_until(lambda: sup.pid("gateway") not in (0, gateway_pid), 30, "a new gateway")
    sup.wait_for_models(A, B, timeout=30)
    for model in (A, B):
        assert respond(sup, model).status_code == 200
    assert {m: sup.pid(f"worker-{m}") for m in (A, B)} == worker_pids, "workers were not restarted"


def test_a_hung_worker_is_treated_as_dead_and_comes_back(supervised):
    sup = supervised
    run = StreamRun(sup.base_url, long_body(A))
    run.start()
    assert run.producing.wait(30)
    pid = sup.pid(f"worker-{A}")
    os.kill(pid, signal.SIGSTOP)  # alive, but silent
    stopped_at = time.monotonic()
    try:
        run.join(30)
        assert run.terminal["type"] == "response.failed"
        assert run.terminal["response"]["error"]["code"] == "worker_crashed"
        assert run.ended_at - stopped_at < 3.0  # 3 missed heartbeats of 0.5 s, and a check
        assert sup.workers_of(A) == []
        assert respond(sup, B).status_code == 200, "B is unaffected"
    finally:
        os.kill(pid, signal.SIGCONT)
    # It hears no heartbeats, registers again, and its orphaned generation is cancelled.
    sup.wait_until(lambda: any(w["pid"] == pid for w in sup.workers_of(A)), 30, "A to register again")
    sup.wait_until(lambda: all(w["active"] == 0 for w in sup.workers_of(A)), 10, "the orphan to be cancelled")
    assert respond(sup, A).status_code == 200


def test_queue_overflow_gets_429_and_admitted_requests_complete(tmp_path, tiny_model_dir):
    sup = Supervised(tmp_path, gateway_args=["--max-queue", "2"], workers={
        A: ["--model", str(tiny_model_dir), "--context-length", "100000", "--max-sequences", "2"]})
    try:
        sup.start()
        sup.wait_for_models(A)
        results: list[httpx.Response] = []
        lock = threading.Lock()

        def ask() -> None:
            r = respond(sup, A, tokens=300, timeout=120)
            with lock:
                results.append(r)

        threads = [threading.Thread(target=ask) for _ in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        codes = sorted(r.status_code for r in results)
        assert len(results) == 12 and set(codes) <= {200, 429}, codes
        rejected = [r for r in results if r.status_code == 429]
        admitted = [r for r in results if r.status_code == 200]
        assert rejected and len(admitted) >= 4, codes  # 2 decoding + 2 queued at least
        for r in rejected:
            assert r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "rate_limit_exceeded"
        for r in admitted:
            assert r.json()["usage"]["output_tokens"] == 300
    finally:
        sup.stop()


def test_sigterm_drains_a_worker_and_ends_gateway_streams(supervised):
    sup = supervised
    short = StreamRun(sup.base_url, long_body(B, tokens=300))
    short.start()
    assert short.producing.wait(30)
    pid = sup.pid(f"worker-{B}")
    os.kill(pid, signal.SIGTERM)  # drain: the running request finishes
    short.join(60)
    assert short.terminal["type"] == "response.incomplete"
    assert short.terminal["response"]["usage"]["output_tokens"] == 300
    sup.wait_until(lambda: sup.pid(f"worker-{B}") not in (0, pid), 30, "B restarted by the supervisor")

    long = StreamRun(sup.base_url, long_body(A))
    long.start()
    assert long.producing.wait(30)
    gateway_pid = sup.pid("gateway")
    os.kill(gateway_pid, signal.SIGTERM)
    stopped_at = time.monotonic()
    long.join(30)
    assert long.terminal is not None and long.terminal["type"] == "response.failed", long.events[-2:]
    assert long.terminal["response"]["error"]["code"] == "gateway_shutting_down"
    assert long.ended_at - stopped_at < 3.0


def test_the_shipped_supervisord_config_parses(tmp_path, monkeypatch):
    from supervisor.options import ServerOptions

    monkeypatch.setenv("MLX_GATEWAY_BIN", str(tmp_path / "bin"))
    monkeypatch.setenv("MLX_GATEWAY_LOGS", str(tmp_path))
    options = ServerOptions()  # reads the environment when it is made
    options.realize(args=["-c", str(Path(__file__).resolve().parent.parent / "deploy/supervisord.conf")])
    programs = {group.name: group.process_configs[0] for group in options.process_group_configs}
    assert set(programs) == {"gateway"}  # it starts the listed models' workers itself
    deploy = Path(__file__).resolve().parent.parent / "deploy"
    assert programs["gateway"].command.endswith(f"/bin/gateway --host 127.0.0.1 --port 8000 --models {deploy}/models.toml")
    assert programs["gateway"].stopwaitsecs > 30, "longer than its workers' drain timeout"
