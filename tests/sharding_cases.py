"""Tensor parallelism on 4 forced host CPU devices: sharded equals unsharded.

Collected through tests/test_sharding.py, which runs this file in a fresh process with
XLA_FLAGS=--xla_force_host_platform_device_count=4 (the flag must be set before JAX starts).
"""
import collections
import re

import jax
import numpy as np
import pytest

from drex_jax import Engine, GenerationConfig, compile_counter
from drex_jax.early_exit import EEConfig
from drex_jax.model import forward
from drex_jax.model.config import config_from_hf
from drex_jax.model.params import init_params
from drex_jax.plan import PRESETS, load_model_config, plan
from drex_jax.sharding import make_mesh, pool_sharding, replica_meshes, shard_params
from tests.serving import serve_with_arrivals


def _cfg(arch, heads, kv_heads, layers=4, hidden=64):
    return config_from_hf(dict(
        architectures=[arch], vocab_size=97, hidden_size=hidden, intermediate_size=2 * hidden + 32,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=256))


@pytest.fixture(scope="module", autouse=True)
def four_devices():
    assert jax.device_count() >= 4, "run through tests/test_sharding.py, which forces 4 host devices"


_forward = jax.jit(forward, static_argnums=1)
_COLLECTIVE = re.compile(r"= \S+ (all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(?:-start)?\(")


def reordered_equivalent(cfg, params, rng):
    """The same function with its KV-head groups (and their q heads) and MLP units permuted: exactly
    the axes tp splits. Mathematically identical; in fp32 only the order of the sums over those
    axes (o and down projections) changes, which is all that tp's partial sums + all-reduce change."""
    hd, g = cfg.head_dim, cfg.num_heads // cfg.num_kv_heads
    kv_perm = rng.permutation(cfg.num_kv_heads)
    kv_idx = (kv_perm[:, None] * hd + np.arange(hd)).ravel()
    q_idx = ((kv_perm[:, None] * g + np.arange(g))[:, :, None] * hd + np.arange(hd)).ravel()
    mlp = rng.permutation(cfg.intermediate_size)
    axis_index = {"wq": (2, q_idx), "bq": (1, q_idx), "wk": (2, kv_idx), "bk": (1, kv_idx), "wv": (2, kv_idx),
                  "bv": (1, kv_idx), "wo": (1, q_idx), "w_gate": (2, mlp), "w_up": (2, mlp), "w_down": (1, mlp)}
    layers = {k: jax.numpy.take(v, axis_index[k][1], axis=axis_index[k][0]) if k in axis_index else v
              for k, v in params["layers"].items()}
    return {**params, "layers": layers}


def assert_tensor_parallel_equivalent(cfg, params, sharded, tokens):
    """Sharded forward == single-device forward, for a reason:
    1. values: tp only reorders fp32 sums (per-device partial sums over heads / MLP units, then an
       all-reduce). The tolerance is 4x the largest deviation among three reordered single-device
       evaluations of the same sums (`reordered_equivalent`): tp's result is one more reordering,
       and 4x covers the gap between the largest of 3 samples and a new one.
    2. communication: Megatron-style splits need exactly one all-reduce after the O projection and
       one after the down projection per layer, and nothing else (no weight gathers). A wrong split
       axis computes the same values under GSPMD but moves weights around every step."""
    want = np.asarray(_forward(params, cfg, tokens))
    spread = max(np.abs(np.asarray(_forward(reordered_equivalent(cfg, params, np.random.default_rng(s)), cfg, tokens))
                        - want).max() for s in range(3))
    assert 0 < spread < 1e-4, spread  # reordering does change fp32 results, by rounding only
    got = np.asarray(_forward(sharded, cfg, tokens))
    np.testing.assert_allclose(got, want, rtol=0, atol=4 * spread)
    hlo = _forward.lower(sharded, cfg, tokens).compile().as_text()
    collectives = collections.Counter(_COLLECTIVE.findall(hlo))
    assert collectives == {"all-reduce": 2}, f"expected one all-reduce after O and one after down: {collectives}"


