"""Context-aware draft heads (`drex_jax.draft_attention`) in the engine.

The served block (paged, batched, reading layer E's K/V from the pool) against a float64 numpy
reference written from the definition (dense over the whole sequence, no cache); verify mode with
these heads still equals full depth; the heads round-trip through save/load; a mesh is refused.
"""
import numpy as np
import pytest

from drex_jax import Engine, GenerationConfig
from drex_jax.early_exit import EEConfig
from drex_jax.exit_heads import load_heads, save_heads
from tests.naive_ee import NaiveEE
from tests.serving import serve_with_arrivals


def _heads(cfg, params, exit_layers, seed):
    """Random ramp heads and draft blocks (far from any identity), stacked per ramp."""
    rng = np.random.default_rng(seed)
    H, R, Q = cfg.hidden_size, len(exit_layers), cfg.num_heads * cfg.head_dim
    return {"norm": 1 + 0.1 * rng.standard_normal((R, H)), "down": rng.standard_normal((R, H, 8)) / np.sqrt(H),
            "up": 0.5 * rng.standard_normal((R, 8, H)), "draft_wq": rng.standard_normal((R, Q, H)) / np.sqrt(H),
            "draft_wo": rng.standard_normal((R, H, Q)) / np.sqrt(Q)}


def _reference_draft(nv: NaiveEE, cfg, heads, r, layer, tokens):
    """The ramp's greedy draft after `tokens`, from the definition: hidden states after `layer`
    layers at every position (full K/V), the block's attention over layer `layer`'s K/V of positions
    0..p with its own Q and output projections, then the ramp's head and the LM head's rows."""
    hs, keys, values = [], [[] for _ in range(layer)], [[] for _ in range(layer)]
    for p, t in enumerate(tokens):
        h = nv.p["embed"][t]
        for l in range(layer):
            k, v = nv.kv(l, h, p)
            keys[l].append(k)
            values[l].append(v)
            h = nv.layer(l, h, p, keys[l], values[l])
        hs.append(h)
    p = len(tokens) - 1
    lp = nv.lp(layer)
    x = nv.norm(hs[p], lp["attn_norm"])
    q = x @ heads["draft_wq"][r].T + (lp["bq"] if cfg.qkv_bias else 0)
    q = nv.rope(q.reshape(cfg.num_heads, -1), p)
    kv = [nv.kv(layer, hs[j], j) for j in range(p + 1)]
    out = []
    for head in range(cfg.num_heads):
        g = head // cfg.q_per_kv
        s = np.array([q[head] @ k[g] for k, _ in kv]) / np.sqrt(cfg.head_dim)
        w = np.exp(s - s.max())
        out.append(sum(wi * v[g] for wi, (_, v) in zip(w / w.sum(), kv)))
    h = hs[p] + heads["draft_wo"][r] @ np.concatenate(out)
    z = h + (h @ heads["down"][r]) @ heads["up"][r]
    z = heads["norm"][r] * z / np.sqrt(np.mean(z * z) + cfg.rms_norm_eps)
    w = nv.p["embed"] if cfg.tie_word_embeddings else nv.p["lm_head"].T
    logits = w @ z
    top = np.sort(logits)[::-1]
    return int(np.argmax(logits)), top[0] - top[1]


@pytest.mark.parametrize("model, attention, matmul", [
    ("tiny4", "xla", "xla"), pytest.param("tiny_llama", "ffi", "kernel", marks=pytest.mark.slow)])
def test_served_drafts_equal_the_definition(request, model, attention, matmul):
    """Every generated token exits at the ramp (threshold 0), so each is the block + head's draft
    over the previous tokens; batched with arrivals, over the paged pool, it equals the float64
    reference at every token whose top-2 margin clears float32 noise. Both attention paths; the
    packed projection kernel (its block packs the ramp's Q with the layer's K/V) and XLA's dot."""
    from drex_jax.model.kernels import ffi, matmul as kernel

    if (attention == "ffi" and not ffi.available()) or (matmul == "kernel" and not kernel.available()):
        pytest.skip("no C++ compiler for the CPU kernels")
    cfg, params = request.getfixturevalue(model)
    layer = 2
    heads = _heads(cfg, params, (layer,), 0)
    rng = np.random.default_rng(1)
    prompts = [list(rng.integers(0, cfg.vocab_size, rng.integers(2, 9))) for _ in range(6)]
    ee = EEConfig((layer,), 0.0, missing_kv="propagate", head="trained")
    eng = Engine.from_params(cfg, params, max_slots=4, page_size=4, ee=ee, policy="rebatching", art=False,
                             exit_heads=heads, attention=attention, matmul=matmul)
    assert (eng.matmul, eng.runner.ee_state is not eng.runner.state) == (matmul, True)
    got = serve_with_arrivals(eng, prompts, GenerationConfig(max_new_tokens=8), first=0, every=2, per_arrival=2)
    nv = NaiveEE(params, cfg)
    checked = 0
    for i, prompt in enumerate(prompts):
        toks = got[i].token_ids
        assert got[i].exit_layers[1:] == [layer] * 7, got[i].exit_layers  # the first token is the prefill's
        for n in range(1, 8):
            want, margin = _reference_draft(nv, cfg, heads, 0, layer, prompt + toks[:n])
            if margin < 1e-4:
                break  # a near-tie: float32 may pick either, and the texts part from here
            assert toks[n] == want, f"request {i} token {n}"
            checked += 1
    assert checked >= 30, checked


