"""Benchmark: the gateway + worker against the raw engine and mlx_lm.server, on one model.

    .venv/bin/python bench/run.py [--rounds 3] [--only throughput,two_models,agent,added_latency,framing]
                                  [--out bench-results]

1. throughput: the same streamed chat requests, at concurrency 1, 4 and 16, on (a) mlx-lm's
   BatchGenerator driven in this process (the limit), (b) gateway + worker, (c) mlx_lm.server;
   in alternating rounds (a b c a b c), since these machines are noisy; each figure is the
   median over the rounds. Output tokens/s, time to first token and inter-token latency
   p50/p95, and the processes' CPU seconds and RSS.
2. two models, requests alternating between them at concurrency 4: a worker per model against
   mlx_lm.server, which keeps one model loaded and swaps on each switch (and the in-process
   engine's one-model figure at 4 streams, the most any server could do on this machine).
3. agent: a long system prompt plus tools, five turns that each resend the history, through
   /v1/responses: time to first token per turn with the worker's prefix cache and without.
4. added latency: the time to first token the gateway adds, against a synthetic worker that
   answers at once.
5. framing: a synthetic worker that emits tokens as fast as the protocol allows, to find how
   many SSE events per second the gateway frames on one core, and a profile of where it spends.

Writes results.json, results.md and results.png (if matplotlib is installed) to --out.
On Linux every system uses float32 weights with OpenBLAS preloaded, so they are compared alike.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile  # noqa: F401 (the gateway is profiled with `python -m cProfile`)
import json
import os
import pstats
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from worker.blas import enable_fast_blas  # noqa: E402

BLAS = enable_fast_blas()

import httpx  # noqa: E402
from processes import Stack, free_port  # noqa: E402

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
    itl = [b - a for s in samples for a, b in zip(s.token_times, s.token_times[1:])]
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


def stream_chat(client: httpx.Client, base_url: str, model: str) -> Sample:
    sample = Sample(time.perf_counter())
    body = {"model": model, "messages": prompt(), "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}
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

    def __init__(self, workdir: Path, worker_args: tuple[str, ...] = ()):
        workdir.mkdir(parents=True, exist_ok=True)
        self.stack = Stack(workdir)
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
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"mlx_lm.server did not start; see {log}")
            time.sleep(0.5)
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


def float32_copy(model_dir: str, out: Path) -> str:
    """mlx_lm.server would run the quantized weights; on a CPU our worker dequantizes, so give
    it the same float32 weights."""
    if (out / "config.json").exists():
        return str(out)
    from mlx_lm.convert import convert

    convert(model_dir, mlx_path=str(out), dequantize=True, dtype="float32")
    return str(out)


# --- scenarios ---------------------------------------------------------------------------


def throughput(out: Path, rounds: int, concurrencies: list[int]) -> dict:
    from worker.models import resolve

    model_dir, _ = resolve(MODEL)
    f32 = float32_copy(model_dir, out / "smollm2-f32")
    systems = [InProcessEngine(model_dir), GatewayAndWorker(out / "stack"), MlxLmServer(f32, out / "mlx_lm.log")]
    results: dict[str, dict[int, list[dict]]] = {s.name: {c: [] for c in concurrencies} for s in systems}
    try:
        for system in systems:  # warm up (first-call compilation, caches)
            system.run(1, 1)
        for round_ in range(rounds):
            for concurrency in concurrencies:
                for system in systems:
                    before = {k: process_usage(pid) for k, pid in system.pids().items()}
                    # 4 requests per client at concurrency 1 and 4, 2 each at 16: a second burst
                    # arrives as the first finishes, so prefill overlaps decoding as in service.
                    samples, wall = system.run(concurrency, 4 if concurrency < 16 else 2)
                    after = {k: process_usage(pid) for k, pid in system.pids().items()}
                    row = summarize(samples, wall)
                    for k in after:
                        row[f"{k}_cpu_s"] = round(after[k][0] - before[k][0], 2)
                        row[f"{k}_rss_mb"] = round(after[k][1] / 2**20, 1)
                    results[system.name][concurrency].append(row)
                    print(f"round {round_} c={concurrency} {system.name}: {row}", flush=True)
    finally:
        for system in systems:
            if hasattr(system, "stop"):
                system.stop()
    return results


def two_models(out: Path, concurrency: int = 4, requests_each: int = 4) -> dict:
    """Two models, requests alternating between them: one worker per model against one
    mlx_lm.server that keeps a single model loaded and swaps on each switch."""
    import shutil

    from worker.models import resolve

    model_dir, _ = resolve(MODEL)
    first = float32_copy(model_dir, out / "smollm2-f32")
    second = out / "smollm2-f32-b"  # the same weights under another path: a second model to mlx_lm
    if not second.exists():
        shutil.copytree(first, second)
    results = {}
    workdir = out / "two-models"
    workdir.mkdir(parents=True, exist_ok=True)
    stack = Stack(workdir)
    counter = iter(range(1 << 62))
    try:
        stack.start_gateway("--store", "memory", "--log-level", "warning")
        # Each worker gets half the cores (on Linux CPU): two BLAS thread pools each the size
        # of the machine would oversubscribe it. mlx_lm.server keeps them all for its one model.
        threads = ("--cpu-threads", str(max(1, (os.cpu_count() or 2) // 2))) if sys.platform == "linux" else ()
        for name in ("model-a", "model-b"):
            stack.start_worker(MODEL, name, "--log-level", "warning", *threads)
        stack.wait_for_models("model-a", "model-b", timeout=900)
        samples, wall = run_clients(concurrency, requests_each, lambda http: stream_chat(
            http, stack.base_url, ("model-a", "model-b")[next(counter) % 2]))
        results["gateway"] = summarize(samples, wall)
    finally:
        stack.stop()
    server = MlxLmServer(first, out / "mlx_lm-two.log")
    try:
        samples, wall = run_clients(concurrency, requests_each, lambda http: stream_chat(
            http, f"http://127.0.0.1:{server.port}", (first, str(second))[next(counter) % 2]))
        results["mlx_lm.server"] = summarize(samples, wall)
    finally:
        server.stop()
    results["gateway_over_mlx_lm"] = round(results["gateway"]["tokens_per_s"] /
                                           max(results["mlx_lm.server"]["tokens_per_s"], 1e-9), 2)
    print(f"two models: {results}", flush=True)
    return results


def agent(out: Path) -> dict:
    system_prompt = ("You are a coding agent. Follow the repository's conventions. " * 60).strip()
    tools = [{"type": "function", "name": f"tool_{i}", "description": "A tool for the agent. " * 5,
              "parameters": {"type": "object", "properties": {"arg": {"type": "string"}}}} for i in range(6)]
    results = {}
    for label, args in (("with_cache", ()), ("without_cache", ("--prompt-cache-mb", "0"))):
        stack = GatewayAndWorker(out / f"agent-{label}", args)
        history: list[dict] = []
        ttfts = []
        try:
            for turn in range(5):
                history.append({"role": "user", "content": f"Turn {turn}: what should we change next?"})
                body = {"model": MODEL, "instructions": system_prompt, "tools": tools, "input": history,
                        "max_output_tokens": 24, "temperature": 0, "stream": True}
                start, first, text = time.perf_counter(), None, ""
                with httpx.stream("POST", f"{stack.stack.base_url}/v1/responses", json=body, timeout=600) as r:
                    for line in r.iter_lines():
                        if line.startswith("data: ") and "output_text.delta" in line:
                            first = first or time.perf_counter()
                            text += json.loads(line[6:])["delta"]
                ttfts.append(round(((first or time.perf_counter()) - start) * 1000, 1))
                history.append({"role": "assistant", "content": text})
        finally:
            stack.stop()
        results[label] = ttfts
        print(f"agent {label}: TTFT per turn (ms) {ttfts}", flush=True)
    with_cache = results["with_cache"]
    results["turn5_over_turn1_with_cache"] = round(with_cache[-1] / with_cache[0], 3)
    return results


@contextlib.contextmanager
def synthetic_stack(workdir: Path, tokens: int, profile: Path | None = None) -> Iterator[tuple[str, int]]:
    """A gateway (optionally under cProfile) and the synthetic worker: yields (base URL, gateway pid)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port, zmq_address = free_port(), f"ipc://{workdir / 'gateway.sock'}"
    profiler = ["-m", "cProfile", "-o", str(profile)] if profile else []
    gateway = subprocess.Popen(
        [sys.executable, *profiler, "-m", "gateway", "--port", str(port), "--zmq", zmq_address,
         "--store", "memory", "--log-level", "warning"], cwd=REPO)
    worker = subprocess.Popen([sys.executable, "bench/synthetic_worker.py", "--gateway", zmq_address,
                               "--tokens", str(tokens)], cwd=REPO)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/v1/models", timeout=1).json()["data"]:
                    break
            except (httpx.HTTPError, ValueError):
                pass
            assert time.monotonic() < deadline, "the synthetic stack did not start"
            time.sleep(0.2)
        yield base, gateway.pid
    finally:
        worker.terminate()
        # uvicorn re-raises SIGTERM after shutting down, which would skip cProfile's write;
        # SIGINT ends in KeyboardInterrupt, and cProfile writes its file on the way out.
        gateway.send_signal(signal.SIGINT)
        worker.wait(10)
        gateway.wait(30)


