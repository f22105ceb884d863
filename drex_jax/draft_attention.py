"""Context-aware draft heads: an attention block in front of a ramp's head, so the draft sees the
earlier positions and not only its own hidden state.

At a ramp after layer E, the block attends from the ramp's hidden state over the keys and values
of layer E (the first layer the exit skips) at every earlier position, adds its output to the
residual stream, and the ramp's trained head (`model.ramps`) scores that. Its K/V projections,
input norm (and biases, Qwen3's k-norm) are layer E's own, frozen; only its query and output
projections train (`draft_wq` [R, nh*D, H], `draft_wo` [R, H, nh*D] per ramp, stored beside the
heads' `norm`/`down`/`up`, initialised from layer E's). So the block needs no K/V of its own: it
reads the pool's layer E where it lies, and for the rows it drafts it writes there exactly what
layer E writes (the same projection of the same hidden state), which a deeper pass over those
positions then rewrites with the same values. No pool layer is added and nothing is missing for
positions that never drafted.

Why frozen K/V and not the block's own (an extra pool layer): trained offline on the same data
(`benchmarks/draft_adapters.py`), the two agreed with the full model equally often (layers 8/15/22:
27.6/34.1/51.4 % frozen, 27.5/36.0/52.4 % own K/V, 23.0/28.9/47.8 % for a position-local head
trained the same way).

Training: `drex-jax train-exits --adapter attention` (`train_drafts.train_draft_heads`), on the
layer-E hidden states of whole sequences computed once, with the trunk frozen.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from drex_jax.exit_heads import DRAFT_KEYS
from drex_jax.model.config import ModelConfig
from drex_jax.model.ops import causal_attention
from drex_jax.model.params import is_packed, layer_params


def has_draft_attention(heads: dict | None) -> bool:
    return heads is not None and all(k in heads for k in DRAFT_KEYS)


def init_draft_attention(params: dict, cfg: ModelConfig, exit_layers) -> dict:
    """{draft_wq [R, nh*D, H], draft_wo [R, H, nh*D]} (fp32) copied from each ramp layer's own Q and
    output projections: the block starts as layer E's attention, which already attends usefully."""
    from drex_jax.model.params import decode_layout

    dl = decode_layout(params)
    layers = [dl["layers"][e] for e in exit_layers]
    return {"draft_wq": np.stack([np.asarray(lp["wq"], np.float32) for lp in layers]),
            "draft_wo": np.stack([np.asarray(lp["wo"], np.float32) for lp in layers])}


def block_weights(params: dict, cfg: ModelConfig, exit_layers, heads: dict) -> tuple[dict, ...]:
    """Per ramp, the `DraftAttention` weights in the params' layout (decode or packed): layer E's
    norm and K/V (with its biases and q/k norms) and the ramp's `draft_wq`, `draft_wo`."""
    if len(exit_layers) != len(heads["draft_wq"]):
        raise ValueError(f"{len(heads['draft_wq'])} draft attention blocks for {len(exit_layers)} ramps {list(exit_layers)}")
    packed = is_packed(params)
    out = []
    for r, e in enumerate(exit_layers):
        if not 0 < e < cfg.num_layers:
            raise ValueError(f"a draft attention block reads the layer its ramp skips first; ramp {e} is not in "
                             f"[1, {cfg.num_layers - 1}]")
        wq, wo = heads["draft_wq"][r], heads["draft_wo"][r]
        if not packed:
            lp = layer_params(params, e)
            dtype = lp["wk"].dtype
            out.append({**lp, "wq": jnp.asarray(wq, dtype), "wo": jnp.asarray(wo, dtype)})
            continue
        from drex_jax.model.kernels.matmul import pack
        from drex_jax.model.params import PACKED, _unpacked_layer

        lp = params["layers"][e]
        dense = _unpacked_layer(lp)
        qkv = np.concatenate([np.asarray(wq, np.float32), np.asarray(dense["wk"]), np.asarray(dense["wv"])])
        w = {k: v for k, v in lp.items() if k not in PACKED}
        out.append({**w, "wqkv": jnp.asarray(pack(qkv)), "wo": jnp.asarray(pack(np.asarray(wo, np.float32)))})
    return tuple(out)


def draft_context(cfg: ModelConfig, block, x: jax.Array, lengths: jax.Array) -> jax.Array:
    """Training and teacher-forced evaluation: x [B, W, H] (the ramp layer's input at positions
    0..W-1 of each row; `lengths` [B] real ones) -> x plus the block's causal attention over them
    (what the served block computes from the pool). `block`: a `DraftAttention`."""
    B, W, H = x.shape
    positions = jnp.broadcast_to(jnp.arange(W, dtype=jnp.int32), (B, W))
    xt = x.reshape(B * W, H).T
    q, k, v = block.attn.qkv(xt, positions)
    keys = jnp.arange(W)
    mask = (keys[None, :] <= keys[:, None])[None] & (keys < lengths[:, None])[:, None, :]  # [B, W, W]
    o = causal_attention(cfg, q, k, v, mask)
    return block.finish(xt, o).T.reshape(B, W, H)
