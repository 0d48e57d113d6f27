"""Benchmark: quantized KV caches for running sequences (``--kv-bits``) against unquantized.

    .venv/bin/python bench/kv_quantization.py [--model smollm2-135m] [--sequences 16]
        [--context 4000] [--prompt-tokens 4000] [--decode-tokens 64] [--bits 8,4] [--group-size 64]
        [--only memory,speed,agreement] [--out bench-results/kv_quantization.json]

1. memory: the KV bytes of ``--sequences`` running sequences of ``--context`` tokens each, in the
   batch caches the worker decodes with (``BatchKVCache``, ``BatchQuantizedKVCache``), filled
   with the model's own KV shapes (layers, KV heads, head dimension, dtype) at 8 and 4 bits and
   unquantized; and the bytes per 1,000 tokens of context, measured on a cache a token went
   through the model (``worker.quantized_cache.kv_bytes_per_token``).
2. speed: a ``--prompt-tokens`` prompt through the engine's generator (chunked prefill, 128-token
   chunks): prefill tokens/s; then ``--sequences`` sequences continuing it (its cache handed to
   each, as a prefix-cache hit is; each holds its own copy of the KV) and ``--decode-tokens``
   steps with all of them decoding: decode tokens/s at that concurrency. Unquantized and each
   ``--bits``, alternating (``--rounds``), the median of each.
3. agreement: 20 chat prompts, greedy, the first ``--decode-tokens`` tokens (to end of turn),
   batched 16 at a time, quantized against unquantized: per prompt, the share of the
   unquantized tokens that match up to the first difference; and how many prompts match whole.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO)]

from worker.blas import enable_fast_blas  # noqa: E402

BLAS = enable_fast_blas()  # before anything imports mlx

AGREEMENT_PROMPTS = [
    "What is the capital of France?",
    "Explain what a hash table is in two sentences.",
    "Write a haiku about the ocean.",
    "List three uses of Python.",
    "What is 17 times 23?",
    "Give me a recipe for pancakes.",
    "Why is the sky blue?",
    "Translate 'good morning' into Spanish and French.",
    "Write a Python function that reverses a string.",
    "What are the planets of the solar system?",
    "Summarize the plot of Romeo and Juliet.",
    "How do I make a cup of tea?",
    "What is the difference between a list and a tuple in Python?",
    "Tell me a short story about a robot who learns to paint.",
    "What causes the seasons on Earth?",
    "Explain recursion to a child.",
    "Name five famous scientists and what they discovered.",
    "What is photosynthesis?",
    "Write a SQL query that counts the rows of a table named users.",
    "Give three tips for writing clean code.",
]


def _load(model: str) -> Any:
    from worker.models import load

    return load(model)


def memory(loaded: Any, sequences: int, context: int, bits_list: list[int], group_size: int) -> dict[str, Any]:
    import mlx.core as mx
    from mlx_lm.models.cache import BatchKVCache

    from worker.quantized_cache import BatchQuantizedKVCache, kv_bytes_per_token

    model = loaded.model
    probe = model.make_cache() if hasattr(model, "make_cache") else None
    layers = len(probe) if probe is not None else len(model.layers)
    args = model.args
    heads = args.num_key_value_heads
    dim = getattr(args, "head_dim", None) or args.hidden_size // args.num_attention_heads
    dtype = model.model.embed_tokens.weight.dtype if hasattr(model, "model") else mx.float16
    # One layer filled (every layer of these models holds the same shapes), times the layers.
    keys = mx.random.normal((sequences, heads, context, dim)).astype(dtype)
    values = mx.random.normal((sequences, heads, context, dim)).astype(dtype)
    out: dict[str, Any] = {"sequences": sequences, "context": context, "layers": layers, "kv_heads": heads,
                           "head_dim": dim, "dtype": str(dtype)}
    plain = BatchKVCache([0] * sequences)
    plain.update_and_fetch(keys, values)
    mx.eval(plain.state)
    out["unquantized_bytes"] = plain.nbytes * layers
    out["unquantized_bytes_per_1000_tokens"] = round(1000 * kv_bytes_per_token(model))
    del plain
    for bits in bits_list:
        cache = BatchQuantizedKVCache([0] * sequences, group_size, bits)
        cache.update_and_fetch(keys, values)
        mx.eval(cache.state)
        out[f"kv{bits}_bytes"] = cache.nbytes * layers
        out[f"kv{bits}_ratio"] = round(cache.nbytes * layers / out["unquantized_bytes"], 4)
        out[f"kv{bits}_bytes_per_1000_tokens"] = round(1000 * kv_bytes_per_token(model, group_size, bits))
    if dtype != mx.float16:  # Metal runs models in float16/bfloat16: scales and biases take 2 bytes there
        keys, values = keys.astype(mx.float16), values.astype(mx.float16)
        plain = BatchKVCache([0] * sequences)
        plain.update_and_fetch(keys, values)
        mx.eval(plain.state)
        out["float16_unquantized_bytes"] = plain.nbytes * layers
        for bits in bits_list:
            cache = BatchQuantizedKVCache([0] * sequences, group_size, bits)
            cache.update_and_fetch(keys, values)
            mx.eval(cache.state)
            out[f"float16_kv{bits}_bytes"] = cache.nbytes * layers
            out[f"float16_kv{bits}_ratio"] = round(cache.nbytes / plain.nbytes, 4)
    return out


def _prompts(loaded: Any, sequences: int, tokens: int) -> list[list[int]]:
    """Distinct prompts of exactly ``tokens`` tokens (text repeated, cut; a number first so no two share a prefix)."""
    text = " ".join(AGREEMENT_PROMPTS)
    out = []
    for i in range(sequences):
        ids = loaded.tokenizer.encode(f"{i * 7919} " + text * (tokens // 200 + 2))
        out.append(ids[:tokens])
    return out


def speed_once(loaded: Any, prompt: list[int], sequences: int, decode_tokens: int, bits: int | None,
               group_size: int) -> dict[str, Any]:
    """Prefill: ``prompt`` alone through the engine's generator (128-token chunks), its tokens over
    the time to its first token. Decode: ``sequences`` sequences that each continue that prompt
    (its cache handed to each, as a prefix-cache hit is, then a few tokens of their own), then
    ``decode_tokens`` steps with all of them decoding: every sequence holds its own copy of the
    whole context's KV, as distinct prompts of that length would."""
    import mlx.core as mx

    from worker.batching import ChunkedBatchGenerator

    def generator() -> ChunkedBatchGenerator:
        return ChunkedBatchGenerator(loaded.model, prefill_chunk=128, kv_bits=bits, kv_group_size=group_size,
                                     completion_batch_size=sequences, prefill_batch_size=min(sequences, 8))

    first = generator()
    start = time.perf_counter()
    (uid,) = first.insert([prompt], max_tokens=[1 << 20])
    while not first.next()[1]:
        pass
    prefill_s = time.perf_counter() - start
    cache, _ = first.remove([uid], return_prompt_caches=True)[uid]
    first.close()
    mx.eval([c.state for c in cache])
    many = generator()
    suffixes = [loaded.tokenizer.encode(f" Part {i * 7919}:") for i in range(sequences)]
    uids = many.insert(suffixes, max_tokens=[1 << 20] * sequences, caches=[cache] * sequences)
    started: set[int] = set()
    while len(started) < len(uids):
        started.update(r.uid for r in many.next()[1])
    begin = time.perf_counter()
    generated = 0
    tokens: dict[int, list[int]] = {uid: [] for uid in uids}
    for _ in range(decode_tokens):
        responses = many.next()[1]
        generated += len(responses)
        for r in responses:
            tokens[r.uid].append(r.token)
    end = time.perf_counter()
    many.remove(uids)
    many.close()
    del cache
    mx.clear_cache()
    return {"prefill_tokens_per_s": len(prompt) / prefill_s, "decode_tokens_per_s": generated / (end - begin),
            "tokens": [tokens[uid] for uid in uids]}


