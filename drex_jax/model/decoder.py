"""Llama / Qwen2 decoder math as pure functions over the params pytree.

Shapes: B batch, T query length, S key length, H hidden, nh/nkv heads, D head_dim.
Norms and softmax run in fp32 whatever the param dtype, like HF.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

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
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * x32.astype(x.dtype)


def layer_at(layers: dict, i) -> dict:
    """Params of layer `i` (int or traced scalar) from the stacked `[layers, ...]` weights."""
    return jax.tree.map(lambda a: a[i], layers)


def qkv(lp: dict, cfg: ModelConfig, x: jax.Array, positions: jax.Array):
    """Pre-norm, Q/K/V projections and RoPE. x: [B, T, H] -> q [B,T,nh,D], k, v [B,T,nkv,D]."""
    B, T, _ = x.shape
    h = rms_norm(x, lp["attn_norm"], cfg.rms_norm_eps)
    q, k, v = h @ lp["wq"], h @ lp["wk"], h @ lp["wv"]
    if cfg.qkv_bias:
        q, k, v = q + lp["bq"], k + lp["bk"], v + lp["bv"]
    q = q.reshape(B, T, cfg.num_heads, cfg.head_dim)
    k = k.reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
    v = v.reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
    inv = rope_inv_freq(cfg)
    return apply_rope(q, positions, inv), apply_rope(k, positions, inv), v


def attention(cfg: ModelConfig, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Dense masked GQA. q: [B,T,nh,D]; k, v: [B,S,nkv,D]; mask: [B,T,S] bool -> [B,T,nh*D]."""
    B, T, _, D = q.shape
    qg = q.reshape(B, T, cfg.num_kv_heads, cfg.q_per_kv, D)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (1.0 / math.sqrt(D))
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(B, T, cfg.num_heads * D).astype(q.dtype)


def finish_layer(lp: dict, cfg: ModelConfig, x: jax.Array, attn: jax.Array) -> jax.Array:
    """Output projection + residual, then the SwiGLU MLP block + residual."""
    o = attn @ lp["wo"]
    if cfg.o_bias:
        o = o + lp["bo"]
    x = x + o
    h = rms_norm(x, lp["mlp_norm"], cfg.rms_norm_eps)
    return x + (jax.nn.silu(h @ lp["w_gate"]) * (h @ lp["w_up"])) @ lp["w_down"]


def embed(params: dict, tokens: jax.Array) -> jax.Array:
    return jnp.take(params["embed"], tokens, axis=0)


def vocab_projection(params: dict, cfg: ModelConfig, columns: jax.Array | None = None) -> jax.Array:
    """The LM head's [H, V] matrix, or only its columns (token ids [K]) -> [H, K]."""
    if cfg.tie_word_embeddings:
        rows = params["embed"] if columns is None else params["embed"][columns]  # row gather: cheap
        return rows.T
    return params["lm_head"] if columns is None else params["lm_head"][:, columns]


def lm_head(params: dict, cfg: ModelConfig, x: jax.Array, columns: jax.Array | None = None) -> jax.Array:
    """Final RMSNorm + LM head -> fp32 logits. x: [..., H] -> [..., V] ([..., K] for `columns` [K])."""
    h = rms_norm(x, params["final_norm"], cfg.rms_norm_eps)
    return jnp.einsum("...h,hv->...v", h, vocab_projection(params, cfg, columns), preferred_element_type=jnp.float32)


def forward_hidden(
    params: dict, cfg: ModelConfig, tokens: jax.Array, lengths: jax.Array | None = None
) -> jax.Array:
    """Dense causal forward of whole sequences without a cache (reference path).

    tokens: [B, T] right-padded; lengths: [B] (default T). Returns the hidden state after
    every layer, [L+1, B, T, H] (index 0 = embeddings).
    """
    B, T = tokens.shape
    lengths = jnp.full((B,), T, jnp.int32) if lengths is None else lengths
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    causal = jnp.tril(jnp.ones((T, T), bool))[None] & (positions < lengths[:, None])[:, None, :]

    def body(x, lp):
        q, k, v = qkv(lp, cfg, x, positions)
        x = finish_layer(lp, cfg, x, attention(cfg, q, k, v, causal))
        return x, x

    x0 = embed(params, tokens)
    _, hs = jax.lax.scan(body, x0, params["layers"])
    return jnp.concatenate([x0[None], hs], axis=0)


@functools.partial(jax.jit, static_argnames=("cfg",))
def forward(params: dict, cfg: ModelConfig, tokens: jax.Array) -> jax.Array:
    """Full-model logits [B, T, V] (fp32) for unpadded token sequences [B, T]."""
    return lm_head(params, cfg, forward_hidden(params, cfg, tokens)[-1])
