"""The worker's CPU BLAS: OpenBLAS preloaded on Linux, its thread count set by --cpu-threads."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest
from processes import REPO_ROOT

linux_only = pytest.mark.skipif(platform.system() != "Linux", reason="Metal on macOS: no CPU BLAS to tune")


def run_worker(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "worker", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120)


@linux_only
def test_cpu_threads_sets_openblas_threads():
    # A model that does not exist: the worker logs its BLAS line, then exits cleanly.
    for threads in ("1", "2"):
        result = run_worker("--cpu-threads", threads, "--model", "/nonexistent/model.gguf")
        if "OpenBLAS" not in result.stderr:
            pytest.skip("OpenBLAS is not installed here")
        assert f"; {threads} threads)" in result.stderr, result.stderr
        assert result.returncode == 2 and "Traceback" not in result.stderr


def test_cpu_threads_must_be_positive():
    result = run_worker("--cpu-threads", "0")
    assert result.returncode == 2 and "--cpu-threads must be at least 1" in result.stderr
    assert "Traceback" not in result.stderr
