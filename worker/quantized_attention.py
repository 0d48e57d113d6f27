"""Attention over a quantized KV cache on the CPU, a few rows at a time.

mlx-lm attends to a quantized cache (``--kv-bits``) with two ``mx.quantized_matmul``; on a GPU
those kernels read the packed cache directly, but MLX's CPU kernel is several times slower than a
float32 matmul for attention's shapes (one decode step over 16 × 4,000 tokens: 32 ms for the
keys alone against 6.6 for the float32 matmul). Dequantizing the whole cache first is no better:
the float32 copy is 4× the packed bytes and does not fit any CPU cache, so writing it and reading
it back costs more than the unquantized cache's own read (104 ms a layer against 29).

Here the codes are turned to float32 a few batch rows at a time, small enough to stay in the CPU's
cache while they are read, and each group's scale and bias are applied to the small
matrices around the matmuls instead of to every cached value: with ``w = s·c + b`` per group of
``group_size`` values,

    q·k = Σ_g s_g (q_g·c_g) + Σ_g b_g Σ(q_g)          (scores: one matmul per group, one for biases)
    Σ_t p_t v_t[g] = (p ⊙ s_g) @ c[g] + (p @ b_g)      (values: the same, per group of dimensions)

The values attended to are exactly the dequantized cache's; only the summation order differs. On
this 2-core CPU, one layer's decode step over 16 × 4,000 tokens: ~21 ms, against ~26 ms for
MLX's fused attention over the unquantized cache (which is read from memory at 4 bytes a value).
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx_lm.models import base as mlx_base

# The float32 codes of one chunk of rows (keys or values): a few MB stays in a CPU's last-level cache.
CHUNK_BYTES = 4 << 20
WIDEST = 32  # query positions (a decode step, a speculative step); a prefill chunk goes to MLX's own path
_mlx_quantized_attention = mlx_base.quantized_scaled_dot_product_attention


def _codes(packed: mx.array, bits: int) -> mx.array:
    """``mx.quantize``'s packed words as float32 codes, in order (little-endian: a word's byte i
    holds element i at 8 bits; at 4 bits byte i's low nibble element 2i, its high one 2i + 1)."""
    b = mx.view(packed, mx.uint8)
    if bits == 4:
        b = mx.stack([b & 0xF, b >> 4], axis=-1).reshape(*b.shape[:-1], -1)
    return b.astype(mx.float32)


def _causal(queries: int, keys: int) -> mx.array:
    q = mx.arange(keys - queries, keys)
    return q[:, None] >= mx.arange(keys)[None]


def chunked_attention(queries: mx.array, q_keys: tuple[mx.array, mx.array, mx.array],
                      q_values: tuple[mx.array, mx.array, mx.array], scale: float, mask: Any,
                      group_size: int, bits: int) -> mx.array:
    """mlx-lm's ``quantized_scaled_dot_product_attention``, computed a few batch rows at a time
    (see the module docstring). ``bits`` 8 or 4."""
    B, n_q, L, D = queries.shape
    k_packed, k_scales, k_biases = q_keys
    v_packed, v_scales, v_biases = q_values
    n_kv, T = k_packed.shape[1], k_packed.shape[2]
    rep = n_q // n_kv
    dv = v_scales.shape[-1] * group_size
    q = (queries.astype(mx.float32) * scale).reshape(B, n_kv, rep * L, D)
    q_groups = D // group_size
    q_sums = q.reshape(B, n_kv, rep * L, q_groups, group_size).sum(-1)  # Σ(q_g), per group
    if isinstance(mask, str):
        mask = _causal(L, T)
    if mask is not None and mask.ndim == 4:
        mask = mx.expand_dims(mask, -3)  # [B|1, 1, 1, L, T] against scores [b, n_kv, rep, L, T]
    per_row = n_kv * T * max(D, dv) * 4
    rows = max(1, CHUNK_BYTES // max(per_row, 1))
    out = []
    for r in range(0, B, rows):
        rs = slice(r, r + rows)
        b = min(rows, B - r)
        codes = _codes(k_packed[rs], bits)
        scales, biases = k_scales[rs].swapaxes(-1, -2), k_biases[rs].swapaxes(-1, -2)  # [b, n_kv, G, T]
        qr = q[rs]
        scores = q_sums[rs] @ biases
        for g in range(q_groups):
            d = slice(g * group_size, (g + 1) * group_size)
            part = qr[..., d] @ codes[..., d].swapaxes(-1, -2) if q_groups > 1 else qr @ codes.swapaxes(-1, -2)
            scores = scores + part * scales[:, :, g:g + 1]
        scores = scores.reshape(b, n_kv, rep, L, T)
        if mask is not None:
            m = mask[rs] if mask.ndim == 5 and mask.shape[0] == B and B > 1 else mask
            if m.dtype == mx.bool_:
                scores = mx.where(m, scores, mx.finfo(mx.float32).min)
            else:
                scores = scores + m
        p = mx.softmax(scores, axis=-1, precise=True).reshape(b, n_kv, rep * L, T)
        codes = _codes(v_packed[rs], bits)
        scales, biases = v_scales[rs], v_biases[rs]  # [b, n_kv, T, G]
        bias_part = p @ biases  # [b, n_kv, rep·L, G]
        groups = []
        for g in range(v_scales.shape[-1]):
            d = slice(g * group_size, (g + 1) * group_size)
            weighted = p * scales[..., g].reshape(b, n_kv, 1, T)
            groups.append(weighted @ codes[..., d] + bias_part[..., g:g + 1])
        out.append(groups[0] if len(groups) == 1 else mx.concatenate(groups, axis=-1))
    result = out[0] if len(out) == 1 else mx.concatenate(out)
    return result.reshape(B, n_q, L, dv).astype(queries.dtype)


def quantized_attention(queries: mx.array, q_keys: Any, q_values: Any, scale: float, mask: Any,
                        group_size: int = 64, bits: int = 8) -> mx.array:
    """What mlx-lm's attention calls for a cache with ``bits``: rows at a time on the CPU for a
    decode or speculative step at 8 or 4 bits, mlx-lm's own (MLX's quantized kernels) otherwise."""
    if mx.default_device() == mx.cpu and bits in (4, 8) and queries.shape[2] <= WIDEST:
        return chunked_attention(queries, q_keys, q_values, scale, mask, group_size, bits)
    return _mlx_quantized_attention(queries, q_keys, q_values, scale, mask, group_size, bits)


def install() -> None:
    """Route mlx-lm's quantized attention through ``quantized_attention``. mlx-lm's
    ``scaled_dot_product_attention`` looks the name up in its module at each call (a tripwire test
    checks both functions' sources), so every model's attention takes it."""
    mlx_base.quantized_scaled_dot_product_attention = quantized_attention
