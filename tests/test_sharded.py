"""A sharded worker: the tiny model (4 attention / 2 KV heads) split by tensor parallelism over
two ranks that mlx.launch starts on this machine (MLX's ring backend over loopback TCP), and a
tiny qwen2 split by pipeline parallelism (a layer per rank).

Checked against a single-process worker on the same weights behind the same gateway: one
worker listed, the same greedy output (streaming, concurrent), cancel, a killed rank failing
its requests with worker_crashed at once, and a restarted group serving again.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from processes import REPO_ROOT, Process, Stack, free_port
from sse import chat_text, stream_chat

SINGLE, SHARDED = "tiny-single", "tiny-sharded"
LAUNCH = str(Path(sys.executable).parent / "mlx.launch")
PROMPTS = ["The capital of France", "def add(a, b):", "Write a short poem about the sea", "Hello"]
TOKENS = 12  # greedy tokens compared per prompt (the tiny model decodes a few per second here)


def start_group(stack: Stack, *extra: str, ranks: int = 2, distributed: str = "tensor") -> Process:
    """``mlx.launch --backend ring -n RANKS … worker --distributed tensor …`` as one stack process."""
    index = sum(1 for p in stack.processes if p.name.startswith("group"))
    log_path = stack.workdir / f"group{index}.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    command = [sys.executable, LAUNCH, "--backend", "ring", "-n", str(ranks), "--starting-port", str(free_port()),
               "--python", sys.executable, "-m", "worker", "--distributed", distributed, "--gateway", stack.zmq_address,
               "--heartbeat-interval", str(stack.heartbeat_interval), "--group-timeout", "5", *extra]
    with open(log_path, "wb") as log_file:
        # A session of its own, as under a supervisor: the test can signal the group's processes.
        popen = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
    process = Process(f"group{index}", popen, log_path)
    stack.processes.append(process)
    return process


def logged_pids(group: Process) -> dict[int, int]:
    """Each rank's pid, from the line every rank logs when it joins."""
    return {int(r): int(p) for r, p in re.findall(r"rank (\d+) \([^)]*\) of \d+, pid (\d+)", group.log())}


