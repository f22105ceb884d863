"""Exit ramps: confidence measures and ramp heads (shared final norm + LM head, or trained).

Trained head (one per ramp): a residual low-rank adapter and its own RMSNorm in front of the
model's frozen LM head: `logits = W_lm . rmsnorm(h + (h @ down) @ up)`. With `up = 0` and
the norm weight copied from the final norm it starts exactly as the shared head, so
training can only improve on it; it adds `2*H*rank + H` params per ramp (74k at H=576,
rank 64) and reuses the 28M-param vocabulary projection instead of a new one.

Ramp vocabulary (`ramp_tokens`, [K] int32 ids): a ramp may score only K candidate tokens
(the model's most frequent outputs) instead of the whole vocabulary. Its confidence is then
the softmax over those K, and an exiting token is one of them. On SmolLM2 the 49,152-word
head costs as much as ~8 decoder layers per row; K = 1024 costs ~0.2 of one.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from drex_jax.early_exit import EEConfig
from drex_jax.model.config import ModelConfig
from drex_jax.model.decoder import lm_head, vocab_rows
from drex_jax.model.modules import ExitRamp
from drex_jax.model.ops import project_rows


def confidence(logits: jax.Array, measure: str) -> jax.Array:
    """logits [..., V] -> confidence [...] (higher = surer)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    if measure == "top1_minus_top2":
        top2 = jax.lax.top_k(logp, 2)[0]
        p = jnp.exp(top2)
        return p[..., 0] - p[..., 1]
    if measure == "max_prob":
        return jnp.exp(jnp.max(logp, axis=-1))
    if measure == "neg_entropy":
        return jnp.sum(jnp.exp(logp) * logp, axis=-1)
    raise ValueError(f"unknown confidence measure {measure!r}")


def init_ramp_heads(params: dict, cfg: ModelConfig, num_ramps: int, rank: int, key: jax.Array) -> dict:
    """Stacked trained-head params: norm [R, H], down [R, H, rank], up [R, rank, H] (zeros)."""
    H = cfg.hidden_size
    down = jax.random.normal(key, (num_ramps, H, rank), jnp.float32) / jnp.sqrt(H)
    return {
        "norm": jnp.broadcast_to(params["final_norm"].astype(jnp.float32), (num_ramps, H)),
        "down": down,
        "up": jnp.zeros((num_ramps, rank, H), jnp.float32),
    }


def ramp_logits(params: dict, cfg: ModelConfig, h: jax.Array, heads: dict | None, ramp: int | jax.Array,
                ramp_tokens: jax.Array | None = None):
    """Logits [..., V] of ramp `ramp` (index into the ramp list) for hidden states h [..., H];
    [..., K] over `ramp_tokens` [K] when given (index k means token ramp_tokens[k]).
    heads=None means the shared head (final norm + LM head)."""
    if heads is None:
        return lm_head(params, cfg, h, ramp_tokens)
    hd = jax.tree.map(lambda a: a[ramp], heads)  # `ramp` may be traced: the stacked heads' slice
    return project_rows(vocab_rows(params, cfg, ramp_tokens), ExitRamp(cfg, hd["norm"], hd["down"], hd["up"])(h))


def check_ramp_tokens(ee: EEConfig, cfg: ModelConfig, ramp_tokens) -> jax.Array | None:
    """The ramp candidate ids as int32 [ee.ramp_vocab], checked; None when ee.ramp_vocab is None."""
    if ee.ramp_vocab is None:
        return None
    if ramp_tokens is None:
        raise ValueError(f"ramp_vocab={ee.ramp_vocab} needs the candidate token ids (a token ranking saved "
                         "by `drex-jax train-exits`, or ramp_tokens=...)")
    ids = np.asarray(ramp_tokens)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"ramp_tokens must be a 1-D array of integer token ids, got shape {ids.shape} {ids.dtype}")
    ids = ids[: ee.ramp_vocab]
    if len(ids) != ee.ramp_vocab:
        raise ValueError(f"ramp_vocab={ee.ramp_vocab} but only {len(ids)} ranked token ids are available")
    if ids.min() < 0 or ids.max() >= cfg.vocab_size or len(np.unique(ids)) != len(ids):
        raise ValueError(f"ramp_tokens must be distinct ids in [0, {cfg.vocab_size})")
    return jnp.asarray(ids, jnp.int32)


def to_token_ids(index: jax.Array, ramp_tokens: jax.Array | None) -> jax.Array:
    """Argmax/sample indices into ramp logits -> vocabulary ids."""
    return index if ramp_tokens is None else ramp_tokens[index].astype(index.dtype)