@pytest.mark.parametrize("arch,heads,kv_heads,tp", [
    ("LlamaForCausalLM", 8, 2, 2),  # GQA 4:1
    ("Qwen2ForCausalLM", 8, 4, 4),  # q/k/v biases split too
    ("LlamaForCausalLM", 4, 4, 4),  # one head per device
    ("Qwen3ForCausalLM", 8, 2, 2),  # q/k norms replicated (one [head_dim] weight for every head)
])
def test_sharded_logits_equal_single_device(arch, heads, kv_heads, tp):
    cfg = _cfg(arch, heads, kv_heads)
    params = init_params(cfg, jax.random.key(1), scale=0.2)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (3, 29)).astype(np.int32)
    mesh = make_mesh(tp=tp, devices=jax.devices()[:tp])
    sharded = shard_params(cfg, params, mesh)
    assert sharded["layers"]["wq"].sharding.spec == jax.sharding.PartitionSpec(None, None, "tp")
    assert len(sharded["layers"]["w_down"].addressable_shards) == tp
    assert_tensor_parallel_equivalent(cfg, params, sharded, tokens)


@pytest.mark.parametrize("weight,wrong_axis", [("w_down", 2), ("wq", 1)])
def test_wrong_split_axis_fails_the_check(weight, wrong_axis):
    """Splitting one weight on the wrong axis (down projection by its output, q by its input) must
    fail the same check that the right sharding passes."""
    cfg = _cfg("LlamaForCausalLM", 8, 2)
    params = init_params(cfg, jax.random.key(1), scale=0.2)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (3, 29)).astype(np.int32)
    mesh = make_mesh(tp=2, devices=jax.devices()[:2])
    sharded = shard_params(cfg, params, mesh)
    axes = [None] * params["layers"][weight].ndim
    axes[wrong_axis] = "tp"
    wrong = {**sharded, "layers": {**sharded["layers"], weight: jax.device_put(
        params["layers"][weight], jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*axes)))}}
    with pytest.raises(AssertionError, match="expected one all-reduce"):
        assert_tensor_parallel_equivalent(cfg, params, wrong, tokens)


def test_sharded_rebatching_generation_equals_unsharded():
    cfg = _cfg("Qwen2ForCausalLM", 8, 4, hidden=32)
    params = init_params(cfg, jax.random.key(3), scale=0.3)
    ee = EEConfig((1, 2, 3), (0.08, 0.06, 0.05))
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(0, cfg.vocab_size, rng.integers(2, 14))) for _ in range(12)]
    gc = GenerationConfig(max_new_tokens=16)
    kw = dict(max_slots=8, page_size=4, ee=ee, policy="rebatching", art=False)
    one = serve_with_arrivals(Engine.from_params(cfg, params, **kw), prompts, gc, first=0, every=3, per_arrival=3)
    mesh = make_mesh(tp=4, devices=jax.devices()[:4])
    eng = Engine.from_params(cfg, params, mesh=mesh, **kw)
    tp = serve_with_arrivals(eng, prompts, gc, first=0, every=3, per_arrival=3)
    for i in range(len(prompts)):
        assert tp[i].token_ids == one[i].token_ids, f"request {i}"
        assert tp[i].exit_layers == one[i].exit_layers, f"request {i}"
    assert min(eng.ee_stats.exits_per_ramp) > 0
    # placements survive the donated, jitted steps, so a second run compiles nothing
    assert eng.pool["k"].sharding == pool_sharding(mesh) and eng.params["layers"][0]["w_up"].sharding.spec[0] == "tp"
    before = compile_counter.count()
    again = serve_with_arrivals(eng, prompts, gc, first=0, every=3, per_arrival=3)
    assert compile_counter.count() == before
    assert [again[i].token_ids for i in range(12)] == [one[i].token_ids for i in range(12)]


def test_sharded_trained_ramps_equal_unsharded():
    """Trained exit heads (the runner's early-exit graph, ramps replicated) under tp=2 decode like
    one device: same tokens, same exit layers."""
    from drex_jax.model.ramps import init_ramp_heads

    cfg = _cfg("LlamaForCausalLM", 4, 2, hidden=32)
    params = init_params(cfg, jax.random.key(5), scale=0.3)
    heads = init_ramp_heads(params, cfg, 2, 4, jax.random.key(6))
    heads["up"] = 0.5 * jax.random.normal(jax.random.key(7), heads["up"].shape)  # unlike the shared head
    kw = dict(max_slots=4, page_size=4, ee=EEConfig((1, 2), 0.05, head="trained"), exit_heads=heads,
              policy="rebatching", art=False)
    prompts = [[3, 9, 27, 1], [50, 2], [7] * 9, [11, 12, 13]]
    gc = GenerationConfig(max_new_tokens=8)
    one = Engine.from_params(cfg, params, **kw).generate(prompts, gc)
    tp = Engine.from_params(cfg, params, mesh=make_mesh(tp=2, devices=jax.devices()[:2]), **kw).generate(prompts, gc)
    assert [r.token_ids for r in tp] == [r.token_ids for r in one]
    assert [r.exit_layers for r in tp] == [r.exit_layers for r in one]
    assert len({d for r in one for d in r.exit_layers}) > 1  # the ramps did let tokens out


