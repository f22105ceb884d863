"""`drex-jax plan --project` and `--validate`: decode step times and early-exit speed-ups from the
cost model (`sched.cost_model`), projected onto a card, and the method checked on the machine
where roofline results were measured (calibrate on half of the grid, predict the other half and
the replayed-trace early-exit speed-ups).

A projection is arithmetic on published peak figures and assumed efficiencies, never a
measurement; every output says so and lists its assumptions.
"""
from __future__ import annotations

import dataclasses
import json

from drex_jax.model.config import ModelConfig
from drex_jax.sched import cost_model as cm

# assumed fractions of an H100/H200's roofline for this engine's decode until a GPU run calibrates
# them (`drex-jax bench --roofline` on the card, then `plan --project CARD --calibration FILE`)
GPU_ASSUMPTION = cm.Calibration(bandwidth_efficiency=0.7, compute_efficiency=0.5, call_overhead_s=60e-6,
                                source="assumed: 70 % of HBM bandwidth, 50 % of bf16 peak, 60 us per device call "
                                       "(JAX dispatch + host round trip); not measured on a GPU")


VERIFY_SHARES = (0.3, 0.5, 0.7)
VERIFY_ACCEPTANCE = (0.6, 0.8, 0.95)


def calibration_points(roofline: dict) -> list[dict]:
    """Every timed call of a roofline result: the fused step per point and, where recorded, its
    unequal segment pair (calls of fewer layers separate a call's fixed cost from weight reads)."""
    out = []
    for p in roofline["points"]:
        out.append({"batch": p["batch"], "context": p["context"], "bytes": p["bytes"], "flops": p["flops"],
                    "ms_per_step": p["ms_per_step"], "kind": "full"})
        for name, seg in (p.get("segment_calls") or {}).items():
            out.append({"batch": p["batch"], "context": p["context"], "bytes": seg["bytes"], "flops": seg["flops"],
                        "ms_per_step": seg["ms"], "kind": name})
    return out


def split_grid(roofline: dict) -> tuple[list[dict], list[dict]]:
    """Half of the roofline points (alternating over batch x context, so both halves span the
    grid) and the other half."""
    pts = sorted(roofline["points"], key=lambda p: (p["batch"], p["context"]))
    return pts[::2], pts[1::2]


def validate(roofline: dict, ee: dict | None = None, cfg: ModelConfig | None = None, itemsize: int = 4) -> dict:
    """Calibrate on half of `roofline`'s grid; predict the other half's step times and (given an
    `--ee-efficiency` result) its rebatching speed-ups. Errors are (predicted - measured) / measured."""
    peak, bw = roofline["peak_flops"], roofline["bandwidth"]
    cal_half, test_half = split_grid(roofline)
    cal = cm.fit_calibration(calibration_points({"points": cal_half}), peak, bw,
                             source=f"half of the roofline grid ({len(cal_half)} points)")
    steps = []
    for p in test_half:
        pred = (p["bytes"] / (cal.bandwidth_efficiency * bw) + p["flops"] / (cal.compute_efficiency * peak)
                + cal.call_overhead_s)
        steps.append({"batch": p["batch"], "context": p["context"], "measured_ms": p["ms_per_step"],
                      "predicted_ms": pred * 1e3, "error": pred * 1e3 / p["ms_per_step"] - 1})
    out = {"calibration": dataclasses.asdict(cal), "steps": steps,
           "step_max_abs_error": max(abs(s["error"]) for s in steps)}
    if ee is not None and cfg is not None:
        rows = []
        for r in ee["rows"]:
            if not r["policy"].startswith("rebatching"):
                continue
            fr = tuple([r["exit_share"] / len(r["ramps"])] * len(r["ramps"]) + [1 - r["exit_share"]])
            pr = cm.early_exit_speedup(cfg, itemsize, r["batch"], r["context"], tuple(r["ramps"]), fr, peak, bw, cal,
                                       ee.get("ramp_vocab"))
            gated = r["policy"] == "rebatching"  # ART + ramp gate; -noART is the plain pipeline
            want = pr["gated"] if gated else pr["speedup"]
            rows.append({k: r[k] for k in ("ramps", "exit_share", "batch", "context", "policy")}
                        | {"measured": r["speedup"], "predicted": want, "error": want / r["speedup"] - 1})
        out["early_exit"] = rows
        out["ee_max_abs_error"] = max((abs(x["error"]) for x in rows), default=None)
    return out


def project(cfg: ModelConfig, card: cm.Card, cal: cm.Calibration, batches, contexts, ramps, exit_shares,
            itemsize: int = 2, ramp_vocab: int | None = None) -> dict:
    steps, ee = [], []
    for b in batches:
        for c in contexts:
            nbytes, flops = cm.segment_cost(cfg, itemsize, b, c, head_columns=cfg.vocab_size)
            roof, bound = cm.roofline_s(nbytes, flops, card.peak_flops, card.bandwidth)
            t = cm.call_time(cfg, itemsize, b, c, card.peak_flops, card.bandwidth, cal, head_columns=cfg.vocab_size)
            steps.append({"batch": b, "context": c, "step_ms": t * 1e3, "tok_s": b / t, "roofline_ms": roof * 1e3,
                          "bound": bound, "pct_roofline": 100 * roof / t})
            for share in exit_shares:
                fr = tuple([share / len(ramps)] * len(ramps) + [1 - share])
                r = cm.early_exit_speedup(cfg, itemsize, b, c, tuple(ramps), fr, card.peak_flops, card.bandwidth,
                                          cal, ramp_vocab)
                ee.append({"batch": b, "context": c, "exit_share": share, "ideal": r["ideal"],
                           "speedup": r["speedup"], "gated": r["gated"]})
    verify = []  # verify mode at each ramp, first context, over a grid of draft share x acceptance
    for b in batches:
        for ramp in ramps:
            for share in VERIFY_SHARES:
                for acc in VERIFY_ACCEPTANCE:
                    r = cm.verify_speedup(cfg, itemsize, b, contexts[0], ramp, share, acc, card.peak_flops,
                                          card.bandwidth, cal, ramp_vocab)
                    verify.append({"batch": b, "context": contexts[0], "ramp": ramp, "draft_share": share,
                                   "acceptance": acc, "speedup": r["speedup"]})
    return {"card": dataclasses.asdict(card), "calibration": dataclasses.asdict(cal), "itemsize": itemsize,
            "ramps": list(ramps), "steps": steps, "early_exit": ee, "verify": verify}


