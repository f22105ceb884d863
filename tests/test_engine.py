"""Continuous batching on a tiny random model against an unbatched cache-free reference."""
import os

import jax.numpy as jnp
import numpy as np
import pytest

from drex_jax import Engine, GenerationConfig
from drex_jax import compile_counter
from tests.reference import greedy_reference
from tests.serving import serve_with_arrivals


def _prompts(n, seed=0, vocab=101, max_len=40):
    rng = np.random.default_rng(seed)
    return [list(rng.integers(0, vocab, size=rng.integers(1, max_len))) for _ in range(n)]


def _run_with_arrivals(engine, prompts, configs, every=3):
    return {i: r.token_ids for i, r in serve_with_arrivals(engine, prompts, configs, every=every).items()}


def test_greedy_matches_unbatched_reference_with_arrivals(tiny_llama):
    cfg, params = tiny_llama
    engine = Engine.from_params(cfg, params, max_slots=4, page_size=4)
    prompts = _prompts(10)
    configs = [GenerationConfig(max_new_tokens=int(n)) for n in np.random.default_rng(1).integers(1, 24, 10)]
    got = _run_with_arrivals(engine, prompts, configs)
    for i, p in enumerate(prompts):
        assert got[i] == greedy_reference(params, cfg, p, configs[i].max_new_tokens), f"request {i}"
    assert engine.num_free_pages == engine.allocator.capacity and engine.num_free_slots == 4


@pytest.mark.parametrize("attention", ["xla", "ffi"])
def test_chunked_prefill_matches_unbatched_reference(tiny_llama, attention):
    """Prompts longer than a step's prefill budget (16 tokens; 6 while others decode) are cut and
    prefilled over several steps through the pool, interleaved with decode: same greedy tokens
    as the unbatched reference."""
    cfg, params = tiny_llama
    engine = Engine.from_params(cfg, params, max_slots=4, page_size=4, attention=attention,
                                max_prefill_tokens_per_step=16, max_prefill_tokens_while_decoding=6)
    prompts = _prompts(8, seed=11)
    configs = [GenerationConfig(max_new_tokens=int(n)) for n in np.random.default_rng(2).integers(1, 16, 8)]
    chunks = 0
    step = engine.scheduler.schedule

    def counting_schedule():
        nonlocal chunks
        plan = step()
        chunks += plan.chunk is not None
        return plan

    engine.scheduler.schedule = counting_schedule
    got = _run_with_arrivals(engine, prompts, configs)
    assert chunks > 3, "the budgets were meant to cut prompts into chunks"
    for i, p in enumerate(prompts):
        assert got[i] == greedy_reference(params, cfg, p, configs[i].max_new_tokens), f"request {i}"
    assert engine.num_free_pages == engine.allocator.capacity and engine.num_free_slots == 4


def test_output_independent_of_batch_mates(tiny_llama):
    cfg, params = tiny_llama
    target = _prompts(1, seed=5)[0]
    cfg16 = GenerationConfig(max_new_tokens=16)
    alone = Engine.from_params(cfg, params, max_slots=8, page_size=4).generate([target], cfg16)[0].token_ids
    crowd = Engine.from_params(cfg, params, max_slots=8, page_size=4).generate(
        _prompts(5, seed=6) + [target] + _prompts(3, seed=7), cfg16)[5].token_ids
    assert alone == crowd


def test_waits_for_pages_when_pool_is_small(tiny_llama):
    cfg, params = tiny_llama
    prompts = _prompts(6, seed=3)
    c = GenerationConfig(max_new_tokens=12)
    # 13 usable pages of 4 tokens: at most ~2 requests fit at once, the rest wait
    small = Engine.from_params(cfg, params, max_slots=6, page_size=4, num_pages=14)
    ids = [small.submit(p, c) for p in prompts]
    small.step()
    assert small.num_waiting > 0, "the small pool should make some requests wait"
    res = {}
    while small.has_work:
        for ev in small.step():
            if ev.finished:
                res[ev.request_id] = ev.result.token_ids
    for rid, p in zip(ids, prompts):
        assert res[rid] == greedy_reference(params, cfg, p, 12)
    assert small.num_free_pages == 13


@pytest.mark.parametrize("budgets", [{}, {"max_prefill_tokens_per_step": 16, "max_prefill_tokens_while_decoding": 8},
                                     {"overlap": True}])
def test_steady_state_compiles_nothing(tiny_llama, budgets):
    """After warmup() nothing compiles, with the default budgets, with budgets small enough to
    chunk prompts, and with a step kept in flight (its device tokens fed to the next)."""
    cfg, params = tiny_llama
    engine = Engine.from_params(cfg, params, max_slots=4, page_size=8, max_seq_len=32, **budgets)
    c = GenerationConfig(max_new_tokens=12)
    engine.warmup()  # every prompt bucket and every (decode batch, page width) bucket
    before = compile_counter.count()
    for seed in range(3):  # a steady stream of new requests with new lengths
        _run_with_arrivals(engine, _prompts(8, seed=20 + seed, max_len=20), [c] * 8, every=2)
    assert compile_counter.count() == before
    # sanity: the counter does see compilations (another engine config = new shapes)
    other = Engine.from_params(cfg, params, max_slots=2, page_size=4, max_seq_len=24,
                               num_pages=17 + len(budgets) + 2 * ("overlap" in budgets))
    other.generate([[1, 2, 3]], GenerationConfig(max_new_tokens=3))
    assert compile_counter.count() > before


