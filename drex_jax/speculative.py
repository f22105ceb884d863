"""Speculative sampling's acceptance rule, on the device: verify mode with temperature > 0.

A draft token d at a position was sampled from the ramp's distribution q there; the full model's
distribution at that position is p (both after temperature, top_k and top_p: `sampling.kept_probs`).
The draft is accepted with probability min(1, p(d) / q(d)); otherwise the position's token is drawn
from normalize(max(p - q, 0)). Accepted drafts and that replacement are then distributed exactly as
p (Leviathan et al. 2023, Chen et al. 2023), so verify mode samples from the full model. A position
with no draft (the row's current token) draws from p itself. Greedy rows (temperature 0) have
one-hot p and q, where the rule reduces to "accept iff the draft is the full model's argmax".

Randomness is a function of (seed, token index) only, like `sampling.sample`: the acceptance test
and the replacement draw use their own streams (the seed xor a salt), independent of the stream
the draft itself was sampled with.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from drex_jax.generation import SamplingParams
from drex_jax.sampling import _cumsum, _first_above, _uniform, kept_probs

SALT_ACCEPT = np.uint32(0x9E3779B9)
SALT_RESIDUAL = np.uint32(0x85EBCA6B)


def verify_positions(logits, sp: SamplingParams, draft_tokens, draft_probs):
    """The token at each position of a verified chunk.

    logits [N, V] f32: the full model at each position. sp: per position, `step` = the index of the
    token that position produces. draft_tokens [N] int32: the draft made there (-1: none).
    draft_probs [N, V] f32: the distribution q each draft was sampled from (ignored where none).
    Returns [N] int32: the draft where accepted, else a draw from normalize(max(p - q, 0))."""
    p = kept_probs(logits, sp)
    is_draft = draft_tokens >= 0
    d = jnp.maximum(draft_tokens, 0)
    q = jnp.where(is_draft[:, None], draft_probs, 0.0)
    pd = jnp.take_along_axis(p, d[:, None], 1)[:, 0]
    qd = jnp.take_along_axis(q, d[:, None], 1)[:, 0]
    seed, step = jnp.asarray(sp.seed, jnp.uint32), jnp.asarray(sp.step)
    accept = is_draft & (_uniform(seed ^ SALT_ACCEPT, step) * qd < pd)  # u < p(d) / q(d), q(d) > 0
    residual = jnp.maximum(p - q, 0.0)
    # p == q leaves nothing: then every draft is accepted and the residual is never read
    residual = jnp.where(residual.sum(-1, keepdims=True) > 0, residual, p)
    cum = _cumsum(residual)
    drawn = _first_above(cum, residual, _uniform(seed ^ SALT_RESIDUAL, step) * cum[:, -1])
    return jnp.where(accept, d, drawn).astype(jnp.int32)
