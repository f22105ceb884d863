"""drex_jax: early-exit LLM inference in JAX with continuous batching over a paged KV cache.

The public names are imported on first use, so host-only modules (`drex_jax.sched`) can be
imported without loading jax.
"""
import importlib

_EXPORTS = {
    "Engine": "drex_jax.engine", "GenerationConfig": "drex_jax.generation", "GenerationResult": "drex_jax.generation",
    "RequestStats": "drex_jax.generation", "StreamEvent": "drex_jax.generation", "ModelConfig": "drex_jax.model.config",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'drex_jax' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
