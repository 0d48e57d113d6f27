"""The prefix cache's disk tier (issue 24): an agent session, the worker restarted, its next turn.

    .venv/bin/python bench/disk_cache.py [--rounds 3] [--out bench-results]

A gateway with three API keys (three cache scopes) and a SmolLM2-135M worker (float32 on the CPU)
with ``--prompt-cache-dir``. Each round, in a fresh cache directory:
1. a five-turn agent session under key A: a system prompt, then five user turns of ~700 tokens
   each (distinct words), each answered (max_tokens 24, greedy); the prefix cache keeps it all;
2. the same five turns (A's replies) under key C, then turn six (~3,600 tokens of history + a short
   question) under C, RAM warm: ``ram`` (C stands in for A, whose cache must stay as turn five
   left it);
3. the worker is stopped (SIGTERM: its RAM entries go to disk) and started again; a short warm-up
   request under key B (nothing of A's); then turn six under A: ``disk`` (turn five's entry
   restored from disk, the new tail prefilled, as ``ram`` did from RAM);
4. turn six's prompt under key B (never a hit for A's or C's entries): ``cold`` (no cache);
5. turn six under A again, on the restarted worker: ``ram_after`` (all but one token in RAM).

Each figure is the request's time to its first token (max_tokens 1, not streamed: the whole
request), with usage's cached_tokens. Target: disk <= 0.25 x cold. Writes disk_cache.json and
disk_cache.md to --out, and prints the table.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from processes import Stack  # noqa: E402

MODEL = "smollm2-135m"
KEY_A, KEY_B, KEY_C = "sk-bench-a", "sk-bench-b", "sk-bench-c"
TURN_WORDS = 170  # ~700 tokens of distinct words per user turn


def words(rng: random.Random, n: int) -> str:
    vocabulary = ["river", "stone", "market", "lantern", "copper", "orchard", "signal", "harbor", "meadow",
                  "engine", "ledger", "quartz", "falcon", "thimble", "velvet", "canyon", "pepper", "glacier"]
    return " ".join(f"{rng.choice(vocabulary)}{rng.randrange(1000)}" for _ in range(n))


def post(stack: Stack, key: str, messages: list[dict[str, Any]], max_tokens: int) -> tuple[float, dict[str, Any]]:
    body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    start = time.perf_counter()
    r = httpx.post(f"{stack.base_url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"},
                   timeout=900)
    seconds = time.perf_counter() - start
    r.raise_for_status()
    return seconds, r.json()


def wait_for_worker(stack: Stack) -> None:
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{stack.base_url}/v1/workers", headers={"Authorization": f"Bearer {KEY_A}"}).json()["data"]:
                return
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        time.sleep(0.2)
    raise TimeoutError(stack.logs())


def one_round(workdir: Path, index: int) -> dict[str, Any]:
    rng = random.Random(index)
    cache_dir = workdir / f"kv-{index}"
    shutil.rmtree(cache_dir, ignore_errors=True)
    stack = Stack(workdir / f"round-{index}")
    stack.workdir.mkdir(parents=True, exist_ok=True)
    worker_args = ("--temperature", "0", "--prompt-cache-dir", str(cache_dir), "--log-level", "info")
    result: dict[str, Any] = {}
    try:
        keys = [arg for key in (KEY_A, KEY_B, KEY_C) for arg in ("--api-key", key)]
        stack.start_gateway(*keys, "--store", "memory", "--log-level", "warning")
        worker = stack.start_worker(MODEL, MODEL, *worker_args)
        wait_for_worker(stack)
        messages: list[dict[str, Any]] = [{"role": "system", "content": "You are an agent. Answer briefly."}]
        for _ in range(5):
            messages.append({"role": "user", "content": words(rng, TURN_WORDS)})
            _, reply = post(stack, KEY_A, messages, 24)
            messages.append({"role": "assistant", "content": reply["choices"][0]["message"]["content"]})
        turn6 = [*messages, {"role": "user", "content": "Which word came first? " + words(rng, 8)}]

        def measure(name: str, key: str) -> None:
            seconds, reply = post(stack, key, turn6, 1)
            usage = reply["usage"]
            result[name] = {"seconds": seconds, "prompt_tokens": usage["prompt_tokens"],
                            "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"]}

        for end in range(2, len(messages) + 1, 2):  # C replays A's turns: the same RAM state, its own scope
            post(stack, KEY_C, messages[:end], 24)
        measure("ram", KEY_C)
        started = time.perf_counter()
        stack.remove(worker)  # SIGTERM: the RAM entries are written to disk
        result["stop_seconds"] = time.perf_counter() - started
        result["disk_bytes"] = sum(f.stat().st_size for f in cache_dir.rglob("*") if f.is_file())
        stack.start_worker(MODEL, MODEL, *worker_args)
        wait_for_worker(stack)
        post(stack, KEY_B, [{"role": "user", "content": "Hello there."}], 2)  # warm-up, another scope
        measure("disk", KEY_A)
        measure("cold", KEY_B)
        measure("ram_after", KEY_A)
    finally:
        stack.stop()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "bench-results")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mlxgw-bench-disk-cache"))
    args = parser.parse_args()
    rounds = []
    for index in range(args.rounds):
        rounds.append(one_round(args.workdir, index))
        print(json.dumps(rounds[-1]), flush=True)
    summary = {name: statistics.median(r[name]["seconds"] for r in rounds)
               for name in ("cold", "disk", "ram", "ram_after")}
    ratios = {"disk_over_cold": statistics.median(r["disk"]["seconds"] / r["cold"]["seconds"] for r in rounds),
              "ram_over_cold": statistics.median(r["ram_after"]["seconds"] / r["cold"]["seconds"] for r in rounds)}
    report = {"machine": platform.platform(), "processor": platform.processor(), "model": MODEL, "rounds": rounds,
              "median_seconds": summary, "median_ratios": ratios, "target": "disk <= 0.25 x cold"}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "disk_cache.json").write_text(json.dumps(report, indent=2))
    prompt = rounds[0]["cold"]["prompt_tokens"]
    lines = [f"Turn six of a five-turn agent session ({prompt} prompt tokens, {MODEL}, {platform.machine()}), "
             f"time to first token, median of {len(rounds)} rounds:", "",
             "| turn six | seconds | cached tokens | x cold |", "|---|---|---|---|"]
    for name, label in (("cold", "no cache"), ("disk", "worker restarted: restored from disk"),
                        ("ram", "RAM cache warm"), ("ram_after", "RAM warm after the restore")):
        cached = rounds[0][name]["cached_tokens"]
        lines.append(f"| {label} | {summary[name]:.3f} | {cached} | {summary[name] / summary['cold']:.3f} |")
    lines += ["", f"disk / cold (median of rounds' ratios): {ratios['disk_over_cold']:.3f} (target <= 0.25); "
              f"stop with the write-out: {statistics.median(r['stop_seconds'] for r in rounds):.2f}s; "
              f"disk tier: {rounds[0]['disk_bytes'] / 1e6:.0f} MB"]
    (args.out / "disk_cache.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
