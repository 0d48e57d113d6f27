"""Decode stall (issue 14): a stream is decoding when a ~4k-token prompt arrives.

    .venv/bin/python bench/run.py --only decode_stall [--rounds 1]   # the scenario, alone
    .venv/bin/python bench/run.py --only prefill_chunk               # the sweep behind the default chunk

decode_stall, in one run:
- the stall: one stream decoding (a counting prompt that never ends on its own), then a long
  prompt of distinct words (a fresh one each time: no prefix cache hit anywhere) arrives; the
  stream's worst and p99 gap between two tokens while that prompt is prefilled, and the long
  prompt's time to first token; for this gateway (chunked prefill), the same worker with
  chunking off (``--prefill-chunk 0``: mlx-lm's own scheduling, as before) and mlx_lm.server;
- right after the gateway's stall, a long prompt on the idle worker, and mlx-lm's
  ``stream_generate`` on a prompt of the same length and the same float32 weights in this process:
  prefill tokens/s of each (ratios taken round by round, then their median);
- throughput at concurrency 16 (bench/run.py's throughput requests), chunked against chunking
  off, alternating rounds.
Targets: worst gap <= 0.1 x the long prompt's prefill time; its time to first token <= 1.1 x on
the idle worker; prefill tokens/s >= 0.95 x stream_generate; c16 tokens/s >= 0.97 x before.

prefill_chunk (in process, no HTTP): the same stall on the engine for several chunk sizes:
the prefill's own tokens/s (mlx-lm's prompt counters), the stream's worst gap, the prompt's
time to first token; and stream_generate on the same prompt length.
"""

from __future__ import annotations

import json
import random
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from systems import MODEL, GatewayAndWorker, MlxLmServer, float32_copy, run_clients, stream_chat, summarize

LONG_PROMPT_TOKENS = 4000
# SmolLM2 counts on and on ("1234567890123…"), one visible digit per token: the stream outlasts
# any prefill here, and each of its tokens reaches the client as it is made (with a number per
# line, one token in six is held back by the detokenizer, and a client sees two steps as one gap).
STREAM_MESSAGES = [{"role": "user", "content": "Count from 1 to 100000, separated by spaces."}]
STREAM_WARMUP_TOKENS = 20
_WORDS = (
    "harbor lantern granite meadow copper violet thunder orchard canyon ember velvet glacier "
    "saddle quartz willow beacon cobalt falcon marble prairie tundra cinder lagoon juniper "
    "anchor basil crater dune fjord garnet hazel ivory jasper kelp lilac mesa nectar onyx "
    "pepper quill raven sable thistle umber vesper walnut yarrow zephyr amber birch cedar "
    "delta fable grove heron iris jade kestrel lotus maple nutmeg olive pebble quarry ridge "
    "spruce tulip upland valley wren alder bramble clover dahlia elm fern ginger heather "
    "indigo jetty kiln larch moss nettle oak poppy reed sorrel tansy urchin vale wicker"
).split()


def long_messages(tokenizer: Any, seed: int, target: int = LONG_PROMPT_TOKENS) -> list[dict]:
    """A user message of distinct words (shuffled by ``seed``) whose chat prompt is ~``target`` tokens."""
    rng = random.Random(seed)

    def messages(n: int) -> list[dict]:
        text = " ".join(rng.choice(_WORDS) for _ in range(n))
        rng.seed(seed)
        return [{"role": "user", "content": f"Request {seed}. Summarize: {text}"}]

    def count(n: int) -> int:
        return len(prompt_tokens(tokenizer, messages(n)))

    n = target
    for _ in range(4):  # a few proportional corrections land within a few tokens
        n = max(1, round(n * target / count(n)))
    return messages(n)


