"""Greedy argmax over SmolLM2's 49,152-token vocabulary, behind the LM head's product as in a step,
with the product alone as the floor; same process, alternated, medians. Two layouts: the decode
step's weight-left product [V, B] (XLA's argmax over axis 0 vs `sampling.column_argmax`) and the
[B, V] logits greedy ramp heads and log-probability steps sample from (XLA's argmax vs the blocked
one in `sampling.sample`): block maxima, then the argmax inside the first block holding the maximum.

Usage: python -m benchmarks.greedy_argmax [--batches 1 8 32 64] [--repeats 30]
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from drex_jax.sampling import _block_argmax, _blocks, column_argmax

VOCAB, HIDDEN = 49152, 576


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    rows = jnp.asarray(rng.standard_normal((VOCAB, HIDDEN), np.float32))
    variants = {
        "head product alone": lambda h: (rows @ h.T).sum(0),
        "[V, B] XLA argmax": lambda h: jnp.argmax(rows @ h.T, 0).astype(jnp.int32),
        "[V, B] column_argmax": lambda h: column_argmax(rows @ h.T),
        "[B, V] XLA argmax": lambda h: jnp.argmax((rows @ h.T).T, -1).astype(jnp.int32),
        "[B, V] blocked argmax": lambda h: _block_argmax(*_blocks((rows @ h.T).T)),
    }
    print("| batch | " + " | ".join(f"{name} ms" for name in variants) + " | [V, B] blocked / XLA | [B, V] blocked / XLA |")
    print("|---:|" + "---:|" * (len(variants) + 2))
    for b in args.batches:
        h = jnp.asarray(rng.standard_normal((b, HIDDEN), np.float32))
        fns = {name: jax.jit(fn) for name, fn in variants.items()}
        want = np.asarray(fns["[V, B] XLA argmax"](h))
        for name in ("[V, B] column_argmax", "[B, V] XLA argmax", "[B, V] blocked argmax"):
            np.testing.assert_array_equal(np.asarray(fns[name](h)), want)
        times = {name: [] for name in fns}
        for _ in range(args.repeats):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                jax.block_until_ready(fn(h))
                times[name].append(time.perf_counter() - t0)
        ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
        print(f"| {b} | " + " | ".join(f"{ms[name]:.2f}" for name in fns) +
              f" | {ms['[V, B] column_argmax'] / ms['[V, B] XLA argmax']:.2f}x"
              f" | {ms['[B, V] blocked argmax'] / ms['[B, V] XLA argmax']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
