"""Benchmark: speculative decoding (prompt lookup, ``--speculative``) on against off, on one worker.

    .venv/bin/python bench/speculative.py [--edit-tokens 256] [--chat-tokens 64] [--rounds 1]
        [--only gateway,mlx_lm] [--out bench-results/speculative.json]

Each gateway figure is the mean over ``--rounds`` (2) bursts, the order of on and off alternating.

Every figure is summed output tokens over the wall time of a burst of requests, on SmolLM2-135M
(float32, OpenBLAS). On the gateway each burst runs twice on the same worker (``--speculative
auto``, its default): with the requests' ``speculative: false`` and without, alternating.

1. edit: bench/data/inventory.py (165 lines) and the request to return it with one method
   renamed, the agent pattern; at concurrency 1 and 8. A raw completion whose reply begins the
   copy (SmolLM2-135M does not follow "return the whole file", but continues a copy it sees
   begun); greedy, ``--edit-tokens`` each. The file is in every prompt, a new name at the end of
   each: after a warm-up request its ~1,700 tokens are a prefix-cache hit, as an agent's history
   is, so the figures measure decoding rather than prefill.
2. free chat: short distinct questions (drafts mostly miss), greedy, at concurrency 1 and 16.
3. mlx_lm.server on the edit scenario, without and with its ``--draft-model`` (SmolLM2 drafting
   for itself: the only model with its tokenizer here, so it shows the mechanism's cost, not a
   real draft model's gain; mlx_lm.server turns batching off when given one).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from worker.blas import enable_fast_blas  # noqa: E402

BLAS = enable_fast_blas()  # before anything imports mlx

import httpx  # noqa: E402
from processes import Stack, free_port  # noqa: E402
from systems import MODEL, float32_copy, wait_for_http  # noqa: E402

SOURCE = (REPO / "bench" / "data" / "inventory.py").read_text()
QUESTIONS = ["What is the capital of France?", "Explain what a hash table is.", "Write a haiku about the ocean.",
             "List three uses of Python.", "Why is the sky blue?", "Give me a recipe for pancakes.",
             "What is photosynthesis?", "Explain recursion to a child.", "Name five famous scientists.",
             "How do I make a cup of tea?", "What causes the seasons on Earth?", "Tell me about the moon.",
             "What is a prime number?", "Describe a forest in autumn.", "What does a compiler do?",
             "Why do cats purr?"]


def edit_prompt(n: int) -> str:
    """The n-th edit request: the same file (a cached prefix after the first, as in an agent's
    history), a different new name each time."""
    head = "\n".join(SOURCE.splitlines()[:3])
    return (f"Original shop.py:\n```python\n{SOURCE}```\n\n"
            f"shop.py with the method total_price renamed to order_total_{n}:\n```python\n{head}\n")


def burst(bodies: list[tuple[str, dict[str, Any]]], base_url: str) -> tuple[int, float]:
    """Send every (path, body) at once; (completion tokens summed, wall seconds)."""
    tokens = [0] * len(bodies)

    def send(i: int) -> None:
        path, body = bodies[i]
        r = httpx.post(f"{base_url}{path}", json=body, timeout=3600)
        r.raise_for_status()
        tokens[i] = r.json()["usage"]["completion_tokens"]

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(tokens), time.perf_counter() - start


def edits(concurrency: int, tokens: int, model: str, **extra: Any) -> list[tuple[str, dict[str, Any]]]:
    return [("/v1/completions", {"model": model, "prompt": edit_prompt(next(_numbers)), "max_tokens": tokens,
                                 "temperature": 0, **extra}) for _ in range(concurrency)]


def chats(concurrency: int, tokens: int, model: str, **extra: Any) -> list[tuple[str, dict[str, Any]]]:
    return [("/v1/chat/completions", {"model": model, "max_tokens": tokens, "temperature": 0, **extra,
                                      "messages": [{"role": "user", "content": f"{QUESTIONS[i % len(QUESTIONS)]} "
                                                                               f"(request {next(_numbers)})"}]})
            for i in range(concurrency)]


_numbers = iter(range(1, 1 << 30))


def speculation_totals(base_url: str) -> tuple[int, int]:
    time.sleep(1.5)  # a heartbeat brings the worker's totals
    stats = httpx.get(f"{base_url}/v1/workers", timeout=10).json()["data"][0].get("speculation") or {}
    return stats.get("drafted_tokens", 0), stats.get("accepted_tokens", 0)


def gateway(out: Path, args: argparse.Namespace) -> dict[str, Any]:
    (out / "stack").mkdir(parents=True, exist_ok=True)
    stack = Stack(out / "stack")
    results: dict[str, Any] = {}
    try:
        stack.start_gateway("--store", "memory", "--log-level", "warning")
        stack.start_worker(MODEL, MODEL, "--log-level", "warning", "--temperature", "0")
        stack.wait_for_models(MODEL, timeout=900)
        burst(chats(2, 8, MODEL) + edits(1, 8, MODEL), stack.base_url)  # warm-up; the file's prefix cached
        scenarios = [("edit", 1, edits, args.edit_tokens), ("edit", 8, edits, args.edit_tokens),
                     ("chat", 1, chats, args.chat_tokens), ("chat", 16, chats, args.chat_tokens)]
        for name, concurrency, make, tokens in scenarios:
            if args.scenarios and f"{name}_c{concurrency}" not in args.scenarios.split(","):
                continue
            rates: dict[str, list[float]] = {"off": [], "on": []}
            drafted = accepted = 0
            for round_ in range(args.rounds):
                for mode in (("off", "on") if round_ % 2 == 0 else ("on", "off")):  # alternating: noise
                    before = speculation_totals(stack.base_url)
                    extra = {"speculative": False} if mode == "off" else {}
                    total, wall = burst(make(concurrency, tokens, MODEL, **extra), stack.base_url)
                    rates[mode].append(total / wall)
                    after = speculation_totals(stack.base_url)
                    if mode == "on":
                        drafted += after[0] - before[0]
                        accepted += after[1] - before[1]
            row = {mode: round(statistics.mean(r), 2) for mode, r in rates.items()}
            row.update(ratio=round(row["on"] / row["off"], 2), drafted=drafted, accepted=accepted,
                       acceptance=round(accepted / drafted, 3) if drafted else None)
            results[f"{name}_c{concurrency}"] = row
            print(f"gateway {name} c{concurrency}: {row}", flush=True)
    finally:
        stack.stop()
    return results


def mlx_lm(out: Path, args: argparse.Namespace) -> dict[str, Any]:
    from worker.models import resolve

    f32 = float32_copy(resolve(MODEL)[0], out / "smollm2-f32")
    results: dict[str, Any] = {}
    for label, extra in (("mlx_lm.server", []), ("mlx_lm.server --draft-model", ["--draft-model", f32])):
        port = free_port()
        code = ("import sys; from worker.blas import enable_fast_blas; enable_fast_blas(); "
                "from mlx_lm.server import main; sys.argv[0] = 'mlx_lm.server'; main()")
        with open(out / f"{label.replace(' ', '_')}.log", "wb") as log:
            process = subprocess.Popen([sys.executable, "-c", code, "--model", f32, "--port", str(port), "--host",
                                        "127.0.0.1", "--temp", "0", *extra], cwd=REPO, stdout=log,
                                       stderr=subprocess.STDOUT)
            try:
                base_url = f"http://127.0.0.1:{port}"
                wait_for_http(f"{base_url}/v1/models", lambda r: r.status_code == 200, process, timeout=300,
                              failure=f"{label} did not start")
                burst(edits(1, 8, f32), base_url)  # warm-up: the file's prefix in its prompt cache, as above
                for concurrency in (1, 8):
                    total, wall = burst(edits(concurrency, args.edit_tokens, f32), base_url)
                    results[f"{label} edit_c{concurrency}"] = round(total / wall, 2)
                    print(f"{label} edit c{concurrency}: {total / wall:.2f} tokens/s", flush=True)
            finally:
                process.terminate()
                process.wait(30)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--edit-tokens", type=int, default=256)
    parser.add_argument("--chat-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--only", default="gateway,mlx_lm")
    parser.add_argument("--scenarios", default="", help="gateway scenarios to run, e.g. edit_c8 (default: all)")
    parser.add_argument("--out", type=Path, default=REPO / "bench-results" / "speculative.json")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    work = args.out.parent / "speculative"
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"blas": BLAS}
    only = args.only.split(",")
    if "gateway" in only:
        results["gateway"] = gateway(work, args)
    if "mlx_lm" in only:
        results["mlx_lm"] = mlx_lm(work, args)
    args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
