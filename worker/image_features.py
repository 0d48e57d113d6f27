"""Image features in the language model: what a vision worker (worker/vision.py) adds to mlx-lm's.

``FeatureTable`` keeps the vision tower's output by image, and maps each image's virtual token
ids (ids above the vocabulary, from a hash of the image and its caller) to its feature rows.
``ImageEmbeddingModel`` wraps mlx-lm's language model so that a step whose input holds such ids
gets those rows as its input embeddings; every other step is the language model's own.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np


class FeatureError(RuntimeError):
    """The feature table cannot serve a request's image ids: it fails the request, never runs it on
    another image's features or on zeros."""


class FeatureTable:
    """Image features by image key, for the language model's virtual image token ids.

    A key is a hash of the caller's cache scope and the image (``_scoped``), so one caller's cached
    image is never a hit (nor a timing signal) for another. A virtual id maps to one live key only:
    a new entry whose ids collide with an unpinned entry's evicts it; with a pinned one's, the new
    request fails (``FeatureError``) rather than read the other image's rows.

    An entry is pinned (``pin``, before it is ``put``) while a request that needs it has not finished
    its prefill; unpinned ones stay, least recently used out first, within ``budget`` bytes (an image
    sent again is not encoded again), and pinned ones are never evicted. Written and read on the
    engine thread only; ``pinned`` is read by the model wrapper."""

    def __init__(self, budget: int):
        self.budget = budget
        self._entries: OrderedDict[str, tuple[np.ndarray, mx.array]] = OrderedDict()  # key -> (ids, features)
        self._where: dict[int, tuple[str, int]] = {}  # virtual id -> (key, row)
        self._pins: dict[str, int] = {}
        self._pinned_ids: dict[int, str] = {}  # the ids of pinned keys -> their key
        self.nbytes = 0

    @property
    def pinned(self) -> bool:
        return bool(self._pins)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def put(self, key: str, ids: np.ndarray, features: mx.array) -> None:
        if key in self._entries:
            return
        tokens = ids.tolist()
        owners = {where[0] for token in tokens if (where := self._where.get(token)) is not None and where[0] != key}
        owners |= {owner for token in tokens if (owner := self._pinned_ids.get(token)) not in (None, key)}
        if any(owner in self._pins for owner in owners):
            raise FeatureError("an image's token ids collide with another image's in use; retry the request")
        for owner in owners:
            self._drop(owner)
        self._entries[key] = (ids, features)
        for row, token in enumerate(tokens):
            self._where[token] = (key, row)
        self.nbytes += features.nbytes
        self._evict()

    def pin(self, key: str, ids: np.ndarray | None = None) -> None:
        """Keep ``key`` (whose virtual ids are ``ids``) until as many ``unpin``; pinned before it is put,
        so that putting it (or any other entry) cannot evict it."""
        tokens = [] if ids is None else ids.tolist()
        if any(self._pinned_ids.get(token, key) != key for token in tokens):
            raise FeatureError("an image's token ids collide with another image's in use; retry the request")
        self._pins[key] = self._pins.get(key, 0) + 1
        for token in tokens:
            self._pinned_ids[token] = key
        if key in self._entries:
            self._entries.move_to_end(key)

    def unpin(self, key: str) -> None:
        left = self._pins.get(key, 0) - 1
        if left > 0:
            self._pins[key] = left
        else:
            self._pins.pop(key, None)
            for token in [t for t, owner in self._pinned_ids.items() if owner == key]:
                del self._pinned_ids[token]
        self._evict()

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        ids, features = entry
        self.nbytes -= features.nbytes
        for token in ids.tolist():
            if self._where.get(token, (None,))[0] == key:
                del self._where[token]

    def _evict(self) -> None:
        for key in list(self._entries):
            if self.nbytes <= self.budget:
                return
            if key not in self._pins:
                self._drop(key)

    def rows(self, tokens: np.ndarray, width: int) -> mx.array:
        """The feature rows of ``tokens`` (virtual ids), in order. An id of a pinned image with no
        entry raises ``FeatureError`` (the batch fails: never KV from wrong features); any other id
        with no entry (a draft of speculative decoding copied from a prompt's image tokens: never
        accepted, as no sampled token is an image id) gets zeros."""
        listed = tokens.tolist()
        found = [self._where.get(token) for token in listed]
        missing = [token for token, where in zip(listed, found, strict=True) if where is None]
        if any(token in self._pinned_ids for token in missing):
            raise FeatureError("an image's features are missing from the feature table")
        keys = {where[0] for where in found if where is not None}
        if len(keys) == 1 and not missing:
            (key,) = keys
            return mx.take(self._entries[key][1], mx.array([where[1] for where in found if where]), axis=0)
        zeros = mx.zeros((width,))
        return mx.stack([self._entries[where[0]][1][where[1]] if where is not None else zeros for where in found])


class ImageEmbeddingModel(nn.Module):
    """mlx-lm's language model, with image features in place of the virtual image token ids.

    ``BatchGenerator`` calls it as any mlx-lm model: ``model(tokens, cache=cache)``. While some
    request's image tokens may still be prefilled (the feature table has pinned entries) each call
    reads its input ids back (a small copy; decode steps then wait for the previous step) and, when
    any is an image id, builds the input embeddings itself. Otherwise it is the language model (image
    ids, which then can only be speculative drafts, clipped into the vocabulary)."""

    def __init__(self, language: nn.Module, vocab_size: int, features: FeatureTable):
        super().__init__()
        self.language = language
        self.vocab_size = vocab_size
        self._features = features
        if hasattr(language, "make_cache"):
            self.make_cache = language.make_cache

    @property
    def layers(self) -> Any:
        return self.language.layers

    @property
    def args(self) -> Any:
        return getattr(self.language, "args", None)

    @property
    def model_type(self) -> Any:
        return getattr(self.language, "model_type", None)

    def __call__(self, inputs: mx.array, cache: Any = None, **kwargs: Any) -> mx.array:
        if not self._features.pinned:
            # Image ids here can only be drafts (speculative decoding's prompt lookup), never accepted:
            # any in-range id will do, without reading the inputs back.
            return self.language(mx.minimum(inputs, self.vocab_size - 1), cache=cache, **kwargs)
        ids = np.array(inputs)
        virtual = ids >= self.vocab_size
        if not virtual.any():
            return self.language(inputs, cache=cache, **kwargs)
        text_ids = mx.array(np.where(virtual, 0, ids))
        embed = self.embed_tokens
        h = embed(text_ids)
        shape = h.shape
        flat = h.reshape(-1, shape[-1])
        positions = np.flatnonzero(virtual.reshape(-1))
        rows = self._features.rows(ids.reshape(-1)[positions], shape[-1])
        flat[mx.array(positions)] = rows.astype(flat.dtype)
        return self.language(text_ids, cache=cache, input_embeddings=flat.reshape(shape), **kwargs)

    @property
    def embed_tokens(self) -> nn.Module:
        inner = getattr(self.language, "model", None) or getattr(self.language, "language_model", None)
        return inner.embed_tokens  # type: ignore[union-attr]
