"""The benchmark's results as markdown (with the ratios the targets name) and a PNG plot."""

from __future__ import annotations

import statistics
from pathlib import Path

from stall import report_lines as stall_report_lines


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


def write_report(results: dict, out: Path, model: str) -> None:
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
    if "structured" in results:
        s = results["structured"]
        t = s["ttft_ms"]
        lines += [f"Structured output, {s['concurrency']} concurrent streams: constrained {s['constrained_tokens_per_s']} "
                  f"tokens/s, free {s['free_tokens_per_s']} tokens/s ({s['constrained_over_free']}×); "
                  f"{2 * s['concurrency']} at once, half constrained: constrained {s['mixed']['constrained']['tokens_per_s']}, "
                  f"free {s['mixed']['free']['tokens_per_s']} tokens/s. "
                  f"TTFT p50: free {t['free']} ms, cold schema {t['cold_schema']} ms, cached schema "
                  f"{t['cached_schema']} ms.", ""]
    lines += stall_report_lines(results)
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
        ax.set_title(f"{model}, {results['machine']}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "results.png", dpi=120)