def format_projection(res: dict, cfg: ModelConfig) -> str:
    card, cal = res["card"], res["calibration"]
    lines = [
        f"PROJECTION (not a measurement) for {card['name']}: {cfg.architecture}, {cfg.num_layers} layers, "
        f"{res['itemsize'] * 8}-bit weights and KV, one device",
        f"  card: {card['peak_flops'] / 1e12:.0f} TFLOP/s, {card['bandwidth'] / 1e12:.2f} TB/s ({card['source']})",
        f"  efficiency: {cal['bandwidth_efficiency']:.2f} of bandwidth, {cal['compute_efficiency']:.2f} of peak, "
        f"{cal['call_overhead_s'] * 1e6:.0f} us per device call ({cal['source']})",
        f"  early exit: ramps {res['ramps']}, exits spread evenly over them; rebatching runs each segment for the "
        "rows that reach it (row buckets), the ramp gate keeps the fused step where that is slower",
        "", "| batch | context | step ms | tok/s | roofline ms | bound | % of roofline |", "|---:|---:|---:|---:|---:|---|---:|"]
    for s in res["steps"]:
        lines.append(f"| {s['batch']} | {s['context']} | {s['step_ms']:.2f} | {s['tok_s']:.0f} | {s['roofline_ms']:.2f} | "
                     f"{s['bound']} | {s['pct_roofline']:.0f} |")
    lines += ["", "| batch | context | exit share | ideal L/depth | rebatching | with ramp gate |",
              "|---:|---:|---:|---:|---:|---:|"]
    for e in res["early_exit"]:
        lines.append(f"| {e['batch']} | {e['context']} | {e['exit_share']:.0%} | {e['ideal']:.2f}x | "
                     f"{e['speedup']:.2f}x | {e['gated']:.2f}x |")
    if res.get("verify"):
        lines += ["", "verify mode (one ramp; rows in phase: the best case), speed-up over the fused step by the share "
                  "of emitted tokens that are accepted drafts (f) and the drafts' acceptance (a):", "",
                  "| batch | context | ramp | " + " | ".join(f"f {f:.0%} a {a:.0%}" for f in VERIFY_SHARES
                                                             for a in VERIFY_ACCEPTANCE) + " |",
                  "|---:|---:|---:|" + "---:|" * (len(VERIFY_SHARES) * len(VERIFY_ACCEPTANCE))]
        keys = dict.fromkeys((v["batch"], v["context"], v["ramp"]) for v in res["verify"])
        for b, c, ramp in keys:
            cells = [f"{v['speedup']:.2f}x" for v in res["verify"] if (v["batch"], v["context"], v["ramp"]) == (b, c, ramp)]
            lines.append(f"| {b} | {c} | {ramp} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_validation(res: dict) -> str:
    cal = res["calibration"]
    lines = [f"Cost model calibrated on {cal['source']}: {cal['bandwidth_efficiency']:.2f} of bandwidth, "
             f"{cal['compute_efficiency']:.2f} of peak, {cal['call_overhead_s'] * 1e3:.2f} ms per call", "",
             "| batch | context | measured ms | predicted ms | error |", "|---:|---:|---:|---:|---:|"]
    for s in res["steps"]:
        lines.append(f"| {s['batch']} | {s['context']} | {s['measured_ms']:.1f} | {s['predicted_ms']:.1f} | "
                     f"{s['error']:+.0%} |")
    lines.append(f"\nstep times: max |error| {res['step_max_abs_error']:.0%}")
    if res.get("early_exit"):
        lines += ["", "| ramps | exit share | batch | context | policy | measured speed-up | predicted | error |",
                  "|---|---:|---:|---:|---|---:|---:|---:|"]
        for e in res["early_exit"]:
            lines.append(f"| {e['ramps']} | {e['exit_share']:.0%} | {e['batch']} | {e['context']} | {e['policy']} | "
                         f"{e['measured']:.2f}x | {e['predicted']:.2f}x | {e['error']:+.0%} |")
        lines.append(f"\nearly-exit speed-ups: max |error| {res['ee_max_abs_error']:.0%}")
    return "\n".join(lines)


def load_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def calibration_from_file(path: str) -> cm.Calibration:
    """Fit on every point of a roofline result (e.g. one measured on the card itself)."""
    r = load_json(path)
    return cm.fit_calibration(calibration_points(r), r["peak_flops"], r["bandwidth"],
                              source=f"fitted on {path} ({r.get('machine', '?')})")

