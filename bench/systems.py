"""What the benchmark compares and how it loads them: the in-process engine, gateway + worker,
mlx_lm.server and a gateway with the synthetic worker; streaming clients; per-request timings.

Import after ``worker.blas.enable_fast_blas()`` (bench/run.py does), and with tests/ on sys.path.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from processes import Stack, free_port

REPO = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m"
PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper and a storm."}]
MAX_TOKENS = 64


@dataclass
class Sample:
    """One request: when it started, and when each output token arrived."""

    start: float
    token_times: list[float] = field(default_factory=list)


def summarize(samples: list[Sample], wall: float) -> dict:
    ttft = [s.token_times[0] - s.start for s in samples if s.token_times]
    itl = [b - a for s in samples for a, b in zip(s.token_times, s.token_times[1:], strict=False)]
    tokens = sum(len(s.token_times) for s in samples)

    def pct(values: list[float], q: float) -> float:
        return statistics.quantiles(values, n=100)[q - 1] * 1000 if len(values) > 1 else (values[0] * 1000 if values else 0)

    return {"tokens": tokens, "wall_s": round(wall, 3), "tokens_per_s": round(tokens / wall, 2),
            "ttft_p50_ms": round(pct(ttft, 50), 1), "ttft_p95_ms": round(pct(ttft, 95), 1),
            "itl_p50_ms": round(pct(itl, 50), 2), "itl_p95_ms": round(pct(itl, 95), 2)}


def process_usage(pid: int) -> tuple[float, int]:
    """(CPU seconds so far, RSS in bytes) of a process: /proc on Linux, else ps (1 s resolution)."""
    stat, status = Path(f"/proc/{pid}/stat"), Path(f"/proc/{pid}/status")
    if stat.exists():
        fields = stat.read_text().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        rss = next((int(line.split()[1]) * 1024 for line in status.read_text().splitlines()
                    if line.startswith("VmRSS:")), 0)
        return (int(fields[11]) + int(fields[12])) / ticks, rss
    out = subprocess.run(["ps", "-o", "rss=,time=", "-p", str(pid)], capture_output=True, text=True).stdout.split()
    if len(out) < 2:
        return 0.0, 0
    parts = [float(p) for p in out[1].replace("-", ":").split(":")]
    seconds = sum(p * 60 ** i for i, p in enumerate(reversed(parts)))
    return seconds, int(out[0]) * 1024


# --- clients ---------------------------------------------------------------------------


_request_numbers = iter(range(1 << 62))


def prompt() -> list[dict]:
    """A distinct prompt per request, so no system's prefix cache turns this into a cache test."""
    return [{"role": "user", "content": f"Request {next(_request_numbers)}. {PROMPT[0]['content']}"}]


def stream_chat(client: httpx.Client, base_url: str, model: str, schema: dict | None = None,
                system: str | None = None) -> Sample:
    """One streamed chat request; with ``schema``, its reply constrained to it (``response_format``);
    ``system``: a system message first."""
    sample = Sample(time.perf_counter())
    messages = ([{"role": "system", "content": system}] if system else []) + prompt()
    body = {"model": model, "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}
    if schema is not None:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "story", "schema": schema}}
    with client.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                choices = json.loads(line[6:]).get("choices") or [{}]
                if (choices[0].get("delta") or {}).get("content"):
                    sample.token_times.append(time.perf_counter())
    return sample


def run_clients(concurrency: int, requests_each: int,
                one_request: Callable[[httpx.Client], Sample]) -> tuple[list[Sample], float]:
    """``concurrency`` clients, each sending ``requests_each`` requests one after another.

    Each client keeps one httpx.Client (keep-alive, like the SDKs), made before the clock
    starts: a new Client per request costs ~10 ms of SSL-context setup, and 16 of those under
    one GIL would spread a burst's arrivals over ~100 ms and measure the load generator.
    """
    samples: list[Sample] = []
    lock = threading.Lock()
    ready = threading.Barrier(concurrency + 1)

    def client() -> None:
        with httpx.Client(timeout=600) as http:
            ready.wait()
            for _ in range(requests_each):
                sample = one_request(http)
                with lock:
                    samples.append(sample)

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    ready.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    return samples, time.perf_counter() - start


# --- the three systems ---------------------------------------------------------------------


class InProcessEngine:
    """mlx-lm's BatchGenerator driven directly: what the hardware gives, with no server at all."""

    name = "engine"

    def __init__(self, model_dir: str):
        from worker.models import load

        self.loaded = load(model_dir)
        self.tokenizer = self.loaded.tokenizer
        self.eos = [[t] for t in self.tokenizer.eos_token_ids]

    def run(self, concurrency: int, requests_each: int) -> tuple[list[Sample], float]:
        from mlx_lm.generate import BatchGenerator

        generator = BatchGenerator(self.loaded.model, stop_tokens=self.eos, completion_batch_size=max(concurrency, 1),
                                   prefill_batch_size=min(concurrency, 8))
        samples: dict[int, Sample] = {}
        remaining = {c: requests_each for c in range(concurrency)}
        owner: dict[int, int] = {}
        start = time.perf_counter()

        def submit(client: int) -> None:
            tokens = self.tokenizer.apply_chat_template(prompt(), add_generation_prompt=True)
            (uid,) = generator.insert([tokens], max_tokens=[MAX_TOKENS])
            samples[uid] = Sample(time.perf_counter())
            owner[uid] = client
            remaining[client] -= 1

        for client in range(concurrency):
            submit(client)
        active = concurrency
        while active:
            for response in generator.next_generated():
                samples[response.uid].token_times.append(time.perf_counter())
                if response.finish_reason is not None:
                    client = owner[response.uid]
                    if remaining[client]:
                        submit(client)
                    else:
                        active -= 1
        generator.close()
        return list(samples.values()), time.perf_counter() - start

    def pids(self) -> dict[str, int]:
        return {"engine": os.getpid()}