def test_sampling_rules(tiny_llama):
    cfg, params = tiny_llama
    engine = Engine.from_params(cfg, params, max_slots=4, page_size=4)
    p = _prompts(1, seed=9)
    greedy = engine.generate(p, GenerationConfig(max_new_tokens=10))[0].token_ids
    # top_k=1 and a tiny top_p keep only the argmax, whatever the temperature
    assert engine.generate(p, GenerationConfig(max_new_tokens=10, temperature=2.0, top_k=1))[0].token_ids == greedy
    assert engine.generate(p, GenerationConfig(max_new_tokens=10, temperature=2.0, top_p=1e-6))[0].token_ids == greedy
    hot = GenerationConfig(max_new_tokens=10, temperature=5.0, seed=123)
    a = engine.generate(p, hot)[0].token_ids
    b = engine.generate(p, hot)[0].token_ids
    c = engine.generate(p, GenerationConfig(max_new_tokens=10, temperature=5.0, seed=124))[0].token_ids
    assert a == b and a != c  # seeded; different seed differs (10 tokens at T=5 over 101 ids)


def test_sampling_distribution_matches_softmax():
    """top-k/top-p sampling frequencies vs hand-computed renormalized probabilities."""
    import jax.numpy as jnp

    from drex_jax.sampling import SamplingParams, sample

    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]], jnp.float32))
    n = 4000
    rows = [(1.0, 0, 0.7, 7, i) for i in range(n)]  # top_p=0.7 keeps {0.5, 0.3}
    toks = np.asarray(sample(jnp.repeat(logits, n, 0), SamplingParams.build(rows, n), True))
    freq = np.bincount(toks, minlength=4) / n
    np.testing.assert_allclose(freq, [0.625, 0.375, 0, 0], atol=0.03)
    rows = [(1.0, 3, 1.0, 7, i) for i in range(n)]  # top_k=3
    toks = np.asarray(sample(jnp.repeat(logits, n, 0), SamplingParams.build(rows, n), True))
    np.testing.assert_allclose(np.bincount(toks, minlength=4) / n, np.array([0.5, 0.3, 0.15, 0]) / 0.95,
                               atol=0.03)


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(temperature=-0.5), "temperature"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), "top_p"),
    (dict(stop=[3]), "stop"),
    (dict(stop=b"x"), "stop"),
])
def test_bad_generation_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GenerationConfig(**kwargs)


def test_bad_requests_leave_others_untouched(tiny_llama):
    cfg, params = tiny_llama
    engine = Engine.from_params(cfg, params, max_slots=4, page_size=4, max_seq_len=64)
    good = _prompts(3, seed=4)
    c = GenerationConfig(max_new_tokens=8)
    ids = [engine.submit(p, c) for p in good]
    engine.step()
    with pytest.raises(ValueError, match="empty"):
        engine.submit([], c)
    with pytest.raises(ValueError, match=r"exceeds the context limit max_seq_len=64"):
        engine.submit(list(range(60)), c)
    with pytest.raises(ValueError, match=r"token ids must be ints in \[0, 101\)"):
        engine.submit([5, 1000], c)
    with pytest.raises(ValueError, match="GenerationConfig"):
        engine.submit([5], {"max_new_tokens": 3})
    res = {}
    while engine.has_work:
        for ev in engine.step():
            if ev.finished:
                res[ev.request_id] = ev.result.token_ids
    assert sorted(res) == ids
    for rid, p in zip(ids, good):
        assert res[rid] == greedy_reference(params, cfg, p, 8)


def test_bfloat16_engine_tracks_fp32(tiny_llama):
    """bf16 params and KV: logits of the decoder stay close to fp32 and generation runs."""
    import jax.numpy as jnp

    from drex_jax.model import forward
    from drex_jax.model.params import cast_params

    cfg, params = tiny_llama
    toks = np.arange(20)[None] % cfg.vocab_size
    f32 = np.asarray(forward(params, cfg, toks))
    bf16 = np.asarray(forward(cast_params(params, jnp.bfloat16), cfg, toks))
    assert np.abs(bf16 - f32).max() < 0.1 * np.abs(f32).max()
    engine = Engine.from_params(cfg, params, dtype="bfloat16", max_slots=2, page_size=4, max_seq_len=64)
    assert engine.pool["k"].dtype == jnp.bfloat16
    res = engine.generate(_prompts(2, seed=1, max_len=10), GenerationConfig(max_new_tokens=6))
    assert all(len(r.token_ids) == 6 for r in res)


