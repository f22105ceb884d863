"""`Engine.step` ms per decode step (bundled SmolLM2, fp32, every row's prompt already prefilled),
best of `--rounds`, for comparing two versions of the code on one machine: run it alternately
in two git worktrees, each importing its own tree.

    git worktree add /tmp/before 5dcc9b2
    for tree in /tmp/before $PWD /tmp/before $PWD; do
        (cd $tree && PYTHONPATH=$tree /path/to/.venv/bin/python -m benchmarks.engine_step --batches 1 8 32)
    done

Usage: python -m benchmarks.engine_step [--batches 1 8 32] [--context 128] [--matmul auto|xla|kernel]
"""
from __future__ import annotations

import argparse

import drex_jax
from convert.checkpoint import load_checkpoint
from drex_jax.bench.roofline import engine_step_ms, machine
from drex_jax.default_model import default_model_path
from drex_jax.model.params import decode_layout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--matmul", default="auto", choices=["auto", "xla", "kernel"])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=9)
    args = ap.parse_args()
    cfg, params, _ = load_checkpoint(default_model_path())
    params = decode_layout(params)
    print(f"machine: {machine()}; drex_jax from {drex_jax.__file__}")
    for b in args.batches:
        ms = [engine_step_ms(cfg, params, b, args.context, args.steps, matmul=args.matmul) for _ in range(args.rounds)]
        print(f"batch {b} x {args.context}: {min(ms):.2f} ms per step (rounds: "
              f"{' / '.join(f'{m:.2f}' for m in ms)})", flush=True)


if __name__ == "__main__":
    main()