def added_latency(out: Path, requests: int = 300) -> dict:
    """What the gateway adds to time to first token: the synthetic worker answers at once, so
    a streamed request's first token is all HTTP, validation, routing, two ZeroMQ hops and SSE
    framing (and the Python client's own share: an upper bound)."""
    with synthetic_stack(out / "latency", tokens=1) as (base, _):
        body = {"model": "synthetic", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1, "stream": True}
        ttft = []
        with httpx.Client(timeout=30) as http:
            for i in range(requests + 20):
                start = time.perf_counter()
                with http.stream("POST", f"{base}/v1/chat/completions", json=body) as r:
                    for line in r.iter_lines():
                        if '"content":" tok"' in line:
                            if i >= 20:  # the first requests warm up imports and connections
                                ttft.append(time.perf_counter() - start)
                            break
    result = {"requests": len(ttft), "ttft_p50_ms": round(statistics.median(ttft) * 1000, 2),
              "ttft_p95_ms": round(statistics.quantiles(ttft, n=100)[94] * 1000, 2)}
    print(f"added latency: {result}", flush=True)
    return result


def framing(out: Path, streams: int = 8, tokens: int = 2000) -> dict:
    workdir = out / "framing"
    profile = workdir / "gateway.prof"
    with synthetic_stack(workdir, tokens, profile) as (base, gateway_pid):
        cpu_before, _ = process_usage(gateway_pid)
        # curl as the client: a Python client would be the bottleneck, not the gateway.
        body = json.dumps({"model": "synthetic", "messages": [{"role": "user", "content": "x"}],
                           "max_tokens": tokens, "stream": True})
        start = time.perf_counter()
        clients = [subprocess.Popen(["curl", "-sN", f"{base}/v1/chat/completions", "-H",
                                     "content-type: application/json", "-d", body], stdout=subprocess.PIPE)
                   for _ in range(streams)]
        outputs = [c.communicate()[0] for c in clients]
        wall = time.perf_counter() - start
        cpu_after, rss = process_usage(gateway_pid)
    events = sum(out.count(b'"content":" tok"') for out in outputs)
    stats = pstats.Stats(str(profile))
    stats.sort_stats("tottime")
    top = [f"{func[2]} ({Path(func[0]).name}:{func[1]}): {row[2]:.2f}s own"
           for func, row in sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:12]]
    result = {"streams": streams, "events": events, "wall_s": round(wall, 2),
              "events_per_s": round(events / wall), "gateway_cpu_s": round(cpu_after - cpu_before, 2),
              "events_per_cpu_s": round(events / max(cpu_after - cpu_before, 1e-6)),
              "gateway_rss_mb": round(rss / 2**20, 1), "profile_top_own_time": top}
    print(f"framing: {json.dumps(result, indent=1)}", flush=True)
    return result


