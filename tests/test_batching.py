"""Chunked prefill interleaved with decoding (worker/batching.py), on the tiny random-weight model.

Everything here counts engine steps and tokens, never wall time.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import shutil
import time
from pathlib import Path

import pytest

from protocol import Accepted, Generate, SamplingParams
from worker.engine import Engine

GREEDY = SamplingParams(temperature=0.0)
CONTEXT = 4096  # the tiny model's RoPE has no limit of its own: room for prompts that take many chunks


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path):
    from worker.models import load

    return load(str(tiny_model_dir), "tiny", CONTEXT)


@pytest.fixture(scope="module")
def sliding_model(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The tiny model with a 24-token sliding window on its first layer (RotatingKVCache), as
    Gemma 3 and gpt-oss mix sliding and full layers."""
    from worker.models import load

    model_dir = tmp_path_factory.mktemp("tiny-sliding") / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config.update(layer_types=["sliding_attention", "full_attention"], sliding_window=24)
    (model_dir / "config.json").write_text(json.dumps(config))
    loaded = load(str(model_dir), "tiny-sliding", CONTEXT)
    from mlx_lm.models.cache import RotatingKVCache

    assert isinstance(loaded.model.make_cache()[0], RotatingKVCache)
    return loaded


def chat(request_id: str, text: str, max_tokens: int = 10, **kwargs) -> Generate:
    return Generate(request_id, messages=[{"role": "user", "content": text}], max_tokens=max_tokens,
                    sampling=GREEDY, **kwargs)


