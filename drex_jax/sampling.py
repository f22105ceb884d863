"""Per-row sampling inside the jitted step (greedy, temperature, top-k, top-p).

Per-request settings travel as arrays so changing them never recompiles; only
`do_sample` (any row sampling at all) is static, so all-greedy batches skip the sort.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from drex_jax.generation import SamplingParams


def sample(logits: jax.Array, sp: SamplingParams, do_sample: bool) -> jax.Array:
    """logits [B, V] f32 -> tokens [B] int32."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if not do_sample:
        return greedy
    V = logits.shape[-1]
    scaled = logits / jnp.maximum(sp.temperature, 1e-6)[:, None]
    order = jnp.argsort(-scaled, axis=-1)
    vals = jnp.take_along_axis(scaled, order, axis=-1)
    rank = jnp.arange(V)[None]
    k = jnp.where(sp.top_k > 0, sp.top_k, V)[:, None]
    probs = jax.nn.softmax(vals, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above this token
    keep = (rank < k) & ((before < sp.top_p[:, None]) | (rank == 0))
    vals = jnp.where(keep, vals, -jnp.inf)
    keys = jax.vmap(lambda s, t: jax.random.fold_in(jax.random.key(s), t))(sp.seed, sp.step)
    choice = jax.vmap(jax.random.categorical)(keys, vals)
    sampled = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return jnp.where(sp.temperature > 0, sampled, greedy)
