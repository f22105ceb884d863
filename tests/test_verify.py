"""missing_kv="recompute" in the engine and verify mode (lossless early exit).

recompute: batched rebatching equals the unbatched reference's recompute (tokens and exit layers)
with requests arriving mid-flight and under preemption. verify: greedy output equals full-depth
decoding (`policy="off"`, itself checked against HF elsewhere) token for token, with arrivals,
preemption, cancellation, both attention paths and the ramp gate's fallback; drafts are really
made and really rejected (the tests would pass vacuously otherwise).
"""
import numpy as np
import pytest

from drex_jax import Engine, GenerationConfig
from drex_jax.early_exit import EEConfig
from drex_jax.kv.pages import pages_needed
from drex_jax.reference import reference_generate
from drex_jax.sched.ramp_gate import GateConfig
from tests.serving import serve_with_arrivals

EE_LAYERS, EE_THR = (1, 2, 3), (0.08, 0.06, 0.05)


def _prompts(n, seed, vocab):
    rng = np.random.default_rng(seed)
    return [list(rng.integers(0, vocab, rng.integers(2, 12))) for _ in range(n)]


def _arrivals(engine, prompts, gc):
    return serve_with_arrivals(engine, prompts, gc, first=0, every=3, per_arrival=3)


def _full_depth(cfg, params, prompts, gc, **kw):
    return _arrivals(Engine.from_params(cfg, params, max_slots=8, page_size=4, **kw), prompts, gc)


@pytest.mark.parametrize("max_draft", [3, pytest.param(63, marks=pytest.mark.slow)])
def test_recompute_matches_reference(tiny4, max_draft):
    cfg, params = tiny4
    ee = EEConfig(EE_LAYERS, EE_THR, missing_kv="recompute", max_draft=max_draft)
    prompts = _prompts(12, 0, cfg.vocab_size)
    gc = GenerationConfig(max_new_tokens=16)
    eng = Engine.from_params(cfg, params, max_slots=8, page_size=4, ee=ee, policy="rebatching", art=False)
    got = _arrivals(eng, prompts, gc)
    for i, p in enumerate(prompts):
        ref = reference_generate(params, cfg, p, ee, 16)
        assert got[i].token_ids == ref.token_ids, f"request {i}"
        assert got[i].exit_layers == ref.exit_layers, f"request {i}"
    st = eng.ee_stats
    assert min(st.exits_per_ramp) > 0, st.exits_per_ramp  # every ramp used, and full depth
    assert (st.draft_cap_stays > 0) == (max_draft == 3)  # the cap binds where it is small
    assert st.involuntary_exits == 0
    assert eng.num_free_pages == eng.allocator.capacity and eng.num_free_slots == 8


def test_chunk_rows_hand_computed():
    """A row at position 7 with position 5 pending at depth 8 and 6 at depth 15 (a state the engine
    does not reach, since later tokens carry earlier ones along, but chunk_batch must not assume
    it): the call of layers [8, 15) takes positions 5..7, position 6 joining at 15 (never, in this
    call); once 5 has reached 15 too, the call of layers [15, 22) takes 5..7, all joining."""
    from types import SimpleNamespace

    from drex_jax.sched.batch import chunk_batch

    r = SimpleNamespace(slot=2, generated=[9, 4], last_token=4, cache_len=7, pages=[3, 1],
                        ee=SimpleNamespace(pending={5: 8, 6: 15}, drafts=[]), sampling_row=lambda: (0.0, 0, 1.0, 0, 2))
    b = chunk_batch([r], 8, 15, page_size=4, num_slots=4)
    assert b.positions.tolist() == [[5, 6, 7, -1]] and b.depths.tolist() == [[8, 15, 8, 15]]
    assert b.tokens[0, 2] == 4 and b.slot_ids.tolist() == [2] and b.block_tables[0, :2].tolist() == [3, 1]
    r.ee.pending = {5: 15, 6: 15}
    b = chunk_batch([r], 15, 22, page_size=4, num_slots=4)
    assert b.positions.tolist() == [[5, 6, 7, -1]] and b.depths.tolist() == [[15, 15, 15, 22]]
    r.ee.pending = {}
    assert chunk_batch([r], 0, 8, page_size=4, num_slots=4).positions.tolist() == [[7]]


