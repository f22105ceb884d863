"""Decoder layers over the paged KV pool: the jitted prefill and decode steps.

A batch is a set of rows; each row carries its own positions and block table, so padded
rows (position -1, block table of dummy pages) write nothing and change nothing.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from drex_jax.model.config import ModelConfig
from drex_jax.model.decoder import attention, embed, finish_layer, layer_at, lm_head, qkv
from drex_jax.sampling import SamplingParams, sample


def run_layers(
    params: dict,
    cfg: ModelConfig,
    pool: dict,
    x: jax.Array,
    positions: jax.Array,
    block_tables: jax.Array,
    start: int,
    end: int,
):
    """Run layers `[start, end)` for rows that attend through their pages.

    x: [B, T, H]; positions: [B, T] int32 (-1 = padding: no KV write, output ignored);
    block_tables: [B, P] int32. Each token's K/V is written to its page before attention,
    so it attends to itself and every earlier position of its row. Returns (x, pool).
    """
    B, T, _ = x.shape
    _, _, num_pages, page_size, _ = pool["k"].shape
    S = block_tables.shape[1] * page_size
    valid = positions >= 0
    pos = jnp.maximum(positions, 0)
    # out-of-range page id => the scatter drops the write (padding rows/positions)
    write_page = jnp.where(valid, jnp.take_along_axis(block_tables, pos // page_size, axis=1), num_pages)
    write_off = pos % page_size
    mask = (jnp.arange(S)[None, None, :] <= pos[:, :, None]) & valid[:, :, None]  # [B, T, S]

    def gather(layer_pool):  # [kv, N, ps, D] -> [B, S, kv, D]
        g = layer_pool[:, block_tables]  # [kv, B, P, ps, D]
        return g.reshape(cfg.num_kv_heads, B, S, cfg.head_dim).transpose(1, 2, 0, 3)

    def body(i, carry):
        x, k_pool, v_pool = carry
        lp = layer_at(params["layers"], i)
        q, k, v = qkv(lp, cfg, x, pos)
        # advanced indices split by a slice => value layout [B, T, kv, D]
        k_pool = k_pool.at[i, :, write_page, write_off].set(k.astype(k_pool.dtype), mode="drop")
        v_pool = v_pool.at[i, :, write_page, write_off].set(v.astype(v_pool.dtype), mode="drop")
        attn = attention(cfg, q, gather(k_pool[i]), gather(v_pool[i]), mask)
        return finish_layer(lp, cfg, x, attn), k_pool, v_pool

    x, k_pool, v_pool = jax.lax.fori_loop(start, end, body, (x, pool["k"], pool["v"]))
    return x, {"k": k_pool, "v": v_pool}


@functools.partial(jax.jit, static_argnames=("cfg", "do_sample"), donate_argnames=("pool",))
def prefill_step(
    params: dict,
    pool: dict,
    tokens: jax.Array,
    lengths: jax.Array,
    block_tables: jax.Array,
    sampling: SamplingParams,
    *,
    cfg: ModelConfig,
    do_sample: bool,
):
    """Prompts [B, T] (right-padded to a bucket, true `lengths` [B]) -> first tokens [B], pool."""
    B, T = tokens.shape
    t = jnp.arange(T, dtype=jnp.int32)[None]
    positions = jnp.where(t < lengths[:, None], t, -1)
    x, pool = run_layers(params, cfg, pool, embed(params, tokens), positions, block_tables, 0, cfg.num_layers)
    last = x[jnp.arange(B), lengths - 1]
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
    x, pool = run_layers(params, cfg, pool, x, positions[:, None], block_tables, 0, cfg.num_layers)
    return sample(lm_head(params, cfg, x[:, 0]), sampling, do_sample), pool
