"""Per-row sampling inside the jitted step (greedy, temperature, top-k, top-p).

Per-request settings travel as arrays so changing them never recompiles; only
`do_sample` (any row sampling at all) is static, so all-greedy batches skip all of this.

No sort: an argsort of 49k logits costs ~20 ms a row on CPU. A row's kept set (top-k and nucleus
over the stable descending order, ties by lower id) is always "every token above a value tau, plus
the first c tokens equal to tau by id"; untruncated rows have tau = -inf. Each row draws ONE
uniform and inverts the CDF of its kept tokens in vocabulary order, two-level (block sums, then one
block). tau and c come from `lax.top_k`'s K candidates (masses normalised by the whole vocabulary's
sum), exact when the kept prefix ends inside them; a longer prefix bisects on the value until at
most K tokens lie between the bounds (or all of those are tied), then reads tau and c off the next K
tokens (or the tie). Few XLA kernels on purpose: each costs compile time and memory mappings in
every sampled program the engine warms up (vm.max_map_count), so counts are float sums, firsts are
float mins, cumsums are triangular matmuls and the random stream an unrolled Threefry.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from drex_jax.generation import SamplingParams

K = 64  # candidates per row: covers top_k <= 64 and most nuclei
BLOCK = 256  # vocabulary block of the inverse CDF and the argmax: 192 blocks for a 49k vocabulary
TOP_BLOCK = 64  # block of the two-level top_k: K of them hold the K largest values
MAX_BISECT = 512  # a guard only: float32 bisection ends at adjacent values well before


def _cumsum(x: jax.Array) -> jax.Array:
    """Inclusive cumsum over the last axis of x [..., n] as a triangular matmul (two levels past
    BLOCK): one kernel, where XLA's cumsum is a tree of reduce-windows."""
    def tri(a, m):  # a [..., m] @ upper-triangular ones
        return jnp.matmul(a, np.triu(np.ones((m, m), np.float32)), precision=lax.Precision.HIGHEST)

    n = x.shape[-1]
    if n <= BLOCK:
        return tri(x, n)
    g = -(-n // BLOCK)
    inner = tri(jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, g * BLOCK - n)]).reshape(*x.shape[:-1], g, BLOCK), BLOCK)
    ends = inner[..., -1]
    return (inner + (tri(ends, g) - ends)[..., None]).reshape(*x.shape[:-1], g * BLOCK)[..., :n]


def _pick(x: jax.Array, j: jax.Array) -> jax.Array:
    """x[b, j[b]] for x [B, N, M], j [B] -> [B, M]."""
    return jnp.take_along_axis(x, j[:, None, None], 1)[:, 0]


def _first(mask: jax.Array) -> jax.Array:
    """The first True along the last axis of mask [B, n] as f32 [B] (n when none)."""
    n = mask.shape[-1]
    return jnp.min(jnp.where(mask, jnp.arange(n, dtype=jnp.float32), n), -1)


def _top_values(xb: jax.Array, f, n: int) -> jax.Array:
    """The n largest values [B, n] (descending) of f(xb) for xb [B, nb, TOP_BLOCK] and f elementwise:
    they lie in the n blocks of largest maxima, so lax.top_k runs on those only (half the cost of a
    top_k over [B, V] on CPU). f is applied to the gathered blocks again rather than gathering from
    f(xb), which XLA would then materialise as a [B, V] temporary."""
    B, nb, _ = xb.shape
    if nb <= 4 * n:
        return lax.top_k(f(xb).reshape(B, -1), n)[0]
    blk = lax.top_k(f(xb).max(-1), n)[1]  # [B, n]
    return lax.top_k(f(jnp.take_along_axis(xb, blk[:, :, None], 1)).reshape(B, -1), n)[0]


def _sum(*xs: jax.Array) -> tuple:
    """Sums over the last axis of each x, as one variadic reduce: XLA:CPU fuses its inputs into it
    (a sum each materialises its input first, and is its own kernels)."""
    return lax.reduce(xs, (0.0,) * len(xs), lambda a, b: tuple(map(jnp.add, a, b)), (xs[0].ndim - 1,))


