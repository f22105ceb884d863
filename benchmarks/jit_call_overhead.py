"""Host-side cost of one jitted call with the model as its argument (issue 19's guard profile).

    python -m benchmarks.jit_call_overhead [--calls 500]

An empty jitted program over SmolLM2's decode-layout weights, so only argument handling is timed:
flattening the weights pytree (a plain dict, or an `nnx.State` of Variables) and hashing the static
argument (the `ModelConfig`, a raw `nnx.GraphDef`, or the `ModelGraph` wrapper that hashes once).
Then a program that reads one element of every weight array (so XLA receives all of them), against
one packed buffer of the same bytes: what handing 272 buffers to a call costs.
"""
from __future__ import annotations

import argparse
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=500)
    args = ap.parse_args(argv)

    import jax
    from flax import nnx

    from convert.checkpoint import load_checkpoint
    from drex_jax.default_model import default_model_path
    from drex_jax.model.modules import EETransformer, split_model
    from drex_jax.model.params import decode_layout

    cfg, params, _ = load_checkpoint(default_model_path())
    params = decode_layout(params)
    graph, state = split_model(cfg, params)  # what the engine passes: ModelGraph + plain dict
    raw_graph, raw_state = nnx.split(EETransformer(cfg, params))
    f = jax.jit(lambda weights, static: 0, static_argnames=("static",))
    cases = [("params dict + ModelConfig (before the redesign)", params, cfg),
             ("nnx.State + nnx.GraphDef (first cut)", raw_state, raw_graph),
             ("plain-dict state + ModelGraph (shipped)", state, graph)]
    print(f"{len(jax.tree.leaves(params))} weight arrays, {args.calls} calls each")
    for name, weights, static in cases:
        f(weights, static=static)
        t0 = time.perf_counter()
        for _ in range(args.calls):
            f(weights, static=static)
        print(f"{name}: {(time.perf_counter() - t0) / args.calls * 1e3:.3f} ms per call")
    # the program above uses no weight, so XLA receives none: here every buffer is used (PJRT's
    # per-buffer work counts too), against the same bytes in one packed buffer
    import jax.numpy as jnp

    leaves = jax.tree.leaves(state)
    packed = jnp.concatenate([a.ravel() for a in leaves])
    every = jax.jit(lambda ws: sum(w.ravel()[0] for w in ws))
    one = jax.jit(lambda w: w[0] + w[-1])
    for name, fn, arg in ((f"all {len(leaves)} buffers used", every, leaves), ("one packed buffer", one, packed)):
        jax.block_until_ready(fn(arg))
        t0 = time.perf_counter()
        for _ in range(args.calls):
            jax.block_until_ready(fn(arg))
        print(f"{name}: {(time.perf_counter() - t0) / args.calls * 1e3:.3f} ms per call (dispatch and a trivial run)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
