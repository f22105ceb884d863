"""drex_jax: early-exit LLM inference in JAX with continuous batching over a paged KV cache.

The public names are imported on first use, so host-only modules (`drex_jax.sched`) can be
imported without loading jax.
"""
from drex_jax.lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "Engine": "drex_jax.engine", "GenerationConfig": "drex_jax.generation", "GenerationResult": "drex_jax.generation",
    "RequestStats": "drex_jax.generation", "StreamEvent": "drex_jax.generation", "ModelConfig": "drex_jax.model.config",
})
