"""Random init, shape checks and the two layouts of the params pytree (the parameters themselves
are described once, in `model.specs`).

Two layouts of the same nested dict of arrays:
- checkpoint layout (conversion, checkpoints, training, the unbatched reference): per-layer
  weights stacked on a leading `[layers]` axis, linear weights `[in, out]`;
- decode layout (`decode_layout`, what the engine's compiled steps read): `layers` is a tuple
  of one dict per layer and linear weights are `[out, in]` (HF's own order). A jitted step
  then reads each layer's weights in place (slicing a stacked array inside the step copies
  the slice before its dot), and the dot keeps the weight on the left of a `[hidden, tokens]`
  activation, which XLA:CPU's dot library runs without repacking the weight on every call.

The packed layout (`packed_layout`) is the decode layout for the CPU projection kernel
(`kernels.matmul`): per layer `wqkv` (wq, wk, wv stacked by rows), `wo`, `w_gateup` (w_gate,
w_up) and `w_down`, each packed in 32-row panels `[rows / 32, in, 32]`, so a layer is four
projections that each stream their weight once; plus `head_panels`, the LM head's vocabulary
rows packed the same way (a second copy: the rows stay for gathers and the embedding).
`decode_layout` unpacks it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from drex_jax.model.config import ModelConfig
from drex_jax.model.specs import MATRICES, ParamSpec, flatten, param_specs, unflatten  # noqa: F401 (re-exported)


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
    problems = []
    if is_packed(params):  # their unpacked shapes, without unpacking (a copy of every matrix)
        params = {**{k: v for k, v in params.items() if k != "head_panels"},
                  "layers": tuple(_unpacked_layer_shapes(lp) for lp in params["layers"])}
    if is_decode_layout(params):
        params = _checkpoint_shapes(params, problems)
    flat = flatten(params)
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


def _checkpoint_shapes(params: dict, problems: list) -> dict:
    """Decode-layout params as checkpoint-layout shapes (what `check_params` compares with the
    specs); a layer whose shapes differ from layer 0's is added to `problems`."""
    def shapes(lp):
        return {k: (np.shape(a)[::-1] if k in MATRICES else np.shape(a)) for k, a in lp.items()}

    layers = params["layers"]
    first = shapes(layers[0]) if layers else {}
    for i, lp in enumerate(layers[1:], 1):
        if shapes(lp) != first:
            problems.append(f"layer {i} has parameters {shapes(lp)}, layer 0 has {first}")
    out = {**params, "layers": {k: jax.ShapeDtypeStruct((len(layers),) + tuple(s), layers[0][k].dtype)
                                for k, s in first.items()}}
    if "lm_head" in params:
        out["lm_head"] = jax.ShapeDtypeStruct(np.shape(params["lm_head"])[::-1], params["lm_head"].dtype)
    return out


def is_decode_layout(params: dict) -> bool:
    return isinstance(params["layers"], (tuple, list))


def layer_params(params: dict, i: int) -> dict:
    """Layer `i`'s weights in the decode layout (matrices `[out, in]`), from either layout.
    From the checkpoint layout this slices and transposes (a copy: reference and training only)."""
    layers = params["layers"]
    return layers[i] if is_decode_layout(params) else stacked_layer(layers, i)


def stacked_layer(layers: dict, i) -> dict:
    """Layer `i` (may be traced) of the checkpoint layout's stacked `layers`, in the decode layout."""
    return {k: (v[i].T if k in MATRICES else v[i]) for k, v in layers.items()}


PACKED = ("wqkv", "wo", "w_gateup", "w_down")


def is_packed(params: dict) -> bool:
    return is_decode_layout(params) and bool(params["layers"]) and "wqkv" in params["layers"][0]


