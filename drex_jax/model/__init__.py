"""The model: config, parameter description, decoder math and paged steps.

Names below are imported on first use, so `import drex_jax.model.config` (the host-side
scheduler) does not load jax.
"""
from drex_jax.lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "SUPPORTED_ARCHITECTURES": "drex_jax.model.config", "ModelConfig": "drex_jax.model.config",
    "config_from_hf": "drex_jax.model.config", "forward": "drex_jax.model.decoder",
    "forward_hidden": "drex_jax.model.decoder", "lm_head": "drex_jax.model.decoder",
    "check_params": "drex_jax.model.params", "init_params": "drex_jax.model.params",
    "param_specs": "drex_jax.model.specs",
})
