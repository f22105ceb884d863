"""Trained exit heads on disk, and which model they fit.

A heads directory holds `heads.safetensors` (per-ramp adapter arrays `norm` [R, H], `down`
[R, H, rank], `up` [R, rank, H]; with context-aware drafts also `draft_wq`, `draft_wo`
(`drex_jax.draft_attention`); and `token_ranking` [V]: the ramp vocabulary's order) and
`meta.json` (exit layers, rank, calibrated thresholds, provenance, and the fingerprint of the
model the heads were trained on). Heads only make sense on that model: `load_heads` refuses a
model whose layer count, hidden size, vocabulary or LM head differ, naming what differs.

Trained heads for the bundled SmolLM2 ship inside the package (`shipped_heads_dir()`), so a
fresh install exits early with no training step; `drex-jax train-exits` reproduces them.
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from drex_jax.model.config import ModelConfig

HEADS_FILE = "heads.safetensors"
META_FILE = "meta.json"
_ADAPTER_KEYS = ("norm", "down", "up")
DRAFT_KEYS = ("draft_wq", "draft_wo")  # optional: the ramps' draft attention blocks (`draft_attention`)


def shipped_heads_dir(adapter: str = "none") -> str:
    """The exit heads bundled for the default model (SmolLM2-135M-Instruct): position-local
    (adapter "none", the default) or context-aware draft heads ("attention", `draft_attention`)."""
    name = {"none": "smollm2-135m-instruct", "attention": "smollm2-135m-instruct-attention"}
    if adapter not in name:
        raise ValueError(f"adapter must be one of {sorted(name)}, got {adapter!r}")
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "exit_heads", name[adapter])


def heads_dir_arg(value: str) -> str:
    """A heads directory named on the command line: a path saved by `train-exits`, or `local` /
    `attention` for the bundled position-local / context-aware heads."""
    path = {"local": shipped_heads_dir(), "attention": shipped_heads_dir("attention")}.get(value, value)
    if not has_heads(path):
        raise FileNotFoundError(f"no exit heads at {value!r} (no {META_FILE}): give a directory written by "
                                "`drex-jax train-exits`, or 'local' / 'attention' for the bundled SmolLM2 heads")
    return path


def model_fingerprint(cfg: ModelConfig, params: dict) -> dict:
    """What heads depend on: depth, width, vocabulary, and a hash of the LM head's [H, V] matrix.
    The hash is taken of the matrix rounded to bfloat16, so an fp32 and a bf16 load of the same
    checkpoint agree."""
    import jax.numpy as jnp

    from drex_jax.model.decoder import vocab_projection

    w = np.asarray(jnp.asarray(vocab_projection(params, cfg)).astype(jnp.bfloat16))
    return {"num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size,
            "lm_head_sha256": hashlib.sha256(np.ascontiguousarray(w).tobytes()).hexdigest()}


def fingerprint_mismatch(want: dict, got: dict) -> list[str]:
    """Human-readable differences between two fingerprints (empty when they match)."""
    return [f"{k}: heads {want.get(k)!r} vs model {got[k]!r}" for k in got if want.get(k) != got[k]]


def save_heads(path: str, heads: dict, meta: dict, token_ranking: np.ndarray | None = None) -> None:
    from safetensors.numpy import save_file

    os.makedirs(path, exist_ok=True)
    arrays = {k: np.ascontiguousarray(np.asarray(heads[k], np.float32)) for k in _ADAPTER_KEYS + DRAFT_KEYS
              if k in heads}
    if token_ranking is not None:
        arrays["token_ranking"] = np.ascontiguousarray(np.asarray(token_ranking, np.int32))
    save_file(arrays, os.path.join(path, HEADS_FILE))
    with open(os.path.join(path, META_FILE), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")


def has_heads(path: str | None) -> bool:
    return path is not None and os.path.exists(os.path.join(path, META_FILE))


def read_meta(path: str) -> dict:
    if not has_heads(path):
        raise FileNotFoundError(f"no trained exit heads at {path!r} (no {META_FILE}); run `drex-jax train-exits`")
    with open(os.path.join(path, META_FILE)) as f:
        return json.load(f)


def _arrays(path: str) -> dict:
    from safetensors.numpy import load_file

    return load_file(os.path.join(path, HEADS_FILE))


def load_heads(path: str, cfg: ModelConfig | None = None, params: dict | None = None) -> tuple[dict, dict]:
    """(heads, meta) saved by `save_heads`. With cfg and params, first checks that the heads fit
    this model (ValueError naming every difference)."""
    meta = read_meta(path)
    if cfg is not None and params is not None:
        check_fit(path, meta, cfg, params)
    arrays = _arrays(path)
    return {k: arrays[k] for k in _ADAPTER_KEYS + DRAFT_KEYS if k in arrays}, meta


def check_fit(path: str, meta: dict, cfg: ModelConfig, params: dict) -> None:
    want = meta.get("model")
    if want is None:
        raise ValueError(f"exit heads at {path!r} record no model fingerprint; retrain them with `drex-jax train-exits`")
    diff = fingerprint_mismatch(want, model_fingerprint(cfg, params))
    if diff:
        raise ValueError(f"exit heads at {path!r} were trained for a different model: " + "; ".join(diff))


def load_token_ranking(path: str) -> np.ndarray:
    """The ramp-vocabulary ranking saved with the heads at `path` (see train_exits.token_ranking)."""
    arrays = _arrays(path) if os.path.exists(os.path.join(path, HEADS_FILE)) else {}
    if "token_ranking" not in arrays:
        raise ValueError(f"no token ranking in {path!r} for EEConfig.ramp_vocab; run `drex-jax train-exits` "
                         "(it writes one) or pass ramp_tokens=...")
    return arrays["token_ranking"]


def find_heads(model_dir: str | None, cfg: ModelConfig, params: dict) -> str | None:
    """Heads for this model: `MODEL/exit_heads` when it exists (trained by the user), else the
    shipped heads when their fingerprint matches the model, else None."""
    if model_dir is not None and has_heads(os.path.join(model_dir, "exit_heads")):
        return os.path.join(model_dir, "exit_heads")
    shipped = shipped_heads_dir()
    if has_heads(shipped) and not fingerprint_mismatch(read_meta(shipped).get("model", {}),
                                                       model_fingerprint(cfg, params)):
        return shipped
    return None