# --- report ---------------------------------------------------------------------------


def median_rows(rows: list[dict]) -> dict:
    """Each figure's median over the rounds: one slow round on a shared machine moves it least."""
    return {k: round(statistics.median(r[k] for r in rows), 2) for k in rows[0]
            if isinstance(rows[0][k], (int, float))}


def ratios(throughput: dict) -> list[str]:
    """Gateway against the other two, per concurrency: the targets of issue 6."""
    lines = []
    gateway = throughput.get("gateway", {})
    for c, rows in gateway.items():
        ours = median_rows(rows)
        parts = []
        for other in ("engine", "mlx_lm.server"):
            if c in throughput.get(other, {}):
                theirs = median_rows(throughput[other][c])
                parts.append(f"{ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}× {other}")
        lines.append(f"- concurrency {c}: gateway tokens/s = " + ", ".join(parts))
    return lines


def report(results: dict, out: Path) -> None:
    lines = [f"# Benchmark ({results['machine']})", "", f"BLAS: {results['blas']}", ""]
    if "throughput" in results:
        lines += ["| system | concurrency | tokens/s | TTFT p50 ms | TTFT p95 ms | ITL p50 ms | ITL p95 ms | CPU s | RSS MB |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for system, by_c in results["throughput"].items():
            for c, rows in by_c.items():
                m = median_rows(rows)
                cpu = " + ".join(f"{k[:-6]} {m[k]}" for k in m if k.endswith("_cpu_s"))
                rss = " + ".join(f"{k[:-7]} {m[k]}" for k in m if k.endswith("_rss_mb"))
                lines.append(f"| {system} | {c} | {m['tokens_per_s']} | {m['ttft_p50_ms']} | {m['ttft_p95_ms']} | "
                             f"{m['itl_p50_ms']} | {m['itl_p95_ms']} | {cpu} | {rss} |")
        lines += ["", "Medians over the rounds. Ratios of the medians:", ""] + ratios(results["throughput"]) + [""]
    if "two_models" in results:
        t = results["two_models"]
        lines += [f"Two models, requests alternating, concurrency 4: gateway {t['gateway']['tokens_per_s']} tokens/s, "
                  f"mlx_lm.server {t['mlx_lm.server']['tokens_per_s']} tokens/s "
                  f"({t['gateway_over_mlx_lm']}×).", ""]
        engine = results.get("throughput", {}).get("engine", {})
        engine_c4 = engine.get(4) or engine.get("4")  # keys are strings after a JSON round trip
        if engine_c4:
            ceiling = median_rows(engine_c4)["tokens_per_s"]
            lines += [f"The machine's ceiling for 4 streams (one model, in-process engine): {ceiling} tokens/s, "
                      f"{ceiling / t['mlx_lm.server']['tokens_per_s']:.2f}× mlx_lm.server; the gateway reached "
                      f"{t['gateway']['tokens_per_s'] / ceiling:.0%} of it.", ""]
    if "agent" in results:
        a = results["agent"]
        lines += ["Agent scenario, TTFT per turn (ms):", "",
                  f"- with the prefix cache: {a['with_cache']}", f"- without: {a['without_cache']}",
                  f"- turn 5 / turn 1 with the cache: {a['turn5_over_turn1_with_cache']}", ""]
    if "added_latency" in results:
        a = results["added_latency"]
        lines += [f"Time to first token the gateway adds (synthetic worker that answers at once, {a['requests']} "
                  f"sequential requests): p50 {a['ttft_p50_ms']} ms, p95 {a['ttft_p95_ms']} ms.", ""]
    if "framing" in results:
        f = results["framing"]
        lines += [f"Gateway framing (synthetic worker, {f['streams']} streams): {f['events_per_s']} SSE events/s, "
                  f"{f['events_per_cpu_s']} per gateway CPU-second, gateway RSS {f['gateway_rss_mb']} MB.", "",
                  "Where the gateway spends its time (own time, cProfile):", ""]
        lines += [f"- {line}" for line in f["profile_top_own_time"]]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    if "throughput" in results:
        fig, ax = plt.subplots(figsize=(6, 4))
        for system, by_c in results["throughput"].items():
            cs = sorted(by_c, key=int)
            ax.plot(cs, [median_rows(by_c[c])["tokens_per_s"] for c in cs], marker="o", label=system)
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel("output tokens/s")
        ax.set_title(f"{MODEL}, {results['machine']}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "results.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--only", default="throughput,two_models,agent,added_latency,framing")
    parser.add_argument("--out", type=Path, default=REPO / "bench-results")
    parser.add_argument("--report", action="store_true", help="only redo results.md/.png from results.json")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.report:
        report(json.loads((args.out / "results.json").read_text()), args.out)
        print((args.out / "results.md").read_text())
        return
    import platform

    results: dict = {"machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores", "blas": BLAS}
    only = set(args.only.split(","))
    if "throughput" in only:
        results["throughput"] = throughput(args.out, args.rounds, [int(c) for c in args.concurrency.split(",")])
    if "two_models" in only:
        results["two_models"] = two_models(args.out)
    if "agent" in only:
        results["agent"] = agent(args.out)
    if "added_latency" in only:
        results["added_latency"] = added_latency(args.out)
    if "framing" in only:
        results["framing"] = framing(args.out)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    report(results, args.out)
    print((args.out / "results.md").read_text())


if __name__ == "__main__":
    main()
