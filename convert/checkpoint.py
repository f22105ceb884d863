"""A converted model on disk: `config.json` (ModelConfig), `params/` (orbax), `tokenizer/` (HF)."""
from __future__ import annotations

import json
import os

import jax
import numpy as np

from drex_jax.model.config import ModelConfig
from drex_jax.model.params import check_params


def save_checkpoint(dst: str, cfg: ModelConfig, params: dict, tokenizer=None) -> None:
    import orbax.checkpoint as ocp

    dst = os.path.abspath(dst)
    os.makedirs(dst, exist_ok=True)
    check_params(cfg, params)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(dst, "params"), jax.tree.map(np.asarray, params), force=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(os.path.join(dst, "tokenizer"))
    # config last: its presence marks a complete checkpoint
    with open(os.path.join(dst, "config.json"), "w") as f:
        f.write(cfg.to_json())


def is_checkpoint(path: str) -> bool:
    return os.path.exists(os.path.join(path, "config.json")) and os.path.isdir(os.path.join(path, "params"))


def load_checkpoint(src: str, dtype=None):
    """Returns (ModelConfig, params as jax arrays, tokenizer or None)."""
    import orbax.checkpoint as ocp

    src = os.path.abspath(src)
    if not is_checkpoint(src):
        raise FileNotFoundError(
            f"{src!r} is not a drex_jax checkpoint (needs config.json and params/); "
            "create one with `drex-jax convert SRC DST`"
        )
    with open(os.path.join(src, "config.json")) as f:
        cfg = ModelConfig.from_dict(json.load(f))
    try:
        with ocp.StandardCheckpointer() as ckptr:
            params = ckptr.restore(os.path.join(src, "params"))
    except Exception as e:
        raise ValueError(f"cannot restore params from {src!r}/params (damaged checkpoint?): {e}") from e
    check_params(cfg, params)
    # device arrays: host numpy params would be re-transferred on every jitted call
    params = jax.tree.map(lambda a: jax.numpy.asarray(a, dtype), params)
    tok = None
    if os.path.isdir(os.path.join(src, "tokenizer")):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(os.path.join(src, "tokenizer"))
    return cfg, params, tok
