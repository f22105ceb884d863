"""The CPU projection kernel (`model.kernels.matmul`) against a float64 numpy product, the packed
layout against the decode layout it came from, and engines on the kernel against engines on
XLA's dot (identical greedy tokens, full depth and early exit)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from drex_jax import Engine, GenerationConfig
from drex_jax.early_exit import EEConfig
from drex_jax.model import ops
from drex_jax.model.kernels import matmul as mk
from drex_jax.model.params import _unpacked_layer_shapes, check_params, decode_layout, is_packed, packed_layout
from tests.serving import serve_with_arrivals

needs_kernel = pytest.mark.skipif(jax.default_backend() != "cpu" or not mk.available(),
                                  reason="the projection kernel is the CPU's (or no C++ compiler built it)")


@needs_kernel
@pytest.mark.parametrize("M,K", [(32, 64), (96, 7), (72, 33), (960, 577), (64, 1536), (64, 0)])
@pytest.mark.parametrize("N", [1, 2, 3, 5, 8, 12, 13, 25, 64, 200])
def test_kernel_matches_numpy(M, K, N):
    rng = np.random.default_rng(M * 1000 + K + N)
    w = rng.normal(size=(M, K)).astype(np.float32)
    x = rng.normal(size=(K, N)).astype(np.float32)
    want = w.astype(np.float64) @ x.astype(np.float64)
    for per_task in (1, 2, 100):  # one task per panel, two panels per task, one task
        got = np.asarray(jax.jit(lambda p, x: mk.matmul(p, x, M, per_task))(jnp.asarray(mk.pack(w)), x))
        assert got.shape == (M, N)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.sqrt(K))


@needs_kernel
@pytest.mark.parametrize("lanes", [16, 8])
def test_each_vector_width_path_matches_numpy_on_any_cpu(lanes):
    """Both code paths, whatever this CPU has: 16 lanes (what AVX-512 machines run; without AVX-512
    the compiler splits its vectors) and 8 (AVX2's multi-pass path, which an AVX-512 machine would
    otherwise never run), built with DREX_MATMUL_LANES16 / DREX_MATMUL_LANES8."""
    import ctypes

    from drex_jax.model.kernels import ffi

    target, define = f"drex_matmul_lanes{lanes}", f"DREX_MATMUL_LANES{lanes}"
    assert ffi.load(mk.SOURCE, "DrexMatmul", target, f"CPU projection kernel ({lanes} lanes)", "nothing",
                    defines=(define,))
    lib = ctypes.cdll.LoadLibrary(ffi.build(False, mk.SOURCE, defines=(define,)))
    assert lib.DrexMatmulLanes() == lanes  # the define took effect
    for M, K, N in ((96, 7, 1), (72, 33, 3), (960, 577, 5), (64, 300, 12), (32, 64, 13), (64, 40, 25), (64, 0, 4),
                    (96, 100, 8), (64, 65, 64)):
        rng = np.random.default_rng(M + K + N)
        w, x = rng.normal(size=(M, K)).astype(np.float32), rng.normal(size=(K, N)).astype(np.float32)
        call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((M, N), jnp.float32))
        got = np.asarray(call(jnp.asarray(mk.pack(w)), jnp.asarray(x), panels_per_task=np.int64(2)))
        np.testing.assert_allclose(got, w.astype(np.float64) @ x, rtol=1e-5, atol=1e-5 * np.sqrt(max(K, 1)))


@needs_kernel
def test_kernel_pads_rows_and_project_switches_to_xla_for_many_columns():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(40, 48)).astype(np.float32)  # 40 rows: a second, part-filled panel
    packed = mk.pack(w)
    assert packed.shape == (2, 48, 32) and not packed[1, :, 8:].any()
    np.testing.assert_array_equal(mk.unpack(packed, 40), w)
    x = rng.normal(size=(48, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(mk.matmul(jnp.asarray(packed), x, 40)), w @ x, rtol=1e-5, atol=1e-5)
    w2 = rng.normal(size=(64, 48)).astype(np.float32)
    many = rng.normal(size=(48, ops.KERNEL_MAX_COLUMNS + 5)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(ops.project(jnp.asarray(mk.pack(w2)), many)), w2 @ many,
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="rows=70"):
        mk.matmul(jnp.asarray(packed), x, 70)


def test_packed_layout_round_trips(tiny_llama):
    cfg, params = tiny_llama
    dec = decode_layout(params)
    packed = packed_layout(dec)
    assert is_packed(packed) and set(packed["layers"][0]) >= {"wqkv", "wo", "w_gateup", "w_down"}
    assert packed["layers"][0]["wqkv"].shape == (4, 64, 32)  # (64 q + 2 x 32 kv rows) / 32 panels, in = 64
    back = decode_layout(packed)
    for a, b in zip(dec["layers"], back["layers"]):
        assert set(a) == set(b)
        for k in a:
            np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))
    check_params(cfg, packed)  # checks the unpacked shapes, computed from the packed ones
    for lp, unpacked in zip(packed["layers"], back["layers"]):
        assert {k: (a.shape, a.dtype) for k, a in _unpacked_layer_shapes(lp).items()} == \
            {k: (a.shape, a.dtype) for k, a in unpacked.items()}
    other = dataclasses.replace(cfg, intermediate_size=96)
    with pytest.raises(ValueError, match="w_gate"):
        check_params(other, packed)
    # the LM head's rows ([V, H] here; tied models: the embedding), 101 of them in 4 panels
    rows = dec["lm_head"] if "lm_head" in dec else dec["embed"]
    assert packed["head_panels"].shape == (4, 64, 32)
    np.testing.assert_array_equal(mk.unpack(packed["head_panels"], cfg.vocab_size), np.asarray(rows))
    assert "head_panels" not in back


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="off a CPU every engine takes XLA's dot")
def test_matmul_choice(tiny_llama, tiny4):
    cfg, params = tiny_llama
    with pytest.raises(ValueError, match="matmul must be one of"):
        Engine.from_params(cfg, params, matmul="blas")
    with pytest.raises(ValueError, match="float32"):
        Engine.from_params(cfg, params, dtype="bfloat16", matmul="kernel")
    assert Engine.from_params(cfg, params, dtype="bfloat16").matmul == "xla"
    cfg4, params4 = tiny4  # k/v rows 16: not whole 32-row panels
    assert mk.unsupported(cfg4) is not None
    assert Engine.from_params(cfg4, params4).matmul == "xla"
    with pytest.raises(ValueError, match="multiples of 32"):
        Engine.from_params(cfg4, params4, matmul="kernel")


@needs_kernel
def test_engine_on_the_kernel_gives_xla_tokens(tiny_llama):
    cfg, params = tiny_llama
    rng = np.random.default_rng(5)
    prompts = [list(rng.integers(0, cfg.vocab_size, rng.integers(2, 40))) for _ in range(9)]
    gc = GenerationConfig(max_new_tokens=12)
    runs = {}
    for matmul in ("xla", "kernel"):
        eng = Engine.from_params(cfg, params, max_slots=4, page_size=4, matmul=matmul)
        assert eng.matmul == matmul and is_packed(eng.params) == (matmul == "kernel")
        res = serve_with_arrivals(eng, prompts, gc, first=0, every=2, per_arrival=2)
        runs[matmul] = [res[i].token_ids for i in range(len(prompts))]
    assert runs["kernel"] == runs["xla"]
    # auto on a CPU in fp32: the kernel with AVX-512, or without it for few slots
    assert Engine.from_params(cfg, params, max_slots=32).matmul == ("kernel" if mk.has_avx512() else "xla")
    assert Engine.from_params(cfg, params, max_slots=mk.AVX2_MAX_SLOTS).matmul == \
        ("kernel" if mk.has_avx512() or mk.has_avx2() else "xla")


@needs_kernel
def test_a_kernel_engines_params_build_another_without_repacking(tiny_llama, monkeypatch):
    cfg, params = tiny_llama
    eng = Engine.from_params(cfg, params, max_slots=4, page_size=4, matmul="kernel")

    def no_pack(w):
        raise AssertionError("packed params were unpacked and packed again")

    monkeypatch.setattr(mk, "pack", no_pack)
    again = Engine.from_params(cfg, eng.params, max_slots=4, page_size=4, matmul="kernel")
    assert is_packed(again.params)
    gc = GenerationConfig(max_new_tokens=6)
    assert again.generate([[1, 2, 3]], gc)[0].token_ids == eng.generate([[1, 2, 3]], gc)[0].token_ids


@needs_kernel
def test_auto_takes_the_kernel_with_avx512_or_few_slots(tiny_llama, monkeypatch):
    cfg, _ = tiny_llama
    small, large = mk.AVX2_MAX_SLOTS, mk.AVX2_MAX_SLOTS + 1
    for avx512, avx2, slots, auto in ((True, True, large, "kernel"), (True, True, None, "kernel"),
                                      (False, True, small, "kernel"), (False, True, large, "xla"),
                                      (False, True, None, "xla"), (False, False, small, "xla")):
        monkeypatch.setattr(mk, "has_avx512", lambda: avx512)
        monkeypatch.setattr(mk, "has_avx2", lambda: avx2)
        assert mk.resolve_matmul("auto", jnp.float32, None, cfg, "cpu", max_slots=slots) == auto
        assert mk.resolve_matmul("kernel", jnp.float32, None, cfg, "cpu", max_slots=slots) == "kernel"  # named


@needs_kernel
@pytest.mark.parametrize("verify", [False, True])
def test_early_exit_on_the_kernel_gives_xla_tokens(tiny_llama, verify):
    cfg, params = tiny_llama
    ee = EEConfig((1, 2), (0.3, 0.2), missing_kv="recompute", verify=True, max_draft=4) if verify \
        else EEConfig((1, 2), (0.3, 0.2))
    rng = np.random.default_rng(6)
    prompts = [list(rng.integers(0, cfg.vocab_size, rng.integers(2, 20))) for _ in range(6)]
    out = {}
    for matmul in ("xla", "kernel"):
        eng = Engine.from_params(cfg, params, max_slots=4, page_size=4, ee=ee, art=False,
                                 matmul=matmul)
        res = serve_with_arrivals(eng, prompts, GenerationConfig(max_new_tokens=10), first=0, every=3,
                                  per_arrival=2)
        out[matmul] = [(res[i].token_ids, res[i].exit_layers) for i in range(len(prompts))]
    assert out["kernel"] == out["xla"]


@needs_kernel
def test_compiled_decode_step_runs_four_kernel_calls_per_layer_and_the_head(tiny_llama):
    from drex_jax.generation import SamplingParams
    from drex_jax.kv.pool import init_pool
    from drex_jax.model.modules import split_model
    from drex_jax.model.paged import decode_step

    cfg, params = tiny_llama
    graph, state = split_model(cfg, packed_layout(decode_layout(params)))
    B, P = 4, 4
    pool = init_pool(cfg, 33, 8, jnp.float32)
    args = (state, pool, np.zeros(B, np.int32), np.arange(B, dtype=np.int32),
            np.arange(B * P, dtype=np.int32).reshape(B, P) + 1, SamplingParams.build([], B))
    hlo = decode_step.lower(*args, graph=graph, do_sample=False, attention="xla").compile().as_text()
    assert hlo.count('custom_call_target="drex_matmul"') == 4 * cfg.num_layers + 1  # + the LM head
