"""How many programs `Engine.warmup()` compiles, per configuration and attention path, counted
without compiling (`Engine.warmup_programs`).

    python -m benchmarks.warmup_counts [--attention pallas_interpret xla] [--json F]

The bundled SmolLM2 with its shipped exit heads (ramps 8 / 15 / 22, 1,024-token ramp vocabulary):
32 slots x 2,048 tokens at full depth, with rebatching early exit (ART on), in verify mode
(recompute, 3 drafts), and 64 slots x 4,096 at full depth. `pallas_interpret` takes the block-table
widths the GPU's Pallas kernel takes (one fixed width: its cost follows each row's length); `xla`
takes a power-of-two width per batch. The pool is kept tiny: counts do not depend on it.
"""
from __future__ import annotations

import argparse
import json
import sys


def configurations(heads: str, meta: dict) -> dict:
    from drex_jax.early_exit import EEConfig

    layers, thr = tuple(meta["exit_layers"]), tuple(meta["thresholds"])
    ee = EEConfig(layers, thr, missing_kv=meta["missing_kv"], head="trained", ramp_vocab=meta["ramp_vocab"])
    verify = EEConfig(layers, thr[-1], missing_kv="recompute", verify=True, max_draft=3, head="trained",
                      ramp_vocab=meta["ramp_vocab"])
    return {
        "32 x 2048 full depth": dict(max_slots=32, max_seq_len=2048),
        "32 x 2048 rebatching": dict(max_slots=32, max_seq_len=2048, ee=ee, policy="rebatching", exit_heads=heads),
        "32 x 2048 verify": dict(max_slots=32, max_seq_len=2048, ee=verify, policy="rebatching", exit_heads=heads),
        "64 x 4096 full depth": dict(max_slots=64, max_seq_len=4096),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--attention", nargs="+", default=["pallas_interpret", "xla"])
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    from convert.checkpoint import load_checkpoint
    from drex_jax import Engine
    from drex_jax.default_model import default_model_path
    from drex_jax.exit_heads import read_meta, shipped_heads_dir

    cfg, params, tok = load_checkpoint(default_model_path())
    heads = shipped_heads_dir()
    rows = []
    for name, kw in configurations(heads, read_meta(heads)).items():
        for attention in args.attention:
            eng = Engine.from_params(cfg, params, tok, num_pages=64, attention=attention, **kw)
            rows.append({"configuration": name, "attention": eng.attention, "programs": eng.warmup_programs()})
            print(f"{name:24s} {eng.attention:17s} {rows[-1]['programs']:5d} programs", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
