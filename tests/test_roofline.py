"""Roofline benchmark pieces: the analytic cost of a decode step against XLA's own count, and
the decode fixture against the engine's decode step semantics."""
import jax
import numpy as np

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
