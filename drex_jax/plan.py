"""Memory plan for a model under tensor parallelism: bytes of params and KV per device, and the
largest batch that fits a device's memory (`drex-jax plan`).

Counts come from the parameter specs (`ParamSpec.tp_axis` says what tp splits) and the pool
layout (kv heads split over tp; page rounding per sequence). Activations and XLA workspace are
not modelled; `reserve_fraction` of the device memory is held back for them.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os

import numpy as np

from drex_jax.kv.pages import pages_needed
from drex_jax.kv.pool import page_bytes
from drex_jax.model.config import ModelConfig, config_from_hf
from drex_jax.model.params import param_specs
from drex_jax.sharding import tp_divides

# Well-known shapes (HF config fields) for planning and scale benchmarks with random weights.
PRESETS = {
    "llama2-7b": dict(architectures=["LlamaForCausalLM"], vocab_size=32000, hidden_size=4096,
                      intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5),
    "llama2-13b": dict(architectures=["LlamaForCausalLM"], vocab_size=32000, hidden_size=5120,
                       intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                       num_key_value_heads=40, max_position_embeddings=4096, rms_norm_eps=1e-5),
    "llama3-8b": dict(architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_size=4096,
                      intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, max_position_embeddings=8192, rms_norm_eps=1e-5,
                      rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
    # the bundled default model's shape (SmolLM2-135M-Instruct)
    "smollm2-135m": dict(architectures=["LlamaForCausalLM"], vocab_size=49152, hidden_size=576,
                         intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5,
                         rope_theta=100000.0, tie_word_embeddings=True),
    # a small shape for smoke-testing scale mode on a CPU
    "tiny-llama": dict(architectures=["LlamaForCausalLM"], vocab_size=512, hidden_size=128, intermediate_size=256,
                       num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=1024, rms_norm_eps=1e-5),
}


def load_model_config(model: str) -> ModelConfig:
    """A preset name, a drex_jax checkpoint dir, or an HF model dir (only config.json is read)."""
    if model in PRESETS:
        return config_from_hf(PRESETS[model])
    path = os.path.join(model, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{model!r} is neither a preset {sorted(PRESETS)} nor a directory with config.json")
    with open(path) as f:
        d = json.load(f)
    return ModelConfig.from_dict(d) if "num_layers" in d else config_from_hf(d)


@dataclasses.dataclass
class Plan:
    tp: int
    dtype: str
    param_bytes_per_device: int
    kv_bytes_per_token_per_device: int
    kv_bytes_per_sequence_per_device: int  # max_len tokens, rounded up to whole pages
    kv_bytes_per_device: int  # max_batch sequences
    total_bytes_per_device: int
    memory_bytes: int | None
    fits: bool | None
    max_batch_that_fits: int | None


def plan(cfg: ModelConfig, tp: int = 1, max_batch: int = 1, max_len: int = 2048, dtype: str = "bfloat16",
         memory_bytes: int | None = None, page_size: int = 16, reserve_fraction: float = 0.1) -> Plan:
    from drex_jax.engine import _dtype

    dt = _dtype(dtype)
    for name, v in (("tp", tp), ("max_batch", max_batch), ("max_len", max_len), ("page_size", page_size)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    if not 0 <= reserve_fraction < 1:
        raise ValueError(f"reserve_fraction must be in [0, 1), got {reserve_fraction}")
    if not tp_divides(cfg, tp):
        raise ValueError(f"tp={tp} must divide the KV heads ({cfg.num_kv_heads}), attention heads "
                         f"({cfg.num_heads}) and MLP width ({cfg.intermediate_size})")
    item = np.dtype(dt).itemsize
    params = sum(math.prod(s.shape) // (tp if s.tp_axis is not None else 1) for s in param_specs(cfg).values())
    per_token = page_bytes(cfg, 1, dt) // tp
    per_seq = pages_needed(max_len, page_size) * page_bytes(cfg, page_size, dt) // tp
    kv = max_batch * per_seq
    total = params * item + kv
    fits = best = None
    if memory_bytes is not None:
        usable = int(memory_bytes * (1 - reserve_fraction)) - params * item
        best = max(usable // per_seq, 0)
        fits = total <= int(memory_bytes * (1 - reserve_fraction))
    return Plan(tp, dtype, params * item, per_token, per_seq, kv, total, memory_bytes, fits, best)


def format_plan(p: Plan, cfg: ModelConfig, max_batch: int, max_len: int) -> str:
    g = 2**30
    lines = [
        f"model: {cfg.architecture}, {cfg.num_layers} layers, hidden {cfg.hidden_size}, heads {cfg.num_heads} "
        f"(kv {cfg.num_kv_heads}), vocab {cfg.vocab_size}; tp={p.tp}, {p.dtype}",
        f"params per device:      {p.param_bytes_per_device / g:8.2f} GiB",
        f"KV per token per device: {p.kv_bytes_per_token_per_device / 2**10:7.1f} KiB",
        f"KV per device for batch {max_batch} x {max_len} tokens: {p.kv_bytes_per_device / g:8.2f} GiB",
        f"total per device:       {p.total_bytes_per_device / g:8.2f} GiB",
    ]
    if p.memory_bytes is not None:
        lines.append(f"device memory {p.memory_bytes / g:.1f} GiB (minus reserve): "
                     f"{'fits' if p.fits else 'does NOT fit'}; largest batch of {max_len}-token sequences "
                     f"that fits: {p.max_batch_that_fits}")
    return "\n".join(lines)