class GatewayAndWorker:
    name = "gateway"

    def __init__(self, workdir: Path, worker_args: tuple[str, ...] = (), **stack_options: float):
        """``stack_options``: Stack's heartbeat_interval, queue_timeout (the tests' short defaults)."""
        workdir.mkdir(parents=True, exist_ok=True)
        self.stack = Stack(workdir, **stack_options)
        self.stack.start_gateway("--store", "memory", "--log-level", "warning")
        self.stack.start_worker(MODEL, MODEL, "--log-level", "warning", *worker_args)
        self.stack.wait_for_models(MODEL, timeout=900)

    def run(self, concurrency: int, requests_each: int) -> tuple[list[Sample], float]:
        return run_clients(concurrency, requests_each, lambda http: stream_chat(http, self.stack.base_url, MODEL))

    def pids(self) -> dict[str, int]:
        return {p.name.split("-")[0].rstrip("0123456789"): p.popen.pid for p in self.stack.processes}

    def stop(self) -> None:
        self.stack.stop()


class MlxLmServer:
    name = "mlx_lm.server"

    def __init__(self, model_dir: str, log: Path):
        self.port = free_port()
        # Same BLAS as our worker; weights are dequantized like ours (see float32_copy).
        code = ("import sys; from worker.blas import enable_fast_blas; enable_fast_blas(); "
                "from mlx_lm.server import main; sys.argv[0] = 'mlx_lm.server'; main()")
        self.log = open(log, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-c", code, "--model", model_dir, "--port", str(self.port), "--host", "127.0.0.1",
             "--temp", "0"], cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT)
        wait_for_http(f"http://127.0.0.1:{self.port}/v1/models", lambda r: r.status_code == 200, self.process,
                      timeout=300, failure=f"mlx_lm.server did not start; see {log}")
        self.model = model_dir

    def run(self, concurrency: int, requests_each: int) -> tuple[list[Sample], float]:
        base_url = f"http://127.0.0.1:{self.port}"
        return run_clients(concurrency, requests_each, lambda http: stream_chat(http, base_url, self.model))

    def pids(self) -> dict[str, int]:
        return {"server": self.process.pid}

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)
        self.log.close()


def wait_for_http(url: str, ready: Callable[[httpx.Response], bool], process: subprocess.Popen,
                  timeout: float, failure: str) -> None:
    """Poll ``url`` until ``ready(response)``; RuntimeError(failure) if ``process`` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if ready(httpx.get(url, timeout=2)):
                return
        except (httpx.HTTPError, ValueError):
            pass
        if time.monotonic() > deadline or process.poll() is not None:
            raise RuntimeError(failure)
        time.sleep(0.3)


def float32_copy(model_dir: str, out: Path) -> str:
    """mlx_lm.server would run the quantized weights; on a CPU our worker dequantizes, so give
    it the same float32 weights."""
    if (out / "config.json").exists():
        return str(out)
    from mlx_lm.convert import convert

    convert(model_dir, mlx_path=str(out), dequantize=True, dtype="float32")
    return str(out)


@contextlib.contextmanager
def synthetic_stack(workdir: Path, tokens: int, profile: Path | None = None) -> Iterator[tuple[str, int]]:
    """A gateway (optionally under cProfile) and the synthetic worker: yields (base URL, gateway pid)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port, zmq_address = free_port(), f"ipc://{workdir / 'gateway.sock'}"
    profiler = ["-m", "cProfile", "-o", str(profile)] if profile else []
    # Their logs go to files: the gateway's last lines on SIGINT are a KeyboardInterrupt traceback.
    with open(workdir / "gateway.log", "wb") as gateway_log, open(workdir / "worker.log", "wb") as worker_log:
        gateway = subprocess.Popen(
            [sys.executable, *profiler, "-m", "gateway", "--port", str(port), "--zmq", zmq_address,
             "--store", "memory", "--log-level", "warning"], cwd=REPO, stdout=gateway_log, stderr=subprocess.STDOUT)
        worker = subprocess.Popen([sys.executable, "bench/synthetic_worker.py", "--gateway", zmq_address,
                                   "--tokens", str(tokens)], cwd=REPO, stdout=worker_log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{base}/v1/models", lambda r: bool(r.json()["data"]), gateway, timeout=60,
                      failure=f"the synthetic stack did not start; see the logs in {workdir}")
        yield base, gateway.pid
    finally:
        worker.terminate()
        # uvicorn re-raises SIGTERM after shutting down, which would skip cProfile's write;
        # SIGINT ends in KeyboardInterrupt, and cProfile writes its file on the way out.
        gateway.send_signal(signal.SIGINT if profile else signal.SIGTERM)
        worker.wait(10)
        gateway.wait(30)
