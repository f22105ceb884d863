"""Speculative sampling in verify mode (issue 28, item 3): outputs follow the full model's distribution.

- `kept_probs` is the distribution `sample` draws from (hand-computed top-k softmax, and the
  sampler's own frequencies).
- The acceptance rule alone: drafts drawn from q, verified against p, come out distributed as p
  (chi-square), while the unverified drafts do not (the test's power).
- The engine: a tiny model in verify mode drafting at its first ramp with temperature 1, top_k 4;
  the second generated token (a draft, then verified) over 1,500 seeded requests, against the full
  model's conditional distribution computed from a dense fp32 forward pass (chi-square).
"""
import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.stats import chi2

from drex_jax import Engine, GenerationConfig
from drex_jax.early_exit import EEConfig
from drex_jax.generation import SamplingParams
from drex_jax.model import forward
from drex_jax.sampling import kept_probs, sample
from drex_jax.speculative import verify_positions

P_MIN = 1e-3  # a fixed-seed test: the p-value is deterministic; a correct rule sits far above this


def _chi_square(counts: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    """Pearson's statistic and degrees of freedom of counts against probs, over bins with mass."""
    keep = probs > 0
    assert counts[~keep].sum() == 0, "a token with zero probability was produced"
    n = counts.sum()
    expected = n * probs[keep]
    return float(((counts[keep] - expected) ** 2 / expected).sum()), int(keep.sum() - 1)


def _p_value(stat: float, dof: int) -> float:
    return float(chi2.sf(stat, dof))


def _sp(n, temperature=1.0, top_k=0, top_p=1.0, seeds=None, step=0):
    seeds = np.arange(n) if seeds is None else seeds
    return SamplingParams.build([(temperature, top_k, top_p, int(s), step) for s in seeds], n)


def test_kept_probs_is_the_samplers_distribution():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 300)).astype(np.float32) * 2
    # top_k 5 at temperature 0.7, by hand
    got = np.asarray(kept_probs(jnp.asarray(logits[:1]), _sp(1, 0.7, top_k=5)))[0]
    top = np.argsort(-logits[0])[:5]
    want = np.zeros(300)
    want[top] = np.exp((logits[0, top] - logits[0, top].max()) / 0.7)
    np.testing.assert_allclose(got, want / want.sum(), rtol=1e-5, atol=1e-7)
    # greedy rows are one-hot at the argmax
    g = np.asarray(kept_probs(jnp.asarray(logits[:1]), _sp(1, 0.0)))[0]
    assert g[np.argmax(logits[0])] == 1.0 and g.sum() == 1.0
    # top_p: the sampler's frequencies over 20,000 seeds
    n = 20_000
    row = np.repeat(logits[1:2], n, 0)
    sp = _sp(n, 1.0, top_p=0.6)
    probs = np.asarray(kept_probs(jnp.asarray(row[:1]), _sp(1, 1.0, top_p=0.6)))[0]
    counts = np.bincount(np.asarray(sample(jnp.asarray(row), sp, True)), minlength=300)
    assert _p_value(*_chi_square(counts, probs)) > P_MIN
    assert (probs > 0).sum() < 300  # the nucleus really truncated


