"""The KV cache with holes: how speculative decoding (worker/speculative.py, worker/draft_model.py)
gives back positions a row fed but did not keep.

A wide step feeds every row ``[pending, drafts...]``; afterwards each row must lose the positions
it rejected, by different counts. Every row's cache is trimmed by the fewest any row rejected, and
a row that rejected more gets the rest as *holes*: masked out of attention and out of its RoPE
offset, so the next tokens see exactly the cache they would have without speculation. Holes are
squeezed out when a row has ``COMPACT_AT`` of them or an eighth of the cache (one gather of the
batch's KV; masked holes cost attention almost nothing meanwhile) and whenever a cache is extracted
(the prefix cache stores contiguous caches).
"""

from __future__ import annotations

import copy
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache

from worker.quantized_cache import BatchQuantizedKVCache

COMPACT_AT = 64  # holes in one row (or an eighth of the cache, if more) that trigger squeezing it


class HoleyCache:
    """Mixed into mlx-lm's ``BatchKVCache`` (or our ``BatchQuantizedKVCache``): positions a row
    fed but did not keep become holes, masked out of attention, instead of shifting the row.
    ``_hole``: bool [rows, <= _idx], True at a hole (None: no holes); positions past its length
    are not holes. ``offset`` (each row's RoPE position) counts kept tokens only."""

    _hole: mx.array | None = None
    _hole_counts: list[int] | None = None
    keys: Any
    values: Any
    offset: mx.array
    left_padding: mx.array
    _idx: int

    def _holes_to(self, length: int) -> mx.array:
        """The hole mask padded (with False) or cut to ``length`` positions."""
        rows = self.offset.shape[0]
        hole = self._hole if self._hole is not None else mx.zeros((rows, 0), dtype=mx.bool_)
        if hole.shape[1] >= length:
            return hole[:, :length]
        return mx.concatenate([hole, mx.zeros((rows, length - hole.shape[1]), dtype=mx.bool_)], axis=1)

    def make_mask(self, N: int, return_array: bool = False, **kwargs: Any) -> Any:  # noqa: N803 (mlx-lm's name)
        mask = super().make_mask(N, return_array=return_array, **kwargs)  # type: ignore[misc]
        if self._hole is None:
            return mask
        keep = mx.logical_not(self._holes_to(self._idx + N))
        return mx.logical_and(mask, keep[:, None, None, :])

    def trim(self, n: int) -> int:
        n = super().trim(n)  # type: ignore[misc]
        if self._hole is not None and self._hole.shape[1] > self._idx:
            self._hole = self._hole[:, : self._idx]
        return n

    def reject(self, counts: list[int]) -> None:
        """The last ``counts[i]`` positions of row ``i`` become holes."""
        if not any(counts):
            return
        positions = mx.arange(self._idx)[None, :]
        tail = positions >= (self._idx - mx.array(counts))[:, None]
        self._hole = mx.logical_or(self._holes_to(self._idx), tail)
        self.offset = self.offset - mx.array(counts)
        self._hole_counts = [h + c for h, c in zip(self._hole_counts or [0] * len(counts), counts, strict=True)]

    @property
    def most_holes(self) -> int:
        return max(self._hole_counts or [0], default=0)

    def kept_index(self) -> tuple[mx.array, mx.array, int]:
        """Where each row's kept positions are, right-aligned ([rows, longest]; a shorter row's
        first entries point at positions it does not keep: its new left padding), its new left
        padding, and the longest row's count. Computed in MLX; one sync (the count)."""
        positions = mx.arange(self._idx)[None, :]
        kept = mx.logical_and(positions >= self.left_padding[:, None], mx.logical_not(self._holes_to(self._idx)))
        counts = kept.sum(axis=1)
        longest = _int(counts.max()) if self._idx else 0
        # Sorted, positions not kept come first and kept ones after, each in order.
        order = mx.argsort(mx.where(kept, positions + self._idx, positions), axis=1)
        return order[:, self._idx - longest:], longest - counts, longest

    def compact(self, index: tuple[mx.array, mx.array, int] | None = None) -> None:
        """Squeeze the holes out: every row's kept positions right-aligned again (one gather).
        ``index``: ``kept_index()`` of a layer with the same holes (every layer has), to reuse."""
        if self._hole is None:
            return
        order, padding, longest = index or self.kept_index()
        self.keys = _take(self.keys, order)
        self.values = _take(self.values, order)
        self.left_padding = padding.astype(self.left_padding.dtype)
        self._idx = longest
        self._hole, self._hole_counts = None, None

    def extract(self, idx: int) -> Any:
        if self._hole is None or not (self._hole_counts or [0])[idx]:
            return super().extract(idx)  # type: ignore[misc]
        row = copy.copy(self)  # the row alone, its holes squeezed out, extracted as mlx-lm does
        row.keys = _map(lambda a: a[idx: idx + 1], self.keys)
        row.values = _map(lambda a: a[idx: idx + 1], self.values)
        row.offset, row.left_padding = self.offset[idx: idx + 1], self.left_padding[idx: idx + 1]
        row._hole, row._hole_counts = self._hole[idx: idx + 1], [self._hole_counts[idx]]  # type: ignore[index]
        row.compact()
        return super(HoleyCache, row).extract(0)  # type: ignore[misc]

    def filter(self, batch_indices: Any) -> None:
        keep = list(batch_indices)
        if self._hole is not None and keep:
            mx.eval(self.left_padding)
            padding: list[int] = self.left_padding.tolist()  # type: ignore[assignment]
            shift = min(padding[i] for i in keep)  # what mlx-lm's filter cuts off the left
            hole = self._holes_to(self._idx)[mx.array(keep)]
            counts = [self._hole_counts[i] for i in keep]  # type: ignore[index]
        super().filter(batch_indices)  # type: ignore[misc]
        if self._hole is None:
            return
        if not keep:
            self._hole, self._hole_counts = None, None
            return
        self._hole, self._hole_counts = hole[:, shift:], counts
        if not any(counts):
            self._hole, self._hole_counts = None, None

    def extend(self, other: Any) -> None:
        mine = self._holes_to(self._idx) if self._hole is not None else None
        theirs = other._holes_to(other._idx) if isinstance(other, HoleyCache) and other._hole is not None else None
        if mine is None and theirs is None:
            super().extend(other)  # type: ignore[misc]
            return
        rows_mine, rows_theirs = self.offset.shape[0], other.offset.shape[0]
        counts = (self._hole_counts or [0] * rows_mine) + ((other._hole_counts if theirs is not None else None)
                                                          or [0] * rows_theirs)
        idx_mine, idx_theirs = self._idx, other._idx
        super().extend(other)  # type: ignore[misc]
        # mlx-lm right-aligns both at the longer one's _idx: pad each hole mask on the left alike
        parts = []
        for hole, rows, idx in ((mine, rows_mine, idx_mine), (theirs, rows_theirs, idx_theirs)):
            hole = hole if hole is not None else mx.zeros((rows, idx), dtype=mx.bool_)
            parts.append(mx.concatenate([mx.zeros((rows, self._idx - idx), dtype=mx.bool_), hole], axis=1))
        self._hole, self._hole_counts = mx.concatenate(parts, axis=0), counts