def test_recompute_differs_from_copy(tiny4):
    """The three missing-KV methods are really different K/V: with the same exits, recompute's
    later tokens differ from copy's somewhere (else the equality above would prove little)."""
    cfg, params = tiny4
    prompts = _prompts(12, 0, cfg.vocab_size)
    outs = {m: [reference_generate(params, cfg, p, EEConfig(EE_LAYERS, EE_THR, missing_kv=m, max_draft=63), 16)
                .token_ids for p in prompts] for m in ("copy", "recompute")}
    assert outs["copy"] != outs["recompute"]


@pytest.mark.slow  # run by .ci/run in its second (slow) pass
def test_recompute_under_preemption_matches_reference(tiny4):
    """Victims lose their pending positions' hidden states; prefill recomputes their context at full
    depth, which is the K/V the pending recompute would have produced."""
    cfg, params = tiny4
    ee = EEConfig(EE_LAYERS, EE_THR, missing_kv="recompute", max_draft=63)  # no cap: exits match too
    prompts = _prompts(12, 0, cfg.vocab_size)
    gc = GenerationConfig(max_new_tokens=20)
    small = Engine.from_params(cfg, params, max_slots=8, page_size=4, num_pages=17, ee=ee, policy="rebatching",
                               art=False)
    got = _arrivals(small, prompts, gc)
    assert small.num_preemptions > 0
    for i, p in enumerate(prompts):
        ref = reference_generate(params, cfg, p, ee, 20)
        assert got[i].token_ids == ref.token_ids, f"request {i}"
        assert got[i].exit_layers == ref.exit_layers, f"request {i}"
    assert small.num_free_pages == small.allocator.capacity and small.num_free_slots == 8


# the xla case is manual (47 s, outside CI's budget): the attention paths are compared token for token
# by tests/test_kernels.py
@pytest.mark.parametrize("attention", ["ffi", pytest.param("xla", marks=pytest.mark.manual)])
def test_verify_equals_full_depth_with_arrivals(tiny4, attention):
    from drex_jax.model.kernels import ffi

    if attention == "ffi" and not ffi.available():
        pytest.skip("no C++ compiler for the CPU kernel")
    cfg, params = tiny4
    # thresholds low enough that many drafts are wrong on this random model
    ee = EEConfig(EE_LAYERS, EE_THR, missing_kv="recompute", verify=True, max_draft=4)
    prompts = _prompts(12, 0, cfg.vocab_size)
    gc = GenerationConfig(max_new_tokens=16)
    full = _full_depth(cfg, params, prompts, gc, attention=attention)
    eng = Engine.from_params(cfg, params, max_slots=8, page_size=4, ee=ee, policy="rebatching", art=False,
                             attention=attention)
    got = _arrivals(eng, prompts, gc)
    for i in range(len(prompts)):
        assert got[i].token_ids == full[i].token_ids, f"request {i}"
        assert got[i].stats.generated_tokens == 16
    st = eng.ee_stats
    drafted, accepted = sum(st.drafts_per_ramp), sum(st.accepted_per_ramp)
    assert min(st.drafts_per_ramp) > 0 and 0 < accepted < drafted, st  # drafts at every ramp, some rejected
    assert st.tokens == 12 * 15 and sum(st.exits_per_ramp) == st.tokens
    assert st.mean_accepted() == pytest.approx((accepted + st.verify_passes) / st.verify_passes)
    # exit layers: accepted drafts at their ramp, every other token at full depth
    assert sum(sum(e < cfg.num_layers for e in g.exit_layers) for g in got.values()) == accepted
    assert eng.num_free_pages == eng.allocator.capacity and eng.num_free_slots == 8


