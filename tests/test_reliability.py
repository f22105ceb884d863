"""Pool exhaustion and preemption, cancellation, and a soak test without leaks."""
import numpy as np
import pytest

from drex_jax import Engine, GenerationConfig, compile_counter
from drex_jax.early_exit import EEConfig
from drex_jax.reference import reference_generate
from tests.reference import greedy_reference
from tests.serving import serve_with_arrivals

EE_LAYERS, EE_THR = (1, 2, 3), (0.08, 0.06, 0.05)


def _prompts(n, seed, vocab, lo=2, hi=12):
    rng = np.random.default_rng(seed)
    return [list(rng.integers(0, vocab, rng.integers(lo, hi))) for _ in range(n)]


def _record_preemptions(engine):
    """Wrap the scheduler's preempt to log the early-exit stage each victim was in."""
    stages, inner = [], engine.scheduler.preempt

    def preempt(req):
        stages.append(req.ee.stage)
        inner(req)

    engine.scheduler.preempt = preempt
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


# both in the slow pass (24-34 s each: the default suite stays under CI's 12 minutes);
# test_preemption_recomputes_identically keeps plain preemption in the default suite
@pytest.mark.parametrize("method", [pytest.param("copy", marks=pytest.mark.slow),
                                    pytest.param("propagate", marks=pytest.mark.slow)])
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


def test_cancel_running_and_waiting(tiny_llama):
    cfg, params = tiny_llama
    prompts = _prompts(6, 1, cfg.vocab_size, 4, 20)
    gc = GenerationConfig(max_new_tokens=16)
    eng = Engine.from_params(cfg, params, max_slots=4, page_size=4)
    ids = [eng.submit(p, gc) for p in prompts]
    done = {}
    for _ in range(3):
        done.update({ev.request_id: ev.result for ev in eng.step() if ev.finished})
    running = eng.scheduler.running[0]
    pages, slots = eng.num_free_pages, eng.num_free_slots
    partial = eng.cancel(running.id)
    assert partial.stats.finish_reason == "cancelled"
    assert eng.num_free_pages == pages + len(running.pages or []) + pages_of(partial, eng)
    assert eng.num_free_slots == slots + 1
    ref = greedy_reference(params, cfg, prompts[ids.index(running.id)], 16)
    assert 0 < len(partial.token_ids) < 16 and partial.token_ids == ref[: len(partial.token_ids)]
    waiting = eng.scheduler.waiting[-1].id
    assert eng.cancel(waiting).token_ids == []
    for rid in (running.id, waiting, 999):
        with pytest.raises(ValueError, match="not waiting or running"):
            eng.cancel(rid)
    while eng.has_work:
        done.update({ev.request_id: ev.result for ev in eng.step() if ev.finished})
    for rid, p in zip(ids, prompts):
        if rid not in (running.id, waiting):
            assert done[rid].token_ids == greedy_reference(params, cfg, p, 16), f"request {rid}"
    assert eng.num_free_pages == eng.allocator.capacity and eng.num_free_slots == 4


