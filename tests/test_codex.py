"""OpenAI's Codex CLI (the real one, from npm) against the gateway and a scripted worker.

Codex accepts nothing but the Responses API and fails quietly (exit 0, no answer) on a
stream it dislikes, so these tests read what it printed and what it did on disk. The model
is scripted ("SCRIPT:step|||step"): Codex's own prompt, tools and agent loop are real.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from conftest import SCRIPTED
from processes import REPO_ROOT, Stack, installed_cli

pytestmark = pytest.mark.slow
MODEL = SCRIPTED


CODEX = installed_cli("codex", "CODEX_BIN")


@pytest.fixture(scope="module")
def stack(scripted_stack: Stack) -> Stack:
    if CODEX is None:
        pytest.skip("Codex CLI not installed (tests/run.sh installs it with npm into .tools/)")
    return scripted_stack


def run_codex(stack: Stack, workdir: Path, prompt: str, model: str = MODEL) -> str:
    home = workdir.parent / f"{workdir.name}-codex-home"
    home.mkdir(exist_ok=True)
    (home / "config.toml").write_text(
        f'model = "{model}"\nmodel_provider = "local"\n'
        f'[model_providers.local]\nname = "local"\nbase_url = "{stack.base_url}/v1"\n'
        'wire_api = "responses"\nenv_key = "LOCAL_API_KEY"\nstream_max_retries = 0\n'
    )
    env = {**os.environ, "CODEX_HOME": str(home), "LOCAL_API_KEY": "unused"}
    result = subprocess.run(
        [CODEX, "exec", "--skip-git-repo-check", "--dangerously-bypass-approvals-and-sandbox", prompt],
        cwd=workdir, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


def test_codex_shows_the_answer(stack, tmp_path):
    # Codex asks for reasoning, which opens the template's thinking block: close it first.
    output = run_codex(stack, tmp_path, "SCRIPT:The user says hi.</think>Hello from mlx-gateway.")
    assert "Hello from mlx-gateway." in output


def test_codex_runs_a_shell_tool_call_and_continues(stack, tmp_path):
    call = '<tool_call>{"name": "exec_command", "arguments": {"cmd": "echo made by codex > proof.txt"}}</tool_call>'
    output = run_codex(stack, tmp_path, f"SCRIPT:Run it.</think>{call}|||</think>The file is written.")
    assert (tmp_path / "proof.txt").read_text() == "made by codex\n"
    assert "The file is written." in output


FALLBACK_WARNINGS = ("Model metadata", "fallback metadata")
# The scripted model calls Codex's freeform apply_patch tool (given to the template as a function
# with one string argument, "input"), and answers once the patch's result comes back.
PATCH = "*** Begin Patch\n*** Add File: hello.txt\n+hello\n*** End Patch\n"
APPLY_PATCH = "<tool_call>" + json.dumps({"name": "apply_patch", "arguments": {"input": PATCH}}) + "</tool_call>"
PATCH_SCRIPT = f"SCRIPT:Add the file.</think>{APPLY_PATCH}|||</think>The patch is applied."


def exec_codex(home: Path, workdir: Path, prompt: str) -> str:
    """``codex exec`` with ``home`` as CODEX_HOME, as configured there."""
    result = subprocess.run(
        [CODEX, "exec", "--skip-git-repo-check", "--dangerously-bypass-approvals-and-sandbox", prompt],
        cwd=workdir, env={**os.environ, "CODEX_HOME": str(home)}, stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


def test_codex_configured_by_mlx_gateway_codex_knows_the_model_and_applies_a_freeform_patch(stack, tmp_path):
    workers = httpx.get(f"{stack.base_url}/v1/workers").json()["data"]
    assert [(w["model"], w["tool_calls"], w["thinking"]) for w in workers] == [(MODEL, True, True)]
    home, workdir = tmp_path / "codex-home", tmp_path / "work"
    workdir.mkdir()
    configure_codex(stack, home)
    catalog = json.loads((home / "mlx-gateway-models.json").read_text())["models"]
    assert [(m["slug"], m["context_window"], m["apply_patch_tool_type"]) for m in catalog] == [
        (MODEL, 200_000, "freeform")]
    log, seen = gateway_log(stack)
    output = exec_codex(home, workdir, PATCH_SCRIPT)
    assert not any(warning in output for warning in FALLBACK_WARNINGS), output
    # Over the Responses WebSocket (supports_websockets = true): one connection, with Codex's
    # prewarm, the turn that calls apply_patch and the turn after it.
    assert "WebSocket" not in output, output  # Codex logs "failed to connect to Responses WebSocket"
    lines = log.read_text()[seen:]
    assert lines.count('"WebSocket /v1/responses" [accepted]') == 1, lines
    assert lines.count("over WebSocket: completed") >= 3, lines
    # Codex offered apply_patch (with its fallback metadata it answers "unsupported call: apply_patch")
    # and applied the model's patch; the script's next step is the answer.
    assert "unsupported call" not in output, output
    assert (workdir / "hello.txt").read_text() == "hello\n"
    assert "The patch is applied." in output


def configure_codex(stack: Stack, home: Path) -> None:
    """``mlx-gateway-codex``: the provider (with WebSockets) and a catalog from the live workers."""
    configured = subprocess.run([sys.executable, "-m", "gateway.agents.codex", "--url", stack.base_url, "--codex-home",
                                 str(home), "--no-run"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert configured.returncode == 0, configured.stderr


def gateway_log(stack: Stack) -> tuple[Path, int]:
    log = next(p for p in stack.processes if p.name == "gateway").log_path
    return log, len(log.read_text())


def test_mlx_gateway_codex_configures_and_runs_codex_with_the_arguments_after_dashes(stack, tmp_path):
    """One command starts Codex on the gateway's model, as mlx-gateway-claude starts Claude Code."""
    home, workdir = tmp_path / "codex-home", tmp_path / "work"
    workdir.mkdir()
    path = f"{Path(CODEX).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    result = subprocess.run(
        [sys.executable, "-m", "gateway.agents.codex", "--url", stack.base_url, "--codex-home", str(home), "--",
         "exec", "--skip-git-repo-check", "--dangerously-bypass-approvals-and-sandbox", "SCRIPT:Launched and answering."],
        cwd=workdir, env={**os.environ, "PATH": path, "PYTHONPATH": str(REPO_ROOT)}, stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Launched and answering." in output.split("codex\n", 1)[-1], output
    assert (home / "config.toml").exists() and not any(warning in output for warning in FALLBACK_WARNINGS), output


