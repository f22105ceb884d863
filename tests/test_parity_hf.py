"""Converted tiny random HF Llama/Qwen2/Qwen3 models give HF's fp32 logits (rtol/atol 1e-4); the converted
model's module state round-trips through orbax."""
import numpy as np
import pytest
import torch

from convert import load_checkpoint, load_hf_dir, save_checkpoint
from drex_jax.model import forward
from tests.hf_tiny import VARIANTS, make_hf_model


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_hf(tmp_path, variant):
    model = make_hf_model(*VARIANTS[variant])
    model.save_pretrained(tmp_path / "hf")
    cfg, params, _ = load_hf_dir(str(tmp_path / "hf"))
    rng = np.random.default_rng(1)
    # positions up to 96 cross the llama3 scaling bands (original_max_position_embeddings=32)
    for length in (1, 7, 96):
        tokens = rng.integers(0, cfg.vocab_size, size=(2, length))
        with torch.no_grad():
            want = model(torch.tensor(tokens)).logits.numpy()
        got = np.asarray(forward(params, cfg, tokens))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_orbax_roundtrip_and_sharded_index(tmp_path):
    model = make_hf_model("qwen2", 4, 2, False, False, seed=3)
    model.save_pretrained(tmp_path / "hf", max_shard_size="20KB")  # forces a sharded index
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    cfg, params, _ = load_hf_dir(str(tmp_path / "hf"))
    save_checkpoint(str(tmp_path / "ckpt"), cfg, params)
    cfg2, params2, _ = load_checkpoint(str(tmp_path / "ckpt"))
    assert cfg2 == cfg
    tokens = np.arange(10)[None] % cfg.vocab_size
    with torch.no_grad():
        want = model(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(np.asarray(forward(params2, cfg2, tokens)), want, rtol=1e-4, atol=1e-4)


def test_module_state_orbax_roundtrip(tmp_path):
    """An `EETransformer` (converted Qwen3 trunk + trained ramps) written as its nnx state with orbax
    and restored gives the same state, the same logits as HF and the same ramp logits."""
    import chex
    import jax
    from flax import nnx

    from convert.checkpoint import load_model_state, save_model_state
    from drex_jax.model.modules import EETransformer, model_params
    from drex_jax.model.ramps import init_ramp_heads

    model = make_hf_model("qwen3", 3, 1, False, False, seed=4)
    model.save_pretrained(tmp_path / "hf")
    cfg, params, _ = load_hf_dir(str(tmp_path / "hf"))
    heads = init_ramp_heads(params, cfg, 2, 4, jax.random.key(0))
    heads["up"] = 0.1 * jax.random.normal(jax.random.key(1), heads["up"].shape)  # a ramp unlike the LM head
    ee = EETransformer(cfg, params, heads)
    save_model_state(str(tmp_path / "state"), ee)
    back = load_model_state(str(tmp_path / "state"), cfg, heads_shape=(2, 4))
    chex.assert_trees_all_equal(nnx.to_pure_dict(nnx.state(back)), nnx.to_pure_dict(nnx.state(ee)))
    tokens = np.arange(9)[None] % cfg.vocab_size
    with torch.no_grad():
        want = model(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(np.asarray(forward(model_params(back), cfg, tokens)), want, rtol=1e-4, atol=1e-4)
    h = np.asarray(jax.random.normal(jax.random.key(2), (3, cfg.hidden_size)))
    for r in range(2):
        np.testing.assert_allclose(np.asarray(back.ramp_logits(h, r)), np.asarray(ee.ramp_logits(h, r)), rtol=1e-6,
                                   atol=1e-7)  # same weights (checked above); eager dots may round apart
    assert not np.allclose(np.asarray(back.ramp_logits(h, 0)), np.asarray(back.lm_head_logits(h)))
