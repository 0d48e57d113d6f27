"""A gateway and workers under a real supervisord (from PyPI), as deploy/supervisord.conf runs them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from processes import REPO_ROOT, free_port

PROGRAM = """
[program:{name}]
command={command}
directory={cwd}
autorestart=true
startsecs=1
startretries=20
stopsignal=TERM
stopwaitsecs={stopwait}
redirect_stderr=true
stdout_logfile={logs}/{name}.log
"""

SUPERVISORD = """
[supervisord]
nodaemon=true
logfile={logs}/supervisord.log
pidfile={logs}/supervisord.pid

[unix_http_server]
file={logs}/supervisor.sock
chmod=0700

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl=unix://{logs}/supervisor.sock
"""


@dataclass
class Supervised:
    workdir: Path
    gateway_args: list[str] = field(default_factory=list)
    workers: dict[str, list[str]] = field(default_factory=dict)  # served model name -> worker args
    heartbeat_interval: float = 0.5
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def config(self) -> Path:
        return self.workdir / "supervisord.conf"

    def start(self) -> None:
        logs, python = self.workdir, sys.executable
        zmq = f"ipc://{self.workdir / 'gateway.sock'}"
        programs = [PROGRAM.format(
            name="gateway", cwd=REPO_ROOT, logs=logs, stopwait=20,
            command=" ".join([python, "-m", "gateway", "--port", str(self.port), "--zmq", zmq,
                              "--heartbeat-interval", str(self.heartbeat_interval),
                              "--data-dir", str(self.workdir / "data"), *self.gateway_args]))]
        for model, args in self.workers.items():
            programs.append(PROGRAM.format(
                name=f"worker-{model}", cwd=REPO_ROOT, logs=logs, stopwait=40,
                command=" ".join([python, "-m", "worker", "--served-name", model, "--gateway", zmq,
                                  "--heartbeat-interval", str(self.heartbeat_interval), *args])))
        self.config.write_text(SUPERVISORD.format(logs=logs) + "".join(programs))
        self.process = subprocess.Popen(
            [python, "-m", "supervisor.supervisord", "-c", str(self.config)],
            cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    def stop(self) -> None:
        """supervisord stops its programs when it gets SIGTERM; SIGKILL all if that fails."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            for name in ["gateway", *(f"worker-{m}" for m in self.workers)]:
                pid = self.pid(name)
                if pid:
                    os.kill(pid, signal.SIGKILL)
            self.process.kill()
            self.process.wait(10)

    def ctl(self, *args: str) -> str:
        result = subprocess.run([sys.executable, "-m", "supervisor.supervisorctl", "-c", str(self.config), *args],
                                capture_output=True, text=True, timeout=60)
        return result.stdout + result.stderr

    def pid(self, program: str) -> int:
        out = self.ctl("pid", program).strip()
        return int(out) if out.isdigit() else 0

    def workers_of(self, model: str) -> list[dict]:
        try:
            data = httpx.get(f"{self.base_url}/v1/workers", timeout=2).json()["data"]
        except httpx.HTTPError:
            return []
        return [w for w in data if w["model"] == model]

    def wait_until(self, condition, timeout: float, what: str) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if condition():
                return time.monotonic() - started
            time.sleep(0.05)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{self.logs()}")

    def wait_for_models(self, *models: str, timeout: float = 120) -> None:
        self.wait_until(lambda: all(self.workers_of(m) for m in models), timeout, f"models {models}")

    def logs(self) -> str:
        parts = []
        for log in sorted(self.workdir.glob("*.log")):
            parts.append(f"--- {log.name} ---\n" + log.read_text(errors="replace")[-3000:])
        return "\n".join(parts)
