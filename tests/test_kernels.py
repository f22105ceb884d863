"""Paged decode attention: the C++ FFI kernel and the Pallas kernel (interpret mode) against a
plain numpy softmax over each row's own keys, the engine's paths against each other, and the
compiled decode step's HLO (no dense cache copy, no per-layer weight slices)."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from drex_jax import Engine, GenerationConfig
from drex_jax.early_exit import EEConfig
from drex_jax.model.kernels import ffi
from drex_jax.model.kernels.pallas import paged_attention_pallas
from drex_jax.model.paged import decode_step
from drex_jax.model.params import decode_layout
from tests.serving import serve_with_arrivals

L, KV, N, PS, D, NH = 3, 2, 40, 4, 16, 6  # D: the default head size of the cases below


def _case(B, T, positions, seed=0, D=D, q_scale=1.0):
    rng = np.random.default_rng(seed)
    k = rng.normal(size=(L, KV, N, PS, D)).astype(np.float32)
    v = rng.normal(size=(L, KV, N, PS, D)).astype(np.float32)
    P = 8
    bt = rng.permutation(N)[: B * P].reshape(B, P).astype(np.int32)
    q = (q_scale * rng.normal(size=(B, T, NH, D))).astype(np.float32)
    k_new = rng.normal(size=(B, T, KV, D)).astype(np.float32)
    v_new = rng.normal(size=(B, T, KV, D)).astype(np.float32)
    return q, k, v, k_new, v_new, bt, np.asarray(positions, np.int32).reshape(B, T)


def _numpy_attention(q, k, v, k_new, v_new, bt, positions, layer):
    """Each query: softmax over its row's pool keys below the row's first new position, then the
    row's new tokens up to its own position."""
    B, T = positions.shape
    D = q.shape[-1]
    out = np.zeros((B, T, NH, D), np.float64)
    for b in range(B):
        first = max(positions[b, 0], 0)
        pool_k = k[layer][:, bt[b]].reshape(KV, -1, D)[:, :first]
        pool_v = v[layer][:, bt[b]].reshape(KV, -1, D)[:, :first]
        for t in range(T):
            p = positions[b, t]
            if p < 0:
                continue
            seen = [u for u in range(T) if 0 <= positions[b, u] <= p]
            for h in range(NH):
                g = h // (NH // KV)
                keys = np.concatenate([pool_k[g], k_new[b, seen, g]])
                vals = np.concatenate([pool_v[g], v_new[b, seen, g]])
                s = keys @ q[b, t, h] / np.sqrt(D)
                w = np.exp(s - s.max())
                out[b, t, h] = (w / w.sum()) @ vals
    return out


needs_ffi = pytest.mark.skipif(jax.default_backend() != "cpu" or not ffi.available(),
                               reason="the FFI kernel is the CPU's (or no C++ compiler built it)")


