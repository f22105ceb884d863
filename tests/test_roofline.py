"""Roofline benchmark pieces: the analytic cost of a decode step against XLA's own count, and
the decode fixture against the engine's decode step semantics."""
import jax
import numpy as np
import pytest

from drex_jax.bench import roofline
from drex_jax.model.config import config_from_hf
from drex_jax.model.modules import split_model
from drex_jax.model.paged import decode_step
from drex_jax.model.params import init_params


def _one_layer():
    cfg = config_from_hf(dict(architectures=["LlamaForCausalLM"], vocab_size=512, hidden_size=128,
                              intermediate_size=384, num_hidden_layers=1, num_attention_heads=4,
                              num_key_value_heads=2, max_position_embeddings=1024))
    return cfg, init_params(cfg, jax.random.key(0))


def test_analytic_cost_matches_xla_cost_analysis():
    """With one layer XLA counts exactly the step's layer, so its FLOP count must match the analytic
    one (matmuls + live attention). XLA also counts what the analytic model leaves out as small:
    elementwise work, norms, softmax, sampling and attention over the bucket-padded page width,
    which at this toy width (hidden 128) is up to ~25% on top."""
    cfg, params = _one_layer()
    for batch, context in ((4, 64), (16, 256)):
        fx = roofline.decode_fixture(cfg, batch, context, np.float32)
        graph, state = split_model(cfg, params)
        xla = roofline.xla_cost(decode_step, state, fx.pool, fx.tokens, fx.positions, fx.block_tables, fx.sampling,
                                graph=graph, do_sample=False)
        nbytes, flops = roofline.decode_cost(cfg, params, batch, context, head_columns=cfg.vocab_size)
        matmuls = 2 * batch * (4 * 128 * 128 // 2 + 128 * 128 + 3 * 128 * 384 + 128 * 512)  # q,o + k,v + mlp + head
        assert flops == matmuls + 4 * 4 * 32 * context * batch  # hand-computed: heads 4, head_dim 32
        assert flops <= xla["flops"] <= 1.3 * flops, (flops, xla)
        assert not cfg.tie_word_embeddings
        weights = 4 * (sum(v.size for v in jax.tree.leaves(params)) - params["embed"].size + batch * 128)
        kv = 4 * 2 * 2 * 32 * context * batch
        assert nbytes == weights + kv  # every weight once, `batch` embedding rows, every live K/V byte
        assert xla["bytes"] >= 0.9 * nbytes, (nbytes, xla)


def test_fixture_rows_attend_to_their_context():
    """The fixture's rows hold `context` cached positions: decoding from it equals decoding a row
    whose block table is cut to exactly its pages (padding columns change nothing)."""
    cfg, params = _one_layer()
    fx = roofline.decode_fixture(cfg, 3, 40, np.float32)
    graph, state = split_model(cfg, params)
    want, _ = decode_step(state, jax.tree.map(lambda a: a.copy(), fx.pool), fx.tokens, fx.positions,
                          fx.block_tables[:, :3], fx.sampling, graph=graph, do_sample=False)
    got, _ = decode_step(state, fx.pool, fx.tokens, fx.positions, fx.block_tables, fx.sampling, graph=graph,
                         do_sample=False)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert fx.block_tables.shape == (3, 4) and int(fx.positions[0]) == 40


@pytest.mark.parametrize("W", [384, 320])
def test_causal_blocks_equal_dense_attention(W):
    """Prefill's causal query blocks (128 wide at W=384, 64 at W=320) skip only score blocks the mask
    zeroes: packed rows of several prompts (block-diagonal causal masks) give what dense attention
    over the whole row gives."""
    import jax.numpy as jnp

    from drex_jax.model.ops import attention, causal_attention

    cfg, _ = _one_layer()
    rng = np.random.default_rng(0)
    B, D = 3, cfg.head_dim
    q = jnp.asarray(rng.standard_normal((B, W, cfg.num_heads, D)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((B, W, cfg.num_kv_heads, D)), jnp.float32) for _ in range(2))
    seg = np.zeros((B, W), np.int32)
    seg[0, 200:] = 1  # two prompts in row 0, one crossing the 128 and 256 block edges
    seg[1, 100:150], seg[1, 150:] = 1, 2
    valid = np.ones((B, W), bool)
    valid[2, 300:] = False  # padding at the end of row 2
    pos = np.arange(W)[None].repeat(B, 0)
    mask = ((seg[:, :, None] == seg[:, None, :]) & (pos[:, None, :] <= pos[:, :, None])
            & valid[:, :, None] & valid[:, None, :])
    dense = attention(cfg, q, k, v, jnp.asarray(mask))
    blocked = causal_attention(cfg, q, k, v, jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(blocked)[valid], np.asarray(dense)[valid], rtol=1e-5, atol=1e-6)
    # and both equal a plain per-head softmax for one query (hand-computed reference)
    b, t, h = 1, 170, cfg.num_heads - 1
    kv = h // cfg.q_per_kv
    keys = np.flatnonzero(mask[b, t])
    s = np.asarray(k)[b, keys, kv] @ np.asarray(q)[b, t, h] / np.sqrt(D)
    p = np.exp(s - s.max())
    want = (p / p.sum()) @ np.asarray(v)[b, keys, kv]
    np.testing.assert_allclose(np.asarray(blocked)[b, t, h * D:(h + 1) * D], want, rtol=1e-5, atol=1e-6)


def test_prefill_point_times_the_planned_call():
    """The prefill section times the call the scheduler plans: its shape, padding and FLOPs."""
    from drex_jax.bench.prefill import prefill_flops, prefill_point
    from drex_jax.engine import Engine

    cfg, params = _one_layer()
    eng = Engine.from_params(cfg, params, max_slots=4, max_seq_len=256, max_prefill_tokens_per_step=512)
    r = prefill_point(eng, 3, 100, repeats=1)
    assert r["shape"] == [3, 128] and abs(r["padding_share"] - (1 - 300 / 384)) < 1e-9 and r["ms"] > 0
    specs_flops = 2 * 300 * (cfg.hidden_size * (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
                             + cfg.num_heads * cfg.head_dim * cfg.hidden_size + 3 * cfg.hidden_size * cfg.intermediate_size)
    attn = 3 * 4 * cfg.num_heads * cfg.head_dim * 100 * 101 / 2
    assert r["flops"] == prefill_flops(cfg, [100] * 3) == specs_flops + attn + 2 * 3 * cfg.hidden_size * cfg.vocab_size
    assert eng.num_running == 0 and eng.num_free_pages == eng.allocator.capacity  # slots and pages handed back
