import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def default_model():
    """(cfg, params, tokenizer) of the bundled SmolLM2, converted once into $DREX_JAX_CACHE."""
    from convert import load_checkpoint
    from drex_jax.default_model import default_model_path

    return load_checkpoint(default_model_path())
