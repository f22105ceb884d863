from drex_jax.model import ModelConfig