def prompt_tokens(tokenizer: Any, messages: list[dict]) -> list[int]:
    """The chat prompt's tokens, as the worker builds them (worker/prompts.py's PromptBuilder.tokenize)."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tokenizer.encode(text, add_special_tokens=False))


def _gaps_during(times: list[float], start: float, end: float) -> list[float]:
    """The gaps between consecutive tokens that overlap [start, end]."""
    return [b - a for a, b in zip(times, times[1:], strict=False) if b > start and a < end]


def _gap_figures(gaps: list[float], prefill_s: float) -> dict:
    if not gaps:
        return {"worst_gap_ms": None, "p99_gap_ms": None, "gaps": 0}
    worst = max(gaps)
    p99 = statistics.quantiles(gaps, n=100, method="inclusive")[98] if len(gaps) > 1 else worst
    return {"worst_gap_ms": round(worst * 1000, 1), "p99_gap_ms": round(p99 * 1000, 1), "gaps": len(gaps),
            "worst_gap_over_prefill": round(worst / prefill_s, 3)}


# --- over HTTP ---------------------------------------------------------------------------


def stall_over_http(base_url: str, model: str, long: list[dict]) -> dict:
    """One stream decoding; then ``long`` arrives. The stream's gaps while ``long`` is prefilled."""
    token_times: list[float] = []
    decoding, stop = threading.Event(), threading.Event()

    def stream() -> None:
        body = {"model": model, "messages": STREAM_MESSAGES, "max_tokens": 6000, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=1200) as r:
            for line in r.iter_lines():
                if stop.is_set():
                    return  # closing the stream cancels the request
                if line.startswith("data: {"):
                    choices = json.loads(line[6:]).get("choices") or [{}]
                    if (choices[0].get("delta") or {}).get("content"):
                        token_times.append(time.perf_counter())
                        if len(token_times) >= STREAM_WARMUP_TOKENS:
                            decoding.set()

    runner = threading.Thread(target=stream, daemon=True)
    runner.start()
    try:
        if not decoding.wait(600):
            raise RuntimeError("the decoding stream never started")
        result = long_request(base_url, model, long)
    finally:
        stop.set()
        runner.join(600)
    sent, first = result.pop("sent"), result.pop("first")
    result.update(_gap_figures(_gaps_during(token_times, sent, first), result["ttft_s"]))
    result["stream_outlasted_prefill"] = bool(token_times) and token_times[-1] >= first
    result["stream_tokens_during_prefill"] = sum(1 for t in token_times if sent < t <= first)
    return result


def long_request(base_url: str, model: str, long: list[dict]) -> dict:
    body = {"model": model, "messages": long, "max_tokens": 4, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    sent, first, prompt_tokens = time.perf_counter(), None, None
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=1200) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                choice = (chunk.get("choices") or [{}])[0]
                # The first token (the gateway's first chunk, with the role alone, comes at once).
                if first is None and ((choice.get("delta") or {}).get("content") or choice.get("finish_reason")):
                    first = time.perf_counter()
                if chunk.get("usage"):
                    prompt_tokens = chunk["usage"]["prompt_tokens"]
    if first is None:
        raise RuntimeError("the long prompt got no output")
    ttft = first - sent
    return {"sent": sent, "first": first, "ttft_s": round(ttft, 2), "prompt_tokens": prompt_tokens,
            "prefill_tokens_per_s": round(prompt_tokens / ttft, 1) if prompt_tokens else None}


def stream_generate_prefill(loaded: Any, long: list[dict]) -> dict:
    """mlx-lm's own single-sequence path on the same weights: time to its first token."""
    from mlx_lm.generate import stream_generate

    prompt = prompt_tokens(loaded.tokenizer, long)
    start = time.perf_counter()
    for _ in stream_generate(loaded.model, loaded.tokenizer, prompt, max_tokens=1):
        break
    ttft = time.perf_counter() - start
    return {"ttft_s": round(ttft, 2), "prompt_tokens": len(prompt), "prefill_tokens_per_s": round(len(prompt) / ttft, 1)}