def _first_above(cum: jax.Array, w: jax.Array, r: jax.Array) -> jax.Array:
    """The first index with weight w > 0 and cumulative weight cum > r, else the last w > 0 (r at
    the total's rounding): a zero-weight token is never chosen. cum, w [B, n], r [B] -> [B] int32.
    One min-reduction: hits score their index, other positive weights 2n - index."""
    n = w.shape[-1]
    i = jnp.arange(n, dtype=jnp.float32)
    score = jnp.min(jnp.where(w > 0, jnp.where(cum > r[:, None], i, 2 * n - i), 3 * n), -1)
    return jnp.clip(jnp.where(score < n, score, 2 * n - score), 0, n - 1).astype(jnp.int32)


def _threefry(k1, k2, x1, x2):
    """Threefry-2x32 (20 rounds) on uint32 arrays, unrolled: one fused kernel (jax.random's own
    lowering on CPU is a rolled loop: ~25 kernels for a fold_in and a uniform)."""
    ks = (k1, k2, k1 ^ k2 ^ np.uint32(0x1BD11BDA))
    x = [x1 + ks[0], x2 + ks[1]]
    for i in range(5):
        for r in ((13, 15, 26, 6), (17, 29, 16, 24))[i % 2]:
            x[0] = x[0] + x[1]
            x[1] = ((x[1] << np.uint32(r)) | (x[1] >> np.uint32(32 - r))) ^ x[0]
        x[0], x[1] = x[0] + ks[(i + 1) % 3], x[1] + ks[(i + 2) % 3] + np.uint32(i + 1)
    return x


def _uniform(seed: jax.Array, step: jax.Array) -> jax.Array:
    """jax.random.uniform(jax.random.fold_in(jax.random.key(seed), step)) for seed, step [B],
    bit for bit (the random stream of the sorting sampler this replaced)."""
    zero = jnp.zeros_like(seed)
    bits = jnp.bitwise_xor(*_threefry(*_threefry(zero, seed, zero, step.astype(jnp.uint32)), zero, zero))
    return lax.bitcast_convert_type((bits >> np.uint32(9)) | np.uint32(0x3F800000), jnp.float32) - 1


def sample(logits: jax.Array, sp: SamplingParams, do_sample: bool) -> jax.Array:
    """logits [B, V] f32 -> tokens [B] int32. Rows with temperature 0 take the argmax; others sample
    softmax(logits / temperature) restricted to the top_k (0 = off) highest tokens and to the
    nucleus (the highest tokens while the mass above them is < top_p; the top one always), in the
    stable descending order, randomised by (seed, step) only."""
    if not do_sample:  # one row: XLA's argmax fuses behind the LM head's product and is cheaper
        return jnp.argmax(logits, -1).astype(jnp.int32) if logits.shape[0] == 1 else _block_argmax(*_blocks(logits))
    return sample_at(logits, sp, _uniform(jnp.asarray(sp.seed, jnp.uint32), jnp.asarray(sp.step)))