@pytest.mark.slow  # run by .ci/run in its second (slow) pass
def test_verify_with_preemption_and_cancellation(tiny_llama):
    cfg, params = tiny_llama
    ee = EEConfig((1, 2), (0.05, 0.04), missing_kv="recompute", verify=True, max_draft=6)
    prompts = _prompts(10, 5, cfg.vocab_size)
    gc = GenerationConfig(max_new_tokens=24)
    full = _full_depth(cfg, params, prompts, gc)
    small = Engine.from_params(cfg, params, max_slots=8, page_size=4, num_pages=21, ee=ee, policy="rebatching",
                               art=False)
    victims = []
    inner = small.scheduler.preempt
    small.scheduler.preempt = lambda req: (victims.append(len(req.ee.drafts)), inner(req))
    cancelled = {}
    ids, out, steps = {}, {}, 0
    queue = list(enumerate(prompts))
    while queue or small.has_work:
        if steps % 2 == 0 and queue:
            i, p = queue.pop(0)
            ids[small.submit(p, gc)] = i
        if steps == 9:  # cancel a running request holding drafts, mid-generation
            req = next((r for r in small.scheduler.running if r.ee.drafts), small.scheduler.running[0])
            cancelled[ids[req.id]] = small.cancel(req.id)
        for ev in small.step():
            if ev.finished:
                out[ids[ev.request_id]] = ev.result
        steps += 1
        for r in small.scheduler.running:  # a rollback returns its pages: none held past the next token
            assert len(r.pages) <= pages_needed(r.cache_len + 1, small.page_size), (r.id, r.cache_len, r.pages)
    assert small.num_preemptions > 0 and any(v > 0 for v in victims), victims  # drafts dropped by preemption
    assert len(cancelled) == 1
    for i in range(len(prompts)):
        if i in cancelled:
            part = cancelled[i].token_ids
            assert cancelled[i].stats.finish_reason == "cancelled" and part == full[i].token_ids[:len(part)]
        else:
            assert out[i].token_ids == full[i].token_ids, f"request {i}"
    assert sum(small.ee_stats.accepted_per_ramp) > 0
    assert small.num_free_pages == small.allocator.capacity and small.num_free_slots == 8


def test_verify_gate_falls_back_to_plain_decoding(tiny4):
    """With the ramp gate on, verify mode probes plain (fused) decoding and counts the iterations
    it ran that way; output stays equal to full depth through the switches."""
    cfg, params = tiny4
    ee = EEConfig(EE_LAYERS, EE_THR, missing_kv="recompute", verify=True, max_draft=4)
    prompts = _prompts(8, 2, cfg.vocab_size)
    gc = GenerationConfig(max_new_tokens=24)
    full = _full_depth(cfg, params, prompts, gc)
    eng = Engine.from_params(cfg, params, max_slots=8, page_size=4, ee=ee, policy="rebatching",
                             gate=GateConfig(probe_every=4, probe_iters=2))
    got = _arrivals(eng, prompts, gc)
    assert eng.ee_stats.fused_iterations > 0 and sum(eng.ee_stats.drafts_per_ramp) > 0
    for i in range(len(prompts)):
        assert got[i].token_ids == full[i].token_ids, f"request {i}"


def test_verify_settings_are_checked(tiny4):
    cfg, params = tiny4
    with pytest.raises(ValueError, match="verify=True needs missing_kv='recompute'"):
        EEConfig(EE_LAYERS, EE_THR, verify=True).validate(cfg.num_layers)
    for bad in (0, 64, 2.5, True):
        with pytest.raises(ValueError, match=r"max_draft must be an integer in \[1, 63\]"):
            EEConfig(EE_LAYERS, EE_THR, missing_kv="recompute", max_draft=bad).validate(cfg.num_layers)
    with pytest.raises(ValueError, match="verify must be True or False"):
        EEConfig(EE_LAYERS, EE_THR, missing_kv="recompute", verify="yes").validate(cfg.num_layers)
    eng = Engine.from_params(cfg, params, max_slots=4, page_size=4, policy="rebatching",
                             ee=EEConfig(EE_LAYERS, EE_THR, missing_kv="recompute", verify=True))
    with pytest.raises(ValueError, match="logprobs=2 but this engine runs EEConfig\\(verify=True\\)"):
        eng.submit([1, 2, 3], GenerationConfig(logprobs=2))
    assert not eng.has_work  # nothing queued


@pytest.mark.slow  # run by .ci/run in its second (slow) pass
def test_verify_equals_full_depth_on_smollm2(default_model):
    """The bundled model with its trained heads: verify mode's greedy output equals full depth."""
    from drex_jax.data.texts import PROMPTS

    cfg, params, tok = default_model
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                       tokenize=True, return_dict=False) for p in PROMPTS[:3]]
    gc = GenerationConfig(max_new_tokens=20)
    off = Engine.from_params(cfg, params, tok, max_slots=4, max_seq_len=128).generate(prompts, gc)
    ee = EEConfig((8, 15, 22), (0.5, 0.5, 0.5), missing_kv="recompute", verify=True, head="trained",
                  ramp_vocab=1024)
    eng = Engine(None, max_slots=4, max_seq_len=128, ee=ee, policy="rebatching", art=False)
    got = eng.generate(prompts, gc)
    assert [g.token_ids for g in got] == [o.token_ids for o in off]
    st = eng.ee_stats
    assert sum(st.accepted_per_ramp) > 0 and sum(st.drafts_per_ramp) > sum(st.accepted_per_ramp), st