def speed(loaded: Any, sequences: int, prompt_tokens: int, decode_tokens: int, bits_list: list[int],
          group_size: int, rounds: int) -> dict[str, Any]:
    (prompt,) = _prompts(loaded, 1, prompt_tokens)
    runs: dict[str, list[dict[str, Any]]] = {}
    configs: list[int | None] = [None, *bits_list]
    for _ in range(rounds):
        for bits in configs:
            name = "unquantized" if bits is None else f"kv{bits}"
            result = speed_once(loaded, prompt, sequences, decode_tokens, bits, group_size)
            print(f"  {name}: { {k: v for k, v in result.items() if k != 'tokens'} }", flush=True)
            runs.setdefault(name, []).append(result)
    out: dict[str, Any] = {"sequences": sequences, "prompt_tokens": prompt_tokens, "decode_tokens": decode_tokens,
                           "rounds": rounds}
    for name, results in runs.items():
        out[name] = {k: round(statistics.median(r[k] for r in results), 2) for k in results[0] if k != "tokens"}
    for bits in bits_list:  # each round's ratio (the machine's speed drifts between rounds), their median
        for k in ("prefill_tokens_per_s", "decode_tokens_per_s"):
            ratios = [q[k] / u[k] for q, u in zip(runs[f"kv{bits}"], runs["unquantized"], strict=True)]
            out[f"kv{bits}"][k.replace("tokens_per_s", "ratios")] = [round(r, 3) for r in ratios]
            out[f"kv{bits}"][k.replace("tokens_per_s", "ratio")] = round(statistics.median(ratios), 3)
        # Greedy agreement at this context, decoding attending as the worker would at this size:
        # the unquantized tokens matched up to the first difference, per sequence (first round).
        reference, quantized = runs["unquantized"][0]["tokens"], runs[f"kv{bits}"][0]["tokens"]
        out[f"kv{bits}"]["greedy_identical"] = sum(r == q for r, q in zip(reference, quantized, strict=True))
        out[f"kv{bits}"]["greedy_share"] = round(statistics.mean(_share(r, q) for r, q in zip(reference, quantized,
                                                                                              strict=True)), 3)
    return out