class Recorder:
    """Drives an engine step by step and records what each step produced."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.texts: dict[str, str] = {}
        self.finished: dict = {}
        self.errors: dict = {}
        self.steps = 0
        self.first_token_step: dict[str, int] = {}
        self.tokens_at: dict[str, list[int]] = {}  # request id -> the steps that gave it a token

    def submit(self, *requests: Generate) -> None:
        for request in requests:
            assert isinstance(self.engine.submit(request), Accepted)
            self.texts[request.request_id] = ""

    def step(self) -> None:
        result = self.engine.step()
        self.steps += 1
        for delta in result.deltas:
            self.texts[delta.request_id] += delta.text
            self.first_token_step.setdefault(delta.request_id, self.steps)
            self.tokens_at.setdefault(delta.request_id, []).append(self.steps)
        self.finished.update({f.request_id: f for f in result.finished})
        self.errors.update({e.request_id: e for e in result.errors})

    def run(self, max_steps: int = 20_000) -> Recorder:
        for _ in range(max_steps):
            if not self.engine.busy:
                return self
            self.step()
        raise AssertionError("the engine did not finish")

    def until(self, condition, max_steps: int = 20_000) -> None:
        """Step until ``condition(self)``."""
        for _ in range(max_steps):
            if condition(self):
                return
            self.step()
        raise AssertionError("never happened")


def outputs(engine: Engine, *requests: Generate) -> tuple[dict[str, str], dict]:
    recorder = Recorder(engine)
    recorder.submit(*requests)
    recorder.run()
    assert not recorder.errors
    return recorder.texts, recorder.finished


def words(n: int, seed: int = 0) -> str:
    """n distinct-ish words (no two prompts of different seeds share more than the template)."""
    return " ".join(f"w{seed}x{i * 7919 % 1000}" for i in range(n))


# Prompt lengths from 1 chunk to many, crossing chunk boundaries at every size below.
PROMPTS = ["Hi", "The quick brown fox jumps over the lazy dog. " * 6, words(40, 1), words(120, 2)]


@pytest.mark.parametrize("chunk", [2, 7, 64, 1000, None])  # None: auto, sized from step times
def test_greedy_output_is_the_same_with_and_without_chunking(model, chunk):
    requests = [chat(f"r{i}", p) for i, p in enumerate(PROMPTS)]
    unchunked, _ = outputs(Engine(model, prefill_chunk=0, prompt_cache_bytes=0), *requests)
    assert len(set(unchunked.values())) == len(PROMPTS)
    # Without the prefix cache, all at once, then one at a time.
    together, _ = outputs(Engine(model, prefill_chunk=chunk, prompt_cache_bytes=0), *requests)
    assert together == unchunked
    alone = {}
    for request in requests:
        alone.update(outputs(Engine(model, prefill_chunk=chunk, prompt_cache_bytes=0), request)[0])
    assert alone == unchunked
    # With the prefix cache: a second round hits every prompt (all but its last token), and a
    # prompt whose message extends another's reuses that one's cache up to where they part.
    engine = Engine(model, prefill_chunk=chunk)
    first, _ = outputs(engine, *requests)
    again, done = outputs(engine, *[chat(f"again{i}", p) for i, p in enumerate(PROMPTS)])
    assert first == unchunked
    assert list(again.values()) == list(unchunked.values())
    assert all(f.cached_tokens == f.prompt_tokens - 1 for f in done.values())
    longer = chat("longer", PROMPTS[3] + " and more words after it", max_tokens=10)
    hit, done = outputs(engine, longer)
    assert done["longer"].cached_tokens > 500
    assert hit == outputs(Engine(model, prefill_chunk=0, prompt_cache_bytes=0), longer)[0]


def test_chunk_sizer_holds_each_chunk_near_its_decode_steps_as_attention_grows():
    """The sizer against a prompt whose tokens cost more the later they come (attention): every
    chunk after a short ramp takes about ``decode_steps`` decode steps, so the prompt needs far
    fewer chunks than fixed ones that never take longer; a second prompt starts at the size the
    fit gives for its start, with no ramp."""
    from worker.batching import ChunkSizer

    decode_s, base, per_position = 0.1, 0.01, 0.000005  # a token at position 4,000 costs 3x one at 0

    def chunk_seconds(tokens: int, position: int) -> float:
        return tokens * (base + per_position * (position + tokens / 2))

    sizer = ChunkSizer(128, decode_steps=25)
    sizer.prefilled(128, 1, 0, 5.0, decoding=True)
    assert sizer.budget(1, 128) == 128, "nothing to aim at before a decode step has been timed"
    sizer = ChunkSizer(128, decode_steps=25)
    for _ in range(5):
        sizer.decoded(decode_s)

    def prompt(length: int) -> list[float]:
        position, times = 0, []
        while position < length:
            tokens = min(sizer.budget(1, position), length - position)
            times.append(chunk_seconds(tokens, position))
            sizer.prefilled(tokens, 1, position, times[-1] + decode_s, decoding=True)
            position += tokens
        return times

    aim = 25 * decode_s
    times = prompt(8_000)
    assert max(times) <= 1.1 * aim and all(t >= 0.8 * aim for t in times[6:-1]), times
    fixed = max(t for t in range(1, 2049) if chunk_seconds(t, 8_000 - t) <= max(times))
    assert len(times) < 0.7 * (8_000 / fixed), (len(times), fixed)
    again = prompt(8_000)
    assert all(0.9 * aim <= t <= 1.1 * aim for t in again[:-1]), again
    # A step that ran slow (the machine was busy) moves the fit, within bounds.
    before = sizer.budget(1, 1_000)
    sizer.prefilled(before, 1, 1_000, 100.0, decoding=True)
    assert ChunkSizer.SMALLEST <= sizer.budget(1, 1_000) < before
    # Short prompts' quick chunks do not raise it past what was timed.
    short = ChunkSizer(128, decode_steps=25)
    short.decoded(decode_s)
    for _ in range(20):
        short.prefilled(40, 1, 0, 0.04, decoding=False)
    assert short.budget(1, 0) == 128, "no more than where it starts, a size known to be safe"
    short.prefilled(128, 1, 0, 0.13, decoding=False)
    assert short.budget(1, 0) == 160


def test_a_decoding_stream_gets_a_token_at_every_step_of_another_prompts_prefill(model):
    chunk = 32
    received = {}
    for label, prefill_chunk in (("chunked", chunk), ("unchunked", 0)):
        recorder = Recorder(Engine(model, prefill_chunk=prefill_chunk, prompt_cache_bytes=0))
        recorder.submit(chat("stream", "Tell me a story", max_tokens=2000))
        recorder.until(lambda r: len(r.tokens_at.get("stream", [])) >= 3)
        long_prompt = chat("long", words(160, 3), max_tokens=5)
        recorder.submit(long_prompt)
        sent = recorder.steps
        recorder.until(lambda r: "long" in r.first_token_step)
        during = [s for s in recorder.tokens_at["stream"] if sent < s < recorder.first_token_step["long"]]
        received[label] = (len(during), recorder.first_token_step["long"] - sent)
    prompt_tokens = Engine(model).count(long_prompt).prompt_tokens
    assert prompt_tokens > 20 * chunk
    tokens, steps = received["chunked"]
    # One token per step, and one step per chunk of the prompt: the stream never waited for more.
    assert steps >= prompt_tokens // chunk
    assert tokens >= steps - 1, received
    # mlx-lm's own scheduling (512 tokens a step) gives the stream a token per 512 prompt tokens.
    assert received["unchunked"][0] <= prompt_tokens // 512 + 2, received


def test_each_step_prefills_one_chunk_at_most(model, monkeypatch):
    """Rows × longest row of every prefill call stays within the chunk, whatever waits."""
    from mlx_lm.generate import PromptProcessingBatch

    shapes: list[tuple[int, int]] = []
    original = PromptProcessingBatch.prompt

    def recording(self, tokens):
        shapes.append((len(tokens), max(len(t) for t in tokens)))
        return original(self, tokens)

    monkeypatch.setattr(PromptProcessingBatch, "prompt", recording)
    recorder = Recorder(Engine(model, prefill_chunk=48, prompt_cache_bytes=0))
    recorder.submit(chat("stream", "Hello", max_tokens=300))
    recorder.until(lambda r: "stream" in r.first_token_step)
    recorder.submit(*[chat(f"p{i}", f"Question {i}?" if i % 3 else words(40, 10 + i)) for i in range(9)])
    recorder.run()
    assert shapes and all(rows * longest <= 48 for rows, longest in shapes), shapes
    assert any(rows > 1 for rows, _ in shapes), "short prompts should share a chunk"


def test_short_prompts_pass_a_long_prefill_and_long_prompts_take_turns(model):
    recorder = Recorder(Engine(model, prefill_chunk=32, prompt_cache_bytes=0))
    recorder.submit(chat("long1", words(500, 4)), chat("long2", words(500, 5)))
    recorder.step()
    recorder.step()
    recorder.submit(chat("short", "Hi"))
    recorder.run()
    first = recorder.first_token_step
    assert first["short"] < first["long1"] < first["long2"]
    # long2 started when long1's prefill ended: about as many steps again, not both at half speed.
    assert first["long2"] - first["long1"] >= 0.8 * first["long1"]


def test_several_short_prompts_prefill_in_one_call(model, monkeypatch):
    from mlx_lm.generate import PromptProcessingBatch

    rows: list[int] = []
    original = PromptProcessingBatch.prompt

    def recording(self, tokens):
        rows.append(len(tokens))
        return original(self, tokens)

    monkeypatch.setattr(PromptProcessingBatch, "prompt", recording)
    outputs(Engine(model, prefill_chunk=128, prompt_cache_bytes=0), *[chat(f"s{i}", f"Question {i}?") for i in range(4)])
    assert rows == [4]


def test_cancel_mid_prefill_frees_the_slot_and_the_cache(model):
    engine = Engine(model, max_sequences=1, prefill_chunk=16, prompt_cache_bytes=0)
    recorder = Recorder(engine)
    recorder.submit(chat("long", words(600, 6), max_tokens=5), chat("next", "Hello", max_tokens=4))
    for _ in range(5):
        recorder.step()
    generator = engine._generator
    assert "long" not in recorder.first_token_step and len(generator._prompt_batch) == 1
    assert generator.prompt_cache_nbytes > 0
    assert (engine.active, engine.queued) == (1, 1)
    assert engine.cancel("long").finish_reason == "cancelled"
    assert (engine.active, engine.queued) == (0, 1)
    assert len(generator._prompt_batch) == 0 and generator.prompt_cache_nbytes == 0
    recorder.step()
    assert (engine.active, engine.queued) == (1, 0), "the slot went to the waiting request at the next step"
    recorder.run()
    assert set(recorder.finished) == {"next"}
    assert recorder.texts["next"] == outputs(Engine(model, prompt_cache_bytes=0), chat("x", "Hello", max_tokens=4))[0]["x"]


def test_a_crash_mid_prefill_fails_that_prompt_alone(model, monkeypatch):
    from mlx_lm.generate import PromptProcessingBatch

    engine = Engine(model, prefill_chunk=16)
    recorder = Recorder(engine)
    recorder.submit(chat("stream", "Hello", max_tokens=60))
    recorder.until(lambda r: "stream" in r.first_token_step)
    recorder.submit(chat("doomed", words(300, 7), max_tokens=5))
    calls = {"n": 0}
    original = PromptProcessingBatch.prompt

    def failing(self, tokens):
        calls["n"] += 1
        if calls["n"] == 3:  # mid-prefill
            raise RuntimeError("[metal::malloc] Resource limit exceeded")
        return original(self, tokens)

    monkeypatch.setattr(PromptProcessingBatch, "prompt", failing)
    recorder.until(lambda r: "doomed" in r.errors)
    assert recorder.errors["doomed"].code == "internal_error" and "Resource limit" in recorder.errors["doomed"].message
    assert engine.active == 1 and len(engine._generator._prompt_batch) == 0, "its slot and cache are free"
    monkeypatch.setattr(PromptProcessingBatch, "prompt", original)
    recorder.submit(chat("after", "Hello", max_tokens=8))
    recorder.run()
    assert set(recorder.finished) == {"stream", "after"}
    alone, _ = outputs(Engine(model, prompt_cache_bytes=0), chat("stream", "Hello", max_tokens=60))
    assert recorder.texts["stream"] == alone["stream"], "the decoding stream went on untouched"


def test_a_prompt_is_cached_when_its_prefill_ends(model):
    engine = Engine(model, prefill_chunk=64)
    recorder = Recorder(engine)
    prompt = words(300, 8)
    recorder.submit(chat("first", prompt, max_tokens=500))
    recorder.until(lambda r: "first" in r.first_token_step)
    recorder.submit(chat("second", prompt, max_tokens=5))
    recorder.until(lambda r: "second" in r.finished)
    assert "first" not in recorder.finished, "the first request still decodes"
    assert recorder.finished["second"].cached_tokens == recorder.finished["second"].prompt_tokens - 1


def test_a_prompt_that_waited_reuses_the_prefix_prefilled_before_it(model):
    """Two agents' requests share a long system prompt and arrive together: the second's prefill
    starts after the first's, from the cache the first stored when its prefill ended."""
    system = {"role": "system", "content": words(400, 9)}
    first = Generate("a", messages=[system, {"role": "user", "content": "Fix the bug."}], max_tokens=6, sampling=GREEDY)
    second = Generate("b", messages=[system, {"role": "user", "content": "Write the docs."}], max_tokens=6,
                      sampling=GREEDY)
    texts, done = outputs(Engine(model, prefill_chunk=32), first, second)
    assert done["a"].cached_tokens < 10
    assert done["b"].cached_tokens > 400
    assert texts == outputs(Engine(model, prefill_chunk=0, prompt_cache_bytes=0), first, second)[0]


