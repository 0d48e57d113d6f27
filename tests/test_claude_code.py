"""Claude Code (the real CLI, from npm) against the gateway, set up by ``mlx-gateway-claude``.

Claude Code speaks only the Messages API. The scripted model ("SCRIPT:step|||step") makes it
call its real Bash tool, which writes a file, and then finish; SmolLM2 answers a plain
question. Claude Code's own prompt, tools, permission checks, agent loop and compaction are real.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import SCRIPTED
from processes import REPO_ROOT, Stack, installed_cli

pytestmark = pytest.mark.slow


CLAUDE = installed_cli("claude", "CLAUDE_BIN")


def claude_env(stack: Stack, home: Path) -> dict[str, str]:
    """The environment ``mlx-gateway-claude --print`` gives, in a fresh HOME."""
    printed = subprocess.run([sys.executable, "-m", "gateway.agents.claude_code", "--url", stack.base_url, "--print"],
                             cwd=REPO_ROOT, capture_output=True, text=True, timeout=30, check=True).stdout
    env = {**os.environ, "HOME": str(home)}
    for line in printed.splitlines():
        name, _, value = line.removeprefix("export ").partition("=")
        env[name] = value.strip("'")
    return env


def run_claude(stack: Stack, workdir: Path, prompt: str, *args: str) -> subprocess.CompletedProcess:
    if CLAUDE is None:
        pytest.skip("Claude Code not installed (tests/run.sh installs it with npm into .tools/)")
    home = workdir.parent / f"{workdir.name}-home"
    home.mkdir(exist_ok=True)
    # As root Claude Code refuses --dangerously-skip-permissions: allow the one tool instead.
    return subprocess.run([CLAUDE, "-p", prompt, *args], cwd=workdir, env=claude_env(stack, home),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)


def test_the_launcher_sets_the_served_model_and_its_window(scripted_stack, tmp_path):
    env = claude_env(scripted_stack, tmp_path)
    assert env["ANTHROPIC_BASE_URL"] == scripted_stack.base_url
    assert env["ANTHROPIC_MODEL"] == env["ANTHROPIC_DEFAULT_HAIKU_MODEL"] == SCRIPTED
    assert env["CLAUDE_CODE_AUTO_COMPACT_WINDOW"] == "200000"  # the scripted worker's --context-length
    assert env["CLAUDE_CODE_MAX_CONTEXT_TOKENS"] == "200000"
    assert "DISABLE_COMPACT" not in env and "DISABLE_AUTO_COMPACT" not in env


def test_claude_code_runs_a_bash_tool_call_then_finishes(scripted_stack, tmp_path):
    call = ('<tool_call>{"name": "Bash", "arguments": {"command": "echo made by claude > proof.txt", '
            '"description": "Write the proof file"}}</tool_call>')
    # Claude Code asks for thinking, which opens the template's thinking block: close it first.
    result = run_claude(scripted_stack, tmp_path, f"SCRIPT:Write it.</think>{call}|||</think>The file is written.",
                        "--allowedTools", "Bash")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "proof.txt").read_text() == "made by claude\n"
    assert "The file is written." in result.stdout


def test_claude_code_on_the_default_model(smol_stack, tmp_path):
    """SmolLM2 answers Claude Code. Its 8k window cannot hold Claude Code's tools (~13k tokens),
    so it runs without them, as the launcher advises."""
    result = run_claude(smol_stack, tmp_path, "What is the capital of France? Answer in one word.", "--tools", "")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip()
    assert "assumes a context window" not in result.stderr  # the launcher told it the real window


def test_claude_code_discovers_the_served_models(scripted_stack, tmp_path):
    """With the launcher's environment Claude Code asks GET /v1/models (Anthropic's shape) and
    keeps what it found for its /model picker."""
    result = run_claude(scripted_stack, tmp_path, "SCRIPT:</think>Found.", "--tools", "")
    assert result.returncode == 0, result.stdout + result.stderr
    home = tmp_path.parent / f"{tmp_path.name}-home"
    cached = list(home.rglob("gateway-models.json"))
    assert cached, sorted(str(p) for p in home.rglob("*"))[:50]
    found = json.loads(cached[0].read_text())
    assert [(m["id"], m.get("display_name")) for m in found["models"]] == [(f"claude-local/{SCRIPTED}", SCRIPTED)], found
    assert found["baseUrl"].rstrip("/") == scripted_stack.base_url


def test_a_five_turn_session_is_served_from_the_prefix_cache(scripted_stack, tmp_path):
    """Claude Code resends the whole conversation each turn; every later turn's prompt must be
    a prefix-cache hit but for its new tail (peers re-prefill most of it)."""
    worker_log = next(p for p in scripted_stack.processes if p.name.startswith("worker")).log_path
    seen = len(worker_log.read_text())
    calls = [f'<tool_call>{{"name": "Bash", "arguments": {{"command": "echo {n} >> turns.txt", '
             f'"description": "Append {n}"}}}}</tool_call>' for n in range(1, 5)]
    script = "|||".join(["Go.</think>" + calls[0], *("</think>" + call for call in calls[1:]), "</think>Done."])
    result = run_claude(scripted_stack, tmp_path, f"SCRIPT:{script}", "--allowedTools", "Bash")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "turns.txt").read_text() == "1\n2\n3\n4\n"
    turns = [(int(m[1]), int(m[2])) for m in re.finditer(r"finished \(\w+\): (\d+) prompt \((\d+) cached\)",
                                                          worker_log.read_text()[seen:])]
    assert len(turns) >= 5, turns
    shares = [cached / prompt for prompt, cached in turns[-4:]]
    print("cached share of turns 2-5:", [f"{share:.3f}" for share in shares], "prompts:", turns)
    assert min(shares) > 0.95, turns


# SmolLM2's window. Claude Code's own prompt with the Bash tool alone is ~4,700 of its tokens.
SMALL_WINDOW = 8192


@pytest.fixture(scope="module")
def small_window_stack(tmp_path_factory: pytest.TempPathFactory, tiny_variant_dir) -> Iterator[Stack]:
    """A gateway and a scripted worker with an 8k window, logging what it plays (--script-log)."""
    stack = Stack(tmp_path_factory.mktemp("small-window"))
    try:
        stack.start_gateway()
        stack.start_worker(str(tiny_variant_dir("qwen")), SCRIPTED, "--context-length", str(SMALL_WINDOW),
                           "--max-output-tokens", "0", "--script-log", str(stack.workdir / "script.jsonl"),
                           scripted=True)
        stack.wait_for_models(SCRIPTED)
        yield stack
    finally:
        stack.stop()


def test_a_session_that_outgrows_a_small_window_compacts_and_goes_on(small_window_stack, tmp_path):
    """Six Bash calls, each output ~800 tokens (a tenth of the window), outgrow an 8k window. The
    gateway answers Anthropic's "prompt is too long: N tokens > M maximum"; with the launcher's
    environment Claude Code then summarises the conversation (reactive compaction; the scripted
    model's summary carries the script on, see tests/scripted_worker.py), retries, and goes on
    to the last call and its final answer."""
    stack = small_window_stack
    env = claude_env(stack, tmp_path)
    assert env["CLAUDE_CODE_MAX_CONTEXT_TOKENS"] == str(SMALL_WINDOW)
    assert "DISABLE_COMPACT" not in env and "DISABLE_AUTO_COMPACT" not in env  # either turns compaction off
    worker = next(p for p in stack.processes if p.name.startswith("worker"))
    script_log = stack.workdir / "script.jsonl"
    seen_log = len(worker.log())
    seen_script = len(script_log.read_text()) if script_log.exists() else 0
    calls = [f'<tool_call>{{"name": "Bash", "arguments": {{"command": "seq {n}000 {n}180 && echo {n} >> steps.txt", '
             f'"description": "Count from {n}000"}}}}</tool_call>' for n in range(1, 7)]
    script = "|||".join(["Go.</think>" + calls[0], *("</think>" + call for call in calls[1:]), "</think>All steps done."])
    # Claude Code's own prompt with all its tools (~17k tokens) would not fit: offer Bash alone.
    result = run_claude(stack, tmp_path, f"SCRIPT:{script}", "--tools", "Bash", "--allowedTools", "Bash",
                        "--output-format", "stream-json", "--verbose")
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr
    assert (tmp_path / "steps.txt").read_text() == "".join(f"{n}\n" for n in range(1, 7))

    events = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    boundaries = [i for i, e in enumerate(events) if e.get("subtype") == "compact_boundary"]
    assert boundaries, [e.get("subtype", e.get("type")) for e in events]
    assert all(events[i]["compact_metadata"]["trigger"] == "auto" for i in boundaries)
    assert events[-1]["type"] == "result" and events[-1]["result"] == "All steps done.", events[-1]
    after = [e for e in events[boundaries[0]:] if e.get("type") == "assistant"]
    assert any(block.get("type") == "tool_use" for e in after for block in e["message"]["content"])  # went on acting

    # The worker: the prompt outgrew the window, a summary was asked for, and the script went on
    # from that summary to its last step, the final answer.
    assert "failed (context_length_exceeded)" in worker.log()[seen_log:]
    played = [json.loads(line) for line in script_log.read_text()[seen_script:].splitlines()]
    kinds = [p["kind"] for p in played]
    print("compactions:", len(boundaries), "requests played:", kinds)
    assert "summary" in kinds, played
    last = played[-1]  # the final answer, step 6 of 0-6, played on from a summary
    assert (last["kind"], last["step"], last["steps"], last["resumed"]) == ("script", 6, 7, True), played