def _same_prefix(reference: list[int], got: list[int]) -> int:
    """Tokens alike up to the first difference (one ending its turn where the other goes on is one)."""
    return next((i for i, (a, b) in enumerate(zip(reference, got, strict=False)) if a != b),
                min(len(reference), len(got)))


def _share(reference: list[int], got: list[int]) -> float:
    """The share of ``reference`` matched up to the first difference."""
    return 1.0 if reference == got else _same_prefix(reference, got) / max(len(reference), 1)


def _greedy(loaded: Any, prompts: list[list[int]], tokens: int, bits: int | None, group_size: int) -> list[list[int]]:
    from worker.batching import ChunkedBatchGenerator

    eos = [[t] for t in loaded.tokenizer.eos_token_ids]
    generator = ChunkedBatchGenerator(loaded.model, prefill_chunk=128, kv_bits=bits, kv_group_size=group_size,
                                      completion_batch_size=16, prefill_batch_size=8, stop_tokens=eos)
    uids = generator.insert(prompts, max_tokens=[tokens] * len(prompts))
    out: dict[int, list[int]] = {uid: [] for uid in uids}
    while responses := generator.next_generated():
        for r in responses:
            out[r.uid].append(r.token)
    generator.close()
    return [out[uid] for uid in uids]


def agreement(loaded: Any, bits: int, tokens: int = 64, group_size: int = 64,
              reference: list[list[int]] | None = None) -> tuple[float, dict[str, Any]]:
    """(mean share of the unquantized tokens matched up to the first difference, details)."""
    prompts = _agreement_prompts(loaded)
    if reference is None:
        reference = _greedy(loaded, prompts, tokens, None, group_size)
    quantized = _greedy(loaded, prompts, tokens, bits, group_size)
    shares, first_difference = [], []
    for ref, got in zip(reference, quantized, strict=True):
        shares.append(_share(ref, got))
        first_difference.append(None if ref == got else _same_prefix(ref, got))
    identical = sum(r == q for r, q in zip(reference, quantized, strict=True))
    details = {"prompts": len(prompts), "tokens": tokens, "identical": identical,
               "mean_share": round(statistics.mean(shares), 4), "first_difference": first_difference,
               "teacher_forced": round(teacher_forced(loaded, bits, reference, group_size), 4)}
    return statistics.mean(shares), details