@pytest.mark.parametrize("setting,expect", [("", "xla-cache"), ("off", None)])
def test_engines_turn_on_the_persistent_compile_cache(tmp_path, setting, expect):
    """A fresh process: an Engine puts XLA's compilation cache under DREX_JAX_CACHE unless told not
    to (DREX_JAX_COMPILE_CACHE=off); a directory the process configured itself is kept."""
    import subprocess
    import sys

    code = ("import jax; from drex_jax import compile_cache; print(compile_cache.enable()); "
            "print(jax.config.jax_compilation_cache_dir)")
    env = {**os.environ, "DREX_JAX_CACHE": str(tmp_path), "DREX_JAX_COMPILE_CACHE": setting, "JAX_PLATFORMS": "cpu"}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    used, configured = out.split()
    if expect is None:
        assert used == "None" and configured == "None"
    else:
        assert used == configured == str(tmp_path / expect) and (tmp_path / expect).is_dir()
    kept = subprocess.run([sys.executable, "-c", "import jax; jax.config.update('jax_compilation_cache_dir', "
                           f"'{tmp_path}/mine'); " + code], env=env, capture_output=True, text=True, check=True)
    assert kept.stdout.split() == [f"{tmp_path}/mine"] * 2


def test_pool_follows_free_device_memory(tiny_llama, monkeypatch):
    """Where the device reports its free memory (a GPU), the default pool takes at most
    kv_memory_fraction of it, and too little for one sequence is a clear error; a CPU reports
    nothing and keeps the default (1 + slots x pages per sequence)."""
    from drex_jax import engine as engine_mod
    from drex_jax.kv.pool import page_bytes

    cfg, params = tiny_llama
    per_page = page_bytes(cfg, 4, jnp.float32)
    assert Engine.from_params(cfg, params, max_slots=4, page_size=4, max_seq_len=64).scheduler.allocator.num_pages \
        == 1 + 4 * 16
    monkeypatch.setattr(engine_mod, "free_device_bytes", lambda devices: 40 * per_page)
    eng = Engine.from_params(cfg, params, max_slots=4, page_size=4, max_seq_len=64, kv_memory_fraction=0.5)
    assert eng.scheduler.allocator.num_pages == 20
    with pytest.raises(ValueError, match="fewer than one 64-token sequence"):
        Engine.from_params(cfg, params, max_slots=4, page_size=4, max_seq_len=64, kv_memory_fraction=0.25)
    with pytest.raises(ValueError, match="kv_memory_fraction must be in"):
        Engine.from_params(cfg, params, kv_memory_fraction=1.5)


@pytest.mark.parametrize("attention", ["auto", "xla"])  # xla: bucketed widths, so a step may need a wider table
def test_overlapped_steps_give_the_same_tokens(tiny_llama, attention):
    """Steady decode keeps one step in flight (its tokens fed on the device); arrivals, different
    lengths, sampled rows with seeds and a cancellation mid-stream give what the synchronous loop
    gives: greedy rows the unbatched reference's tokens, sampled rows the same tokens as with
    overlap off, the cancelled request a prefix of its reference."""
    cfg, params = tiny_llama
    prompts = _prompts(9, seed=7, max_len=30)
    configs = [GenerationConfig(max_new_tokens=6 + 3 * (i % 4)) if i % 3 else
               GenerationConfig(max_new_tokens=10, temperature=0.9, top_k=20, seed=i) for i in range(9)]
    configs[1] = GenerationConfig(max_new_tokens=30)  # cancelled before it ends
    out, overlapped = {}, {}
    for overlap in (False, True):
        eng = Engine.from_params(cfg, params, max_slots=4, page_size=4, overlap=overlap, attention=attention)
        assert eng.overlap == overlap
        ids, res, steps, flying = {}, {}, 0, 0
        queue = list(enumerate(prompts))
        while queue or eng.has_work:
            if steps % 4 == 0 and queue:
                for _ in range(2):
                    if queue:
                        i, p = queue.pop(0)
                        ids[eng.submit(p, configs[i])] = i
            if steps == 8:  # request 1 (greedy) is running by now
                rid = next(r for r, i in ids.items() if i == 1)
                res[1] = eng.cancel(rid)
            for ev in eng.step():
                if ev.finished and ids[ev.request_id] != 1:
                    res[ids[ev.request_id]] = ev.result
            flying += eng._inflight is not None
            steps += 1
        out[overlap], overlapped[overlap] = res, flying
        # every page and slot came back (pages taken for a step in flight included)
        assert eng.scheduler.allocator.num_free == eng.scheduler.allocator.capacity
        assert eng.scheduler.num_free_slots == 4
    assert overlapped[False] == 0 and overlapped[True] > 10  # overlap did run
    for i, p in enumerate(prompts):
        if i == 1:
            ref = greedy_reference(params, cfg, p, configs[1].max_new_tokens)
            for o in (False, True):
                got = out[o][1].token_ids
                assert out[o][1].stats.finish_reason == "cancelled" and 0 < len(got) < 30 and got == ref[:len(got)]
        elif configs[i].temperature == 0:
            assert out[True][i].token_ids == greedy_reference(params, cfg, p, configs[i].max_new_tokens), i
        else:
            assert out[True][i].token_ids == out[False][i].token_ids, i
