"""HF `save_pretrained` directory (single or sharded safetensors) -> drex_jax params. No torch needed."""
from __future__ import annotations

import json
import os

import numpy as np
from safetensors import safe_open

from drex_jax.model.config import config_from_hf
from convert.assemble import assemble_params
from drex_jax.model.params import param_specs

_FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")


def _tensor_files(src: str) -> dict[str, str]:
    """Map tensor name -> safetensors file for a single-file or sharded (index.json) checkpoint."""
    index = os.path.join(src, "model.safetensors.index.json")
    single = os.path.join(src, "model.safetensors")
    if os.path.exists(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index} is not a valid safetensors index: {e}") from e
        return {name: os.path.join(src, fn) for name, fn in weight_map.items()}
    if os.path.exists(single):
        names = {}
        with _open(single) as f:
            for name in f.keys():
                names[name] = single
        return names
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {src!r}")


def _open(path: str):
    if not os.path.exists(path):
        raise FileNotFoundError(f"safetensors file {path!r} listed in the index does not exist")
    try:
        return safe_open(path, framework="numpy")
    except Exception as e:  # safetensors raises its own error type for damaged files
        raise ValueError(f"cannot read safetensors file {path!r} (truncated or damaged?): {e}") from e


def read_hf_config(src: str) -> dict:
    path = os.path.join(src, "config.json")
    if not os.path.isdir(src):
        raise FileNotFoundError(f"checkpoint directory {src!r} does not exist")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{src!r} has no config.json")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def _read_tensor(handle, name: str, path: str) -> np.ndarray:
    try:
        dtype = handle.get_slice(name).get_dtype()
        if dtype not in _FLOAT_DTYPES:
            raise ValueError(f"tensor {name!r} in {path!r} has dtype {dtype}; expected one of {_FLOAT_DTYPES}")
        if dtype == "BF16":  # numpy's loader has no bfloat16; the flax loader does (ml_dtypes)
            with safe_open(path, framework="flax") as f:
                return np.asarray(f.get_tensor(name))
        return handle.get_tensor(name)
    except ValueError:
        raise
    except Exception as e:
        raise ValueError(f"cannot read tensor {name!r} from {path!r} (truncated or damaged?): {e}") from e


def load_hf_dir(src: str, dtype: str = "float32", with_tokenizer: bool = False):
    """Returns (ModelConfig, params as numpy arrays of `dtype`, tokenizer or None)."""
    cfg = config_from_hf(read_hf_config(src))
    files = _tensor_files(src)
    handles: dict[str, object] = {}

    def get(name: str) -> np.ndarray:
        if name not in files:
            raise ValueError(f"tensor {name!r} required by {cfg.architecture} is missing from {src!r}")
        path = files[name]
        if path not in handles:
            handles[path] = _open(path)
        return _read_tensor(handles[path], name, path)

    specs = param_specs(cfg)
    params = assemble_params(cfg, lambda path: specs[path].hf_name, lambda path, name: get(name), _np_dtype(dtype),
                             "safetensors")
    tok = None
    if with_tokenizer:
        tok = _try_tokenizer(src)
    return cfg, params, tok


def _np_dtype(dtype: str):
    import jax.numpy as jnp

    allowed = {"float32": np.float32, "bfloat16": jnp.bfloat16, "float16": np.float16}
    if dtype not in allowed:
        raise ValueError(f"dtype {dtype!r} not supported; choose one of {sorted(allowed)}")
    return allowed[dtype]


def _try_tokenizer(src: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(src)
    except Exception:  # a weights-only directory is still convertible
        return None
