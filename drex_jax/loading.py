"""Loading what an engine runs: a converted checkpoint (or the bundled default model) and its exit
heads. Shared by `Engine` and the command line, so each check and each error message lives here once."""
from __future__ import annotations

import os

import jax
import numpy as np

from drex_jax.early_exit import EEConfig
from drex_jax.model.config import ModelConfig


def load_model(path: str | None, dtype=None, verbose: bool = True):
    """(model dir, cfg, params, tokenizer) of a converted checkpoint; None = the bundled SmolLM2
    (converted into the cache on first use)."""
    from convert.checkpoint import load_checkpoint
    from drex_jax.default_model import default_model_path

    path = path if path is not None else default_model_path(verbose=verbose)
    kw = {} if dtype is None else {"dtype": dtype}
    cfg, params, tok = load_checkpoint(path, **kw)
    return path, cfg, params, tok


def heads_dir_for(model_dir: str | None, cfg: ModelConfig, params: dict, *, required: bool) -> str | None:
    """The exit heads for this model (`MODEL/exit_heads`, else the bundled ones if they fit), or None;
    `required`: raise FileNotFoundError naming what to do instead of returning None."""
    from drex_jax.exit_heads import find_heads

    found = find_heads(model_dir, cfg, params)
    if found is None and required:
        where = f" (none in {os.path.join(model_dir, 'exit_heads')!r})" if model_dir else ""
        raise FileNotFoundError(
            f"no trained exit heads for the model at {model_dir!r}{where}, and the bundled heads fit "
            f"SmolLM2-135M-Instruct only: run `drex-jax train-exits --model {model_dir}` or use the shared head "
            "(EEConfig(head='shared'), --head shared)")
    return found


def needs_heads_dir(ee: EEConfig | None) -> bool:
    """Whether an early-exit setup reads files saved with trained heads (the heads, or the ramp vocabulary)."""
    return ee is not None and (ee.head == "trained" or ee.ramp_vocab is not None)


def load_exit_heads(ee: EEConfig, cfg: ModelConfig, params: dict, exit_heads, ramp_tokens=None):
    """(heads stacked for `ee`'s ramps or None for the shared head, ramp candidate ids or None).

    exit_heads: a directory saved by `train-exits` (checked to fit this model), or arrays already
    loaded (stacked per ramp, in `ee`'s ramp order), or None."""
    from drex_jax.exit_heads import check_fit, load_heads, load_token_ranking, read_meta

    ramps = [e for e in ee.exit_layers if e < cfg.num_layers]
    if isinstance(exit_heads, str):
        check_fit(exit_heads, read_meta(exit_heads), cfg, params)
        if ee.ramp_vocab is not None and ramp_tokens is None:
            ramp_tokens = load_token_ranking(exit_heads)
    heads = exit_heads if ee.head == "trained" else None
    if isinstance(heads, str):
        heads, meta = load_heads(exit_heads)
        trained = list(meta["exit_layers"])
        if not set(ramps) <= set(trained):
            raise ValueError(f"exit heads at {exit_heads!r} were trained for layers {trained}, "
                             f"but exit_layers is {ramps}")
        rows = np.asarray([trained.index(e) for e in ramps])  # a subset of the trained ramps
        heads = jax.tree.map(lambda a: a[rows], heads)
    if ee.head == "trained" and heads is None:
        raise ValueError("EEConfig.head == 'trained' needs exit heads (Engine(exit_heads=...))")
    return heads, ramp_tokens
