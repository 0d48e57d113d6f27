"""Attention over a quantized KV cache on the CPU, a chunk of the cache at a time.

mlx-lm attends to a quantized cache (``--kv-bits``) with two ``mx.quantized_matmul``; on a GPU
those kernels read the packed cache directly, but MLX's CPU kernel is several times slower than a
float32 matmul for attention's shapes (one decode step over 16 × 4,000 tokens: 32 ms for the
keys alone against 6.6 for the float32 matmul). Dequantizing the whole cache first is no better:
the float32 copy is 4× the packed bytes and does not fit any CPU cache, so writing it and reading
it back costs more than the unquantized cache's own read (104 ms a layer against 29).

Here the codes are turned to float32 a chunk at a time (a few rows, or some heads of one row),
small enough to stay in the CPU's cache while the matmul reads them, and each group's scale and
bias are applied to the small matrices around the matmuls instead of to every cached value: with
``w = s·c + b`` per group of ``group_size`` values,

    q·k = Σ_g s_g (q_g·c_g) + Σ_g b_g Σ(q_g)          (scores: one matmul per group, one for biases)
    Σ_t p_t v_t[g] = (p ⊙ s_g) @ c[g] + (p @ b_g)      (values: the same, per group of dimensions)

The values attended to are exactly the dequantized cache's; only the summation order differs. On
this 2-core CPU, one layer's decode step over 16 × 4,000 tokens: ~18 ms, against ~26 ms for
MLX's fused attention over the unquantized cache (which is read from memory at 4 bytes a value);
over 16 × 1,100 tokens ~6 ms against ~4 (see ``CHUNK_BYTES``).
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx_lm.models import base as mlx_base

# The float32 codes of one chunk (some rows, or some heads of one row) of the keys or values. One
# layer's decode step for 16 rows, 3 KV heads of 64, 8 bits, on this 2-core CPU (best of 3, ms):
#   tokens      unquantized   128 KB   512 KB   1 MB   2 MB chunks
#   300            0.9          4.1      1.8     1.6    1.5
#   1,100          3.9          6.0      6.0    17.9   17.6   (a 845 KB row: 3 heads in one matmul)
#   4,000         26.1         18.2     18.7    17.6   21.9
# While the unquantized cache still fits the CPU's caches it wins; past that (here ~2,000 tokens at
# 16 rows), reading a quarter of the bytes does.
CHUNK_BYTES = 512 << 10
WIDEST = 32  # query positions (a decode step, a speculative step); a prefill chunk goes to MLX's own path
# A layer's keys and values, as float32, up to which dequantizing them whole and MLX's fused
# attention beat chunks (a few large ops against hundreds of small ones; the copy still fits this
# CPU's 32 MB last-level cache). One decode step of SmolLM2 (30 layers), 16 rows, ms:
#   tokens   unquantized   chunks   dequantized whole
#   1,000        211        368          314            (24.6 MB)
#   2,000        580        558          770
#   4,000        907       ~990         2800
DEQUANTIZED_BYTES = 32 << 20
_mlx_quantized_attention = mlx_base.quantized_scaled_dot_product_attention

Chunk = tuple[slice, slice]  # (rows, heads)


def _planes(packed: mx.array, bits: int) -> list[mx.array]:
    """``mx.quantize``'s packed words as float32 codes, in planes: at 8 bits one, element i of a
    row at i (little-endian: a word's byte i holds element i); at 4 bits two, byte i's low nibble
    (element 2i) and its high one (element 2i + 1), each at i. Unpacking 4 bits into one plane in
    order would cost an interleaving copy of the chunk; the queries are split instead."""
    b = mx.view(packed, mx.uint8)
    if bits == 8:
        return [b.astype(mx.float32)]
    return [(b & 0xF).astype(mx.float32), (b >> 4).astype(mx.float32)]


def _chunks(rows: int, heads: int, head_bytes: int) -> list[Chunk]:
    """Row-major chunks of about ``CHUNK_BYTES``: whole rows while one fits, else heads of one row."""
    if heads * head_bytes <= CHUNK_BYTES:
        step = CHUNK_BYTES // (heads * head_bytes)
        return [(slice(r, r + step), slice(None)) for r in range(0, rows, step)]
    step = max(1, CHUNK_BYTES // head_bytes)
    return [(slice(r, r + 1), slice(h, h + step)) for r in range(rows) for h in range(0, heads, step)]


def _assemble(parts: list[mx.array], chunks: list[Chunk]) -> mx.array:
    """The chunks' results ([rows, heads, ...] each) as one array."""
    if len(parts) == 1:
        return parts[0]
    if chunks[0][1] == slice(None):
        return mx.concatenate(parts)
    per_row = sum(1 for rows, _ in chunks if rows == chunks[0][0])
    return mx.concatenate([mx.concatenate(parts[i:i + per_row], axis=1) for i in range(0, len(parts), per_row)])


def _sum(terms: list[mx.array]) -> mx.array:
    return sum(terms[1:], terms[0])


def _causal(queries: int, keys: int) -> mx.array:
    q = mx.arange(keys - queries, keys)
    return q[:, None] >= mx.arange(keys)[None]


def chunked_attention(queries: mx.array, q_keys: tuple[mx.array, mx.array, mx.array],
                      q_values: tuple[mx.array, mx.array, mx.array], scale: float, mask: Any,
                      group_size: int, bits: int) -> mx.array:
    """mlx-lm's ``quantized_scaled_dot_product_attention``, with the codes turned to float32 a
    chunk at a time (see the module docstring). ``bits`` 8 or 4. Only the two matmuls over the
    codes run per chunk; scales, biases, the mask and the softmax apply to the whole batch's
    scores and weights, which are ``head_dim``/``queries`` times smaller than the cache."""
    B, n_q, L, D = queries.shape
    k_packed, k_scales, k_biases = q_keys
    v_packed, v_scales, v_biases = q_values
    n_kv, T = k_packed.shape[1], k_packed.shape[2]
    rep = n_q // n_kv
    k_groups, v_groups = D // group_size, v_scales.shape[-1]
    q = (queries.astype(mx.float32) * scale).reshape(B, n_kv, rep * L, D)
    chunks = _chunks(B, n_kv, T * max(D, v_groups * group_size) * 4)
    q_planes = [q] if bits == 8 else [mx.contiguous(q[..., 0::2]), mx.contiguous(q[..., 1::2])]
    width = group_size // len(q_planes)  # a group's elements in each plane
    groups = [slice(g * width, (g + 1) * width) for g in range(max(k_groups, v_groups))]

    # Scores: q·k = Σ_g s_g (q_g·c_g) + Σ_g b_g Σ(q_g).
    k_scales = k_scales.swapaxes(-1, -2)  # [B, n_kv, groups, T]
    parts = []
    for rows, heads in chunks:
        planes, qs = _planes(k_packed[rows, heads], bits), [x[rows, heads] for x in q_planes]
        if k_groups == 1:
            parts.append(_sum([x @ c.swapaxes(-1, -2) for x, c in zip(qs, planes, strict=True)]))
            continue
        sc = k_scales[rows, heads]
        parts.append(_sum([_sum([x[..., d] @ c[..., d].swapaxes(-1, -2) for x, c in zip(qs, planes, strict=True)])
                           * sc[:, :, g:g + 1] for g, d in enumerate(groups[:k_groups])]))
    scores = _assemble(parts, chunks)
    if k_groups == 1:
        scores = scores * k_scales
    q_sums = q.reshape(B, n_kv, rep * L, k_groups, group_size).sum(-1)
    scores = scores + q_sums @ k_biases.swapaxes(-1, -2)
    if mask is not None:
        if isinstance(mask, str):
            mask = _causal(L, T)
        scores = scores.reshape(B, n_kv, rep, L, T)
        if mask.ndim == 4:
            mask = mx.expand_dims(mask, -3)  # [B|1, 1, 1, L, T]
        if mask.dtype == mx.bool_:
            scores = mx.where(mask, scores, mx.finfo(mx.float32).min)
        else:
            scores = scores + mask
        scores = scores.reshape(B, n_kv, rep * L, T)
    p = mx.softmax(scores, axis=-1, precise=True)

    # Output: Σ_t p_t v_t = (p ⊙ s_g) @ c[g] + p @ b_g, per group g of dimensions.
    weighted = [p * v_scales[..., g][:, :, None, :] for g in range(v_groups)]
    parts = []
    for rows, heads in chunks:
        planes = _planes(v_packed[rows, heads], bits)
        outs = []
        for g, d in enumerate(groups[:v_groups]):
            per_plane = [weighted[g][rows, heads] @ c[..., d] for c in planes]
            # 4 bits: the planes' outputs are the group's even and odd elements: interleaved back
            outs.append(per_plane[0] if bits == 8 else mx.stack(per_plane, axis=-1).reshape(*per_plane[0].shape[:-1], -1))
        parts.append(outs[0] if v_groups == 1 else mx.concatenate(outs, axis=-1))
    biases = p @ v_biases  # [B, n_kv, rep·L, groups]
    out = _assemble(parts, chunks) + (biases if v_groups == 1 else mx.repeat(biases, group_size, axis=-1))
    return out.reshape(B, n_q, L, v_groups * group_size).astype(queries.dtype)


def chunks_pay(queries: int, rows: int, heads: int, length: int, dim: int) -> bool:
    """Whether a step of ``queries`` positions over a cache of ``rows`` × ``heads`` × ``length``
    × ``dim`` (keys and values alike) should attend in chunks on the CPU, rather than to the cache
    dequantized whole through MLX's fused attention."""
    return queries <= WIDEST and rows * heads * length * dim * 4 * 2 > DEQUANTIZED_BYTES


def quantized_attention(queries: mx.array, q_keys: Any, q_values: Any, scale: float, mask: Any,
                        group_size: int = 64, bits: int = 8) -> mx.array:
    """What mlx-lm's attention calls for a cache with ``bits``: a chunk at a time on the CPU for a
    decode or speculative step at 8 or 4 bits, mlx-lm's own (MLX's quantized kernels) otherwise."""
    if mx.default_device() == mx.cpu and bits in (4, 8) and queries.shape[2] <= WIDEST:
        return chunked_attention(queries, q_keys, q_values, scale, mask, group_size, bits)
    return _mlx_quantized_attention(queries, q_keys, q_values, scale, mask, group_size, bits)


def install() -> None:
    """Route mlx-lm's quantized attention through ``quantized_attention``. mlx-lm's
    ``scaled_dot_product_attention`` looks the name up in its module at each call (a tripwire test
    checks both functions' sources), so every model's attention takes it."""
    mlx_base.quantized_scaled_dot_product_attention = quantized_attention
