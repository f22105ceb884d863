"""The model: config, parameter description, decoder math and paged steps.

Names below are imported on first use, so `import drex_jax.model.config` (the host-side
scheduler and planner) does not load jax.
"""
import importlib

_EXPORTS = {
    "SUPPORTED_ARCHITECTURES": "config", "ModelConfig": "config", "config_from_hf": "config",
    "forward": "decoder", "forward_hidden": "decoder", "lm_head": "decoder",
    "check_params": "params", "init_params": "params", "param_specs": "specs",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'drex_jax.model' has no attribute {name!r}")
    return getattr(importlib.import_module(f"drex_jax.model.{_EXPORTS[name]}"), name)
