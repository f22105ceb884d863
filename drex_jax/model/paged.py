"""The model's decoder layers over the paged KV pool: the jitted prefill and decode steps.

Rows carry their own positions (-1 = padding) and page ids, so padded rows and tokens
write nothing (an out-of-range page id makes the scatter drop the write) and change
nothing. Prefill packs several prompts into each row (little padding, small attention);
decode attends through each row's block table.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from drex_jax.generation import SamplingParams
from drex_jax.logprobs import head_tokens
from drex_jax.model.attention_backends import get_backend
from drex_jax.model.modules import EETransformer, ModelGraph
from drex_jax.model.ops import causal_attention
from drex_jax.model.ops import from_stream, to_stream


def layer_loop(
    model: EETransformer,
    pool: dict,
    x: jax.Array,
    positions: jax.Array,
    write_page: jax.Array,
    write_off: jax.Array,
    attend: Callable,
    start: int,
    end: int,
    kv_depth: jax.Array | None = None,
    replay_copies: bool = True,
    unroll: bool = True,
    writes: str = "per_layer",
    join_depth: jax.Array | None = None,
    blocks: dict | None = None,
):
    """Run the model's layers `[start, end)`, writing each token's K/V into the pool first.

    x: [B, T, H]; positions, write_page, write_off: [B, T] int32 (write_page >= num_pages
    drops the write). `attend(q, k, v, k_pool, v_pool, layer) -> [B, T, nh*D]` reads layer
    `layer` of the whole pool (no per-layer slice is materialized). With a donated pool XLA
    updates it in place.

    unroll=True (the engine's steps): the loop is unrolled in Python so each layer's weights are
    read where they lie (decode layout: one `DecoderLayer` per layer, no per-layer copy). Measured for prefill too: the
    unrolled step ran 8 prompts x 16 tokens in 184 ms where a `fori_loop` over the layers
    stacked per call took 413 ms (it compiles 2x faster). unroll=False (the unbatched reference,
    checkpoint layout only): a `fori_loop` over the `StackedLayers`, one compiled layer.

    writes: how this step's K/V reach the pool.
    "per_layer": a scatter per K and V before each layer's `attend` (which reads them from the pool);
    "after" (unrolled only): `attend` gets them as k, v and does not read them from the pool, so
    every layer's K/V is written after the loop by one scatter per K and V (`write_layers`):
    fewer ops, and ~5 fewer executable memory mappings per layer (XLA:CPU maps every kernel, and
    the kernel's limit on mappings caps how many programs a process can hold);
    "attend": `attend` writes them itself and returns (out, k_pool, v_pool) (the FFI kernel: no
    scatter at all, layers ordered by the pool it hands on).

    kv_depth [B, T] (optional) replays early exits: a token with depth E runs layers < E only;
    its K/V at layers >= E is what the early-exit fill wrote (`kv.missing`): layer E-1's K/V
    (`replay_copies`: copy) or each layer's projection of the frozen exit hidden state (propagate).

    join_depth [B, T] (optional) runs a chunk of positions that are at different depths (the
    recompute of skipped layers): a token joins at layer join_depth and runs the layers from there;
    below it the token's K/V is already in the pool, so the layer uses (and rewrites) the pool's
    K/V at its position and its hidden state waits unchanged.

    blocks (optional, unrolled only): {i: module} run in place of layer i, over layer i of the pool
    (a module with `attn` and `finish`, such as a ramp's `DraftAttention`).
    """
    cfg = model.cfg
    B, T = positions.shape
    pos = jnp.maximum(positions, 0)

    if writes not in ("per_layer", "after", "attend"):
        raise ValueError(f"writes must be 'per_layer', 'after' or 'attend', got {writes!r}")
    written = []  # writes="after": each layer's (k, v)

    def layer(i, lp, carry):
        xt, k_pool, v_pool, k_last, v_last = carry
        q, k, v = lp.attn.qkv(xt, pos)
        if join_depth is not None:
            joined = (join_depth <= i)[..., None, None]  # [B, T, 1, 1]
            k = jnp.where(joined, k, _pool_rows(k_pool, i, write_page, write_off).astype(k.dtype))
            v = jnp.where(joined, v, _pool_rows(v_pool, i, write_page, write_off).astype(v.dtype))
        if kv_depth is not None:
            live = (i < kv_depth)[..., None, None]  # [B, T, 1, 1]
            if replay_copies:
                k, v = jnp.where(live, k, k_last), jnp.where(live, v, v_last)
            k_last, v_last = k, v
        if writes == "attend":
            o, k_pool, v_pool = attend(q, k, v, k_pool, v_pool, i)
        else:
            if writes == "after":
                written.append((k, v))
            else:  # advanced indices split by a slice => value layout [B, T, kv, D]
                k_pool = k_pool.at[i, :, write_page, write_off].set(k.astype(k_pool.dtype), mode="drop")
                v_pool = v_pool.at[i, :, write_page, write_off].set(v.astype(v_pool.dtype), mode="drop")
            o = attend(q, k, v, k_pool, v_pool, i)
        y = lp.finish(xt, o)
        if kv_depth is not None:  # exited tokens keep their exit hidden state
            y = jnp.where(live.reshape(1, B * T), y, xt)
        if join_depth is not None:  # tokens not yet joined wait at their depth
            y = jnp.where(joined.reshape(1, B * T), y, xt)
        return y, k_pool, v_pool, k_last, v_last

    none = None
    if kv_depth is not None:  # layer 0 is always live, so these zeros are never used
        none = jnp.zeros((B, T, cfg.num_kv_heads, cfg.head_dim), x.dtype)
    carry = (to_stream(x), pool["k"], pool["v"], none, none)
    if writes == "after" and not unroll:
        raise ValueError("writes='after' needs the unrolled loop")
    if unroll:
        for i in range(start, end):
            carry = layer(i, (blocks or {}).get(i, model.layers[i]), carry)
    else:
        if model.decode_layout:
            raise ValueError("unroll=False indexes stacked layers: pass the checkpoint layout")
        carry = jax.lax.fori_loop(start, end, lambda i, c: layer(i, model.layers[i], c), carry)
    xt, k_pool, v_pool, _, _ = carry
    pool = {"k": k_pool, "v": v_pool}
    if written:
        pool = write_layers(pool, start, [k for k, _ in written], [v for _, v in written], write_page, write_off)
    return from_stream(xt, B, T), pool


def _pool_rows(cache: jax.Array, layer: int, page: jax.Array, off: jax.Array) -> jax.Array:
    """Layer `layer`'s cached K or V at (page, off) [B, T] -> [B, T, kv, D] (out-of-range pages
    clamp: those are padding tokens, whose values are never used)."""
    return jnp.moveaxis(cache[layer][:, page, off], 0, -2)


def write_layers(pool: dict, start: int, ks: list, vs: list, page: jax.Array, off: jax.Array) -> dict:
    """Write layers `start, start+1, ...`'s K/V (lists of [B, T, kv, D], or [B, kv, D] with
    page, off [B]) at (page, off), one scatter per K and V for all of them (page >= num_pages
    drops the write)."""
    def put(cache, vals):  # a layer slice and adjacent page/off indices: value [layers, kv, *idx, D]
        stacked = jnp.moveaxis(jnp.stack(vals), -2, 1).astype(cache.dtype)
        return cache.at[start:start + len(vals), :, page, off].set(stacked, mode="drop")

    return {"k": put(pool["k"], ks), "v": put(pool["v"], vs)}


def paged_layers(model: EETransformer, pool, x, positions, block_tables, start: int, end: int,
                 attention: str = "xla", join_depth: jax.Array | None = None, blocks: dict | None = None):
    """The model's layers `[start, end)` for rows attending through their pages (decode, deep segments).

    x: [B, T, H]; positions: [B, T] (-1 = padding); block_tables: [B, P]. Returns (x, pool).
    `attention` names the backend that reads each layer's keys and values
    (`model.attention_backends`; a backend without multi-query support hands chunks of several
    positions per row to "xla"). `join_depth` [B, T], `blocks`: see `layer_loop`.
    """
    _, T, _ = x.shape
    _, _, num_pages, page_size, _ = pool["k"].shape
    backend = get_backend(attention)
    if T > 1 and not backend.multi_query:
        backend = get_backend("xla")
    valid = positions >= 0
    pos = jnp.maximum(positions, 0)
    write_page = jnp.where(valid, jnp.take_along_axis(block_tables, pos // page_size, axis=1), num_pages)
    attend = backend.build(model.cfg, block_tables, positions, page_size)
    return layer_loop(model, pool, x, positions, write_page, pos % page_size, attend, start, end,
                      writes=backend.writes, join_depth=join_depth, blocks=blocks)


@functools.partial(jax.jit, static_argnames=("graph", "replay_copies"), donate_argnames=("pool",))
def prefill_step(
    state: dict,
    pool: dict,
    tokens: jax.Array,
    positions: jax.Array,
    segment_ids: jax.Array,
    write_page: jax.Array,
    write_off: jax.Array,
    last_index: jax.Array,
    kv_depth: jax.Array | None = None,
    *,
    graph: ModelGraph,
    replay_copies: bool = True,
):
    """Prefill contexts packed into rows (several per row, none with K/V in the pool yet).
    `graph`, `state`: the model (`modules.split_model`).

    tokens, positions (-1 = padding), segment_ids, write_page, write_off: [R, W];
    last_index: [Q] flat index (row * W + col) of each context's last token (Q is fixed per
    engine, so programs differ by (R, W) only; `head_step` samples from the rows it needs).
    kv_depth [R, W] (optional): replay each position's early-exit depth (see `layer_loop`;
    `replay_copies`: the missing-KV method copied), so a preempted request's recomputed cache
    equals the one it lost.
    Returns (the final hidden state at each last_index [Q, H], pool).
    """
    model = graph.merge(state)
    cfg = model.cfg
    R, W = tokens.shape
    valid = positions >= 0
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = positions[:, None, :] <= positions[:, :, None]
    mask = same & causal & valid[:, :, None] & valid[:, None, :]  # [R, W, W] block-diagonal causal

    def attend(q, k, v, k_pool, v_pool, layer):  # contexts attend to their own fresh K/V only
        return causal_attention(cfg, q, k, v, mask)

    x, pool = layer_loop(model, pool, model.embed(tokens), positions, write_page, write_off, attend,
                         0, cfg.num_layers, kv_depth, replay_copies, writes="after")
    return x.reshape(R * W, -1)[last_index], pool


@functools.partial(jax.jit, static_argnames=("graph", "attention"), donate_argnames=("pool",))
def prefill_chunk_step(state: dict, pool: dict, tokens: jax.Array, positions: jax.Array, block_tables: jax.Array,
                       *, graph: ModelGraph, attention: str = "xla"):
    """The next chunk of contexts whose earlier positions are already in the pool (chunked prefill):
    tokens, positions [R, C] (consecutive per row from where the pool stops, -1 = padding at the
    end); block_tables [R, P]. Each row attends through its pages (`paged_layers`).
    Returns (the final hidden state at each row's last valid position [R, H], pool)."""
    model = graph.merge(state)
    x, pool = paged_layers(model, pool, model.embed(tokens), positions, block_tables, 0, model.cfg.num_layers,
                           attention)
    last = jnp.maximum(jnp.sum(positions >= 0, axis=1) - 1, 0)
    return jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0], pool