def test_codex_reads_the_catalog_the_gateway_serves(stack, tmp_path):
    """Codex asks a provider with command auth for ``GET /models?client_version=...``: the gateway's
    own catalog then takes the place of a catalog file."""
    home, workdir = tmp_path / "codex-home", tmp_path / "work"
    home.mkdir()
    workdir.mkdir()
    (home / "config.toml").write_text(
        f'model = "{MODEL}"\nmodel_provider = "gw"\n[model_providers.gw]\nname = "gw"\n'
        f'base_url = "{stack.base_url}/v1"\nwire_api = "responses"\nstream_max_retries = 0\n'
        'auth = { command = "echo", args = ["unused"] }\n'
    )
    output = exec_codex(home, workdir, PATCH_SCRIPT)
    assert not any(warning in output for warning in FALLBACK_WARNINGS), output
    assert (workdir / "hello.txt").read_text() == "hello\n"


def test_codex_on_the_default_model(smol_stack, tmp_path):
    """Nothing scripted: Codex configured by mlx-gateway-codex (WebSocket, catalog), answered by SmolLM2."""
    if CODEX is None:
        pytest.skip("Codex CLI not installed")
    home, workdir = tmp_path / "codex-home", tmp_path / "work"
    workdir.mkdir()
    configure_codex(smol_stack, home)
    output = exec_codex(home, workdir, "What is the capital of France? Answer in one word.")
    assert "Paris" in output.split("codex\n", 1)[-1], output
    assert "WebSocket" not in output and not any(warning in output for warning in FALLBACK_WARNINGS), output


LATE_SCRIPTED = ("import runpy, sys, time; time.sleep({seconds}); sys.argv = ['scripted_worker.py', *sys.argv[1:]]; "
                 "runpy.run_path({script!r}, run_name='__main__')")


@pytest.fixture
def slow_loading_stack(tmp_path: Path, tiny_variant_dir) -> Stack:
    """The scripted model listed on demand, taking 8 s longer to load, on a gateway that sends
    a keep-alive after 1 s of silence (a stand-in for a long prefill or a large model's load)."""
    if CODEX is None:
        pytest.skip("Codex CLI not installed (tests/run.sh installs it with npm into .tools/)")
    late = [sys.executable, "-c", LATE_SCRIPTED.format(seconds=8, script=str(REPO_ROOT / "tests/scripted_worker.py"))]
    (tmp_path / "models.toml").write_text(
        f'[[model]]\nname = "{MODEL}"\nmodel = "{tiny_variant_dir("qwen")}"\ncommand = {json.dumps(late)}\n'
        'args = ["--context-length", "200000", "--max-output-tokens", "0"]\n')
    stack = Stack(tmp_path / "stack")
    stack.workdir.mkdir()
    try:
        stack.start_gateway("--models", str(tmp_path / "models.toml"), "--keepalive", "1")
        stack.wait_for_models(MODEL)  # listed (unloaded) as soon as the gateway is up
        yield stack
    finally:
        stack.stop()


def test_a_responses_stream_gets_events_through_a_long_silence_and_codex_waits_for_them(slow_loading_stack, tmp_path):
    """Codex gives up on a stream after stream_idle_timeout_ms (300 s by default) without an
    event, and SSE comments do not count: through a silence longer than that, the gateway sends
    response.in_progress events. Here Codex allows 3 s, the model takes 8 s to load."""
    from openai import OpenAI

    client = OpenAI(base_url=slow_loading_stack.base_url + "/v1", api_key="unused")
    events = list(client.responses.create(model=MODEL, input="SCRIPT:</think>Loaded.", stream=True,
                                          extra_body={"keep_alive": 0}))
    kinds = [event.type for event in events]
    assert kinds.count("response.in_progress") >= 4, kinds  # one at the start, then one a second
    assert kinds[-1] == "response.completed" and events[-1].response.output_text == "Loaded."
    assert [e.sequence_number for e in events] == list(range(len(events)))
    httpx.post(slow_loading_stack.base_url + "/v1/models/" + MODEL + "/unload", timeout=60)

    home = tmp_path / "codex-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'model = "{MODEL}"\nmodel_provider = "local"\n'
        f'[model_providers.local]\nname = "local"\nbase_url = "{slow_loading_stack.base_url}/v1"\n'
        'wire_api = "responses"\nenv_key = "LOCAL_API_KEY"\nstream_max_retries = 0\nstream_idle_timeout_ms = 3000\n')
    workdir = tmp_path / "work"
    workdir.mkdir()
    result = subprocess.run(
        [CODEX, "exec", "--skip-git-repo-check", "--dangerously-bypass-approvals-and-sandbox",
         "SCRIPT:The user waits.</think>Answered after the load."],
        cwd=workdir, env={**os.environ, "CODEX_HOME": str(home), "LOCAL_API_KEY": "unused"},
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "Answered after the load." in output, output
    assert "idle timeout" not in output
