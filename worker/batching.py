"""Chunked prefill interleaved with decoding, on mlx-lm's ``BatchGenerator``.

mlx-lm's ``BatchGenerator.next()`` decodes one token for every running sequence, then feeds up
to ``prefill_step_size`` prompt tokens of *every* prompt in its prefill batch (up to
``prefill_batch_size`` of them): with eight long prompts waiting, one step carries 8 × 512
prompt tokens, and every decoding stream waits for all of them. ``ChunkedBatchGenerator``
bounds each step instead:

1. decode: one token for every running sequence (mlx-lm's own step, unchanged), or with a
   ``Speculator`` (worker/speculative.py) that token and the drafts the model agrees with;
2. prompts with only their last token left move to decoding (mlx-lm's transition, in
   ``_to_decoding``; their rows are copied out of the prefill batch alone, not the whole batch
   as ``PromptProcessingBatch.split`` does, so a short prompt finishing beside a long one does
   not copy the long one's cache), and ``prompt_done`` caches their prompts;
3. start prompts (``_start_prompts``): a waiting prompt whose uncached tokens fit in its share
   of this step's budget joins the prefill batch at once, so short prompts (and agent turns
   whose history is cached) never wait behind a long one; a longer prompt starts only when no
   other long prompt is prefilling, in arrival order. Sharing the budget among several long
   prompts would delay the first without speeding up the last, and taking them in order
   means none waits forever;
4. one chunk: at most ``prefill_chunk`` prompt tokens in all, counted as the prefill batch's
   padded shape (rows × longest row), shared equally by its rows. Several prompts that fit go
   through the model together, in one call. ``prefill_chunk`` is fixed, or picked before each
   step by a ``ChunkSizer`` from the steps it has timed (``--prefill-chunk auto``).

So a decoding stream waits at most one chunk (plus its own decode step) between two tokens,
whatever arrives. A prompt's prefix cache is looked up when its prefill starts
(``fetch_prefix``), not when it is queued: a request that waited behind another with the same
prefix reuses the cache that one stored when its prefill finished.

With ``kv_bits`` the running sequences' KV caches are quantized (``--kv-bits``; mlx-lm's
``BatchGenerator`` batches only unquantized caches): every cache that enters the generator (a new
prompt's, or one the prefix cache hands back) is made a ``QuantizedKVCache`` whose ``merge`` builds
a ``BatchQuantizedKVCache`` (worker/quantized_cache.py); mlx-lm's prefill, decoding, ``extend``,
``filter`` and ``extract`` then run on it unchanged, and extracted caches are single
``QuantizedKVCache``s that the prefix cache stores and trims like unquantized ones.

This module is the only one that reaches into mlx-lm's batching internals: ``_next`` is
mlx-lm 0.32.2's with steps 2 to 4 changed, and the queue entries and prefill batch layout are
mlx-lm's. tests/test_batching.py fails when an mlx-lm upgrade changes what this relies on.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

import mlx.core as mx
from mlx_lm.generate import BatchGenerator, PromptProcessingBatch
from mlx_lm.models.cache import LRUPromptCache, can_trim_prompt_cache

from worker.quantized_cache import DEFAULT_KV_GROUP_SIZE, batchable, make_quantized_prompt_cache
from worker.speculative import Speculator

# A fixed chunk (``--prefill-chunk N``), or where ``auto`` starts before it has measured a step,
# by measurement: bench/run.py --only prefill_chunk (SmolLM2-135M, float32, OpenBLAS, 2 shared
# Linux cores; one stream decoding while a 4,000-token prompt is prefilled). On this CPU attention
# dominates long prompts (mostly the exp of MLX's CPU softmax), so a chunk late in the prompt costs
# several times one at its start and the stream's worst wait is the last chunk's: 5% of the
# prompt's prefill time at 128 tokens, 3% at 64, 11% at 256, 19% at 512. Prefill itself was
# fastest at 128 (58 tokens/s; 52 at 64, 53 at 256, 48 at 512; stream_generate 38, its 2048-token
# steps computing attention over the masked half of each step). Metal could not be measured here;
# 512 there is mlx-lm's own batch prefill step: a GPU needs larger matrices to be busy, its fused
# attention does not grow the same way, and a 512-token chunk of a 30B model takes about a second.
CPU_PREFILL_CHUNK = 128
GPU_PREFILL_CHUNK = 512
UNCHUNKED_PREFILL_STEP = 512  # ``prefill_chunk=0``: mlx-lm's own scheduling, as before chunking


def default_prefill_chunk() -> int:
    return CPU_PREFILL_CHUNK if mx.default_device() == mx.cpu else GPU_PREFILL_CHUNK


class ChunkSizer:
    """``--prefill-chunk auto``: sizes each step's chunk so that its prefill takes about
    ``decode_steps`` decode steps of the running batch, from step times measured as the worker runs.

    Every chunk costs the long prompt one interleaved decode step of the streams beside it, and
    costs those streams the chunk's time: with chunks of ``k`` decode steps the prompt is delayed
    by about ``c/k`` (``c``: what one interleaved step costs the prompt, in decode steps; 2.5-3.5 on
    this CPU) and each stream waits about ``k`` steps, whatever the model (a larger model's decode
    step is as much slower as its prefill) or the device. Fixed token counts hold neither: a token
    late in a long prompt costs several times one at its start (attention: 5x at 3,700 tokens on
    this CPU), so fixed chunks are either too slow late or too many early. Here a chunk's cost is
    fitted as ``tokens × (a + b × position)`` over the last chunks timed, and each chunk is sized
    for the position it starts at. ``DECODE_STEPS`` by measurement (bench/run.py --only
    decode_stall: SmolLM2 on 2 CPU cores, a 4,000-token prompt beside one stream): at 40 the
    stream's worst gap was 0.075-0.078 of the prompt's prefill and the prompt took 0.99-1.03x its
    idle time, in 3 rounds (fixed 128-token chunks: 0.054 and 1.14x; at 25, in one round not
    measured back to back: 0.057 and 1.13x).

    ``decoded(s)``: a step that only decoded took ``s`` seconds. ``prefilled(tokens, rows,
    position, s, decoding)``: a step with a chunk of ``tokens`` (padded, over ``rows`` rows, the
    furthest starting at ``position``) took ``s`` in all, with a decode step when ``decoding``.
    ``budget(rows, position)``: the padded tokens for the next chunk; ``start`` until a decode step
    and a chunk have been timed.
    """

    DECODE_STEPS = 40
    SMALLEST, LARGEST = 32, 2048  # below ~32 tokens matrices are too small to be efficient; the
    # largest bounds prefill memory (mlx-lm's stream_generate prefills 2048 at a time)
    SAMPLES = 12  # chunks the cost is fitted over

    def __init__(self, start: int, decode_steps: int = DECODE_STEPS):
        self.start = start
        self.decode_steps = decode_steps
        self.decode_s: float | None = None
        self._samples: deque[tuple[float, float, float]] = deque(maxlen=self.SAMPLES)  # (x1, x2, seconds)
        self._cost: tuple[float, float] | None = None  # (a, b): seconds per token, per token and position
        self._largest = 0  # the largest chunk timed

    def decoded(self, seconds: float) -> None:
        self.decode_s = seconds if self.decode_s is None else 0.8 * self.decode_s + 0.2 * seconds

    def prefilled(self, tokens: int, rows: int, position: int, seconds: float, decoding: bool) -> None:
        if tokens <= 0:
            return
        chunk_s = max(seconds - ((self.decode_s or 0.0) if decoding else 0.0), 1e-4)
        self._samples.append((tokens, tokens * (position + tokens / (2 * rows)), chunk_s))
        self._largest = max(self._largest, tokens)
        self._cost = _fit(self._samples)

    def budget(self, rows: int, position: int) -> int:
        if self.decode_s is None or self._cost is None:
            return self.start
        a, b = self._cost
        aim = self.decode_steps * self.decode_s
        # tokens × (a + b × (position + tokens / 2 rows)) = aim, for tokens
        linear, quadratic = a + b * position, b / (2 * rows)
        if quadratic > 0:
            tokens = (-linear + (linear * linear + 4 * quadratic * aim) ** 0.5) / (2 * quadratic)
        else:
            tokens = aim / linear
        # Trusted only near the sizes it was fitted on: a chunk's cost grows faster than its tokens
        # past them (a 632-token chunk after a 512-token one took 2.4x as long on this CPU).
        tokens = min(tokens, max(1.25 * self._largest, self.start))
        return int(min(max(tokens, self.SMALLEST), self.LARGEST))


def _fit(samples: deque[tuple[float, float, float]]) -> tuple[float, float] | None:
    """Least squares for seconds = a × x1 + b × x2 (b >= 0; a alone when the samples cannot tell
    the two apart, e.g. all at one position)."""
    s11 = sum(x1 * x1 for x1, _, _ in samples)
    s12 = sum(x1 * x2 for x1, x2, _ in samples)
    s22 = sum(x2 * x2 for _, x2, _ in samples)
    t1 = sum(x1 * t for x1, _, t in samples)
    t2 = sum(x2 * t for _, x2, t in samples)
    det = s11 * s22 - s12 * s12
    if det > 1e-9 * s11 * s22:
        a, b = (t1 * s22 - t2 * s12) / det, (t2 * s11 - t1 * s12) / det
        if a > 0 and b >= 0:
            return a, b
    if s11 <= 0:
        return None
    return max(t1 / s11, 1e-9), 0.0


PrefixFetch = Callable[[int, list[int]], tuple[list[Any] | None, int]]  # (uid, prompt) -> (cache, cached tokens)
PrefixPeek = Callable[[int], int]  # uid -> how many of its prompt's tokens the cache would supply now


class ChunkedBatchGenerator(BatchGenerator):
    """A ``BatchGenerator`` whose every step spends at most one decode token per running
    sequence plus one prefill chunk of ``prefill_chunk`` tokens (see the module docstring), or,
    with a ``sizer``, of the tokens it picks from the steps it has timed.

    ``peek_prefix(uid)`` says how many of a waiting prompt's tokens the prefix cache
    would supply (for the fit check; it must not copy anything), ``fetch_prefix(uid, prompt)``
    takes that cache when the prompt starts: (cache or None, tokens it holds, fewer than the
    prompt's). Without them every prompt is prefilled whole. Insert prompts without caches.
    ``prompt_done(uids)`` is called as prompts finish their prefill (they are decoding now, and
    ``extract_cache`` gives their whole prompt's cache), before the next prompts start.
    ``take_failures()`` returns the prompts whose prefill raised since the last call (they have
    left the batch; decoding went on).
    """

    def __init__(self, model: Any, *, prefill_chunk: int, sizer: ChunkSizer | None = None,
                 peek_prefix: PrefixPeek | None = None, fetch_prefix: PrefixFetch | None = None,
                 prompt_done: Callable[[list[int]], None] | None = None, kv_bits: int | None = None,
                 kv_group_size: int = DEFAULT_KV_GROUP_SIZE, speculator: Speculator | None = None, **kwargs: Any):
        if prefill_chunk < 1:
            raise ValueError("prefill_chunk must be at least 1")
        self.kv_bits, self.kv_group_size = kv_bits, kv_group_size  # None: unquantized, as mlx-lm
        # mlx-lm's prompt() feeds at most prefill_step_size tokens per model call: one call per chunk.
        super().__init__(model, prefill_step_size=max(prefill_chunk, ChunkSizer.LARGEST if sizer else 0), **kwargs)
        self._fixed_prefill_chunk = prefill_chunk
        self._sizer = sizer
        self._chunk_tokens = 0  # the padded prompt tokens of the current step's chunk
        self._chunk_shape = (0, 0)  # its rows, and the furthest row's position before it
        self._peek_prefix = peek_prefix
        self._fetch_prefix = fetch_prefix
        self._prompt_done = prompt_done
        self.speculator = speculator  # drafts and verifies in the decode step (worker/speculative.py)
        self._failures: list[tuple[list[int], Exception]] = []

    @property
    def prefill_chunk(self) -> int:
        """This step's budget of prompt tokens (padded), for the prefill batch as it stands."""
        if self._sizer is None:
            return self._fixed_prefill_chunk
        tokens = self._prompt_batch.tokens
        return self._sizer.budget(max(len(tokens), 1), max((len(t) for t in tokens), default=0))

    def take_failures(self) -> list[tuple[list[int], Exception]]:
        failures, self._failures = self._failures, []
        return failures

    def insert_segments(self, segments: Any, max_tokens: Any = None, caches: Any = None, *args: Any,
                        **kwargs: Any) -> Any:
        """mlx-lm's, with each prompt's cache quantized when ``kv_bits`` is set (``_kv_cache``)."""
        if self.kv_bits is not None:
            caches = [_kv_cache(self.model, c, self.kv_group_size, self.kv_bits) for c in caches or [None] * len(segments)]
        return super().insert_segments(segments, max_tokens, caches, *args, **kwargs)

    def _next(self) -> tuple[list[Any], list[Any]]:
        start = time.perf_counter()
        decoding = len(self._generation_batch) > 0
        prompt_responses, generation_responses = self._step()
        if self._sizer is not None:
            elapsed = time.perf_counter() - start
            if self._chunk_tokens:
                self._sizer.prefilled(self._chunk_tokens, *self._chunk_shape, elapsed, decoding)
            elif decoding and not prompt_responses:  # a step that did nothing but decode
                self._sizer.decoded(elapsed)
        return prompt_responses, generation_responses

    def _step(self) -> tuple[list[Any], list[Any]]:
        generation_responses: list[Any] = []
        prompt_responses: list[Any] = []
        decode_alone = not self._chunk_tokens  # the last step ran no prefill (its decode is timed alone)
        self._chunk_tokens = 0

        # 1. One token for every running sequence (as mlx-lm), or with a speculator, one or more:
        #    its drafts, verified in the same forward pass.
        if len(self._generation_batch) > 0:
            tic = time.perf_counter()
            if self.speculator is not None:
                generation_responses = self.speculator.decode(self._generation_batch, timed=decode_alone)
            else:
                generation_responses = self._generation_batch.next()
            self._counters.decode_time += time.perf_counter() - tic
            self._counters.generation_tokens += len(generation_responses)
            self._counters.generation_steps += 1
            if self._counters.generation_steps % 512 == 0:
                mx.clear_cache()
        elif self.speculator is not None:
            self.speculator.pause()
        if len(self._generation_batch) >= self.completion_batch_size:
            return prompt_responses, generation_responses

        # 2. Prompts with only their last token left start decoding, and are cached (``prompt_done``)
        #    before the next prompts look for a cached prefix.
        prompt_responses += self._to_decoding()

        # 3. Waiting prompts that fit this step join the prefill batch (a wholly cached one, all but
        #    its last token, starts decoding at once).
        if self._start_prompts():
            prompt_responses += self._to_decoding()

        # 4. One chunk: the budget shared equally by the prefill batch's rows.
        rows = len(self._currently_processing)
        if not rows:
            return prompt_responses, generation_responses
        position = max(len(t) for t in self._prompt_batch.tokens)  # the furthest row's, before this chunk
        share = max(1, self.prefill_chunk // rows)
        prompts = []
        for i, seq in enumerate(self._currently_processing):
            segments = seq[0]
            n = min(len(segments[0]), share)
            prompts.append(segments[0][:n])
            segments[0] = segments[0][n:]
            end_of_segment = not segments[0]
            if end_of_segment:
                segments.pop(0)
            seq[1] += n
            prompt_responses.append(PromptProcessingBatch.Response(self._prompt_batch.uids[i], (seq[1], seq[2]),
                                                                   end_of_segment, False))
        self._counters.prompt_tokens += sum(len(p) for p in prompts)
        self._chunk_tokens, self._chunk_shape = rows * max(len(p) for p in prompts), (rows, position)
        tic = time.perf_counter()
        try:
            self._prompt_batch.prompt(prompts)
        except Exception as exc:
            # Pinned on the prompts of this chunk alone: they leave, decoding goes on.
            failed = list(self._prompt_batch.uids)
            self.remove(failed)
            mx.clear_cache()
            self._failures.append((failed, exc))
            prompt_responses = [r for r in prompt_responses if r.uid not in set(failed)]
        self._counters.prompt_time += time.perf_counter() - tic
        return prompt_responses, generation_responses

    def _to_decoding(self) -> list[Any]:
        """mlx-lm's switch from prefill to decoding, for the prompts with only their last token
        left: fed now, it gives their first logits. Returns their prompt responses."""
        split = [i for i, (segments, _, _) in enumerate(self._currently_processing) if _last_token_only(segments)]
        if not split:
            return []
        last_inputs = [self._currently_processing[i][0][0] for i in split]
        progress = [(self._currently_processing[i][2],) * 2 for i in split]
        leaving = set(split)
        self._currently_processing = [p for i, p in enumerate(self._currently_processing) if i not in leaving]
        gen_batch = self._split_off(split).generate(last_inputs)
        uids = list(gen_batch.uids)
        self._generation_batch.extend(gen_batch)
        if self._prompt_done is not None:
            self._prompt_done(uids)
        return [PromptProcessingBatch.Response(uid, p, True, True) for uid, p in zip(uids, progress, strict=True)]

    def _start_prompts(self) -> bool:
        """Move the waiting prompts that may start this step into the prefill batch."""
        waiting = self._unprocessed_sequences
        room = min(self.prefill_batch_size - len(self._prompt_batch),
                   self.completion_batch_size - len(self._generation_batch) - len(self._prompt_batch))
        if not waiting or room <= 0:
            return False
        continuing = len(self._currently_processing)  # rows still prefilling: at most one long prompt
        chosen: list[int] = []
        longest = 0  # the longest prompt among those that must finish within this step's share
        for index, entry in enumerate(waiting):
            if len(chosen) >= room:
                break
            # Tokens it still has to prefill (its last one is fed when it starts decoding).
            need = sum(len(segment) for segment in entry[1]) - 1 - (self._peek_prefix(entry[0]) if self._peek_prefix else 0)
            if continuing == 0 and not chosen:
                chosen.append(index)  # the first in line starts, however long
                continue
            share = self.prefill_chunk // (continuing + len(chosen) + 1)
            if max(longest, need) <= share:
                chosen.append(index)
                longest = max(longest, need)
        if not chosen:
            return False
        picked = set(chosen)
        starting = [self._with_prefix(waiting[i]) for i in chosen]
        self._unprocessed_sequences = deque(starting + [e for i, e in enumerate(waiting) if i not in picked])
        self._prompt_batch.extend(self._make_batch(len(starting)))
        return True

    def _with_prefix(self, entry: tuple) -> tuple:
        """A queue entry with its prompt's cached prefix, taken now (mlx-lm's entry layout:
        uid, segments, max_tokens, cache, tokens already in the cache, sampler, processors, stops)."""
        if self._fetch_prefix is None:
            return entry
        uid, _, max_tokens, cache, _, *rest = entry
        prompt = _prompt_of(entry)
        cached, n = self._fetch_prefix(uid, prompt)
        if cached is None or n <= 0:
            return entry
        if self.kv_bits is not None:
            cached = _kv_cache(self.model, cached, self.kv_group_size, self.kv_bits)
        tail = prompt[n:]
        segments = [tail[:-1], tail[-1:]] if len(tail) > 1 else [tail]
        return (uid, segments, max_tokens, cached, prompt[:n], *rest)

    def _split_off(self, indices: list[int]) -> PromptProcessingBatch:
        """The prefill batch's rows at ``indices`` as a batch of their own; the rest stay.
        mlx-lm's ``split`` deep-copies every row's cache first; only the leaving rows are copied here."""
        batch = self._prompt_batch
        if len(indices) == len(batch):
            self._prompt_batch = PromptProcessingBatch.empty(self.model, self.sampler,
                                                             prefill_step_size=self.prefill_step_size)
            return batch
        leaving = PromptProcessingBatch(
            model=self.model,
            uids=[batch.uids[i] for i in indices],
            caches=[batch.extract_cache(i) for i in indices],
            tokens=[batch.tokens[i] for i in indices],
            prefill_step_size=batch.prefill_step_size,
            samplers=[batch.samplers[i] for i in indices],
            fallback_sampler=batch.fallback_sampler,
            logits_processors=[batch.logits_processors[i] for i in indices],
            stop_sequences=[batch.stop_sequences[i] for i in indices],
            max_tokens=[batch.max_tokens[i] for i in indices],
        )
        batch.filter([i for i in range(len(batch)) if i not in set(indices)])
        return leaving


class KVQuantizedBatchGenerator(BatchGenerator):
    """mlx-lm's own ``BatchGenerator`` (``--prefill-chunk 0``) with quantized KV caches."""

    def __init__(self, model: Any, *, kv_bits: int, kv_group_size: int = DEFAULT_KV_GROUP_SIZE, **kwargs: Any):
        self.kv_bits, self.kv_group_size = kv_bits, kv_group_size
        super().__init__(model, **kwargs)

    def insert_segments(self, segments: Any, max_tokens: Any = None, caches: Any = None, *args: Any,
                        **kwargs: Any) -> Any:
        caches = [_kv_cache(self.model, c, self.kv_group_size, self.kv_bits) for c in caches or [None] * len(segments)]
        return super().insert_segments(segments, max_tokens, caches, *args, **kwargs)


def _kv_cache(model: Any, cache: list[Any] | None, group_size: int, bits: int) -> list[Any]:
    """A prompt's cache entering the generator, quantized: a new one for ``None``, else each layer
    made to merge into a quantized batch (worker/quantized_cache.py ``batchable``)."""
    if cache is None:
        return make_quantized_prompt_cache(model, group_size, bits)
    return [batchable(layer, group_size, bits) for layer in cache]


def _last_token_only(segments: list[list[int]]) -> bool:
    """mlx-lm holds back a prompt's last token: fed at the switch to decoding, it gives the first logits."""
    return len(segments) == 1 and len(segments[0]) == 1


def _prompt_of(entry: tuple) -> list[int]:
    """A queued prompt's tokens (inserted without a cache: its segments are the whole prompt)."""
    return [token for segment in entry[1] for token in segment]


def cached_prefix_length(cache: LRUPromptCache, model: Any, tokens: list[int]) -> int:
    """About how many of ``tokens`` ``cache.fetch_nearest_cache`` would supply now (less the
    last token of an exact hit: the model must see one), without copying any cache, for the
    scheduler's fit check. The same choice, read from mlx-lm's trie: an exact entry; else an
    entry past where ``tokens`` leave the trie, trimmed back to there, if it can be trimmed; else
    the longest entry that is a prefix. mlx-lm takes the shortest entry past that point, and its
    search copies the path at every node (~40 ms next to a few 4k-token entries); here the first
    entry down the trie stands for it, in one linear walk. Every entry of a model has the same
    cache types, so only sliding-window caches (trimmable while shorter than their window) can
    tell the two apart, and then only the estimate is off, not what a prompt is given."""
    node = cache._trie._trie.get(model)
    if node is None:
        return 0
    depth, shorter = 0, 0
    for token in tokens:
        if token not in node:
            break
        node = node[token]
        depth += 1
        if "__value__" in node and depth > 1:  # mlx-lm ignores a one-token entry
            shorter = depth
    if depth == len(tokens) and "__value__" in node:  # an exact hit
        return len(tokens) - 1 if can_trim_prompt_cache(node["__value__"].prompt_cache) else 0
    if depth > shorter:  # every node of the trie leads to an entry
        while "__value__" not in node:
            node = next(iter(node.values()))  # no value here, so every key is a token
        if can_trim_prompt_cache(node["__value__"].prompt_cache):
            return min(len(tokens) - 1, depth)
    return shorter