@needs_ffi
@pytest.mark.parametrize("B,T,positions", [
    (4, 1, [0, 5, 31, -1]),  # first token, mid-page, a full 8-page row, a padding row
    (2, 3, [[3, 4, 5], [9, 10, -1]]),  # several new tokens per row, causal among themselves
    (1, 1, [17]),
])
@pytest.mark.parametrize("head_dim", [16, 24, 64, 128])  # 16 / 64 / 128: unrolled paths; 24: the generic one
def test_ffi_kernel_matches_numpy(B, T, positions, head_dim):
    case = _case(B, T, positions, D=head_dim)
    q, k, v, k_new, v_new, bt, pos = case
    for layer in (0, L - 1):
        got, k_out, v_out = jax.jit(ffi.paged_attention, static_argnums=7)(*case, layer)
        np.testing.assert_allclose(np.asarray(got), _numpy_attention(*case, layer), atol=2e-5)
        # the kernel wrote each new token's K/V into its row's page slot of this layer, nothing else
        want_k, want_v = k.copy(), v.copy()
        for b in range(B):
            for t in range(T):
                if pos[b, t] >= 0:
                    want_k[layer][:, bt[b, pos[b, t] // PS], pos[b, t] % PS] = k_new[b, t]
                    want_v[layer][:, bt[b, pos[b, t] // PS], pos[b, t] % PS] = v_new[b, t]
        np.testing.assert_array_equal(np.asarray(k_out), want_k)
        np.testing.assert_array_equal(np.asarray(v_out), want_v)


@needs_ffi
@pytest.mark.parametrize("head_dim", [32, 40])
def test_ffi_kernel_with_peaked_scores(head_dim):
    """Scores hundreds apart: most weights underflow in the kernel's vector exp (clamped near 1e-38,
    not 0) and the running max moves between pages; the result still equals the float64 softmax."""
    case = _case(3, 2, [[20, 21], [31, 32], [5, -1]], seed=3, D=head_dim, q_scale=40.0)
    got, _, _ = jax.jit(ffi.paged_attention, static_argnums=7)(*case, 1)
    np.testing.assert_allclose(np.asarray(got), _numpy_attention(*case, 1), atol=2e-5)


def test_pallas_kernel_interpret_matches_numpy():
    q, k, v, k_new, v_new, bt, pos = _case(3, 1, [6, 30, -1])
    # the Pallas path reads the step's own token from the pool: put it there
    for b in range(2):
        k[1][:, bt[b, pos[b, 0] // PS], pos[b, 0] % PS] = k_new[b, 0]
        v[1][:, bt[b, pos[b, 0] // PS], pos[b, 0] % PS] = v_new[b, 0]
    got = paged_attention_pallas(q, jnp.asarray(k), jnp.asarray(v), bt, pos, layer=1, interpret=True)
    want = _numpy_attention(q, k, v, k_new, v_new, bt, pos, 1).reshape(3, 1, NH * D)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)


def _numpy_decode_attention(q, k, v, bt, positions, layer):
    """One query per row over its pool keys 0..position (fp64); padding rows (-1) give zeros."""
    B = len(positions)
    out = np.zeros((B, 1, NH, D), np.float64)
    for b in range(B):
        p = positions[b, 0]
        if p < 0:
            continue
        keys = k[layer][:, bt[b]].reshape(KV, -1, D)[:, : p + 1].astype(np.float64)
        vals = v[layer][:, bt[b]].reshape(KV, -1, D)[:, : p + 1].astype(np.float64)
        for h in range(NH):
            s = keys[h // (NH // KV)] @ q[b, 0, h] / np.sqrt(D)
            w = np.exp(s - s.max())
            out[b, 0, h] = (w / w.sum()) @ vals[h // (NH // KV)]
    return out.reshape(B, 1, NH * D)


@pytest.mark.parametrize("P,positions", [(16, [63, 0, 35, -1]), (2, [7, 1, -1, 4]), (256, [1023, 100, 600])])
def test_pallas_kernel_splits_and_bf16(P, positions):
    """The block table in splits (P=16: 2 splits of 8 pages, one step each; P=256: 16 splits of 16
    pages, two 8-page steps each, so the online softmax rescales across steps), rows ending in
    different splits, the first position, a padding row; fp32 and bf16 against an fp64 numpy softmax."""
    from drex_jax.model.kernels.pallas import _split

    assert _split(256, PS) == (8, 16) and _split(16, PS) == (8, 2)
    rng = np.random.default_rng(3)
    B, N = len(positions), max(80, len(positions) * P)
    k = rng.normal(size=(L, KV, N, PS, D)).astype(np.float32)
    v = rng.normal(size=(L, KV, N, PS, D)).astype(np.float32)
    bt = rng.permutation(N)[: B * P].reshape(B, P).astype(np.int32)
    q = rng.normal(size=(B, 1, NH, D)).astype(np.float32)
    pos = np.asarray(positions, np.int32).reshape(B, 1)
    want = _numpy_decode_attention(q, k, v, bt, pos, 2)
    for dtype, atol in ((jnp.float32, 2e-5), (jnp.bfloat16, 5e-2)):
        got = paged_attention_pallas(jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype), bt, pos,
                                     layer=2, interpret=True)
        assert got.dtype == dtype
        np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=atol)


def test_pallas_lowered_for_cuda_reads_the_pool_in_place(tiny_llama):
    """Lowered for CUDA from this CPU process (no GPU, no CUDA plugin): each layer's Triton call
    takes the donated K and V pools whole (no slice of them), and no interpreter is in the program."""
    from drex_jax.generation import SamplingParams
    from drex_jax.model.modules import split_model

    cfg, params = tiny_llama
    graph, state = split_model(cfg, decode_layout(jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)))
    spec = lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype)  # noqa: E731
    pool_shape = (cfg.num_layers, cfg.num_kv_heads, 33, 16, cfg.head_dim)
    pool = {n: jax.ShapeDtypeStruct(pool_shape, jnp.bfloat16) for n in ("k", "v")}
    B = 4
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
    text = decode_step.trace(
        jax.tree.map(spec, state), pool, i32(B), i32(B), i32(B, 8), jax.tree.map(spec, SamplingParams.build([], B)),
        graph=graph, do_sample=False, attention="pallas",
    ).lower(lowering_platforms=("cuda",)).as_text()
    calls = [line for line in text.splitlines() if "triton" in line and "custom_call" in line]
    assert len(calls) == cfg.num_layers
    pool_type = "tensor<{}xbf16>".format("x".join(map(str, pool_shape)))
    assert all(line.count(pool_type) >= 2 for line in calls), calls[0]
    # no slice of a pool: its type would be the slice's first operand type
    assert not re.search(r"stablehlo\.(dynamic_)?slice[^\n]*: \(" + re.escape(pool_type), text)


def test_ffi_build_failure_is_reported(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("DREX_JAX_CACHE", str(tmp_path))
    with pytest.raises((RuntimeError, OSError)):
        ffi.build(verbose=False)


def test_cached_library_is_keyed_by_the_shared_headers(tmp_path, monkeypatch):
    """Both kernels include parallel_for.h: editing a header of the kernels' folder must rebuild
    them, not load a stale library."""
    monkeypatch.setattr(ffi, "KERNELS", str(tmp_path))
    src = tmp_path / "kernel.cc"
    src.write_text('#include "helper.h"\n')
    (tmp_path / "helper.h").write_text("// one\n")
    before = ffi.library_path("g++", str(src))
    (tmp_path / "helper.h").write_text("// two\n")
    after = ffi.library_path("g++", str(src))
    assert after != before
    (tmp_path / "notes.txt").write_text("not a header")  # other files there do not count
    assert ffi.library_path("g++", str(src)) == after


def test_bad_attention_choice(tiny_llama):
    cfg, params = tiny_llama
    with pytest.raises(ValueError, match="attention must be one of"):
        Engine.from_params(cfg, params, attention="flash")
    with pytest.raises(ValueError, match="float32"):
        Engine.from_params(cfg, params, dtype="bfloat16", attention="ffi")


@needs_ffi
def test_engine_attention_paths_give_identical_tokens(tiny_llama):
    cfg, params = tiny_llama
    rng = np.random.default_rng(4)
    prompts = [list(rng.integers(0, cfg.vocab_size, rng.integers(2, 30))) for _ in range(7)]
    gc = GenerationConfig(max_new_tokens=12)
    runs = {}
    for attention in ("xla", "ffi", "pallas"):
        eng = Engine.from_params(cfg, params, max_slots=4, page_size=4, attention=attention)
        assert eng.attention == (attention if attention != "pallas" else "pallas_interpret")  # no GPU here
        res = serve_with_arrivals(eng, prompts, gc, first=0, every=2, per_arrival=2)
        runs[attention] = [res[i].token_ids for i in range(len(prompts))]
    assert runs["ffi"] == runs["xla"] and runs["pallas"] == runs["xla"]
    assert Engine.from_params(cfg, params).attention == "ffi"  # auto on a CPU in fp32


@needs_ffi
def test_rebatching_segments_through_ffi_equal_xla(tiny4):
    cfg, params = tiny4
    ee = EEConfig((1, 2, 3), (0.08, 0.06, 0.05))
    rng = np.random.default_rng(2)
    prompts = [list(rng.integers(0, 61, rng.integers(2, 12))) for _ in range(8)]
    out = {}
    for attention in ("xla", "ffi"):
        eng = Engine.from_params(cfg, params, max_slots=8, page_size=4, ee=ee, policy="rebatching", art=False,
                                 attention=attention)
        res = serve_with_arrivals(eng, prompts, GenerationConfig(max_new_tokens=12), first=0, every=3,
                                  per_arrival=3)
        out[attention] = [(res[i].token_ids, res[i].exit_layers) for i in range(len(prompts))]
    assert out["ffi"] == out["xla"]
    assert len({d for _, layers in out["ffi"] for d in layers}) > 1  # tokens did exit at different depths


def _compiled_decode_hlo(cfg, params, attention, B=4, P=4, num_pages=33, page_size=8):
    from drex_jax.generation import SamplingParams
    from drex_jax.kv.pool import init_pool
    from drex_jax.model.modules import split_model

    graph, state = split_model(cfg, params)
    pool = init_pool(cfg, num_pages, page_size, jnp.float32)
    args = (state, pool, np.zeros(B, np.int32), np.arange(B, dtype=np.int32),
            np.arange(B * P, dtype=np.int32).reshape(B, P) + 1, SamplingParams.build([], B))
    return decode_step.lower(*args, graph=graph, do_sample=False, attention=attention).compile().as_text()


@needs_ffi
def test_compiled_decode_step_reads_weights_and_pages_in_place(tiny_llama):
    """Decode layout + FFI attention: no dynamic slice, gather or copy of any weight-sized or
    pool-sized array in the step; the stacked checkpoint layout does slice (what it replaces)."""
    cfg, params = tiny_llama
    dec = decode_layout(params)
    weight_shapes = {tuple(a.shape) for lp in dec["layers"] for k, a in lp.items() if a.ndim == 2}
    hlo = _compiled_decode_hlo(cfg, dec, "ffi")

    def big_ops(text, ops):
        found = []
        for line in text.splitlines():
            m = re.search(r"= f32\[([\d,]*)\]\S* (" + "|".join(ops) + r")\(", line)
            if m:
                shape = tuple(int(d) for d in m.group(1).split(",") if d)
                if shape in weight_shapes or np.prod(shape) >= 33 * 8 * cfg.head_dim:  # >= one layer's pool
                    found.append(line.strip()[:120])
        return found

    assert big_ops(hlo, ["dynamic-slice", "slice", "gather", "copy"]) == []
    assert hlo.count("drex_paged_attention") == cfg.num_layers
    stacked = _compiled_decode_hlo(cfg, params, "xla")
    assert big_ops(stacked, ["dynamic-slice", "slice", "gather", "copy", "transpose"])  # the old way copies


@needs_ffi
def test_loading_the_kernel_keeps_denormals():
    """The library must not switch the process to flush-to-zero (what -ffast-math's crtfastmath does)."""
    tiny = np.float32(1e-45)  # the smallest float32 subnormal
    assert tiny * np.float32(2.0) > 0  # host (numpy) arithmetic; XLA:CPU flushes inside its own programs


def test_check_params_reads_every_layer_of_the_decode_layout(tiny_llama):
    from drex_jax.model.params import check_params, checkpoint_layout

    cfg, params = tiny_llama
    dec = decode_layout(params)
    check_params(cfg, dec)  # the decode layout of good params is good
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), checkpoint_layout(dec), params))
    bad = {**dec, "layers": dec["layers"][:2] + ({**dec["layers"][2], "wq": dec["layers"][2]["wq"][:, :-1]},)}
    with pytest.raises(ValueError, match="layer 2"):
        check_params(cfg, bad)
    with pytest.raises(ValueError, match="layers/wq"):
        check_params(cfg, {**dec, "layers": dec["layers"][:2]})  # a layer missing


def test_attention_choice_on_a_gpu_follows_what_triton_can_tile(tiny_llama, capsys):
    """Resolved as on a GPU: 'auto' takes Pallas where Triton can tile head_dim and page_size, else
    XLA with a one-line notice; naming 'pallas' there is a ValueError saying why; off a GPU 'pallas'
    is the interpreter."""
    import dataclasses

    from drex_jax.model.attention_backends import resolve_attention

    cfg, _ = tiny_llama  # head_dim 16
    assert resolve_attention("auto", jnp.bfloat16, None, cfg, 16, platform="gpu") == "pallas"
    odd = dataclasses.replace(cfg, head_dim=80)
    assert resolve_attention("auto", jnp.bfloat16, None, odd, 16, platform="gpu") == "xla"
    assert "head_dim 80 is not a power of two" in capsys.readouterr().err
    assert resolve_attention("auto", jnp.bfloat16, None, cfg, 12, platform="gpu") == "xla"
    with pytest.raises(ValueError, match="head_dim 80"):
        resolve_attention("pallas", jnp.bfloat16, None, odd, 16, platform="gpu")
    assert resolve_attention("pallas", jnp.float32, None, odd, 16, platform="cpu") == "pallas_interpret"


def test_gpu_compile_check_finds_copies_in_hlo_text():
    """`gpu_compile.check_program` on hand-written HLO: a layer slice in the entry, a copy-start of
    the pool inside a loop body, a squeezed layer (one KV head) and a weight upcast are problems;
    the in-place scatter fusion and the fusion bodies themselves are not."""
    import types

    from drex_jax.gpu_compile import check_program

    pool = (4, 1, 10, 16, 64)  # one KV head: a layer slice squeezes to [10, 16, 64]
    mem = types.SimpleNamespace(alias_size_in_bytes=2 * 4 * 10 * 16 * 64 * 2)
    clean = """HloModule m

%scatter_body (p0: bf16[4,1,10,16,64]) -> bf16[4,1,10,16,64] {
  %p0 = bf16[4,1,10,16,64]{4,3,2,1,0} parameter(0)
  ROOT %s = bf16[4,1,10,16,64]{4,3,2,1,0} scatter(%p0, %p0, %p0)
}

ENTRY %main (a: bf16[4,1,10,16,64], w: bf16[64,256]) -> bf16[4,1,10,16,64] {
  %a = bf16[4,1,10,16,64]{4,3,2,1,0} parameter(0)
  %w = bf16[64,256]{1,0} parameter(1)
  ROOT %f = bf16[4,1,10,16,64]{4,3,2,1,0} fusion(%a), kind=kLoop, calls=%scatter_body
}
"""
    assert check_program(clean, mem, pool, jnp.bfloat16, {(64, 256)}, 0) == []
    dirty = clean.replace("ROOT %f =", """%l = bf16[10,16,64]{2,1,0} slice(%a), slice={[1:2], [0:1], [0:10], [0:16], [0:64]}
  %u = f32[64,256]{1,0} convert(%w)
  ROOT %f =""") + """
%body (c: bf16[4,1,10,16,64]) -> bf16[4,1,10,16,64] {
  %c = bf16[4,1,10,16,64]{4,3,2,1,0} parameter(0)
  %cs = (bf16[4,1,10,16,64]{4,3,2,1,0}, bf16[4,1,10,16,64]{4,3,2,1,0}, u32[]) copy-start(%c)
  ROOT %cd = bf16[4,1,10,16,64]{4,3,2,1,0} copy-done(%cs)
}
"""
    problems = check_program(dirty, mem, pool, jnp.bfloat16, {(64, 256)}, 0)
    assert len(problems) == 3, problems
    assert any("slice l" in p for p in problems) and any("upcast" in p for p in problems)
    assert any("copy-start cs" in p for p in problems)
    half = types.SimpleNamespace(alias_size_in_bytes=1)
    assert any("not aliased" in p for p in check_program(clean, half, pool, jnp.bfloat16, set(), 0))
    assert any("Triton" in p for p in check_program(clean, mem, pool, jnp.bfloat16, set(), 4))
