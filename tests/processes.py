"""Start the real gateway and worker processes for a test, and always stop them by PID."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent


def installed_cli(name: str, env_var: str) -> str | None:
    """A client CLI for the real-client tests: ``$env_var``, else tests/run.sh's npm install in
    .tools/, else one on PATH; None when there is none (those tests skip)."""
    for candidate in (os.environ.get(env_var), str(REPO_ROOT / ".tools/node_modules/.bin" / name)):
        if candidate and Path(candidate).exists():
            return candidate
    return shutil.which(name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Process:
    name: str
    popen: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 10.0) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout)

    def kill(self) -> None:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, signal.SIGKILL)
            self.popen.wait(10)


@dataclass
class Stack:
    """One gateway and any number of workers, on loopback and an ipc socket in ``workdir``."""

    workdir: Path
    cache_dir: Path | None = None
    heartbeat_interval: float = 0.5
    queue_timeout: float = 2.0
    port: int = field(default_factory=free_port)
    processes: list[Process] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def zmq_address(self) -> str:
        return f"ipc://{self.workdir / 'gateway.sock'}"

    def _spawn(self, name: str, args: list[str]) -> Process:
        """Run ``python -m <args>`` (or ``python <script> ...`` when args[0] ends in .py)."""
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if self.cache_dir is not None:
            env["MLX_GATEWAY_CACHE"] = str(self.cache_dir)
        log_path = self.workdir / f"{name}.log"
        with open(log_path, "wb") as log_file:
            popen = subprocess.Popen(
                [sys.executable, *([] if args[0].endswith(".py") else ["-m"]), *args], cwd=REPO_ROOT, env=env,
                stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        process = Process(name, popen, log_path)
        self.processes.append(process)
        return process

    def start_gateway(self, *extra: str) -> Process:
        return self._spawn("gateway", [
            "gateway", "--port", str(self.port), "--zmq", self.zmq_address,
            "--heartbeat-interval", str(self.heartbeat_interval), "--data-dir", str(self.workdir / "data"),
            "--queue-timeout", str(self.queue_timeout), *extra,
        ])

    def start_worker(self, model: str, served_name: str, *extra: str, scripted: bool = False) -> Process:
        """A worker process; ``scripted`` runs tests/scripted_worker.py (scripted output on request)."""
        index = sum(1 for p in self.processes if p.name.startswith("worker"))
        program = "tests/scripted_worker.py" if scripted else "worker"
        return self._spawn(f"worker{index}-{served_name}", [
            program, "--model", model, "--served-name", served_name, "--gateway", self.zmq_address,
            "--heartbeat-interval", str(self.heartbeat_interval), *extra,
        ])

    def wait_for_models(self, *names: str, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for process in self.processes:
                if process.popen.poll() is not None:
                    raise RuntimeError(f"{process.name} exited with {process.popen.returncode}:\n{process.log()}")
            try:
                listed = {m["id"] for m in httpx.get(f"{self.base_url}/v1/models", timeout=2).json()["data"]}
                if set(names) <= listed:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"models {names} not served within {timeout}s:\n" + self.logs())

    def remove(self, process: Process) -> None:
        """Stop one process for good (it no longer counts as part of the stack)."""
        process.stop()
        self.processes.remove(process)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.log()}" for p in self.processes)

    def stop(self) -> None:
        # Workers first, so the gateway sees them go; every process is stopped even if one fails.
        for process in reversed(self.processes):
            try:
                process.stop()
            except Exception:
                process.kill()
