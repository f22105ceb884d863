"""Exit-head training: loss decreases, and an interrupted run resumes to the same heads."""
import numpy as np
import pytest

from drex_jax.exit_heads import load_heads
from drex_jax.train_exits import TrainExitsConfig, train_exit_heads


@pytest.mark.manual  # 160 s on 2 cores; outside CI's time budget: run with -m manual
def test_resume_equals_uninterrupted(tmp_path, default_model):
    cfg, params, tok = default_model
    tc = TrainExitsConfig(exit_layers=(10, 20), rank=8, num_humaneval=2, new_tokens=8, steps=6, batch_size=64,
                          save_every=1, learning_rate=1e-2, num_calibration_humaneval=0, num_eval_humaneval=0,
                          eval_new_tokens=4)
    train_exit_heads(params, cfg, tok, str(tmp_path / "a"), tc, progress=False, max_steps_this_run=3)
    resumed, meta = train_exit_heads(params, cfg, tok, str(tmp_path / "a"), tc, progress=False)
    straight, _ = train_exit_heads(params, cfg, tok, str(tmp_path / "b"), tc, progress=False)
    for k in straight:
        np.testing.assert_allclose(np.asarray(resumed[k]), np.asarray(straight[k]), rtol=1e-5, atol=1e-6)
    loaded, meta2 = load_heads(str(tmp_path / "a"))
    assert meta2["exit_layers"] == [10, 20]
    np.testing.assert_allclose(np.asarray(loaded["up"]), np.asarray(resumed["up"]))
    assert np.abs(np.asarray(loaded["up"])).max() > 0  # trained away from the zero init
    assert len(meta2["thresholds"]) == 2 and all(0.5 <= t <= 1.0 for t in meta2["thresholds"])
    assert meta2["held_out"]["prompts"] == 20 and meta2["provenance"]["config"]["steps"] == 6


def test_distillation_lowers_kl_and_keeps_the_trunk_frozen(tiny_llama):
    """A few nnx.Optimizer steps on fixed hidden states reduce the KL to the full model; only the
    ramps' params move (the trunk is frozen by the optimizer's filter)."""
    import jax
    import optax
    from flax import nnx

    from drex_jax.model import forward_hidden
    from drex_jax.model.modules import EETransformer
    from drex_jax.model.ramps import init_ramp_heads
    from drex_jax.train_exits import TRAINABLE, distill_loss, ramp_heads, train_step

    cfg, params = tiny_llama
    toks = np.random.default_rng(0).integers(0, cfg.vocab_size, (4, 24))
    hs = forward_hidden(params, cfg, toks).reshape(cfg.num_layers + 1, -1, cfg.hidden_size)
    ramp_h, final_h = hs[1][:, None], hs[-1]
    model = EETransformer(cfg, params, init_ramp_heads(params, cfg, 1, 8, jax.random.key(0)))
    trunk = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Not(TRAINABLE))))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=TRAINABLE)
    first = float(distill_loss(model, ramp_h, final_h))
    for _ in range(30):
        train_step(model, optimizer, ramp_h, final_h)
    assert float(distill_loss(model, ramp_h, final_h)) < 0.7 * first
    assert int(optimizer.step[...]) == 30 and np.abs(ramp_heads(model)["up"]).max() > 0
    after = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Not(TRAINABLE))))
    assert jax.tree.all(jax.tree.map(np.array_equal, after, trunk))


def test_bad_train_config(tiny_llama):
    cfg, _ = tiny_llama
    with pytest.raises(ValueError, match="strictly increasing"):
        TrainExitsConfig(exit_layers=(2, 1)).validate(cfg)
    with pytest.raises(ValueError, match="last layer"):
        TrainExitsConfig(exit_layers=(1, 3)).validate(cfg)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        TrainExitsConfig(exit_layers=(1,), steps=0).validate(cfg)


def test_token_ranking_counts_full_model_argmax(tiny_llama):
    """Ranking = token ids by how often the full model's greedy token is each id (numpy count)."""
    from drex_jax.train_exits import token_ranking

    cfg, params = tiny_llama
    h = np.random.default_rng(1).normal(size=(300, cfg.hidden_size)).astype(np.float32)
    w = np.asarray(params["embed"]).T if cfg.tie_word_embeddings else np.asarray(params["lm_head"])
    normed = h / np.sqrt((h * h).mean(-1, keepdims=True) + cfg.rms_norm_eps) * np.asarray(params["final_norm"])
    counts = np.bincount((normed @ w).argmax(-1), minlength=cfg.vocab_size)
    got = token_ranking(params, cfg, h, chunk=64)
    assert sorted(got.tolist()) == list(range(cfg.vocab_size))
    np.testing.assert_array_equal(counts[got], np.sort(counts)[::-1])  # most frequent first
    np.testing.assert_array_equal(got, np.argsort(-counts, kind="stable"))
