"""`drex-jax bench --ee-efficiency`: how close the early-exit machinery gets to its ideal speed-up
for a given exit distribution, on replayed exit traces.

Exits come from an `ExitTrace` (seeded per-token decisions with fixed per-ramp shares), not from
the ramps' confidences, so the exit distribution is the independent variable and model quality
is out of the picture. Per point (exit share, ramps, batch, context) each policy decodes the
same requests; `off` is the plain fused decode step (no early exit), measured in the same run.

Two ideals per point: `ideal` = L / mean depth (layers saved, nothing else counted), and
`ideal_roofline` = the fused step's roofline time over the early-exit schedule's roofline time
when every segment runs full batches: sum over segments of (share of tokens reaching it) x (its
layers + its ramp head at this batch and context). Efficiency = measured speed-up / ideal.
"""
from __future__ import annotations

import statistics
import sys
import time

import numpy as np

FULL_GRID = {"exit_shares": (0.1, 0.3, 0.5, 0.7), "ramps": ((15,), (8, 15, 22)), "batches": (8, 32),
             "contexts": (128, 512)}
QUICK_GRID = {"exit_shares": (0.3, 0.7), "ramps": ((8, 15, 22),), "batches": (32,), "contexts": (128,)}
MAX_ROUNDS = 4
# (label, policy, ART)
POLICIES = (("off", "off", False), ("eager", "eager", False), ("lazy", "lazy", False),
            ("rebatching", "rebatching", True), ("rebatching-noART", "rebatching", False))


def trace_fractions(exit_share: float, num_ramps: int) -> tuple[float, ...]:
    """`exit_share` of tokens exit, spread evenly over the ramps; the rest run full depth."""
    if not 0 <= exit_share <= 1:
        raise ValueError(f"exit share must be in [0, 1], got {exit_share}")
    return tuple([exit_share / num_ramps] * num_ramps + [1 - exit_share])


def ideal_speedups(cfg, params, ramps: tuple[int, ...], fractions, batch: int, context: int, peak: float,
                   bandwidth: float, ramp_vocab: int | None) -> tuple[float, float]:
    """(L / mean depth, roofline-model ideal counting each segment's ramp head)."""
    from drex_jax.bench.roofline import decode_cost

    L = cfg.num_layers
    bounds = (0,) + tuple(ramps) + (L,)
    mean_depth = sum(f * e for f, e in zip(fractions, tuple(ramps) + (L,)))

    def roof(start, end, cols):
        nbytes, flops = decode_cost(cfg, params, batch, context, start, end, head_columns=cols)
        return max(nbytes / bandwidth, flops / peak)

    full = roof(0, L, cfg.vocab_size)
    reach, schedule = 1.0, 0.0
    for s in range(len(bounds) - 1):
        last = s == len(bounds) - 2
        schedule += reach * roof(bounds[s], bounds[s + 1], cfg.vocab_size if last else (ramp_vocab or cfg.vocab_size))
        reach -= fractions[s] if not last else 0
    return L / mean_depth, full / schedule


