"""OpenAI's Codex CLI (the real one, from npm) against the gateway and a scripted worker.

Codex accepts nothing but the Responses API and fails quietly (exit 0, no answer) on a
stream it dislikes, so these tests read what it printed and what it did on disk. The model
is scripted ("SCRIPT:step|||step"): Codex's own prompt, tools and agent loop are real.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import SCRIPTED
from processes import REPO_ROOT, Stack

pytestmark = pytest.mark.slow
MODEL = SCRIPTED


def codex_binary() -> str | None:
    for candidate in (os.environ.get("CODEX_BIN"), str(REPO_ROOT / ".tools/node_modules/.bin/codex")):
        if candidate and Path(candidate).exists():
            return candidate
    return shutil.which("codex")


CODEX = codex_binary()


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


def test_codex_on_the_default_model(smol_stack, tmp_path):
    """Nothing scripted: Codex's real ~4,500-token prompt, answered by SmolLM2 (about a minute on a CPU)."""
    if CODEX is None:
        pytest.skip("Codex CLI not installed")
    output = run_codex(smol_stack, tmp_path, "What is the capital of France? Answer in one word.", "smollm2-135m")
    assert "Paris" in output.split("codex\n", 1)[-1], output
