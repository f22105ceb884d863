"""Greedy output that does not depend on timing (issue 28, item 4).

Every device call and iteration is timed through `time.perf_counter`; here that clock is replaced
by one that adds random jitter of up to 40 ms per reading (far more than a tiny model's calls
take), so any decision read off a measurement flips at random. With `decisions="frozen"` (the
default) the same prompts, sent 8 times alone and 8 times mixed, come back with identical tokens:
rebatching (lossy) for the same batch composition, verify mode always and equal to full depth.
The control shows the clock has teeth: with `decisions="measured"` the same runs make different
exit decisions.
"""
import random
import time as real_time

import pytest

from drex_jax import Engine, GenerationConfig
from drex_jax.early_exit import EEConfig
from drex_jax.sched.ramp_gate import GateConfig

EE_LAYERS, EE_THR = (1, 2, 3), (0.08, 0.06, 0.05)
PROMPTS = [[3, 14, 15, 9, 2], [6, 5, 35], [8, 9, 7, 9, 3, 2, 3, 8], [4, 6, 2, 6], [43, 3, 8, 3, 2, 7, 9]]
REPEATS = 8


class NoisyClock:
    """A stand-in for the `time` module whose perf_counter jumps ahead by random amounts."""

    def __init__(self, seed: int):
        self.rng, self.offset = random.Random(seed), 0.0

    def perf_counter(self) -> float:
        self.offset += self.rng.uniform(0.0, 0.04)
        return real_time.perf_counter() + self.offset


@pytest.fixture
def noisy_clock(monkeypatch):
    import drex_jax.runner
    import drex_jax.sched.ee_decoder

    clock = NoisyClock(0)
    monkeypatch.setattr(drex_jax.runner, "time", clock)
    monkeypatch.setattr(drex_jax.sched.ee_decoder, "time", clock)
    return clock


def _engine(tiny4, verify: bool, decisions: str):
    cfg, params = tiny4
    ee = EEConfig(EE_LAYERS, EE_THR, missing_kv="recompute" if verify else "propagate", verify=verify, max_draft=4)
    # small gate windows so that the gate decides (and, measured, flips) many times in these short runs
    gate = GateConfig(probe_every=3, probe_iters=2) if verify or decisions == "measured" else None
    eng = Engine.from_params(cfg, params, max_slots=8, page_size=4, max_seq_len=64, ee=ee, policy="rebatching",
                             art=True, gate=gate, decisions=decisions)
    eng.warmup(sampling=False)  # the frozen cost table
    return eng


def _runs(eng, gc):
    """(tokens of each prompt sent alone, REPEATS times; tokens of all prompts sent together, REPEATS times),
    and the exit decisions each mixed run made."""
    alone = [[tuple(eng.generate([p], gc)[0].token_ids) for _ in range(REPEATS)] for p in PROMPTS]
    mixed, decisions = [], []
    for _ in range(REPEATS):
        eng.reset_stats()
        mixed.append(tuple(tuple(r.token_ids) for r in eng.generate(PROMPTS, gc)))
        st = eng.ee_stats
        decisions.append((tuple(st.exits_per_ramp), st.art_declined, st.fused_iterations))
    return alone, mixed, decisions


def test_rebatching_tokens_do_not_depend_on_timing(tiny4, noisy_clock):
    eng = _engine(tiny4, verify=False, decisions="frozen")
    assert eng.early_exit["decisions"] == "frozen" and not eng.early_exit["gate"]
    assert eng.decoder.art.full_s and eng.decoder.art.segment_s  # warm-up timed ART's table
    table = (dict(eng.decoder.art.full_s), dict(eng.decoder.art.segment_s))
    alone, mixed, decisions = _runs(eng, GenerationConfig(max_new_tokens=16))
    for i, runs in enumerate(alone):
        assert len(set(runs)) == 1, f"prompt {i} alone gave {len(set(runs))} different outputs"
    assert len(set(mixed)) == 1 and len(set(decisions)) == 1
    assert table == (eng.decoder.art.full_s, eng.decoder.art.segment_s)  # frozen: never updated
    exits = decisions[0][0]
    assert sum(exits[:-1]) > 0, exits  # tokens really exited early: the runs were not all full depth


def test_verify_tokens_do_not_depend_on_timing(tiny4, noisy_clock):
    cfg, params = tiny4
    gc = GenerationConfig(max_new_tokens=16)
    full = [tuple(r.token_ids) for r in Engine.from_params(cfg, params, max_slots=8, page_size=4,
                                                            max_seq_len=64).generate(PROMPTS, gc)]
    eng = _engine(tiny4, verify=True, decisions="frozen")
    assert eng.early_exit["gate"]  # verify keeps the gate: it cannot change a token
    alone, mixed, _ = _runs(eng, gc)
    for i, runs in enumerate(alone):
        assert set(runs) == {full[i]}, f"prompt {i} alone"
    assert set(mixed) == {tuple(full)}
    st = eng.ee_stats
    assert sum(st.drafts_per_ramp) > 0 and st.fused_iterations > 0  # drafts were made, the gate switched


def test_measured_decisions_follow_the_noisy_clock(tiny4, noisy_clock):
    """The control: the same runs with live timings make different decisions (so the tests above
    would fail if anything frozen still read the clock)."""
    eng = _engine(tiny4, verify=False, decisions="measured")
    assert eng.early_exit["gate"]
    _, _, decisions = _runs(eng, GenerationConfig(max_new_tokens=16))
    assert len(set(decisions)) > 1, decisions


def test_decisions_are_checked(tiny4):
    cfg, params = tiny4
    with pytest.raises(ValueError, match="decisions must be one of"):
        Engine.from_params(cfg, params, max_slots=4, page_size=4, ee=EEConfig(EE_LAYERS, EE_THR), decisions="live")
    with pytest.raises(ValueError, match="decisions='measured'"):
        Engine.from_params(cfg, params, max_slots=4, page_size=4, ee=EEConfig(EE_LAYERS, EE_THR),
                           policy="rebatching", gate=GateConfig(enabled=True))
