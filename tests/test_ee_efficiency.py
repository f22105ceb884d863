"""EE machinery-efficiency benchmark pieces: trace shares, the two ideals (hand-computed), and one
replayed-trace measurement on a tiny model."""
import numpy as np
import pytest

from drex_jax.bench import ee_efficiency as eff


def test_trace_fractions_spread_evenly():
    assert eff.trace_fractions(0.3, 3) == pytest.approx((0.1, 0.1, 0.1, 0.7))
    assert eff.trace_fractions(0.5, 1) == pytest.approx((0.5, 0.5))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        eff.trace_fractions(1.5, 2)


def test_ideal_speedups_hand_computed(tiny4):
    cfg, params = tiny4  # 4 layers, vocab 61
    from drex_jax.bench.roofline import decode_cost

    # one ramp after layer 2, half the tokens exit there; bandwidth-bound only (peak huge)
    ideal, roof = eff.ideal_speedups(cfg, params, (2,), (0.5, 0.5), 8, 64, peak=1e30, bandwidth=1.0, ramp_vocab=None)
    assert ideal == pytest.approx(4 / (0.5 * 2 + 0.5 * 4))
    full = decode_cost(cfg, params, 8, 64, 0, 4, head_columns=61)[0]
    shallow = decode_cost(cfg, params, 8, 64, 0, 2, head_columns=61)[0]
    deep = decode_cost(cfg, params, 8, 64, 2, 4, head_columns=61)[0]
    assert roof == pytest.approx(full / (shallow + 0.5 * deep))
    # nobody exits: the ideal counts the ramp's head as pure overhead
    _, none = eff.ideal_speedups(cfg, params, (2,), (0.0, 1.0), 8, 64, peak=1e30, bandwidth=1.0, ramp_vocab=None)
    assert none < 1


def test_replayed_trace_measurement(tiny4):
    cfg, params = tiny4
    from drex_jax.model.params import decode_layout

    dec = decode_layout(params)
    off = eff.measure(cfg, dec, None, "off", False, (2,), (0.5, 0.5), 4, 16, 6, None)
    reb = eff.measure(cfg, dec, None, "rebatching", False, (2,), (0.5, 0.5), 4, 16, 6, None)
    assert off["mean_depth"] == 4 and off["tok_s"] > 0
    assert 2 <= reb["mean_depth"] < 4  # about half the tokens left after layer 2
    assert reb["involuntary_exits"] == 0 and reb["involuntary_stays"] == 0
    # 6 new tokens; the prefilling step also ran the first decode step, so 4 steps decode 16 tokens
    assert (off["iterations"], off["decode_tokens"], off["first_step_tokens"]) == (4, 16, 8)
    assert reb["decode_tokens"] + reb["first_step_tokens"] == 4 * 6 and reb["iterations"] >= 4
    assert reb["host_round_trips_per_iteration"] >= 1
