"""Exit heads on disk: the bundled SmolLM2 heads fit their model and are used with no training
step; heads refuse a model they were not trained for, naming what differs."""
import dataclasses
import hashlib
import os

import jax
import numpy as np
import pytest

from drex_jax.exit_heads import (
    find_heads, load_heads, load_token_ranking, model_fingerprint, read_meta, save_heads, shipped_heads_dir,
)
from drex_jax.model.ramps import init_ramp_heads


def test_shipped_heads_fit_the_default_model_and_carry_provenance(default_model):
    cfg, params, _ = default_model
    from drex_jax.default_model import default_model_path

    path = find_heads(default_model_path(), cfg, params)
    assert path == shipped_heads_dir()
    heads, meta = load_heads(path, cfg, params)
    R = len(meta["exit_layers"])
    assert heads["down"].shape == (R, cfg.hidden_size, meta["rank"]) and np.abs(heads["up"]).max() > 0
    assert len(meta["thresholds"]) == R
    assert sorted(load_token_ranking(path).tolist()) == list(range(cfg.vocab_size))  # a permutation of ids
    prov = meta["provenance"]
    assert prov["command"].startswith("drex-jax train-exits") and prov["config"]["seed"] == 0
    assert {"train", "calibration", "held_out"} <= set(prov["data"]) and prov["versions"]["jax"]
    held = meta["held_out"]
    assert held["prompts"] == 40 and 0.9 <= held["prefix_agreement"] <= 1.0 and held["mean_depth"] < cfg.num_layers
    # the hash is an independent sha256 of the tied LM head rounded to bf16
    w = np.asarray(jax.numpy.asarray(params["embed"]).T.astype(jax.numpy.bfloat16))
    assert meta["model"]["lm_head_sha256"] == hashlib.sha256(np.ascontiguousarray(w).tobytes()).hexdigest()


def test_heads_refuse_a_different_model(default_model, tiny_llama):
    cfg, params, _ = default_model
    tcfg, tparams = tiny_llama
    with pytest.raises(ValueError, match=r"num_layers: heads 30 vs model 3.*hidden_size: heads 576 vs model 64.*"
                                         r"vocab_size: heads 49152 vs model 101.*lm_head_sha256"):
        load_heads(shipped_heads_dir(), tcfg, tparams)
    # same shapes, one changed LM-head value: only the hash differs
    changed = {**params, "embed": params["embed"].at[7, 3].add(1.0)}
    with pytest.raises(ValueError, match=r"different model: lm_head_sha256: heads '[0-9a-f]{64}' vs model") as e:
        load_heads(shipped_heads_dir(), cfg, changed)
    assert "num_layers" not in str(e.value)
    assert find_heads(None, tcfg, tparams) is None and find_heads(None, cfg, changed) is None


def test_fingerprint_is_the_same_for_fp32_and_bf16(default_model):
    cfg, params, _ = default_model
    bf16 = jax.tree.map(lambda a: a.astype(jax.numpy.bfloat16), params)
    assert model_fingerprint(cfg, bf16) == model_fingerprint(cfg, params)


def test_save_load_round_trip(tmp_path, tiny_llama):
    cfg, params = tiny_llama
    heads = init_ramp_heads(params, cfg, 2, 4, jax.random.key(0))
    heads = {**heads, "up": heads["up"] + 0.5}
    ranking = np.random.default_rng(0).permutation(cfg.vocab_size)
    meta = {"exit_layers": [1, 2], "rank": 4, "model": model_fingerprint(cfg, params)}
    save_heads(str(tmp_path), heads, meta, ranking)
    got, got_meta = load_heads(str(tmp_path), cfg, params)
    for k in heads:
        np.testing.assert_array_equal(got[k], np.asarray(heads[k]))
    np.testing.assert_array_equal(load_token_ranking(str(tmp_path)), ranking)
    assert got_meta == read_meta(str(tmp_path)) == meta
    assert find_heads(str(tmp_path.parent), cfg, params) is None  # MODEL/exit_heads is the place it looks
    os.rename(tmp_path, tmp_path.parent / "exit_heads")
    assert find_heads(str(tmp_path.parent), cfg, params) == str(tmp_path.parent / "exit_heads")


