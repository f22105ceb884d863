"""Exit-ramp quality on held-out prompts (bundled SmolLM2).

    python -m benchmarks.exit_quality [--heads DIR] [--prompts 12] [--new-tokens 48]

1. Per ramp and head kind (`shared`, `trained`): top-1 agreement with the final layer on the
   model's own greedy continuations, and the exit rate / agreement of exited tokens as the
   threshold (top1 - top2) varies. Plot: docs/exit_quality.png.
2. Per missing-KV method (`copy`, `propagate`, `recompute`) and threshold, with trained heads:
   `reference_generate` output vs the full model's greedy output: token agreement (position by
   position), ROUGE-L F1 (`rouge-score`), and mean executed depth.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", default=None, help="trained heads dir (default: MODEL/exit_heads)")
    ap.add_argument("--prompts", type=int, default=12, help="held-out prompts for the missing-KV comparison")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--kv-thresholds", type=float, nargs="+", default=[0.9, 0.7, 0.5])
    ap.add_argument("--plot", default="docs/exit_quality.png")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import jax.numpy as jnp
    from rouge_score import rouge_scorer

    from convert.checkpoint import load_checkpoint
    from drex_jax.default_model import default_model_path
    from drex_jax.early_exit import EEConfig
    from drex_jax.model.ramps import confidence, ramp_logits
    from drex_jax.model.decoder import lm_head
    from drex_jax.reference import reference_generate
    from drex_jax.exit_heads import find_heads, load_heads
    from drex_jax.train_exits import generate_sequences, generated_hidden, held_out_prompts

    model = default_model_path()
    cfg, params, tok = load_checkpoint(model)
    heads, meta = load_heads(args.heads or find_heads(model, cfg, params), cfg, params)
    layers = tuple(meta["exit_layers"])
    held_out = held_out_prompts(20)
    t0 = time.perf_counter()
    encoded, outs = generate_sequences(params, cfg, tok, held_out, args.new_tokens, progress=False)
    ramp_h, final_h = generated_hidden(params, cfg, encoded, outs, layers, progress=False)
    keep = final_h  # positions that predict a generated token
    final_tok = np.asarray(jnp.argmax(lm_head(params, cfg, final_h), -1))
    thresholds = np.round(np.linspace(0.0, 0.95, 20), 2)
    res = {"exit_layers": layers, "positions": len(keep), "ramps": {}, "missing_kv": []}
    print(f"held-out positions: {len(keep)}; ramps after layers {layers}")
    print("\n| head | ramp (layer) | top-1 agreement | " + " | ".join(f"exit% / agree% @ {t}" for t in (0.9, 0.7, 0.5)) + " |")
    print("|---|---:|---:|" + "---:|" * 3)
    for kind in ("shared", "trained"):
        for r, E in enumerate(layers):
            lg = ramp_logits(params, cfg, jnp.asarray(ramp_h[:, r]), heads if kind == "trained" else None, r)
            agree = np.asarray(jnp.argmax(lg, -1)) == final_tok
            conf = np.asarray(confidence(lg, "top1_minus_top2"))
            curve = [(float(t), float(np.mean(conf > t)), float(np.mean(agree[conf > t])) if np.any(conf > t) else 1.0)
                     for t in thresholds]
            res["ramps"][f"{kind}/{E}"] = {"top1_agreement": float(agree.mean()), "curve": curve}

            def at(t):
                m = conf > t
                return f"{100 * m.mean():.1f} / {100 * agree[m].mean() if m.any() else 100:.1f}"

            print(f"| {kind} | {r} ({E}) | {100 * agree.mean():.1f}% | " + " | ".join(at(t) for t in (0.9, 0.7, 0.5)) + " |")

    # missing-KV methods vs the full model, trained heads
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    prompts = held_out[: args.prompts]
    full = outs[: args.prompts]
    eos = {tok.eos_token_id}
    print("\n| method | threshold | token agreement | ROUGE-L F1 | mean depth / 30 | exits per ramp |")
    print("|---|---:|---:|---:|---:|---|")
    for method in ("copy", "propagate", "recompute"):
        for thr in args.kv_thresholds:
            ee = EEConfig(layers, thr, missing_kv=method, head="trained")
            agree, rouge, depth, exits = [], [], [], np.zeros(len(layers) + 1)
            for (p, chat), ref in zip(prompts, full):
                ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                              tokenize=True, return_dict=False) if chat else tok(p).input_ids
                out = reference_generate(params, cfg, list(ids), ee, args.new_tokens, heads, tuple(eos))
                ref_cut = ref[: ref.index(tok.eos_token_id) + 1] if tok.eos_token_id in ref else ref
                n = max(len(ref_cut), len(out.token_ids))
                agree.append(sum(a == b for a, b in zip(out.token_ids, ref_cut)) / n)
                rouge.append(scorer.score(tok.decode(ref_cut, skip_special_tokens=True),
                                          tok.decode(out.token_ids, skip_special_tokens=True))["rougeL"].fmeasure)
                depth.extend(out.exit_layers[1:])
                for e in out.exit_layers[1:]:
                    exits[list(layers).index(e) if e in layers else len(layers)] += 1
            row = {"method": method, "threshold": thr, "token_agreement": float(np.mean(agree)),
                   "rougeL": float(np.mean(rouge)), "mean_depth": float(np.mean(depth)),
                   "exit_fractions": (exits / exits.sum()).tolist()}
            res["missing_kv"].append(row)
            print(f"| {method} | {thr} | {100 * row['token_agreement']:.1f}% | {row['rougeL']:.3f} | "
                  f"{row['mean_depth']:.1f} | {' / '.join(f'{100 * x:.0f}%' for x in row['exit_fractions'])} |",
                  flush=True)
    print(f"\n({time.perf_counter() - t0:.0f}s)", file=sys.stderr)
    if args.plot:
        _plot(res, args.plot)
        print(f"plot: {args.plot}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


def _plot(res, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for key, v in res["ramps"].items():
        t, rate, acc = zip(*v["curve"])
        style = "-" if key.startswith("trained") else "--"
        ax[0].plot(t, rate, style, label=key)
        ax[1].plot(t, acc, style, label=key)
    ax[0].set(xlabel="threshold (top1 - top2)", ylabel="exit rate", title="Exit rate per ramp")
    ax[1].set(xlabel="threshold (top1 - top2)", ylabel="top-1 agreement of exited tokens",
              title="Agreement with the final layer")
    ax[1].legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