class HoleyBatchKVCache(HoleyCache, BatchKVCache):
    pass


class HoleyBatchQuantizedKVCache(HoleyCache, BatchQuantizedKVCache):
    pass


_HOLEY = {BatchKVCache: HoleyBatchKVCache, BatchQuantizedKVCache: HoleyBatchQuantizedKVCache}


def drop_last(caches: list[Any], counts: list[int]) -> None:
    """Each row's last ``counts[i]`` positions leave every layer's cache: all rows trimmed by the
    fewest, the rest as holes; squeezed out at ``COMPACT_AT`` holes in a row or an eighth of the cache."""
    fewest = min(counts, default=0)
    for cache in caches:
        cache.trim(fewest)
        cache.reject([c - fewest for c in counts])
    if caches and caches[0].most_holes >= max(COMPACT_AT, caches[0]._idx // 8):
        index = caches[0].kept_index()  # the same holes in every layer
        for cache in caches:
            cache.compact(index)


def make_holey(caches: list[Any]) -> list[HoleyCache]:
    for cache in caches:
        if type(cache) in _HOLEY:
            cache.__class__ = _HOLEY[type(cache)]
    return caches


def _map(f: Any, x: Any) -> Any:
    return tuple(f(a) for a in x) if isinstance(x, tuple) else f(x)


def _take(x: Any, index: mx.array) -> Any:
    """Positions ``index`` [rows, n] of every row of a cache tensor [rows, heads, positions, dim]
    (or of each array of a quantized triple)."""
    return _map(lambda a: mx.take_along_axis(a, index[:, None, :, None], axis=2), x)


def _int(a: mx.array) -> int:
    return int(a.item())  # type: ignore[arg-type]