def agent_turns(loaded) -> tuple[list[Generate], list[int]]:
    """Two turns of an agent, then the second turn again with its tool output rewritten in the
    middle (as compaction or an edited tool result do); with each prompt's tokens' length and
    the number of tokens the edited prompt shares with the second."""
    system = {"role": "system", "content": words(80, 12)}
    output = words(120, 11)
    turn1 = [system, {"role": "user", "content": "Run the tests."}]
    turn2 = turn1 + [{"role": "assistant", "content": "Running them."}, {"role": "user", "content": f"Output: {output}"}]
    edited = turn2[:3] + [{"role": "user", "content": f"Output: {output[:200]} (trimmed)"}]
    requests = [Generate(f"t{i}", messages=m, max_tokens=8, sampling=GREEDY)
                for i, m in enumerate((turn1, turn2, edited), start=1)]
    engine = Engine(loaded)
    prompts = [engine.prompts.tokenize(r, False) for r in requests]
    common = next(i for i, (x, y) in enumerate(zip(prompts[1], prompts[2], strict=False)) if x != y)
    assert len(prompts[0]) + 100 < common < len(prompts[2]) - 10
    assert prompts[2][: len(prompts[0])] == prompts[0]
    return requests, [len(prompts[0]), common]


@pytest.mark.parametrize("chunk", [16, 0])
def test_an_edited_history_reuses_the_longest_cached_prefix(model, chunk):
    (turn1, turn2, edited), (_, common) = agent_turns(model)
    engine = Engine(model, prefill_chunk=chunk)
    outputs(engine, turn1)
    outputs(engine, turn2)
    texts, done = outputs(engine, edited)
    # mlx-lm's cache trims the second turn's (longer) entry back to where the histories part.
    assert done["t3"].cached_tokens == common
    assert texts == outputs(Engine(model, prefill_chunk=chunk, prompt_cache_bytes=0), edited)[0]


