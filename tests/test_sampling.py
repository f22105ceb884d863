"""`drex_jax.sampling` against an exact reference computed here in numpy (float64, stable sort).

Two kinds of check: `sample_at` at G evenly spaced uniforms (an inverse CDF: each token's frequency
is then within 1/G of its probability, deterministically), and `sample` over many seeds (chi-square).
Cases reach every path: candidates only (kept set <= K = 64), bisection (nucleus or top_k > K), the
tie groups larger than K cut at the boundary (the tie count c), the two-level top_k (V = 49152).
"""
import numpy as np
import pytest
from scipy.stats import chisquare

import jax
import jax.numpy as jnp

from drex_jax.generation import SamplingParams
from drex_jax.sampling import K, column_argmax, sample, sample_at

_sample_at = jax.jit(sample_at)
_sample = jax.jit(sample, static_argnums=2)


def reference(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """The exact distribution [V]: softmax(logits / T) over the stable descending order, kept while
    rank < top_k and the mass strictly above < top_p (the first token always), renormalised."""
    V = len(logits)
    if temperature == 0:
        return np.eye(V)[np.argmax(logits)]
    s = logits.astype(np.float64) / temperature
    order = np.argsort(-s, kind="stable")
    probs = np.exp(s[order] - s[order[0]])
    probs /= probs.sum()
    rank = np.arange(V)
    keep = (rank < (top_k if 0 < top_k < V else V)) & ((np.cumsum(probs) - probs < top_p) | (rank == 0))
    out = np.zeros(V)
    out[order[keep]] = probs[keep]
    return out / out.sum()


def quantile_freqs(logits, temperature, top_k, top_p, G, chunk=4096):
    """Token frequencies of `sample_at` at the G uniforms (i + 0.5) / G, `chunk` rows per call."""
    V, toks = len(logits), []
    for u in np.split((np.arange(G) + 0.5) / G, max(1, G // chunk)):
        sp = SamplingParams.build([(temperature, top_k, top_p, 0, 0)] * len(u), len(u))
        toks.append(np.asarray(_sample_at(jnp.broadcast_to(jnp.asarray(logits), (len(u), V)), sp,
                                          jnp.asarray(u, jnp.float32))))
    return np.bincount(np.concatenate(toks), minlength=V) / G


def assert_distribution(logits, temperature, top_k, top_p, G=4096, chunk=4096):
    ref = reference(logits, temperature, top_k, top_p)
    freq = quantile_freqs(logits, temperature, top_k, top_p, G, chunk)
    assert freq[ref == 0].sum() == 0, "sampled a token outside the kept set"
    np.testing.assert_allclose(freq, ref, atol=1.5 / G, rtol=1e-4)
    return ref


RNG = np.random.default_rng(0)
SMALL = np.log(np.array([0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.02], np.float32))
NORMAL_1K = (RNG.normal(size=1000) * 2).astype(np.float32)


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (1.0, 0, 1.0), (0.5, 0, 1.0), (2.0, 0, 1.0), (1.0, 3, 1.0), (1.0, 0, 0.7), (1.0, 0, 0.65),
    (0.7, 4, 0.8), (1.0, 1, 1.0), (1.0, 0, 1e-6),
])
def test_small_vocab_matches_reference(temperature, top_k, top_p):
    assert_distribution(SMALL, temperature, top_k, top_p)


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (0.7, 0, 0.9),  # nucleus of ~90 > K: bisection
    (1.5, 0, 0.95),  # ~640
    (1.0, 200, 1.0),  # top_k > K: bisection on the count
    (0.5, 100, 0.8), (1.0, 50, 1.0), (1.0, 0, 0.5),  # candidates only
])
def test_beyond_the_candidates_matches_reference(temperature, top_k, top_p):
    ref = assert_distribution(NORMAL_1K, temperature, top_k, top_p)
    assert (ref > 0).sum() > K or (temperature, top_k, top_p) in [(0.5, 100, 0.8), (1.0, 50, 1.0), (1.0, 0, 0.5)]


def test_ties_at_the_boundary_keep_the_lowest_ids():
    """A stable sort keeps the lowest ids of a tie group cut by top_k / top_p."""
    logits = RNG.normal(size=500).astype(np.float32)
    logits[RNG.choice(500, 10, replace=False)] = logits.max() + 1  # 10 ties, inside the candidates
    for top_k, top_p in [(4, 1.0), (0, 0.3)]:
        assert 0 < (assert_distribution(logits, 1.0, top_k, top_p) > 0).sum() < 10
    logits = np.zeros(500, np.float32)
    logits[:5] = 3.0
    logits[RNG.permutation(np.arange(5, 500))[:200]] = 1.0  # 200 > K ties cut by the boundary: tau and a tie count
    for top_k, top_p in [(0, 0.5), (100, 1.0)]:
        ref = assert_distribution(logits, 1.0, top_k, top_p)
        assert 5 + K < (ref > 0).sum() < 205


def test_masked_tokens_are_never_sampled():
    logits = RNG.normal(size=300).astype(np.float32)
    logits[::3] = -np.inf
    for top_k, top_p in [(0, 1.0), (0, 0.99), (250, 1.0)]:
        assert_distribution(logits, 1.0, top_k, top_p)


def test_full_vocabulary_matches_reference():
    """V = 49152: the two-level top_k, and nuclei of thousands of tokens (bisection)."""
    logits = (RNG.normal(size=49152) * 2).astype(np.float32)
    for temperature, top_k, top_p in [(1.0, 0, 1.0), (1.0, 50, 1.0), (0.7, 0, 0.9), (1.0, 1000, 1.0)]:
        ref = assert_distribution(logits, temperature, top_k, top_p, G=2048, chunk=512)
    assert (ref > 0).sum() == 1000
    assert (reference(logits, 0.7, 0, 0.9) > 0).sum() > 1000
    ties = np.round(logits, 1)  # many ties: the two-level top_k must still break them by id
    assert_distribution(ties, 1.0, 50, 1.0, G=2048, chunk=512)


