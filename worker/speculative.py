"""Speculative decoding inside continuous batching: prompt-lookup drafts, verified in the batch's
one forward pass.

Coding agents re-emit text they just read (a file rewritten with one change, a patch's context
lines), so the tokens that followed the last few generated ones earlier in the sequence are often
the next ones (with ``--draft-model``, a smaller model drafts instead: worker/draft_model.py). Each
decode step, ``Speculator.decode`` looks up, for every running sequence, the
most recent earlier occurrence of its last 4, 3 or 2 tokens (``PromptLookup``) and proposes up to
``max_draft`` tokens that followed. The batch then runs one forward pass over ``[pending token,
drafts...]`` per row (rows right-padded to the widest), and each row keeps its drafts while they
are what the model would have produced:

- greedy: a draft is kept while it is the argmax of the (processed) logits at its position;
- sampling: a draft ``d`` is kept with probability ``p(d)`` under the distribution the row's
  sampler draws from (its temperature, top-p, min-p, top-k), and after the first rejection the
  next token is drawn from ``p`` without ``d``: the standard rule for a deterministic proposal,
  which leaves the output distribution exactly the model's;
- logits processors (penalties, a structured-output grammar) run position by position on the
  context so far, stopping at the first rejection, so a stateful processor (the grammar matcher)
  consumes exactly the tokens kept, nothing to roll back.

The row emits its pending token and the kept drafts, and the token sampled after them is its new
pending token, as in mlx-lm's ``GenerationBatch``. Positions fed but not kept leave the KV cache:
every row's cache is trimmed by the fewest any row rejected, and a row that rejected more gets
the rest as *holes*, masked out of attention and out of its RoPE offset (worker/holey_cache.py).

Whether to widen a step at all is decided per step from measured costs (``StepCost``): a wide
step over ``B`` rows and ``W`` positions costs about ``1 + beta × B × (W - 1)`` plain steps (beta
is measured as the worker runs, per batch size: ~0.05-0.15 on this CPU, far less on a GPU, where a
step is bound by reading the weights), and gains each row's expected accepted drafts, from its own
acceptance so far (a worker-wide rate for a new one) and how often lookups find drafts for it. A
sequence whose drafts miss stops drafting, and probes again later; with no draft worth its cost
the step is mlx-lm's own (pipelined) decode step, so speculation costs (almost) nothing where
it does not help.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

import mlx.core as mx
from mlx_lm.generate import GenerationBatch
from mlx_lm.models.cache import KVCache
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, greedy_sampler

from worker.holey_cache import drop_last, make_holey
from worker.quantized_cache import QuantizedKVCache

log = logging.getLogger(__name__)

MAX_DRAFT = 8  # drafted tokens per sequence per step, at most
NGRAMS = (4, 3, 2)  # suffix lengths looked up, longest first
BETA_PRIOR = 0.06  # a wide step's extra cost per extra row-position, until measured (this CPU's)
PROBE_AFTER, PROBE_WIDTH = 24, 3  # a step of this width after this many plain steps that had drafts


# --- the KV cache ------------------------------------------------------------------


def supports_speculation(model: Any) -> bool:
    """Speculation rolls back plain (or our quantized) KV caches; sliding-window and recurrent
    layers cannot give positions back exactly."""
    from mlx_lm.models.cache import make_prompt_cache

    return all(type(c) in (KVCache, QuantizedKVCache) for c in make_prompt_cache(model))


def _int(a: mx.array) -> int:
    return int(a.item())  # type: ignore[arg-type]


def _float(a: mx.array) -> float:
    return float(a.item())  # type: ignore[arg-type]


# --- drafting ------------------------------------------------------------------------


class PromptLookup:
    """One sequence's n-gram index: each 2/3/4-gram of its tokens -> where its most recent
    occurrence ended (the position of the token that followed it); ~3 dict entries per token.
    New tokens are indexed as they come; the prompt, newest first, ``BACKFILL`` tokens a step, so
    a long prompt never stalls a step (100k tokens would take ~0.3 s at once)."""

    BACKFILL = 4096

    def __init__(self) -> None:
        self._index: dict[tuple[int, ...], int] = {}
        self._indexed = -1  # positions from here on are indexed as they come (-1: not started)
        self._backfilled = 0  # positions from here to _indexed are indexed; below, still to do

    def draft(self, tokens: list[int], pending: int, limit: int) -> list[int]:
        """Up to ``limit`` tokens that followed the latest earlier occurrence of the sequence's
        last tokens (``tokens`` in the cache, then ``pending``)."""
        if self._indexed < 0:
            self._indexed = self._backfilled = len(tokens)
        for end in range(self._indexed, len(tokens)):  # newer than anything indexed: they win
            for n in NGRAMS:
                if end >= n:
                    self._index[tuple(tokens[end - n: end])] = end
        self._indexed = max(self._indexed, len(tokens))
        stop = max(self._backfilled - self.BACKFILL, 0)
        for end in range(self._backfilled - 1, stop - 1, -1):  # older than what is indexed: never replace
            for n in NGRAMS:
                if end >= n:
                    self._index.setdefault(tuple(tokens[end - n: end]), end)
        self._backfilled = stop
        for n in NGRAMS:
            if len(tokens) + 1 < n:
                continue
            found_at = self._index.get(tuple(tokens[len(tokens) - n + 1:]) + (pending,))
            if found_at is not None:  # what followed it, up to the pending token (the sequence's last)
                found = tokens[found_at: found_at + limit]
                return found + [pending] if len(found) < limit else found
        return []


@dataclass
class Sampling:
    """What a sampled sequence's sampler draws from (mlx-lm's ``make_sampler``), to judge drafts."""

    temperature: float
    top_p: float = 0.0
    min_p: float = 0.0
    top_k: int = 0

    def logits(self, logprobs: mx.array) -> mx.array:
        """The scaled, filtered logits its sampler draws from (its filters, in mlx-lm's order)."""
        if 0 < self.top_p < 1.0:
            logprobs = apply_top_p(logprobs, self.top_p)
        if self.min_p != 0.0:
            logprobs = apply_min_p(logprobs, self.min_p, 1)
        if self.top_k > 0:
            logprobs = apply_top_k(logprobs, self.top_k)
        return logprobs * (1 / self.temperature)


class Counts(Protocol):
    drafted_tokens: int
    accepted_tokens: int


class Acceptance:
    """Drafts kept, and first rejections, decayed: a draft token's chance of being kept."""

    def __init__(self, decay: float) -> None:
        self.decay = decay
        self.kept = 0.0
        self.missed = 0.0

    def judged(self, drafted: int, kept: int) -> None:
        self.kept = self.decay * self.kept + kept
        self.missed = self.decay * self.missed + (kept < drafted)

    def chance(self, prior: float, weight: float = 2.0) -> float:
        """The estimate, with ``weight`` imagined drafts at ``prior`` (the worker's overall rate
        for a sequence that has not drafted yet)."""
        return (self.kept + weight * prior) / (self.kept + self.missed + weight)


@dataclass
class _Row:
    """One sequence's speculation state."""

    counts: Counts | None
    sampling: Sampling | None  # None: greedy
    enabled: bool = True
    lookup: PromptLookup | None = None
    acceptance: Acceptance = field(default_factory=lambda: Acceptance(0.9))
    found: float = 0.5  # how often a lookup has found drafts for it lately

    def judged(self, drafted: int, kept: int) -> None:
        self.acceptance.judged(drafted, kept)
        if self.counts is not None:
            self.counts.drafted_tokens += drafted
            self.counts.accepted_tokens += kept

    def idle(self) -> None:
        """It had drafts but none were worth a step: its record fades, so it is tried again later."""
        self.acceptance.kept *= 0.97
        self.acceptance.missed *= 0.97


def _size_class(rows: int) -> int:
    return max(rows, 1).bit_length() - 1  # 1, 2-3, 4-7, 8-15, 16-31, ...


def expected_kept(alpha: float, drafts: int) -> float:
    """Drafts kept on average when each is kept with chance ``alpha`` until the first miss."""
    return sum(alpha ** j for j in range(1, drafts + 1))


class StepCost:
    """How much a wide step costs against a plain one: ``1 + beta × rows × (width - 1)``, with
    beta the median of the last steps' measurements (a shared machine's timings are noisy; one
    slow step must not switch speculation off), within ``BETA_RANGE``. Kept per batch size
    (rounded to a power of two): a wide step over more rows uses the matrix units better, so one
    beta for all sizes would price a large batch's wide step at a small one's rate."""

    SAMPLES = 16
    BETA_RANGE = (0.002, 0.5)

    def __init__(self, beta: float = BETA_PRIOR):
        self.beta = beta  # the last batch size's, as measured
        self._prior = beta
        self._plain: dict[int, deque[float]] = {}  # rows -> seconds of the last plain steps
        self._betas: dict[int, deque[float]] = {}  # size class -> the last betas measured

    def plain(self, rows: int, seconds: float) -> None:
        self._plain.setdefault(rows, deque(maxlen=self.SAMPLES)).append(seconds)

    def plain_seconds(self, rows: int) -> float | None:
        times = self._plain.get(rows)
        return statistics.median(times) if times else None

    def wide(self, rows: int, width: int, seconds: float) -> None:
        plain = self.plain_seconds(rows)
        if plain is None or width < 2:
            return
        samples = self._betas.setdefault(_size_class(rows), deque(maxlen=self.SAMPLES))
        samples.append(max(seconds / plain - 1, 0.0) / (rows * (width - 1)))
        self.beta = self.beta_for(rows)

    def beta_for(self, rows: int) -> float:
        """Its size class's measurements; else the nearest smaller class's (a larger batch costs
        no more per row-position); else the prior."""
        for size in range(_size_class(rows), -1, -1):
            samples = self._betas.get(size)
            if samples:
                low, high = self.BETA_RANGE
                return min(max(statistics.median(samples), low), high)
        return self._prior

    def choose(self, drafts: list[tuple[int, float]], found: list[float] | None = None) -> int:
        """The step's width (1: a plain step) for rows with (drafts available, acceptance);
        ``found``: the chance each row has those drafts at all (1 when they are in hand)."""
        rows = len(drafts)
        chance = found or [1.0] * rows
        beta = self.beta_for(rows)
        best, best_value = 1, float(rows)
        for width in range(2, max((d for d, _ in drafts), default=0) + 2):
            gain = sum(p * expected_kept(alpha, min(d, width - 1)) for (d, alpha), p in zip(drafts, chance, strict=True))
            value = (rows + gain) / (1 + beta * rows * (width - 1))
            if value > best_value * 1.02:  # a wide step must clearly win: it also gives up pipelining
                best, best_value = width, value
        return best


# --- the step ----------------------------------------------------------------------


class Speculator:
    """Drafts and verifies for a generator's running batch (see the module docstring).

    ``register(uid, counts, sampling, enabled)`` when a sequence is inserted (``sampling`` None
    for greedy; ``counts`` gets its drafted/accepted tokens); ``forget(uid)`` when it leaves.
    ``decode(batch, timed)`` replaces ``batch.next()``; ``timed``: the step ran alone (no prefill
    beside it), so its time may be learnt from.
    """

    def __init__(self, max_draft: int = MAX_DRAFT, always: bool = False, draft_model: Any = None):
        self.max_draft = max_draft
        self.draft_model = draft_model  # worker/draft_model.py DraftModel: drafts from it, not from the prompt
        self.always = always  # widen whenever a row has drafts, whatever they cost (--speculative always)
        self.cost = StepCost()
        self._rows: dict[int, _Row] = {}
        self._previous: tuple[str, int, int, float] | None = None  # (kind, rows, width, since), for its cost
        self._pending: list[int] = []  # each row's pending token (sampled, not yet in its cache), this step
        self.drafted_tokens = 0
        self.accepted_tokens = 0
        self.wide_steps = 0
        self.overall = Acceptance(0.99)  # every sequence's drafts: the prior for a new one
        self._plain_with_drafts = 0  # plain steps in a row that had drafts: a probe is due at PROBE_AFTER

    def register(self, uid: int, counts: Counts | None, sampling: Sampling | None, enabled: bool = True) -> None:
        self._rows[uid] = _Row(counts, sampling, enabled)

    def forget(self, uid: int) -> None:
        self._rows.pop(uid, None)

    def decode(self, batch: GenerationBatch, timed: bool = True) -> list[Any]:
        if not batch.uids:
            self.pause()
            return []
        start = drafting = time.perf_counter()
        plan = None
        if self._worth_planning(batch):  # else a plain step, pipelined as mlx-lm's: no wait here
            mx.eval(batch._next_tokens)  # waits for the previous step, if it was a plain (pipelined) one
            self._pending = batch._next_tokens.tolist()  # type: ignore[assignment]
            drafting = time.perf_counter()
            plan = self._plan(batch)
        self._timed(start, plan is None, timed)
        if plan is None:
            responses = batch.next()
            self._previous = ("plain", len(batch.uids), 1, start)
            return responses
        responses = self._wide_step(batch, plan)
        self._previous = ("wide", len(plan), max(len(d) for d in plan) + 1, drafting)
        return responses

    def pause(self) -> None:
        """No decode step ran: the next one's time says nothing about the last one's."""
        self._previous = None

    def _worth_planning(self, batch: GenerationBatch) -> bool:
        """Whether drafts could pay this step, were every row to find a full draft: drafting
        needs the pending tokens, which costs a pipelined step its overlap."""
        prior = self.overall.chance(0.5)
        best: list[tuple[int, float]] = []
        found: list[float] = []
        for room, row in zip(self._rooms(batch), (self._rows.get(uid) for uid in batch.uids), strict=True):
            best.append((room, row.acceptance.chance(prior)) if room and row is not None else (0, 0.0))
            found.append(row.found if room and row is not None and self.draft_model is None else 1.0)
        if not any(room for room, _ in best):
            return False
        if self.always or self._plain_with_drafts >= PROBE_AFTER or self.cost.choose(best, found) > 1:
            return True
        self._plain_with_drafts += 1
        return False

    def _rooms(self, batch: GenerationBatch) -> list[int]:
        """How many tokens each row may draft this step (0: none, or speculation off for it)."""
        rooms = []
        for i, uid in enumerate(batch.uids):
            row = self._rows.get(uid)
            room = min(self.max_draft, batch.max_tokens[i] - batch._num_tokens[i] - 1)
            rooms.append(max(room, 0) if row is not None and row.enabled else 0)
        return rooms

    def _timed(self, now: float, plain: bool, timed: bool) -> None:
        """The previous step's cost, as the time until this one started (the engine's work on its
        tokens included): a wide step's from its plan (it ran synchronously); a plain step's only
        when this one is plain too, since a wide step first waits for the plain one before it."""
        previous, self._previous = self._previous, None
        if previous is None or not timed:  # ``timed``: no prefill ran beside the previous step
            return
        kind, rows, width, since = previous
        if kind == "wide":
            self.cost.wide(rows, width, now - since)
        elif plain:
            self.cost.plain(rows, now - since)

    def _plan(self, batch: GenerationBatch) -> list[list[int]] | None:
        """Each row's drafts for a wide step, or None for a plain one."""
        rows = [self._rows.get(uid) for uid in batch.uids]
        if not any(r is not None and r.enabled for r in rows):
            return None
        pending = self._pending
        rooms = self._rooms(batch)
        drafts: list[list[int]] = []
        if self.draft_model is not None:
            drafts = self.draft_model.draft(batch, pending, rooms)
        for i, row in enumerate(rows):
            if self.draft_model is not None or row is None or rooms[i] < 1:
                if self.draft_model is None:
                    drafts.append([])
                continue
            if row.lookup is None:
                row.lookup = PromptLookup()
            drafts.append(row.lookup.draft(batch.tokens[i], pending[i], rooms[i]))
            row.found = 0.8 * row.found + 0.2 * bool(drafts[-1])
        longest = max(len(d) for d in drafts)
        prior = self.overall.chance(0.5)
        if self.always:
            width = longest + 1
        else:
            width = self.cost.choose([(len(d), r.acceptance.chance(prior) if r is not None else 0.0)
                                      for d, r in zip(drafts, rows, strict=True)])
            if width == 1 and longest:
                # Estimates only improve by drafting: now and then a narrow step tries the drafts
                # (and measures what a wide step costs at this batch size).
                self._plain_with_drafts += 1
                if self._plain_with_drafts >= PROBE_AFTER:
                    width = min(longest, PROBE_WIDTH - 1) + 1
        if width > 1:
            self._plain_with_drafts = 0
        if width == 1:
            for d, row in zip(drafts, rows, strict=True):
                if d and row is not None:
                    row.idle()
            if self.draft_model is not None:
                self.draft_model.judged(batch)  # none kept: what it fed past the pending token goes
            return None
        return [d[: width - 1] for d in drafts]

    def _wide_step(self, batch: GenerationBatch, drafts: list[list[int]]) -> list[Any]:
        pending = self._pending
        width = max(len(d) for d in drafts) + 1
        inputs = mx.array([[p] + d + [p] * (width - 1 - len(d)) for p, d in zip(pending, drafts, strict=True)])
        caches = make_holey(batch.prompt_cache)
        logits = batch.model(inputs, cache=caches)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)

        kept, following, following_logprobs = self._verify(batch, pending, drafts, logits, logprobs)

        # The cache: positions fed but not kept leave it (trimmed alike, the rest as holes).
        drop_last(caches, [width - 1 - k for k in kept])

        responses: list[Any] = []
        keep_rows: list[int] = []
        for i, uid in enumerate(batch.uids):
            row = self._rows.get(uid)
            if drafts[i] and row is not None:
                row.judged(len(drafts[i]), kept[i])
                self.overall.judged(len(drafts[i]), kept[i])
                self.drafted_tokens += len(drafts[i])
                self.accepted_tokens += kept[i]
            emitted = [pending[i]] + drafts[i][: kept[i]]
            batch.tokens[i].extend(emitted)
            finished = False
            for j, token in enumerate(emitted):
                batch._num_tokens[i] += 1
                reason = "length" if batch._num_tokens[i] >= batch.max_tokens[i] else None
                if batch._matchers[i].advance(token):
                    reason = "stop"
                token_logprobs = batch._next_logprobs[i] if j == 0 else logprobs[i, j - 1]
                if reason is not None:
                    responses.append(GenerationBatch.Response(uid, token, token_logprobs, reason,
                                                              batch.extract_cache(i), batch.tokens[i]))
                    finished = True
                    break
                responses.append(GenerationBatch.Response(uid, token, token_logprobs, None, None, None))
            if not finished:
                keep_rows.append(i)
        self.wide_steps += 1
        if self.draft_model is not None:
            self.draft_model.judged(batch)  # before rows leave: its rows are the batch's
        batch._current_tokens = mx.array(pending)  # type: ignore[assignment]
        batch._next_tokens = mx.array(following, dtype=mx.uint32)
        batch._next_logprobs = following_logprobs
        if len(keep_rows) < len(batch.uids):
            batch.filter(keep_rows)
        return responses

    def _verify(self, batch: GenerationBatch, pending: list[int], drafts: list[list[int]], logits: mx.array,
                logprobs: mx.array) -> tuple[list[int], list[int], list[mx.array]]:
        """Per row: how many drafts are kept, the token that follows them, and its logprobs."""
        rows = len(pending)
        kept = [0] * rows
        following = [0] * rows
        following_logprobs: list[Any] = [None] * rows
        lazy: dict[int, Any] = {}  # rows judged in one evaluation: no processors
        for i in range(rows):
            if batch.logits_processors and batch.logits_processors[i]:
                continue
            lazy[i] = self._judge_all(batch, i, drafts[i], logprobs[i])
        mx.eval(list(lazy.values()))
        for i, judged in lazy.items():
            k = len(drafts[i])
            n = 0
            if not k:
                following[i] = judged.item()
            elif self._sampling(batch, i) is None:
                choices = judged.tolist()
                while n < k and choices[n] == drafts[i][n]:
                    n += 1
                following[i] = choices[n]
            else:
                keep_chance, uniforms, residuals, last = (a.tolist() for a in judged)
                while n < k and uniforms[n] < keep_chance[n]:
                    n += 1
                following[i] = residuals[n] if n < k else last[0]
            kept[i] = n
            following_logprobs[i] = logprobs[i, n]
        for i in range(rows):
            if i not in lazy:
                kept[i], following[i], following_logprobs[i] = self._judge_stepwise(batch, i, pending[i], drafts[i],
                                                                                    logits[i])
        return kept, following, following_logprobs

    def _sampling(self, batch: GenerationBatch, i: int) -> Sampling | None:
        row = self._rows.get(batch.uids[i])
        if row is not None:
            return row.sampling
        sampler = batch.samplers[i] if batch.samplers else None
        if sampler is None or sampler is greedy_sampler:
            return None
        raise ValueError("a sampled sequence needs its sampling registered to speculate")

    def _judge_all(self, batch: GenerationBatch, i: int, drafts: list[int], logprobs: mx.array) -> Any:
        """Lazily, for a row without logits processors: greedy, the argmax at every position;
        sampled, each draft's chance, a uniform draw each, the replacement drawn at each position,
        and the token drawn after all drafts (by the row's own sampler, as a plain step)."""
        k = len(drafts)
        sampling = self._sampling(batch, i) if k else None
        if sampling is None and k:
            return mx.argmax(logprobs[: k + 1], axis=-1)
        sampler = batch.samplers[i] if batch.samplers and batch.samplers[i] is not None else batch.fallback_sampler
        last = sampler(logprobs[k: k + 1])
        if not k:
            return last  # a row without drafts: its next token, as a plain step draws it
        assert sampling is not None
        scaled = sampling.logits(logprobs[:k])
        drafted = mx.array(drafts)[:, None]
        chance = mx.take_along_axis(mx.softmax(scaled, axis=-1), drafted, axis=-1)[:, 0]
        without = mx.put_along_axis(scaled, drafted, mx.array(-float("inf"), scaled.dtype), axis=-1)
        return chance, mx.random.uniform(shape=(k,)), mx.random.categorical(without), last

    def _judge_stepwise(self, batch: GenerationBatch, i: int, pending: int, drafts: list[int],
                        logits: mx.array) -> tuple[int, int, mx.array]:
        """A row with logits processors: position by position, each on the context so far (a
        grammar consumes each token as its next position is judged), stopping at the first miss.
        Processors see the raw logits, as in a plain step."""
        processors = batch.logits_processors[i] if batch.logits_processors else []
        sampling = self._sampling(batch, i)
        sampler = batch.samplers[i] if batch.samplers and batch.samplers[i] is not None else batch.fallback_sampler
        fed = [pending] + drafts
        for j in range(len(drafts) + 1):
            context = batch._token_context[i].update_and_fetch(mx.array(fed[j: j + 1]))
            row = logits[j: j + 1]
            for processor in processors:
                row = processor(context, row)
            row = row - mx.logsumexp(row, axis=-1, keepdims=True)
            if j == len(drafts):
                return j, _int(sampler(row)), row[0]
            draft = drafts[j]
            if sampling is None:
                choice = _int(mx.argmax(row, axis=-1))
                if choice != draft:
                    return j, choice, row[0]
                continue
            scaled = sampling.logits(row)
            if _float(mx.random.uniform()) < _float(mx.softmax(scaled, axis=-1)[0, draft]):
                continue
            scaled[0, draft] = -float("inf")
            return j, _int(mx.random.categorical(scaled)), row[0]
        raise AssertionError("unreachable")