@pytest.mark.parametrize("chunk", [5, 16, 1000])
def test_sliding_window_caches_chunked_and_unchunked_alike(sliding_model, chunk):
    requests = [chat(f"r{i}", p, max_tokens=12) for i, p in enumerate(PROMPTS)]
    unchunked, _ = outputs(Engine(sliding_model, prefill_chunk=0, prompt_cache_bytes=0), *requests)
    assert outputs(Engine(sliding_model, prefill_chunk=chunk, prompt_cache_bytes=0), *requests)[0] == unchunked
    engine = Engine(sliding_model, prefill_chunk=chunk)
    outputs(engine, *requests)
    again, done = outputs(engine, *[chat(f"again{i}", p, max_tokens=12) for i, p in enumerate(PROMPTS)])
    assert list(again.values()) == list(unchunked.values())


def test_an_edited_history_reuses_a_cached_prefix_with_sliding_window_caches(sliding_model):
    """A sliding-window cache that has wrapped cannot be trimmed back to where two histories
    part, so the second turn's entry is no use for the edited prompt; the first turn's prompt,
    cached when its prefill ended, is the longest cached prefix that is."""
    (turn1, turn2, edited), (first_prompt, _) = agent_turns(sliding_model)
    engine = Engine(sliding_model, prefill_chunk=16)
    outputs(engine, turn1)
    outputs(engine, turn2)
    texts, done = outputs(engine, edited)
    assert done["t3"].cached_tokens == first_prompt
    assert texts == outputs(Engine(sliding_model, prefill_chunk=16, prompt_cache_bytes=0), edited)[0]