def test_adaptive_drafting_keeps_output_and_drafts_less(tiny4):
    """draft_stop (a second exit on the chain's confidence product) and adaptive_ramps (a request
    drafts at a ramp only while its own acceptance there reaches depth / L) both cut drafts the
    deep pass would reject; greedy output still equals full depth."""
    cfg, params = tiny4
    prompts = _prompts(8, 5, cfg.vocab_size)
    gc = GenerationConfig(max_new_tokens=24)
    full = _full_depth(cfg, params, prompts, gc)
    runs = {}
    for name, kw in {"plain": {}, "stop": dict(draft_stop=0.05), "adaptive": dict(adaptive_ramps=True)}.items():
        ee = EEConfig(EE_LAYERS, EE_THR, missing_kv="recompute", verify=True, max_draft=4, **kw)
        eng = Engine.from_params(cfg, params, max_slots=8, page_size=4, ee=ee, policy="rebatching", art=False)
        got = _arrivals(eng, prompts, gc)
        assert [got[i].token_ids for i in range(len(prompts))] == [full[i].token_ids for i in range(len(prompts))], name
        runs[name] = eng.ee_stats
    plain, stop, adaptive = runs["plain"], runs["stop"], runs["adaptive"]
    assert plain.draft_stops == plain.ramp_skips == 0
    assert stop.draft_stops > 0 and sum(stop.drafts_per_ramp) < sum(plain.drafts_per_ramp)
    assert adaptive.ramp_skips > 0 and sum(adaptive.drafts_per_ramp) < sum(plain.drafts_per_ramp)
    # the random model's shallow drafts are mostly wrong: dropping them raises acceptance
    assert adaptive.acceptance_rate() > plain.acceptance_rate()


def test_ramp_choice_follows_the_requests_own_acceptance(tiny4):
    from drex_jax.early_exit import PROBE_TOKENS
    from drex_jax.sched.request import Request

    cfg, params = tiny4
    ee = EEConfig(EE_LAYERS, EE_THR, missing_kv="recompute", verify=True, adaptive_ramps=True)
    dec = Engine.from_params(cfg, params, max_slots=2, page_size=4, ee=ee, policy="rebatching").decoder
    req = Request(0, [1, 2], GenerationConfig(), frozenset(), 0.0, generated=[5] * 10)
    assert all(dec._ramp_pays(req, s) for s in range(3))  # no history: optimistic
    # ramp 2 (layer 3 of 4: break-even 0.75): 2 of 4 recent drafts accepted -> (2 + 1) / (4 + 1) = 0.6
    req.ee.ramp_accepted[2], req.ee.ramp_checked[2], req.ee.ramp_drafted_at[2] = 2.0, 4.0, 9
    assert not dec._ramp_pays(req, 2)
    # ramp 0 (layer 1: break-even 0.25) pays at the same acceptance
    req.ee.ramp_accepted[0], req.ee.ramp_checked[0] = 2.0, 4.0
    assert dec._ramp_pays(req, 0)
    req.generated += [5] * (PROBE_TOKENS - 2)
    assert not dec._ramp_pays(req, 2)
    req.generated.append(5)  # PROBE_TOKENS since its last draft there: retried
    assert dec._ramp_pays(req, 2)
    for bad, match in ((dict(draft_stop=1.0), "draft_stop must be a number in"),
                       (dict(draft_stop=0.5, confidence="neg_entropy"), "neg_entropy"),
                       (dict(adaptive_ramps="yes"), "adaptive_ramps must be True or False")):
        with pytest.raises(ValueError, match=match):
            EEConfig(EE_LAYERS, EE_THR, missing_kv="recompute", verify=True, **bad).validate(cfg.num_layers)
    with pytest.raises(ValueError, match="they need verify=True"):
        EEConfig(EE_LAYERS, EE_THR, missing_kv="recompute", draft_stop=0.5).validate(cfg.num_layers)