def test_acceptance_rule_gives_the_target_distribution():
    rng = np.random.default_rng(1)
    V, n = 12, 40_000
    p_logits = rng.normal(size=V).astype(np.float32) * 1.5
    q = rng.dirichlet(np.ones(V) * 0.7).astype(np.float32)  # the draft's distribution, far from p
    p = np.asarray(kept_probs(jnp.asarray(p_logits[None]), _sp(1)))[0]
    drafts = rng.choice(V, size=n, p=q / q.sum()).astype(np.int32)
    out = np.asarray(verify_positions(jnp.asarray(np.repeat(p_logits[None], n, 0)), _sp(n, step=5),
                                      jnp.asarray(drafts), jnp.asarray(np.repeat(q[None], n, 0))))
    assert _p_value(*_chi_square(np.bincount(out, minlength=V), p)) > P_MIN
    # power: the drafts themselves are rejected by the same test
    assert _p_value(*_chi_square(np.bincount(drafts, minlength=V), p)) < 1e-12
    # acceptance happens at the theoretical rate sum(min(p, q)) (drafts kept where out == draft,
    # plus the rare replacement that draws the draft again: impossible, its residual mass is 0)
    rate = np.mean(out == drafts)
    assert abs(rate - np.minimum(p, q / q.sum()).sum()) < 0.01
    # no draft: a plain draw from p; greedy rows: the argmax whatever the draft
    none = np.asarray(verify_positions(jnp.asarray(np.repeat(p_logits[None], n, 0)), _sp(n, step=6),
                                       jnp.full(n, -1, jnp.int32), jnp.zeros((n, V))))
    assert _p_value(*_chi_square(np.bincount(none, minlength=V), p)) > P_MIN
    greedy = np.asarray(verify_positions(jnp.asarray(np.repeat(p_logits[None], V, 0)), _sp(V, 0.0),
                                         jnp.arange(V, dtype=jnp.int32), jnp.eye(V)))
    assert (greedy == np.argmax(p_logits)).all()


def _full_model_conditionals(cfg, params, prompt, top_k, temperature):
    """p(t1 | prompt) and p(t2 | prompt, t1) for each kept t1, from the dense forward pass by hand."""
    def kept(logits):
        top = np.argsort(-logits)[:top_k]
        w = np.zeros_like(logits, dtype=np.float64)
        w[top] = np.exp((logits[top] - logits[top].max()) / temperature)
        return w / w.sum()

    width = 16
    ids = np.zeros((1, width), np.int32)
    ids[0, :len(prompt)] = prompt
    p1 = kept(np.asarray(forward(params, cfg, ids))[0, len(prompt) - 1])
    p2 = {}
    for t1 in np.flatnonzero(p1):
        ids[0, len(prompt)] = t1
        p2[int(t1)] = kept(np.asarray(forward(params, cfg, ids))[0, len(prompt)])
    return p1, p2


def test_verify_mode_samples_from_the_full_model(tiny4):
    cfg, params = tiny4
    prompt, top_k, temperature, n = [7, 3, 11, 5], 4, 1.0, 1500
    p1, p2 = _full_model_conditionals(cfg, params, prompt, top_k, temperature)
    # every token drafts at the first ramp (threshold 0), the shared head there disagrees with the
    # full model often: drafts are both accepted and replaced
    ee = EEConfig((1, 2, 3), 0.0, missing_kv="recompute", verify=True, max_draft=4)
    eng = Engine.from_params(cfg, params, max_slots=32, page_size=4, max_seq_len=16, ee=ee, policy="rebatching",
                             art=False)
    configs = [GenerationConfig(max_new_tokens=3, temperature=temperature, top_k=top_k, seed=s) for s in range(n)]
    ids = [eng.submit(prompt, c) for c in configs]
    results = {}
    while len(results) < n:
        for ev in eng.step():
            if ev.finished:
                results[ev.request_id] = ev.result.token_ids
    tokens = np.array([results[i] for i in ids])
    st = eng.ee_stats
    assert sum(st.checked_per_ramp) > 1000 and 0 < sum(st.accepted_per_ramp) < sum(st.checked_per_ramp)
    stat, dof = _chi_square(np.bincount(tokens[:, 0], minlength=cfg.vocab_size), p1)
    for t1, p in p2.items():  # the second token, drafted then verified, given the first
        s, d = _chi_square(np.bincount(tokens[tokens[:, 0] == t1, 1], minlength=cfg.vocab_size), p)
        stat, dof = stat + s, dof + d
    assert _p_value(stat, dof) > P_MIN, (stat, dof)
    # seeded requests are reproducible
    again = eng.generate([prompt] * 8, configs[0])
    assert all(r.token_ids == results[ids[0]] for r in again)
