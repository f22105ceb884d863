"""Issue 31: a running request's time per output token while long prompts arrive (chunked prefill).

One request decodes (a 128-token prompt, greedy, EOS ignored). Its inter-token times are measured
alone, then while `--arrivals` prompts of `--arrival-len` tokens arrive at once, until every
arrival has its first token. Per `max_prefill_tokens_while_decoding` budget (`--budgets`, 0 = the
engine default: the same as `max_prefill_tokens_per_step`): the running request's median and
worst TPOT during the arrival (and their ratio to its TPOT alone, measured in the same engine just
before), and the time until the last arrival's first token. Every engine is warmed up first
(`Engine.warmup`), so no step compiles; a step that did is reported.

Usage: python -m benchmarks.prefill_interleave [--budgets 0 32 64 128 256] [--arrivals 8]
       [--arrival-len 512] [--alone-tokens 24]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np


def measure(engine, arrivals: list[list[int]], running_prompt: list[int], alone_tokens: int) -> dict:
    from drex_jax import GenerationConfig, compile_counter

    compiles = compile_counter.count()
    runner = engine.submit(running_prompt, GenerationConfig(max_new_tokens=engine.max_seq_len - len(running_prompt),
                                                            ignore_eos=True))
    stamps = []

    def step(first: dict | None = None):
        for ev in engine.step():
            if ev.request_id == runner:
                stamps.append(time.perf_counter())
            elif first is not None:
                first.setdefault(ev.request_id, time.perf_counter())

    while len(stamps) < alone_tokens + 2:
        step()
    alone = np.diff(stamps[2:])  # the first gaps include its own prefill
    gc = GenerationConfig(max_new_tokens=2, ignore_eos=True)
    t0, mark = time.perf_counter(), len(stamps)
    ids = [engine.submit(p, gc) for p in arrivals]
    first: dict = {}
    while len(first) < len(ids):
        step(first)
    during = np.diff(stamps[mark - 1:])
    engine.cancel(runner)
    while engine.has_work:
        engine.step()
    return {"tpot_alone_ms": 1e3 * float(np.median(alone)),
            "tpot_during_median_ms": 1e3 * float(np.median(during)), "tpot_during_max_ms": 1e3 * float(during.max()),
            "ratio_median": float(np.median(during) / np.median(alone)), "ratio_max": float(during.max() / np.median(alone)),
            "all_first_tokens_s": max(first.values()) - t0, "running_tokens_during": int(len(during)),
            "compiled": compile_counter.count() != compiles}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", type=int, nargs="+", default=[0, 32, 64, 128, 256])
    ap.add_argument("--arrivals", type=int, default=8)
    ap.add_argument("--arrival-len", type=int, default=512)
    ap.add_argument("--alone-tokens", type=int, default=24)
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args()

    from drex_jax import Engine

    rng = np.random.default_rng(0)
    rows = []
    for budget in args.budgets:
        engine = Engine(max_slots=16, max_seq_len=1024, max_prefill_tokens_while_decoding=budget or None)
        print(f"[interleave] budget {budget or 'default'}: warming up", file=sys.stderr, flush=True)
        engine.warmup(sampling=False)
        vocab = engine.cfg.vocab_size
        running_prompt = [int(t) for t in rng.integers(100, vocab, 128)]
        arrivals = [[int(t) for t in rng.integers(100, vocab, args.arrival_len)] for _ in range(args.arrivals)]
        r = {"while_decoding": engine.max_prefill_tokens_while_decoding,
             **measure(engine, arrivals, running_prompt, args.alone_tokens)}
        rows.append(r)
        print(json.dumps(r), flush=True)
    print(f"\n{args.arrivals} prompts x {args.arrival_len} tokens arrive while one request decodes "
          f"(bundled SmolLM2 fp32, per-step budget {engine.max_prefill_tokens_per_step} when nothing decodes)\n")
    print("| prefill tokens per step while decoding | TPOT alone (ms) | TPOT during (median, ms) | x alone "
          "| worst TPOT during (ms) | x alone | last arrival's first token (s) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['while_decoding']} | {r['tpot_alone_ms']:.1f} | {r['tpot_during_median_ms']:.1f} | "
              f"{r['ratio_median']:.2f} | {r['tpot_during_max_ms']:.1f} | {r['ratio_max']:.2f} | "
              f"{r['all_first_tokens_s']:.2f} |" + (" (compiled)" if r["compiled"] else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
