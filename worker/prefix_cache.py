"""KV caches of finished prompts, by token prefix (mlx-lm's ``LRUPromptCache``): an agent's next
turn resends the whole conversation, and only its new tail needs prefilling.

The engine stores a prompt's cache when its prefill ends and a sequence's when it finishes, and
hands a new prompt the longest cached prefix. Runs on the engine thread.

Entries belong to a scope (``Generate.cache_scope``: the gateway's hash of the caller's API
key): a prompt is served only from its own scope's entries, so that one key cannot learn
another's prompt from cache hits (``cached_tokens``) or from how fast its first token comes.
mlx-lm's cache keys entries by model; a worker has one model, so the scope takes that place.

With a disk tier (worker/disk_cache.py), ``on_evict(scope, tokens, cache)`` is told of every
entry the budget pushes out of RAM (not of shorter prefixes a longer entry supersedes), and
``entries()`` lists what is left, for writing out when the worker stops.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import LRUPromptCache, can_trim_prompt_cache, trim_prompt_cache

from worker.batching import cached_prefix_length

log = logging.getLogger(__name__)


_PREFIX = "scope:"


def _key(scope: str) -> str:
    return f"{_PREFIX}{scope}"


Evicted = Callable[[str, list[int], list[Any]], object]  # (scope, tokens, KV cache)


class PrefixCache:
    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self._cache = LRUPromptCache(max_size=256, max_bytes=budget_bytes)
        self._version = 0  # bumped whenever an entry is stored
        self._peeks: dict[int, tuple[int, int]] = {}  # uid -> (version, cached tokens)
        self.on_evict: Evicted | None = None
        # mlx-lm's LRU evicts (for its size limits and trim_to) through its trie's pop alone.
        trie = self._cache._trie
        pop = trie.pop

        def popped(model: Any, tokens: list[int]) -> Any:
            entry = pop(model, tokens)
            if self.on_evict is not None and entry is not None and isinstance(model, str):
                try:
                    self.on_evict(model[len(_PREFIX):], list(tokens), entry.prompt_cache)
                except Exception:  # the disk tier's trouble never fails the RAM cache
                    log.exception("spilling a prefix-cache entry failed")
            return entry

        trie.pop = popped  # type: ignore[method-assign]

    @property
    def nbytes(self) -> int:
        return self._cache.nbytes

    def store(self, scope: str, tokens: list[int], cache: list[Any], running_bytes: int) -> None:
        """Keep a KV cache for later prompts that share the prefix ``tokens``. ``running_bytes``:
        the running batch's caches, which count against the same budget."""
        # The extracted cache is a lazy copy of a slice of the batch's KV arrays; until it is
        # evaluated it keeps those whole arrays alive (~5x the bytes the cache accounts for).
        mx.eval([layer.state for layer in cache])
        self._cache.insert_cache(_key(scope), list(tokens), cache)
        self._cache.trim_to(n_bytes=self.budget_bytes - running_bytes)
        self._version += 1

    def fetch(self, scope: str, prompt: list[int]) -> tuple[list[Any] | None, list[int]]:
        """(a KV cache for the longest prefix of ``prompt`` cached in ``scope``, or None; the
        tokens still to prefill)."""
        cache, rest = self._cache.fetch_nearest_cache(_key(scope), prompt)
        if cache is not None and not rest:
            # The whole prompt is cached, but the model must see one token to predict the next.
            if not can_trim_prompt_cache(cache):
                return None, prompt
            trim_prompt_cache(cache, 1)
            rest = prompt[-1:]
        return cache, rest

    def cached_length(self, scope: str, prompt: list[int]) -> int:
        """How many of ``prompt``'s tokens ``fetch`` would supply now, nothing copied."""
        return cached_prefix_length(self._cache, _key(scope), prompt)

    def peek(self, uid: int, scope: str, prompt: list[int]) -> int:
        """``cached_length`` for a waiting prompt, recomputed only once the cache has changed:
        the scheduler asks every step."""
        version, cached = self._peeks.get(uid, (-1, 0))
        if version != self._version:
            cached = self.cached_length(scope, prompt)
            self._peeks[uid] = (self._version, cached)
        return cached

    def drop_peek(self, uid: int) -> None:
        """The prompt started its prefill or left: no more peeks for it."""
        self._peeks.pop(uid, None)

    def drop_peeks(self) -> None:
        self._peeks.clear()

    def entries(self) -> list[tuple[str, list[int], list[Any]]]:
        """Every entry as (scope, tokens, KV cache), the most recently used first."""
        lru = self._cache._lru
        order = [key for kind in lru._ordering for key in lru._lrus[kind]]
        found = []
        for model, tokens in reversed(order):
            entry = self._cache._trie.get(model, tokens)
            if entry is not None and isinstance(model, str):
                found.append((model[len(_PREFIX):], list(tokens), entry.prompt_cache))
        return found
