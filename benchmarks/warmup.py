"""Warm-up of a 3-ramp early-exit engine: programs compiled and seconds, per attention path.

    python -m benchmarks.warmup [--attention ffi xla] [--max-slots 32] [--max-seq-len 1024]

Builds the bundled SmolLM2 with its shipped exit heads (ramps 8 / 15 / 22, 1024-token ramp
vocabulary, rebatching with ART), runs `engine.warmup()` and reports the programs it ran, the
programs XLA compiled and the wall time. Then it serves a few requests and checks that the
steady stream compiled nothing more.
"""
from __future__ import annotations

import argparse
import json
import sys
import time


def warmup_figures(attention: str | None, max_slots: int, max_seq_len: int) -> dict:
    from drex_jax import Engine, GenerationConfig, compile_counter
    from drex_jax.early_exit import EEConfig
    from drex_jax.exit_heads import read_meta, shipped_heads_dir

    heads = shipped_heads_dir()
    meta = read_meta(heads)
    ee = EEConfig(tuple(meta["exit_layers"]), tuple(meta["thresholds"]), missing_kv=meta["missing_kv"],
                  head="trained", ramp_vocab=meta["ramp_vocab"])
    kw = {} if attention is None else {"attention": attention}
    eng = Engine(ee=ee, policy="rebatching", exit_heads=heads, max_slots=max_slots, max_seq_len=max_seq_len, **kw)
    before = compile_counter.count()
    t0 = time.perf_counter()
    programs = eng.warmup(progress=True)
    seconds = time.perf_counter() - t0
    compiled = compile_counter.count() - before
    prompts = ["Write a haiku about the sea.", "What is 12 times 13?", "Name three prime numbers."]
    mark = compile_counter.count()
    eng.generate(prompts, GenerationConfig(max_new_tokens=24), chat=True)
    return {"attention": getattr(eng, "attention", "xla"), "programs": programs, "compiled": compiled,
            "warmup_s": seconds, "compiled_after_warmup": compile_counter.count() - mark,
            "max_slots": max_slots, "max_seq_len": max_seq_len}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--attention", nargs="+", default=["ffi", "xla"],
                    help="attention paths to warm up ('none': an engine without the option, i.e. an older commit)")
    ap.add_argument("--max-slots", type=int, default=32)
    ap.add_argument("--max-seq-len", type=int, default=1024)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    rows = []
    for att in args.attention:
        print(f"[warmup] attention={att}", file=sys.stderr, flush=True)
        rows.append(warmup_figures(None if att == "none" else att, args.max_slots, args.max_seq_len))
        r = rows[-1]
        print(f"attention={r['attention']}: {r['programs']} programs run, {r['compiled']} compiled, "
              f"{r['warmup_s']:.1f} s; compiled after warm-up: {r['compiled_after_warmup']}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
