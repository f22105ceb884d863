"""`reference_generate`: one request at a time, greedy, with early exit. The ground truth that
batched policies must reproduce.

Per token: run the layers up to the first ramp, exit there if `confidence > threshold`,
else continue to the next ramp, ... or the last layer. The prompt always runs full depth.
A token that exits at layer E never runs layers >= E; their K/V at its position is filled
by the configured method:
  copy       the exit layer's post-RoPE K/V (layer E-1) is copied into every layer >= E;
  propagate  each skipped layer computes its own K/V from the exit hidden state (norm,
             K/V projections and RoPE only);
  recompute  the exit hidden state is kept; the next token that runs layer E takes the
             missed positions along (a causal chunk) through the deep layers. At most
             `ee.max_draft` positions wait: past that a token does not exit.
The cache is contiguous per request (a one-page pool), so no paging logic is involved.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from drex_jax.early_exit import EEConfig
from drex_jax.kv.pages import bucket
from drex_jax.model.config import ModelConfig
from drex_jax.model.decoder import embed, lm_head
from drex_jax.model.modules import as_model
from drex_jax.model.ops import attention
from drex_jax.model.params import checkpoint_layout
from drex_jax.model.paged import layer_loop
from drex_jax.model.ramps import check_ramp_tokens, confidence, ramp_logits, to_token_ids


@dataclasses.dataclass
class ReferenceOutput:
    token_ids: list[int]
    exit_layers: list[int]  # per generated token; num_layers = ran full depth
    confidences: list[list[float]]  # per generated token, the confidence at each ramp it reached


@functools.partial(jax.jit, static_argnames=("cfg", "start", "end"), donate_argnames=("cache",))
def _segment(params, cache, x, positions, *, cfg: ModelConfig, start: int, end: int):
    """Layers [start, end) for a chunk x [1, T, H] at positions [1, T] (-1 = padding)."""
    S = cache["k"].shape[3]
    valid = positions >= 0
    mask = (jnp.arange(S)[None, None, :] <= positions[:, :, None]) & valid[:, :, None]

    def attend(q, k, v, k_pool, v_pool, layer):  # [kv, 1, S, D] -> [1, S, kv, D]
        return attention(cfg, q, k_pool[layer].transpose(1, 2, 0, 3), v_pool[layer].transpose(1, 2, 0, 3), mask)

    write_page = jnp.where(valid, 0, 1)  # page 1 does not exist: padding writes are dropped
    return layer_loop(as_model(cfg, params), cache, x, positions, write_page, jnp.maximum(positions, 0), attend,
                      start, end, unroll=False)


@functools.partial(jax.jit, static_argnames=("cfg", "measure"))
def _ramp(params, heads, h, ramp, ramp_tokens, *, cfg: ModelConfig, measure: str):
    logits = ramp_logits(params, cfg, h, heads, ramp, ramp_tokens)
    return to_token_ids(jnp.argmax(logits, -1), ramp_tokens), confidence(logits, measure)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _final(params, h, *, cfg: ModelConfig):
    return jnp.argmax(lm_head(params, cfg, h), -1)


@functools.partial(jax.jit, donate_argnames=("cache",))
def _copy_fill(cache, pos, exit_layer):
    """K/V of layer exit_layer-1 at `pos` -> every layer >= exit_layer."""
    L = cache["k"].shape[0]
    deeper = (jnp.arange(L) >= exit_layer)[:, None, None]

    def fill(c):
        src = c[exit_layer - 1, :, 0, pos]  # [kv, D]
        return c.at[:, :, 0, pos].set(jnp.where(deeper, src[None], c[:, :, 0, pos]))

    return jax.tree.map(fill, cache)


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def _propagate_fill(params, cache, h, pos, exit_layer, *, cfg: ModelConfig):
    """Each layer >= exit_layer computes its own K/V at `pos` from the exit hidden state h [H]."""

    model = as_model(cfg, params)

    def body(i, c):
        _, k, v = model.layers[i].attn.qkv(h[:, None], jnp.full((1, 1), pos))
        return {"k": c["k"].at[i, :, 0, pos].set(k[0, 0].astype(c["k"].dtype)),
                "v": c["v"].at[i, :, 0, pos].set(v[0, 0].astype(c["v"].dtype))}

    return jax.lax.fori_loop(exit_layer, cfg.num_layers, body, cache)


def _pad_chunk(xs: list, ps: list[int]):
    T = bucket(len(xs))
    x = jnp.zeros((1, T, xs[0].shape[-1]), xs[0].dtype).at[0, : len(xs)].set(jnp.stack(xs))
    pos = np.full((1, T), -1, np.int32)
    pos[0, : len(ps)] = ps
    return x, pos


def reference_generate(
    params: dict,
    cfg: ModelConfig,
    prompt_ids: list[int],
    ee: EEConfig,
    max_new_tokens: int,
    heads: dict | None = None,
    stop_ids: tuple[int, ...] = (),
    ramp_tokens=None,
) -> ReferenceOutput:
    """Greedy early-exit generation for one request. `heads`: trained ramp heads (ee.head ==
    'trained') or None for the shared head. `ramp_tokens`: the [ee.ramp_vocab] candidate ids
    the ramps score (needed when ee.ramp_vocab is set)."""
    ee.validate(cfg.num_layers, cfg.vocab_size)
    ramp_tokens = check_ramp_tokens(ee, cfg, ramp_tokens)
    if ee.head == "trained" and heads is None:
        raise ValueError("EEConfig.head == 'trained' needs the trained ramp heads (see drex-jax train-exits)")
    heads = heads if ee.head == "trained" else None
    params = checkpoint_layout(params)  # the fill below indexes layers with a traced index
    L = cfg.num_layers
    n = len(prompt_ids)
    S = bucket(n + max_new_tokens)
    dtype = params["final_norm"].dtype
    shape = (L, cfg.num_kv_heads, 1, S, cfg.head_dim)
    cache = {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}

    T = bucket(n)
    toks = np.zeros((1, T), np.int32)
    toks[0, :n] = prompt_ids
    pos = np.where(np.arange(T) < n, np.arange(T), -1)[None].astype(np.int32)
    x, cache = _segment(params, cache, embed(params, cfg, toks), pos, cfg=cfg, start=0, end=L)
    out = ReferenceOutput([int(_final(params, x[0, n - 1], cfg=cfg))], [L], [[]])

    bounds = list(ee.exit_layers) + ([L] if ee.exit_layers[-1] != L else [])
    pending: dict[int, tuple[jax.Array, int]] = {}  # recompute: position -> (hidden, layers done)
    while len(out.token_ids) < max_new_tokens and out.token_ids[-1] not in stop_ids:
        p = n + len(out.token_ids) - 1
        h = embed(params, cfg, jnp.asarray([out.token_ids[-1]]))[0]
        chunk: dict[int, jax.Array] = {}  # recompute: missed positions riding along
        start, token, exit_at, confs = 0, None, L, []
        for r, E in enumerate(bounds):
            if ee.missing_kv == "recompute":
                chunk.update({q: hq for q, (hq, done) in pending.items() if done == start})
                order = sorted(chunk) + [p]
                xc, pc = _pad_chunk([chunk[q] for q in sorted(chunk)] + [h], order)
                xc, cache = _segment(params, cache, xc, pc, cfg=cfg, start=start, end=E)
                chunk = {q: xc[0, i] for i, q in enumerate(sorted(chunk))}
                h = xc[0, len(order) - 1]
            else:
                xc, cache = _segment(params, cache, h[None, None], np.array([[p]], np.int32), cfg=cfg,
                                     start=start, end=E)
                h = xc[0, 0]
            start = E
            if r < len(ee.exit_layers):
                tok, conf = _ramp(params, heads, h, r, ramp_tokens, cfg=cfg, measure=ee.confidence)
                confs.append(float(conf))
                # recompute: a row holds at most max_draft pending positions (the engine's cap)
                room = ee.missing_kv != "recompute" or len(pending) < ee.max_draft
                if E == L or (float(conf) > ee.thresholds[r] and room):
                    token, exit_at = int(tok), E
                    break
        if token is None:
            token = int(_final(params, h, cfg=cfg))
        if ee.missing_kv == "recompute":
            for q, hq in chunk.items():  # progressed as far as this token went
                pending[q] = (hq, exit_at)
            if exit_at < L:
                pending[p] = (h, exit_at)
            pending = {q: v for q, v in pending.items() if v[1] < L}
        elif exit_at < L and ee.missing_kv == "copy":
            cache = _copy_fill(cache, p, exit_at)
        elif exit_at < L:
            cache = _propagate_fill(params, cache, h, p, exit_at, cfg=cfg)
        out.token_ids.append(token)
        out.exit_layers.append(exit_at)
        out.confidences.append(confs)
    return out
