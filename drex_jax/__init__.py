"""drex_jax: early-exit LLM inference in JAX with continuous batching over a paged KV cache."""
from drex_jax.engine import Engine
from drex_jax.generation import GenerationConfig, GenerationResult, RequestStats, StreamEvent
from drex_jax.model import ModelConfig

__all__ = ["Engine", "GenerationConfig", "GenerationResult", "RequestStats", "StreamEvent", "ModelConfig"]
