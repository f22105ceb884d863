"""The one description of the parameters: shapes, HF names, layouts and tensor-parallel split
axes per path. Random init, shape checks, HF/GGUF loading, sharding and the cost model all
read it. Plain Python (no jax): the host-side cost model (`sched/`) uses it too.
"""
from __future__ import annotations

import dataclasses

from drex_jax.model.config import ModelConfig

MATRICES = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


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
    if cfg.qk_norm:  # one [head_dim] weight shared by every head: replicated under tensor parallelism
        D = cfg.head_dim
        specs["layers/q_norm"] = ParamSpec((L, D), p + "self_attn.q_norm.weight", stacked=True, kind="norm")
        specs["layers/k_norm"] = ParamSpec((L, D), p + "self_attn.k_norm.weight", stacked=True, kind="norm")
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
