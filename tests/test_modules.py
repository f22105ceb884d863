"""The NNX modules against independent references: a decoder layer equals HF's own layer in fp32
(Llama and Qwen3 attention), shapes and dtypes checked with chex; the decode and checkpoint
layouts build the same model; the engine's split state holds the params' arrays, not copies."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from convert import load_hf_dir
from drex_jax.model.modules import EETransformer, model_params, split_model
from drex_jax.model.ops import attention, from_stream, to_stream
from drex_jax.model.params import decode_layout
from tests.hf_tiny import make_hf_model


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def converted(request, tmp_path_factory):
    src = tmp_path_factory.mktemp(request.param)
    model = make_hf_model(request.param, 4, 2, False, False, seed=7, layers=2)
    model.save_pretrained(src)
    cfg, params, _ = load_hf_dir(str(src))
    return model, cfg, params


def test_decoder_layer_equals_hf_layer(converted):
    hf, cfg, params = converted
    model = EETransformer(cfg, decode_layout(params))
    B, T, H = 2, 5, cfg.hidden_size
    x = jax.random.normal(jax.random.key(0), (B, T, H), jnp.float32)
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    causal = jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool)), (B, T, T))
    layer = model.layers[1]
    q, k, v = layer.attn.qkv(to_stream(x), positions)
    chex.assert_shape(q, (B, T, cfg.num_heads, cfg.head_dim))
    chex.assert_shape([k, v], (B, T, cfg.num_kv_heads, cfg.head_dim))
    chex.assert_type([q, k, v], jnp.float32)
    got = from_stream(layer(to_stream(x), positions, lambda q, k, v: attention(cfg, q, k, v, causal)), B, T)
    chex.assert_shape(got, (B, T, H))
    with torch.no_grad():
        xt = torch.tensor(np.asarray(x))
        pos = torch.arange(T)[None].expand(B, T)
        emb = hf.model.rotary_emb(xt, pos)
        want = hf.model.layers[1](xt, attention_mask=None, position_ids=pos, position_embeddings=emb)
        want = (want[0] if isinstance(want, tuple) else want).numpy()
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


def test_layouts_build_the_same_model(converted):
    _, cfg, params = converted
    stacked, per_layer = EETransformer(cfg, params), EETransformer(cfg, decode_layout(params))
    assert isinstance(per_layer.layers, nnx.List) and not stacked.decode_layout
    chex.assert_trees_all_equal(stacked.layers[1].weights(), per_layer.layers[1].weights())
    np.testing.assert_array_equal(np.asarray(stacked.lm_head_logits(np.ones(cfg.hidden_size, np.float32))),
                                  np.asarray(per_layer.lm_head_logits(np.ones(cfg.hidden_size, np.float32))))


def test_split_state_holds_the_params_arrays(converted):
    """What the jitted steps take: the state's leaves are the decode-layout params' own arrays."""
    _, cfg, params = converted
    dec = decode_layout(params)
    graph, state = split_model(cfg, dec)
    leaves = {id(a) for a in jax.tree.leaves(dec)}
    assert {id(a) for a in jax.tree.leaves(state)} == leaves
    assert hash(graph) == hash(split_model(cfg, dec)[0])  # a static argument: equal graphs, one program
    chex.assert_trees_all_equal(model_params(graph.merge(state)), dec)