def test_the_peek_agrees_with_what_the_cache_supplies(model):
    engine = Engine(model, prefill_chunk=32)
    base = words(200, 13)
    outputs(engine, chat("a", base), chat("b", base + " more words"), chat("c", "Hello"))
    prefix_cache = engine.prefix_cache
    assert prefix_cache is not None
    for text in [base, base + " more", base + " more words and then some", base[:300], "Hello", "Other", words(50, 14)]:
        prompt = engine.prompts.tokenize(chat("q", text), False)
        peeked = prefix_cache.cached_length("", prompt)  # cached_prefix_length over mlx-lm's trie
        cache, rest = prefix_cache.fetch("", prompt)
        assert peeked == len(prompt) - len(rest), text


@pytest.mark.parametrize("chunk", [0, 32])  # the prefix cache is read at admission, or as a chunked prefill starts
def test_a_prompt_is_served_only_from_its_own_scopes_cache(model, chunk):
    """One API key's prompt must not hit another's cached prefix (the scope is its key's hash)."""
    engine = Engine(model, prefill_chunk=chunk)
    secret = words(150, 21)
    outputs(engine, chat("a1", secret, cache_scope="key-a"))
    _, done = outputs(engine, chat("b1", secret, cache_scope="key-b"))
    assert done["b1"].cached_tokens == 0
    _, done = outputs(engine, chat("a2", secret, cache_scope="key-a"))
    assert done["a2"].cached_tokens >= done["a2"].prompt_tokens - 1
    # B's own entry now serves B's repeats, and the shared scope ("", no keys) is a scope too.
    _, done = outputs(engine, chat("b2", secret, cache_scope="key-b"), chat("n1", secret))
    assert done["b2"].cached_tokens >= done["b2"].prompt_tokens - 1 and done["n1"].cached_tokens == 0


def test_chunked_generator_gives_mlx_lm_batch_generators_tokens(model):
    """ChunkedBatchGenerator against mlx-lm's own BatchGenerator, token for token: fails when an
    mlx-lm upgrade changes the batching this module builds on."""
    from mlx_lm.generate import BatchGenerator

    from worker.batching import ChunkedBatchGenerator

    tokenizer = model.tokenizer
    prompts = [tokenizer.encode(p) for p in PROMPTS]

    def tokens(generator) -> dict[int, list[int]]:
        uids = generator.insert(prompts, max_tokens=[12] * len(prompts))
        out: dict[int, list[int]] = {uid: [] for uid in uids}
        while responses := generator.next_generated():
            for r in responses:
                out[r.uid].append(r.token)
        return out

    theirs = tokens(BatchGenerator(model.model, prefill_step_size=512))
    ours = tokens(ChunkedBatchGenerator(model.model, prefill_chunk=24))
    assert ours == theirs and all(len(t) == 12 for t in ours.values())