def measure(cfg, params, heads_dir: str | None, policy: str, art: bool, ramps, fractions, batch: int,
            context: int, new_tokens: int, ramp_vocab: int | None, seed: int = 0, matmul: str = "auto") -> dict:
    """Decode tokens/s of `batch` requests of `context` random prompt tokens, prefill excluded.
    The workload runs on one engine at least twice, and again (up to MAX_ROUNDS) until a round
    compiles nothing; the last round is timed (ART and the ramp gate have measured by then)."""
    from drex_jax import Engine, GenerationConfig, compile_counter
    from drex_jax.early_exit import EEConfig
    from drex_jax.sched.exit_trace import ExitTrace

    kw = {}
    if policy != "off":
        ee = EEConfig(tuple(ramps), 0.5, missing_kv="propagate", head="trained" if heads_dir else "shared",
                      ramp_vocab=ramp_vocab)
        kw = dict(ee=ee, policy=policy, art=art, exit_heads=heads_dir,
                  exit_trace=ExitTrace.for_ramps(fractions, len(ramps), seed))
    eng = Engine.from_params(cfg, params, max_slots=batch, max_seq_len=context + new_tokens + 8,
                             max_prefill_tokens_per_step=batch * context, matmul=matmul, **kw)
    rng = np.random.default_rng(seed)
    prompts = [[int(t) for t in rng.integers(0, cfg.vocab_size, context)] for _ in range(batch)]
    gc = GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True)
    out = {}
    # the same workload again until a round compiles nothing (ART, the ramp gate and new row-count
    # combinations can first appear in later rounds): that round is the timed one
    for rnd in range(MAX_ROUNDS):
        if rnd >= 2 and out.get("compiled_in_timed_round") == 0:
            break
        for p in prompts:
            eng.submit(p, gc)
        # admits and prefills every request (the budget holds all of them), plus a first decode step;
        # the timed loop counts the tokens finalized after it
        first = sum(ev.token_id >= 0 for ev in eng.step())
        stats0 = _stats(eng)
        compiles = compile_counter.count()
        steps, decode_tokens, t0 = 0, 0, time.perf_counter()
        while eng.has_work:
            decode_tokens += sum(ev.token_id >= 0 for ev in eng.step())
            steps += 1
        dt = time.perf_counter() - t0
        stats1 = _stats(eng)
        out = {"tok_s": decode_tokens / dt, "seconds": dt, "iterations": steps, "decode_tokens": decode_tokens,
               "first_step_tokens": first, "rounds": rnd + 1,
               "compiled_in_timed_round": compile_counter.count() - compiles}
        if stats1 is not None:
            d = {k: stats1[k] - stats0[k] for k in ("tokens", "layers_run", "segment_calls", "involuntary_exits",
                                                   "involuntary_stays", "art_declined", "round_trips",
                                                   "fused_iterations", "gate_probes")}
            out.update(mean_depth=d["layers_run"] / max(d["tokens"], 1), host_round_trips_per_iteration=
                       d["round_trips"] / max(steps, 1), segment_calls_per_iteration=d["segment_calls"] / max(steps, 1),
                       fused_iterations=d["fused_iterations"], gate_probes=d["gate_probes"],
                       involuntary_exits=d["involuntary_exits"],
                       involuntary_stays=d["involuntary_stays"], art_declined=d["art_declined"],
                       flushes=sum(stats1["flushes"].values()) - sum(stats0["flushes"].values()))
        else:
            out.update(mean_depth=float(cfg.num_layers), host_round_trips_per_iteration=1.0)
    return out


def _stats(eng) -> dict | None:
    st = eng.ee_stats
    if st is None:
        return None
    return {"tokens": st.tokens, "layers_run": st.layers_run, "segment_calls": st.segment_calls,
            "involuntary_exits": st.involuntary_exits, "involuntary_stays": st.involuntary_stays,
            "art_declined": st.art_declined, "flushes": dict(st.flushes), "round_trips": st.round_trips,
            "fused_iterations": st.fused_iterations, "gate_probes": st.gate_probes}


def run_ee_efficiency(model: str | None = None, quick: bool = False, new_tokens: int = 24,
                      ramp_vocab: int | None = 1024, progress: bool = True, grid: dict | None = None,
                      batches: tuple[int, ...] | None = None) -> dict:
    from convert.checkpoint import load_checkpoint
    from drex_jax import compile_counter
    from drex_jax.bench.roofline import engine_dtype, machine, measure_matmul_peak, measure_read_bandwidth
    from drex_jax.default_model import default_model_path
    from drex_jax.exit_heads import find_heads
    from drex_jax.model.params import decode_layout

    grid = dict(grid or (QUICK_GRID if quick else FULL_GRID))
    if batches:
        grid["batches"] = tuple(batches)
    path = model or default_model_path()
    cfg, params, _ = load_checkpoint(path)
    heads_dir = find_heads(path, cfg, params)
    params = engine_dtype(decode_layout(params))
    if heads_dir is None:
        ramp_vocab = None
    compile_counter.install()
    dtype = params["final_norm"].dtype
    peak, bandwidth = measure_matmul_peak(dtype), measure_read_bandwidth(dtype)
    rows = []
    points = [(r, f, b, c) for r in grid["ramps"] for f in grid["exit_shares"] for b in grid["batches"]
              for c in grid["contexts"]]
    for n, (ramps, share, batch, context) in enumerate(points):
        fractions = trace_fractions(share, len(ramps))
        ideal, ideal_roof = ideal_speedups(cfg, params, ramps, fractions, batch, context, peak, bandwidth, ramp_vocab)
        base = None
        for label, policy, art in POLICIES:
            if progress:
                print(f"[ee-efficiency] {n + 1}/{len(points)} ramps {ramps} exit share {share:.0%} batch {batch} "
                      f"context {context}: {label}", file=sys.stderr, flush=True)
            m = measure(cfg, params, heads_dir, policy, art, ramps, fractions, batch, context, new_tokens, ramp_vocab)
            base = m["tok_s"] if label == "off" else base
            speedup = m["tok_s"] / base
            ee = label != "off"  # off is the baseline: it has no efficiency of its own
            rows.append({"ramps": list(ramps), "exit_share": share, "batch": batch, "context": context,
                         "policy": label, "ideal": ideal, "ideal_roofline": ideal_roof, "speedup": speedup,
                         "efficiency": speedup / ideal if ee else None,
                         "efficiency_roofline": speedup / ideal_roof if ee else None, **m})
    return {"machine": machine(), "peak_flops": peak, "bandwidth": bandwidth, "new_tokens": new_tokens,
            "ramp_vocab": ramp_vocab, "heads": heads_dir, "rows": rows,
            "date": time.strftime("%Y-%m-%d", time.gmtime())}