def decode_stall(out: Path, rounds: int = 1, c16_rounds: int = 3) -> dict:
    from transformers import AutoTokenizer

    from worker.models import load, resolve

    model_dir, _ = resolve(MODEL)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    seeds = iter(range(1000, 1 << 30))

    def fresh() -> list[dict]:
        return long_messages(tokenizer, next(seeds))

    ours = GatewayAndWorker(out / "stall-chunked")
    before = GatewayAndWorker(out / "stall-unchunked", ("--prefill-chunk", "0"))
    server = MlxLmServer(float32_copy(model_dir, out / "smollm2-f32"), out / "mlx_lm-stall.log")
    targets = {"gateway": (ours.stack.base_url, MODEL), "gateway, chunking off": (before.stack.base_url, MODEL),
               "mlx_lm.server": (f"http://127.0.0.1:{server.port}", server.model)}
    loaded = load(MODEL)  # stream_generate's copy of the same float32 weights
    results: dict[str, Any] = {"stall": {name: [] for name in targets}, "idle": [], "stream_generate": [],
                               "c16": {"chunked": [], "before": []}}
    try:
        for system in (ours, before):  # warm up: first-call compilation, caches
            system.run(1, 1)
        stream_generate_prefill(loaded, long_messages(tokenizer, 1, 64))
        for round_ in range(rounds):
            # This machine's speed drifts by a fifth within minutes: what is compared is measured
            # back to back (the stall, then the same prompt length on the idle worker, then
            # stream_generate) and compared round by round.
            for name, (base, model) in targets.items():
                row = stall_over_http(base, model, fresh())
                results["stall"][name].append(row)
                print(f"stall round {round_} {name}: {row}", flush=True)
                if name != "gateway":
                    continue
                for label in ("idle", "stream_generate"):
                    if label == "idle":
                        row = long_request(ours.stack.base_url, MODEL, fresh())
                        row.pop("sent"), row.pop("first")
                    else:
                        row = stream_generate_prefill(loaded, fresh())
                    results[label].append(row)
                    print(f"{label} round {round_}: {row}", flush=True)
        for round_ in range(c16_rounds):
            for label, system in (("chunked", ours), ("before", before)) if round_ % 2 == 0 else (
                    ("before", before), ("chunked", ours)):
                samples, wall = run_clients(16, 2, lambda http, s=system: stream_chat(http, s.stack.base_url, MODEL))
                results["c16"][label].append(summarize(samples, wall))
                print(f"c16 round {round_} {label}: {results['c16'][label][-1]}", flush=True)
    finally:
        ours.stop()
        before.stop()
        server.stop()
    results["summary"] = summarize_stall(results)
    print(f"decode stall: {json.dumps(results['summary'], indent=1)}", flush=True)
    return results


def _median(rows: list[dict], key: str) -> float:
    return round(statistics.median(r[key] for r in rows if r.get(key) is not None), 3)


def summarize_stall(results: dict) -> dict:
    summary: dict[str, Any] = {}
    for name, rows in results["stall"].items():
        summary[name] = {k: _median(rows, k) for k in ("ttft_s", "worst_gap_ms", "p99_gap_ms", "worst_gap_over_prefill",
                                                       "prompt_tokens")}
        summary[name]["stream_outlasted_prefill"] = all(r["stream_outlasted_prefill"] for r in rows)
    summary["idle_ttft_s"] = _median(results["idle"], "ttft_s")
    # Medians of the rounds' own ratios (each round's figures were measured back to back).
    summary["ttft_over_idle"] = round(statistics.median(
        stall["ttft_s"] / idle["ttft_s"] for stall, idle in zip(results["stall"]["gateway"], results["idle"], strict=True)), 3)
    summary["prefill_tokens_per_s"] = {
        "worker": _median(results["idle"], "prefill_tokens_per_s"),
        "stream_generate": _median(results["stream_generate"], "prefill_tokens_per_s"),
        "ratio": round(statistics.median(ours["prefill_tokens_per_s"] / theirs["prefill_tokens_per_s"]
                                         for ours, theirs in zip(results["idle"], results["stream_generate"], strict=True)), 3),
    }
    chunked, before = (_median(results["c16"][k], "tokens_per_s") for k in ("chunked", "before"))
    summary["c16_tokens_per_s"] = {"chunked": chunked, "before": before, "ratio": round(chunked / before, 3)}
    return summary


# --- in process: the sweep behind the default chunk ---------------------------------------------


