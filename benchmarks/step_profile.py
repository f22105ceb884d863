"""Where a decode step's time goes: `Engine.step` on the bundled SmolLM2 (fp32, every row's
`--context`-token prompt prefilled) under `jax.profiler.trace`, the compiled program's ops summed
per kind (XLA's fusions by name without the instance number, `ffi_call` = the FFI kernels), per
step. XLA:CPU may run independent ops side by side on its threads, so the kinds can sum to more
than the step.

Usage: python -m benchmarks.step_profile [--batch 32] [--context 128] [--matmul auto|xla|kernel]
       [--steps 20] [--trace-dir DIR]
"""
from __future__ import annotations

import argparse
import collections
import glob
import re
import statistics
import tempfile
import time

import jax
import numpy as np

from convert.checkpoint import load_checkpoint
from drex_jax import Engine, GenerationConfig
from drex_jax.default_model import default_model_path
from drex_jax.model.params import decode_layout

# profiler bookkeeping, not ops of the program
SKIP = ("ThunkExecutor", "Threadpool", "end:", "Slinky")


def op_totals(trace_dir: str) -> tuple[collections.Counter, collections.Counter]:
    """(ns, count) per op kind over every XLA:CPU thread of the trace in `trace_dir`."""
    from jax._src.lib import _profile_data

    path = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)[0]
    ns, count = collections.Counter(), collections.Counter()
    for plane in _profile_data.ProfileData.from_file(path).planes:
        for line in plane.lines:
            if line.name == "python":
                continue
            for ev in line.events:
                if ev.name.startswith(SKIP):
                    continue
                kind = re.sub(r"\.\d+$", "", ev.name)
                ns[kind] += ev.duration_ns
                count[kind] += 1
    return ns, count


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--matmul", default="auto", choices=["auto", "xla", "kernel"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--trace-dir", default=None)
    args = ap.parse_args()
    cfg, params, _ = load_checkpoint(default_model_path())
    eng = Engine.from_params(cfg, decode_layout(params), max_slots=args.batch,
                             max_seq_len=args.context + 2 * args.steps + 32,
                             max_prefill_tokens_per_step=args.batch * args.context, matmul=args.matmul)
    rng = np.random.default_rng(1)
    gc = GenerationConfig(max_new_tokens=2 * args.steps + 16, ignore_eos=True)
    for _ in range(args.batch):
        eng.submit([int(t) for t in rng.integers(0, cfg.vocab_size, args.context)], gc)
    eng.step()  # prefill, and the first decode step compiles
    eng.step()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        eng.step()
        times.append(time.perf_counter() - t0)
    trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="drex_step_profile_")
    with jax.profiler.trace(trace_dir):
        for _ in range(args.steps):
            eng.step()
    ns, count = op_totals(trace_dir)
    print(f"batch {args.batch} x context {args.context}, projections {eng.matmul}, attention {eng.attention}: "
          f"Engine.step {1e3 * statistics.median(times):.1f} ms untraced (median of 5); trace in {trace_dir}")
    print("| op kind | ms per step | calls per step |")
    print("|---|---:|---:|")
    for kind, total in ns.most_common(12):
        print(f"| {kind} | {total / 1e6 / args.steps:.2f} | {count[kind] / args.steps:.0f} |")


if __name__ == "__main__":
    main()