def test_replica_meshes_serve_independently():
    cfg = _cfg("LlamaForCausalLM", 4, 2)
    params = init_params(cfg, jax.random.key(2), scale=0.25)
    mesh = make_mesh(tp=2, dp=2, devices=jax.devices()[:4])
    with pytest.raises(ValueError, match="dp=2"):
        Engine.from_params(cfg, params, mesh=mesh)
    prompts = [[1, 2, 3, 4, 5], [9, 8, 7]]
    gc = GenerationConfig(max_new_tokens=8)
    want = [r.token_ids for r in Engine.from_params(cfg, params).generate(prompts, gc)]
    for sub in replica_meshes(mesh):
        assert sub.shape == {"dp": 1, "tp": 2}
        got = Engine.from_params(cfg, params, mesh=sub).generate(prompts, gc)
        assert [r.token_ids for r in got] == want


def test_bad_meshes():
    cfg = _cfg("LlamaForCausalLM", 6, 3)
    params = init_params(cfg, jax.random.key(0))
    with pytest.raises(ValueError, match=r"tp=2 does not divide the model's 3 KV heads"):
        Engine.from_params(cfg, params, mesh=make_mesh(tp=2, devices=jax.devices()[:2]))
    with pytest.raises(ValueError, match=r"needs 3 devices, but 4 are given"):
        make_mesh(tp=3)
    with pytest.raises(ValueError, match="tp must be an integer >= 1"):
        make_mesh(tp=0)
    wrong = jax.sharding.Mesh(np.asarray(jax.devices()[:2]), ("model",))
    with pytest.raises(ValueError, match="axes"):
        Engine.from_params(cfg, params, mesh=wrong)


def test_plan_hand_computed():
    # Llama-2-7B, tp=2, bf16: embed + lm_head replicated (2 * 32000 * 4096), the rest halved
    cfg = load_model_config("llama2-7b")
    p = plan(cfg, tp=2, max_batch=8, max_len=4096, dtype="bfloat16", memory_bytes=80 * 2**30)
    per_layer = 4 * 4096 * 4096 + 3 * 4096 * 11008
    params = 2 * 32000 * 4096 + 4096 + 32 * (per_layer // 2 + 2 * 4096)
    assert p.param_bytes_per_device == 2 * params
    assert p.kv_bytes_per_token_per_device == 2 * 32 * 16 * 128 * 2  # K+V, layers, kv heads/tp, head dim, bf16
    assert p.kv_bytes_per_sequence_per_device == 4096 * p.kv_bytes_per_token_per_device
    assert p.max_batch_that_fits == (int(80 * 2**30 * 0.9) - 2 * params) // (4096 * 256 * 2**10)
    assert p.fits
    assert set(PRESETS) >= {"llama2-7b", "llama2-13b"}
    with pytest.raises(ValueError, match="tp=3 must divide"):
        plan(cfg, tp=3)


def test_cli_generate_tensor_parallel_matches_one_device(capsys, default_model):
    """SmolLM2 has 3 KV heads: --tp 3 splits it over 3 of the 4 forced host devices."""
    import json

    from drex_jax.cli import main

    args = ["generate", "--prompt", "Name a fruit.", "--max-new-tokens", "6", "--max-slots", "1",
            "--max-seq-len", "64", "--json"]
    assert main(args) == 0
    one = json.loads(capsys.readouterr().out)[0]["full depth"]["token_ids"]
    assert main(args + ["--tp", "3"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["full depth"]["token_ids"] == one
    assert main(args + ["--tp", "2"]) == 2
    assert "tp=2 does not divide the model's 3 KV heads" in capsys.readouterr().err