# mlx-lm 0.32.2 sources that worker/batching.py copies (_next) or relies on (queue entry and prefill
# batch layouts, remove, the prefix cache's trie). When an upgrade changes one, re-read it, carry
# the change into worker/batching.py, and record the new hash here.
MLX_LM_SOURCES = {
    "BatchGenerator._next": "eb3a4e361dc2c19e",
    "BatchGenerator._make_batch": "c8d1adf640fc6d1b",
    "BatchGenerator.insert_segments": "509f959621fc26b5",
    "BatchGenerator.remove": "705e7de06f06d7de",
    "PromptProcessingBatch.__init__": "f6772222fabb624b",
    "PromptProcessingBatch.split": "6e75ac09995a521d",
    "PromptProcessingBatch.prompt": "91194fe0a4fcd146",
    "LRUPromptCache.fetch_nearest_cache": "7ac872d0c1091796",
    "PromptTrie.search": "1748a78c55ada724",
    "PromptTrie.add": "fa80ce3499e29387",  # the trie's layout, walked by cached_prefix_length
}


def test_mlx_lm_internals_are_the_ones_batching_was_written_for():
    import importlib

    modules = [importlib.import_module("mlx_lm.generate"), importlib.import_module("mlx_lm.models.cache")]
    changed = []
    for name, digest in MLX_LM_SOURCES.items():
        owner, method = name.split(".")
        cls = next(getattr(m, owner) for m in modules if hasattr(m, owner))
        source = inspect.getsource(getattr(cls, method))
        if hashlib.sha256(source.encode()).hexdigest()[:16] != digest:
            changed.append(name)
    assert not changed, f"mlx-lm changed {changed}: check worker/batching.py against them, then update MLX_LM_SOURCES"


@pytest.mark.slow
def test_smollm2_greedy_output_is_the_same_with_and_without_chunking():
    from worker.models import load

    loaded = load("smollm2-135m")
    request = chat("long", "Summarize: " + words(900, 15), max_tokens=16)
    unchunked, _ = outputs(Engine(loaded, prefill_chunk=0, prompt_cache_bytes=0), request)
    chunked, done = outputs(Engine(loaded, prefill_chunk=128, prompt_cache_bytes=0), request)
    assert done["long"].prompt_tokens > 1500
    assert chunked == unchunked


def test_a_stream_keeps_receiving_tokens_through_a_long_prefill_end_to_end(fresh_stack, tiny_model_dir):
    """Through the gateway and a worker with 128-token chunks (fixed: ``auto`` sizes them from
    timings): while a long prompt is prefilled, a running stream gets a token per chunk (counted,
    not timed)."""
    import threading

    import httpx
    from conftest import TINY_LONG

    fresh_stack.start_gateway()
    fresh_stack.start_worker(str(tiny_model_dir), TINY_LONG, "--context-length", "100000",
                             "--max-output-tokens", "0", "--prefill-chunk", "128")
    fresh_stack.wait_for_models(TINY_LONG)
    received: list[float] = []
    started, stop = threading.Event(), threading.Event()
    base = fresh_stack.base_url

    def stream() -> None:
        body = {"model": TINY_LONG, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 5000,
                "stream": True, "temperature": 0}
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if stop.is_set():
                    return  # closing the stream cancels it
                if '"content":' in line:
                    received.append(time.monotonic())
                    started.set()

    runner = threading.Thread(target=stream)
    runner.start()
    try:
        assert started.wait(60)
        body = {"model": TINY_LONG, "messages": [{"role": "user", "content": words(800, 16)}], "max_tokens": 3,
                "stream": True, "stream_options": {"include_usage": True}, "temperature": 0}
        sent, first, prompt_tokens = time.monotonic(), None, 0
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if '"content":' in line and first is None:
                    first = time.monotonic()
                if '"usage":{' in line:
                    prompt_tokens = json.loads(line[6:])["usage"]["prompt_tokens"]
        assert first is not None and prompt_tokens > 3000
        during = sum(1 for t in received if sent < t < first)
        chunks = prompt_tokens // 128
        assert during >= chunks // 2, (during, chunks)
    finally:
        stop.set()
        runner.join(120)