def teacher_forced(loaded: Any, bits: int | None, reference: list[list[int]], group_size: int = 64) -> float:
    """The share of the reference's tokens that are the quantized model's greedy pick when fed the
    reference itself (each position judged alone: one early difference does not decide the rest).
    Runs through the batched generator: a logits processor records each pick, then forces the
    reference's token."""
    import mlx.core as mx

    from worker.batching import ChunkedBatchGenerator

    prompts = _agreement_prompts(loaded)
    hits, total = 0, 0

    def forcing(ref: list[int]) -> Any:
        step = 0

        def processor(_context: Any, logits: mx.array) -> mx.array:
            nonlocal step, hits, total
            if step < len(ref):
                hits += int(mx.argmax(logits[0]).item() == ref[step])
                total += 1
            target = ref[min(step, len(ref) - 1)]
            step += 1
            mask = mx.arange(logits.shape[-1]) == target
            return mx.where(mask, mx.zeros_like(logits), mx.full(logits.shape, -mx.inf))

        return processor

    generator = ChunkedBatchGenerator(loaded.model, prefill_chunk=128, kv_bits=bits, kv_group_size=group_size,
                                      completion_batch_size=16, prefill_batch_size=8)
    generator.insert(prompts, max_tokens=[max(len(r), 1) for r in reference],
                     logits_processors=[[forcing(r)] for r in reference])
    while generator.next_generated():
        pass
    generator.close()
    return hits / max(total, 1)


def _agreement_prompts(loaded: Any) -> list[list[int]]:
    return [loaded.tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
            for p in AGREEMENT_PROMPTS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--context", type=int, default=4000, help="tokens per sequence, for the memory figures")
    parser.add_argument("--prompt-tokens", type=int, default=4000, help="tokens per prompt, for the speed figures")
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--bits", default="8,4")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--only", default="memory,speed,agreement")
    parser.add_argument("--out", type=Path, default=REPO / "bench-results" / "kv_quantization.json")
    args = parser.parse_args()
    bits_list = [int(b) for b in args.bits.split(",")]
    only = set(args.only.split(","))
    loaded = _load(args.model)
    results: dict[str, Any] = {"model": args.model, "blas": BLAS, "group_size": args.group_size}
    if "memory" in only:
        results["memory"] = memory(loaded, args.sequences, args.context, bits_list, args.group_size)
        print(json.dumps(results["memory"], indent=1), flush=True)
    if "speed" in only:
        results["speed"] = speed(loaded, args.sequences, args.prompt_tokens, args.decode_tokens, bits_list,
                                 args.group_size, args.rounds)
        print(json.dumps(results["speed"], indent=1), flush=True)
    if "agreement" in only:
        reference = _greedy(loaded, _agreement_prompts(loaded), args.decode_tokens, None, args.group_size)
        results["agreement"] = {"unquantized_teacher_forced": round(teacher_forced(loaded, None, reference), 4)}
        for bits in bits_list:
            _, details = agreement(loaded, bits, args.decode_tokens, args.group_size, reference)
            results["agreement"][f"kv{bits}"] = details
            print(f"agreement kv{bits}: {details}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
