"""`drex-jax bench` pieces against hand-computed values, scale mode on a small shape, and a
tiny end-to-end run of the CLI."""
import json
import os

import numpy as np
import pytest

from drex_jax.bench import quality
from drex_jax.bench.workloads import humaneval, poisson_arrivals
from drex_jax.sched.exit_trace import ExitTrace


def test_token_agreement_and_rouge_l():
    assert quality.token_agreement([[1, 2, 3], [4, 5]], [[1, 2, 4], [4, 6]]) == pytest.approx(3 / 5)
    assert quality.rouge_l(["a b c d"], ["a b c d"]) == pytest.approx(1.0)
    # LCS("a b c d", "a c d") = 3: precision 3/3, recall 3/4, F = 2 * 1 * 0.75 / 1.75
    assert quality.rouge_l(["a c d"], ["a b c d"]) == pytest.approx(2 * 0.75 / 1.75)


def test_humaneval_pass_at_1_executes_in_a_subprocess():
    problems = humaneval(2, skip=0).problems
    canonical = [p["canonical_solution"] for p in problems]
    assert quality.humaneval_pass_at_1(problems, canonical) == 1.0
    assert quality.humaneval_pass_at_1(problems, ["    return None\n"] * 2) == 0.0
    assert quality.humaneval_pass_at_1(problems[:1], ["    while True:\n        pass\n"], timeout_s=1.0) == 0.0
    # text after a stop sequence is not part of the completion
    assert quality.cut_completion("    return 1\n\ndef other():\n    pass") == "    return 1\n"


def test_poisson_arrivals_rate():
    t = poisson_arrivals(20000, 4.0, seed=1)
    assert np.all(np.diff(t) >= 0) and np.mean(np.diff(t)) == pytest.approx(0.25, rel=0.03)
    with pytest.raises(ValueError, match="rate must be > 0"):
        poisson_arrivals(3, 0.0)


def test_exit_trace_reproduces_fractions():
    tr = ExitTrace((0.2, 0.3, 0.5), seed=0)
    n, depth = 100_000, np.full(100_000, 2)
    alive = np.ones(n, bool)
    for ramp in range(2):
        out = tr.wants_exit(ramp, n) & alive
        depth[out], alive = ramp, alive & ~out
    np.testing.assert_allclose(np.bincount(depth) / n, [0.2, 0.3, 0.5], atol=0.01)
    with pytest.raises(ValueError, match="summing to 1"):
        ExitTrace((0.5, 0.2))


@pytest.mark.slow  # 11 s
def test_scale_mode_small_shape(tmp_path):
    from drex_jax.bench.suite import run_scale
    from drex_jax.model.config import config_from_hf
    from drex_jax.model.params import param_specs
    from drex_jax.plan import PRESETS

    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"exit_layers": [8, 15, 22], "num_layers": 30, "fractions": [0.3, 0.2, 0.2, 0.3]}))
    results, meta = run_scale("tiny-llama", str(trace), batch=4, prompt_len=8, new_tokens=12,
                              policies=("off", "rebatching"), dtype="float32", peak_bandwidth=1e11, progress=False)
    assert meta["exit_layers"] == [2, 4, 6]  # same relative depths in 8 layers
    off, reb = results
    assert off.mean_depth == 8 and reb.mean_depth < 8 and reb.involuntary_exits == 0
    assert min(reb.exits_per_ramp) > 0
    cfg = config_from_hf(PRESETS["tiny-llama"])
    weights = sum(int(np.prod(s.shape)) for k, s in param_specs(cfg).items() if k != "embed") * 4
    kv = 4 * (8 + 12 / 2) * 2 * 8 * 2 * 32 * 4  # batch x mean context x K/V x layers x kv heads x head dim x fp32
    assert meta["decode_step_bytes"] == pytest.approx(weights + kv)
    assert meta["bandwidth_utilization"] == pytest.approx(meta["achieved_bandwidth_Bps"] / 1e11)
    with pytest.raises(ValueError, match="unknown scale preset"):
        run_scale("gpt-5", str(trace))


