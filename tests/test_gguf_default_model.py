"""The converted bundled SmolLM2 GGUF vs `transformers`' own GGUF loading of the same file."""
import numpy as np
import torch

from drex_jax.model import forward
from drex_jax.data.texts import REAL_TEXT


def test_default_model_matches_transformers_gguf(default_model, hf_gguf_model):
    cfg, params, tok = default_model
    ids = tok(REAL_TEXT, return_tensors="np").input_ids[:, :320]
    assert ids.shape[1] >= 256, ids.shape
    with torch.no_grad():
        want = hf_gguf_model(torch.tensor(ids)).logits.numpy()[0]
    got = np.asarray(forward(params, cfg, ids))[0]
    agree = float(np.mean(got.argmax(-1) == want.argmax(-1)))
    max_diff = float(np.abs(got - want).max())
    print(f"\nSmolLM2 GGUF vs transformers: {ids.shape[1]} positions, top-1 agreement {agree:.4f}, "
          f"max |logit diff| {max_diff:.3e}")
    assert agree == 1.0
    assert max_diff < 1e-2
