"""Early-exit ramps, confidence measures, missing-KV methods and the unbatched EE reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from drex_jax.early_exit import EEConfig
from drex_jax.model import forward, forward_hidden
from drex_jax.model.ramps import confidence, init_ramp_heads, ramp_logits
from drex_jax.reference import reference_generate
from tests.naive_ee import NaiveEE
from tests.reference import greedy_reference


def test_confidence_measures_match_numpy():
    logits = np.random.default_rng(0).normal(size=(5, 17)).astype(np.float32) * 3
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    srt = np.sort(p, -1)
    np.testing.assert_allclose(confidence(jnp.asarray(logits), "top1_minus_top2"), srt[:, -1] - srt[:, -2], atol=1e-6)
    np.testing.assert_allclose(confidence(jnp.asarray(logits), "max_prob"), srt[:, -1], atol=1e-6)
    np.testing.assert_allclose(confidence(jnp.asarray(logits), "neg_entropy"), (p * np.log(p)).sum(-1), atol=1e-5)


def test_shared_ramp_at_last_layer_is_final_logits(tiny4):
    cfg, params = tiny4
    tokens = np.arange(9)[None] % cfg.vocab_size
    hs = forward_hidden(params, cfg, tokens)
    np.testing.assert_allclose(ramp_logits(params, cfg, hs[-1], None, 0), forward(params, cfg, tokens), atol=1e-5)
    out = reference_generate(params, cfg, [1, 2, 3], EEConfig((cfg.num_layers,), -1.0), 10)
    assert out.token_ids == greedy_reference(params, cfg, [1, 2, 3], 10)
    assert set(out.exit_layers) == {cfg.num_layers}


def test_untrained_trained_head_equals_shared(tiny4):
    cfg, params = tiny4
    heads = init_ramp_heads(params, cfg, 2, 8, jax.random.key(0))
    h = jax.random.normal(jax.random.key(1), (3, cfg.hidden_size))
    np.testing.assert_allclose(ramp_logits(params, cfg, h, heads, 1), ramp_logits(params, cfg, h, None, 0), atol=1e-5)


@pytest.mark.parametrize("method", ["copy", "propagate", "recompute"])
def test_unpassable_threshold_gives_full_model_output(tiny4, method):
    cfg, params = tiny4
    prompt = [5, 7, 11, 13]
    out = reference_generate(params, cfg, prompt, EEConfig((1, 2, 3), 1.01, missing_kv=method), 12)
    assert out.token_ids == greedy_reference(params, cfg, prompt, 12)
    assert set(out.exit_layers) == {cfg.num_layers}


@pytest.mark.parametrize("method", ["copy", "propagate", "recompute"])
def test_missing_kv_methods_match_naive(tiny4, method):
    cfg, params = tiny4
    prompt, layers, thr = [5, 7, 11, 13, 2], (1, 2, 3), (0.08, 0.06, 0.05)
    with jax.default_matmul_precision("highest"):
        out = reference_generate(params, cfg, prompt, EEConfig(layers, thr, missing_kv=method), 16)
    want, want_exits, margin = NaiveEE(params, cfg).generate(prompt, list(layers), thr, method, 16)
    assert margin > 1e-4, "a confidence sits on a threshold; pick other thresholds"
    assert out.token_ids == want
    assert out.exit_layers == want_exits
    # the setting really exercises the method: exits at several ramps and full-depth tokens
    assert len(set(out.exit_layers[1:])) >= 3, out.exit_layers


def test_methods_differ(tiny4):
    """The three fills are different computations (else the naive checks prove little)."""
    cfg, params = tiny4
    outs = {m: reference_generate(params, cfg, [5, 7, 11, 13, 2], EEConfig((1, 2, 3), (0.08, 0.06, 0.05),
                                                                            missing_kv=m), 16).token_ids
            for m in ("copy", "propagate", "recompute")}
    assert len({tuple(v) for v in outs.values()}) >= 2, outs


@pytest.mark.parametrize("kwargs, match", [
    (dict(exit_layers=(0,)), r"must be integers in \[1, 4\]"),
    (dict(exit_layers=(2, 9)), r"must be integers in \[1, 4\]"),
    (dict(exit_layers=(3, 2)), "strictly increasing"),
    (dict(exit_layers=()), "empty"),
    (dict(exit_layers=(1, 2), thresholds=(0.5,)), "thresholds"),
    (dict(exit_layers=(1,), thresholds=float("nan")), "finite"),
    (dict(exit_layers=(1,), thresholds=float("inf")), "finite"),
    (dict(exit_layers=(1,), missing_kv="zeros"), "missing-KV method 'zeros'"),
    (dict(exit_layers=(1,), confidence="margin"), "confidence measure 'margin'"),
    (dict(exit_layers=(1,), head="mlp"), "ramp head 'mlp'"),
])
def test_bad_ee_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EEConfig(**kwargs).validate(4)
