"""Compile drex_jax's steps for an NVIDIA H100 on this machine (no GPU needed) and check them.

    .venv/bin/python scripts/gpu_compile_check.py --setup   # once: the CUDA plugin on the side (~550 MB)
    .venv/bin/python scripts/gpu_compile_check.py [--models smollm2-135m llama3-8b] [--only decode] [--json F]

`--setup` installs this jax version's CUDA plugin and the CUDA compiler wheels (ptxas) into
`.gpu-compile-plugin` (`pip --target`, no dependencies), outside the project's `.venv`, which
stays CPU-only: only this script's own child process puts that folder on its path. For each model (bf16, batch 32, contexts up to 2048, the engine's default pool) it compiles
the prefill, LM head, prefill chunk, decode (pallas and xla), shallow and deep early-exit segments,
verify's deep pass and both missing-KV fills from `jax.ShapeDtypeStruct`s, prints each program's
argument/output/aliased/temp bytes and custom calls, and exits 1 if any program copies the pool or a
layer of it, copies or upcasts a weight matrix, does not alias the pool, or lacks the Triton kernel
where Pallas attention was asked for (`drex_jax.gpu_compile.check_program`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIDE = os.path.join(ROOT, ".gpu-compile-plugin")


def setup(quiet: bool = False) -> None:
    """Install the CUDA plugin matching this interpreter's jaxlib, and ptxas, into SIDE."""
    from importlib.metadata import version

    v = version("jaxlib")
    pkgs = [f"jax-cuda12-plugin=={v}", f"jax-cuda12-pjrt=={v}", "nvidia-cuda-nvcc-cu12"]
    print(f"gpu_compile_check: installing {' '.join(pkgs)} into {SIDE}", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", *(["-q"] if quiet else []), "--no-deps", "--upgrade",
                    "--target", SIDE, *pkgs], check=True)


def _side_env() -> dict:
    env = dict(os.environ)
    # the plugin registers without a driver when CUDA is not the platform in use: jax runs on the CPU
    # and compiles for the described GPU
    env.update(JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="-1", TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=os.pathsep.join([SIDE, ROOT] + [p for p in [env.get("PYTHONPATH")] if p]))
    return env


def run(args) -> int:
    import jax.numpy as jnp

    from drex_jax.gpu_compile import Shapes, compile_all, compile_only_device
    from drex_jax.plan import load_model_config

    device = compile_only_device(args.target)
    print(f"compiling for {device.device_kind} ({args.target}), bf16, batch {args.batch}, contexts up to "
          f"{args.max_seq_len}", flush=True)
    results = []
    for model in args.models:
        cfg = load_model_config(model)
        results += compile_all(model, cfg, jnp.bfloat16, Shapes(batch=args.batch, max_seq_len=args.max_seq_len),
                               device, only=args.only, progress=lambda s: print(s, flush=True))
    bad = [r for r in results if r.problems]
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(r) for r in results], f, indent=1)
    print(f"{len(results)} programs compiled, {len(bad)} with problems")
    return 1 if bad or not results else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--setup", action="store_true", help="create/refresh the side environment first")
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "llama3-8b"],
                    help="presets (drex_jax.plan.PRESETS) or model dirs")
    ap.add_argument("--only", nargs="+", help="compile only programs whose name contains one of these")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-seq-len", type=int, default=2048)
    ap.add_argument("--target", default="h100_sxm", help="GPU description in drex_jax/assets/gpu_targets")
    ap.add_argument("--json", help="write the per-program figures here")
    args = ap.parse_args(argv)
    if os.environ.get("DREX_GPU_COMPILE_SIDE") == "1":
        return run(args)
    if args.setup:
        setup()
    elif not os.path.isdir(os.path.join(SIDE, "jax_plugins")):
        print(f"gpu_compile_check: no CUDA plugin at {SIDE}: run with --setup first", file=sys.stderr)
        return 2
    cmd = [sys.executable, os.path.abspath(__file__), *[a for a in (argv if argv is not None else sys.argv[1:])
                                                if a != "--setup"]]
    return subprocess.run(cmd, env={**_side_env(), "DREX_GPU_COMPILE_SIDE": "1"}).returncode


if __name__ == "__main__":
    sys.exit(main())
