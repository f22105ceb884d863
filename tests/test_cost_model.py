"""The cost model behind `drex-jax plan --project`: calibration recovers a known machine, the
early-exit schedule against hand-computed cases, validation and projection end to end."""
import json
import math

import pytest

from drex_jax.cli import main
from drex_jax.model.config import config_from_hf
from drex_jax.plan import load_model_config
from drex_jax.projection import calibration_points, project, split_grid, validate
from drex_jax.sched import cost_model as cm

PEAK, BW = 200e9, 40e9
TRUE = cm.Calibration(bandwidth_efficiency=0.6, compute_efficiency=0.4, call_overhead_s=2e-3)


def _cfg():
    return config_from_hf(dict(architectures=["LlamaForCausalLM"], vocab_size=1000, hidden_size=256,
                               intermediate_size=512, num_hidden_layers=8, num_attention_heads=4,
                               num_key_value_heads=2, max_position_embeddings=4096))


def _synthetic_roofline(cfg, cal=TRUE):
    """What `bench --roofline` would write on a machine that follows the model exactly."""
    points = []
    for b in (1, 4, 16, 64):
        for c in (128, 1024):
            nb, fl = cm.segment_cost(cfg, 4, b, c, head_columns=cfg.vocab_size)
            ms = 1e3 * cm.call_time(cfg, 4, b, c, PEAK, BW, cal, head_columns=cfg.vocab_size)
            segs = {}
            for name, s, e, cols in (("shallow", 0, 2, 100), ("deep", 2, 8, cfg.vocab_size)):
                sb, sf = cm.segment_cost(cfg, 4, b, c, s, e, cols)
                segs[name] = {"bytes": sb, "flops": sf, "ms": 1e3 * cm.call_time(cfg, 4, b, c, PEAK, BW, cal, s, e, cols)}
            points.append({"batch": b, "context": c, "bytes": nb, "flops": fl, "ms_per_step": ms, "segment_calls": segs})
    return {"peak_flops": PEAK, "bandwidth": BW, "points": points, "machine": "synthetic"}


def test_fit_recovers_a_known_machine():
    cfg = _cfg()
    r = _synthetic_roofline(cfg)
    cal = cm.fit_calibration(calibration_points(r), PEAK, BW)
    assert cal.bandwidth_efficiency == pytest.approx(0.6, rel=1e-6)
    assert cal.compute_efficiency == pytest.approx(0.4, rel=1e-6)
    assert cal.call_overhead_s == pytest.approx(2e-3, rel=1e-6)
    with pytest.raises(ValueError, match="at least 3"):
        cm.fit_calibration(calibration_points(r)[:2], PEAK, BW)


def test_early_exit_schedule_hand_computed():
    cfg = _cfg()
    free = cm.Calibration(1.0, 1.0, 0.0)
    # nobody exits: the schedule runs every layer plus two ramp heads and two more calls
    none = cm.early_exit_speedup(cfg, 4, 8, 256, (2, 5), (0.0, 0.0, 1.0), PEAK, BW, TRUE, ramp_vocab=100)
    assert none["speedup"] < 1 and none["gated"] == 1.0 and none["ideal"] == 1.0
    # everyone exits at the first ramp: only layers 0-2 and the ramp head run
    allout = cm.early_exit_speedup(cfg, 4, 8, 256, (2, 5), (1.0, 0.0, 0.0), PEAK, BW, free, ramp_vocab=100)
    seg = cm.call_time(cfg, 4, 8, 256, PEAK, BW, free, 0, 2, 100)
    assert allout["early_exit_s"] == pytest.approx(seg) and allout["ideal"] == 4.0
    # each of 8 tokens exits at ramp 1 with probability 1/2: the deep call runs the k that stayed,
    # padded to 1, 2, 4, 4, 8, 8, 8, 8 rows, with probability C(8, k) / 256 (none if k = 0)
    half = cm.early_exit_speedup(cfg, 4, 8, 256, (2,), (0.5, 0.5), PEAK, BW, free, ramp_vocab=100)
    pad = {1: 1, 2: 2, 3: 4, 4: 4, 5: 8, 6: 8, 7: 8, 8: 8}
    deep = sum(math.comb(8, k) / 256 * cm.call_time(cfg, 4, pad[k], 256, PEAK, BW, free, 2, 8, cfg.vocab_size)
               for k in range(1, 9))
    assert half["early_exit_s"] == pytest.approx(seg + deep)