@functools.partial(jax.jit, static_argnames=("graph", "do_sample", "logprobs"))
def head_step(state: dict, hidden: jax.Array, sampling: SamplingParams, *, graph: ModelGraph, do_sample: bool,
              logprobs: bool = False):
    """The LM head's next tokens for the first Q rows of hidden [>= Q, H] (Q = the sampling rows):
    tokens [Q], or (tokens, LogprobRows) with `logprobs`."""
    model = graph.merge(state)
    return head_tokens(model, hidden[:sampling.temperature.shape[0]], sampling, do_sample, logprobs)


@functools.partial(jax.jit, static_argnames=("graph", "do_sample", "attention", "logprobs"),
                   donate_argnames=("pool",))
def decode_step(
    state: dict,
    pool: dict,
    tokens: jax.Array,
    positions: jax.Array,
    block_tables: jax.Array,
    sampling: SamplingParams,
    *,
    graph: ModelGraph,
    do_sample: bool,
    attention: str = "xla",
    logprobs: bool = False,
):
    """One token per row: tokens [B], positions [B] (-1 = padding row) -> next tokens [B], pool.
    `graph`, `state`: the model (`modules.split_model`); with `logprobs`, (tokens, LogprobRows)."""
    model = graph.merge(state)
    x = model.embed(tokens)[:, None]
    x, pool = paged_layers(model, pool, x, positions[:, None], block_tables, 0, model.cfg.num_layers, attention)
    return head_tokens(model, x[:, 0], sampling, do_sample, logprobs), pool
