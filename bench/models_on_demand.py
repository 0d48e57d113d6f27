"""Models on demand: three models, a memory budget that holds two, agent-like requests cycling.

    .venv/bin/python bench/models_on_demand.py [--rounds 3] [--out bench-results]

Three "models" are three names for the same SmolLM2-135M weights (float32, as bench/run.py gives
every system on Linux), each in its own directory of symlinks, so the gateway and mlx_lm.server
both take them for three models. Requests are sequential streamed chat completions, an agent's
shape: a system prompt and a short ask (~430 tokens in all), max_tokens 16, temperature 0. Each request's
system prompt starts with its own session number: no prefix cache (ours or mlx_lm.server's) hits,
so the figures compare loads, not caches. TTFT is the time to the first content chunk.

In one run, one after another:
1. all_loaded: a gateway whose budget holds all three (the default budget), the three loaded up
   front (POST /v1/models/NAME/load); then "cycling" (a, b, c, a, b, c, ...: no loads) and
   "two" (a, b, a, b, ...). One model's memory_bytes just loaded (before any request, after a
   heartbeat) sets the next budget.
2. on_demand: a gateway with --memory-budget 2.5x one model's memory_bytes (two fit, three do
   not), nothing loaded. "cycling": the working set (3) exceeds the budget (2), so every request
   loads its model, unloading the least recently used; then "two": one round of warm-up (the
   two models load), then rounds that should load nothing.
3. mlx_lm.server, started on model a; each request names its model's directory in "model", and
   mlx_lm.server swaps (one model held) whenever the name changes (not on its first request, to
   a): the same sequence, then three requests to one model for its TTFT without a swap. Its loads
   (ModelProvider._load: drop the model held, load the next) are timed inside its process.

Per request: did it load a model (the model's `loads` in /v1/workers before and after), its TTFT,
and the load's `last_load_seconds` (from the request's arrival at the model manager, making room
included, to the worker's registration). The gateway's log splits each load into its steps.

memory_bytes is what the worker's MLX holds (active + buffer cache): the weights, and the prompt
cache, which keeps every finished prompt's KV (here ~20 MiB per request, float32) up to the worker's
--prompt-cache-mb (1024 by default). A model's memory_bytes so grows with each request since its
load, and past ~5 requests each (--rounds 5 and more) two models outgrow 2.5x a model just loaded:
the manager then unloads one ("over the memory budget") and "two" reloads it.

Targets (the issue): 0 failures; a request that needs a load pays no more than the load itself
plus 10% (TTFT / last_load_seconds, read literally; and TTFT / (load + the median TTFT without a
load), the load plus an ordinary request); with the working set within the budget, no loads
after warm-up.

Writes models_on_demand.json and models_on_demand.md to --out, and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "bench")]

from worker.blas import enable_fast_blas  # noqa: E402

BLAS = enable_fast_blas()  # before anything imports mlx (float32_copy converts in this process)

import httpx  # noqa: E402
from processes import Stack, free_port  # noqa: E402
from systems import MODEL, float32_copy, process_usage, wait_for_http  # noqa: E402

from gateway.models.catalog import parse_size  # noqa: E402

NAMES = ("smollm2-a", "smollm2-b", "smollm2-c")
MAX_TOKENS = 16
BUDGET_FACTOR = 2.5  # two models' memory fit, three do not
SYSTEM_PROMPT = (
    "You are a coding agent working in a Python repository. You can read files, run shell commands and "
    "edit code. Follow the repository's conventions, keep each change small and focused, run the tests "
    "before you answer, and explain what you changed and why. Never invent APIs: read the code first. "
    "When a command fails, read its output before trying again. Prefer the standard library. Keep the "
    "public interfaces stable unless the task says otherwise, and update the documentation with the code. "
) * 4
ASKS = (
    "The test test_parse_config fails with KeyError: 'port'. What should I check first?",
    "Add a --verbose flag to the CLI in cli.py; which function should parse it?",
    "The CI job times out on test_download. How would you make it faster?",
    "Rename the helper load_settings to read_settings everywhere. Where do I start?",
    "Why does mypy say 'Item None of Optional[str] has no attribute strip'?",
    "Write a one-line summary of what the function merge_ranges in ranges.py does.",
)


# --- one request ----------------------------------------------------------------------------


@dataclass
class Request:
    system: str
    phase: str
    round: int
    model: str
    ok: bool = False
    error: str | None = None
    ttft_s: float | None = None
    total_s: float | None = None
    loaded: bool = False  # this request loaded its model (a swap, for mlx_lm.server)
    first_on_worker: bool = False  # the first request its worker process served (a fresh process)
    load_s: float | None = None  # the gateway's last_load_seconds; for mlx_lm.server an estimate
    unloaded: list[str] = field(default_factory=list)  # models unloaded while it ran
    resident: list[str] = field(default_factory=list)  # models loaded after it
    memory_used_bytes: int | None = None  # /v1/workers memory.used_bytes after it
    model_memory_bytes: int | None = None  # its model's memory_bytes after it (as of the last heartbeat)
    text: str = ""


_sessions = iter(range(1, 1 << 62))


def agent_messages() -> list[dict]:
    session = next(_sessions)
    return [{"role": "system", "content": f"Session {session}. {SYSTEM_PROMPT}"},
            {"role": "user", "content": ASKS[session % len(ASKS)]}]


def stream_chat(http: httpx.Client, base_url: str, model: str, record: Request) -> Request:
    """One streamed chat completion; fills ``record`` (ok, error, TTFT, total, text)."""
    body = {"model": model, "messages": agent_messages(), "max_tokens": MAX_TOKENS, "temperature": 0,
            "stream": True}
    start = time.perf_counter()
    try:
        with http.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=600) as r:
            if r.status_code != 200:
                record.error = f"HTTP {r.status_code}: {r.read().decode(errors='replace')[:300]}"
                return record
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    record.error = json.dumps(event["error"])[:300]
                    return record
                delta = ((event.get("choices") or [{}])[0].get("delta") or {}).get("content")
                if delta:
                    if record.ttft_s is None:
                        record.ttft_s = time.perf_counter() - start
                    record.text += delta
    except httpx.HTTPError as exc:
        record.error = f"{type(exc).__name__}: {exc}"
        return record
    record.total_s = time.perf_counter() - start
    record.ok = record.ttft_s is not None
    if not record.ok:
        record.error = "no content"
    return record


def sequence(models: tuple[str, ...], rounds: int) -> Iterator[tuple[int, str]]:
    for round_ in range(rounds):
        for model in models:
            yield round_, model


# --- the gateway, on demand ---------------------------------------------------------------------


class OnDemandGateway:
    """A gateway serving ``catalog`` on demand within ``budget`` (None: the gateway's default)."""

    def __init__(self, name: str, workdir: Path, catalog: Path, budget: int | None):
        self.name = name
        workdir.mkdir(parents=True, exist_ok=True)
        # The gateway's own defaults (heartbeats every second, 30 s queue), not the tests' short ones.
        self.stack = Stack(workdir, heartbeat_interval=1.0, queue_timeout=30.0)
        self.catalog = catalog
        self.worker_pids: set[int] = set()
        self.served_pids: set[int] = set()  # workers that have served a request
        self.gateway = self.stack.start_gateway(
            "--store", "memory", "--models", str(catalog), *(("--memory-budget", str(budget)) if budget else ()))
        self.http = httpx.Client(timeout=600)
        deadline = time.monotonic() + 120
        while True:
            try:
                self.workers()
                break
            except (httpx.HTTPError, KeyError):
                if self.gateway.popen.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the gateway did not start:\n{self.gateway.log()}") from None
                time.sleep(0.3)

    @property
    def base_url(self) -> str:
        return self.stack.base_url

    def workers(self) -> dict[str, Any]:
        reply = self.http.get(f"{self.base_url}/v1/workers", timeout=10).json()
        for view in reply["models"].values():
            self.worker_pids.update(view["pids"])
        return reply

    def states(self) -> dict[str, dict[str, Any]]:
        return self.workers()["models"]

    def load(self, model: str) -> float:
        start = time.perf_counter()
        self.http.post(f"{self.base_url}/v1/models/{model}/load", timeout=600).raise_for_status()
        return time.perf_counter() - start

    def request(self, phase: str, round_: int, model: str) -> Request:
        before = self.states()
        record = stream_chat(self.http, self.base_url, model, Request(self.name, phase, round_, model))
        reply = self.workers()
        after = reply["models"]
        record.loaded = after[model]["loads"] > before[model]["loads"]
        if record.loaded:
            record.load_s = after[model]["last_load_seconds"]
        record.unloaded = [m for m in after if before[m]["state"] == "loaded" and after[m]["state"] != "loaded"]
        record.resident = [m for m in after if after[m]["state"] == "loaded"]
        pids = set(after[model]["pids"])
        record.first_on_worker = bool(pids) and not pids & self.served_pids
        self.served_pids |= pids
        record.memory_used_bytes = reply["memory"]["used_bytes"]
        record.model_memory_bytes = after[model]["memory_bytes"]
        return record

    def wait_for_memory(self, models: list[str], timeout: float = 15.0) -> dict[str, int]:
        """Each model's memory_bytes, once a heartbeat after its last request has reported it."""
        time.sleep(2.5)  # two heartbeats: the figures include the requests just served
        deadline = time.monotonic() + timeout
        while True:
            states = self.states()
            memory = {m: int(states[m]["memory_bytes"]) for m in models}
            if all(memory.values()) or time.monotonic() > deadline:
                return memory
            time.sleep(0.5)

    def stop(self) -> None:
        self.http.close()
        self.stack.stop()  # SIGTERM: the gateway stops (drains) the workers it started
        deadline = time.monotonic() + 30
        for pid in sorted(self.worker_pids):
            while _is_our_worker(pid, self.catalog) and time.monotonic() < deadline:
                time.sleep(0.2)
            if _is_our_worker(pid, self.catalog):  # left behind: stop it by its PID
                os.kill(pid, signal.SIGKILL)


def _is_our_worker(pid: int, catalog: Path) -> bool:
    """A live worker process for one of this run's models (its command line names their directory)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z" and "worker" in cmdline and str(catalog.parent) in cmdline


_STAMP = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})")
_LOADED = re.compile(r"gateway\.models\.manager: loaded (\S+) in [\d.]+s \(pid (\d+)\)")
_SPAWN = "gateway.models.launcher: starting a worker for {name}:"
_ROOM = re.compile(r"gateway\.models\.manager: unloading (\S+) \(making room for (\S+)\)")
# The new worker's own lines (worker[PID]), in the order its load goes through them.
_WORKER_STEPS = (
    ("python_start", " worker: BLAS:"),  # the interpreter is up (the worker's first line)
    ("imports", " worker.models: loading "),  # MLX, mlx-lm and the worker imported
    ("weights_and_tokenizer", " worker.models: CPU device: weights dequantized"),
    ("engine_and_grammar", " worker: serving "),  # engine built, grammar engine ready
)


def load_breakdown(log: str) -> list[dict[str, float]]:
    """Each load's steps in seconds, from the gateway log's timestamps (ms; the workers' lines,
    behind "[name] ", carry their own): ``make_room``, the unload of the least recently used model
    (from the gateway's decision to the process's exit; 0 when none was needed), then the new worker
    process: ``python_start`` (to its first line), ``imports``, ``weights_and_tokenizer``,
    ``engine_and_grammar``, and ``registration`` (until the gateway counts it loaded). ``total``:
    from the unload's start (else the spawn) to loaded, which is last_load_seconds less the
    moments before the first log line."""
    events: list[tuple[float, str]] = []
    for line in log.splitlines():
        stamp = _STAMP.search(line)
        if stamp is not None:
            events.append((datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp(), line))
    loads = []
    for index, (loaded_at, line) in enumerate(events):
        match = _LOADED.search(line)
        if match is None:
            continue
        name, pid = match.groups()
        spawn = next((i for i in range(index, -1, -1) if _SPAWN.format(name=name) in events[i][1]), None)
        if spawn is None:
            continue
        marks = {"spawn": events[spawn][0]}
        # make_room: an unload for this model after the previous load began, and its process's exit
        for i in range(spawn - 1, -1, -1):
            text = events[i][1]
            if "gateway.models.launcher: starting a worker for" in text or _LOADED.search(text):
                break
            room = _ROOM.search(text)
            if room is not None and room.group(2) == name:
                marks["make_room"] = events[i][0]
        for step, needle in _WORKER_STEPS:
            at = next((t for t, text in events if f"worker[{pid}]" in text and needle in text), None)
            if at is not None:
                marks[step] = at
        steps = {"make_room": round(marks["spawn"] - marks.get("make_room", marks["spawn"]), 3)}
        previous = marks["spawn"]
        for step, _ in _WORKER_STEPS:
            if step in marks:
                steps[step] = round(marks[step] - previous, 3)
                previous = marks[step]
        steps["registration"] = round(loaded_at - previous, 3)
        steps["total"] = round(loaded_at - marks.get("make_room", marks["spawn"]), 3)
        loads.append(steps)
    return loads


# --- the scenario, per system ------------------------------------------------------------------


def write_catalog(path: Path, dirs: dict[str, Path]) -> Path:
    path.write_text("".join(f'[[model]]\nname = "{name}"\nmodel = "{directory}"\n\n' for name, directory in dirs.items()))
    return path


def run_gateway(name: str, workdir: Path, catalog: Path, budget: int | None, rounds: int,
                preload: bool) -> tuple[dict[str, Any], list[Request]]:
    a, b, c = NAMES
    records: list[Request] = []
    result: dict[str, Any] = {}
    gateway = OnDemandGateway(name, workdir, catalog, budget)
    try:
        if preload:
            result["preload_s"] = {m: round(gateway.load(m), 3) for m in NAMES}
            result["fresh_memory_bytes"] = gateway.wait_for_memory(list(NAMES))  # loaded, no request yet
        for round_, model in sequence((a, b, c), rounds):
            records.append(_show(gateway.request("cycling", round_, model)))
        for round_, model in sequence((a, b), rounds + 1):  # round 0: warm-up
            records.append(_show(gateway.request("two", round_, model)))
        reply = gateway.workers()
        states = reply["models"]
        result["memory"] = reply["memory"]
        result["loads"] = {m: states[m]["loads"] for m in NAMES}
        result["memory_bytes"] = gateway.wait_for_memory([m for m in NAMES if states[m]["state"] == "loaded"])
    finally:
        gateway.stop()
        result["load_steps"] = load_breakdown(gateway.gateway.log())
    return result, records


class TimedMlxLmServer:
    """mlx_lm.server as bench/systems.py starts it (OpenBLAS, --temp 0), with its model loads
    timed: ``ModelProvider._load`` (dropping the model it held, then loading the next) wrapped to
    log how long each took. Nothing else changes."""

    CODE = (
        "import sys, time\n"
        "from worker.blas import enable_fast_blas\n"
        "enable_fast_blas()\n"
        "import mlx_lm.server as server\n"
        "load = server.ModelProvider._load\n"
        "def timed(self, *args, **kwargs):\n"
        "    start = time.perf_counter()\n"
        "    load(self, *args, **kwargs)\n"
        "    print(f'BENCH-LOAD {time.perf_counter() - start:.3f} {args[0]}', file=sys.stderr, flush=True)\n"
        "server.ModelProvider._load = timed\n"
        "sys.argv[0] = 'mlx_lm.server'\n"
        "server.main()\n"
    )

    def __init__(self, model_dir: str, log: Path):
        self.port = free_port()
        self.log_path = log
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-c", self.CODE, "--model", model_dir, "--port", str(self.port), "--host", "127.0.0.1",
                 "--temp", "0"], cwd=REPO, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            wait_for_http(f"http://127.0.0.1:{self.port}/v1/models", lambda r: r.status_code == 200, self.process,
                          timeout=300, failure=f"mlx_lm.server did not start; see {log}")
        except BaseException:
            self.stop()
            raise
        self._seen = 0

    def startup_loads(self, timeout: float = 300.0) -> int:
        """Wait for the load of the model it started with (its generation thread loads it while
        the HTTP server already answers); how many loads that was."""
        deadline = time.monotonic() + timeout
        while not (loads := self.new_loads()):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlx_lm.server did not load its model; see {self.log_path}")
            time.sleep(0.2)
        return len(loads)

    def new_loads(self) -> list[float]:
        """The seconds of each load since the last call."""
        loads = [float(line.split()[1]) for line in self.log_path.read_text(errors="replace").splitlines()
                 if line.startswith("BENCH-LOAD ")]
        new, self._seen = loads[self._seen:], len(loads)
        return new

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def run_mlx_lm(workdir: Path, dirs: dict[str, Path], rounds: int) -> tuple[dict[str, Any], list[Request]]:
    """Each request names its model's directory: mlx_lm.server swaps when the name changes."""
    a, b, c = NAMES
    records: list[Request] = []
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    server = TimedMlxLmServer(str(dirs[a]), workdir / "mlx_lm.log")
    result: dict[str, Any] = {"startup_s": round(time.perf_counter() - started, 3)}
    base = f"http://127.0.0.1:{server.port}"
    held, loads = a, dict.fromkeys(NAMES, 0)
    try:
        loads[a] = server.startup_loads()
        with httpx.Client(timeout=600) as http:
            plan = ([("cycling", r, m) for r, m in sequence((a, b, c), rounds)]
                    + [("two", r, m) for r, m in sequence((a, b), rounds + 1)]
                    + [("same", r, b) for r in range(3)])
            for phase, round_, model in plan:
                record = stream_chat(http, base, str(dirs[model]), Request("mlx_lm.server", phase, round_, model))
                record.first_on_worker = not records  # its first request (the model it started with)
                timed = server.new_loads()
                record.loaded = bool(timed)
                if timed:
                    record.load_s = round(sum(timed), 3)
                    record.unloaded = [held] if held != model else []
                    loads[model] += len(timed)
                held = model
                record.resident = [model]
                records.append(_show(record))
        result["rss_bytes"] = process_usage(server.process.pid)[1]
    finally:
        server.stop()
    result["loads"] = loads
    return result, records


def _show(record: Request) -> Request:
    what = "load" if record.loaded else "new " if record.first_on_worker else "    "
    ttft = f"{record.ttft_s:6.2f}s" if record.ttft_s is not None else "   -   "
    load = f"load {record.load_s:6.2f}s" if record.load_s is not None else ""
    gone = f"unloaded {','.join(record.unloaded)}" if record.unloaded else ""
    status = "ok" if record.ok else f"FAILED: {record.error}"
    print(f"{record.system:14} {record.phase:8} r{record.round} {record.model:10} {what} TTFT {ttft} {load:14} "
          f"{gone:22} {status}", flush=True)
    return record


# --- figures ------------------------------------------------------------------------------------


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def _max(values: list[float]) -> float | None:
    return round(max(values), 3) if values else None


def figures(records: list[Request], system: str, loads: dict[str, int]) -> dict[str, Any]:
    mine = [r for r in records if r.system == system]
    ok = [r for r in mine if r.ok and r.ttft_s is not None]
    with_load = [r for r in ok if r.loaded and r.load_s is not None]
    # steady state: no load, and a worker that has served before (its first request is slower)
    without = [r.ttft_s for r in ok if not r.loaded and not r.first_on_worker and r.ttft_s is not None]
    first = [r.ttft_s for r in ok if not r.loaded and r.first_on_worker and r.ttft_s is not None]
    warm = statistics.median(without) if without else 0.0
    cycling = [r for r in mine if r.phase == "cycling"]
    two_after_warmup = [r for r in mine if r.phase == "two" and r.round > 0]
    return {
        "requests": len(mine),
        "failures": len(mine) - len(ok),
        "loads": loads,
        "cycling_requests_that_loaded": f"{sum(r.loaded for r in cycling)}/{len(cycling)}",
        "two_loads_after_warmup": sum(r.loaded for r in two_after_warmup),
        "two_requests_after_warmup": len(two_after_warmup),
        "ttft_with_load_s": _median([r.ttft_s for r in with_load if r.ttft_s is not None]),
        "ttft_with_load_max_s": _max([r.ttft_s for r in with_load if r.ttft_s is not None]),
        "ttft_without_load_s": _median(without),
        "ttft_without_load_max_s": _max(without),
        "ttft_first_on_preloaded_worker_s": _median(first),
        "ttft_first_on_preloaded_worker_max_s": _max(first),
        "load_s": _median([r.load_s for r in with_load if r.load_s is not None]),
        # what a loading request paid beyond its own load: dispatch + prefill on the fresh worker
        "beyond_load_s": _median([r.ttft_s - r.load_s for r in with_load if r.ttft_s is not None and r.load_s]),
        "ttft_over_load": _median([r.ttft_s / r.load_s for r in with_load if r.ttft_s is not None and r.load_s]),
        "ttft_over_load_max": _max([r.ttft_s / r.load_s for r in with_load if r.ttft_s is not None and r.load_s]),
        "ttft_over_load_plus_warm": _median([r.ttft_s / (r.load_s + warm) for r in with_load
                                             if r.ttft_s is not None and r.load_s]),
        "ttft_over_load_plus_warm_max": _max([r.ttft_s / (r.load_s + warm) for r in with_load
                                              if r.ttft_s is not None and r.load_s]),
        "with_load_requests": len(with_load),
        "without_load_requests": len(without),
    }


def _cell(value: Any, unit: str = "") -> str:
    return "–" if value is None else f"{value}{unit}"


def _memory_lines(results: dict[str, Any]) -> list[str]:
    """memory_bytes per model just loaded and after its requests: what the budget plans with."""
    def mib(values: dict[str, int]) -> str:
        return ", ".join(f"{v / 2**20:.0f}" for v in values.values())

    lines = []
    for system, label in (("all_loaded", "all_loaded"), ("on_demand", "on_demand, models loaded at the end")):
        f = results["systems"].get(system, {})
        if "fresh_memory_bytes" in f:
            lines.append(f"- {system}, just loaded: {mib(f['fresh_memory_bytes'])} MiB")
        if f.get("memory_bytes"):
            counts = ", ".join(str(_since_load(results["requests"], system, m)) for m in f["memory_bytes"])
            lines.append(f"- {label}, after {counts} requests since its load: {mib(f['memory_bytes'])} MiB")
    return (["memory_bytes per model (MiB):", ""] + lines + [""]) if lines else []


def _since_load(requests: list[dict], system: str, model: str) -> int:
    served = [r for r in requests if r["system"] == system and r["model"] == model]
    last = max((i for i, r in enumerate(served) if r["loaded"]), default=0)
    return len(served) - last


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def report(results: dict[str, Any]) -> str:
    s = results["systems"]
    order = [k for k in ("on_demand", "all_loaded", "mlx_lm.server") if k in s]
    lines = [f"# Models on demand ({results['machine']}, {results['weights']} SmolLM2-135M weights, "
             f"{results['rounds']} rounds)", "",
             f"Budget {results['budget_bytes'] / 2**20:.0f} MiB"
             + (f" = {BUDGET_FACTOR}× one model's memory_bytes just loaded ({results['model_memory_bytes'] / 2**20:.0f} "
                "MiB)" if results["model_memory_bytes"] else " (--budget)")
             + f"; requests sequential, ~{results['prompt_tokens']} prompt tokens, {MAX_TOKENS} output tokens.", "",
             "| | " + " | ".join(order) + " |", "|---|" + "---|" * len(order)]
    rows = [
        ("requests / failures", lambda f: f"{f['requests']} / {f['failures']}"),
        ("cycling a,b,c: requests that loaded", lambda f: f["cycling_requests_that_loaded"]),
        ("a,b after warm-up: loads", lambda f: f"{f['two_loads_after_warmup']} of {f['two_requests_after_warmup']}"),
        ("loads per model (a, b, c)", lambda f: ", ".join(str(v) for v in f["loads"].values())),
        ("TTFT with a load, median (max)", lambda f: f"{_cell(f['ttft_with_load_s'], ' s')} "
                                                     f"({_cell(f['ttft_with_load_max_s'], ' s')})"),
        ("load time alone, median", lambda f: _cell(f["load_s"], " s")),
        ("TTFT without a load (a worker that has served before), median (max)",
         lambda f: f"{_cell(f['ttft_without_load_s'], ' s')} ({_cell(f['ttft_without_load_max_s'], ' s')})"),
        ("TTFT, first request on a preloaded worker, median (max)",
         lambda f: f"{_cell(f['ttft_first_on_preloaded_worker_s'], ' s')} "
                   f"({_cell(f['ttft_first_on_preloaded_worker_max_s'], ' s')})"),
        ("TTFT with load − load, median", lambda f: _cell(f["beyond_load_s"], " s")),
        ("TTFT / load, median (max)", lambda f: f"{_cell(f['ttft_over_load'])} ({_cell(f['ttft_over_load_max'])})"),
        ("TTFT / (load + TTFT without), median (max)",
         lambda f: f"{_cell(f['ttft_over_load_plus_warm'])} ({_cell(f['ttft_over_load_plus_warm_max'])})"),
    ]
    for label, cell in rows:
        lines.append(f"| {label} | " + " | ".join(cell(s[k]) for k in order) + " |")
    lines.append("")
    if "mlx_lm.server" in s:
        lines += ["mlx_lm.server's load time: its ModelProvider._load (drop the model held, load the next), timed "
                  "inside its process.", ""]
    lines += _memory_lines(results)
    steps = results.get("load_steps") or []
    if steps:
        keys = [k for k in steps[0] if k != "total"] + ["total"]
        unloads = [x["make_room"] for x in steps if x.get("make_room")]
        cells = [f"{_median(unloads)} ({len(unloads)} loads)" if k == "make_room" else
                 str(_median([x.get(k, 0.0) for x in steps])) for k in keys]
        lines += [f"Where an on-demand load's time goes (medians of {len(steps)} loads, from the gateway log, s; "
                  "make_room over the loads that unloaded a model first):", "",
                  "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys), "| " + " | ".join(cells) + " |", ""]
    t = results["targets"]
    if t["ttft_over_load"] is None:
        return "\n".join(lines + ["Targets: the on_demand system was not run.", ""])
    lines += ["Targets:", "",
              f"- 0 failures: {_met(t['no_failures'])}",
              f"- a request that needs a load pays ≤ load + 10%, read literally: TTFT / load median "
              f"{t['ttft_over_load']}: {_met(t['literal_met'])} (every request, max {t['ttft_over_load_max']}: "
              f"{_met(t['literal_met_every_request'])})",
              f"- the same, against the load plus an ordinary request: TTFT / (load + median TTFT without a load) "
              f"median {t['ttft_over_load_plus_warm']}: {_met(t['with_warm_met'])} (every request, max "
              f"{t['ttft_over_load_plus_warm_max']}: {_met(t['with_warm_met_every_request'])})",
              f"- working set within the budget: {t['two_loads_after_warmup']} loads after warm-up: "
              f"{_met(t['two_loads_after_warmup'] == 0)}", ""]
    return "\n".join(lines)


# --- main -------------------------------------------------------------------------------------


def prepare_models(out: Path, weights: str) -> dict[str, Path]:
    """Three model directories of symlinks to one set of weights (float32, or the worker's
    converted Q4 directory as is)."""
    from worker.models import resolve

    converted, _ = resolve(MODEL)
    source = Path(float32_copy(converted, out / "smollm2-f32") if weights == "float32" else converted)
    dirs = {}
    for name in NAMES:
        directory = out / "models-on-demand" / name
        if directory.exists():
            shutil.rmtree(directory)
        directory.mkdir(parents=True)
        for item in source.iterdir():
            if item.is_file():
                (directory / item.name).symlink_to(item.resolve())
        dirs[name] = directory
    return dirs


def prompt_tokens(directory: Path) -> int:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    text = tokenizer.apply_chat_template([{"role": "system", "content": f"Session 1. {SYSTEM_PROMPT}"},
                                          {"role": "user", "content": ASKS[0]}], add_generation_prompt=True, tokenize=False)
    return len(tokenizer.encode(text, add_special_tokens=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of a,b,c and of a,b (after one warm-up round)")
    parser.add_argument("--out", type=Path, default=REPO / "bench-results")
    parser.add_argument("--weights", choices=["float32", "converted"], default="float32",
                        help="float32 (as bench/run.py: mlx_lm.server runs what our worker runs on a CPU) or the "
                             "worker's converted Q4 directory as is")
    parser.add_argument("--only", default="all_loaded,on_demand,mlx_lm.server")
    parser.add_argument("--budget", default=None,
                        help="gateway --memory-budget for on_demand, e.g. 1.5G (default: 2.5x one model's "
                             "memory_bytes just loaded, as all_loaded measures it)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    only = set(args.only.split(","))
    dirs = prepare_models(args.out, args.weights)
    work = args.out / "models-on-demand"
    catalog = write_catalog(work / "models.toml", dirs)
    started = time.perf_counter()
    results: dict[str, Any] = {"machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores",
                               "blas": BLAS, "weights": args.weights, "rounds": args.rounds,
                               "prompt_tokens": prompt_tokens(dirs[NAMES[0]]), "systems": {}}
    records: list[Request] = []
    raw: dict[str, Any] = {}
    memory = 0
    if "all_loaded" in only:
        raw["all_loaded"], mine = run_gateway("all_loaded", work / "all-loaded", catalog, None, args.rounds, preload=True)
        records += mine
        memory = max(raw["all_loaded"]["fresh_memory_bytes"].values())
    if args.budget:
        budget, memory = parse_size(args.budget, "--budget"), 0
    else:
        if not memory:  # measure one model: load it, read its memory_bytes after a heartbeat
            probe = OnDemandGateway("probe", work / "probe", catalog, None)
            try:
                probe.load(NAMES[0])
                memory = probe.wait_for_memory([NAMES[0]])[NAMES[0]]
            finally:
                probe.stop()
        budget = int(memory * BUDGET_FACTOR)
    results["model_memory_bytes"], results["budget_bytes"] = memory, budget
    print(f"one model's memory_bytes: {memory / 2**20:.0f} MiB; budget: {budget / 2**20:.0f} MiB", flush=True)
    if "on_demand" in only:
        raw["on_demand"], mine = run_gateway("on_demand", work / "on-demand", catalog, budget, args.rounds, preload=False)
        records += mine
        results["load_steps"] = raw["on_demand"]["load_steps"]
    if "mlx_lm.server" in only:
        raw["mlx_lm.server"], mine = run_mlx_lm(work / "mlx-lm", dirs, args.rounds)
        records += mine
    for system, details in raw.items():
        results["systems"][system] = {**figures(records, system, details["loads"]),
                                      **{k: v for k, v in details.items() if k not in ("loads", "load_steps")}}
    on_demand = results["systems"].get("on_demand", {})
    results["targets"] = {
        "no_failures": all(f["failures"] == 0 for f in results["systems"].values()),
        "ttft_over_load": on_demand.get("ttft_over_load"),
        "ttft_over_load_max": on_demand.get("ttft_over_load_max"),
        "literal_met": (on_demand.get("ttft_over_load") or 99) <= 1.1,
        "literal_met_every_request": (on_demand.get("ttft_over_load_max") or 99) <= 1.1,
        "ttft_over_load_plus_warm": on_demand.get("ttft_over_load_plus_warm"),
        "ttft_over_load_plus_warm_max": on_demand.get("ttft_over_load_plus_warm_max"),
        "with_warm_met": (on_demand.get("ttft_over_load_plus_warm") or 99) <= 1.1,
        "with_warm_met_every_request": (on_demand.get("ttft_over_load_plus_warm_max") or 99) <= 1.1,
        "two_loads_after_warmup": on_demand.get("two_loads_after_warmup"),
    }
    results["wall_s"] = round(time.perf_counter() - started, 1)
    results["requests"] = [asdict(r) for r in records]
    (args.out / "models_on_demand.json").write_text(json.dumps(results, indent=2))
    text = report(results)
    (args.out / "models_on_demand.md").write_text(text + "\n")
    print(text)
    print(f"({results['wall_s']} s; {args.out / 'models_on_demand.json'})")


if __name__ == "__main__":
    main()