def test_blocks_change_the_drafts(tiny4):
    """The same heads without their blocks draft differently (else the test above proves little)."""
    cfg, params = tiny4
    heads = _heads(cfg, params, (2,), 0)
    ee = EEConfig((2,), 0.0, missing_kv="propagate", head="trained")
    prompts = [[3, 9, 4, 1], [7, 7, 2], [11, 5, 8, 30, 2]]
    gc = GenerationConfig(max_new_tokens=8)
    outs = []
    for h in (heads, {k: heads[k] for k in ("norm", "down", "up")}):
        eng = Engine.from_params(cfg, params, max_slots=4, page_size=4, ee=ee, policy="rebatching", art=False,
                                 exit_heads=h)
        outs.append([r.token_ids for r in eng.generate(prompts, gc)])
    assert outs[0] != outs[1]


def test_verify_with_draft_blocks_equals_full_depth(tiny4):
    cfg, params = tiny4
    layers = (1, 2, 3)
    heads = _heads(cfg, params, layers, 2)
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(0, cfg.vocab_size, rng.integers(2, 12))) for _ in range(10)]
    gc = GenerationConfig(max_new_tokens=16)
    full = serve_with_arrivals(Engine.from_params(cfg, params, max_slots=8, page_size=4), prompts, gc, first=0,
                               every=3, per_arrival=3)
    ee = EEConfig(layers, (0.3, 0.3, 0.3), missing_kv="recompute", verify=True, max_draft=4, head="trained")
    eng = Engine.from_params(cfg, params, max_slots=8, page_size=4, ee=ee, policy="rebatching", art=False,
                             exit_heads=heads)
    got = serve_with_arrivals(eng, prompts, gc, first=0, every=3, per_arrival=3)
    for i in range(len(prompts)):
        assert got[i].token_ids == full[i].token_ids, f"request {i}"
    st = eng.ee_stats
    drafted, accepted = sum(st.drafts_per_ramp), sum(st.accepted_per_ramp)
    assert drafted > 0 and 0 < accepted < drafted, st
    assert eng.num_free_pages == eng.allocator.capacity and eng.num_free_slots == 8


def test_heads_round_trip_and_checks(tiny4, tmp_path):
    cfg, params = tiny4
    heads = _heads(cfg, params, (1, 3), 4)
    save_heads(str(tmp_path), heads, {"exit_layers": [1, 3]})
    loaded, _ = load_heads(str(tmp_path))
    assert set(loaded) == set(heads)
    for k in heads:
        np.testing.assert_array_equal(loaded[k], np.asarray(heads[k], np.float32))
    from drex_jax.draft_attention import block_weights

    with pytest.raises(ValueError, match="2 draft attention blocks for 1 ramps"):
        block_weights(params, cfg, (1,), heads)
    with pytest.raises(ValueError, match=r"ramp 4 is not in \[1, 3\]"):
        block_weights(params, cfg, (1, 4), heads)


@pytest.mark.slow  # ~25 s
def test_training_computes_the_served_function_and_lowers_kl(tiny_llama):
    """`train_drafts`: its dense draft logits (teacher-forced over whole sequences) equal the float64
    definition the engine is tested against, and a few optax steps lower the distillation KL while
    only the heads and blocks are trained (the trunk is read, never updated)."""
    import jax
    import jax.numpy as jnp
    import optax

    from drex_jax.model.decoder import forward_hidden
    from drex_jax.train_drafts import distill_loss, draft_logits, frozen_layers, init_heads

    cfg, params = tiny_llama
    layers = (1, 2)
    heads = {k: np.asarray(v, np.float32) for k, v in _heads(cfg, params, layers, 5).items()}
    rng = np.random.default_rng(3)
    W, lengths = 16, np.array([16, 11, 7], np.int32)
    toks = rng.integers(0, cfg.vocab_size, (3, W)).astype(np.int32)
    hs = np.asarray(forward_hidden(params, cfg, jnp.asarray(toks), jnp.asarray(lengths)))  # [L+1, B, W, H]
    frozen = frozen_layers(params, cfg, layers)
    rows = jnp.asarray(params["embed"] if cfg.tie_word_embeddings else params["lm_head"].T)
    nv = NaiveEE(params, cfg)
    for r, e in enumerate(layers):
        lg = np.asarray(draft_logits(cfg, frozen[r], {k: jnp.asarray(v[r]) for k, v in heads.items()},
                                     jnp.asarray(hs[e]), jnp.asarray(lengths), rows))
        for b, p in ((0, 15), (1, 10), (2, 3), (2, 0)):
            want, margin = _reference_draft(nv, cfg, heads, r, e, list(toks[b, :p + 1]))
            assert margin > 1e-4 and int(np.argmax(lg[b, p])) == want, (r, b, p)

    fresh = jax.tree.map(jnp.asarray, init_heads(params, cfg, layers, 8, 0))
    np.testing.assert_array_equal(fresh["draft_wq"][1], np.asarray(frozen[1]["wq"]))  # starts as the layer's own
    tx = optax.adam(1e-2)
    args = (jnp.asarray(hs[list(layers)]), jnp.asarray(hs[-1]), jnp.asarray(lengths), rows)

    def loss(h):
        return distill_loss(cfg, frozen, h, jnp.asarray(params["final_norm"]), *args)

    h, opt = fresh, tx.init(fresh)
    first = float(loss(h))
    for _ in range(20):
        g = jax.grad(loss)(h)
        upd, opt = tx.update(g, opt, h)
        h = optax.apply_updates(h, upd)
    assert float(loss(h)) < 0.7 * first, (first, float(loss(h)))
