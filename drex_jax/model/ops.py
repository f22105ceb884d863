"""Array math shared by the model's modules and the unbatched reference: RoPE, RMSNorm, dense
masked GQA attention, the residual stream's layout, and the weight-left vocabulary product.

Shapes: B batch, T query length, S key length, H hidden, nh/nkv heads, D head_dim, N = B*T.
Norms and softmax run in fp32 whatever the param dtype, like HF.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from drex_jax.kv.pages import causal_block
from drex_jax.model.config import ModelConfig


@functools.lru_cache(maxsize=None)
def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """[D/2] inverse frequencies, with Llama 3 frequency-dependent scaling if configured."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    s = cfg.rope_scaling
    if s is None:
        return inv.astype(np.float32)
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / s.factor, inv)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Split-half RoPE (HF `rotate_half`). x: [B, T, heads, D], positions: [B, T]."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, D/2]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    # x * [cos, cos] + [x2, x1] * [-sin, sin]: the halves swapped by a flip, not split and
    # concatenated per head (XLA:CPU's concatenate fusion ran ~2x slower: 3.8 ms of a batch-32
    # SmolLM2 step, 5 % of a prefill)
    cos2 = jnp.concatenate([cos, cos], axis=-1)[:, :, None, :]
    sin2 = jnp.concatenate([-sin, sin], axis=-1)[:, :, None, :]
    B, T, H, D = x.shape
    x32 = x.astype(jnp.float32)
    swapped = jnp.flip(x32.reshape(B, T, H, 2, D // 2), axis=3).reshape(B, T, H, D)
    return (x32 * cos2 + swapped * sin2).astype(x.dtype)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, axis: int = -1) -> jax.Array:
    """RMSNorm over `axis` (-1 for [..., H]; 0 for the transposed stream [H, N])."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=axis, keepdims=True) + eps)
    return (weight if axis == -1 else weight[:, None]) * x32.astype(x.dtype)


def to_stream(x: jax.Array) -> jax.Array:
    """[B, T, H] -> the transposed residual stream [H, B*T]."""
    return x.reshape(-1, x.shape[-1]).T


def from_stream(xt: jax.Array, B: int, T: int) -> jax.Array:
    """[H, B*T] -> [B, T, H]."""
    return xt.T.reshape(B, T, -1)


def attention(cfg: ModelConfig, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Dense masked GQA. q: [B,T,nh,D]; k, v: [B,S,nkv,D]; mask: [B,T,S] bool -> [B,T,nh*D].

    The query heads of a KV group and the query positions are merged into one matrix per (row, KV
    head), [B, nkv, g*T, D], so both products are plain batched matmuls with the batch dimensions
    leading: XLA:CPU runs them 1.4-1.6x faster than the 5-d einsum over (t, k, g) (prefill
    profile, BENCHMARKS.md issue 31)."""
    B, T, _, D = q.shape
    nkv, g = cfg.num_kv_heads, cfg.q_per_kv
    qh = q.reshape(B, T, nkv, g, D).transpose(0, 2, 3, 1, 4).reshape(B, nkv, g * T, D)
    # products in the operands' dtype, like HF (XLA:CPU has no bf16 x bf16 -> f32 batched dot)
    scores = jnp.einsum("bkqd,bksd->bkqs", qh, k.transpose(0, 2, 1, 3)).astype(jnp.float32)
    scores = scores.reshape(B, nkv, g, T, -1) * (1.0 / math.sqrt(D))
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(B, nkv, g * T, -1)
    out = jnp.einsum("bkqs,bksd->bkqd", probs, v.transpose(0, 2, 1, 3)).reshape(B, nkv, g, T, D)
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, cfg.num_heads * D).astype(q.dtype)


def causal_attention(cfg: ModelConfig, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """`attention` over fresh, causally masked rows (q, k, v all [B, W, ...], mask [B, W, W] with no
    key after its query): query block i of `causal_block(W)` positions attends keys [0, (i+1) block)
    only, skipping the score blocks the mask would zero (about half of them for long rows)."""
    W = q.shape[1]
    block = causal_block(W)
    if block == W:
        return attention(cfg, q, k, v, mask)
    outs = [attention(cfg, q[:, i:i + block], k[:, :i + block], v[:, :i + block], mask[:, i:i + block, :i + block])
            for i in range(0, W, block)]
    return jnp.concatenate(outs, axis=1)


# columns above which a packed projection goes to XLA's dot on the packed weight: the kernel is
# 0.6-0.7x of XLA's GEMM at 1,024 columns (a prefill) and level with it up to ~128-256
# (`benchmarks/gemm_shapes.py`)
KERNEL_MAX_COLUMNS = 256


def project(w: jax.Array, x: jax.Array, rows: int | None = None) -> jax.Array:
    """A projection on the transposed stream: weight [out, in] @ x [in, N] -> [out, N]. A packed
    weight ([ceil(out / 32), in, 32], `params.packed_layout`; `rows` = out, default every panel
    row) runs the CPU projection kernel (`kernels.matmul`, f32), or for more than
    KERNEL_MAX_COLUMNS columns XLA's dot over the panels."""
    if w.ndim == 2:
        return w @ x
    from drex_jax.model.kernels.matmul import PANEL, matmul

    rows = rows or w.shape[0] * PANEL
    if x.shape[1] <= KERNEL_MAX_COLUMNS:
        return matmul(w, x, rows).astype(x.dtype)
    return jnp.einsum("pki,kn->pin", w, x).reshape(-1, x.shape[1])[:rows]


def project_rows(rows: jax.Array, h: jax.Array) -> jax.Array:
    """h [..., H] against rows [V, H] -> fp32 logits [..., V], computed as rows @ h^T: the
    weight on the left, so XLA:CPU streams it without repacking (~30 % faster at batch 8-32).
    Products in the params' dtype, then fp32 (as HF; XLA:CPU has no bf16 x bf16 -> f32 dot)."""
    flat = h.reshape(-1, h.shape[-1]).astype(rows.dtype)
    return (rows @ flat.T).T.reshape(h.shape[:-1] + rows.shape[:1]).astype(jnp.float32)
