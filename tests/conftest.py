from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from worker.blas import enable_fast_blas  # noqa: E402

enable_fast_blas()  # before anything imports mlx, as the worker does

from processes import Stack  # noqa: E402
from tiny_model import write_tiny_model  # noqa: E402

TINY = "tiny"
# The same weights with a huge context window: a generation long enough to cancel mid-way.
TINY_LONG = "tiny-long"
# The tiny "qwen" variant (tool calls, thinking) behind tests/scripted_worker.py.
SCRIPTED = "tiny-tools"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_variant_dir(tmp_path_factory: pytest.TempPathFactory):
    """``tiny_variant_dir("qwen" | "mistral" | "llama")``: a tiny model with that tool-call format."""
    made: dict[str, Path] = {}

    def make(variant: str) -> Path:
        if variant not in made:
            made[variant] = write_tiny_model(tmp_path_factory.mktemp(f"tiny-{variant}"), variant)
        return made[variant]

    return make


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir: Path):
    from worker.models import load

    return load(str(tiny_model_dir), "tiny")


@pytest.fixture(scope="module")
def tiny_stack(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Stack]:
    """A gateway and two workers (two model names) on the tiny model, shared by a test module."""
    stack = Stack(tmp_path_factory.mktemp("stack"))
    try:
        stack.start_gateway()
        stack.start_worker(str(tiny_model_dir), TINY, "--max-sequences", "8")
        stack.start_worker(str(tiny_model_dir), TINY_LONG, "--context-length", "100000", "--max-output-tokens", "0")
        stack.wait_for_models(TINY, TINY_LONG)
        yield stack
    finally:
        stack.stop()


@pytest.fixture
def fresh_stack(tmp_path: Path) -> Iterator[Stack]:
    """An empty stack for tests that start and kill processes themselves."""
    stack = Stack(tmp_path)
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="session")
def smol_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The gateway and a worker on the default model, SmolLM2-135M (slow tests only).

    The default cache (~/.cache/mlx-gateway) keeps its download and conversion between runs.
    """
    stack = Stack(tmp_path_factory.mktemp("smol"))
    try:
        stack.start_gateway()
        # Greedy by default: Codex sends no temperature, and the tests check answers.
        stack.start_worker("smollm2-135m", "smollm2-135m", "--temperature", "0")
        stack.wait_for_models("smollm2-135m", timeout=900)
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="session")
def scripted_stack(tmp_path_factory: pytest.TempPathFactory, tiny_variant_dir) -> Iterator[Stack]:
    """A gateway and a scripted worker (see tiny_model.scripted_logits_processors), shared by
    the Responses, replay and real-client tests. The context is huge so long prompts fit."""
    stack = Stack(tmp_path_factory.mktemp("scripted"))
    try:
        stack.start_gateway()
        stack.start_worker(str(tiny_variant_dir("qwen")), SCRIPTED, "--context-length", "200000", "--max-output-tokens", "0",
                           scripted=True)
        stack.wait_for_models(SCRIPTED)
        yield stack
    finally:
        stack.stop()
