"""One description of the parameters drives random init, shape checks and HF name mapping.

Params are a plain nested dict of arrays. Per-layer weights are stacked on a leading
`[layers]` axis so a segment `[start, end)` indexes them without copying.
Linear weights are stored `[in, out]` (HF stores `[out, in]`).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from drex_jax.model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    hf_name: str  # '{i}' stands for the layer index for stacked weights
    transpose: bool = False  # HF Linear stores [out, in]
    stacked: bool = False  # one copy per layer, stacked on axis 0
    kind: str = "matrix"  # "matrix" | "norm" | "bias" | "embed"
    tp_axis: int | None = None  # axis split over the tensor-parallel mesh axis (None = replicated)


def param_specs(cfg: ModelConfig) -> dict[str, ParamSpec]:
    """Flat `path -> spec`. Paths use '/' (e.g. 'layers/wq')."""
    H, I, V, L = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_layers
    q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    p = "model.layers.{i}."
    specs = {
        "embed": ParamSpec((V, H), "model.embed_tokens.weight", kind="embed"),
        "final_norm": ParamSpec((H,), "model.norm.weight", kind="norm"),
        "layers/attn_norm": ParamSpec((L, H), p + "input_layernorm.weight", stacked=True, kind="norm"),
        # Megatron-style tensor parallelism: heads and MLP width split over `tp`; column-split
        # projections in, row-split projections out (one all-reduce per block)
        "layers/wq": ParamSpec((L, H, q_dim), p + "self_attn.q_proj.weight", True, True, tp_axis=2),
        "layers/wk": ParamSpec((L, H, kv_dim), p + "self_attn.k_proj.weight", True, True, tp_axis=2),
        "layers/wv": ParamSpec((L, H, kv_dim), p + "self_attn.v_proj.weight", True, True, tp_axis=2),
        "layers/wo": ParamSpec((L, q_dim, H), p + "self_attn.o_proj.weight", True, True, tp_axis=1),
        "layers/mlp_norm": ParamSpec((L, H), p + "post_attention_layernorm.weight", stacked=True, kind="norm"),
        "layers/w_gate": ParamSpec((L, H, I), p + "mlp.gate_proj.weight", True, True, tp_axis=2),
        "layers/w_up": ParamSpec((L, H, I), p + "mlp.up_proj.weight", True, True, tp_axis=2),
        "layers/w_down": ParamSpec((L, I, H), p + "mlp.down_proj.weight", True, True, tp_axis=1),
    }
    if cfg.qkv_bias:
        for n, d in (("q", q_dim), ("k", kv_dim), ("v", kv_dim)):
            specs[f"layers/b{n}"] = ParamSpec((L, d), p + f"self_attn.{n}_proj.bias", stacked=True, kind="bias",
                                              tp_axis=1)
    if cfg.o_bias:
        specs["layers/bo"] = ParamSpec((L, H), p + "self_attn.o_proj.bias", stacked=True, kind="bias")
    if not cfg.tie_word_embeddings:
        specs["lm_head"] = ParamSpec((H, V), "lm_head.weight", transpose=True)
    return specs


def unflatten(flat: dict[str, object]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return tree


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in tree.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, path + "/"))
        else:
            out[path] = v
    return out


def init_params(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32, scale: float = 0.02) -> dict:
    """Random params with the right shapes (tests and GPU-scale benchmarks)."""
    specs = param_specs(cfg)
    keys = jax.random.split(key, len(specs))
    flat = {}
    for k, (path, spec) in zip(keys, sorted(specs.items())):
        if spec.kind == "norm":
            flat[path] = jnp.ones(spec.shape, dtype)
        else:
            flat[path] = (scale * jax.random.normal(k, spec.shape, jnp.float32)).astype(dtype)
    return unflatten(flat)


def check_params(cfg: ModelConfig, params: dict) -> None:
    """Raise ValueError naming every missing, unexpected or mis-shaped parameter."""
    specs = param_specs(cfg)
    flat = flatten(params)
    problems = []
    for path in sorted(set(specs) - set(flat)):
        problems.append(f"missing parameter {path!r} (shape {specs[path].shape})")
    for path in sorted(set(flat) - set(specs)):
        problems.append(f"unexpected parameter {path!r}")
    for path in sorted(set(specs) & set(flat)):
        shape = tuple(np.shape(flat[path]))
        if shape != specs[path].shape:
            problems.append(f"parameter {path!r} has shape {shape}, config expects {specs[path].shape}")
        dt = np.dtype(flat[path].dtype)
        if not np.issubdtype(dt, np.floating) and dt != jnp.bfloat16:
            problems.append(f"parameter {path!r} has dtype {dt}, expected a float dtype")
    if problems:
        raise ValueError("params do not match the model config:\n  " + "\n  ".join(problems))


def cast_params(params: dict, dtype) -> dict:
    return jax.tree.map(lambda a: jnp.asarray(a, dtype), params)