def pages_of(result, eng):
    """Pages a running request held when cancelled: its context + next token, on demand."""
    n = result.stats.prompt_tokens + len(result.token_ids)
    return -(-n // eng.page_size)


def test_cancel_in_buffer_and_stream_close(tiny4):
    cfg, params = tiny4
    ee = EEConfig(EE_LAYERS, EE_THR)
    prompts = _prompts(8, 2, cfg.vocab_size)
    gc = GenerationConfig(max_new_tokens=16)
    eng = Engine.from_params(cfg, params, max_slots=8, page_size=4, ee=ee, policy="rebatching", art=False)
    ids = [eng.submit(p, gc) for p in prompts]
    done = {}
    while not any(r.ee.stage > 0 for r in eng.scheduler.running):
        done.update({ev.request_id: ev.result for ev in eng.step() if ev.finished})
    victim = next(r for r in eng.scheduler.running if r.ee.stage > 0)  # waits in a ramp buffer
    assert eng.cancel(victim.id).stats.finish_reason == "cancelled"
    while eng.has_work:
        done.update({ev.request_id: ev.result for ev in eng.step() if ev.finished})
    for rid, p in zip(ids, prompts):
        if rid != victim.id:
            assert done[rid].token_ids == reference_generate(params, cfg, p, ee, 16).token_ids, f"request {rid}"
    assert eng.num_free_pages == eng.allocator.capacity and eng.num_free_slots == 8

    stream = eng.stream(prompts, gc)
    seen = [next(stream) for _ in range(10)]
    stream.close()  # the consumer walks away: its requests are cancelled
    assert len(seen) == 10 and not eng.has_work
    assert eng.num_free_pages == eng.allocator.capacity and eng.num_free_slots == 8
    again = eng.generate(prompts[:3], gc)
    for r, p in zip(again, prompts):
        assert r.token_ids == reference_generate(params, cfg, p, ee, 16).token_ids


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        import os

        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.slow  # run by .ci/run in its second (slow) pass
def test_soak_2000_requests_no_leaks(tiny4):
    """2,000 requests, random prompt/output lengths and arrivals, a pool small enough to preempt,
    and some cancellations, under rebatching: all complete and every page and slot comes back."""
    import time

    cfg, params = tiny4
    n, rng = 2000, np.random.default_rng(7)
    ee = EEConfig(EE_LAYERS, EE_THR)
    eng = Engine.from_params(cfg, params, max_slots=16, page_size=4, num_pages=60, max_seq_len=64,
                             ee=ee, policy="rebatching")
    lengths = rng.integers(1, 32, n)
    outs = rng.integers(1, 25, n)
    arrivals = np.cumsum(rng.poisson(0.6, n) == 0)  # ~0.6 steps between arrivals on average
    cancel_at = {int(i): int(rng.integers(1, 6)) for i in rng.choice(n, 60, replace=False)}
    finished, cancelled, submitted, step, t0 = {}, set(), {}, 0, time.perf_counter()
    samples = []  # (step, compiled programs, RSS bytes)
    nxt = 0
    while nxt < n or eng.has_work:
        while nxt < n and arrivals[nxt] <= step:
            prompt = [int(t) for t in rng.integers(0, cfg.vocab_size, lengths[nxt])]
            submitted[eng.submit(prompt, GenerationConfig(max_new_tokens=int(outs[nxt]), ignore_eos=True))] = nxt
            nxt += 1
        for ev in eng.step():
            if ev.finished:  # keep only what is checked, so stored results do not look like a leak
                finished[ev.request_id] = (len(ev.result.token_ids), ev.result.stats.finish_reason)
        for rid, i in list(submitted.items()):
            if i in cancel_at and rid not in finished and rid not in cancelled and step >= arrivals[i] + cancel_at[i]:
                eng.cancel(rid)
                cancelled.add(rid)
        if step % 100 == 0:
            samples.append((step, compile_counter.count(), _rss_bytes()))
        step += 1
    took = time.perf_counter() - t0
    assert len(finished) + len(cancelled) == n and not set(finished) & cancelled
    for rid, (got, reason) in finished.items():
        assert got == outs[submitted[rid]] and reason == "length"
    assert eng.num_free_pages == eng.allocator.capacity and eng.num_free_slots == 16
    assert not eng.scheduler.waiting and not eng.scheduler.running
    st = eng.ee_stats
    # RSS grows with each newly compiled (step, bucket) program, a bounded set; between
    # compilations it must stay flat
    steady = [(b[0] - a[0], b[2] - a[2]) for a, b in zip(samples, samples[1:]) if a[1] == b[1]]
    steady_steps, steady_growth = sum(s for s, _ in steady), sum(max(g, 0) for _, g in steady)
    print(f"\nsoak: {n} requests ({len(cancelled)} cancelled) in {step} steps, {took:.1f}s; "
          f"{eng.num_preemptions} preemptions, peak pages {eng.peak_pages_used}/{eng.allocator.capacity}; "
          f"exits per ramp {st.exits_per_ramp}; RSS {samples[0][2] / 2**20:.0f} -> {samples[-1][2] / 2**20:.0f} MiB "
          f"with {samples[-1][1] - samples[0][1]} compilations; over the {steady_steps} steps without "
          f"compilation RSS grew {steady_growth / 2**20:.2f} MiB")
    assert eng.num_preemptions > 0 and st.involuntary_exits == 0
    assert steady_steps > step // 2, "too few compile-free steps to judge memory"
    assert steady_growth < 4 * 2**20, f"host memory grew {steady_growth / 2**20:.1f} MiB without compiling"