def test_engine_uses_the_shipped_heads_without_training(default_model):
    """A fresh install: Engine() with trained heads and a ramp vocabulary needs no train-exits run."""
    from drex_jax import Engine, GenerationConfig
    from drex_jax.early_exit import EEConfig

    meta = read_meta(shipped_heads_dir())
    ee = EEConfig(tuple(meta["exit_layers"]), tuple(meta["thresholds"]), head="trained", missing_kv="propagate",
                  ramp_vocab=meta["ramp_vocab"])
    eng = Engine(ee=ee, policy="rebatching", art=False, max_slots=2, max_seq_len=128)
    res = eng.generate(["Name three colors."], GenerationConfig(max_new_tokens=12), chat=True)
    assert len(res[0].token_ids) >= 1 and eng.ee_stats.tokens >= 1
    with pytest.raises(ValueError, match="different model"):
        cfg, params, tok = default_model
        bad = dataclasses.replace(cfg)
        Engine.from_params(bad, {**params, "embed": params["embed"] * 2}, tok, ee=ee,
                           exit_heads=shipped_heads_dir(), max_slots=1, max_seq_len=64)


def test_bundled_attention_heads_fit_and_name_their_adapter(default_model):
    """The context-aware draft heads ship beside the local ones (`--exit-heads attention`), fit the
    default model, carry their blocks and their provenance, and the CLI's names resolve to them."""
    from drex_jax.exit_heads import heads_dir_arg

    cfg, params, _ = default_model
    path = shipped_heads_dir("attention")
    assert heads_dir_arg("attention") == path and heads_dir_arg("local") == shipped_heads_dir()
    heads, meta = load_heads(path, cfg, params)
    R, Q = len(meta["exit_layers"]), cfg.num_heads * cfg.head_dim
    assert meta["adapter"] == "attention" and meta["provenance"]["config"]["adapter"] == "attention"
    assert heads["draft_wq"].shape == (R, Q, cfg.hidden_size) and heads["draft_wo"].shape == (R, cfg.hidden_size, Q)
    # trained away from their init (each ramp layer's own Q and output projections)
    from drex_jax.draft_attention import init_draft_attention

    init = init_draft_attention(params, cfg, meta["exit_layers"])
    assert all(np.abs(heads[k] - init[k]).max() > 1e-3 for k in init)
    assert [r["layer"] for r in meta["held_out"]["teacher_forced"]] == meta["exit_layers"]
    with pytest.raises(FileNotFoundError, match="no exit heads at 'nowhere'"):
        heads_dir_arg("nowhere")


@pytest.mark.manual  # two SmolLM2 engines, ~1 min (outside CI's budget; the tiny-model verify test runs there)
def test_bundled_attention_heads_verify_equals_full_depth():
    from drex_jax import Engine, GenerationConfig
    from drex_jax.early_exit import EEConfig

    prompts = ["Name three colors.", "Write a Python function that reverses a string."]
    gc = GenerationConfig(max_new_tokens=24)
    full = Engine(max_slots=2, max_seq_len=256).generate(prompts, gc, chat=True)
    ee = EEConfig((22,), 0.5, missing_kv="recompute", verify=True, head="trained", ramp_vocab=1024)
    eng = Engine(ee=ee, policy="rebatching", art=False, exit_heads=shipped_heads_dir("attention"), max_slots=2,
                 max_seq_len=256)
    got = eng.generate(prompts, gc, chat=True)
    assert [r.token_ids for r in got] == [r.token_ids for r in full]
    assert eng.runner.ee_state["draft_attention"] and sum(eng.ee_stats.accepted_per_ramp) > 0
