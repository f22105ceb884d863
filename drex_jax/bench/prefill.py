"""Prefill against this machine's matmul peak (`drex-jax bench --roofline` prefill section).

For a batch of prompts x prompt length, the engine's own scheduler admits and packs the prompts
exactly as serving would, and the prefill call the plan asks for is timed alone (median of
repeats; the call rewrites the same K/V). FLOPs are the work the prompts need: 2 x matmul params
x prompt tokens, causal attention per prompt (2 x 2 x layers x heads x head_dim x n(n+1)/2), and
the LM head for each prompt's last token. % of peak = (FLOPs / measured peak) / time. Padding
share = token slots the call computed that hold no prompt token.
"""
from __future__ import annotations

import math
import statistics
import time

import jax
import numpy as np

from drex_jax.generation import GenerationConfig
from drex_jax.model.specs import param_specs

POINTS = ((1, 128), (1, 512), (8, 128), (32, 128), (8, 512))


def prefill_flops(cfg, lengths: list[int]) -> float:
    specs = param_specs(cfg)
    matmul = sum(math.prod(s.shape) for k, s in specs.items() if k.startswith("layers/w"))
    attn = sum(4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * n * (n + 1) / 2 for n in lengths)
    head = 2 * cfg.hidden_size * cfg.vocab_size * len(lengths)
    return float(2 * matmul * sum(lengths) + attn + head)


def prefill_point(engine, batch: int, length: int, repeats: int = 3, seed: int = 0) -> dict:
    """Time the prefill call that admitting `batch` prompts of `length` tokens produces."""
    rng = np.random.default_rng(seed)
    cfg = engine.cfg
    gc = GenerationConfig(max_new_tokens=1, ignore_eos=True)
    for _ in range(batch):
        engine.submit([int(t) for t in rng.integers(0, cfg.vocab_size, length)], gc)
    plan = engine.scheduler.schedule()
    b = plan.prefill
    if b is None or len(b.requests) != batch or not all(b.ends_context):
        raise RuntimeError(f"the scheduler admitted {0 if b is None else len(b.requests)} of {batch} prompts in one "
                           "prefill: raise max_prefill_tokens_per_step / max_slots for this point")

    def call():
        return engine.runner.prefill(b.tokens, b.positions, b.segment_ids, b.write_page, b.write_off, b.last_index,
                                     b.sampling, b.kv_depth, do_sample=False)

    call()  # compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    for r in plan.running:  # hand the slots and pages back
        engine.cancel(r.id)
    slots = int(np.prod(b.tokens.shape))
    return {"batch": batch, "length": length, "ms": 1e3 * statistics.median(times),
            "flops": prefill_flops(cfg, [length] * batch), "slots": slots, "shape": list(b.tokens.shape),
            "padding_share": 1 - batch * length / slots}


def run_prefill(engine, peak: float, points=POINTS, repeats: int = 3) -> list[dict]:
    rows = []
    for batch, length in points:
        r = prefill_point(engine, batch, length, repeats)
        r["pct_peak"] = 100 * (r["flops"] / peak) / (r["ms"] / 1e3)
        r["tok_s"] = batch * length / (r["ms"] / 1e3)
        rows.append(r)
    jax.block_until_ready(engine.pool)
    return rows


def markdown(rows: list[dict], peak: float) -> str:
    lines = [f"Prefill (the call the scheduler plans for the batch, timed alone; matmul peak {peak / 1e9:.0f} GFLOP/s "
             "measured in the same run):", "",
             "| prompts x tokens | call shape [rows, width] | padding | ms | prompt tok/s | GFLOP | % of peak |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['batch']} x {r['length']} | {r['shape']} | {100 * r['padding_share']:.0f}% | "
                     f"{r['ms']:.0f} | {r['tok_s']:.0f} | {r['flops'] / 1e9:.1f} | **{r['pct_peak']:.0f}%** |")
    return "\n".join(lines) + "\n"
