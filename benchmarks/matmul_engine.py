"""Issue 27: decode through `Engine.step` with the layers' projections on XLA's dot and on the CPU
projection kernel, alternated in one process (bundled SmolLM2, fp32, 128-token contexts), against
the roofline max(bytes / bandwidth, FLOPs / peak) with both measured in the same run.

Usage: python -m benchmarks.matmul_engine [--batches 1 8 32 64] [--rounds 2] [--steps 9]
"""
from __future__ import annotations

import argparse

from convert.checkpoint import load_checkpoint
from drex_jax.bench.roofline import decode_cost, engine_step_ms, machine, measure_matmul_peak, measure_read_bandwidth
from drex_jax.default_model import default_model_path
from drex_jax.model.params import decode_layout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=9)
    args = ap.parse_args()
    cfg, params, _ = load_checkpoint(default_model_path())
    params = decode_layout(params)
    peak, bw = measure_matmul_peak(), measure_read_bandwidth()
    print(f"machine: {machine()}; matmul peak {peak / 1e9:.0f} GFLOP/s, read bandwidth {bw / 1e9:.1f} GB/s")
    print("| batch x context | roofline ms | xla ms (rounds) | kernel ms (rounds) | kernel speed-up | "
          "% roofline xla / kernel |")
    print("|---|---:|---:|---:|---:|---:|")
    for b in args.batches:
        nbytes, flops = decode_cost(cfg, params, b, args.context)
        roof = 1e3 * max(nbytes / bw, flops / peak)
        ms = {"xla": [], "kernel": []}
        for _ in range(args.rounds):
            for m in ("xla", "kernel"):
                ms[m].append(engine_step_ms(cfg, params, b, args.context, args.steps, matmul=m))
        x, k = min(ms["xla"]), min(ms["kernel"])
        print(f"| {b} x {args.context} | {roof:.1f} | {x:.1f} ({' / '.join(f'{v:.1f}' for v in ms['xla'])}) | "
              f"{k:.1f} ({' / '.join(f'{v:.1f}' for v in ms['kernel'])}) | {x / k:.2f}x | "
              f"{100 * roof / x:.0f} % / {100 * roof / k:.0f} % |", flush=True)


if __name__ == "__main__":
    main()
