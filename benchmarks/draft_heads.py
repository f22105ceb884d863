"""Teacher-forced drafts of the bundled heads, position-local against context-aware, on held-out prompts.

Per ramp: top-1 agreement of the draft with the full model's greedy token, and per confidence
threshold (top1 - top2 over the 1,024 ramp candidates, as served) the share of positions that would
draft and the share of those drafts the full model accepts. Positions: those that predict a token of
the model's own greedy continuation (48 tokens) of the held-out prompts (`train_exits.held_out_prompts`:
20 chat prompts and HumanEval 64-83), each judged on the true prefix. Both head sets on the same
positions, in one run. (The engine's acceptance in verify mode: `drex-jax bench --verify --exit-heads
local attention`.)

    .venv/bin/python -m benchmarks.draft_heads [--heads local attention] [--out docs/bench/draft_heads.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--heads", nargs="+", default=["local", "attention"],
                    help="heads to compare: train-exits directories or the bundled 'local' / 'attention'")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--data", default=None, help="cache of the held-out hidden states (.npz; made when missing)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)

    from drex_jax.exit_heads import heads_dir_arg, load_heads, load_token_ranking
    from drex_jax.loading import load_model
    from drex_jax.train_drafts import THRESHOLDS, SequenceData, draft_predictions, sequence_data, teacher_forced_report
    from drex_jax.train_exits import generate_sequences, held_out_prompts

    t0 = time.perf_counter()
    _, cfg, params, tok = load_model(None)
    dirs = {h: heads_dir_arg(h) for h in args.heads}
    loaded = {h: load_heads(d, cfg, params) for h, d in dirs.items()}
    layers = sorted(set.intersection(*(set(m["exit_layers"]) for _, m in loaded.values())))
    if args.data and os.path.exists(args.data):
        data = SequenceData.load(args.data)
    else:
        enc, outs = generate_sequences(params, cfg, tok, held_out_prompts(20), args.new_tokens)
        data = sequence_data(params, cfg, enc, outs, layers)
        if args.data:
            data.save(args.data)
    results = {}
    for name, (heads, meta) in loaded.items():
        rows = [meta["exit_layers"].index(e) for e in layers]
        sub = {k: v[rows] for k, v in heads.items()}
        cand = load_token_ranking(dirs[name])[:1024]
        results[name] = teacher_forced_report(*draft_predictions(params, cfg, sub, layers, cand, data), layers)
    lines = ["| layer | heads | top-1 agreement | " + " | ".join(f"drafts / accepted @{t}" for t in THRESHOLDS) + " |",
             "|---:|---|---:|" + "---:|" * len(THRESHOLDS)]
    for i, e in enumerate(layers):
        for name in results:
            r = results[name][i]
            cells = [f"{r[f'drafts@{t}']:.1%} / " + ("-" if r[f"accepted@{t}"] is None else f"{r[f'accepted@{t}']:.1%}")
                     for t in THRESHOLDS]
            lines.append(f"| {e} | {name} | {r['agreement']:.1%} | " + " | ".join(cells) + " |")
    print(f"{results[next(iter(results))][0]['positions']} held-out positions\n" + "\n".join(lines))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d", time.gmtime()), "heads": dirs, "layers": layers,
                       "results": results, "seconds": round(time.perf_counter() - t0, 1)}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
