"""Issue 29: can the weights reach a compiled step in a few big arrays instead of one per layer and
matrix (272 for SmolLM2), without the program copying each layer's slice out first?

Compiles the same 4-layer chain of weight-left products three ways and reports each program's
temporary memory and the weight-sized results it materializes (copies):
  sep   - one array per layer (what the engine passes today);
  stack - one [L, out, in] array, layer l sliced with a static index;
  flat  - one 1-D buffer of every layer, layer l a static slice reshaped to [out, in].
For the CPU (the default) or, with --h100, for an H100 described by
`drex_jax/assets/gpu_targets/h100_sxm` (no GPU needed; the CUDA plugin must be importable, as
`scripts/gpu_compile_check.py --setup` installs it into `.gpu-compile-plugin`):

    .venv/bin/python -m benchmarks.weight_slices
    JAX_PLATFORMS=cpu CUDA_VISIBLE_DEVICES=-1 PYTHONPATH=.gpu-compile-plugin:. \\
        .venv/bin/python -m benchmarks.weight_slices --h100
"""
from __future__ import annotations

import argparse
import re

import jax
import jax.numpy as jnp

L = 4


def sep(ws, x):
    for w in ws:
        x = jnp.tanh(w @ x)
    return x


def stack(st, x):
    for layer in range(L):
        x = jnp.tanh(st[layer] @ x)
    return x


def flat(buf, x):
    n = buf.shape[0] // L
    side = int(round(n ** 0.5))
    for layer in range(L):
        x = jnp.tanh(jax.lax.slice(buf, (layer * n,), ((layer + 1) * n,)).reshape(side, side) @ x)
    return x


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--h100", action="store_true", help="compile for the H100 target description, not the CPU")
    ap.add_argument("--size", type=int, default=2048, help="each layer's weight is [size, size]")
    ap.add_argument("--columns", type=int, default=32)
    args = ap.parse_args()
    n, dt = args.size, (jnp.bfloat16 if args.h100 else jnp.float32)
    S = jax.ShapeDtypeStruct
    device = None
    if args.h100:
        from drex_jax.gpu_compile import compile_only_device

        device = compile_only_device("h100_sxm")
    x = S((n, args.columns), dt)
    variants = {"sep": (sep, [S((n, n), dt)] * L), "stack": (stack, S((L, n, n), dt)), "flat": (flat, S((L * n * n,), dt))}
    # a weight-sized value produced inside the program (not a parameter, not a free bitcast) is a copy
    weight = re.compile(rf"= \w+\[({n},{n}|1,{n},{n}|{n * n})\]")
    print(f"{'H100 (compile only)' if args.h100 else 'CPU'}: {L} layers of [{n}, {n}] {jnp.dtype(dt).name}, "
          f"x [{n}, {args.columns}]; one layer = {n * n * jnp.dtype(dt).itemsize / 2**20:.0f} MiB")
    for name, (fn, w) in variants.items():
        tree = (w, x)
        if device is not None:
            from drex_jax.gpu_compile import on_device

            tree = on_device(tree, device)
        compiled = jax.jit(fn).trace(*tree).lower().compile()
        lines = compiled.as_text().splitlines()
        copies = [ln for ln in lines if weight.search(ln) and "parameter(" not in ln and " bitcast(" not in ln
                  and "fusion(" in ln]
        temp = compiled.memory_analysis().temp_size_in_bytes
        print(f"  {name:5s}: {len(jax.tree.leaves(w))} weight arrays, temp {temp / 2**20:.1f} MiB, "
              f"weight-sized fusions (copies) {len(copies)}")


if __name__ == "__main__":
    main()
