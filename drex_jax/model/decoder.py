"""Llama / Qwen2 / Qwen3 decoder math as pure functions over the params pytree.

Shapes: B batch, T query length, S key length, H hidden, nh/nkv heads, D head_dim, N = B*T.
Norms and softmax run in fp32 whatever the param dtype, like HF. Layer functions take one
layer's weights in the decode layout (`params.layer_params`: matrices `[out, in]`) and the
residual stream transposed, `xt [H, N]`, so every projection is `W @ xt` (see params.py).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from drex_jax.model.config import ModelConfig
from drex_jax.model.params import is_decode_layout, layer_params
from drex_jax.generation import SamplingParams
from drex_jax.sampling import sample


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


def qkv(lp: dict, cfg: ModelConfig, xt: jax.Array, positions: jax.Array):
    """Pre-norm, Q/K/V projections, Qwen3's per-head q/k RMSNorm, and RoPE. xt: [H, N],
    positions: [B, T] -> q [B,T,nh,D], k, v [B,T,nkv,D]."""
    B, T = positions.shape
    h = rms_norm(xt, lp["attn_norm"], cfg.rms_norm_eps, axis=0)

    def project(w, b, heads):  # [heads*D, H] @ [H, N] -> [B, T, heads, D]
        y = w @ h
        y = y if b is None else y + b[:, None]
        return y.T.reshape(B, T, heads, cfg.head_dim)

    bias = cfg.qkv_bias
    q = project(lp["wq"], lp["bq"] if bias else None, cfg.num_heads)
    k = project(lp["wk"], lp["bk"] if bias else None, cfg.num_kv_heads)
    v = project(lp["wv"], lp["bv"] if bias else None, cfg.num_kv_heads)
    if cfg.qk_norm:
        q = rms_norm(q, lp["q_norm"], cfg.rms_norm_eps)
        k = rms_norm(k, lp["k_norm"], cfg.rms_norm_eps)
    inv = rope_inv_freq(cfg)
    return apply_rope(q, positions, inv), apply_rope(k, positions, inv), v


def attention(cfg: ModelConfig, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Dense masked GQA. q: [B,T,nh,D]; k, v: [B,S,nkv,D]; mask: [B,T,S] bool -> [B,T,nh*D]."""
    B, T, _, D = q.shape
    qg = q.reshape(B, T, cfg.num_kv_heads, cfg.q_per_kv, D)
    # products in the operands' dtype, like HF (XLA:CPU has no bf16 x bf16 -> f32 batched dot)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k).astype(jnp.float32) * (1.0 / math.sqrt(D))
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(B, T, cfg.num_heads * D).astype(q.dtype)


def finish_layer(lp: dict, cfg: ModelConfig, xt: jax.Array, attn: jax.Array) -> jax.Array:
    """Output projection + residual, then the SwiGLU MLP block + residual.
    xt: [H, N]; attn: [B, T, nh*D] -> [H, N]."""
    o = lp["wo"] @ attn.reshape(xt.shape[1], -1).T
    if cfg.o_bias:
        o = o + lp["bo"][:, None]
    xt = xt + o
    h = rms_norm(xt, lp["mlp_norm"], cfg.rms_norm_eps, axis=0)
    return xt + lp["w_down"] @ (jax.nn.silu(lp["w_gate"] @ h) * (lp["w_up"] @ h))


def embed(params: dict, tokens: jax.Array) -> jax.Array:
    return jnp.take(params["embed"], tokens, axis=0)


def vocab_rows(params: dict, cfg: ModelConfig, columns: jax.Array | None = None) -> jax.Array:
    """The LM head as rows, [V, H] (token ids `columns` [K] -> their rows [K, H]: a cheap gather)."""
    if cfg.tie_word_embeddings:
        rows = params["embed"]
    else:  # decode layout stores it [V, H] like every matrix there; the checkpoint layout [H, V]
        rows = params["lm_head"] if is_decode_layout(params) else params["lm_head"].T
    return rows if columns is None else rows[columns]


def vocab_projection(params: dict, cfg: ModelConfig, columns: jax.Array | None = None) -> jax.Array:
    """The LM head's [H, V] matrix, or only its columns (token ids [K]) -> [H, K]."""
    return vocab_rows(params, cfg, columns).T


def project_rows(rows: jax.Array, h: jax.Array) -> jax.Array:
    """h [..., H] against rows [V, H] -> fp32 logits [..., V], computed as rows @ h^T: the
    weight on the left, so XLA:CPU streams it without repacking (~30 % faster at batch 8-32).
    Products in the params' dtype, then fp32 (as HF; XLA:CPU has no bf16 x bf16 -> f32 dot)."""
    flat = h.reshape(-1, h.shape[-1]).astype(rows.dtype)
    return (rows @ flat.T).T.reshape(h.shape[:-1] + rows.shape[:1]).astype(jnp.float32)


def lm_head(params: dict, cfg: ModelConfig, x: jax.Array, columns: jax.Array | None = None) -> jax.Array:
    """Final RMSNorm + LM head -> fp32 logits. x: [..., H] -> [..., V] ([..., K] for `columns` [K])."""
    h = rms_norm(x, params["final_norm"], cfg.rms_norm_eps)
    return project_rows(vocab_rows(params, cfg, columns), h)


def greedy_tokens(params: dict, cfg: ModelConfig, x: jax.Array) -> jax.Array:
    """argmax of `lm_head` for x [B, H] -> [B] int32, taken over the weight-left product [V, B]
    itself (transposing the logits to [B, V] first costs as much as a third of the head)."""
    h = rms_norm(x, params["final_norm"], cfg.rms_norm_eps)
    rows = vocab_rows(params, cfg)
    return jnp.argmax(rows @ h.astype(rows.dtype).T, axis=0).astype(jnp.int32)


def next_tokens(params: dict, cfg: ModelConfig, x: jax.Array, sp: SamplingParams, do_sample: bool) -> jax.Array:
    """The LM head's next token for hidden states x [B, H] -> [B] int32 (greedy programs never
    form the [B, V] logits)."""
    if not do_sample:
        return greedy_tokens(params, cfg, x)
    return sample(lm_head(params, cfg, x), sp, True)


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

    def layer(lp, x):
        xt = to_stream(x)
        q, k, v = qkv(lp, cfg, xt, positions)
        return from_stream(finish_layer(lp, cfg, xt, attention(cfg, q, k, v, causal)), B, T)

    x0 = embed(params, tokens)
    if is_decode_layout(params):
        hs = [x0]
        for lp in params["layers"]:
            hs.append(layer(lp, hs[-1]))
        return jnp.stack(hs)

    def body(x, i):  # scan over the stacked layers: one compiled layer (training, reference)
        y = layer(layer_params(params, i), x)
        return y, y

    _, hs = jax.lax.scan(body, x0, jnp.arange(cfg.num_layers))
    return jnp.concatenate([x0[None], hs], axis=0)


@functools.partial(jax.jit, static_argnames=("cfg",))
def forward(params: dict, cfg: ModelConfig, tokens: jax.Array) -> jax.Array:
    """Full-model logits [B, T, V] (fp32) for unpadded token sequences [B, T]."""
    return lm_head(params, cfg, forward_hidden(params, cfg, tokens)[-1])
