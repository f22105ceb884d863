"""Issue 27 profile: the CPU paged-attention kernel alone, per layer of a decode step, against the
bandwidth roofline of the K/V it must read (bytes / read bandwidth measured in the same run), and
optionally against another version of the kernel's source built under its own FFI target and timed
alternately in the same process.

SmolLM2's attention shapes (3 KV heads x 3 query heads each, head size 64, 16-token pages), one
query token per row at `--context` cached positions; 30 layers of one pool in one jitted program
(each layer's pages come from memory, as in a decode step), the pool donated.

Usage:
    git show 5dcc9b2:drex_jax/model/kernels/paged_attention.cc > /tmp/attention_before.cc
    python -m benchmarks.attention_kernel --baseline /tmp/attention_before.cc [--batches 1 8 32 64] [--context 128]
"""
from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from drex_jax.bench.roofline import machine, measure_read_bandwidth
from drex_jax.model.kernels import ffi

LAYERS, KV, GROUP, HEAD, PAGE = 30, 3, 3, 64, 16


def _program(target: str, batch: int, context: int):
    """A jitted 30-layer chain of `target` calls, and its arguments (the pools donated)."""
    pages_per_row = (context + 1 + PAGE - 1) // PAGE
    pages = batch * pages_per_row + 1
    rng = np.random.default_rng(0)
    pool = lambda: jnp.asarray(rng.standard_normal((LAYERS, KV, pages, PAGE, HEAD), np.float32))  # noqa: E731
    args = [jnp.asarray(rng.standard_normal((batch, 1, KV * GROUP, HEAD), np.float32)), pool(), pool(),
            jnp.asarray(rng.standard_normal((batch, 1, KV, HEAD), np.float32)),
            jnp.asarray(rng.standard_normal((batch, 1, KV, HEAD), np.float32)),
            jnp.asarray(1 + np.arange(batch * pages_per_row, dtype=np.int32).reshape(batch, pages_per_row)),
            jnp.full((batch, 1), context, jnp.int32)]
    pool_shape = jax.ShapeDtypeStruct(args[1].shape, jnp.float32)
    call = jax.ffi.ffi_call(target, (jax.ShapeDtypeStruct(args[0].shape, jnp.float32), pool_shape, pool_shape),
                            input_output_aliases={1: 1, 2: 2})
    scale = np.float32(1 / np.sqrt(HEAD))

    @functools.partial(jax.jit, donate_argnums=(1, 2))
    def chain(q, k_pool, v_pool, k_new, v_new, block_tables, positions):
        total = jnp.zeros_like(q)
        for layer in range(LAYERS):
            out, k_pool, v_pool = call(q, k_pool, v_pool, k_new, v_new, block_tables, positions,
                                       layer=np.int64(layer), scale=scale)
            total = total + out
        return total, k_pool, v_pool
    return chain, args


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--baseline", help="another paged_attention.cc to build and time beside the current one")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    if not ffi.available():
        raise SystemExit("the paged-attention kernel could not be built here (see the notice above)")
    kernels = {"current": ffi.TARGET}
    if args.baseline:
        if not ffi.load(args.baseline, "DrexPagedAttention", "drex_attention_baseline", "baseline attention kernel",
                        "nothing"):
            raise SystemExit(f"could not build {args.baseline}")
        kernels = {"baseline": "drex_attention_baseline", **kernels}
    bandwidth = measure_read_bandwidth()
    print(f"machine: {machine()}; read bandwidth {bandwidth / 1e9:.1f} GB/s; context {args.context}, "
          f"{LAYERS} layers per call, SmolLM2 attention shapes")
    print("| batch | kernel | us per layer | K/V GB/s | % of bandwidth roofline | speed-up over baseline | max abs diff |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for batch in args.batches:
        kv_bytes = batch * (args.context + 1) * KV * HEAD * 2 * 4  # every cached key and value, f32
        programs, outs, times = {}, {}, {name: [] for name in kernels}
        for name, target in kernels.items():
            chain, call_args = _program(target, batch, args.context)
            out = chain(*call_args)
            call_args[1], call_args[2] = out[1], out[2]
            outs[name] = np.asarray(out[0])
            programs[name] = (chain, call_args)
        for _ in range(args.rounds):
            for name, (chain, call_args) in programs.items():
                t0 = time.perf_counter()
                for _ in range(3):
                    out = chain(*call_args)
                    call_args[1], call_args[2] = out[1], out[2]
                jax.block_until_ready(out)
                times[name].append((time.perf_counter() - t0) / 3 / LAYERS)
        base = statistics.median(times[next(iter(kernels))])
        for name in kernels:
            sec = statistics.median(times[name])
            diff = float(np.abs(outs[name] - outs[next(iter(kernels))]).max())
            print(f"| {batch} | {name} | {sec * 1e6:.1f} | {kv_bytes / sec / 1e9:.1f} | "
                  f"{100 * kv_bytes / bandwidth / sec:.0f} % | {base / sec:.2f}x | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