@pytest.mark.slow  # 24 s: the default suite stays under CI's 12 minutes
def test_bench_cli_end_to_end(tmp_path, capsys, default_model):
    from drex_jax.cli import main

    out = tmp_path / "bench"
    rc = main(["bench", "--workloads", "chat", "--num-prompts", "2", "--new-tokens", "4", "--policies", "off",
               "rebatching", "--thresholds", "0.9", "--batch-sizes", "--no-hf", "--out", str(out)])
    assert rc == 0
    data = json.loads((out / "results.json").read_text())
    labels = [r["label"] for r in data["runs"]]
    assert labels == ["off", "off online", "rebatching@0.9", "rebatching@0.9 online"]
    for r in data["runs"]:
        assert r["tokens"] == 2 * 4 and r["tok_s"] > 0 and len(r["token_ids"]) == 2
    assert data["runs"][0]["mean_depth"] == 30 and data["runs"][2]["token_agreement"] is not None
    assert "| rebatching@0.9 |" in capsys.readouterr().out
    for png in ("throughput_vs_threshold.png", "exit_depth.png", "latency_cdf.png"):
        assert os.path.getsize(out / png) > 1000
    trace = json.loads((out / "exit_trace.json").read_text())
    assert sum(trace["fractions"]) == pytest.approx(1.0)


def test_prefix_agreement_against_greedy_reference(tiny_llama):
    """The full model's own greedy output agrees 100%; one wrong last token costs exactly 1/n."""
    from drex_jax.bench.quality import prefix_agreement
    from tests.reference import greedy_reference

    cfg, params = tiny_llama
    prompts = [[3, 5, 7], [11, 2, 9, 4, 1]]
    outs = [greedy_reference(params, cfg, p, 6) for p in prompts]
    assert prefix_agreement(params, cfg, prompts, outs) == 1.0
    bad = [outs[0], outs[1][:-1] + [(outs[1][-1] + 1) % cfg.vocab_size]]
    assert prefix_agreement(params, cfg, prompts, bad) == 11 / 12


@pytest.mark.slow
def test_bench_peers_runs_drex_and_skips_missing_peers(tmp_path, monkeypatch, default_model):
    """`drex-jax bench --peers` where no peer venv exists: each peer is skipped with its reason, the
    drex_jax rows are measured, and full depth's greedy tokens equal a plain `Engine.generate`."""
    from drex_jax import Engine, GenerationConfig
    from drex_jax.bench import peers
    from drex_jax.cli import main

    monkeypatch.setattr(peers, "PEERS_DIR", str(tmp_path / "no-peers"))
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # main() sets it for the peer workers
    out = tmp_path / "peers"
    assert main(["bench", "--peers", "--peers-batches", "1", "--peers-rounds", "1", "--peers-new-tokens", "4",
                 "--out", str(out)]) == 0
    data = json.loads((out / "peers.json").read_text())
    assert set(data["skipped"]) == {"vllm", "llama.cpp F32", "llama.cpp Q4_1"}
    assert all("no-peers" in why for why in data["skipped"].values())
    rows = {r["engine"]: r for r in data["rows"]}
    assert set(rows) == {"drex full", "drex early-exit"}
    for r in rows.values():
        assert r["batch"] == 1 and r["decode_tok_s"] > 0 and r["e2e_tok_s"] > 0 and r["ttft_all_s"] > 0
    assert 1 <= rows["drex early-exit"]["mean_depth"] <= 30
    engine = Engine(max_slots=1)
    prompt = peers.prompt_ids(engine.tokenizer, peers.N_PROMPTS)[0]
    assert data["meta"]["prompt_tokens"] == [len(prompt)]
    ref = engine.generate([prompt], GenerationConfig(max_new_tokens=4, ignore_eos=True))[0].token_ids
    assert data["greedy_tokens"]["drex full b1"] == [ref]
    assert "| drex full | 1 |" in (out / "peers.md").read_text() and os.path.getsize(out / "peers.png") > 1000