@pytest.mark.parametrize("logits, top_k, top_p, bins", [
    (SMALL, 0, 1.0, None), (SMALL, 0, 0.7, None), (SMALL, 3, 1.0, None),
    (NORMAL_1K, 0, 0.95, 12),  # bisection path, its ~300 tokens in 12 bins of about equal mass
])
def test_seeded_frequencies_pass_chi_square(logits, top_k, top_p, bins):
    n = 8000
    ref = reference(logits, 1.0, top_k, top_p)
    sp = SamplingParams.build([(1.0, top_k, top_p, seed, seed % 7) for seed in range(n)], n)
    toks = np.asarray(_sample(jnp.broadcast_to(jnp.asarray(logits), (n, len(logits))), sp, True))
    assert ref[toks].min() > 0
    observed, expected = np.bincount(toks, minlength=len(ref)), ref * n
    if bins:  # group tokens by cumulative probability so every bin expects ~n / bins samples
        group = np.minimum((np.cumsum(ref) - ref / 2) * bins, bins - 1).astype(int)
        observed, expected = np.bincount(group, observed, bins), np.bincount(group, expected, bins)
    keep = expected > 0
    assert chisquare(observed[keep], expected[keep]).pvalue > 1e-3


def test_seed_and_step_determine_the_token():
    """Same (seed, step, logits) -> same token, whatever the row's position and the other rows."""
    logits = jnp.asarray(np.stack([NORMAL_1K] * 8))
    rows = [(1.0, 0, 1.0, 11, 3), (0.7, 0, 0.9, 12, 3), (1.0, 50, 1.0, 13, 3), (1.0, 0, 1.0, 14, 5)]
    a = np.asarray(_sample(logits, SamplingParams.build(rows * 2, 8), True))
    b = np.asarray(_sample(logits, SamplingParams.build(rows[::-1] * 2, 8), True))
    np.testing.assert_array_equal(a[:4], a[4:])
    np.testing.assert_array_equal(a[:4], b[:4][::-1])
    alone = [int(_sample(logits[:1], SamplingParams.build([r], 1), True)[0]) for r in rows]
    assert alone == list(a[:4])
    steps = np.asarray(_sample(logits, SamplingParams.build([(1.0, 0, 1.0, 11, s) for s in range(8)], 8), True))
    assert len(set(steps.tolist())) > 1  # fresh randomness per step


def test_greedy_rows_take_the_first_maximum():
    logits = RNG.normal(size=(4, 49152)).astype(np.float32)
    logits[1, [7, 900, 40000]] = logits[1].max() + 1  # ties: the lowest id
    logits[2, -1] = logits[2].max() + 1  # the last id
    rows = [(0.0, 0, 1.0, 1, 0), (0.0, 0, 1.0, 2, 0), (0.0, 0, 1.0, 3, 0), (1.0, 0, 0.9, 4, 0)]
    got = np.asarray(_sample(jnp.asarray(logits), SamplingParams.build(rows, 4), True))
    np.testing.assert_array_equal(got[:3], np.argmax(logits[:3], -1))
    assert got[1] == 7 and got[2] == 49151
    np.testing.assert_array_equal(np.asarray(_sample(jnp.asarray(logits), SamplingParams.build(rows, 4), False)),
                                  np.argmax(logits, -1))


@pytest.mark.parametrize("V", [1, 255, 1000, 49152])
@pytest.mark.parametrize("B", [1, 5])  # one row: XLA's argmax; more: the blocked one
def test_all_greedy_batches_take_the_first_maximum(V, B):
    """The all-greedy step's argmax (a vocabulary that fills no whole block, ties in different
    blocks, a row of -inf but one token, a row of equal tokens) equals numpy's."""
    logits = RNG.normal(size=(5, V)).astype(np.float32)
    logits[1, [0, V // 2, V - 1]] = logits[1].max() + 1
    logits[2, -1] = logits[2].max() + 1
    logits[3] = -np.inf
    logits[3, V // 3] = 0.0
    logits[4] = 1.0  # every token equal: the first
    for first in range(0, 5, B):
        part = logits[first:first + B]
        rows = [(0.0, 0, 1.0, i, 0) for i in range(len(part))]
        got = np.asarray(_sample(jnp.asarray(part), SamplingParams.build(rows, len(part)), False))
        np.testing.assert_array_equal(got, np.argmax(part, -1))


@pytest.mark.parametrize("V", [1, 300, 49152])
@pytest.mark.parametrize("B", [1, 6])
def test_column_argmax_takes_the_first_maximum(V, B):
    """The greedy decode's argmax over the LM head's [V, B] product (block maxima, the vocabulary
    padded to whole blocks) equals numpy's: ties in different blocks, -inf columns but one token,
    a column of equal tokens."""
    logits = RNG.normal(size=(V, 6)).astype(np.float32)
    logits[[0, V // 2, V - 1], 1] = logits[:, 1].max() + 1
    logits[-1, 2] = logits[:, 2].max() + 1
    logits[:, 3] = -np.inf
    logits[V // 3, 3] = 0.0
    logits[:, 4] = 1.0
    for first in range(0, 6, B):
        part = logits[:, first:first + B]
        np.testing.assert_array_equal(np.asarray(jax.jit(column_argmax)(jnp.asarray(part))), np.argmax(part, 0))
