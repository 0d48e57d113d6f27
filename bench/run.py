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
6. structured: 16 concurrent requests whose replies are constrained to a JSON schema against 16
   free ones (alternating rounds), then 16 + 16 in one batch; and the time to first token of a
   constrained request with a schema the worker has not seen (compiled on arrival) and with
   one it has (cached), against a free request.
7. decode_stall (bench/stall.py): one stream decoding when a ~4k-token prompt arrives: the
   stream's worst and p99 gap and the prompt's time to first token, for this gateway, the same
   worker with chunked prefill off, and mlx_lm.server; the prompt on an idle worker against
   mlx-lm's stream_generate (prefill tokens/s); concurrency 16 chunked against chunking off.
   Not in the default set (~10 minutes a round on a 2-core CPU): --only decode_stall; and
   --only prefill_chunk, the in-process sweep of fixed chunk sizes (where auto starts).

Writes results.json, results.md and results.png (if matplotlib is installed) to --out.
On Linux every system uses float32 weights with OpenBLAS preloaded, so they are compared alike.
"""

from __future__ import annotations

import argparse
import cProfile  # noqa: F401 (the gateway is profiled with `python -m cProfile`)
import json
import os
import pstats
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from worker.blas import enable_fast_blas  # noqa: E402

BLAS = enable_fast_blas()  # before anything imports mlx

import httpx  # noqa: E402
from processes import Stack  # noqa: E402
from report import write_report  # noqa: E402
from stall import decode_stall, prefill_chunk_sweep  # noqa: E402
from systems import (  # noqa: E402
    MODEL,
    GatewayAndWorker,
    InProcessEngine,
    MlxLmServer,
    Sample,
    float32_copy,
    process_usage,
    run_clients,
    stream_chat,
    summarize,
    synthetic_stack,
)

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


# Long enough that every reply reaches MAX_TOKENS (so both kinds keep the batch equally full),
# with strings, an enum, bounded numbers and nested objects for the grammar to work through.
STORY_SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 60},
        "mood": {"type": "string", "enum": ["calm", "tense", "stormy", "hopeful"]},
        "year": {"type": "integer", "minimum": 1800, "maximum": 2100},
        "characters": {"type": "array", "minItems": 2, "maxItems": 4, "items": {
            "type": "object", "additionalProperties": False, "required": ["name", "role"],
            "properties": {"name": {"type": "string", "maxLength": 30},
                           "role": {"type": "string", "enum": ["keeper", "sailor", "child", "stranger"]}}}},
        "events": {"type": "array", "minItems": 12, "items": {"type": "string", "maxLength": 120}},
    },
    "required": ["title", "mood", "year", "characters", "events"],
    "additionalProperties": False,
}


def structured(out: Path, rounds: int, concurrency: int = 16) -> dict:
    """Constrained decoding's cost: tokens/s of constrained against free requests, and TTFT with a
    cold and a cached schema."""
    import uuid

    from gateway.api.structured_output import instruction

    def request(http: httpx.Client, schema: dict | None) -> Sample:
        """A free request gets, as its system message, the line the gateway adds for a constrained
        one: both kinds render the same prompt, and only the constraint differs."""
        line = instruction({"type": "json_schema", "schema": STORY_SCHEMA}) if schema is None else None
        return stream_chat(http, base, MODEL, schema, system=line)

    # Slow heartbeats and a long queue: a burst of 32 prefills on a busy 2-core machine can keep the
    # link thread off the CPU past the tests' 1.5 s, and the gateway would count the worker dead.
    stack = GatewayAndWorker(out / "structured", ("--max-sequences", str(2 * concurrency)),
                             heartbeat_interval=2.0, queue_timeout=120.0)
    base = stack.stack.base_url
    phases: dict[str, list[dict]] = {"free": [], "constrained": []}
    try:
        request(httpx.Client(timeout=600), STORY_SCHEMA)  # warm-up; the schema is now cached
        for _ in range(rounds):
            for label, schema in (("free", None), ("constrained", STORY_SCHEMA)):
                samples, wall = run_clients(concurrency, 1, lambda http, s=schema: request(http, s))
                phases[label].append(summarize(samples, wall))
                print(f"structured {label}: {phases[label][-1]}", flush=True)
        # Both kinds in one batch: each kind's tokens over the same wall time.
        kinds = iter([None, STORY_SCHEMA] * concurrency)
        by_kind: dict[str, list] = {"free": [], "constrained": []}

        def one_of_each(http: httpx.Client):
            schema = next(kinds)
            sample = request(http, schema)
            by_kind["free" if schema is None else "constrained"].append(sample)
            return sample

        _, wall = run_clients(2 * concurrency, 1, one_of_each)
        mixed = {kind: summarize(samples, wall) for kind, samples in by_kind.items()}
        ttft: dict[str, list[float]] = {"free": [], "cold_schema": [], "cached_schema": []}
        with httpx.Client(timeout=600) as http:
            for _ in range(5):
                cold = json.loads(json.dumps(STORY_SCHEMA))
                cold["properties"][f"note_{uuid.uuid4().hex[:8]}"] = {"type": "string", "maxLength": 20}
                for label, schema in (("free", None), ("cold_schema", cold), ("cached_schema", STORY_SCHEMA)):
                    sample = request(http, schema)
                    ttft[label].append((sample.token_times[0] - sample.start) * 1000)
    finally:
        stack.stop()
    free = statistics.median(p["tokens_per_s"] for p in phases["free"])
    constrained = statistics.median(p["tokens_per_s"] for p in phases["constrained"])
    results = {
        "concurrency": concurrency,
        "free": phases["free"], "constrained": phases["constrained"], "mixed": mixed,
        "free_tokens_per_s": free, "constrained_tokens_per_s": constrained,
        "constrained_over_free": round(constrained / max(free, 1e-9), 3),
        "ttft_ms": {label: round(statistics.median(values), 1) for label, values in ttft.items()},
    }
    print(f"structured: {results}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--only", default="throughput,two_models,agent,added_latency,framing,structured")
    parser.add_argument("--out", type=Path, default=REPO / "bench-results")
    parser.add_argument("--report", action="store_true", help="only redo results.md/.png from results.json")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.report:
        write_report(json.loads((args.out / "results.json").read_text()), args.out, MODEL)
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
    if "structured" in only:
        results["structured"] = structured(args.out, args.rounds)
    if "decode_stall" in only:
        results["decode_stall"] = decode_stall(args.out, args.rounds)
    if "prefill_chunk" in only:
        results["prefill_chunk"] = prefill_chunk_sweep(args.out, rounds=args.rounds)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    write_report(results, args.out, MODEL)
    print((args.out / "results.md").read_text())


if __name__ == "__main__":
    main()
