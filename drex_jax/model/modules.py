"""The early-exit transformer as Flax NNX modules: embedding, attention, MLP, decoder layer,
exit ramp, and the model that holds them (Llama, Qwen2 and Qwen3 share every module).

Weights live in `nnx.Param`s. The engine splits the model once (`nnx.split`: a static graph
definition + a state pytree) and its jitted steps take the state with the graph definition as
a static argument, merging them at trace time: no weight is copied per call and nothing
recompiles per call.

Shapes: B batch, T query length, H hidden, N = B*T tokens, D head_dim. A layer's activations are
the transposed residual stream `xt [H, N]`, so every projection is `W @ xt` with the weight
`[out, in]` on the left (XLA:CPU's dot library streams a left operand without repacking it).

Two layouts of the same weights (see `params.py`): the decode layout builds one `DecoderLayer`
per layer (what serving runs, each weight read in place), the checkpoint layout a
`StackedLayers` whose `[layers, in, out]` weights are sliced per layer (training, the reference).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from drex_jax.generation import SamplingParams
from drex_jax.model.config import ModelConfig
from drex_jax.model.ops import apply_rope, project, project_rows, rms_norm, rope_inv_freq
from drex_jax.model.params import stacked_layer
from drex_jax.sampling import column_argmax, sample


def _param(w: dict, name: str, present: bool = True):
    return nnx.Param(w[name]) if present else None


class Embedding(nnx.Module):
    """Token embedding table [V, H] (with tied embeddings also the LM head's rows)."""

    def __init__(self, table: jax.Array):
        self.table = nnx.Param(table)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """tokens [...] int -> [..., H]."""
        return jnp.take(self.table[...], tokens, axis=0)


class Attention(nnx.Module):
    """Pre-norm grouped-query self-attention around an `attend` the caller supplies (dense over
    fresh K/V in prefill, the paged KV pool in decode): Q/K/V projections (+ Qwen2's biases),
    Qwen3's per-head q/k RMSNorm, split-half RoPE, and the output projection."""

    def __init__(self, cfg: ModelConfig, w: dict):
        self.cfg = cfg
        self.norm = nnx.Param(w["attn_norm"])
        # the packed layout (`params.packed_layout`) holds Q, K and V as one projection
        self.wqkv = _param(w, "wqkv", "wqkv" in w)
        self.wq, self.wk, self.wv = (_param(w, k, "wqkv" not in w) for k in ("wq", "wk", "wv"))
        self.wo = nnx.Param(w["wo"])
        self.bq, self.bk, self.bv = (_param(w, k, cfg.qkv_bias) for k in ("bq", "bk", "bv"))
        self.bo = _param(w, "bo", cfg.o_bias)
        self.q_norm, self.k_norm = (_param(w, k, cfg.qk_norm) for k in ("q_norm", "k_norm"))

    def qkv(self, xt: jax.Array, positions: jax.Array):
        """xt [H, N], positions [B, T] -> q [B,T,nh,D], k, v [B,T,nkv,D] (q and k rotated)."""
        cfg = self.cfg
        B, T = positions.shape
        h = rms_norm(xt, self.norm[...], cfg.rms_norm_eps, axis=0)

        def heads(y, b, n):  # [n*D, N] (+ bias) -> [B, T, n, D]
            y = y if b is None else y + b[...][:, None]
            return y.T.reshape(B, T, n, cfg.head_dim)

        if self.wqkv is not None:
            qkv = project(self.wqkv[...], h)
            nq, nkv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
            yq, yk, yv = qkv[:nq], qkv[nq:nq + nkv], qkv[nq + nkv:]
        else:
            yq, yk, yv = (project(w[...], h) for w in (self.wq, self.wk, self.wv))
        q = heads(yq, self.bq, cfg.num_heads)
        k = heads(yk, self.bk, cfg.num_kv_heads)
        v = heads(yv, self.bv, cfg.num_kv_heads)
        if cfg.qk_norm:
            q = rms_norm(q, self.q_norm[...], cfg.rms_norm_eps)
            k = rms_norm(k, self.k_norm[...], cfg.rms_norm_eps)
        inv = rope_inv_freq(cfg)
        return apply_rope(q, positions, inv), apply_rope(k, positions, inv), v

    def project_out(self, attn: jax.Array, n: int) -> jax.Array:
        """attn [B, T, nh*D] (N = n tokens) -> [H, N]."""
        o = project(self.wo[...], attn.reshape(n, -1).T)
        return o if self.bo is None else o + self.bo[...][:, None]


class MLP(nnx.Module):
    """Pre-norm SwiGLU block with its residual: xt + down(silu(gate h) * up h)."""

    def __init__(self, cfg: ModelConfig, w: dict):
        self.eps = cfg.rms_norm_eps
        self.norm = nnx.Param(w["mlp_norm"])
        # the packed layout holds gate and up as one projection
        self.w_gateup = _param(w, "w_gateup", "w_gateup" in w)
        self.w_gate, self.w_up = (_param(w, k, "w_gateup" not in w) for k in ("w_gate", "w_up"))
        self.w_down = nnx.Param(w["w_down"])

    def __call__(self, xt: jax.Array) -> jax.Array:
        h = rms_norm(xt, self.norm[...], self.eps, axis=0)
        if self.w_gateup is not None:
            gate, up = jnp.split(project(self.w_gateup[...], h), 2)
        else:
            gate, up = project(self.w_gate[...], h), project(self.w_up[...], h)
        return xt + project(self.w_down[...], jax.nn.silu(gate) * up)


class DecoderLayer(nnx.Module):
    """One pre-norm transformer layer. The caller runs `attn.qkv`, decides where K/V go (the paged
    pool, a replayed early exit) and attends, then `finish` adds the attention output and the MLP."""

    def __init__(self, cfg: ModelConfig, w: dict):
        self.attn = Attention(cfg, w)
        self.mlp = MLP(cfg, w)

    def finish(self, xt: jax.Array, attn: jax.Array) -> jax.Array:
        """xt [H, N]; attn [B, T, nh*D] -> the layer's output stream [H, N]."""
        return self.mlp(xt + self.attn.project_out(attn, xt.shape[1]))

    def __call__(self, xt: jax.Array, positions: jax.Array, attend) -> jax.Array:
        """The whole layer with `attend(q, k, v) -> [B, T, nh*D]`."""
        q, k, v = self.attn.qkv(xt, positions)
        return self.finish(xt, attend(q, k, v))

    def weights(self) -> dict:
        """The layer's weights by their params-pytree names (decode layout)."""
        a, m = self.attn, self.mlp
        named = {"attn_norm": a.norm, "wqkv": a.wqkv, "wq": a.wq, "wk": a.wk, "wv": a.wv, "wo": a.wo, "bq": a.bq,
                 "bk": a.bk, "bv": a.bv, "bo": a.bo, "q_norm": a.q_norm, "k_norm": a.k_norm, "mlp_norm": m.norm,
                 "w_gateup": m.w_gateup, "w_gate": m.w_gate, "w_up": m.w_up, "w_down": m.w_down}
        return {k: p[...] for k, p in named.items() if p is not None}


class StackedLayers(nnx.Module):
    """The checkpoint layout's layers: each weight stacked `[layers, ...]`, matrices `[in, out]`.
    `layers[i]` (i may be traced, inside a scan or fori_loop) is layer i as a `DecoderLayer`;
    its weights are slices (copies), which is why serving uses the decode layout instead."""

    def __init__(self, cfg: ModelConfig, stacked: dict):
        self.cfg = cfg
        self.weights = nnx.Dict({k: nnx.Param(v) for k, v in stacked.items()})

    def __len__(self) -> int:
        return self.cfg.num_layers

    def __getitem__(self, i) -> DecoderLayer:
        return DecoderLayer(self.cfg, stacked_layer({k: p[...] for k, p in self.weights.items()}, i))


class ExitRamp(nnx.Module):
    """A trained exit head: a residual low-rank adapter and its own RMSNorm in front of the
    model's frozen LM head, `logits = W_lm . rmsnorm(h + (h @ down) @ up)` (see `ramps.py`)."""

    def __init__(self, cfg: ModelConfig, norm: jax.Array, down: jax.Array, up: jax.Array):
        self.eps = cfg.rms_norm_eps
        self.norm, self.down, self.up = nnx.Param(norm), nnx.Param(down), nnx.Param(up)

    def __call__(self, h: jax.Array) -> jax.Array:
        """h [..., H] -> the normalized state the LM head's rows score, fp32 [..., H]."""
        h32 = h.astype(jnp.float32)
        return rms_norm(h32 + (h32 @ self.down[...]) @ self.up[...], self.norm[...], self.eps)


class DraftAttention(nnx.Module):
    """A context-aware draft adapter at an exit ramp (`drex_jax.draft_attention`): one attention
    block with no MLP over the earlier positions' keys and values of the layer the ramp skips
    first. Its K/V projections (and norm, biases) are that layer's own, so it reads the pool's
    layer as it is and writes there exactly what the layer writes; only its Q and output
    projections are trained. `finish` adds its output to the residual stream."""

    def __init__(self, cfg: ModelConfig, w: dict):
        self.attn = Attention(cfg, w)

    def finish(self, xt: jax.Array, attn: jax.Array) -> jax.Array:
        """xt [H, N]; attn [B, T, nh*D] -> xt + the block's output [H, N]."""
        return xt + self.attn.project_out(attn, xt.shape[1])


class EETransformer(nnx.Module):
    """The early-exit transformer: embedding, decoder layers, final norm + LM head, and (optional)
    trained exit ramps. A segment of it (layers a..b, then a ramp or the LM head) is what the
    engine's jitted steps run (`model.paged`, `rebatch.steps`).

    params: the params pytree in either layout (`params.py`); heads: stacked trained ramp heads
    ({norm [R, H], down [R, H, rank], up [R, rank, H]}) or None (ramps use the shared LM head);
    with context-aware drafts also `attention`: per ramp the `DraftAttention` weights in the
    params' layout (`draft_attention.block_weights`).
    """

    def __init__(self, cfg: ModelConfig, params: dict, heads: dict | None = None):
        self.cfg = cfg
        self.embed = Embedding(params["embed"])
        layers = params["layers"]
        self.decode_layout = isinstance(layers, (tuple, list))
        self.layers = nnx.List([DecoderLayer(cfg, lp) for lp in layers]) if self.decode_layout \
            else StackedLayers(cfg, layers)
        self.final_norm = nnx.Param(params["final_norm"])
        # untied: [V, H] in the decode layout (rows, like every matrix there), [H, V] in the checkpoint's
        self.lm_head = None if cfg.tie_word_embeddings else nnx.Param(params["lm_head"])
        # the packed layout's copy of the vocabulary rows in 32-row panels: the next-token products
        # run the CPU projection kernel (`params.packed_layout`)
        self.head_panels = _param(params, "head_panels", "head_panels" in params)
        self.ramps = None if heads is None else nnx.List(
            [ExitRamp(cfg, heads["norm"][r], heads["down"][r], heads["up"][r]) for r in range(heads["norm"].shape[0])])
        blocks = None if heads is None else heads.get("attention")
        self.draft_attention = None if blocks is None else nnx.List([DraftAttention(cfg, w) for w in blocks])

    # ------------------------------------------------------------------ heads
    def vocab_rows(self, columns: jax.Array | None = None) -> jax.Array:
        """The LM head as rows [V, H] (token ids `columns` [K] -> their rows [K, H]: a cheap gather)."""
        if self.lm_head is None:
            rows = self.embed.table[...]
        else:
            rows = self.lm_head[...] if self.decode_layout else self.lm_head[...].T
        return rows if columns is None else rows[columns]

    def lm_head_logits(self, x: jax.Array, columns: jax.Array | None = None) -> jax.Array:
        """Final RMSNorm + LM head -> fp32 logits. x [..., H] -> [..., V] ([..., K] for `columns` [K])."""
        return project_rows(self.vocab_rows(columns), rms_norm(x, self.final_norm[...], self.cfg.rms_norm_eps))

    def _head_columns(self, x: jax.Array) -> jax.Array:
        """Final RMSNorm + LM head as the weight-left product: x [B, H] -> logits [V, B] (params' dtype)."""
        h = rms_norm(x, self.final_norm[...], self.cfg.rms_norm_eps)
        if self.head_panels is not None:
            return project(self.head_panels[...], h.astype(jnp.float32).T, self.cfg.vocab_size)
        rows = self.vocab_rows()
        return rows @ h.astype(rows.dtype).T

    def greedy_tokens(self, x: jax.Array) -> jax.Array:
        """argmax of the LM head for x [B, H] -> [B] int32, over the weight-left product [V, B]
        itself (transposing the logits to [B, V] first costs as much as a third of the head)."""
        return column_argmax(self._head_columns(x))

    def next_tokens(self, x: jax.Array, sp: SamplingParams, do_sample: bool) -> jax.Array:
        """The LM head's next token for hidden states x [B, H] -> [B] int32 (greedy programs never
        form the [B, V] logits)."""
        if not do_sample:
            return self.greedy_tokens(x)
        # the weight-left product [V, B] as in greedy_tokens, fenced so XLA cannot fold the transpose
        # into the dot (it then repacks the weight: +25-40 ms on a decode step at batch 8-32, measured)
        logits = jax.lax.optimization_barrier(self._head_columns(x)).T.astype(jnp.float32)  # [B, V]
        return sample(logits, sp, True)

    def ramp_logits(self, h: jax.Array, ramp: int, columns: jax.Array | None = None) -> jax.Array:
        """Logits [..., V] of exit ramp `ramp` for hidden states h [..., H] ([..., K] over `columns`):
        its trained head, or the shared final norm + LM head when the model has none."""
        if self.ramps is None:
            return self.lm_head_logits(h, columns)
        return project_rows(self.vocab_rows(columns), self.ramps[ramp](h))


def model_params(model: EETransformer) -> dict:
    """The params pytree the model was built from (its layout; the same arrays)."""
    out = {"embed": model.embed.table[...], "final_norm": model.final_norm[...]}
    if model.lm_head is not None:
        out["lm_head"] = model.lm_head[...]
    if model.head_panels is not None:
        out["head_panels"] = model.head_panels[...]
    if model.decode_layout:
        out["layers"] = tuple(layer.weights() for layer in model.layers)
    else:
        out["layers"] = {k: p[...] for k, p in model.layers.weights.items()}
    return out


def as_model(cfg: ModelConfig, params) -> EETransformer:
    """`params` as the model: an `EETransformer` as is, a params dict (either layout) wrapped
    without copying its arrays."""
    return params if isinstance(params, EETransformer) else EETransformer(cfg, params)


class ModelGraph:
    """The model's `nnx.GraphDef` as the static argument of the jitted steps. JAX hashes static
    arguments on every call, and hashing a GraphDef walks all its nodes (~0.6 ms for SmolLM2's 30
    layers, measured): the hash is computed once here."""

    __slots__ = ("graph", "_hash")

    def __init__(self, graph: nnx.GraphDef):
        self.graph, self._hash = graph, hash(graph)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        return self is other or (isinstance(other, ModelGraph) and self._hash == other._hash
                                 and self.graph == other.graph)

    def merge(self, state: dict) -> EETransformer:
        """The model over `state` (inside a jitted step: its traced arrays)."""
        return nnx.merge(self.graph, state)


def split_model(cfg: ModelConfig, params: dict, heads: dict | None = None) -> tuple[ModelGraph, dict]:
    """(graph, state) of the model over `params`: what the jitted steps take, the graph static and
    the state a pure nested dict of the same arrays (no copy; a plain dict flattens ~5x faster
    per call than an `nnx.State` of Variables, measured)."""
    graph, state = nnx.split(EETransformer(cfg, params, heads))
    graph = ModelGraph(graph)
    # one object per distinct graph: JAX keeps the first as its cache key, and an equal but distinct
    # key would compare the whole GraphDef on every call (~0.17 ms, measured)
    return _GRAPHS.setdefault(graph, graph), nnx.to_pure_dict(state)


_GRAPHS: dict[ModelGraph, ModelGraph] = {}