def rank_pids(group: Process, ranks: int = 2, timeout: float = 120) -> dict[int, int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(found := logged_pids(group)) == ranks:
            return found
        time.sleep(0.2)
    raise TimeoutError(f"the ranks did not start:\n{group.log()}")


def wait_for_log(group: Process, text: str, timeout: float) -> bool:
    """Whether ``text`` reached the group's log within ``timeout``: mlx.launch relays each rank's
    lines a little later, later still on a busy machine."""
    deadline = time.monotonic() + timeout
    while text not in group.log():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def kill_pids(pids: Iterator[int] | list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[tuple[Stack, Process]]:
    stack = Stack(tmp_path_factory.mktemp("sharded"), queue_timeout=20)
    groups: list[Process] = []  # every group started, also those a test removed from the stack
    try:
        stack.start_gateway()
        stack.start_worker(str(tiny_model_dir), SINGLE, "--context-length", "100000", "--cpu-threads", "1")
        group = start_group(stack, "--model", str(tiny_model_dir), "--served-name", SHARDED,
                            "--context-length", "100000", "--max-sequences", "4", "--cpu-threads", "1")
        groups.append(group)
        rank_pids(group)
        stack.wait_for_models(SINGLE, SHARDED)
        yield stack, group
    finally:
        groups += [p for p in stack.processes if p.name.startswith("group") and p not in groups]
        stack.stop()  # mlx.launch first: a rank whose launcher is gone exits by itself
        kill_pids([pid for group in groups for pid in logged_pids(group).values()])


def complete(stack: Stack, model: str, prompt: str, tokens: int = TOKENS, request_id: str | None = None) -> str:
    """``request_id``: sent as x-request-id, under which the worker logs the request."""
    body = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0}
    headers = {"x-request-id": request_id} if request_id else {}
    # minutes, not seconds: three ranks on a busy 2-core machine (one run under load 8-10 took over 120 s)
    response = httpx.post(f"{stack.base_url}/v1/completions", json=body, headers=headers, timeout=300)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def test_the_gateway_lists_one_worker_for_the_group(sharded):
    stack, _ = sharded
    workers = [w for w in httpx.get(f"{stack.base_url}/v1/workers").json()["data"] if w["model"] == SHARDED]
    assert len(workers) == 1
    assert workers[0]["context_length"] == 100000
    assert workers[0]["max_sequences"] == 4


def test_greedy_output_is_the_single_workers(sharded):
    stack, _ = sharded
    for prompt in PROMPTS[:3]:
        assert complete(stack, SHARDED, prompt) == complete(stack, SINGLE, prompt), prompt


def test_concurrent_streams_match_the_single_worker(sharded):
    stack, _ = sharded
    single = {}
    for prompt in PROMPTS:
        body = {"model": SINGLE, "messages": [{"role": "user", "content": prompt}], "max_tokens": TOKENS,
                "temperature": 0}
        events, done = stream_chat(stack.base_url, body, timeout=120)
        assert done
        single[prompt] = chat_text(events)
    results: dict[str, str] = {}

    def run(prompt: str) -> None:
        body = {"model": SHARDED, "messages": [{"role": "user", "content": prompt}], "max_tokens": TOKENS,
                "temperature": 0}
        events, done = stream_chat(stack.base_url, body, timeout=120)
        results[prompt] = chat_text(events) if done else "<no [DONE]>"

    threads = [threading.Thread(target=run, args=(p,)) for p in PROMPTS]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    assert results == single


def test_cancel_frees_the_slot(sharded):
    stack, group = sharded
    body = {"model": SHARDED, "messages": [{"role": "user", "content": "Tell me a long story"}],
            "max_tokens": 5000, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{stack.base_url}/v1/chat/completions", json=body, timeout=60) as response:
        chunks = 0
        for line in response.iter_lines():
            if line.startswith("data: ") and '"content"' in line:
                chunks += 1
                if chunks >= 3:
                    break  # the client goes away: the gateway cancels
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if "finished (cancelled)" in group.log():
            break
        time.sleep(0.2)
    assert "finished (cancelled)" in group.log()
    assert complete(stack, SHARDED, "Hello", 4) == complete(stack, SINGLE, "Hello", 4)


class LongStream(threading.Thread):
    """A long streaming chat request to the group; ``producing`` once text reached the client,
    ``ended`` once the stream ended (however it did)."""

    def __init__(self, stack: Stack):
        super().__init__(daemon=True)
        self.stack = stack
        self.events: list[dict] = []
        self.producing = threading.Event()
        self.ended = threading.Event()

    def run(self) -> None:
        body = {"model": SHARDED, "messages": [{"role": "user", "content": "Tell me a long story"}],
                "max_tokens": 5000, "temperature": 0, "stream": True}
        try:
            with httpx.stream("POST", f"{self.stack.base_url}/v1/chat/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        self.events.append(json.loads(line[6:]))
                        if any(c["delta"].get("content") for c in self.events[-1].get("choices", [])):
                            self.producing.set()  # output reached the client: no retry elsewhere
        finally:
            self.ended.set()

    def wait_for_output(self, timeout: float = 120) -> bool:
        """Whether text reached the client: False if the stream ended first (a group that broke
        before its first token fails no request: the gateway retries it, then gives up), or
        after ``timeout``."""
        deadline = time.monotonic() + timeout
        while not self.producing.wait(0.2):
            if self.ended.is_set() or time.monotonic() > deadline:
                return self.producing.is_set()
        return True

    @property
    def error_code(self) -> str | None:
        return self.events[-1].get("error", {}).get("code") if self.events else None


def restart_group(stack: Stack, group: Process, model_dir: Path) -> Process:
    """As a supervisor would: the same command again; the restarted group serves again."""
    stack.processes.remove(group)  # gone for good (the fixture still reaps its ranks)
    restarted = start_group(stack, "--model", str(model_dir), "--served-name", SHARDED,
                            "--context-length", "100000", "--max-sequences", "4", "--cpu-threads", "1")
    rank_pids(restarted)
    stack.wait_for_models(SHARDED, timeout=120)
    assert complete(stack, SHARDED, "Hello", 4) == complete(stack, SINGLE, "Hello", 4)
    return restarted


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.2)
    return not _alive(pid)


def test_a_killed_rank_fails_in_flight_requests_and_the_restarted_group_serves(sharded, tiny_model_dir):
    stack, group = sharded
    pids = rank_pids(group)
    stream = LongStream(stack)
    stream.start()
    assert stream.wait_for_output(), (stream.events[-1:], group.log())
    killed_at = time.monotonic()
    os.kill(pids[1], signal.SIGKILL)
    assert stream.ended.wait(15), "the stream did not end after a rank was killed"
    assert time.monotonic() - killed_at < 10
    assert stream.error_code == "worker_crashed", stream.events[-1:]
    # The whole group stops: rank 0 and mlx.launch exit.
    group.popen.wait(20)
    assert wait_gone(pids[0], 10), "rank 0 outlived its group"
    assert "the whole group stops" in group.log()
    restart_group(stack, group, tiny_model_dir)


def test_a_hung_rank_stops_the_group_after_the_group_timeout(sharded, tiny_model_dir):
    stack, _ = sharded
    group = next(p for p in stack.processes if p.name.startswith("group"))
    pids = rank_pids(group)
    stream = LongStream(stack)
    stream.start()
    assert stream.wait_for_output(), (stream.events[-1:], group.log())
    assert not stream.ended.is_set(), ("the stream ended before a rank hung", stream.events[-1:], group.log())
    os.kill(pids[1], signal.SIGSTOP)  # hung: alive, its sockets open, silent
    try:
        # Rank 0's watchdog ends it after --group-timeout (5 s), its connection closes, and the
        # gateway fails the stream. The limits are generous: a busy machine is slow, not wrong.
        assert stream.ended.wait(120), "the stream did not end after a rank hung"
        assert stream.error_code == "worker_crashed", stream.events[-1:]
        assert wait_gone(pids[0], 60), "rank 0 outlived its group"
        assert wait_for_log(group, "no answer from the group for 5s", 30), group.log()
    finally:
        # mlx.launch waits for a stopped rank (SIGTERM is held while it is stopped); a
        # supervisor's stop escalates to SIGKILL, as here.
        os.kill(pids[1], signal.SIGKILL)
    group.popen.wait(60)
    restart_group(stack, group, tiny_model_dir)


def test_sigterm_to_the_process_group_drains_the_group(sharded):
    stack, _ = sharded
    group = next(p for p in stack.processes if p.name.startswith("group"))
    pids = rank_pids(group)
    result: dict[str, str] = {}
    request_id = f"drain-{uuid.uuid4().hex}"
    thread = threading.Thread(target=lambda: result.update(text=complete(stack, SHARDED, "Hello", 8, request_id)))
    thread.start()
    # Wait until rank 0 has the request (one sent after the SIGTERM is refused, and waits for a
    # worker that never comes): its "accepted" line, logged under our x-request-id.
    assert wait_for_log(group, f"[{request_id}]: accepted", 120), group.log()
    # supervisord's stopasgroup: SIGTERM to every process of the group. mlx.launch dies at once
    # (and with it the ranks' log relay); rank 0 drains, then tells the other ranks to stop.
    os.killpg(group.popen.pid, signal.SIGTERM)
    thread.join(120)
    assert not thread.is_alive(), "the request did not end"
    assert result.get("text") == complete(stack, SINGLE, "Hello", 8)  # the running request finished
    assert wait_gone(pids[0], 60) and wait_gone(pids[1], 60), group.log()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (not yet reaped by its parent) counts as gone
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def write_tiny_qwen2(out: Path) -> Path:
    """The tiny model's shape as a qwen2 (mlx-lm's pipeline mixin), with the weight index that
    sharded_load reads to pick each stage's files."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import qwen2
    from tiny_model import build_tokenizer, model_config

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    config = model_config(len(tokenizer), tokenizer.convert_tokens_to_ids("<|im_end|>"))
    config["model_type"] = "qwen2"
    del config["head_dim"]
    mx.random.seed(0)
    weights = dict(tree_flatten(qwen2.Model(qwen2.ModelArgs.from_dict(config)).parameters()))
    head, eos = weights["lm_head.weight"] * 8, config["eos_token_id"]  # as tiny_model.random_weights
    weights["lm_head.weight"] = mx.concatenate([head[:eos], mx.zeros_like(head[eos:eos + 1]), head[eos + 1:]])
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    index = {"metadata": {}, "weight_map": dict.fromkeys(weights, "model.safetensors")}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def pipelined(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The same check for pipeline parallelism: a tiny qwen2, its two layers one per rank."""
    model_dir = write_tiny_qwen2(tmp_path_factory.mktemp("tiny-qwen2"))
    stack = Stack(tmp_path_factory.mktemp("pipelined"), queue_timeout=20)
    group = None
    try:
        stack.start_gateway()
        stack.start_worker(str(model_dir), SINGLE, "--cpu-threads", "1")
        group = start_group(stack, "--model", str(model_dir), "--served-name", SHARDED, "--cpu-threads", "1",
                            "--max-sequences", "4", distributed="pipeline")
        rank_pids(group)
        stack.wait_for_models(SINGLE, SHARDED)
        yield stack
    finally:
        stack.stop()
        if group is not None:
            kill_pids(list(logged_pids(group).values()))


def test_pipeline_parallel_output_is_the_single_workers(pipelined):
    stack = pipelined
    assert len([w for w in httpx.get(f"{stack.base_url}/v1/workers").json()["data"] if w["model"] == SHARDED]) == 1
    for prompt in PROMPTS[:2]:
        assert complete(stack, SHARDED, prompt) == complete(stack, SINGLE, prompt), prompt
    results: dict[str, str] = {}

    def run(prompt: str) -> None:
        results[prompt] = complete(stack, SHARDED, prompt)

    threads = [threading.Thread(target=run, args=(p,)) for p in PROMPTS]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    assert results == {p: complete(stack, SINGLE, p) for p in PROMPTS}


@pytest.mark.slow
def test_smollm2_over_three_ranks_writes_what_the_single_worker_writes(tmp_path):
    """SmolLM2's 9 attention / 3 KV heads divide over 3 ranks. Its layers stay 4-bit when
    sharded (the single worker dequantizes them to float32 on the CPU), so the sums differ in
    order: the first 16 greedy tokens are compared (run here: equal for both prompts)."""
    stack = Stack(tmp_path, queue_timeout=60)
    group = None
    try:
        stack.start_gateway()
        stack.start_worker("smollm2-135m", SINGLE, "--cpu-threads", "1")
        # Three ranks on a small CPU: a step of SmolLM2 can take seconds, far past the 5 s the tiny
        # model's groups allow before the watchdog stops them.
        group = start_group(stack, "--model", "smollm2-135m", "--served-name", SHARDED, "--cpu-threads", "1",
                            "--max-sequences", "2", "--group-timeout", "120", ranks=3)
        rank_pids(group, ranks=3, timeout=300)
        stack.wait_for_models(SINGLE, SHARDED, timeout=900)
        for prompt in ("The capital of France is", "def add(a, b):"):
            assert complete(stack, SHARDED, prompt, 16) == complete(stack, SINGLE, prompt, 16), prompt
    finally:
        stack.stop()
        if group is not None:
            kill_pids(list(logged_pids(group).values()))


def test_distributed_outside_mlx_launch_says_how_to_start_it(tiny_model_dir):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLX_RANK", "MLX_HOSTFILE", "OMPI_"))}
    result = subprocess.run([sys.executable, "-m", "worker", "--model", str(tiny_model_dir), "--distributed", "tensor"],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "mlx.launch" in result.stderr


def test_a_rank_that_cannot_find_the_model_is_named_and_the_group_exits(tmp_path):
    stack = Stack(tmp_path)
    group = start_group(stack, "--model", str(tmp_path / "no-such-model"), "--served-name", "missing")
    try:
        group.popen.wait(120)
        log = group.log()
        for rank in (0, 1):
            assert re.search(rf"rank {rank} \(127\.0\.0\.1:\d+\) cannot serve .*no-such-model", log), log
    finally:
        stack.stop()
        kill_pids(list(logged_pids(group).values()))


def test_the_deploy_script_launches_every_rank_as_a_distributed_worker(tmp_path):
    """deploy/sharded/worker-group.sh: mlx.launch with the hostfile, and the worker's flags."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "mlx.launch").write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    (fake_bin / "mlx.launch").chmod(0o755)
    env = dict(os.environ, MLX_GATEWAY_BIN=str(fake_bin))
    script = REPO_ROOT / "deploy" / "sharded" / "worker-group.sh"
    result = subprocess.run([str(script), "--model", "big", "--served-name", "big"], env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    args = result.stdout.splitlines()
    assert args[:2] == ["--hostfile", str(script.parent / "hosts.json")]
    assert args[args.index("--"):] == ["--", "-m", "worker", "--distributed", "tensor", "--gateway",
                                       "tcp://127.0.0.1:5555", "--model", "big", "--served-name", "big"]
    hosts = json.loads((script.parent / "hosts.json").read_text())
    assert hosts["backend"] == "ring" and len(hosts["hosts"]) == 2


def test_a_rank_that_never_joins_stops_the_others_after_the_group_timeout(tmp_path, tiny_model_dir):
    """Rank 0 alone, its peer never started (a host unreachable): it gives up after --group-timeout."""
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{free_port()}"], [f"127.0.0.1:{free_port()}"]]))
    env = dict(os.environ, MLX_RANK="0", MLX_HOSTFILE=str(hostfile))
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "worker", "--model", str(tiny_model_dir), "--distributed", "tensor",
                             "--group-timeout", "3"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert time.monotonic() - started < 45
    assert "joining the group (exiting if a rank has not joined within 3s" in result.stderr
