"""The model's functional entry points over a params pytree (either layout) or an
`EETransformer`: embedding, LM head, and the dense cache-free forward pass (the reference path
for parity tests, training and calibration). The math lives in `modules.py` and `ops.py`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from drex_jax.generation import SamplingParams
from drex_jax.model.config import ModelConfig
from drex_jax.model.modules import as_model
from drex_jax.model.ops import apply_rope, attention, from_stream, project_rows, rms_norm, rope_inv_freq, to_stream  # noqa: F401


def embed(params, cfg: ModelConfig, tokens: jax.Array) -> jax.Array:
    """tokens [...] -> embeddings [..., H]."""
    return as_model(cfg, params).embed(tokens)


def vocab_rows(params, cfg: ModelConfig, columns: jax.Array | None = None) -> jax.Array:
    """The LM head as rows, [V, H] (token ids `columns` [K] -> their rows [K, H])."""
    return as_model(cfg, params).vocab_rows(columns)


def vocab_projection(params, cfg: ModelConfig, columns: jax.Array | None = None) -> jax.Array:
    """The LM head's [H, V] matrix, or only its columns (token ids [K]) -> [H, K]."""
    return vocab_rows(params, cfg, columns).T


def lm_head(params, cfg: ModelConfig, x: jax.Array, columns: jax.Array | None = None) -> jax.Array:
    """Final RMSNorm + LM head -> fp32 logits. x: [..., H] -> [..., V] ([..., K] for `columns` [K])."""
    return as_model(cfg, params).lm_head_logits(x, columns)


def next_tokens(params, cfg: ModelConfig, x: jax.Array, sp: SamplingParams, do_sample: bool) -> jax.Array:
    """The LM head's next token for hidden states x [B, H] -> [B] int32."""
    return as_model(cfg, params).next_tokens(x, sp, do_sample)


def forward_hidden(params, cfg: ModelConfig, tokens: jax.Array, lengths: jax.Array | None = None) -> jax.Array:
    """Dense causal forward of whole sequences without a cache (reference path).

    tokens: [B, T] right-padded; lengths: [B] (default T). Returns the hidden state after
    every layer, [L+1, B, T, H] (index 0 = embeddings).
    """
    model = as_model(cfg, params)
    B, T = tokens.shape
    lengths = jnp.full((B,), T, jnp.int32) if lengths is None else lengths
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    causal = jnp.tril(jnp.ones((T, T), bool))[None] & (positions < lengths[:, None])[:, None, :]

    def layer(i, x):
        out = model.layers[i](to_stream(x), positions, lambda q, k, v: attention(cfg, q, k, v, causal))
        return from_stream(out, B, T)

    x0 = model.embed(tokens)
    if model.decode_layout:
        hs = [x0]
        for i in range(cfg.num_layers):
            hs.append(layer(i, hs[-1]))
        return jnp.stack(hs)

    def body(x, i):  # scan over the stacked layers: one compiled layer (training, reference)
        y = layer(i, x)
        return y, y

    _, hs = jax.lax.scan(body, x0, jnp.arange(cfg.num_layers))
    return jnp.concatenate([x0[None], hs], axis=0)


@functools.partial(jax.jit, static_argnames=("cfg",))
def forward(params, cfg: ModelConfig, tokens: jax.Array) -> jax.Array:
    """Full-model logits [B, T, V] (fp32) for unpadded token sequences [B, T]."""
    return lm_head(params, cfg, forward_hidden(params, cfg, tokens)[-1])
