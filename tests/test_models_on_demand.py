"""Models on demand (gateway --models): real gateway and worker processes on the tiny model.

Each listed model runs in a worker process the gateway starts when a request needs it. The
tiny model's workers run with MLX's buffer cache and the prefix cache off, so what each reports
(about 2.4 MB) is steady and a budget can be sized to hold exactly two or three of them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from processes import Stack

from gateway.models.catalog import CatalogError, load_catalog, parse_duration, parse_size

KEY = "od-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
STEADY = ["--cache-limit", "0", "--prompt-cache-mb", "0", "--context-length", "100000", "--max-output-tokens", "0"]
# A worker that takes SECONDS longer to load: the real worker, started late.
LATE_WORKER = ("import runpy, sys, time; time.sleep({seconds}); sys.argv = ['worker', *sys.argv[1:]]; "
               "runpy.run_module('worker', run_name='__main__', alter_sys=True)")


def _entry(name: str, model: str, **fields: Any) -> str:
    lines = ["[[model]]", f"name = {json.dumps(name)}", f"model = {json.dumps(model)}"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in fields.items()]
    return "\n".join(lines) + "\n"


def _start(stack: Stack, models: str, *extra: str) -> None:
    (stack.workdir / "models.toml").write_text(models)
    stack.start_gateway("--models", str(stack.workdir / "models.toml"), "--api-key", KEY, *extra)
    _wait(lambda: _get(stack, "/health").status_code == 200, 60, "the gateway to start")


def _get(stack: Stack, path: str) -> httpx.Response:
    try:
        return httpx.get(stack.base_url + path, headers=AUTH, timeout=30)
    except httpx.HTTPError:
        return httpx.Response(599)


def _states(stack: Stack) -> dict[str, dict[str, Any]]:
    return {m["id"]: m for m in _get(stack, "/v1/models").json()["data"]}


def _wait(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout}s for {what}")
        time.sleep(0.2)


def _chat(stack: Stack, model: str, max_tokens: int = 3, timeout: float = 180, **extra: Any) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens, **extra}
    return httpx.post(stack.base_url + "/v1/chat/completions", json=body, headers=AUTH, timeout=timeout)


def _message(stack: Stack, model: str, timeout: float = 180) -> httpx.Response:
    body = {"model": model, "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}
    return httpx.post(stack.base_url + "/v1/messages", json=body, headers={"x-api-key": KEY}, timeout=timeout)


def _alive(pid: int) -> bool:
    """Running (a zombie nobody reaped yet counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


# --- the list -----------------------------------------------------------------------------


def test_the_model_list_reads_names_weights_options_pins_and_durations(tmp_path: Path):
    path = tmp_path / "models.toml"
    path.write_text(_entry("coder", "/models/coder", args=["--max-sequences", "8"], pin=True, idle_ttl="30m",
                           memory="20G", load_timeout="10m") + _entry("small", "smollm2-135m"))
    catalog = load_catalog(path)
    coder = catalog.models["coder"]
    assert coder.args == ("--max-sequences", "8") and coder.pin and coder.idle_ttl == 1800
    assert coder.memory == 20 << 30 and coder.load_timeout == 600
    assert catalog.models["small"].idle_ttl is None and not catalog.models["small"].pin
    command = coder.worker_command("ipc:///x")
    assert command[1:3] == ["-m", "worker"] and "--exit-with-parent" in command
    assert command[-2:] == ["--max-sequences", "8"]
    assert parse_size("512M", "x") == 512 << 20 and parse_duration("-1", "x") is None


@pytest.mark.parametrize("text, wording", [
    ("[[model]]\nname = 'a'\n", "'model' (what the worker loads) is required"),
    ("[[model]]\nname = 'a'\nmodel = 'm'\nttl = 5\n", "unknown keys ['ttl']"),
    ("[[model]]\nname = 'a'\nmodel = 'm'\n[[model]]\nname = 'a'\nmodel = 'n'\n", "listed twice"),
    ("[[model]]\nname = 'a'\nmodel = 'm'\nmemory = 'lots'\n", "a size such as '20G'"),
    ("[[model]]\nname = 'a'\nmodel = 'm'\nidle_ttl = 'soon'\n", "a duration such as '5m'"),
    ("[[model]]\nname = 'a'\nmodel = 'm'\npin = 'yes'\n", "pin: true or false"),
    ("[[model]\n", "not valid TOML"),
    ("", "no [[model]] entries"),
])
def test_a_bad_model_list_is_refused_naming_the_entry_and_field(tmp_path: Path, text: str, wording: str):
    path = tmp_path / "models.toml"
    path.write_text(text)
    with pytest.raises(CatalogError, match=wording.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")
                       .replace(")", r"\)")):
        load_catalog(path)


def test_the_gateway_will_not_start_on_a_bad_model_list(fresh_stack: Stack):
    (fresh_stack.workdir / "models.toml").write_text("[[model]]\nname = 'a'\n")
    gateway = fresh_stack.start_gateway("--models", str(fresh_stack.workdir / "models.toml"))
    assert gateway.popen.wait(60) == 2
    assert "'model' (what the worker loads) is required" in gateway.log()


# --- loading, sharing a load, making room ----------------------------------------------------


@pytest.fixture(scope="module")
def budget_stack(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Stack]:
    """Three models and a pinned one, within a budget that holds the pinned one and two more."""
    stack = Stack(tmp_path_factory.mktemp("on-demand"))
    weights = str(tiny_model_dir)
    models = "".join(_entry(name, weights, args=STEADY) for name in ("a", "b", "c"))
    models += _entry("pinned", weights, args=STEADY, pin=True) + _entry("huge", weights, memory="1T")
    try:
        _start(stack, models, "--memory-budget", "8.5M")
        _wait(lambda: _states(stack)["pinned"]["state"] == "loaded", 180, "the pinned model to load at start")
        yield stack
    finally:
        stack.stop()


def test_a_listed_model_is_listed_unloaded_and_loads_on_its_first_request_once_for_all(budget_stack: Stack):
    states = _states(budget_stack)
    assert states["a"]["state"] == "unloaded" and states["a"]["pids"] == [] and states["a"]["memory_bytes"] == 0
    replies: list[httpx.Response] = []
    threads = [threading.Thread(target=lambda: replies.append(_chat(budget_stack, "a"))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [r.status_code for r in replies] == [200, 200, 200], [r.text for r in replies]
    a = _states(budget_stack)["a"]
    assert a["state"] == "loaded" and a["loads"] == 1 and len(a["pids"]) == 1
    assert budget_stack.processes[0].log().count("starting a worker for a:") == 1
    _wait(lambda: _states(budget_stack)["a"]["memory_bytes"] > 1_000_000, 30, "a's first heartbeat with memory")
    workers = _get(budget_stack, "/v1/workers").json()
    assert workers["models"]["a"]["state"] == "loaded" and workers["memory"]["budget_bytes"] == int(8.5 * (1 << 20))
    metrics = httpx.get(budget_stack.base_url + "/metrics", timeout=30).text
    assert 'mlxgw_model_state{model="a",state="loaded"} 1.0' in metrics
    assert 'mlxgw_model_loads_total{model="a",outcome="loaded"} 1.0' in metrics


def test_the_least_recently_used_idle_model_makes_room_and_its_memory_is_given_back(budget_stack: Stack):
    assert _chat(budget_stack, "a").status_code == 200
    a_pid = _states(budget_stack)["a"]["pids"][0]
    assert _chat(budget_stack, "b").status_code == 200
    used_with_a = _get(budget_stack, "/v1/workers").json()["memory"]["used_bytes"]
    assert _chat(budget_stack, "c").status_code == 200  # no room for a third: a goes
    states = _states(budget_stack)
    assert states["a"]["state"] == "unloaded" and "making room for c" in states["a"]["reason"]
    assert states["a"]["memory_bytes"] == 0 and states["a"]["pids"] == []
    assert states["b"]["state"] == states["c"]["state"] == states["pinned"]["state"] == "loaded"
    _wait(lambda: not _alive(a_pid), 30, "a's worker process to exit")
    _wait(lambda: _states(budget_stack)["c"]["memory_bytes"] > 0, 30, "c's memory report")
    assert _get(budget_stack, "/v1/workers").json()["memory"]["used_bytes"] <= used_with_a + 200_000
    assert _states(budget_stack)["pinned"]["loads"] == 1  # pinned: never the one to go


def test_a_model_with_a_request_in_flight_is_never_unloaded_to_make_room(budget_stack: Stack):
    # b and c are loaded. A long stream keeps b busy while b is the least recently used one.
    assert _chat(budget_stack, "c").status_code == 200
    body = {"model": "b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1500, "stream": True}
    streamed: list[str] = []
    first = threading.Event()

    def stream() -> None:
        with httpx.stream("POST", budget_stack.base_url + "/v1/chat/completions", json=body, headers=AUTH,
                          timeout=300) as reply:
            for line in reply.iter_lines():
                streamed.append(line)
                first.set()

    reader = threading.Thread(target=stream)
    reader.start()
    try:
        assert first.wait(120)
        assert _chat(budget_stack, "c").status_code == 200  # c is now more recently used than b
        # Room for a: b is least recently used but busy, so c goes.
        still_busy = _states(budget_stack)["b"]["requests"] == 1
        assert _chat(budget_stack, "a").status_code == 200
    finally:
        reader.join(300)
    assert still_busy, "b's stream ended before the load that needed room: make it longer"
    states = _states(budget_stack)
    assert states["c"]["state"] == "unloaded" and "making room for a" in states["c"]["reason"]
    assert states["b"]["state"] == "loaded" and states["b"]["loads"] == 1
    assert [line for line in streamed if line][-1] == "data: [DONE]"
    assert '"finish_reason":"length"' in "".join(streamed)


def test_a_model_too_large_for_the_budget_is_refused_before_anything_is_unloaded(budget_stack: Stack):
    before = {name: s["state"] for name, s in _states(budget_stack).items()}
    reply = _chat(budget_stack, "huge")
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["code"] == "model_too_large" and error["param"] == "model"
    assert "memory budget" in error["message"] and "1024.0 GB" in error["message"]
    anthropic = _message(budget_stack, "huge")
    assert anthropic.status_code == 400
    assert anthropic.json()["error"]["type"] == "invalid_request_error"
    assert "memory budget" in anthropic.json()["error"]["message"]
    after = {name: s["state"] for name, s in _states(budget_stack).items()}
    assert after == {**before, "huge": "failed"}


# --- failures, time limits, idle unloads, keep_alive, the operator's routes ---------------------


@pytest.fixture(scope="module")
def lifecycle_stack(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Stack]:
    stack = Stack(tmp_path_factory.mktemp("on-demand-life"))
    weights = str(tiny_model_dir)
    late = [sys.executable, "-c", LATE_WORKER.format(seconds=12)]
    hung = [sys.executable, "-c", "import time; time.sleep(3600)"]
    models = (_entry("broken", str(stack.workdir / "no-such-model")) + _entry("late", weights, command=late)
              + _entry("hung", weights, command=hung, load_timeout=3) + _entry("idle", weights, idle_ttl=2)
              + _entry("t", weights, args=["--context-length", "100000", "--max-output-tokens", "0"])
              + _entry("fresh", weights, args=["--context-length", "50000"]))
    try:
        _start(stack, models)
        yield stack
    finally:
        stack.stop()


def test_weights_that_fail_to_load_fail_the_request_with_the_reason_and_the_next_one_tries_again(
        lifecycle_stack: Stack):
    reply = _chat(lifecycle_stack, "broken")
    assert reply.status_code == 503
    error = reply.json()["error"]
    assert error["code"] == "model_load_failed" and error["type"] == "server_error"
    assert "failed to load: its worker exited with status 2: model not found" in error["message"]
    anthropic = _message(lifecycle_stack, "broken")
    assert anthropic.status_code == 529 and anthropic.json()["error"]["type"] == "overloaded_error"
    assert "model not found" in anthropic.json()["error"]["message"]
    assert lifecycle_stack.processes[0].log().count("starting a worker for broken:") == 2
    state = _states(lifecycle_stack)["broken"]
    assert state["state"] == "failed" and "model not found" in state["reason"]


def test_a_load_past_its_timeout_fails_and_its_worker_is_stopped(lifecycle_stack: Stack):
    started = time.monotonic()
    reply = _chat(lifecycle_stack, "hung")
    assert reply.status_code == 503 and "did not load within 3s" in reply.json()["error"]["message"]
    assert time.monotonic() - started < 60
    assert _states(lifecycle_stack)["hung"]["pids"] == []


def test_a_stream_waiting_for_a_long_load_gets_pings_then_its_reply(lifecycle_stack: Stack):
    body = {"model": "late", "max_tokens": 3, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    events: list[str] = []
    with httpx.stream("POST", lifecycle_stack.base_url + "/v1/messages", json=body, headers={"x-api-key": KEY},
                      timeout=300) as reply:
        assert reply.status_code == 200
        assert _states(lifecycle_stack)["late"]["state"] == "loading"  # the stream opened before the load ended
        events = [line.removeprefix("event: ") for line in reply.iter_lines() if line.startswith("event: ")]
    assert events[0] == "ping" and "message_start" in events and events[-1] == "message_stop"
    assert events.index("ping") < events.index("message_start")


def test_a_worker_killed_while_loading_fails_its_requests_and_the_next_request_loads_again(
        lifecycle_stack: Stack):
    assert httpx.post(lifecycle_stack.base_url + "/v1/models/late/unload", headers=AUTH, timeout=60).status_code == 200
    replies: list[httpx.Response] = []
    asking = threading.Thread(target=lambda: replies.append(_chat(lifecycle_stack, "late")))
    asking.start()
    _wait(lambda: _states(lifecycle_stack)["late"]["state"] == "loading" and _states(lifecycle_stack)["late"]["pids"],
          60, "late to be loading")
    os.kill(_states(lifecycle_stack)["late"]["pids"][0], signal.SIGKILL)
    asking.join(120)
    assert replies[0].status_code == 503
    assert "killed by SIGKILL" in replies[0].json()["error"]["message"]
    assert _chat(lifecycle_stack, "late").status_code == 200


def test_an_idle_model_unloads_after_its_ttl_and_keep_alive_overrides_it(lifecycle_stack: Stack):
    assert _chat(lifecycle_stack, "idle").status_code == 200
    _wait(lambda: _states(lifecycle_stack)["idle"]["state"] == "unloaded", 60, "the idle TTL")
    assert "idle for 2s" in _states(lifecycle_stack)["idle"]["reason"]
    assert _chat(lifecycle_stack, "idle", keep_alive=-1).status_code == 200  # keep it loaded
    time.sleep(5)
    assert _states(lifecycle_stack)["idle"]["state"] == "loaded"
    assert _chat(lifecycle_stack, "idle", keep_alive=0).status_code == 200  # unload once done
    _wait(lambda: _states(lifecycle_stack)["idle"]["state"] == "unloaded", 60, "keep_alive 0")
    assert "keep_alive 0" in _states(lifecycle_stack)["idle"]["reason"]
    reply = _chat(lifecycle_stack, "idle", keep_alive="soon")
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "keep_alive"


def test_the_operator_loads_and_unloads_behind_the_api_key_and_never_cuts_a_request_off(lifecycle_stack: Stack):
    url = lifecycle_stack.base_url + "/v1/models/t"
    assert httpx.post(url + "/load", timeout=60).status_code == 401
    loaded = httpx.post(url + "/load", headers=AUTH, timeout=180)
    assert loaded.status_code == 200 and loaded.json()["state"] == "loaded"
    pid = loaded.json()["pids"][0]
    body = {"model": "t", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3000, "stream": True}
    with httpx.stream("POST", lifecycle_stack.base_url + "/v1/chat/completions", json=body, headers=AUTH,
                      timeout=300) as reply:
        lines = reply.iter_lines()
        next(lines)
        busy = httpx.post(url + "/unload", headers=AUTH, timeout=60)
        assert busy.status_code == 409 and busy.json()["error"]["code"] == "model_busy"
        assert [line for line in lines if line][-1] == "data: [DONE]"
    unloaded = httpx.post(url + "/unload", headers=AUTH, timeout=60)
    assert unloaded.status_code == 200 and unloaded.json()["state"] == "unloaded"
    _wait(lambda: not _alive(pid), 30, "the worker to exit")
    missing = httpx.post(lifecycle_stack.base_url + "/v1/models/nope/load", headers=AUTH, timeout=60)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_the_agent_launchers_load_the_listed_model_they_are_asked_for(lifecycle_stack: Stack):
    """A listed model never loaded has no known window: the launcher loads the one it will use."""
    assert "context_length" not in _states(lifecycle_stack)["fresh"]
    launcher = Path(sys.executable).parent / "mlx-gateway-claude"
    result = subprocess.run([str(launcher), "--url", lifecycle_stack.base_url, "--api-key", KEY, "--model", "fresh",
                             "--print"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "loading fresh on the gateway" in result.stderr
    assert "export CLAUDE_CODE_MAX_CONTEXT_TOKENS=50000" in result.stdout
    assert _states(lifecycle_stack)["fresh"]["state"] == "loaded"


def test_workers_started_by_a_gateway_do_not_outlive_it(lifecycle_stack: Stack):
    assert _chat(lifecycle_stack, "t").status_code == 200
    pid = _states(lifecycle_stack)["t"]["pids"][0]
    lifecycle_stack.processes[0].kill()  # SIGKILL: the gateway cannot stop them itself
    _wait(lambda: not _alive(pid), 30, "the orphaned worker to exit")


# --- the shipped deployment --------------------------------------------------------------------


@pytest.mark.slow
def test_the_shipped_supervisord_config_serves_the_shipped_model_list_on_demand(tmp_path: Path):
    """deploy/supervisord.conf and deploy/models.toml as shipped (on a free port and a private
    socket): supervisord runs the gateway alone, the first request loads SmolLM2 in a worker the
    gateway starts, and stopping supervisord stops that worker too."""
    from processes import REPO_ROOT, free_port

    deploy = REPO_ROOT / "deploy"
    port = free_port()
    config = (deploy / "supervisord.conf").read_text().replace(
        "--port 8000", f"--port {port} --zmq ipc://{tmp_path}/gateway.sock --data-dir {tmp_path}/data")
    (tmp_path / "supervisord.conf").write_text(config)
    (tmp_path / "models.toml").write_text((deploy / "models.toml").read_text())
    env = dict(os.environ, MLX_GATEWAY_BIN=str(Path(sys.executable).parent), MLX_GATEWAY_LOGS=str(tmp_path))
    supervisor = subprocess.Popen([sys.executable, "-m", "supervisor.supervisord", "-c", str(tmp_path / "supervisord.conf")],
                                  cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    worker_pid = 0
    try:
        _wait(lambda: _try(lambda: httpx.get(base + "/health", timeout=5).status_code == 200), 120, "the gateway")
        assert httpx.get(base + "/v1/models", timeout=30).json()["data"][0]["state"] == "unloaded"
        body = {"model": "smollm2-135m", "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 5}
        reply = httpx.post(base + "/v1/chat/completions", json=body, timeout=900)
        assert reply.status_code == 200, reply.text
        state = httpx.get(base + "/v1/models", timeout=30).json()["data"][0]
        assert state["state"] == "loaded" and state["loads"] == 1
        worker_pid = state["pids"][0]
    finally:
        supervisor.send_signal(signal.SIGTERM)
        try:
            supervisor.wait(120)
        except subprocess.TimeoutExpired:
            supervisor.kill()
            supervisor.wait(10)
        if worker_pid and _alive(worker_pid):
            os.kill(worker_pid, signal.SIGKILL)
            pytest.fail("the worker outlived supervisord's stop")
    log = (tmp_path / "gateway.log").read_text()
    assert "starting a worker for smollm2-135m" in log and "exited with 0" in log


def _try(check: Callable[[], bool]) -> bool:
    try:
        return check()
    except httpx.HTTPError:
        return False
