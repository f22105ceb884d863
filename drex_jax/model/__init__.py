from drex_jax.model.config import SUPPORTED_ARCHITECTURES, ModelConfig, config_from_hf
from drex_jax.model.decoder import forward, forward_hidden, lm_head
from drex_jax.model.params import check_params, init_params, param_specs

__all__ = [
    "SUPPORTED_ARCHITECTURES", "ModelConfig", "config_from_hf", "forward", "forward_hidden",
    "lm_head", "check_params", "init_params", "param_specs",
]
