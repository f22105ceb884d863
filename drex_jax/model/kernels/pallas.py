"""Decode attention through jax's Pallas GPU paged-attention kernel
(`jax.experimental.pallas.ops.gpu.paged_attention`), which reads the pool's own page layout.

It takes one query token per row and does not scale the logits, so q is pre-scaled by
1/sqrt(D). `interpret=True` runs it on the CPU (correctness only: ~10x slower than XLA).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def paged_attention_pallas(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, block_tables: jax.Array,
                           positions: jax.Array, interpret: bool | None = None) -> jax.Array:
    """q [B, 1, nh, D]; pages [kv, N, ps, D] (one layer of the pool); block_tables [B, P];
    positions [B, 1] (-1 = padding row: output zeros) -> [B, 1, nh*D]."""
    from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention

    B, T, nh, D = q.shape
    if T != 1:
        raise ValueError(f"the Pallas paged-attention kernel takes one query token per row, got {T}")
    interpret = jax.default_backend() != "gpu" if interpret is None else interpret
    P = block_tables.shape[1]
    per_block = math.gcd(P, 8)  # pages per compute block and split count must divide P
    lengths = jnp.maximum(positions[:, 0] + 1, 1).astype(jnp.int32)  # padding rows read one page, then zeroed
    out = paged_attention((q[:, 0] * (1.0 / math.sqrt(D))).astype(k_pages.dtype), k_pages, v_pages,
                          block_tables.astype(jnp.int32), lengths, pages_per_compute_block=per_block,
                          k_splits=P // per_block, interpret=interpret)
    out = jnp.where((positions[:, 0] >= 0)[:, None, None], out, 0)
    return out.reshape(B, 1, nh * D)
