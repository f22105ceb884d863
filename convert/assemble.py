"""Build the params pytree from per-tensor reads, driven by `param_specs` (shared by all formats)."""
from __future__ import annotations

from typing import Callable

import numpy as np

from drex_jax.model.config import ModelConfig
from drex_jax.model.params import check_params, param_specs, unflatten


def assemble_params(cfg: ModelConfig, template: Callable[[str], str], read: Callable[[str, str], np.ndarray],
                    np_dtype, source: str) -> dict:
    """`template(path)` is a source tensor name ('{i}' = layer); `read(path, name)` returns it in the
    source's [out, in] layout. Transposes, checks shapes against the config, stacks layers."""
    flat = {}
    for path, spec in param_specs(cfg).items():
        name_t = template(path)
        names = [name_t.format(i=i) for i in range(cfg.num_layers)] if spec.stacked else [name_t]
        want = tuple(spec.shape[1:] if spec.stacked else spec.shape)
        arrays = []
        for name in names:
            a = read(path, name)
            a = a.T if spec.transpose else a
            if tuple(a.shape) != want:
                raise ValueError(
                    f"{source} tensor {name!r} has shape {tuple(a.shape)} (after transpose) but the config "
                    f"implies {want}"
                )
            arrays.append(a.astype(np_dtype))
        flat[path] = np.stack(arrays) if spec.stacked else arrays[0]
    params = unflatten(flat)
    check_params(cfg, params)
    return params
