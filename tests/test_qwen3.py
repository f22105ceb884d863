"""Qwen3 (per-head q/k RMSNorm before RoPE, no q/k/v biases) end to end: a tiny random HF model
converted from its safetensors directory generates HF's own greedy tokens in the engine, and its
early-exit ramps decode exactly like the unbatched reference."""
import pytest
import torch

from convert import load_hf_dir
from drex_jax import Engine, GenerationConfig
from drex_jax.early_exit import EEConfig
from drex_jax.reference import reference_generate
from tests.hf_tiny import make_hf_model


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    src = tmp_path_factory.mktemp("qwen3")
    model = make_hf_model("qwen3", 3, 1, False, False, seed=5, layers=4)  # odd heads, untied
    model.save_pretrained(src)
    cfg, params, _ = load_hf_dir(str(src))
    return model, cfg, params


def test_config_reads_qwen3(qwen3):
    _, cfg, params = qwen3
    assert cfg.architecture == "Qwen3ForCausalLM" and cfg.qk_norm
    assert not cfg.qkv_bias and not cfg.o_bias and cfg.head_dim == 32
    assert params["layers"]["q_norm"].shape == (4, 32) and "bq" not in params["layers"]


def test_engine_greedy_equals_hf_generate(qwen3):
    model, cfg, params = qwen3
    prompts = [[3, 9, 27, 1, 44], [50, 2], [7] * 11]
    eng = Engine.from_params(cfg, params, max_slots=4, page_size=4, max_seq_len=64)
    out = eng.generate(prompts, GenerationConfig(max_new_tokens=12, ignore_eos=True))
    for p, r in zip(prompts, out):
        with torch.no_grad():
            want = model.generate(torch.tensor([p]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                  pad_token_id=0)[0, len(p):].tolist()
        assert r.token_ids == want


def test_rebatching_ramps_equal_the_reference(qwen3):
    _, cfg, params = qwen3
    ee = EEConfig(exit_layers=(1, 2), thresholds=1e-3)  # random weights: confidences are small
    eng = Engine.from_params(cfg, params, max_slots=4, page_size=4, max_seq_len=64, ee=ee, policy="rebatching",
                             art=False)
    prompts = [[3, 9, 27, 1, 44], [50, 2], [7] * 11]
    out = eng.generate(prompts, GenerationConfig(max_new_tokens=10, ignore_eos=True))
    for p, r in zip(prompts, out):
        ref = reference_generate(params, cfg, p, ee, 10)
        assert r.token_ids == ref.token_ids and list(r.exit_layers) == list(ref.exit_layers)
    depths = {d for r in out for d in r.exit_layers}
    assert {1, 2, 4} <= depths  # tokens left at both ramps and ran full depth
    assert eng.ee_stats.mean_depth() < cfg.num_layers  # and layers were really skipped
