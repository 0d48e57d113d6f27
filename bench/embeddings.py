"""Embeddings per second through the gateway, at batch 1 and 32, against the model in process.

    .venv/bin/python bench/embeddings.py                    # the tiny BERT of the tests
    .venv/bin/python bench/embeddings.py --shape minilm     # random weights of all-MiniLM-L6-v2's size
    .venv/bin/python bench/embeddings.py --model DIR        # a real model directory (config.json, ...)

For each batch size B (1 and 32), the same inputs (sentences of about ``--words`` words):
- in process: ``EmbeddingModel.embed`` on B inputs, over and over (no HTTP, no ZeroMQ);
- through the gateway: one client sending requests of B inputs one after another (``httpx``,
  keep-alive, ``encoding_format: float``);
- batch 1 x 32 clients: 32 clients each sending one-input requests at once, which the worker
  batches across requests.
In-process calls and gateway requests alternate round by round, so a busy machine's noise falls
on both alike. Embeddings per second for each, and the gateway's overhead: the time a request
takes through the gateway minus the in-process time for the same batch (medians of the rounds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from worker.blas import enable_fast_blas  # noqa: E402

enable_fast_blas()

from processes import Stack  # noqa: E402

_WORDS = ("harbor lantern granite meadow copper violet thunder orchard canyon ember velvet glacier saddle quartz "
          "willow beacon cobalt falcon marble prairie tundra cinder lagoon juniper the quick brown fox jumps over "
          "the lazy dog capital of france paris embeddings map text to vectors").split()


def sentences(count: int, words: int) -> list[str]:
    return [" ".join(_WORDS[(i * 7 + j * 3) % len(_WORDS)] for j in range(words)) for i in range(count)]


def write_minilm_shape(out_dir: Path) -> Path:
    """Random weights of all-MiniLM-L6-v2's size (6 layers, 384 wide, 12 heads, 1536 MLP, a 512-token
    window), with the tests' WordPiece tokenizer: the compute of the real model, not its vectors."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_embeddings.models import bert
    from tiny_embedding_model import _word_piece_tokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = _word_piece_tokenizer(512)
    config = {"model_type": "bert", "architectures": ["BertModel"], "hidden_size": 384, "num_hidden_layers": 6,
              "num_attention_heads": 12, "intermediate_size": 1536, "max_position_embeddings": 512,
              "vocab_size": 30522, "type_vocab_size": 2, "layer_norm_eps": 1e-12, "hidden_act": "gelu"}
    mx.random.seed(0)
    model = bert.Model(bert.ModelArgs.from_dict(config))
    mx.save_safetensors(str(out_dir / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (out_dir / "config.json").write_text(json.dumps(config))
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


def timed_rounds(run: Any, rounds: int) -> list[float]:
    run()  # warm-up
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a model directory (default: a model written by --shape)")
    parser.add_argument("--shape", default="tiny", choices=["tiny", "minilm"])
    parser.add_argument("--words", type=int, default=12, help="words per input (default 12)")
    parser.add_argument("--rounds", type=int, default=30, help="requests (or in-process calls) per figure")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures here (JSON)")
    args = parser.parse_args()

    from worker.embeddings import EmbeddingModel

    workdir = Path(tempfile.mkdtemp(prefix="bench-embeddings-"))
    if args.model is not None:
        model_dir = Path(args.model)
    elif args.shape == "minilm":
        model_dir = write_minilm_shape(workdir / "minilm-shape")
    else:
        from tiny_embedding_model import write_tiny_bert

        model_dir = write_tiny_bert(workdir / "tiny-bert")
    model = EmbeddingModel.load(str(model_dir))
    texts = sentences(32, args.words)
    rows = {b: [model.wrap(model.tokenize(t), True)[0] for t in texts[:b]] for b in (1, 32)}
    tokens_per_input = statistics.mean(len(r) for r in rows[32])

    results: dict[str, Any] = {"model": str(model_dir) if args.model else args.shape, "dimensions": model.size,
                               "tokens_per_input": round(tokens_per_input, 1), "rounds": args.rounds}
    stack = Stack(workdir / "stack")
    stack.workdir.mkdir(parents=True, exist_ok=True)
    try:
        stack.start_gateway("--log-level", "warning")
        stack.start_worker(str(model_dir), "bench-embed", "--embedding", "--log-level", "warning")
        stack.wait_for_models("bench-embed")
        url = f"{stack.base_url}/v1/embeddings"
        with httpx.Client(timeout=120) as http:
            for b in (1, 32):
                body = {"model": "bench-embed", "input": texts[:b], "encoding_format": "float", "truncate": True}

                def send(body: dict[str, Any] = body) -> None:
                    reply = http.post(url, json=body)
                    reply.raise_for_status()

                # Alternating rounds: a busy machine's noise falls on both sides alike.
                local_times, gateway_times = [], []
                for _ in range(args.rounds):
                    local_times += timed_rounds(lambda b=b: model.embed(rows[b]), 1)[-1:]
                    gateway_times += timed_rounds(send, 1)[-1:]
                local_time, gateway_time = statistics.median(local_times), statistics.median(gateway_times)
                results[f"in_process_b{b}_per_s"] = round(b / local_time, 1)
                results[f"gateway_b{b}_per_s"] = round(b / gateway_time, 1)
                results[f"gateway_overhead_b{b}_ms"] = round((gateway_time - local_time) * 1000, 2)
                results[f"gateway_b{b}_request_ms"] = round(gateway_time * 1000, 2)
                results[f"in_process_b{b}_call_ms"] = round(local_time * 1000, 2)
        # 32 clients with one input each: the worker batches across requests.
        done = 0
        lock = threading.Lock()

        def client_loop(text: str, until: float) -> None:
            nonlocal done
            with httpx.Client(timeout=120) as http:
                body = {"model": "bench-embed", "input": text, "encoding_format": "float", "truncate": True}
                while time.perf_counter() < until:
                    http.post(url, json=body).raise_for_status()
                    with lock:
                        done += 1

        seconds = 5.0
        until = time.perf_counter() + seconds
        threads = [threading.Thread(target=client_loop, args=(t, until)) for t in texts]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        results["gateway_b1_x32_clients_per_s"] = round(done / (time.perf_counter() - started), 1)
    finally:
        stack.stop()
    print(json.dumps(results, indent=2))
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
