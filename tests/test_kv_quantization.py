"""Quantized KV caches for running sequences (``--kv-bits``; worker/quantized_cache.py, with
worker/batching.py): the batch cache's bookkeeping against mlx-lm's ``BatchKVCache``, batched
decoding against mlx-lm's own single-sequence ``QuantizedKVCache``, the prefix cache, memory per
token, a real worker, and (slow) SmolLM2's greedy agreement with unquantized decoding.

mx.quantize groups along the head dimension, so a token's quantized key depends on that token
alone: with the same bits, a batched, padded, chunked, trimmed cache must give exactly what one
sequence's whole-prompt cache gives. Everything here but the SmolLM2 test is exact.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from test_engine import GREEDY, run

from protocol import Accepted, Generate
from worker import quantized_attention
from worker.engine import Engine

CONTEXT = 4096
PROMPTS = ["What is the capital of France? " * 6, "Write a poem about the sea.", "def add(a, b):\n" * 12, "Hi"]
# SmolLM2-135M (float32, this CPU), bench/kv_quantization.py's 20 prompts, the first 64 greedy tokens,
# group size 64. Fed the unquantized output, the quantized cache picks the same token at 0.986-0.987
# of the positions with 8 bits and 0.80 with 4 (teacher-forced: each position judged alone). Left
# free, one near-tie flipped changes the rest of a reply (two prompts' top two logits are 0.1 apart,
# and 8-bit keys move them by as much): 8-9 of 20 replies identical with 8 bits, the unquantized
# tokens matched up to the first difference 0.68-0.69 on average; 4 bits, none and 0.05. Thresholds
# sit below with room for another BLAS's rounding.
SMOLLM2_TEACHER_FORCED = {8: 0.95, 4: 0.7}
SMOLLM2_FREE_RUNNING_SHARE = {8: 0.5, 4: 0.0}


@pytest.fixture(scope="module")
def kv_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random-weight model with a 64-wide head (the plain one's 16 is narrower than
    mx.quantize's smallest group, 32)."""
    import mlx.core as mx
    from tiny_model import build_tokenizer, model_config, random_weights

    out = tmp_path_factory.mktemp("tiny-kv") / "model"
    out.mkdir()
    tokenizer = build_tokenizer()
    config = model_config(len(tokenizer), tokenizer.convert_tokens_to_ids("<|im_end|>"), CONTEXT)
    config["head_dim"] = 64
    mx.save_safetensors(str(out / "model.safetensors"), random_weights(config), metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def kv_model(kv_model_dir: Path):
    from worker.models import load

    return load(str(kv_model_dir), "tiny-kv", CONTEXT)


def chat(request_id: str, text: str, max_tokens: int = 10, **kwargs) -> Generate:
    return Generate(request_id, messages=[{"role": "user", "content": text}], max_tokens=max_tokens,
                    sampling=GREEDY, **kwargs)


def single_sequence_tokens(model, prompt: list[int], n: int, bits: int, group_size: int = 64) -> list[int]:
    """Greedy tokens from mlx-lm's own ``QuantizedKVCache``: one sequence, the whole prompt at once."""
    import mlx.core as mx
    from mlx_lm.models.cache import QuantizedKVCache

    cache = [QuantizedKVCache(group_size=group_size, bits=bits) for _ in model.layers]
    logits = model(mx.array([prompt]), cache=cache)
    out: list[int] = []
    for _ in range(n):
        token = int(mx.argmax(logits[0, -1]).item())
        out.append(token)
        logits = model(mx.array([[token]]), cache=cache)
    return out


def generated(generator, prompts: list[list[int]], n: int) -> list[list[int]]:
    uids = generator.insert(prompts, max_tokens=[n] * len(prompts))
    out: dict[int, list[int]] = {uid: [] for uid in uids}
    while responses := generator.next_generated():
        for r in responses:
            out[r.uid].append(r.token)
    return [out[uid] for uid in uids]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("chunks", [False, True])
def test_batched_chunked_quantized_decoding_is_mlx_lms_single_sequence_quantized_cache(kv_model, bits, chunks,
                                                                                        monkeypatch):
    """Four prompts of different lengths (left padding), prefilled in 24-token chunks beside
    decoding (right padding, rolled), joining and leaving the batch: each gets exactly the tokens
    mlx-lm's own one-sequence quantized cache gives it, whether decoding attends to the cache
    dequantized whole (a small cache, on the CPU) or in chunks (a large one)."""
    from worker.batching import ChunkedBatchGenerator, KVQuantizedBatchGenerator

    prompts = [kv_model.tokenizer.encode(p) for p in PROMPTS]
    alone = [single_sequence_tokens(kv_model.model, p, 12, bits) for p in prompts]
    if chunks:
        monkeypatch.setattr(quantized_attention, "DEQUANTIZED_BYTES", 0)
    chunked = generated(ChunkedBatchGenerator(kv_model.model, prefill_chunk=24, kv_bits=bits), prompts, 12)
    unchunked = generated(KVQuantizedBatchGenerator(kv_model.model, kv_bits=bits, prefill_step_size=512), prompts, 12)
    assert chunked == alone
    assert unchunked == alone


def test_the_batch_cache_keeps_positions_masks_and_trimming_exactly_as_mlx_lms(kv_model):
    """The same operations on a BatchQuantizedKVCache and mlx-lm's BatchKVCache: equal offsets,
    left padding, write index and masks, and keys that are the unquantized ones quantized."""
    import mlx.core as mx
    from mlx_lm.models.cache import BatchKVCache, KVCache

    from worker.quantized_cache import BatchQuantizedKVCache, QuantizedKVCache

    mx.random.seed(3)
    g, bits = 64, 8

    def single(n: int) -> tuple[KVCache, QuantizedKVCache]:
        plain, quantized = KVCache(), QuantizedKVCache(group_size=g, bits=bits)
        k, v = mx.random.normal((1, 2, n, 64)), mx.random.normal((1, 2, n, 64))
        plain.update_and_fetch(k, v)
        quantized.update_and_fetch(k, v)
        return plain, quantized

    def check(plain: BatchKVCache, quantized: BatchQuantizedKVCache) -> None:
        assert quantized.offset.tolist() == plain.offset.tolist()
        assert quantized.left_padding.tolist() == plain.left_padding.tolist()
        assert quantized._idx == plain._idx
        for n in (1, 5):
            assert mx.array_equal(quantized.make_mask(n), plain.make_mask(n))
        (qk, qv), (k, v) = quantized.keys_and_values(), plain.keys_and_values()
        for q, x in ((qk, k), (qv, v)):
            restored = mx.dequantize(*q, group_size=g, bits=bits)
            expected = mx.dequantize(*mx.quantize(x, group_size=g, bits=bits), group_size=g, bits=bits)
            assert mx.array_equal(restored, expected)

    pairs = [single(n) for n in (7, 300, 1)]
    plain, quantized = BatchKVCache.merge([p for p, _ in pairs]), QuantizedKVCache.merge([q for _, q in pairs])
    assert isinstance(quantized, BatchQuantizedKVCache)
    check(plain, quantized)
    # A chunk of different lengths: right-padded, then rolled into left padding.
    for c in (plain, quantized):
        c.prepare(lengths=[3, 1, 2], right_padding=[0, 2, 1])
    k, v = mx.random.normal((3, 2, 3, 64)), mx.random.normal((3, 2, 3, 64))
    plain.update_and_fetch(k, v)
    quantized.update_and_fetch(k, v)
    for c in (plain, quantized):
        c.finalize()
    check(plain, quantized)
    # Decode steps, a trim, a filter (drops the longest row: the shared padding goes), an extend.
    for _ in range(3):
        k, v = mx.random.normal((3, 2, 1, 64)), mx.random.normal((3, 2, 1, 64))
        plain.update_and_fetch(k, v)
        quantized.update_and_fetch(k, v)
    assert quantized.trim(2) == plain.trim(2)
    check(plain, quantized)
    plain.filter([0, 2])
    quantized.filter([0, 2])
    check(plain, quantized)
    more = [single(n) for n in (40, 2)]
    plain.extend(BatchKVCache.merge([p for p, _ in more]))
    quantized.extend(QuantizedKVCache.merge([q for _, q in more]))
    check(plain, quantized)
    # A row extracted is mlx-lm's QuantizedKVCache, of the row's own length.
    row = quantized.extract(1)
    assert type(row).__name__ == "QuantizedKVCache" and row.size() == plain.extract(1).offset
    assert quantized.nbytes < plain.nbytes * 0.3  # float32 here: (64 + 2 × 4) / 256 bytes per value pair


def test_the_fast_dequantize_is_mlxs_bit_for_bit():
    import mlx.core as mx

    from worker.quantized_cache import dequantize

    x = mx.random.normal((2, 3, 40, 128))
    for bits in (8, 4, 6):
        for group_size in (32, 64, 128):
            triple = mx.quantize(x, group_size=group_size, bits=bits)
            expected = mx.dequantize(*triple, group_size=group_size, bits=bits)
            assert mx.array_equal(dequantize(triple, group_size, bits), expected)


def test_an_extracted_cache_round_trips_through_mlx_lms_prompt_cache_files(kv_model, tmp_path):
    """Saved with mlx-lm's save_prompt_cache and loaded as mlx-lm's own QuantizedKVCache, a
    sequence's cache merges back into a batch and continues as before."""
    from mlx_lm.models.cache import QuantizedKVCache as MlxQuantizedKVCache
    from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache

    from worker.batching import ChunkedBatchGenerator

    prompt = kv_model.tokenizer.encode(PROMPTS[0])
    caught: dict = {}
    generator = ChunkedBatchGenerator(kv_model.model, prefill_chunk=16, kv_bits=8,
                                      prompt_done=lambda uids: caught.update(
                                          {uid: (c, list(t)) for uid, (c, t) in generator.extract_cache(uids).items()}))
    generator.insert([prompt], max_tokens=[4])
    while not caught:
        generator.next_generated()
    cache, tokens = next(iter(caught.values()))
    assert tokens == prompt
    path = str(tmp_path / "cache.safetensors")
    save_prompt_cache(path, cache)
    loaded = load_prompt_cache(path)
    assert all(type(c) is MlxQuantizedKVCache for c in loaded)
    resumed = ChunkedBatchGenerator(kv_model.model, prefill_chunk=16, kv_bits=8)
    # The cache holds the whole prompt: trim its last token and let the model see it again.
    for c in loaded:
        c.trim(1)
    out = resumed.insert([prompt[-1:]], max_tokens=[8], caches=[loaded], all_tokens=[prompt[:-1]])
    tokens_out: list[int] = []
    while responses := resumed.next_generated():
        tokens_out += [r.token for r in responses if r.uid == out[0]]
    assert tokens_out == single_sequence_tokens(kv_model.model, prompt, 8, 8)


@pytest.mark.parametrize("chunk", [24, 0])
def test_prefix_cache_hits_give_the_same_output_as_a_full_quantized_prefill(kv_model, chunk):
    """A conversation's next turn reuses its quantized prefix (trimmed to where the prompts part)
    and writes what a fresh prefill writes; with chunked prefill and mlx-lm's own."""
    first = "Tell me about the sea and the sky. " * 4
    second = first + "And the stars?"
    cached = Engine(kv_model, prefill_chunk=chunk, kv_bits=8)
    run(cached, chat("warm", first))
    texts, done = run(cached, chat("next", second), chat("again", first))
    fresh = {}
    for request_id, text in (("next", second), ("again", first)):
        t, _ = run(Engine(kv_model, prefill_chunk=chunk, kv_bits=8, prompt_cache_bytes=0), chat(request_id, text))
        fresh.update(t)
    assert done["next"].cached_tokens > 20 and done["again"].cached_tokens >= done["again"].prompt_tokens - 1
    assert texts == fresh
    assert all(type(c).__name__ == "QuantizedKVCache" for entry in _entries(cached) for c in entry)


def _entries(engine: Engine) -> list[list]:
    """The prefix cache's entries (mlx-lm's LRUPromptCache, read from its trie)."""
    assert engine.prefix_cache is not None
    lru = engine.prefix_cache._cache
    return [lru._trie.get(model, tokens).prompt_cache for queue in lru._lru._lrus.values() for model, tokens in queue]


@pytest.mark.parametrize("bits", [8, 4])
def test_running_sequences_take_the_memory_per_token_their_bits_ask(kv_model, bits):
    """Sixteen sequences decoding: the batch's KV bytes against the same batch unquantized are
    (head_dim × bits / 8 + 2 scales × 4 bytes per group) / (head_dim × 4 bytes) (float32 model)."""
    from worker.quantized_cache import kv_bytes_per_token

    def running_bytes(**kwargs) -> int:
        engine = Engine(kv_model, max_sequences=16, **kwargs)
        for i in range(16):
            assert isinstance(engine.submit(chat(str(i), f"Sequence {i}: " + "the sea " * (20 + i), 40)), Accepted)
        for _ in range(200):
            engine.step()
            if engine._generator._generation_batch.uids and len(engine._generator._generation_batch) == 16:
                break
        return engine._generator.prompt_cache_nbytes

    quantized, plain = running_bytes(kv_bits=bits), running_bytes()
    expected = (64 * bits / 8 + 2 * 4) / (64 * 4)
    assert quantized / plain == pytest.approx(expected, rel=1e-6)
    assert kv_bytes_per_token(kv_model.model, 64, bits) / kv_bytes_per_token(kv_model.model) == pytest.approx(expected)


def test_kv_bits_are_refused_where_the_heads_cannot_be_grouped(tiny_model, kv_model):
    with pytest.raises(ValueError, match="head dimension 16"):
        Engine(tiny_model, kv_bits=8)
    with pytest.raises(ValueError, match="--kv-bits"):
        Engine(kv_model, kv_bits=7)
    with pytest.raises(ValueError, match="--kv-group-size"):
        Engine(kv_model, kv_bits=8, kv_group_size=48)


def test_a_worker_asked_for_kv_bits_its_model_cannot_take_exits_with_an_error(tiny_model_dir, capfd):
    from worker.cli import main

    assert main(["--model", str(tiny_model_dir), "--kv-bits", "8", "--gateway", "ipc:///tmp/mlxgw-kv-test.sock"]) == 2
    assert "head dimension 16" in capfd.readouterr().err


def test_unquantized_engines_are_unchanged(kv_model):
    """Without --kv-bits the generator and its caches are mlx-lm's as before."""
    from mlx_lm.models.cache import BatchKVCache

    engine = Engine(kv_model)
    assert engine._generator.kv_bits is None
    run(engine, chat("a", "Hello"))
    assert all(type(c).__name__ == "KVCache" for entry in _entries(engine) for c in entry)
    engine.submit(chat("b", "Hello there, how are you?", 30))
    for _ in range(5):
        engine.step()
    assert all(type(c) is BatchKVCache for c in engine._generator._generation_batch.prompt_cache)


def test_a_real_worker_serves_with_quantized_kv_and_reports_its_memory_per_token(fresh_stack, kv_model_dir):
    """Through the gateway, a worker started with --kv-bits 8 answers, batches, reuses its prefix
    cache, and logs its KV bytes per 1,000 tokens: 8 bits' share of the unquantized figure."""
    import httpx

    fresh_stack.start_gateway()
    worker = fresh_stack.start_worker(str(kv_model_dir), "tiny-kv", "--kv-bits", "8", "--context-length", str(CONTEXT),
                                      "--prefill-chunk", "32")
    fresh_stack.wait_for_models("tiny-kv")
    body = {"model": "tiny-kv", "messages": [{"role": "user", "content": "The sea and the sky. " * 10}],
            "max_tokens": 8, "temperature": 0}
    with httpx.Client(base_url=fresh_stack.base_url, timeout=60) as client:
        first = client.post("/v1/chat/completions", json=body)
        second = client.post("/v1/chat/completions", json=body)
    assert first.status_code == 200 and second.status_code == 200
    assert first.json()["choices"][0]["message"]["content"] == second.json()["choices"][0]["message"]["content"]
    assert second.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    found = re.search(r"KV cache: 8 bits in groups of 64, (\d+) bytes per 1,000 tokens of context \(unquantized: (\d+)\)",
                      worker.log())
    assert found, worker.log()
    quantized, plain = map(int, found.groups())
    assert quantized / plain == pytest.approx((64 + 8) / 256, rel=1e-3)


@pytest.mark.slow
def test_smollm2_greedy_output_mostly_agrees_with_unquantized():
    """bench/kv_quantization.py's agreement on SmolLM2-135M over its 20 prompts, first 64 greedy tokens:
    the quantized cache's pick fed the unquantized output (teacher-forced), and the share of the
    unquantized tokens matched up to each reply's first difference."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    from kv_quantization import agreement

    from worker.models import load

    loaded = load("smollm2-135m")
    for bits, threshold in SMOLLM2_TEACHER_FORCED.items():
        share, details = agreement(loaded, bits, tokens=64)
        assert details["teacher_forced"] >= threshold, (bits, details)
        assert share >= SMOLLM2_FREE_RUNNING_SHARE[bits], (bits, details)


# mlx-lm 0.32.2 sources that worker/quantized_cache.py mirrors (BatchKVCache's bookkeeping), subclasses
# (QuantizedKVCache) or relies on (the attention's dispatch on a cache's ``bits``, the quantized
# attention, batch merging, masks). When an upgrade changes one, carry the change into
# worker/quantized_cache.py and record the new hash here (MLX's quantized layout is pinned by
# test_the_fast_dequantize_is_mlxs_bit_for_bit; the batching itself by tests/test_batching.py).
MLX_LM_SOURCES = {
    "BatchKVCache.__init__": "597e88a6f035b035",
    "BatchKVCache.update_and_fetch": "d099a9c8781d7d67",
    "BatchKVCache.prepare": "86bc845de708c274",
    "BatchKVCache.finalize": "6f06abded406dab4",
    "BatchKVCache.trim": "6432d5408a453ced",
    "BatchKVCache.make_mask": "17cab343ff407f6c",
    "BatchKVCache.filter": "d7a4d2b5a763bc69",
    "BatchKVCache.extend": "672663f4062ad142",
    "BatchKVCache.extract": "1da09ad23757559e",
    "BatchKVCache.merge": "b35ecc517f9540d3",
    "QuantizedKVCache.__init__": "553de455675480a0",
    "QuantizedKVCache.update_and_fetch": "e078860718ecc4ac",
    "QuantizedKVCache.state": "34c72d8b7ab1470e",
    "QuantizedKVCache.trim": "8e020b3f950f96a9",
    "_merge_caches": "999fa426a0a52b9d",
    "scaled_dot_product_attention": "8deba4a8a8fb4e29",
    "quantized_scaled_dot_product_attention": "f42bc5d039926033",
    "create_causal_mask": "e99d5e475b029fdf",
    "make_prompt_cache": "ae8ee8ce5ac69f2a",
    "GenerationBatch.extend": "4019e7eaf5d6782f",
    "GenerationBatch.filter": "27a2165cf672969f",
}


def test_mlx_lm_internals_are_the_ones_the_quantized_cache_was_written_for():
    import hashlib
    import importlib
    import inspect

    modules = [importlib.import_module(m) for m in ("mlx_lm.generate", "mlx_lm.models.cache", "mlx_lm.models.base")]
    changed = []
    for name, digest in MLX_LM_SOURCES.items():
        owner, _, method = name.rpartition(".")
        holder = next(getattr(m, owner or method) for m in modules if hasattr(m, owner or method))
        source = getattr(holder, method) if owner else holder
        if source is quantized_attention.quantized_attention:  # installed over mlx-lm's
            source = quantized_attention._mlx_quantized_attention
        if isinstance(source, property):
            source = source.fget
        if hashlib.sha256(inspect.getsource(source).encode()).hexdigest()[:16] != digest:
            changed.append(name)
    assert not changed, f"mlx-lm changed {changed}: check worker/quantized_cache.py, then update MLX_LM_SOURCES"


def test_mlx_lms_attention_over_a_quantized_cache_takes_the_cpu_path(kv_model, monkeypatch):
    """Every model's attention reaches worker/quantized_attention.py through mlx-lm's
    ``scaled_dot_product_attention`` (it looks the quantized function up in its module at each
    call): a decode step over a BatchQuantizedKVCache on the CPU runs ``chunked_attention``."""
    import mlx.core as mx

    from worker.quantized_cache import BatchQuantizedKVCache

    calls: list[tuple] = []
    original = quantized_attention.chunked_attention

    def counting(queries, *args, **kwargs):
        calls.append(queries.shape)
        return original(queries, *args, **kwargs)

    monkeypatch.setattr(quantized_attention, "chunked_attention", counting)
    model = kv_model.model
    cache = [BatchQuantizedKVCache([0, 2], bits=8) for _ in model.layers]
    wide = quantized_attention.WIDEST + 1
    model(mx.array([[5] * wide, [0, 0] + [8] * (wide - 2)]), cache=cache)  # a prefill chunk: MLX's fused attention
    model(mx.array([[9], [10]]), cache=cache)  # a small cache: dequantized whole, fused attention too
    assert not calls
    monkeypatch.setattr(quantized_attention, "DEQUANTIZED_BYTES", 2 * wide * 64 * 4 * 2 * 2)  # 2 heads
    assert quantized_attention.chunks_pay(1, 2, 2, wide + 2, 64)
    model(mx.array([[9], [10]]), cache=cache)
    model(mx.array([[9, 4, 3], [10, 4, 3]]), cache=cache)  # a speculative step
    assert [shape[2] for shape in calls] == [1] * len(model.layers) + [3] * len(model.layers)


@pytest.mark.parametrize("bits,group_size,head_dim,chunk_heads", [(8, 64, 64, 15), (4, 64, 64, 9), (8, 32, 64, 6),
                                                                  (4, 32, 128, 2), (8, 64, 128, 1), (8, 64, 64, 4)])
@pytest.mark.parametrize("queries", [1, 5])
def test_chunked_attention_is_attention_over_the_dequantized_cache(bits, group_size, head_dim, chunk_heads,
                                                                     queries, monkeypatch):
    """Scores and outputs equal MLX's attention over the dequantized keys and values (float32
    rounding apart): grouped-query heads, several groups per head, 8 and 4 bits, left-padding masks
    and causal masks over a speculative step's several positions, chunks of ``chunk_heads`` heads'
    codes: the whole batch, rows that do not divide it, heads of one row that do not divide it."""
    import mlx.core as mx

    mx.random.seed(1)
    batch, kv_heads, repeats, length = 5, 3, 2, 40
    q = mx.random.normal((batch, kv_heads * repeats, queries, head_dim))
    k = mx.random.normal((batch, kv_heads, length, head_dim))
    v = mx.random.normal((batch, kv_heads, length, head_dim))
    qk = mx.quantize(k, group_size=group_size, bits=bits)
    qv = mx.quantize(v, group_size=group_size, bits=bits)
    dk = mx.dequantize(*qk, group_size=group_size, bits=bits)
    dv = mx.dequantize(*qv, group_size=group_size, bits=bits)
    padding = mx.array([0, 3, 7, 1, 12])
    positions = mx.arange(length)
    mask = (positions[None, :] >= padding[:, None])[:, None, None, :]  # [B, 1, 1, T]
    causal = mx.arange(length - queries, length)[:, None] >= positions[None]
    mask = mask & causal[None, None]  # [B, 1, L, T]
    scale = head_dim ** -0.5
    monkeypatch.setattr(quantized_attention, "CHUNK_BYTES", length * head_dim * 4 * chunk_heads)
    expected = mx.fast.scaled_dot_product_attention(q, dk, dv, scale=scale, mask=mask)
    got = quantized_attention.chunked_attention(q, qk, qv, scale, mask, group_size, bits)
    assert got.shape == expected.shape
    assert mx.allclose(got, expected, atol=2e-4, rtol=1e-4).item()
    unmasked = quantized_attention.chunked_attention(q, qk, qv, scale, None, group_size, bits)
    reference = mx.fast.scaled_dot_product_attention(q, dk, dv, scale=scale, mask=None)
    assert mx.allclose(unmasked, reference, atol=2e-4, rtol=1e-4).item()