def engine_stall(loaded: Any, prefill_chunk: int, long: list[dict]) -> dict:
    """The stall on the engine itself (no HTTP): per-step timings, and the prefill's own time."""
    from protocol import Generate, SamplingParams
    from worker.engine import Engine

    greedy = SamplingParams(temperature=0.0)
    engine = Engine(loaded, prefill_chunk=prefill_chunk, prompt_cache_bytes=0)
    engine.submit(Generate("stream", messages=STREAM_MESSAGES, max_tokens=6000, sampling=greedy))
    token_times: list[float] = []
    while len(token_times) < STREAM_WARMUP_TOKENS:
        token_times += [time.perf_counter() for d in engine.step().deltas if d.request_id == "stream"]
    counters = engine._generator._counters
    prompt_time, prompt_tokens = counters.prompt_time, counters.prompt_tokens
    accepted = engine.submit(Generate("long", messages=long, max_tokens=2, sampling=greedy))
    sent, first, steps = time.perf_counter(), None, 0
    while first is None:
        result = engine.step()
        steps += 1
        now = time.perf_counter()
        token_times += [now for d in result.deltas if d.request_id == "stream"]
        if any(d.request_id == "long" for d in result.deltas):
            first = now
    ttft = first - sent
    prefill_tokens = counters.prompt_tokens - prompt_tokens
    row = {"chunk": prefill_chunk, "prompt_tokens": accepted.prompt_tokens, "ttft_s": round(ttft, 2), "steps": steps,
           "prefill_only_s": round(counters.prompt_time - prompt_time, 2),
           "prefill_tokens_per_s": round(prefill_tokens / (counters.prompt_time - prompt_time), 1)}
    row.update(_gap_figures(_gaps_during(token_times, sent, first), ttft))
    return row


def prefill_chunk_sweep(out: Path, sizes: tuple[int, ...] = (64, 128, 256, 512), rounds: int = 1) -> dict:
    from worker.models import load

    loaded = load(MODEL)
    seeds = iter(range(5000, 1 << 30))
    rows: dict[str, list[dict]] = {str(size): [] for size in sizes}
    rows["stream_generate"] = []
    engine_stall(loaded, sizes[0], long_messages(loaded.tokenizer, 1, 64))  # warm up
    for round_ in range(rounds):
        order = list(sizes) + ["stream_generate"]
        for size in order if round_ % 2 == 0 else order[::-1]:
            long = long_messages(loaded.tokenizer, next(seeds))
            row = stream_generate_prefill(loaded, long) if size == "stream_generate" else engine_stall(loaded, size, long)
            rows[str(size)].append(row)
            print(f"prefill chunk {size}: {row}", flush=True)
    return rows


def report_lines(results: dict) -> list[str]:
    lines: list[str] = []
    if "decode_stall" in results:
        s = results["decode_stall"]["summary"]
        lines += ["Decode stall (one stream decoding, then a ~4k-token prompt; medians over the rounds):", "",
                  "| system | long prompt TTFT s | stream's worst gap ms | p99 gap ms | worst gap / prefill |",
                  "|---|---|---|---|---|"]
        for name in ("gateway", "gateway, chunking off", "mlx_lm.server"):
            r = s[name]
            lines.append(f"| {name} | {r['ttft_s']} | {r['worst_gap_ms']} | {r['p99_gap_ms']} | "
                         f"{r['worst_gap_over_prefill']} |")
        p, c = s["prefill_tokens_per_s"], s["c16_tokens_per_s"]
        lines += ["", f"- long prompt on the idle worker: {s['idle_ttft_s']} s; during the stall "
                      f"{s['ttft_over_idle']}× that",
                  f"- prefill tokens/s: worker {p['worker']}, stream_generate {p['stream_generate']} ({p['ratio']}×)",
                  f"- concurrency 16: chunked {c['chunked']} tokens/s, chunking off {c['before']} ({c['ratio']}×)", ""]
    if "prefill_chunk" in results:
        lines += ["Prefill chunk sweep (in process):", "",
                  "| chunk | prompt tokens | TTFT s | steps | prefill tokens/s | worst gap ms | worst gap / prefill |",
                  "|---|---|---|---|---|---|---|"]
        for size, rows in results["prefill_chunk"].items():
            for r in rows:
                lines.append(f"| {size} | {r['prompt_tokens']} | {r['ttft_s']} | {r.get('steps', '')} | "
                             f"{r['prefill_tokens_per_s']} | {r.get('worst_gap_ms', '')} | "
                             f"{r.get('worst_gap_over_prefill', '')} |")
        lines.append("")
    return lines
