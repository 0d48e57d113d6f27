"""Quantized KV caches for continuous batching (``--kv-bits``).

mlx-lm quantizes the KV cache of one sequence (``QuantizedKVCache``, each of keys and values
stored as ``mx.quantize``'s triple: packed weights, scales, biases) but its ``BatchGenerator``
batches only unquantized caches (``BatchKVCache``). ``BatchQuantizedKVCache`` is
``BatchKVCache`` with quantized storage: the same left padding, per-sequence offsets, write
index, masks, trimming, right-padding roll (``prepare``/``finalize``), ``filter``, ``extend``,
``extract`` and ``merge``, every operation applied to the three arrays of a triple alike (all
have the sequence on axis 2). Its ``bits`` and ``group_size`` make mlx-lm's attention
(``models/base.scaled_dot_product_attention``) take ``quantized_scaled_dot_product_attention``
when decoding: on a GPU two ``mx.quantized_matmul`` over the packed cache, on the CPU (whose
quantized matmul is several times slower for attention's shapes) the same sums a chunk of the
cache at a time (worker/quantized_attention.py, which this module installs). A prefill chunk, and
on the CPU a step over a cache small enough to fit the CPU's caches, attends to the cache
dequantized through MLX's fused attention instead (the cache hides its ``bits`` for that call; see
``update_and_fetch``). Either way the values attended to are the same.

Only what is stored is quantized: positions (RoPE offsets), masks and trimming count tokens
exactly as the unquantized cache does. A chunk's own keys are quantized before it attends to
them (as mlx-lm's ``QuantizedKVCache`` does), so prefill and decoding see the same cache.

``extract`` gives a single sequence's cache as a ``QuantizedKVCache`` (this module's subclass,
whose class name is mlx-lm's, so ``save_prompt_cache``/``load_prompt_cache`` round-trip it as
mlx-lm's own): the prefix cache stores, trims and hands it back like any other entry, and
``batchable`` turns whatever comes back (mlx-lm's class, a cache of other bits, an unquantized
``KVCache``) into one that merges into the batch.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx_lm.models import cache as mlx_cache
from mlx_lm.models.base import create_causal_mask

from worker import quantized_attention

KV_BITS = (2, 3, 4, 5, 6, 8)  # what mx.quantize packs
KV_GROUP_SIZES = (32, 64, 128)  # what mx.quantize groups by; the head dimension must divide by it
DEFAULT_KV_GROUP_SIZE = 64  # mlx-lm's

Triple = tuple[mx.array, mx.array, mx.array]

quantized_attention.install()  # decoding over these caches on the CPU (see update_and_fetch)


class QuantizedKVCache(mlx_cache.QuantizedKVCache):
    """mlx-lm's ``QuantizedKVCache`` (same name, state and behaviour), with what batching needs:
    ``size()`` (mlx-lm's says 0) and ``merge`` into a ``BatchQuantizedKVCache``."""

    keys: Any  # None, or mx.quantize's (weights, scales, biases)
    values: Any

    def size(self) -> int:
        return int(self.offset)

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return sum(int(a.nbytes) for a in (*self.keys, *self.values))

    @classmethod
    def merge(cls, caches: list[Any]) -> BatchQuantizedKVCache:
        return BatchQuantizedKVCache.merge(caches)


def _map(f: Any, *triples: Triple) -> Triple:
    a, b, c = (f(*parts) for parts in zip(*triples, strict=True))
    return a, b, c


def _quantize(x: mx.array, group_size: int, bits: int) -> Triple:
    w, scales, biases = mx.quantize(x, group_size=group_size, bits=bits)
    return w, scales, biases


def dequantize(triple: Triple, group_size: int, bits: int) -> mx.array:
    """``mx.dequantize``, for 8 and 4 bits as a byte view and a multiply-add: MLX's CPU
    ``dequantize`` took 10.6 ms for 16 × 3 × 1,100 × 64 keys where the byte view's cast took 1.2."""
    w, scales, biases = triple
    if bits not in (4, 8):
        return mx.dequantize(w, scales, biases, group_size=group_size, bits=bits)
    packed = mx.view(w, mx.uint8)  # little-endian: element i of a word is its byte i (8 bits)
    if bits == 4:  # or byte i // 2's low (even i) or high (odd i) nibble
        packed = mx.stack([packed & 0xF, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)
    *lead, dim = packed.shape
    groups = packed.reshape(*lead, dim // group_size, group_size).astype(scales.dtype)
    return (groups * scales[..., None] + biases[..., None]).reshape(*lead, dim)


def batchable(cache: Any, group_size: int, bits: int) -> Any:
    """One layer's single-sequence cache as one that merges into a ``BatchQuantizedKVCache`` at
    ``bits``/``group_size``: a quantized cache keeps its arrays (no copy) when they match, is
    requantized when not; an unquantized ``KVCache`` is quantized; other kinds (sliding windows,
    state-space layers) are returned as they are, and batch unquantized as before."""
    if isinstance(cache, mlx_cache.QuantizedKVCache):
        if cache.bits == bits and cache.group_size == group_size:
            if type(cache) is QuantizedKVCache:
                return cache
            out = QuantizedKVCache(group_size=group_size, bits=bits)
            out.keys, out.values, out.offset = cache.keys, cache.values, cache.offset
            return out
        if cache.keys is None:
            return QuantizedKVCache(group_size=group_size, bits=bits)
        keys, values = cache.keys_and_values()
        plain = mlx_cache.KVCache()
        plain.keys = mx.dequantize(*keys, group_size=cache.group_size, bits=cache.bits)
        plain.values = mx.dequantize(*values, group_size=cache.group_size, bits=cache.bits)
        plain.offset = cache.offset
        cache = plain
    if type(cache) is mlx_cache.KVCache:
        out = QuantizedKVCache(group_size=group_size, bits=bits)
        if cache.keys is not None:
            k, v = cache.keys_and_values()
            out.keys, out.values = _quantize(k, group_size, bits), _quantize(v, group_size, bits)
            out.offset = cache.offset
        return out
    return cache


def make_quantized_prompt_cache(model: Any, group_size: int, bits: int) -> list[Any]:
    """A new sequence's cache (mlx-lm's ``make_prompt_cache``), its ``KVCache`` layers quantized."""
    return [batchable(c, group_size, bits) for c in mlx_cache.make_prompt_cache(model)]


def check_kv_quantization(model: Any, group_size: int, bits: int) -> None:
    """Raise ValueError when this model's KV cache cannot be quantized so."""
    if bits not in KV_BITS:
        raise ValueError(f"--kv-bits must be one of {', '.join(map(str, KV_BITS))}")
    if group_size not in KV_GROUP_SIZES:
        raise ValueError(f"--kv-group-size must be one of {', '.join(map(str, KV_GROUP_SIZES))}")
    cache = mlx_cache.make_prompt_cache(model)
    if not any(type(c) is mlx_cache.KVCache for c in cache):
        raise ValueError("this model has no plain KV cache layer to quantize")
    for dim in _head_dims(model):
        if dim % group_size:
            raise ValueError(f"the model's head dimension {dim} does not divide by --kv-group-size {group_size}")


def _head_dims(model: Any) -> set[int]:
    """The attention head dimensions, as the layers' key projections give them (best effort)."""
    dims: set[int] = set()
    args = getattr(model, "args", None)
    value = getattr(args, "head_dim", None)
    if isinstance(value, int) and value > 0:
        dims.add(value)
        return dims
    hidden, heads = getattr(args, "hidden_size", None), getattr(args, "num_attention_heads", None)
    if isinstance(hidden, int) and isinstance(heads, int) and heads > 0:
        dims.add(hidden // heads)
    return dims


def _ints(a: mx.array) -> list[int]:
    return [int(x) for x in a.tolist()]  # type: ignore[arg-type,union-attr]


def dynamic_roll(x: mx.array, shifts: mx.array) -> mx.array:
    return mlx_cache.dynamic_roll(x, shifts[:, None], axis=2)


class BatchQuantizedKVCache(mlx_cache._BaseCache):
    """mlx-lm's ``BatchKVCache`` (left-padded rows, ``offset`` per row, one write index
    ``_idx``), storing keys and values as ``mx.quantize`` triples of ``bits`` bits in groups of
    ``group_size``. Method for method the same bookkeeping as ``BatchKVCache`` (mlx-lm 0.32.2)."""

    step = 256

    def __init__(self, left_padding: list[int], group_size: int = DEFAULT_KV_GROUP_SIZE, bits: int = 8):
        self.keys: Triple | None = None
        self.values: Triple | None = None
        self.left_padding = mx.array(left_padding)
        self.offset = mx.array([-p for p in left_padding])
        self._idx = 0
        self._right_padding: mx.array | None = None
        self.group_size = group_size
        self._bits = bits
        self._dequantized = False  # this layer's last fetch was dequantized (see ``bits``)

    @property
    def bits(self) -> int:
        """The cache's bits; absent (AttributeError) right after a dequantized fetch (a prefill
        chunk's, or on the CPU a small cache's), so that mlx-lm's ``scaled_dot_product_attention``,
        which takes the quantized path when a cache has ``bits``, attends with MLX's fused
        attention over the dequantized keys and values. Read inside this module as ``_bits``."""
        if self._dequantized:
            raise AttributeError("bits")
        return self._bits

    def _empty(self, batch: int, heads: int, steps: int, dim: int, dtype: Any) -> Triple:
        per_int = 32 // self._bits
        return (mx.zeros((batch, heads, steps, dim // per_int), dtype=mx.uint32),
                mx.zeros((batch, heads, steps, dim // self.group_size), dtype=dtype),
                mx.zeros((batch, heads, steps, dim // self.group_size), dtype=dtype))

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[Any, Any]:
        prev = self._idx
        n = keys.shape[2]
        if self.keys is None or self.values is None or prev + n > self.keys[0].shape[2]:
            batch, heads, _, k_dim = keys.shape
            steps = (self.step + n - 1) // self.step * self.step
            new_k = self._empty(batch, heads, steps, k_dim, keys.dtype)
            new_v = self._empty(batch, heads, steps, values.shape[3], values.dtype)
            if self.keys is not None and self.values is not None:
                if prev % self.step != 0:
                    self.keys = _map(lambda a: a[..., :prev, :], self.keys)
                    self.values = _map(lambda a: a[..., :prev, :], self.values)
                self.keys = _map(lambda a, b: mx.concatenate([a, b], axis=2), self.keys, new_k)
                self.values = _map(lambda a, b: mx.concatenate([a, b], axis=2), self.values, new_v)
            else:
                self.keys, self.values = new_k, new_v
        self.offset = self.offset + n
        self._idx += n
        for stored, new in ((self.keys, _quantize(keys, self.group_size, self._bits)),
                            (self.values, _quantize(values, self.group_size, self._bits))):
            for a, b in zip(stored, new, strict=True):
                a[..., prev:self._idx, :] = b
        # A prefill chunk attends to the cache dequantized (the values the quantized matmuls would
        # read), through MLX's fused attention: on this CPU mlx-lm's quantized attention took 127 ms
        # for a 128-token chunk over 1,100 cached tokens, this 22 ms (fused over float32 keys: 27).
        # The copy is transient. A decode (or speculative) step stays quantized: on a GPU MLX's
        # quantized kernels read the packed cache; on the CPU worker/quantized_attention.py does
        # once the cache outgrows the CPU's caches (dequantizing a 16 × 4,000-token cache whole cost
        # 3× the unquantized step), and a smaller one is dequantized whole.
        if mx.default_device() == mx.cpu:
            rows, heads, _, dim = keys.shape
            self._dequantized = not quantized_attention.chunks_pay(n, rows, heads, self._idx, dim)
        else:
            self._dequantized = n > 1
        if self._dequantized:
            k, v = self.keys_and_values()
            return dequantize(k, self.group_size, self._bits), dequantize(v, self.group_size, self._bits)
        return self.keys_and_values()

    def keys_and_values(self) -> tuple[Triple, Triple]:
        assert self.keys is not None and self.values is not None
        idx = self._idx
        return _map(lambda a: a[..., :idx, :], self.keys), _map(lambda a: a[..., :idx, :], self.values)

    def prepare(self, *, left_padding: list[int] | None = None, lengths: list[int] | None = None,
                right_padding: list[int] | None = None) -> None:
        if left_padding is not None:
            if self.keys is not None:
                raise ValueError("Left padding can only be added to an empty BatchQuantizedKVCache")
            padding = mx.array(left_padding)
            self.left_padding += padding
            self.offset = self.offset - padding
        if right_padding is not None and max(right_padding) > 0:
            self._right_padding = mx.array(right_padding)

    def finalize(self) -> None:
        if self._right_padding is not None and self.keys is not None and self.values is not None:
            padding = self._right_padding
            self.keys = _map(lambda a: dynamic_roll(a, padding), self.keys)
            self.values = _map(lambda a: dynamic_roll(a, padding), self.values)
            self.offset = self.offset - padding
            self.left_padding += padding
        self._right_padding = None

    @property
    def state(self) -> Any:
        return self.keys, self.values, self.offset, self.left_padding, self._idx

    @state.setter
    def state(self, v: Any) -> None:
        self.keys, self.values, self.offset, self.left_padding, self._idx = v
        self._dequantized = False

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        n = min(self._idx, n)
        self._idx -= n
        self.offset = self.offset - n
        return n

    def make_mask(self, N: int, return_array: bool = False, **kwargs: Any) -> mx.array:  # noqa: N803 (mlx-lm's name)
        return create_causal_mask(N, offset=self._idx, left_padding=self.left_padding, **kwargs)

    def filter(self, batch_indices: Any) -> None:
        if self.keys is not None and self.values is not None:
            self.keys = _map(lambda a: a[batch_indices], self.keys)
            self.values = _map(lambda a: a[batch_indices], self.values)
        self.offset = self.offset[batch_indices]
        self.left_padding = self.left_padding[batch_indices]
        shift = min(_ints(self.left_padding))  # shift left to drop padding every row has
        if shift > 0:
            if self.keys is not None and self.values is not None:
                self.keys = _map(lambda a: a[..., shift:, :], self.keys)
                self.values = _map(lambda a: a[..., shift:, :], self.values)
            self._idx -= shift
            self.left_padding -= shift

    def extend(self, other: BatchQuantizedKVCache) -> None:
        if self.keys is None and other.keys is None:
            self.left_padding = mx.concatenate([self.left_padding, other.left_padding])
            self.offset = mx.concatenate([self.offset, other.offset])
            return
        max_idx = max(self._idx, other._idx)
        full = self if self.keys is not None else other
        assert full.keys is not None and full.values is not None
        max_size = max(c.keys[0].shape[2] for c in (self, other) if c.keys is not None)

        def pad(c: BatchQuantizedKVCache) -> tuple[Triple, Triple, mx.array, mx.array]:
            assert full.keys is not None and full.values is not None
            if c.keys is None or c.values is None:
                rows = c.offset.shape[0]
                k = _map(lambda a: mx.zeros((rows, a.shape[1], 0, a.shape[3]), dtype=a.dtype), full.keys)
                v = _map(lambda a: mx.zeros((rows, a.shape[1], 0, a.shape[3]), dtype=a.dtype), full.values)
            else:
                k, v = c.keys, c.values
            left = max_idx - c._idx
            right = max_size - k[0].shape[2] - left
            if right < 0:
                k = _map(lambda a: a[..., :right, :], k)
                v = _map(lambda a: a[..., :right, :], v)
                right = 0
            if left or right:
                widths = [(0, 0), (0, 0), (left, right), (0, 0)]
                k = _map(lambda a: mx.pad(a, widths), k)
                v = _map(lambda a: mx.pad(a, widths), v)
            return k, v, c.offset, c.left_padding + left

        (k1, v1, o1, p1), (k2, v2, o2, p2) = pad(self), pad(other)
        self.keys = _map(lambda a, b: mx.concatenate([a, b]), k1, k2)
        self.values = _map(lambda a, b: mx.concatenate([a, b]), v1, v2)
        self.offset = mx.concatenate([o1, o2])
        self.left_padding = mx.concatenate([p1, p2])
        self._idx = max_idx

    def extract(self, idx: int) -> QuantizedKVCache:
        cache = QuantizedKVCache(group_size=self.group_size, bits=self._bits)
        if self.keys is None or self.values is None:
            return cache
        padding = _ints(self.left_padding)[idx]
        end = self._idx
        cache.keys = _map(lambda a: mx.contiguous(a[idx:idx + 1, :, padding:end]), self.keys)
        cache.values = _map(lambda a: mx.contiguous(a[idx:idx + 1, :, padding:end]), self.values)
        cache.offset = end - padding
        return cache

    @classmethod
    def merge(cls, caches: list[Any]) -> BatchQuantizedKVCache:
        """Single-sequence caches (``QuantizedKVCache``s of the same bits and group size) as one
        batch, right-aligned: the shorter ones are padded on the left."""
        group_size, bits = caches[0].group_size, caches[0].bits
        if any(c.group_size != group_size or c.bits != bits for c in caches):
            raise ValueError("caches of different quantization cannot be batched together")
        lengths = [c.offset if c.keys is not None else 0 for c in caches]
        longest = max(lengths)
        if longest == 0:
            return cls([0] * len(caches), group_size, bits)
        padding = [longest - n for n in lengths]
        first = next(c for c in caches if c.keys is not None)

        def blank(triple: Triple) -> Triple:
            return _map(lambda a: mx.zeros((len(caches), a.shape[1], longest, a.shape[3]), dtype=a.dtype), triple)

        keys, values = blank(first.keys), blank(first.values)
        for i, (p, c) in enumerate(zip(padding, caches, strict=True)):
            if c.keys is None:
                continue
            n = c.offset
            for stored, own in ((keys, c.keys), (values, c.values)):
                for a, b in zip(stored, own, strict=True):
                    a[i:i + 1, :, p:p + n] = b[..., :n, :]
        cache = cls(padding, group_size, bits)
        cache.keys, cache.values = keys, values
        cache.offset = cache.offset + longest
        cache._idx = longest
        return cache

    def size(self) -> int:
        return self._idx

    def empty(self) -> bool:
        return self.keys is None

    @property
    def nbytes(self) -> int:
        if self.keys is None or self.values is None:
            return 0
        return sum(int(a.nbytes) for a in (*self.keys, *self.values))


def kv_bytes_per_token(model: Any, group_size: int | None = None, bits: int | None = None) -> float:
    """KV cache bytes one token of context takes in this model, all layers together, measured on
    a cache that one token went through (``bits`` None: unquantized), from the arrays' sizes over
    the tokens they have room for. Layers whose cache does not grow with the context (state-space)
    count nothing."""
    if bits is None:
        cache = mlx_cache.make_prompt_cache(model)
    else:
        cache = make_quantized_prompt_cache(model, group_size or DEFAULT_KV_GROUP_SIZE, bits)
    model(mx.array([[0]]), cache=cache)
    total = 0.0
    for layer in cache:
        keys = getattr(layer, "keys", None)
        if keys is None:
            continue
        room = (keys[0] if isinstance(keys, tuple) else keys).shape[2]
        total += layer.nbytes / room
    return total
