"""The ramp gate: measures early exit against the fused step per shape, runs the cheaper one,
probes the other periodically; in the engine, a shape where nothing exits goes fused."""
import pytest

from drex_jax import Engine, GenerationConfig
from drex_jax.early_exit import EEConfig
from drex_jax.sched.exit_trace import ExitTrace
from drex_jax.sched.ramp_gate import EE, FUSED, GateConfig, RampGate


def drive(gate, shape, cost, iters):
    """Run `iters` iterations where mode m costs cost[m] seconds per token (4 tokens each)."""
    modes = []
    for _ in range(iters):
        m = gate.mode(shape)
        gate.record(shape, m, cost[m] * 4, 4)
        modes.append(m)
    return modes


def test_gate_measures_both_then_runs_the_cheaper_and_probes():
    g = RampGate(GateConfig(probe_every=10, probe_iters=3, margin=0.05))
    modes = drive(g, "s", {EE: 2.0, FUSED: 1.0}, 3 + 3 + 10 + 3 + 10)
    assert modes[:3] == [EE] * 3 and modes[3:6] == [FUSED] * 3  # measure each once
    assert modes[6:16] == [FUSED] * 10  # early exit costs more: fused
    assert modes[16:19] == [EE] * 3 and g.probes == 1  # periodic probe of early exit
    assert modes[19:] == [FUSED] * 10 and g.fused_iterations == 3 + 10 + 10


def test_gate_probes_less_while_probes_confirm_the_choice():
    g = RampGate(GateConfig(probe_every=10, probe_iters=2, margin=0.05, max_backoff=4))
    modes = drive(g, "s", {EE: 2.0, FUSED: 1.0}, 124)
    probes = [i for i in range(4, len(modes)) if modes[i] == EE]
    # fused runs of 10, 20, 40, then 40 (the cap) between 2-iteration probes of early exit
    assert probes == [14, 15, 36, 37, 78, 79, 120, 121]
    # early exit became cheaper: the next probe (after the 38 fused iterations left) changes the
    # choice, which starts again from probe_every, then doubles as probes confirm it
    modes = drive(g, "s", {EE: 0.5, FUSED: 1.0}, 72)
    assert modes[:38] == [FUSED] * 38 and modes[38:50] == [EE] * 12
    assert modes[50:52] == [FUSED] * 2 and modes[52:72] == [EE] * 20


def test_gate_keeps_early_exit_when_it_pays_by_the_margin():
    g = RampGate(GateConfig(probe_every=10, probe_iters=3, margin=0.05))
    assert drive(g, "s", {EE: 0.8, FUSED: 1.0}, 16)[6:] == [EE] * 10
    g = RampGate(GateConfig(probe_every=10, probe_iters=3, margin=0.05))
    assert drive(g, "s", {EE: 0.97, FUSED: 1.0}, 16)[6:] == [FUSED] * 10  # within the margin: not worth it


def test_gate_notices_a_change_and_keeps_shapes_apart():
    g = RampGate(GateConfig(probe_every=10, probe_iters=3, margin=0.0))
    drive(g, "a", {EE: 2.0, FUSED: 1.0}, 12)
    assert g.mode("a") == FUSED  # 4 iterations left in this fused run
    # exits became frequent: the next probe of early exit measures it cheaper, and it takes over
    modes = drive(g, "a", {EE: 0.5, FUSED: 1.0}, 4 + 3 + 10)
    assert modes[-10:] == [EE] * 10
    assert drive(g, "b", {EE: 0.5, FUSED: 1.0}, 3)[0] == EE  # a new shape starts measuring afresh


def test_gate_ignores_transition_iterations_and_can_be_off():
    g = RampGate(GateConfig(probe_every=10, probe_iters=2))
    g.mode("s")
    g.record("s", EE, 100.0, 1, count=False)  # a compile: no cost information
    g.record("s", EE, 1.0, 1)
    assert g.shapes["s"].cost[EE] == 1.0
    off = RampGate(GateConfig(enabled=False))
    assert drive(off, "s", {EE: 9.0, FUSED: 1.0}, 20) == [EE] * 20
    with pytest.raises(ValueError, match="probe_iters"):
        GateConfig(probe_iters=1)
    with pytest.raises(ValueError, match="margin"):
        GateConfig(margin=1.5)
    with pytest.raises(ValueError, match="max_backoff"):
        GateConfig(max_backoff=0)


def test_engine_goes_fused_where_nothing_exits_and_matches_full_depth(tiny4):
    """A trace where no token exits: early exit only adds segment calls and ramps, so the gate
    must settle on the fused step; every token runs full depth, equal to policy off."""
    cfg, params = tiny4
    prompts = [[1 + i, 2, 3 + i] for i in range(4)]
    gc = GenerationConfig(max_new_tokens=40)
    off = Engine.from_params(cfg, params, max_slots=4, page_size=4).generate(prompts, gc)
    ee = EEConfig((1, 2), 0.5)
    eng = Engine.from_params(cfg, params, max_slots=4, page_size=4, ee=ee, policy="rebatching", art=True,
                             exit_trace=ExitTrace.for_ramps((0.0, 0.0, 1.0), 2, 0),
                             gate=GateConfig(probe_every=8, probe_iters=3), decisions="measured")
    got = eng.generate(prompts, gc)
    assert [r.token_ids for r in got] == [r.token_ids for r in off]
    st = eng.ee_stats
    assert st.fused_iterations > 10 and st.mean_depth() == cfg.num_layers
    assert st.gate_probes >= 1


def test_switching_modes_drains_buffers_and_loses_no_token(tiny4):
    """A gate that flips between early exit and fused every iteration: rows still in a ramp
    buffer finish their token before a fused iteration (a drain), nobody exits involuntarily,
    and every request gets all its tokens."""
    cfg, params = tiny4
    ee = EEConfig((1, 2), 0.5)
    eng = Engine.from_params(cfg, params, max_slots=8, page_size=4, ee=ee, policy="rebatching", art=False,
                             exit_trace=ExitTrace.for_ramps((0.3, 0.3, 0.4), 2, 1))
    flips = iter(range(10**6))
    eng.decoder.gate.config = GateConfig(enabled=True)
    eng.decoder.gate.mode = lambda shape: FUSED if next(flips) % 2 else EE
    got = eng.generate([[1 + i, 2, 3] for i in range(6)], GenerationConfig(max_new_tokens=20))
    assert all(len(r.token_ids) == 20 for r in got)
    st = eng.ee_stats
    assert st.flushes.get("drain", 0) > 0 and st.involuntary_exits == 0
    assert sum(st.exits_per_ramp) == st.tokens and st.exits_per_ramp[0] > 0