def test_validation_on_a_model_machine_predicts_exactly():
    cfg = _cfg()
    r = _synthetic_roofline(cfg)
    cal_half, test_half = split_grid(r)
    assert len(cal_half) == len(test_half) == 4 and not {id(p) for p in cal_half} & {id(p) for p in test_half}
    res = validate(r, cfg=cfg)
    assert res["step_max_abs_error"] < 1e-6
    ee = {"ramp_vocab": 100, "rows": [{"ramps": [2, 5], "exit_share": 0.5, "batch": 16, "context": 128,
                                       "policy": "rebatching-noART", "speedup": 1.0}]}
    res = validate(r, ee, cfg)
    pred = cm.early_exit_speedup(cfg, 4, 16, 128, (2, 5), (0.25, 0.25, 0.5), PEAK, BW, TRUE, 100)["speedup"]
    assert res["early_exit"][0]["predicted"] == pytest.approx(pred, rel=1e-6)
    assert res["early_exit"][0]["error"] == pytest.approx(pred - 1, rel=1e-6)


def test_projection_is_labelled_and_scales_with_the_card():
    cfg = load_model_config("llama3-8b")
    h100, h200 = cm.CARDS["h100"], cm.CARDS["h200"]
    cal = cm.Calibration(0.7, 0.5, 60e-6)
    a = project(cfg, h100, cal, [1], [2048], [8, 16, 24], [0.5])
    b = project(cfg, h200, cal, [1], [2048], [8, 16, 24], [0.5])
    # batch 1 streams the weights: bandwidth-bound, so the H200 (4.8 vs 3.35 TB/s) is faster
    assert a["steps"][0]["bound"] == "bandwidth" and b["steps"][0]["step_ms"] < a["steps"][0]["step_ms"]
    nbytes, flops = cm.segment_cost(cfg, 2, 1, 2048, head_columns=cfg.vocab_size)
    want = nbytes / (0.7 * 3.35e12) + flops / (0.5 * 989.4e12) + 60e-6
    assert a["steps"][0]["step_ms"] == pytest.approx(want * 1e3)
    # 16 GB of bf16 weights at 70 % of 3.35 TB/s: about 6.9 ms
    assert 6.0 < a["steps"][0]["step_ms"] < 8.0
    assert a["early_exit"][0]["ideal"] > 1 and a["early_exit"][0]["gated"] >= 1


def test_plan_project_and_validate_cli(tmp_path, capsys):
    assert main(["plan", "--model", "llama3-8b", "--project", "h100", "--batches", "1", "8", "--contexts", "2048"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("PROJECTION (not a measurement)") and "assumed" in out and "H100" in out
    path = tmp_path / "roofline.json"
    path.write_text(json.dumps(_synthetic_roofline(_cfg())))
    assert main(["plan", "--model", "llama2-7b", "--project", "h200", "--calibration", str(path)]) == 0
    assert "fitted on" in capsys.readouterr().out
    assert main(["plan", "--model", "llama2-7b", "--validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "half of the roofline grid (4 points)" in out and "max |error| 0%" in out


def test_verify_speedup_hand_computed():
    """One accepted draft per deep pass (f = 50 %) at acceptance 1: per two emitted tokens, two
    draft calls and one deep call over two positions (weights read once, FLOPs twice)."""
    cfg = _cfg()
    cal = TRUE
    t = lambda nb, fl: nb / (cal.bandwidth_efficiency * BW) + fl / (cal.compute_efficiency * PEAK)  # noqa: E731
    fused = t(*cm.segment_cost(cfg, 4, 2, 256, head_columns=cfg.vocab_size)) + cal.call_overhead_s
    draft = t(*cm.segment_cost(cfg, 4, 2, 256, 0, 3, 100)) + cal.call_overhead_s
    nb, fl = cm.segment_cost(cfg, 4, 2, 256, 3, 8, cfg.vocab_size)
    deep = nb / (cal.bandwidth_efficiency * BW) + 2 * fl / (cal.compute_efficiency * PEAK) + cal.call_overhead_s
    r = cm.verify_speedup(cfg, 4, 2, 256, 3, 0.5, 1.0, PEAK, BW, cal, ramp_vocab=100)
    assert r["accepted_per_pass"] == pytest.approx(1.0)
    assert r["verify_s_per_token"] == pytest.approx((2 * draft + deep) / 2)
    assert r["speedup"] == pytest.approx(fused / ((2 * draft + deep) / 2))
    # no drafts: every token pays a draft call and a deep call, slower than the fused step
    assert cm.verify_speedup(cfg, 4, 2, 256, 3, 0.0, 1.0, PEAK, BW, cal, 100)["speedup"] < 1
    # rejected drafts cost their draft calls: lower acceptance, lower speed-up at the same share
    lo = cm.verify_speedup(cfg, 4, 2, 256, 3, 0.5, 0.5, PEAK, BW, cal, 100)["speedup"]
    assert lo < r["speedup"]
    with pytest.raises(ValueError, match="draft_share"):
        cm.verify_speedup(cfg, 4, 2, 256, 3, 1.0, 1.0, PEAK, BW, cal)
