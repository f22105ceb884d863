"""Pool exhaustion and preemption, cancellation, and a soak test without leaks."""
import numpy as np
import pytest

from drex_jax import Engine, GenerationConfig
from drex_jax.early_exit import EEConfig
from drex_jax.reference import reference_generate
from tests.reference import greedy_reference
from tests.serving import serve_with_arrivals

EE_LAYERS, EE_THR = (1, 2, 3), (0.08, 0.06, 0.05)


def _prompts(n, seed, vocab, lo=2, hi=12):
    rng = np.random.default_rng(seed)
    return [list(rng.integers(0, vocab, rng.integers(lo, hi))) for _ in range(n)]


def _record_preemptions(engine):
    """Wrap engine._preempt to log the early-exit stage each victim was in."""
    stages, inner = [], engine._preempt

    def preempt(req):
        stages.append(req.stage)
        inner(req)

    engine._preempt = preempt
    return stages


def test_preemption_recomputes_identically(tiny_llama):
    cfg, params = tiny_llama
    prompts = _prompts(8, 0, cfg.vocab_size, 4, 20)
    gc = GenerationConfig(max_new_tokens=24)
    # 12 usable pages of 4 tokens: everyone is admitted on prompt pages, then the pool runs out
    small = Engine.from_params(cfg, params, max_slots=8, page_size=4, num_pages=13)
    got = serve_with_arrivals(small, prompts, gc, first=6, every=2, per_arrival=1)
    assert small.num_preemptions > 0
    for i, p in enumerate(prompts):
        assert got[i].token_ids == greedy_reference(params, cfg, p, 24), f"request {i}"
    assert sum(r.stats.preemptions for r in got.values()) == small.num_preemptions
    assert small.num_free_pages == small.allocator.capacity and small.num_free_slots == 8
    assert small.peak_pages_used == small.allocator.capacity


@pytest.mark.parametrize("method", ["copy", "propagate"])
def test_preemption_under_rebatching_matches_ample_pages(tiny4, method):
    """Victims include requests waiting in a ramp buffer; their recompute replays every early
    exit's depth, so outputs and exit layers equal a run that never ran out of pages."""
    cfg, params = tiny4
    ee = EEConfig(EE_LAYERS, EE_THR, missing_kv=method)
    prompts = _prompts(12, 0, cfg.vocab_size)
    gc = GenerationConfig(max_new_tokens=20)
    kw = dict(max_slots=8, page_size=4, ee=ee, policy="rebatching", art=False)
    ample = serve_with_arrivals(Engine.from_params(cfg, params, **kw), prompts, gc, first=0, every=3, per_arrival=3)
    small = Engine.from_params(cfg, params, num_pages=17, **kw)
    stages = _record_preemptions(small)
    got = serve_with_arrivals(small, prompts, gc, first=0, every=3, per_arrival=3)
    assert small.num_preemptions > 0 and any(s > 0 for s in stages), stages
    for i, p in enumerate(prompts):
        assert got[i].token_ids == ample[i].token_ids, f"request {i}"
        assert got[i].exit_layers == ample[i].exit_layers, f"request {i}"
        ref = reference_generate(params, cfg, p, ee, 20)
        assert got[i].token_ids == ref.token_ids, f"request {i}"
    assert small.num_free_pages == small.allocator.capacity and small.num_free_slots == 8
    assert small.ee_stats.involuntary_exits == 0
