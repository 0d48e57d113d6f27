"""One on-demand worker process: started with its model's command line, stopped on the
gateway's word, and watched until it exits.

The worker's output goes to the gateway's own (the supervisor's log), each line behind the
model's name; the last lines are kept, so a worker that dies while loading fails its waiting
requests with its own words (``ModelLoadError: ...``), not a bare exit code.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import re
import signal
import sys

log = logging.getLogger(__name__)

TAIL_LINES = 20
_LOGGED_ERROR = re.compile(r" (?:ERROR|CRITICAL) [\w.]+(?: \[[^\]]*\])?: (.*)$")


class WorkerProcess:
    def __init__(self, name: str, command: list[str]):
        self.name = name
        self.command = command
        self.exited = asyncio.Event()
        self.returncode: int | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._watcher: asyncio.Task | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and not self.exited.is_set()

    async def start(self) -> None:
        log.info("starting a worker for %s: %s", self.name, " ".join(self.command))
        # Its own process group: a Ctrl-C meant for a foreground gateway reaches the gateway,
        # which then stops its workers in order (draining), not all of them at once.
        self._process = await asyncio.create_subprocess_exec(
            *self.command, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"), start_new_session=True)
        self._watcher = asyncio.create_task(self._watch(self._process), name=f"worker-{self.name}")

    def reason(self) -> str:
        """Why it exited: its exit status, and its last error line if it printed one."""
        code = self.returncode
        status = (f"was killed by {signal.Signals(-code).name}" if code is not None and code < 0
                  else f"exited with status {code}")
        said = next((line for line in reversed(self._tail) if "ERROR" in line or "Error" in line), None)
        if said and (logged := _LOGGED_ERROR.search(said)):
            said = logged.group(1)  # the message, without the log line's time, pid and logger
        return f"its worker {status}" + (f": {said}" if said else "")

    async def stop(self, timeout: float) -> None:
        """SIGTERM (the worker drains), then SIGKILL past ``timeout``; returns once it exited."""
        process = self._process
        if process is None or self.exited.is_set():
            return
        try:
            process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(self.exited.wait(), timeout)
            return
        except ProcessLookupError:  # gone already: its watcher sets exited
            pass
        except asyncio.TimeoutError:
            log.warning("the worker for %s (pid %d) did not stop in %.0fs: killing it", self.name, process.pid, timeout)
            try:
                process.kill()
            except ProcessLookupError:
                pass
        await self.exited.wait()

    async def _watch(self, process: asyncio.subprocess.Process) -> None:
        """Forward its output, a line at a time, and note its exit. Read in chunks: a download's
        progress bar redraws one "line" with carriage returns for minutes (readline would give up
        past 64 KB and leave the pipe full)."""
        assert process.stdout is not None
        prefix = f"[{self.name}] ".encode()
        pending = b""
        try:
            while chunk := await process.stdout.read(1 << 16):
                pending += chunk
                *lines, pending = pending.replace(b"\r", b"\n").split(b"\n")
                if len(pending) > 1 << 16:
                    lines, pending = [*lines, pending], b""
                for line in filter(None, lines):
                    sys.stderr.buffer.write(prefix + line + b"\n")
                    self._tail.append(line.decode(errors="replace").rstrip())
                sys.stderr.buffer.flush()
        except Exception:  # its output is lost, not its exit
            log.exception("reading the output of the worker for %s failed", self.name)
        finally:
            self.returncode = await process.wait()
            log.info("the worker for %s (pid %d) exited with %s", self.name, process.pid, self.returncode)
            self.exited.set()