def markdown(res: dict) -> str:
    lines = [f"Early-exit machinery efficiency on replayed exit traces, {res['machine']}, {res['date']}: "
             f"{res['new_tokens']} new tokens per request, ramp vocabulary {res['ramp_vocab']}, decode tok/s with "
             "prefill excluded (the last of 2-4 identical rounds: the first that compiled nothing, or the 4th); "
             "`off` = the fused full-depth step, same run.", "",
             "| ramps | exit share | batch | context | policy | tok/s | speed-up vs off | ideal L/depth | ideal roofline | "
             "efficiency | efficiency (roofline) | mean depth | invol. exits / stays | flushes | round trips/iter | "
             "fused iters (gate) |",
             # eager ignores the thresholds (every token leaves at the first ramp: involuntary exits), so
             # its speed-up is not comparable with the trace's ideal
             "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        inv = f"{r.get('involuntary_exits', 0)} / {r.get('involuntary_stays', 0)}"
        eff = "-" if r["efficiency"] is None else f"**{r['efficiency']:.2f}**"
        eff_roof = "-" if r["efficiency_roofline"] is None else f"{r['efficiency_roofline']:.2f}"
        lines.append(f"| {r['ramps']} | {r['exit_share']:.0%} | {r['batch']} | {r['context']} | {r['policy']} | "
                     f"{r['tok_s']:.1f} | {r['speedup']:.2f}x | {r['ideal']:.2f}x | {r['ideal_roofline']:.2f}x | "
                     f"{eff} | {eff_roof} | {r['mean_depth']:.1f} | {inv} | "
                     f"{r.get('flushes', 0)} | {r['host_round_trips_per_iteration']:.1f} | "
                     f"{r.get('fused_iterations', 0)} / {r['iterations']} |")
    return "\n".join(lines) + "\n"


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    keys = sorted({(tuple(r["ramps"]), r["batch"], r["context"], r["policy"]) for r in res["rows"]
                   if r["efficiency"] is not None})
    for ramps, b, c, pol in keys:
        pts = sorted((r["exit_share"], r["efficiency"]) for r in res["rows"]
                     if (tuple(r["ramps"]), r["batch"], r["context"], r["policy"]) == (ramps, b, c, pol))
        ax.plot([p[0] * 100 for p in pts], [p[1] for p in pts], "o-", label=f"{pol} {list(ramps)} b{b} c{c}")
    ax.axhline(0.85, color="gray", ls="--", lw=0.8)
    ax.set(xlabel="tokens exiting early (%)", ylabel="measured / ideal speed-up", title="Early-exit machinery efficiency")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def summary(res: dict) -> str:
    """One line per policy: the median efficiency where the ideal is >= 1.1x."""
    out = []
    for label, _, _ in POLICIES[1:]:
        eff = [r["efficiency"] for r in res["rows"] if r["policy"] == label and r["ideal"] >= 1.1]
        if eff:
            out.append(f"{label}: median efficiency {statistics.median(eff):.2f} over {len(eff)} points with ideal >= 1.1x")
    return "\n".join(out)
