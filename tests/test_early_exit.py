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


@pytest.mark.parametrize("trained", [False, True])
def test_ramp_vocabulary_scores_those_columns(tiny4, trained):
    """Ramp logits over candidate ids are exactly those columns of the full ramp logits."""
    cfg, params = tiny4
    heads = init_ramp_heads(params, cfg, 1, 8, jax.random.key(0)) if trained else None
    if trained:  # move away from the shared-head init
        heads["up"] = jax.random.normal(jax.random.key(2), heads["up"].shape) * 0.1
    h = jax.random.normal(jax.random.key(1), (3, cfg.hidden_size))
    ids = jnp.asarray([17, 3, 40, 0, 9], jnp.int32)
    full = ramp_logits(params, cfg, h, heads, 0)
    np.testing.assert_allclose(ramp_logits(params, cfg, h, heads, 0, ids), np.asarray(full)[:, ids], atol=1e-5)


def test_ramp_vocabulary_reference_matches_naive(tiny4):
    """reference_generate with a ramp vocabulary against the float64 naive decoder scoring the
    same candidates; exited tokens come from the candidates, full-depth ones need not."""
    cfg, params = tiny4
    prompt, layers, thr = [5, 7, 11, 13, 2], (1, 2, 3), (0.75, 0.72, 0.7)
    cands = np.random.default_rng(3).permutation(cfg.vocab_size)[:12].astype(np.int32)
    ee = EEConfig(layers, thr, missing_kv="propagate", ramp_vocab=12)
    with jax.default_matmul_precision("highest"):
        out = reference_generate(params, cfg, prompt, ee, 16, ramp_tokens=cands)
    want, want_exits, margin = NaiveEE(params, cfg).generate(prompt, list(layers), thr, "propagate", 16, cands)
    assert margin > 1e-4, "a confidence sits on a threshold; pick other thresholds"
    assert out.token_ids == want and out.exit_layers == want_exits
    exited = [t for t, e in zip(out.token_ids, out.exit_layers) if e < cfg.num_layers]
    assert exited and set(exited) <= set(cands.tolist())
    assert cfg.num_layers in out.exit_layers[1:]


@pytest.mark.parametrize("ramp_vocab", [0, 1, True, 2.5, 62])
def test_bad_ramp_vocab(ramp_vocab):
    with pytest.raises(ValueError, match=r"ramp_vocab must be None or an integer in \[2, 61\]"):
        EEConfig((1,), ramp_vocab=ramp_vocab).validate(4, 61)


def test_ramp_vocab_needs_valid_tokens(tiny4):
    cfg, params = tiny4
    for tokens, match in [(None, "needs the candidate token ids"), ([1, 2], "only 2 ranked token ids"),
                          ([1, 2, 2, 5], "distinct ids"), ([1, 2, 3, cfg.vocab_size], "distinct ids"),
                          ([[1, 2, 3, 4]], "1-D array")]:
        with pytest.raises(ValueError, match=match):
            reference_generate(params, cfg, [1, 2], EEConfig((1,), 0.5, ramp_vocab=4), 3, ramp_tokens=tokens)


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
