"""DREX rebatching vs the unbatched early-exit reference; baseline policies; regrouping moves no KV."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from drex_jax import Engine, GenerationConfig
from drex_jax.early_exit import EEConfig
from drex_jax.reference import reference_generate
from drex_jax.sched.ramp_gate import GateConfig
from drex_jax.sched.flush import FlushConfig
from tests.serving import serve_with_arrivals

EE_LAYERS, EE_THR = (1, 2, 3), (0.08, 0.06, 0.05)


def _prompts(n, seed=0):
    rng = np.random.default_rng(seed)
    return [list(rng.integers(0, 61, rng.integers(2, 12))) for _ in range(n)]


def _serve_with_arrivals(engine, prompts, gc):
    return serve_with_arrivals(engine, prompts, gc, first=0, every=3, per_arrival=3)


@pytest.mark.parametrize("method", ["copy", "propagate"])
def test_rebatching_matches_reference_and_eager_does_not(tiny4, method):
    cfg, params = tiny4
    ee = EEConfig(EE_LAYERS, EE_THR, missing_kv=method)
    prompts = _prompts(12)
    gc = GenerationConfig(max_new_tokens=16)
    refs = [reference_generate(params, cfg, p, ee, 16) for p in prompts]
    reb = Engine.from_params(cfg, params, max_slots=8, page_size=4, ee=ee, policy="rebatching", art=False)
    got = _serve_with_arrivals(reb, prompts, gc)
    for i, ref in enumerate(refs):
        assert got[i].token_ids == ref.token_ids, f"request {i}"
        assert got[i].exit_layers == ref.exit_layers, f"request {i}"
    st = reb.ee_stats
    assert st.involuntary_exits == 0 and st.involuntary_stays == 0
    assert min(st.exits_per_ramp) > 0, st.exits_per_ramp  # every ramp and full depth used
    assert st.wanted_per_ramp == st.exits_per_ramp  # no ART: every token left where it wanted
    assert sum(st.flushes.values()) > 0
    assert reb.num_free_pages == reb.allocator.capacity and reb.num_free_slots == 8

    eager = Engine.from_params(cfg, params, max_slots=8, page_size=4, ee=ee, policy="eager")
    eg = _serve_with_arrivals(eager, prompts, gc)
    assert eager.ee_stats.involuntary_exits > 0
    assert sum(eg[i].token_ids != refs[i].token_ids for i in range(len(prompts))) > 0
    lazy = Engine.from_params(cfg, params, max_slots=8, page_size=4, ee=ee, policy="lazy")
    _serve_with_arrivals(lazy, prompts, gc)
    assert lazy.ee_stats.involuntary_stays > 0 and lazy.ee_stats.involuntary_exits == 0


def test_rebatching_with_ramp_vocabulary_matches_reference(tiny4):
    """Ramps scoring 12 candidate ids: the batched engine equals the unbatched reference token
    for token and exit layer for exit layer, and every early exit emits a candidate."""
    cfg, params = tiny4
    cands = np.random.default_rng(3).permutation(cfg.vocab_size)[:12].astype(np.int32)
    ee = EEConfig(EE_LAYERS, (0.75, 0.72, 0.55), missing_kv="propagate", ramp_vocab=12)
    prompts = _prompts(10, seed=4)
    gc = GenerationConfig(max_new_tokens=14)
    refs = [reference_generate(params, cfg, p, ee, 14, ramp_tokens=cands) for p in prompts]
    eng = Engine.from_params(cfg, params, max_slots=8, page_size=4, ee=ee, policy="rebatching", art=False,
                             ramp_tokens=cands)
    got = _serve_with_arrivals(eng, prompts, gc)
    for i, ref in enumerate(refs):
        assert got[i].token_ids == ref.token_ids, f"request {i}"
        assert got[i].exit_layers == ref.exit_layers, f"request {i}"
    exited = [t for g in got.values() for t, e in zip(g.token_ids, g.exit_layers) if e < cfg.num_layers]
    assert len(exited) > 5 and set(exited) <= set(cands.tolist())
    assert min(eng.ee_stats.exits_per_ramp) > 0, eng.ee_stats.exits_per_ramp
    with pytest.raises(ValueError, match="needs the candidate token ids"):
        Engine.from_params(cfg, params, max_slots=8, page_size=4, ee=ee, policy="rebatching")


def test_art_profiles_per_shape_without_compile_time(tiny4):
    """ART keys its timings by (batch bucket, page-width bucket) and each decision is judged
    against the fused full step of the same shape; timings exclude compilation."""
    cfg, params = tiny4
    eng = Engine.from_params(cfg, params, max_slots=8, page_size=4, ee=EEConfig(EE_LAYERS, EE_THR),
                             policy="rebatching", art=True, gate=GateConfig(enabled=False),  # ART alone
                             decisions="measured")
    from drex_jax import compile_counter

    eng.generate(_prompts(8, seed=2), GenerationConfig(max_new_tokens=12))
    art = eng.decoder.art
    # serving never compiles a full-depth program to profile: unknown shapes split and are timed
    assert not art.full_s and all(d.split and d.predicted_profit_s is None for d in art.decisions)
    seen = {k for _, k in art.segment_s}
    assert seen and all(isinstance(k, tuple) and len(k) == 2 for k in seen)
    assert eng.decoder.profile_art() == len(seen) and set(art.full_s) == seen
    before = compile_counter.count()
    eng.generate(_prompts(8, seed=2), GenerationConfig(max_new_tokens=12))  # same shapes again
    assert compile_counter.count() == before
    judged = [d for d in art.decisions if d.predicted_profit_s is not None]
    assert judged and all(d.bucket in art.full_s for d in judged)
    # a call that compiles reports no timing; the same call again does
    from drex_jax.generation import SamplingParams
    from drex_jax.kv.pages import block_table_array
    from drex_jax.sched.batch import DecodeBatch

    pad = np.full(8, -1, np.int32)
    arrays = DecodeBatch(np.full(8, 8, np.int32), pad, pad, block_table_array([[]] * 8, 96), SamplingParams.build([], 8))
    assert eng.decoder.run_layers(arrays, 0, 2, 0, False)[2] is None
    assert eng.decoder.run_layers(arrays, 0, 2, 0, False)[2] > 0


def test_art_stays_are_counted(tiny4):
    cfg, params = tiny4
    ee = EEConfig(EE_LAYERS, EE_THR)
    eng = Engine.from_params(cfg, params, max_slots=8, page_size=4, ee=ee, policy="rebatching", art=True,
                             gate=GateConfig(enabled=False), decisions="measured")
    eng.generate(_prompts(6, seed=1), GenerationConfig(max_new_tokens=10))  # time the segments
    # make splitting look unprofitable: a fused full step far cheaper than its segments
    eng.decoder.art.record_full = lambda bucket, seconds: eng.decoder.art.full_s.__setitem__(bucket, 1e-9)
    eng.decoder.profile_art()
    eng.decoder.reset_stats()
    eng.generate(_prompts(6, seed=1), GenerationConfig(max_new_tokens=10))
    st = eng.ee_stats
    assert st.involuntary_exits == 0
    assert st.art_declined > 0 and st.involuntary_stays > 0
    # stayed tokens still count where they first wanted out
    assert sum(st.wanted_per_ramp[:-1]) > sum(st.exits_per_ramp[:-1])
    acc, n = eng.decoder.art.hindsight_accuracy()
    assert n > 0 and 0.0 <= acc <= 1.0


def test_segment_step_writes_only_its_rows_kv(tiny4):
    """Regrouping is index arrays only: a segment call changes the pool exactly at its rows'
    (layer in segment, page, offset) entries and nowhere else."""
    from drex_jax.kv.pages import block_table_array
    from drex_jax.kv.pool import init_pool
    from drex_jax.generation import SamplingParams
    from drex_jax.model.modules import split_model
    from drex_jax.rebatch.steps import segment_step

    cfg, params = tiny4
    graph, state = split_model(cfg, params)
    pool = init_pool(cfg, 12, 4, jnp.float32)
    pool = jax.tree.map(lambda a: jax.random.normal(jax.random.key(0), a.shape), pool)
    before = jax.tree.map(np.asarray, pool)
    hidden = jax.random.normal(jax.random.key(1), (6, cfg.hidden_size))
    pages = {2: [5, 7], 4: [1, 9], 0: [3]}  # slot -> pages
    slots = [4, 2]
    pos = np.array([6, 2, -1, -1], np.int32)
    bt = block_table_array([pages[4], pages[2], [], []], 2)
    _, _, pool, _ = segment_step(state, pool, hidden, np.array(slots + [6, 6], np.int32), np.zeros(4, np.int32),
                                 pos, bt, SamplingParams.build([], 4), graph=graph, start=1, end=3, ramp=1,
                                 measure="top1_minus_top2", do_sample=False)
    for name in ("k", "v"):
        diff = np.argwhere(np.any(np.asarray(pool[name]) != before[name], axis=-1))  # [layer, kv, page, off]
        changed = {(int(l), int(p), int(o)) for l, _, p, o in diff}
        assert changed == {(l, pg, o) for l in (1, 2) for pg, o in ((9, 2), (5, 2))}


def test_bad_policy_and_flush_settings(tiny4):
    cfg, params = tiny4
    ee = EEConfig(EE_LAYERS, EE_THR)
    with pytest.raises(ValueError, match="unknown policy 'fastest'"):
        Engine.from_params(cfg, params, ee=ee, policy="fastest")
    with pytest.raises(ValueError, match="needs an early-exit config"):
        Engine.from_params(cfg, params, policy="rebatching")
    with pytest.raises(ValueError, match="missing_kv='recompute' runs with policy 'rebatching'"):
        Engine.from_params(cfg, params, ee=EEConfig(EE_LAYERS, EE_THR, missing_kv="recompute"), policy="eager")
    with pytest.raises(ValueError, match="trained"):
        Engine.from_params(cfg, params, ee=EEConfig(EE_LAYERS, EE_THR, head="trained"))
    with pytest.raises(ValueError, match=r"min_fill must be in \(0, 1\]"):
        FlushConfig(min_fill=0)
    with pytest.raises(ValueError, match="max_wait_iters"):
        FlushConfig(max_wait_iters=0)
    with pytest.raises(ValueError, match="tpot_sla_ms"):
        FlushConfig(tpot_sla_ms=-5.0)
    with pytest.raises(ValueError, match="flush must be a FlushConfig"):
        Engine.from_params(cfg, params, ee=ee, flush={"min_fill": 0.5})
    with pytest.raises(ValueError, match="deadline_ms"):
        GenerationConfig(deadline_ms=0)


def test_deadline_flushes_buffers(tiny4):
    cfg, params = tiny4
    ee = EEConfig(EE_LAYERS, EE_THR)
    eng = Engine.from_params(cfg, params, max_slots=8, page_size=4, ee=ee, art=False,
                             flush=FlushConfig(min_fill=1.0, max_wait_iters=1000))
    eng.generate(_prompts(8, seed=2), GenerationConfig(max_new_tokens=10, deadline_ms=1e-3))
    assert eng.ee_stats.flushes.get("deadline", 0) > 0


# the ramp-vocabulary case is manual (45 s, outside CI's budget); the tiny-model ramp-vocabulary test stays
@pytest.mark.parametrize("ramp_vocab", [None, pytest.param(1024, marks=pytest.mark.manual)])
def test_smollm2_rebatching_matches_reference(default_model, ramp_vocab):
    cfg, params, tok = default_model
    from drex_jax.data.texts import PROMPTS

    ramp_tokens = None if ramp_vocab is None else np.arange(ramp_vocab, dtype=np.int32)  # any fixed set
    ee = EEConfig((8, 15, 22), (0.5, 0.4, 0.3), ramp_vocab=ramp_vocab)
    # 8 prompts through 4 slots: arrivals, insertion into running batches and rebatching at every ramp
    eng = Engine.from_params(cfg, params, tok, max_slots=4, max_seq_len=256, ee=ee, art=False,
                             ramp_tokens=ramp_tokens)
    prompts = [eng.encode(p, chat=True) for p in PROMPTS[:8]]
    gc = GenerationConfig(max_new_tokens=24)
    got = _serve_with_arrivals(eng, prompts, gc)
    eos = (tok.eos_token_id,)
    diverged = []
    for i, p in enumerate(prompts):
        ref = reference_generate(params, cfg, p, ee, 24, stop_ids=eos, ramp_tokens=ramp_tokens)
        if got[i].token_ids != ref.token_ids:
            diverged.append(i)
    st = eng.ee_stats
    print(f"\nSmolLM2 rebatching vs reference: {len(prompts) - len(diverged)}/{len(prompts)} identical; "
          f"exits per ramp {st.exits_per_ramp}, mean depth {st.mean_depth():.2f}")
    assert not diverged, diverged
    assert sum(st.exits_per_ramp[:-1]) > 0  # some tokens really exited early


def test_off_and_latency_only_run_full_depth(tiny4):
    """`off` is the full model; `latency-only` runs every layer for every row (real KV), emitting
    tokens that passed a ramp early."""
    from tests.reference import greedy_reference

    cfg, params = tiny4
    ee = EEConfig(EE_LAYERS, EE_THR)
    prompts = _prompts(5, seed=4)
    off = Engine.from_params(cfg, params, max_slots=4, page_size=4, ee=ee, policy="off")
    res = off.generate(prompts, GenerationConfig(max_new_tokens=10))
    for p, r in zip(prompts, res):
        assert r.token_ids == greedy_reference(params, cfg, p, 10)
    lat = Engine.from_params(cfg, params, max_slots=4, page_size=4, ee=ee, policy="latency-only")
    lat.generate(prompts, GenerationConfig(max_new_tokens=10))
    st = lat.ee_stats
    assert st.mean_depth() == cfg.num_layers and sum(st.exits_per_ramp[:-1]) > 0


@pytest.mark.slow  # run by .ci/run in its second (slow) pass
@pytest.mark.parametrize("extra,num_pages", [({}, None), (dict(missing_kv="recompute", verify=True, max_draft=3), None),
                                             ({}, 13)])
def test_warmup_covers_early_exit_programs(tiny4, extra, num_pages):
    """After warmup() a rebatching engine (ART on; verify mode: the gate on) serves a steady stream
    without compiling; with a pool too small for the stream, preempted requests' replays (their
    early-exit depths) run warmed-up programs too."""
    from drex_jax import compile_counter

    cfg, params = tiny4
    eng = Engine.from_params(cfg, params, max_slots=4, page_size=4, max_seq_len=32, num_pages=num_pages,
                             ee=EEConfig(EE_LAYERS, EE_THR, **extra), policy="rebatching")
    eng.warmup(sampling=False)  # greedy serving needs the greedy programs only
    before = compile_counter.count()
    for seed in range(3):
        _serve_with_arrivals(eng, _prompts(6, seed=40 + seed), GenerationConfig(max_new_tokens=12))
    assert compile_counter.count() == before
    assert sum(eng.ee_stats.exits_per_ramp[:-1]) > 0
    assert (eng.scheduler.num_preemptions > 0) == (num_pages is not None)