def _blocks(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """logits [B, V] -> (lb [B, nb, BLOCK] the logits in blocks, padded with -inf; bm [B, nb] the
    block maxima). Later passes read these blocks, not `logits`: one row-major copy when the logits
    come transposed (the LM head's [V, B] product), rather than every pass striding through them."""
    B, V = logits.shape
    nb = -(-V // BLOCK)
    lb = jnp.pad(logits, ((0, 0), (0, nb * BLOCK - V)), constant_values=-jnp.inf).reshape(B, nb, BLOCK)
    lb = lax.optimization_barrier(lb)
    return lb, lb.max(-1)


def _block_argmax(lb: jax.Array, bm: jax.Array) -> jax.Array:
    """The argmax of each row (the first of equal maxima) from its blocks -> [B] int32. XLA:CPU's
    argmax over [B, V] costs ~5x a max: behind SmolLM2's LM head product it adds 2.7-4.5 ms at
    B = 8-64 against 2.0-2.5 ms this way (`benchmarks/greedy_argmax.py`)."""
    jg = jnp.argmax(bm, -1)  # the first block holding the maximum
    return (jg * BLOCK + jnp.argmax(_pick(lb, jg), -1)).astype(jnp.int32)


def column_argmax(logits: jax.Array) -> jax.Array:
    """The argmax of each column of logits [V, B] (the LM head's weight-left product) -> [B] int32,
    the first of equal maxima, through block maxima as `_block_argmax`: XLA:CPU's argmax over the
    vocabulary axis adds 2.0 / 5.7 ms to SmolLM2's head product at B = 32 / 64, this 0.2 / 0.8 ms
    (measured 2026-12-07). One column keeps XLA's argmax (level with this there)."""
    V, B = logits.shape
    if B == 1:
        return jnp.argmax(logits, axis=0).astype(jnp.int32)
    nb = -(-V // BLOCK)
    lb = jnp.pad(logits, ((0, nb * BLOCK - V), (0, 0)), constant_values=-jnp.inf).reshape(nb, BLOCK, B)
    lb = lax.optimization_barrier(lb)
    jg = jnp.argmax(lb.max(1), 0)  # [B] the first block holding each column's maximum
    inside = jnp.take_along_axis(lb, jg[None, None, :], 0)[0]  # [BLOCK, B]
    return (jg * BLOCK + jnp.argmax(inside, 0)).astype(jnp.int32)


def _kept_set(logits: jax.Array, sp: SamplingParams):
    """The kept set of each row of logits [B, V] (see the module docstring): (lb [B, nb, BLOCK] the
    logits in blocks, bm [B, nb] block maxima, greedy [B], t [B] temperature, m [B] max(logits / t),
    tau [B], c [B]): every token of scaled value above tau is kept, plus the first c equal to it."""
    B, V = logits.shape
    lb, bm = _blocks(logits)
    greedy = _block_argmax(lb, bm)
    t = jnp.maximum(sp.temperature, 1e-6)
    m = bm.max(-1) / t  # max(logits / t): the division is monotone
    k = jnp.where((sp.top_k > 0) & (sp.top_k < V), sp.top_k, V).astype(jnp.float32)  # counts are f32
    trunc = (sp.temperature > 0) & ((k < V) | (sp.top_p < 1))
    N = min(K, V)

    def col(v, x):  # per-row v [B] against x [B, ...]
        return v.reshape(-1, *([1] * (x.ndim - 1)))

    def scaled(x):  # logits x [B, ...] -> logits / temperature
        return x / col(t, x)

    def prob(s):  # scaled logits [B, ...] -> exp(s - max): unnormalised, in [0, 1]
        return jnp.exp(s - col(m, s))

    def thresholds(_):
        """(tau, c) [B] of the truncated rows (-inf, 0 for the others). Round 0 reads them off the N
        largest values; round 1, for rows whose kept prefix is longer, first bisects on the value
        until at most N tokens lie in (lo, hi] (or all of those are tied at hi), the invariant being
        that the last kept token's value lies there, then reads them off the N largest values <= hi.
        One while loop so that its body exists once; the per-row state is one [10, B] array (each
        [B] vector would be its own kernel). The scaled logits and their exp are formed once here
        ([B, V] each, only when some row truncates): a bisection step then reads them instead of
        recomputing exp over the vocabulary (2.8x faster at batch 32, temperature 1, top_p 0.95).
        The round loop's candidate pass carries the temperature in the state, so that XLA does not
        hoist a second [B, V] copy out of it."""
        s_all = scaled(lb).reshape(B, -1)
        e_all = prob(s_all)
        z = e_all.sum(-1)
        lt = lb.reshape(B, -1, TOP_BLOCK)
        top_p_z = sp.top_p * z  # the nucleus mass in prob's units
        # prob(<= m - 128) = 0 in float32. With top_p < 1, the tokens of prob <= (1 - top_p) z / 2V
        # together miss the nucleus mass, so the last kept token is above that
        lo0 = jnp.maximum(m - 128.0, m + jnp.log((1 - sp.top_p) * z / (2 * V)))
        unknown = V + N + 1.0  # count(s > lo) until lo first moves: a bound
        LO, HI, N_LO, N_HI, M_HI, N_GE, TAU, C, DONE, T = range(10)  # N_GE: count(s >= hi)

        def kept(n_gt, m_gt):  # is the first token of a value, below n_gt tokens of mass m_gt, kept ([B, ...])
            return (n_gt < col(k, n_gt)) & ((m_gt < col(top_p_z, m_gt)) | (n_gt == 0))

        def searching(rnd, st):  # > N tokens in (lo, hi], not all tied at hi, and room to bisect
            mid = st[LO] + (st[HI] - st[LO]) / 2
            return ((rnd > 0) & (st[DONE] == 0) & (st[N_LO] - st[N_HI] > N) & (st[N_LO] > st[N_GE])
                    & (st[LO] < mid) & (mid < st[HI]))

        def bisect(carry):
            i, rnd, st = carry
            mid = st[LO] + (st[HI] - st[LO]) / 2
            s, mid_ = s_all, mid[:, None]
            n_gt, n_ge, m_gt = _sum((s > mid_).astype(jnp.float32), (s >= mid_).astype(jnp.float32),
                                    jnp.where(s > mid_, e_all, 0))  # count(s > mid), (s >= mid), mass
            go, up = searching(rnd, st), kept(n_gt, m_gt)  # mid becomes hi if kept, else lo
            as_hi = jnp.stack([st[LO], mid, st[N_LO], n_gt, m_gt, n_ge, *st[TAU:]])
            as_lo = jnp.stack([mid, st[HI], n_gt, st[N_HI], st[M_HI], st[N_GE], *st[TAU:]])
            return i + 1, rnd, jnp.where(go, jnp.where(up, as_hi, as_lo), st)

        def round_(carry):
            rnd, st = carry
            st = lax.while_loop(lambda b: (b[0] < MAX_BISECT) & searching(rnd, b[2]).any(), bisect, (0, rnd, st))[2]
            lo, hi, n_lo, n_hi, m_hi, _, tau, c, done, t_ = st
            # the stable order's next N tokens after the n_hi of mass m_hi above hi
            below = lambda x: jnp.where(x / col(t_, x) <= col(hi, x), x / col(t_, x), -jnp.inf)  # noqa: E731
            vals = _top_values(lt, below, N)  # [B, N]
            q = jnp.where(vals > -jnp.inf, prob(vals), 0)
            before = m_hi[:, None] + _cumsum(q) - q  # mass strictly above each
            keep = kept(n_hi[:, None] + jnp.arange(N, dtype=jnp.float32), before)  # a prefix
            h = jnp.min(vals, -1)  # the N-th value (next round's bound). Not vals[:, -1]: XLA:CPU then
            # turns the top_k into a full sort (~600 ms at batch 32)
            n, n_h, m_h, m_n = _sum(keep.astype(jnp.float32), (vals > h[:, None]).astype(jnp.float32),
                                    jnp.where(vals > h[:, None], q, 0), q)
            w_tau = jnp.min(jnp.where(keep, vals, jnp.inf), -1)
            w_c = jnp.sum(keep & (vals == w_tau[:, None]), -1, jnp.float32)
            # exact unless all N are kept and the next token could be too
            exact = (n < N) | ~kept(n_hi + N, m_hi + m_n) | (h == -jnp.inf)
            # or more than N tokens tied at hi: the first c of them are kept, c by the nucleus rule
            few = n_lo - n_hi <= N
            tied = jnp.clip(jnp.minimum(jnp.ceil((top_p_z - m_hi) / prob(hi)), k - n_hi), 1, n_lo - n_hi)
            tau = jnp.where(done > 0, tau, jnp.where(few, w_tau, hi))
            c = jnp.where(done > 0, c, jnp.where(few, w_c, tied))
            # rows not done go to round 1: bisect (lo0, N-th value], the tokens above it being candidates
            nxt = (done == 0) & few & ~exact
            return rnd + 1, jnp.where(nxt, jnp.stack([lo0, h, jnp.full(B, unknown), n_hi + n_h, m_hi + m_h,
                                                      -jnp.ones(B), tau, c, 0 * c, t_]),
                                      st.at[TAU].set(tau).at[C].set(c).at[DONE].set(1.0))

        zeros = jnp.zeros(B)
        st = jnp.stack([lo0, jnp.full(B, jnp.inf), zeros, zeros, zeros, zeros, jnp.full(B, -jnp.inf), zeros,
                        (~trunc).astype(jnp.float32), t])
        st = lax.while_loop(lambda b: (b[0] < 2) & (b[1][DONE] == 0).any(), round_, (0, st))[1]
        return jnp.where(trunc, st[TAU], -jnp.inf), jnp.where(trunc, st[C], 0)

    tau, c = lax.cond(jnp.any(trunc), thresholds, lambda _: (jnp.full(B, -jnp.inf), jnp.zeros(B)), None)
    return lb, bm, greedy, t, m, tau, c


def _col(v, x):  # per-row v [B] against x [B, ...]
    return v.reshape(-1, *([1] * (x.ndim - 1)))


def kept_probs(logits: jax.Array, sp: SamplingParams) -> jax.Array:
    """The distribution `sample` draws each row from, as probabilities [B, V] (f32): softmax(logits /
    temperature) over the row's kept set (top_k, top_p), one-hot at the greedy token for rows with
    temperature 0. What speculative sampling compares a draft's distribution with."""
    B, V = logits.shape
    lb, _, greedy, t, m, tau, c = _kept_set(logits, sp)
    s = lb.reshape(B, -1)[:, :V] / t[:, None]
    e = jnp.exp(s - m[:, None])
    ties = (s == tau[:, None]).astype(jnp.float32)
    w = jnp.where(s > tau[:, None], e, 0) + jnp.where((ties > 0) & (_cumsum(ties) <= c[:, None]), e, 0)
    probs = w / jnp.maximum(w.sum(-1, keepdims=True), 1e-30)
    return jnp.where((sp.temperature > 0)[:, None], probs, jax.nn.one_hot(greedy, V, dtype=jnp.float32))


def sample_at(logits: jax.Array, sp: SamplingParams, u: jax.Array) -> jax.Array:
    """`sample` at given uniforms u [B] in [0, 1): each sampled row's token at quantile u of its kept
    distribution (in vocabulary order), so that evenly spaced u reproduce the distribution
    deterministically. logits [B, V] f32 -> [B] int32; sp.seed, sp.step unused."""
    B, V = logits.shape
    nb = -(-V // BLOCK)
    lb, bm, greedy, t, m, tau, c = _kept_set(logits, sp)
    col = _col

    def scaled(x):  # logits x [B, ...] -> logits / temperature
        return x / col(t, x)

    def prob(s):  # scaled logits [B, ...] -> exp(s - max): unnormalised, in [0, 1]
        return jnp.exp(s - col(m, s))

    # the inverse CDF of the kept set in vocabulary order: weight prob(s) above tau, prob(tau) for the
    # first c tokens equal to tau. Per block (then within the chosen one), the cumulative kept mass
    # is cumsum(mass above tau) + prob(tau) * min(c, cumsum(ties)); tie counts are exact in f32
    p_tau = prob(tau)

    def weights(s, ties0):
        """Kept mass (cumulative, and each) [B, n] and ties of tau through each [B, n] over s [B, n,
        BLOCK] per block (or [B, BLOCK] per token); ties0 [B]: ties of tau before the first."""
        w = (jnp.where(s > col(tau, s), prob(s), 0), (s == col(tau, s)).astype(jnp.float32))
        if s.ndim == 3:  # per block, each its own fused reduce (a variadic one runs ~5x slower here, and a
            w = tuple(x.sum(-1) for x in w)  # stack first would be a [B, 2, V] temporary)
        w = jnp.stack(w, 1)  # [B, 2, n]
        cw = _cumsum(w)
        kept = jnp.minimum(c[:, None], ties0[:, None] + cw[:, 1]) - jnp.minimum(c, ties0)[:, None]  # through each
        each = kept - jnp.minimum(c[:, None], ties0[:, None] + cw[:, 1] - w[:, 1]) + jnp.minimum(c, ties0)[:, None]
        return cw[:, 0] + p_tau[:, None] * kept, w[:, 0] + p_tau[:, None] * each, cw[:, 1] - w[:, 1]

    s = scaled(lb)  # [B, nb, BLOCK]
    cum, w, ties_before = weights(s, jnp.zeros(B))
    r = u * cum[:, -1]
    jb = _first_above(cum, w, r)  # the block
    before = jnp.take_along_axis(jnp.stack([cum - w, ties_before], 1), jb[:, None, None], -1)[..., 0]  # [B, 2]
    cum_j, w_j, _ = weights(_pick(s, jb), before[:, 1])
    tok = jb * BLOCK + _first_above(cum_j, w_j, r - before[:, 0])
    return jnp.where(sp.temperature > 0, tok, greedy).astype(jnp.int32)
