"""Jitted pieces of early-exit decoding: one segment of layers for a set of slots, and the
missing-KV fills for rows that exited.

Rows are addressed by int32 slot ids into a preallocated hidden-state buffer
`hidden [slots, H]`; regrouping rows between segments changes only these index arrays,
never the KV pool. Padded rows carry slot id == slots (gather clamps, scatter drops) and
position -1 (no KV write).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from drex_jax.generation import SamplingParams
from drex_jax.logprobs import head_tokens, token_logprobs
from drex_jax.model.modules import ModelGraph
from drex_jax.model.paged import paged_layers, write_layers
from drex_jax.model.ramps import confidence, to_token_ids
from drex_jax.sampling import kept_probs, sample
from drex_jax.speculative import verify_positions


@functools.partial(
    jax.jit, static_argnames=("graph", "start", "end", "ramp", "measure", "do_sample", "attention", "logprobs"),
    donate_argnames=("pool", "hidden"),
)
def segment_step(
    state: dict,
    pool: dict,
    hidden: jax.Array,
    slot_ids: jax.Array,
    tokens: jax.Array,
    positions: jax.Array,
    block_tables: jax.Array,
    sampling: SamplingParams,
    ramp_tokens: jax.Array | None = None,
    *,
    graph: ModelGraph,
    start: int,
    end: int,
    ramp: int,
    measure: str,
    do_sample: bool,
    attention: str = "xla",
    logprobs: bool = False,
):
    """The model's segment: layers [start, end) for rows `slot_ids` [B], then the ramp `ramp` (or
    the LM head if -1). `graph`, `state`: the model with its ramps (`modules.split_model`).

    start == 0 embeds `tokens` [B]; otherwise rows resume from `hidden[slot_ids]`. The output
    hidden state is written back to `hidden[slot_ids]`. Returns (token [B], confidence [B],
    pool, hidden); confidence is +inf after the final layer. `ramp_tokens` [K]: the ramp scores
    only these candidates (None = whole vocabulary); the final LM head always scores all.
    `logprobs`: the token output is (token, LogprobRows) (`drex_jax.logprobs`).
    """
    model = graph.merge(state)
    x = model.embed(tokens) if start == 0 else hidden[slot_ids]
    x, pool = paged_layers(model, pool, x[:, None], positions[:, None], block_tables, start, end, attention)
    hidden = hidden.at[slot_ids].set(x[:, 0].astype(hidden.dtype), mode="drop")
    x, pool = _draft_context(model, pool, x, positions[:, None], block_tables, end, ramp, attention)
    return _exit_head(model, x[:, 0], sampling, ramp_tokens, ramp, measure, do_sample, logprobs) + (pool, hidden)


def _draft_context(model, pool, x, positions, block_tables, layer: int, ramp: int, attention: str, join_depth=None):
    """What ramp `ramp`'s head reads: x [B, T, H] (depth `layer`), plus the ramp's context-aware draft
    attention over layer `layer` of the pool when the model has them (`draft_attention`; it writes
    that layer's K/V at the rows' positions, the values the layer itself writes). Returns (x, pool);
    the rows' trunk hidden state is the caller's x, unchanged."""
    if ramp < 0 or model.draft_attention is None:
        return x, pool
    return paged_layers(model, pool, x, positions, block_tables, layer, layer + 1, attention, join_depth=join_depth,
                        blocks={layer: model.draft_attention[ramp]})


def _exit_head(model, x, sampling, ramp_tokens, ramp: int, measure: str, do_sample: bool, logprobs: bool = False,
               speculative: bool = False):
    """(token [B], confidence [B]) of hidden states x [B, H] at ramp `ramp`, or from the LM head
    after the last segment (ramp -1: confidence +inf, no ramp was asked). `logprobs`: token is
    (token, LogprobRows) of the distribution it was drawn from. `speculative` (a ramp, verify mode
    sampling): (token, confidence, q) with q [B, K] the distribution over the ramp's candidates
    the token was drawn from (`sampling.kept_probs`), what the deep pass's acceptance rule needs."""
    if ramp < 0:
        return head_tokens(model, x, sampling, do_sample, logprobs), jnp.full(x.shape[:1], jnp.inf, jnp.float32)
    logits = model.ramp_logits(x, ramp, ramp_tokens)
    cols = sample(logits, sampling, do_sample)
    tokens = to_token_ids(cols, ramp_tokens)
    if logprobs:
        tokens = tokens, token_logprobs(logits, cols, sampling.temperature, ramp_tokens)
    if speculative:
        return tokens, confidence(logits, measure), kept_probs(logits, sampling)
    return tokens, confidence(logits, measure)


