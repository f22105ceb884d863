"""Converted tiny random HF Llama/Qwen2 models give HF's fp32 logits (rtol/atol 1e-4)."""
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
