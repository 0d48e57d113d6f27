"""A sharded worker (one model over several ranks, ``worker --distributed``) against the
single-process worker, in one run behind one gateway: tokens/s and time to first token of
streamed chat requests, and each process's memory (RSS).

On one machine the group can only be slower: its ranks share the same cores, and every layer
adds collectives (over loopback TCP here) to each step. What it shows is what the group costs,
and that each rank holds about 1/N of the weights.

    .venv/bin/python bench/sharded.py --out bench-results          # SmolLM2 (float32), 3 ranks
    .venv/bin/python bench/sharded.py --ranks 2 --model DIR        # a model whose heads divide by 2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from worker.blas import enable_fast_blas  # noqa: E402

enable_fast_blas()

import httpx  # noqa: E402
import systems  # noqa: E402
from processes import Stack, free_port  # noqa: E402

SINGLE, SHARDED = "single", "sharded"


def start_group(stack: Stack, model: str, ranks: int, mode: str, threads: int) -> subprocess.Popen:
    log = open(stack.workdir / "group.log", "wb")
    command = [sys.executable, str(Path(sys.executable).parent / "mlx.launch"), "--backend", "ring", "-n", str(ranks),
               "--starting-port", str(free_port()), "--python", sys.executable, "-m", "worker",
               "--distributed", mode, "--model", model, "--served-name", SHARDED, "--gateway", stack.zmq_address,
               "--heartbeat-interval", str(stack.heartbeat_interval), "--cpu-threads", str(threads)]
    return subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)


def rank_pids(log_path: Path, ranks: int, timeout: float = 900) -> dict[int, int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = {int(r): int(p) for r, p in
                 re.findall(r"rank (\d+) \([^)]*\) of \d+, pid (\d+)", log_path.read_text(errors="replace"))}
        if len(found) == ranks:
            return found
        time.sleep(0.5)
    raise TimeoutError(log_path.read_text(errors="replace"))


def measure(stack: Stack, model: str, concurrency: int, requests_each: int) -> dict:
    samples, wall = systems.run_clients(concurrency, requests_each,
                                        lambda http: systems.stream_chat(http, stack.base_url, model))
    return systems.summarize(samples, wall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--model", default=None, help="model directory (default: SmolLM2 as float32)")
    parser.add_argument("--ranks", type=int, default=3)
    parser.add_argument("--distributed", default="tensor", choices=["tensor", "pipeline"])
    parser.add_argument("--concurrency", default="1,4")
    parser.add_argument("--requests", type=int, default=2, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    systems.MAX_TOKENS = args.max_tokens
    model = args.model
    if model is None:
        from worker.models import resolve

        model = systems.float32_copy(resolve(systems.MODEL)[0], args.out / "smollm2-float32")

    stack = Stack(args.out / "sharded-stack", heartbeat_interval=1.0, queue_timeout=600)
    stack.workdir.mkdir(parents=True, exist_ok=True)
    group = None
    pids: dict[int, int] = {}
    results: dict = {"model": model, "ranks": args.ranks, "distributed": args.distributed,
                     "max_tokens": args.max_tokens, "runs": []}
    try:
        stack.start_gateway("--store", "memory", "--log-level", "warning")
        single = stack.start_worker(model, SINGLE, "--log-level", "warning", "--cpu-threads", "1")
        group = start_group(stack, model, args.ranks, args.distributed, threads=1)
        pids = rank_pids(stack.workdir / "group.log", args.ranks)
        stack.wait_for_models(SINGLE, SHARDED, timeout=900)
        for served in (SINGLE, SHARDED):  # warm up (first-step compilation, caches)
            measure(stack, served, 1, 1)
        for concurrency in [int(c) for c in args.concurrency.split(",")]:
            for served in (SINGLE, SHARDED):
                row = {"system": served, "concurrency": concurrency,
                       **measure(stack, served, concurrency, args.requests)}
                print(json.dumps(row), flush=True)
                results["runs"].append(row)
        results["rss_mb"] = {SINGLE: round(systems.process_usage(single.popen.pid)[1] / 2**20, 1),
                             **{f"rank {r}": round(systems.process_usage(pid)[1] / 2**20, 1)
                                for r, pid in sorted(pids.items())}}
        metrics = httpx.get(f"{stack.base_url}/metrics").text
        results["active_memory_mb"] = {
            m.group(1): round(float(m.group(2)) / 2**20, 1)
            for m in re.finditer(r'mlxgw_worker_active_memory_bytes\{[^}]*model="([^"]+)"[^}]*\} (\S+)', metrics)}
    finally:
        if group is not None and group.poll() is None:
            try:  # rank 0 drains and stops the others; mlx.launch exits after them, with every log line
                os.kill(pids[0], signal.SIGTERM)
                group.wait(60)
            except (KeyError, ProcessLookupError, subprocess.TimeoutExpired):
                group.terminate()
        stack.stop()
        for pid in pids.values():
            subprocess.run(["kill", "-9", str(pid)], capture_output=True)
    (args.out / "sharded.json").write_text(json.dumps(results, indent=2))
    lines = [f"Sharded ({args.distributed}, {args.ranks} ranks) against one worker: {model}, "
             f"{args.max_tokens} tokens per request", "",
             "| system | concurrency | tokens/s | TTFT p50 ms | TTFT p95 ms | ITL p50 ms |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['system']} | {r['concurrency']} | {r['tokens_per_s']} | {r['ttft_p50_ms']} | {r['ttft_p95_ms']} | "
              f"{r['itl_p50_ms']} |" for r in results["runs"]]
    lines += ["", "RSS MB: " + ", ".join(f"{k} {v}" for k, v in results.get("rss_mb", {}).items()),
              "MLX active memory MB (heartbeats; rank 0 for the group): "
              + ", ".join(f"{k} {v}" for k, v in results.get("active_memory_mb", {}).items())]
    (args.out / "sharded.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