def packed_layout(params: dict) -> dict:
    """The packed layout (module docstring) of decode-layout params, f32 (new arrays)."""
    from drex_jax.model.kernels.matmul import pack

    if is_packed(params):
        return params

    def layer(lp: dict) -> dict:
        out = {k: v for k, v in lp.items() if k not in MATRICES}
        out["wqkv"] = jnp.asarray(pack(np.concatenate([np.asarray(lp[k]) for k in ("wq", "wk", "wv")])))
        out["wo"], out["w_down"] = jnp.asarray(pack(lp["wo"])), jnp.asarray(pack(lp["w_down"]))
        out["w_gateup"] = jnp.asarray(pack(np.concatenate([np.asarray(lp["w_gate"]), np.asarray(lp["w_up"])])))
        return out

    params = decode_layout(params)
    rows = params["lm_head"] if "lm_head" in params else params["embed"]  # [V, H] either way here
    return {**params, "layers": tuple(layer(lp) for lp in params["layers"]), "head_panels": jnp.asarray(pack(rows))}


def _packed_rows(lp: dict) -> dict:
    """A packed layer's row counts, from its shapes: q, k/v, hidden and intermediate rows."""
    def rows(k):  # [panels, in, 32] -> panels x 32
        return lp[k].shape[0] * lp[k].shape[2]

    q = lp["wo"].shape[1]  # wo [H / 32, q rows, 32]
    return {"q": q, "kv": (rows("wqkv") - q) // 2, "hidden": rows("w_down"), "inter": rows("w_gateup") // 2}


def _unpacked_layer_shapes(lp: dict) -> dict:
    """`_unpacked_layer(lp)`'s shapes and dtypes (jax.ShapeDtypeStruct), from the packed shapes alone."""
    out = {k: v for k, v in lp.items() if k not in PACKED}
    n = _packed_rows(lp)

    def sds(shape, k):
        return jax.ShapeDtypeStruct(shape, lp[k].dtype)

    hidden_in = lp["wqkv"].shape[1]
    out["wq"], out["wk"], out["wv"] = sds((n["q"], hidden_in), "wqkv"), *[sds((n["kv"], hidden_in), "wqkv")] * 2
    out["wo"], out["w_down"] = sds((n["hidden"], n["q"]), "wo"), sds((n["hidden"], lp["w_down"].shape[1]), "w_down")
    out["w_gate"] = out["w_up"] = sds((n["inter"], lp["w_gateup"].shape[1]), "w_gateup")
    return out


def _unpacked_layer(lp: dict) -> dict:
    from drex_jax.model.kernels.matmul import unpack

    out = {k: v for k, v in lp.items() if k not in PACKED}
    n = _packed_rows(lp)
    qkv = unpack(lp["wqkv"], n["q"] + 2 * n["kv"])
    out["wq"], out["wk"], out["wv"] = (jnp.asarray(a) for a in np.split(qkv, [n["q"], n["q"] + n["kv"]]))
    out["wo"], out["w_down"] = (jnp.asarray(unpack(lp[k], n["hidden"])) for k in ("wo", "w_down"))
    gateup = unpack(lp["w_gateup"], 2 * n["inter"])
    out["w_gate"], out["w_up"] = (jnp.asarray(a) for a in np.split(gateup, 2))
    return out


def decode_layout(params: dict) -> dict:
    """The decode layout of checkpoint-layout or packed params (new arrays; the caller may drop the old)."""
    if is_packed(params):
        out = {k: v for k, v in params.items() if k != "head_panels"}
        return {**out, "layers": tuple(_unpacked_layer(lp) for lp in params["layers"])}
    if is_decode_layout(params):
        return params
    L = next(iter(params["layers"].values())).shape[0]
    out = {**params, "layers": tuple(jax.tree.map(jnp.asarray, layer_params(params, i)) for i in range(L))}
    if "lm_head" in params:  # [V, H] like every matrix of this layout
        out["lm_head"] = jnp.asarray(params["lm_head"].T)
    return out


def checkpoint_layout(params: dict) -> dict:
    """Inverse of `decode_layout` (stacked, `[in, out]`); from the packed layout too."""
    if not is_decode_layout(params):
        return params
    params = decode_layout(params)
    layers = params["layers"]
    stacked = {k: jnp.stack([lp[k].T if k in MATRICES else lp[k] for lp in layers]) for k in layers[0]}
    out = {**params, "layers": stacked}
    if "lm_head" in params:
        out["lm_head"] = params["lm_head"].T
    return out


def cast_params(params: dict, dtype) -> dict:
    return jax.tree.map(lambda a: jnp.asarray(a, dtype), params)
