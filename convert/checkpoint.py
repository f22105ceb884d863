"""A converted model on disk: `config.json` (ModelConfig), `model_state/` (orbax: the state of the
`EETransformer` module over the checkpoint-layout params), `tokenizer/` (HF)."""
from __future__ import annotations

import json
import os

import jax
import numpy as np

from drex_jax.model.config import ModelConfig
from drex_jax.model.params import check_params

STATE_DIR = "model_state"


def save_model_state(path: str, model) -> None:
    """Write an `EETransformer`'s state (`nnx.state`, as a pure dict of arrays) with orbax."""
    import orbax.checkpoint as ocp
    from flax import nnx

    state = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.abspath(path), state, force=True)


def load_model_state(path: str, cfg: ModelConfig, heads_shape: tuple[int, int] | None = None):
    """Restore an `EETransformer` for `cfg` (checkpoint layout) from `save_model_state`'s files: the
    restored arrays go into the state of a model built from shapes only. `heads_shape`: (ramps,
    rank) when the saved model has trained ramps."""
    import orbax.checkpoint as ocp
    from flax import nnx

    from drex_jax.model.modules import EETransformer
    from drex_jax.model.specs import param_specs, unflatten

    shapes = unflatten({k: jax.ShapeDtypeStruct(s.shape, np.float32) for k, s in param_specs(cfg).items()})
    heads = None
    if heads_shape is not None:
        (R, rank), H = heads_shape, cfg.hidden_size
        heads = {"norm": np.zeros((R, H), np.float32), "down": np.zeros((R, H, rank), np.float32),
                 "up": np.zeros((R, rank, H), np.float32)}
    graph, state = nnx.split(EETransformer(cfg, shapes, heads))
    with ocp.StandardCheckpointer() as ckptr:
        saved = ckptr.restore(os.path.abspath(path))
    nnx.replace_by_pure_dict(state, saved)
    missing = [jax.tree_util.keystr(key) for key, leaf in jax.tree_util.tree_leaves_with_path(
        nnx.to_pure_dict(state)) if isinstance(leaf, jax.ShapeDtypeStruct)]
    if missing:
        raise ValueError(f"model state at {path!r} lacks {len(missing)} arrays the config needs, e.g. {missing[:3]}")
    return nnx.merge(graph, state)


def save_checkpoint(dst: str, cfg: ModelConfig, params: dict, tokenizer=None) -> None:
    """Write a converted model: the module state of `params` (checkpoint layout), its config and
    tokenizer."""
    from drex_jax.model.modules import EETransformer
    from drex_jax.model.params import checkpoint_layout

    dst = os.path.abspath(dst)
    os.makedirs(dst, exist_ok=True)
    check_params(cfg, params)
    save_model_state(os.path.join(dst, STATE_DIR), EETransformer(cfg, checkpoint_layout(params)))
    if tokenizer is not None:
        tokenizer.save_pretrained(os.path.join(dst, "tokenizer"))
    # config last: its presence marks a complete checkpoint
    with open(os.path.join(dst, "config.json"), "w") as f:
        f.write(cfg.to_json())


def is_checkpoint(path: str) -> bool:
    return os.path.exists(os.path.join(path, "config.json")) and os.path.isdir(os.path.join(path, STATE_DIR))


def load_checkpoint(src: str, dtype=None):
    """Returns (ModelConfig, params as jax arrays (checkpoint layout), tokenizer or None)."""
    from drex_jax.model.modules import model_params

    src = os.path.abspath(src)
    if not is_checkpoint(src):
        old = os.path.isdir(os.path.join(src, "params"))
        raise FileNotFoundError(
            f"{src!r} is not a drex_jax checkpoint (needs config.json and {STATE_DIR}/)"
            + ("; it holds an older drex_jax layout (params/): convert the source model again" if old else "")
            + "; create one with `drex-jax convert SRC DST`"
        )
    with open(os.path.join(src, "config.json")) as f:
        cfg = ModelConfig.from_dict(json.load(f))
    try:
        params = model_params(load_model_state(os.path.join(src, STATE_DIR), cfg))
    except Exception as e:
        raise ValueError(f"cannot restore the model state from {src!r}/{STATE_DIR} (damaged checkpoint?): {e}") from e
    check_params(cfg, params)
    # device arrays: host numpy params would be re-transferred on every jitted call
    params = jax.tree.map(lambda a: jax.numpy.asarray(a, dtype), params)
    tok = None
    if os.path.isdir(os.path.join(src, "tokenizer")):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(os.path.join(src, "tokenizer"))
    return cfg, params, tok
