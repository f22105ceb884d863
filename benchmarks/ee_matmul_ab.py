"""Issue 27: early exit on replayed exit traces (one ramp at 15, batch 32, context 128) with the layers'
projections on XLA's dot and on the CPU projection kernel, `off` timed beside each in the same run.

Per exit share: decode tok/s of `off` (full depth) and `rebatching` (ART on), the speed-up, the
ideal speed-up (layers run, `bench.ee_efficiency.ideal_speedups`) and the efficiency = speed-up /
ideal, for each projection path; the paths alternate so drift hits both.

Usage: python -m benchmarks.ee_matmul_ab [--shares 0.1 0.5] [--rounds 2]
"""
from __future__ import annotations

import argparse

from convert.checkpoint import load_checkpoint
from drex_jax import compile_counter
from drex_jax.bench.ee_efficiency import ideal_speedups, measure, trace_fractions
from drex_jax.bench.roofline import machine, measure_matmul_peak, measure_read_bandwidth
from drex_jax.default_model import default_model_path
from drex_jax.exit_heads import find_heads
from drex_jax.model.params import decode_layout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shares", type=float, nargs="+", default=[0.1, 0.5])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    path = default_model_path()
    cfg, params, _ = load_checkpoint(path)
    heads = find_heads(path, cfg, params)
    params = decode_layout(params)
    compile_counter.install()
    peak, bw = measure_matmul_peak(), measure_read_bandwidth()
    ramps, vocab = (15,), 1024 if heads else None
    print(f"machine: {machine()}; ramp {ramps}, batch {args.batch}, context {args.context}")
    print("| exit share | projections | off tok/s (rounds) | rebatching tok/s (rounds) | speed-up | ideal | efficiency |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for share in args.shares:
        fr = trace_fractions(share, len(ramps))
        ideal, _ = ideal_speedups(cfg, params, ramps, fr, args.batch, args.context, peak, bw, vocab)
        res = {m: {"off": [], "rebatching": []} for m in ("xla", "kernel")}
        for _ in range(args.rounds):
            for m in ("xla", "kernel"):
                for label, policy, art in (("off", "off", False), ("rebatching", "rebatching", True)):
                    r = measure(cfg, params, heads, policy, art, ramps, fr, args.batch, args.context, 24, vocab,
                                matmul=m)
                    res[m][label].append(r["tok_s"])
        for m in ("xla", "kernel"):
            off, reb = max(res[m]["off"]), max(res[m]["rebatching"])
            print(f"| {share:.0%} | {m} | {off:.1f} ({' / '.join(f'{v:.1f}' for v in res[m]['off'])}) | "
                  f"{reb:.1f} ({' / '.join(f'{v:.1f}' for v in res[m]['rebatching'])}) | {reb / off:.2f}x | "
                  f"{ideal:.2f}x | {reb / off / ideal:.2f} |", flush=True)


if __name__ == "__main__":
    main()
