"""Decoder layers over the paged KV pool: the jitted prefill and decode steps.

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

from drex_jax.model.config import ModelConfig
from drex_jax.model.decoder import attention, embed, finish_layer, layer_at, lm_head, qkv
from drex_jax.sampling import SamplingParams, sample


def layer_loop(
    params: dict,
    cfg: ModelConfig,
    pool: dict,
    x: jax.Array,
    positions: jax.Array,
    write_page: jax.Array,
    write_off: jax.Array,
    attend: Callable,
    start: int,
    end: int,
    kv_depth: jax.Array | None = None,
    missing_kv: str = "copy",
):
    """Run layers `[start, end)`, writing each token's K/V into the pool first.

    x: [B, T, H]; positions, write_page, write_off: [B, T] int32 (write_page >= num_pages
    drops the write). `attend(q, k, v, k_layer_pool, v_layer_pool) -> [B, T, nh*D]`.
    The pool is a loop carry, so with a donated pool XLA updates it in place.

    kv_depth [B, T] (optional) replays early exits: a token with depth E runs layers < E only;
    its K/V at layers >= E is what the early-exit fill wrote (`missing_kv`): layer E-1's K/V
    (copy) or each layer's projection of the frozen exit hidden state (propagate).
    """
    pos = jnp.maximum(positions, 0)

    def body(i, carry):
        x, k_pool, v_pool, k_last, v_last = carry
        lp = layer_at(params["layers"], i)
        q, k, v = qkv(lp, cfg, x, pos)
        if kv_depth is not None:
            live = (i < kv_depth)[..., None, None]  # [B, T, 1, 1]
            if missing_kv == "copy":
                k, v = jnp.where(live, k, k_last), jnp.where(live, v, v_last)
            k_last, v_last = k, v
        # advanced indices split by a slice => value layout [B, T, kv, D]
        k_pool = k_pool.at[i, :, write_page, write_off].set(k.astype(k_pool.dtype), mode="drop")
        v_pool = v_pool.at[i, :, write_page, write_off].set(v.astype(v_pool.dtype), mode="drop")
        y = finish_layer(lp, cfg, x, attend(q, k, v, k_pool[i], v_pool[i]))
        if kv_depth is not None:  # exited tokens keep their exit hidden state
            y = jnp.where(live[..., 0], y, x)
        return y, k_pool, v_pool, k_last, v_last

    B, T = positions.shape
    none = jnp.zeros((B, T, cfg.num_kv_heads, cfg.head_dim), x.dtype) if kv_depth is not None else None
    x, k_pool, v_pool, _, _ = jax.lax.fori_loop(start, end, body, (x, pool["k"], pool["v"], none, none))
    return x, {"k": k_pool, "v": v_pool}


def paged_layers(params, cfg, pool, x, positions, block_tables, start: int, end: int):
    """Layers `[start, end)` for rows attending through their pages (decode, deep segments).

    x: [B, T, H]; positions: [B, T] (-1 = padding); block_tables: [B, P]. Returns (x, pool).
    """
    B, T, _ = x.shape
    _, _, num_pages, page_size, _ = pool["k"].shape
    S = block_tables.shape[1] * page_size
    valid = positions >= 0
    pos = jnp.maximum(positions, 0)
    write_page = jnp.where(valid, jnp.take_along_axis(block_tables, pos // page_size, axis=1), num_pages)
    mask = (jnp.arange(S)[None, None, :] <= pos[:, :, None]) & valid[:, :, None]  # [B, T, S]

    def gather(layer_pool):  # [kv, N, ps, D] -> [B, S, kv, D]
        g = layer_pool[:, block_tables]  # [kv, B, P, ps, D]
        return g.reshape(cfg.num_kv_heads, B, S, cfg.head_dim).transpose(1, 2, 0, 3)

    def attend(q, k, v, k_layer, v_layer):
        return attention(cfg, q, gather(k_layer), gather(v_layer), mask)

    return layer_loop(params, cfg, pool, x, positions, write_page, pos % page_size, attend, start, end)


@functools.partial(jax.jit, static_argnames=("cfg", "do_sample", "missing_kv"), donate_argnames=("pool",))
def prefill_step(
    params: dict,
    pool: dict,
    tokens: jax.Array,
    positions: jax.Array,
    segment_ids: jax.Array,
    write_page: jax.Array,
    write_off: jax.Array,
    last_index: jax.Array,
    sampling: SamplingParams,
    kv_depth: jax.Array | None = None,
    *,
    cfg: ModelConfig,
    do_sample: bool,
    missing_kv: str = "copy",
):
    """Prefill prompts packed into rows (several prompts per row, none before them in the cache).

    tokens, positions (-1 = padding), segment_ids, write_page, write_off: [R, W];
    last_index: [Q] flat index (row * W + col) of each prompt's last token.
    kv_depth [R, W] (optional): replay each position's early-exit depth (see `layer_loop`), so a
    preempted request's recomputed cache equals the one it lost.
    Returns (first generated token per prompt [Q], pool).
    """
    R, W = tokens.shape
    valid = positions >= 0
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = positions[:, None, :] <= positions[:, :, None]
    mask = same & causal & valid[:, :, None] & valid[:, None, :]  # [R, W, W] block-diagonal causal

    def attend(q, k, v, k_layer, v_layer):  # prompts attend to their own fresh K/V only
        return attention(cfg, q, k, v, mask)

    x, pool = layer_loop(params, cfg, pool, embed(params, tokens), positions, write_page, write_off, attend,
                         0, cfg.num_layers, kv_depth, missing_kv)
    last = x.reshape(R * W, -1)[last_index]
    return sample(lm_head(params, cfg, last), sampling, do_sample), pool


@functools.partial(jax.jit, static_argnames=("cfg", "do_sample"), donate_argnames=("pool",))
def decode_step(
    params: dict,
    pool: dict,
    tokens: jax.Array,
    positions: jax.Array,
    block_tables: jax.Array,
    sampling: SamplingParams,
    *,
    cfg: ModelConfig,
    do_sample: bool,
):
    """One token per row: tokens [B], positions [B] (-1 = padding row) -> next tokens [B], pool."""
    x = embed(params, tokens)[:, None]
    x, pool = paged_layers(params, cfg, pool, x, positions[:, None], block_tables, 0, cfg.num_layers)
    return sample(lm_head(params, cfg, x[:, 0]), sampling, do_sample), pool
