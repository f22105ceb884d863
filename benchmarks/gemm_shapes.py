"""Issue 27: what each SmolLM2 projection costs through XLA's dot and through the CPU projection
kernel (`drex_jax.model.kernels.matmul`, packed weights), for T = 1-64 columns, in one run.

Per shape and T: ms per call, GB/s of weight read and GFLOP/s, for both paths; the machine's read
bandwidth and matmul peak are measured in the same run (`bench.roofline`). Each timed call is one
of a dependent chain over distinct weight copies that together exceed the L3 cache, so every call
reads its weight from memory as a decode step does. Writes a JSON and a PNG of cost vs T.

Usage: python -m benchmarks.gemm_shapes [--out docs/bench] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from drex_jax.bench.roofline import machine, measure_matmul_peak, measure_read_bandwidth
from drex_jax.model.kernels import matmul as mk

H, I, KV, V, RAMP_V = 576, 1536, 192, 49152, 1024
# SmolLM2-135M's projections as the packed layout runs them (Q/K/V and gate/up fused); the ramp
# head is its vocabulary rows over the shipped 1,024-token ramp vocabulary
SHAPES = {"qkv": (H + 2 * KV, H), "o": (H, H), "gate+up": (2 * I, H), "down": (H, I), "lm_head": (V, H),
          "ramp_head": (RAMP_V, H)}
TS = (1, 2, 4, 8, 16, 24, 32, 48, 64)
CHAIN_BYTES = 384 * 2**20  # weight copies per chain: above the 260 MB L3 seen here


def _chain(fn, n):
    def f(ws, x):
        acc = jnp.float32(0)
        for w in ws:  # each call depends on the previous: no two run at once
            acc = acc + fn(w, x + acc * 1e-30).sum()
        return acc
    return jax.jit(f)


def _best(f, args, repeats):
    jax.block_until_ready(f(*args))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="docs/bench")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if not mk.available():
        raise SystemExit("the projection kernel is not available here (see the notice above)")
    peak, bw = measure_matmul_peak(), measure_read_bandwidth()
    print(f"machine: {machine()}; matmul peak {peak / 1e9:.0f} GFLOP/s, read bandwidth {bw / 1e9:.1f} GB/s")
    rng = np.random.default_rng(0)
    rows = []
    for name, (M, K) in SHAPES.items():
        n = max(2, CHAIN_BYTES // (M * K * 4))
        base = rng.standard_normal((M, K), dtype=np.float32) * 0.02
        plain = [jnp.asarray(base + np.float32(i * 1e-3)) for i in range(n)]
        packed = [jnp.asarray(mk.pack(np.asarray(w))) for w in plain]
        f_xla = _chain(lambda w, x: w @ x, n)
        f_kernel = _chain(lambda w, x, M=M: mk.matmul(w, x, M), n)
        for T in TS:
            x = jnp.asarray(rng.standard_normal((K, T), dtype=np.float32))
            got = np.asarray(mk.matmul(packed[0], x, M))
            np.testing.assert_allclose(got, np.asarray(plain[0] @ x), rtol=1e-4, atol=1e-4)
            t_x = _best(f_xla, (plain, x), args.repeats) / n
            t_k = _best(f_kernel, (packed, x), args.repeats) / n
            nbytes, flops = M * K * 4, 2 * M * K * T
            roof = max(nbytes / bw, flops / peak)
            row = {"shape": name, "M": M, "K": K, "T": T, "xla_ms": t_x * 1e3, "kernel_ms": t_k * 1e3,
                   "xla_gbs": nbytes / t_x / 1e9, "kernel_gbs": nbytes / t_k / 1e9,
                   "xla_gflops": flops / t_x / 1e9, "kernel_gflops": flops / t_k / 1e9,
                   "roofline_ms": roof * 1e3, "speedup": t_x / t_k}
            rows.append(row)
            print(f"{name:9s} [{M:5d},{K:4d}] T={T:2d}  xla {t_x * 1e3:7.3f} ms {row['xla_gbs']:5.1f} GB/s "
                  f"{row['xla_gflops']:6.1f} GFLOP/s | kernel {t_k * 1e3:7.3f} ms {row['kernel_gbs']:5.1f} GB/s "
                  f"{row['kernel_gflops']:6.1f} GFLOP/s | kernel/xla speed {t_x / t_k:4.2f}x | "
                  f"roofline {roof * 1e3:.3f} ms", flush=True)
        del plain, packed
    res = {"machine": machine(), "peak_flops": peak, "bandwidth": bw, "rows": rows,
           "date": time.strftime("%Y-%m-%d", time.gmtime())}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gemm_shapes.json"), "w") as f:
        json.dump(res, f, indent=1)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (the `bench` extra): no PNG")
        return
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, name in zip(axes.flat, SHAPES):
        rs = [r for r in rows if r["shape"] == name]
        ts = [r["T"] for r in rs]
        for key, label in (("xla_ms", "XLA dot"), ("kernel_ms", "kernel (packed)"), ("roofline_ms", "roofline")):
            ax.plot(ts, [r[key] for r in rs], marker="o", label=label)
        ax.set_title(f"{name} [{rs[0]['M']}, {rs[0]['K']}]")
        ax.set_xlabel("T (columns)")
        ax.set_ylabel("ms per call")
        ax.set_ylim(bottom=0)
    axes.flat[0].legend()
    fig.suptitle(f"Projection cost vs columns, {res['machine']}, {res['date']}")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "gemm_shapes.png"), dpi=90)
    print(f"wrote {args.out}/gemm_shapes.json and .png")


if __name__ == "__main__":
    main()