def _write_targets(pool, block_tables, positions):
    num_pages, page_size = pool["k"].shape[2], pool["k"].shape[3]
    valid = positions >= 0
    pos = jnp.maximum(positions, 0)
    page = jnp.where(valid, jnp.take_along_axis(block_tables, (pos // page_size)[:, None], 1)[:, 0], num_pages)
    return page, pos % page_size


@functools.partial(jax.jit, static_argnames=("graph", "exit_layer"), donate_argnames=("pool",))
def fill_copy(state, pool, hidden, slot_ids, block_tables, positions, *, graph: ModelGraph, exit_layer: int):
    """Copy layer exit_layer-1's K/V at each row's position into every layer >= exit_layer.
    block_tables [B, P], positions [B] (-1 = padding). One batched scatter per K and V. (The model,
    hidden buffer and slots are unused: every fill takes the same arguments, `kv.missing`.)"""
    del state, hidden, slot_ids, graph
    page, off = _write_targets(pool, block_tables, positions)

    def fill(c):
        src = c[exit_layer - 1][:, page, off]  # [kv, B, D]
        deep = c.shape[0] - exit_layer
        return c.at[exit_layer:, :, page, off].set(jnp.broadcast_to(src, (deep,) + src.shape), mode="drop")

    return jax.tree.map(fill, pool)


@functools.partial(jax.jit, static_argnames=("graph", "exit_layer"), donate_argnames=("pool",))
def fill_propagate(state, pool, hidden, slot_ids, block_tables, positions, *, graph: ModelGraph, exit_layer: int):
    """Each layer >= exit_layer computes its own K/V from the rows' exit hidden states."""
    model = graph.merge(state)
    page, off = _write_targets(pool, block_tables, positions)
    ht = hidden[slot_ids].T  # [H, B]
    pos = jnp.maximum(positions, 0)[:, None]
    kvs = [model.layers[i].attn.qkv(ht, pos)[1:] for i in range(exit_layer, model.cfg.num_layers)]
    return write_layers(pool, exit_layer, [k[:, 0] for k, _ in kvs], [v[:, 0] for _, v in kvs], page, off)


@functools.partial(
    jax.jit, static_argnames=("graph", "start", "end", "ramp", "measure", "do_sample", "attention", "every_position",
                              "logprobs", "speculative"),
    donate_argnames=("pool", "ring"),
)
def chunk_step(
    state: dict,
    pool: dict,
    ring: jax.Array,
    slot_ids: jax.Array,
    tokens: jax.Array,
    positions: jax.Array,
    depths: jax.Array,
    block_tables: jax.Array,
    sampling: SamplingParams,
    ramp_tokens: jax.Array | None = None,
    draft_tokens: jax.Array | None = None,
    draft_probs: jax.Array | None = None,
    *,
    graph: ModelGraph,
    start: int,
    end: int,
    ramp: int,
    measure: str,
    do_sample: bool,
    attention: str = "xla",
    every_position: bool = False,
    logprobs: bool = False,
    speculative: bool = False,
):
    """Layers [start, end) for a chunk of consecutive positions per row (`missing_kv="recompute"`).

    Each row's chunk is its pending positions (exited earlier; their K/V of the layers they skipped
    is missing) followed by its current token, the last valid entry. tokens, positions (-1 =
    padding, at the end), depths: [B, T]; a position joins at layer `depths` (the layers it has
    run), and its hidden state lives in `ring [slots, R, H]` at (slot, position % R); a depth-0
    position is embedded from `tokens`. Afterwards every chunk position that ran is written back
    to the ring. Returns (token [B], confidence [B], pool, ring) for the current token, after the
    ramp `ramp` (or the LM head if -1, confidence +inf). every_position (LM head only): greedy
    tokens [B, T] at every chunk position, which verify mode compares with the drafts.

    speculative (verify mode, sampling): at a ramp, the output is (token, confidence, q [B, K]) with
    the draft distribution q (`_exit_head`); with every_position, each position's token comes from
    speculative sampling's acceptance rule (`speculative.verify_positions`) against the drafts made
    there, `draft_tokens` [B, T] (-1: none) drawn from `draft_probs` [B, T, K] (over the ramp's
    candidates `ramp_tokens`, or the whole vocabulary).
    """
    model = graph.merge(state)
    R = ring.shape[1]
    valid = positions >= 0
    at = jnp.where(valid, positions % R, R)  # out of range: padding reads clamp and writes drop
    x = ring[slot_ids[:, None], at]  # [B, T, H]
    if start == 0:
        x = jnp.where((depths == 0)[..., None], model.embed(tokens).astype(x.dtype), x)
    # one position per row is the current token alone, at depth `start`: nothing waits to join
    joins = depths if positions.shape[1] > 1 else None
    x, pool = paged_layers(model, pool, x, positions, block_tables, start, end, attention, join_depth=joins)
    ring = ring.at[slot_ids[:, None], at].set(x.astype(ring.dtype), mode="drop")
    current = jnp.maximum(valid.sum(axis=1) - 1, 0)  # [B] index of each row's current token
    # chunk positions deeper than the ramp keep the pool's K/V there (they ran that layer already)
    xd, pool = _draft_context(model, pool, x, positions, block_tables, end, ramp, attention, joins)
    xc = jnp.take_along_axis(xd, current[:, None, None], axis=1)[:, 0]  # [B, H]
    if ramp < 0 and every_position:
        B, T, H = x.shape
        final = jnp.full((B,), jnp.inf, jnp.float32)
        if not speculative:
            return model.greedy_tokens(x.reshape(B * T, H)).reshape(B, T), final, pool, ring
        return _verify_sampled(model, x, sampling, ramp_tokens, draft_tokens, draft_probs, valid), final, pool, ring
    out = _exit_head(model, xc, sampling, ramp_tokens, ramp, measure, do_sample, logprobs, speculative and ramp >= 0)
    return out[:2] + (pool, ring) + out[2:]


def _verify_sampled(model, x, sampling: SamplingParams, ramp_tokens, draft_tokens, draft_probs, valid):
    """Speculative sampling over a chunk x [B, T, H]: tokens [B, T] (see `chunk_step`). Each position's
    sampling step is the index of the token it produces: the row's current token (the last valid
    position) has `sampling.step`, the positions before it count down from there."""
    B, T, H = x.shape
    # the weight-left product [V, BT], fenced as in `next_tokens` so XLA does not repack the weight
    logits = jax.lax.optimization_barrier(model._head_columns(x.reshape(B * T, H))).T.astype(jnp.float32)
    current = valid.sum(axis=1) - 1  # [B]
    step = sampling.step[:, None] - current[:, None] + jnp.arange(T)[None]
    sp = SamplingParams(*(jnp.repeat(a, T) for a in sampling[:4]), step.reshape(-1))
    q = draft_probs.reshape(B * T, -1)
    if ramp_tokens is not None:  # candidates' probabilities into the vocabulary
        q = jnp.zeros((B * T, logits.shape[1]), jnp.float32).at[:, ramp_tokens].set(q)
    return verify_positions(logits, sp, draft_tokens.reshape(-1), q).reshape(B, T)
