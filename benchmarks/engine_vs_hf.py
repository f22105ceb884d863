"""Engine vs HF `transformers` generate: output tokens/s, TTFT, TPOT per batch size, same run.

    python -m benchmarks.engine_vs_hf [--batches 1 8 32 64] [--new-tokens 64] [--repeats 3]

Both run the bundled SmolLM2 in fp32 greedy on the same chat prompts with a fixed number of
new tokens (EOS ignored). Each figure is the median of `--repeats` timed runs after a warm-up
run (compilation excluded); the two engines alternate so machine noise hits both alike.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time


def _hf():
    """Seconds for HF `generate` of exactly n tokens per chat prompt (one left-padded batch)."""
    from drex_jax.bench.runner import hf_generator

    _, _, generate = hf_generator()
    return lambda prompts, n: generate(prompts, True, n)[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None, help="also write results to this JSON file")
    args = ap.parse_args(argv)

    import jax

    from drex_jax import Engine, GenerationConfig
    from drex_jax.data.texts import PROMPTS

    n = args.new_tokens
    engine = Engine(max_slots=max(args.batches), max_seq_len=256)
    hf_run = _hf()
    gc = GenerationConfig(max_new_tokens=n, ignore_eos=True)
    rows = []
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), {os.cpu_count()} cpus, "
          f"{platform.processor() or platform.machine()}", file=sys.stderr)
    for b in args.batches:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(b)]
        engine.generate(prompts, gc, chat=True)  # warm-up: compiles this batch's buckets
        hf_run(prompts[:b], 2)
        ours, hf, hf1 = [], [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            res = engine.generate(prompts, gc, chat=True)
            wall = time.perf_counter() - t0
            ours.append((wall, statistics.mean(r.stats.ttft_s for r in res), statistics.mean(r.stats.tpot_s for r in res)))
            hf.append(hf_run(prompts, n))
            hf1.append(hf_run(prompts, 1))  # TTFT = prefill + first token
        wall, ttft, tpot = (statistics.median(x) for x in zip(*ours))
        hf_wall, hf_ttft = statistics.median(hf), statistics.median(hf1)
        row = dict(batch=b, new_tokens=n,
                   drex_tok_s=b * n / wall, drex_ttft_ms=ttft * 1e3, drex_tpot_ms=tpot * 1e3,
                   hf_tok_s=b * n / hf_wall, hf_ttft_ms=hf_ttft * 1e3, hf_tpot_ms=(hf_wall - hf_ttft) / (n - 1) * 1e3)
        row["speedup"] = row["drex_tok_s"] / row["hf_tok_s"]
        rows.append(row)
        print(f"batch {b:3d}: drex {row['drex_tok_s']:7.1f} tok/s  ttft {row['drex_ttft_ms']:7.1f} ms  "
              f"tpot {row['drex_tpot_ms']:6.1f} ms | HF {row['hf_tok_s']:7.1f} tok/s  ttft {row['hf_ttft_ms']:7.1f} ms  "
              f"tpot {row['hf_tpot_ms']:6.1f} ms | speed-up {row['speedup']:.2f}x", flush=True)
    print("\n| batch | drex tok/s | drex TTFT ms | drex TPOT ms | HF tok/s | HF TTFT ms | HF TPOT ms | speed-up |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['batch']} | {r['drex_tok_s']:.1f} | {r['drex_ttft_ms']:.0f} | {r['drex_tpot_ms']:.1f} | "
              f"{r['hf_tok_s']:.1f} | {r['hf_ttft_ms']:.0f} | {r['hf_tpot_ms']:.1f} | {r['speedup']:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
