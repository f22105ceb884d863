"""Early-exit policies on SmolLM2 with trained exit heads, same prompts, same run.

    python -m benchmarks.rebatching [--batch 32] [--new-tokens 64] [--thresholds 0.9 0.9 0.9]
                                    [--exit-layers 22] [--ramp-vocab 1024] [--missing-kv propagate]

For each policy: output tokens/s (median of --repeats after a warm-up), mean executed depth,
exits per ramp, involuntary exits/stays, host idle gap as a share of step time, ART's hindsight
accuracy, and two agreements with the full model: *prefix* (each token against the full
model's greedy token for the same prefix) and *free-running* (position by position against
the `off` run, so one early difference counts every later token as wrong). Prints rebatching's speed
against the best of {off, lazy} and against the ideal speed-up L / mean depth.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.9])
    ap.add_argument("--exit-layers", type=int, nargs="+", default=None, help="subset of the trained ramps")
    ap.add_argument("--policies", nargs="+", default=["off", "lazy", "eager", "rebatching", "rebatching:noart"],
                    help="policy names; 'rebatching:noart' = rebatching with ART off (split at every ramp)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--head", default="trained", choices=["trained", "shared"])
    ap.add_argument("--ramp-vocab", type=int, default=1024, help="candidate tokens per ramp (0 = whole vocabulary)")
    ap.add_argument("--missing-kv", default="propagate", choices=["copy", "propagate"])
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from drex_jax import Engine, GenerationConfig
    from drex_jax.bench.quality import prefix_agreement, token_agreement
    from drex_jax.data.texts import PROMPTS, humaneval_prompts
    from drex_jax.default_model import default_model_path
    from drex_jax.early_exit import EEConfig
    from drex_jax.exit_heads import find_heads, read_meta
    from drex_jax.train_exits import TrainExitsConfig

    model = default_model_path()
    from convert.checkpoint import load_checkpoint

    meta = read_meta(find_heads(model, *load_checkpoint(model)[:2]))
    layers = tuple(args.exit_layers or meta["exit_layers"])
    thr = tuple(args.thresholds) * (len(layers) if len(args.thresholds) == 1 else 1)
    ee = EEConfig(layers, thr, head=args.head, missing_kv=args.missing_kv, ramp_vocab=args.ramp_vocab or None)
    # held-out prompts: chat prompts and the HumanEval tail not used for training
    pool = [(p, True) for p in PROMPTS] + [(p, False) for p in humaneval_prompts()[TrainExitsConfig().num_humaneval:]]
    work = [pool[i % len(pool)] for i in range(args.batch)]
    gc = GenerationConfig(max_new_tokens=args.new_tokens, ignore_eos=True)
    rows, outputs = [], {}
    print(f"batch {args.batch}, {args.new_tokens} new tokens, ramps {list(layers)}, thresholds {list(thr)}, "
          f"ramp vocabulary {args.ramp_vocab or 'full'}, missing KV {args.missing_kv}", flush=True)
    for policy in args.policies:
        name, _, variant = policy.partition(":")
        eng = Engine(model, max_slots=args.batch, max_seq_len=1024, ee=ee, policy=name, art=variant != "noart")
        encoded = [eng.encode(p, chat) for p, chat in work]
        eng.generate(encoded, gc)  # warm-up (compiles)
        eng.profile_art()  # fused-step times for the shapes the warm-up met (ART's t_f)
        walls = []
        for _ in range(args.repeats):
            eng.reset_stats()
            t0 = time.perf_counter()
            res = eng.generate(encoded, gc)
            walls.append(time.perf_counter() - t0)
        st = eng.ee_stats
        outputs[policy] = [r.token_ids for r in res]
        acc, n_judged = eng.decoder.art.hindsight_accuracy()
        wall = statistics.median(walls)
        row = dict(policy=policy, tok_s=args.batch * args.new_tokens / wall, mean_depth=st.mean_depth(),
                   exits_per_ramp=st.exits_per_ramp, involuntary_exits=st.involuntary_exits,
                   involuntary_stays=st.involuntary_stays, art_declined=st.art_declined, flushes=st.flushes,
                   host_gap_share=st.host_gap_s / max(st.host_gap_s + st.device_s, 1e-9),
                   art_hindsight=acc, art_judged=n_judged)
        rows.append(row)
        print(f"{policy:>12}: {row['tok_s']:7.1f} tok/s  depth {row['mean_depth']:5.2f}  exits {st.exits_per_ramp}  "
              f"inv.exits {st.involuntary_exits}  inv.stays {st.involuntary_stays}  host gap "
              f"{100 * row['host_gap_share']:.1f}%", flush=True)
    L = eng.cfg.num_layers
    full = outputs.get("off")
    print("\n| policy | tok/s | mean depth | exits per ramp (last = full) | inv. exits | inv. stays | "
          "prefix agreement | free-running agreement vs off | host gap |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        out = outputs[r["policy"]]
        r["prefix_agreement"] = prefix_agreement(eng.params, eng.cfg, encoded, out)
        r["agreement_vs_off"] = token_agreement(out, full) if full else float("nan")
        print(f"| {r['policy']} | {r['tok_s']:.1f} | {r['mean_depth']:.2f} | {r['exits_per_ramp']} | "
              f"{r['involuntary_exits']} | {r['involuntary_stays']} | {100 * r['prefix_agreement']:.1f}% | "
              f"{100 * r['agreement_vs_off']:.1f}% | {100 * r['host_gap_share']:.1f}% |")
    by = {r["policy"]: r for r in rows}
    base = max((by[p]["tok_s"] for p in ("off", "lazy") if p in by), default=None)
    for name in ("rebatching", "rebatching:noart"):
        if name not in by:
            continue
        reb = by[name]
        print(f"\n{name}:")
        if base:
            print(f"  tok/s / best(off, lazy) = {reb['tok_s'] / base:.2f}x")
        if "off" in by:
            ideal = L / reb["mean_depth"]
            got = reb["tok_s"] / by["off"]["tok_s"]
            print(f"  ideal speed-up L/mean depth = {ideal:.2f}x; achieved vs off = {got:.2f}x ({got / ideal:.2f} of ideal)")
        print(f"  ART hindsight accuracy: {reb['art_hindsight']} over {reb['art_judged']} decisions; "
              f"declined {reb['art_declined']}; flushes {reb['flushes']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
