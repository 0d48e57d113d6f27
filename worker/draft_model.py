"""A draft model for speculative decoding (``--draft-model``): a smaller model with the same
tokenizer proposes each running sequence's next tokens, greedily, in batched steps of its own.

Its KV caches are one batch, rows in the generation batch's order (rebuilt when a sequence
joins or leaves), with holes where it fed tokens the target did not keep (worker/speculative.py
``HoleyCache``). What it has seen of a sequence is always a prefix of the target's tokens
(``fed``): each draft first feeds the rest (the tokens kept since, then the pending token), so a
plain step between two drafts, or drafts only partly kept, need nothing else. A new sequence's
history is prefilled on its own first (chunked), then merged into the batch.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx_lm.generate import GenerationBatch
from mlx_lm.models.cache import BatchKVCache, KVCache

from worker.holey_cache import HoleyBatchKVCache, drop_last

PREFILL_STEP = 512  # a new sequence's history, through the draft model, this many tokens a call


class DraftModel:
    def __init__(self, model: Any, vocab_size: int | None = None):
        self.model = model
        self.vocab_size = vocab_size
        self._uids: list[int] = []
        self._fed: list[int] = []  # per row: how many of the target's tokens its draft cache holds
        self._cache: list[Any] = []
        self._proposed: list[list[int]] = []  # the last draft's tokens per row (all but the last fed)

    def draft(self, batch: GenerationBatch, pending: list[int], limits: list[int]) -> list[list[int]]:
        """Up to ``limits[i]`` greedy tokens for each row (0: none for it), after ``pending``."""
        self._follow(batch)
        longest = max(limits, default=0)
        if longest < 1:
            return [[] for _ in limits]
        # Catch up: the tokens kept since this row's last draft, then its pending token.
        feeds = [batch.tokens[i][self._fed[i]:] + [pending[i]] for i in range(len(pending))]
        token = self._feed(feeds)
        self._fed = [f + len(feed) for f, feed in zip(self._fed, feeds, strict=True)]
        drafts = [[t] for t in token]
        for _ in range(longest - 1):
            token = self._feed([[d[-1]] for d in drafts])
            for d, t in zip(drafts, token, strict=True):
                d.append(t)
        self._proposed = drafts  # fed: all but each one's last
        return [d[:limit] for d, limit in zip(drafts, limits, strict=True)]

    def judged(self, batch: GenerationBatch) -> None:
        """After the target's step: positions it fed past what the target kept become holes."""
        extra: list[int] = []
        for i, drafted in enumerate(self._proposed):
            fed_drafts = len(drafted) - 1  # the last draft was proposed, never fed
            target = len(batch.tokens[i])  # pending + kept drafts are in the target now
            kept = min(max(target - self._fed[i], 0), fed_drafts)
            extra.append(fed_drafts - kept)
            self._fed[i] += kept
        self._reject(extra)

    def _follow(self, batch: GenerationBatch) -> None:
        """Rows in the generation batch's order: leavers dropped, newcomers prefilled and merged."""
        if list(batch.uids) == self._uids:
            return
        old = {uid: i for i, uid in enumerate(self._uids)}
        singles: list[list[Any]] = []
        fed: list[int] = []
        for i, uid in enumerate(batch.uids):
            if uid in old and self._cache:
                layers = [c.extract(old[uid]) for c in self._cache]
                count = self._fed[old[uid]]
            else:
                layers, count = [KVCache() for _ in self.model.layers], 0
            history = batch.tokens[i][count:]
            for start in range(0, len(history), PREFILL_STEP):
                self.model(mx.array([history[start: start + PREFILL_STEP]]), cache=layers)
                mx.eval([c.state for c in layers if c.keys is not None])
            singles.append(layers)
            fed.append(count + len(history))
        self._cache = [BatchKVCache.merge([s[layer] for s in singles]) for layer in range(len(self.model.layers))]
        for c in self._cache:
            c.__class__ = HoleyBatchKVCache
        self._uids, self._fed = list(batch.uids), fed

    def _feed(self, rows: list[list[int]]) -> list[int]:
        """Each row's tokens through the draft model (right-padded); its greedy next token."""
        width = max(len(r) for r in rows)
        inputs = mx.array([r + [r[-1]] * (width - len(r)) for r in rows])
        logits = self.model(inputs, cache=self._cache)
        last = mx.array([len(r) - 1 for r in rows])[:, None, None]
        chosen = mx.take_along_axis(logits, last, axis=1)[:, 0]
        if self.vocab_size is not None:  # a draft model with a larger (padded) vocabulary
            chosen = chosen[:, : self.vocab_size]
        tokens: list[int] = mx.argmax(chosen, axis=-1).tolist()  # type: ignore[assignment]
        self._reject([width - len(r) for r in rows])
        return tokens

    def _reject(self, counts: list[int]) -> None:
        drop_last(self._cache, counts)
