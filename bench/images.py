"""Image request latency, split: preprocessing, vision encoder, prefill (issue 26).

    .venv/bin/python bench/images.py [--rounds 5] [--out bench-results]

In process, on the vision worker's engine (worker/vision.py) with the tiny random-weight LLaVA of
the tests (tests/tiny_vlm.py), in two sizes: a 56-pixel vision input (16 image tokens per image)
and a 224-pixel one (256 image tokens). For each, one request at a time, a fresh image each round
(nothing cached), the image sent at 64x64, 512x512 and 1024x1024 pixels (PNG of noise):

- ``preprocess``: on the prompt-builder thread: decoding the PNG, the chat template, the model's
  processor (resize, normalise, image token expansion), the virtual image ids;
- ``encode``: on the engine thread when the request is queued: the vision tower and projector;
- ``prefill``: from the request entering the batch to its first token (the whole prompt's
  prefill, image tokens included, then one decode step);
- ``cached``: the same request again: its image's features are in the feature table and its
  prompt in the prefix cache (encode 0; prefill of the last token only).

Medians over ``--rounds``. Writes images.json and images.md to --out and prints the table.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from worker.blas import enable_fast_blas  # noqa: E402

enable_fast_blas()

from protocol import Generate, SamplingParams  # noqa: E402


def noise_png(seed: int, side: int) -> bytes:
    import numpy as np
    from PIL import Image

    pixels = (np.random.default_rng(seed).random((side, side, 3)) * 255).astype("uint8")
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


def request(request_id: str, image: bytes) -> Generate:
    content = [{"type": "image", "data": image, "media_type": "image/png"},
               {"type": "text", "text": "What is in this picture? Answer in one word."}]
    return Generate(request_id, max_tokens=1, messages=[{"role": "user", "content": content}],
                    sampling=SamplingParams(temperature=0.0))


def timed(engine: Any, generate: Generate) -> dict[str, float]:
    """One request: (preprocess, encode, prefill to the first token) seconds, and its token counts."""
    from worker.engine import Sequence

    sequence = engine.prepare(generate)
    assert isinstance(sequence, Sequence), sequence
    started = time.perf_counter()
    engine.enqueue(sequence)
    queued = time.perf_counter()
    finished = None
    while engine.busy:
        result = engine.step()
        assert not result.errors, result.errors
        finished = next(iter(result.finished), finished)
    done = time.perf_counter()
    images = engine.timings[generate.request_id]
    assert finished is not None
    return {"preprocess": images.preprocess_s, "encode": images.encode_s,
            "prefill": done - queued, "enqueue": queued - started, "prompt_tokens": finished.prompt_tokens,
            "cached_tokens": finished.cached_tokens}


def run(model_dir: Path, sides: list[int], rounds: int) -> list[dict[str, Any]]:
    from worker.vision import VisionEngine, load_vision

    loaded = load_vision(str(model_dir), "bench")
    engine = VisionEngine(loaded, 4)
    timed(engine, request("warmup", noise_png(999, 64)))  # compiles, allocates
    rows = []
    for side in sides:
        fresh: list[dict[str, float]] = []
        cached: list[dict[str, float]] = []
        for r in range(rounds):
            image = noise_png(side * 1000 + r, side)
            fresh.append(timed(engine, request(f"{side}-{r}", image)))
            cached.append(timed(engine, request(f"{side}-{r}-again", image)))
        rows.append({
            "image": f"{side}x{side}",
            "png_bytes": len(noise_png(side * 1000, side)),
            "prompt_tokens": int(fresh[0]["prompt_tokens"]),
            **{f"{key}_ms": 1000 * statistics.median(row[key] for row in fresh)
               for key in ("preprocess", "encode", "prefill")},
            "cached_preprocess_ms": 1000 * statistics.median(row["preprocess"] for row in cached),
            "cached_encode_ms": 1000 * statistics.median(row["encode"] for row in cached),
            "cached_prefill_ms": 1000 * statistics.median(row["prefill"] for row in cached),
            "cached_tokens": int(cached[0]["cached_tokens"]),
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sides", default="64,512,1024", help="the images' sides in pixels")
    parser.add_argument("--out", type=Path, default=REPO / "bench-results")
    args = parser.parse_args()
    from tiny_vlm import write_tiny_vlm

    sides = [int(s) for s in args.sides.split(",")]
    results: dict[str, Any] = {"machine": f"{platform.system()} {platform.machine()}", "rounds": args.rounds,
                               "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for vision_side in (56, 224):
            model_dir = write_tiny_vlm(Path(tmp) / f"vlm-{vision_side}", vision_side)
            results["models"][f"tiny LLaVA, {vision_side}px vision input, {(vision_side // 14) ** 2} image tokens"] = \
                run(model_dir, sides, args.rounds)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "images.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [f"Image request latency, ms (median of {args.rounds}; {results['machine']}):", "",
             "| model | image | prompt tokens | preprocess | vision encoder | prefill to 1st token | "
             "same image again: encoder / prefill (cached tokens) |",
             "|---|---|---|---|---|---|---|"]
    for model, rows in results["models"].items():
        for row in rows:
            lines.append(f"| {model} | {row['image']} ({row['png_bytes'] // 1024} KB PNG) | {row['prompt_tokens']} | "
                         f"{row['preprocess_ms']:.1f} | {row['encode_ms']:.1f} | {row['prefill_ms']:.1f} | "
                         f"{row['cached_encode_ms']:.1f} / {row['cached_prefill_ms']:.1f} ({row['cached_tokens']}) |")
    table = "\n".join(lines) + "\n"
    (args.out / "images.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
