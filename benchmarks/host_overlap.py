"""Host time per `Engine.step` beyond the compiled decode call, with the overlapped loop (a step in
flight while the host commits the previous one) and without, in one run.

    python -m benchmarks.host_overlap [--new-tokens 1000] [--rounds 3]

A tiny random Llama (2 layers, hidden 64) with SmolLM2's 49,152-token vocabulary and tokenizer (so
detokenization is real work) at batch 32, EOS ignored, full depth, FFI attention: the device work
is small, so the host's share shows. Per mode, rounds alternate: median ms per step over the
first and the last quarter of the generation, and the compiled decode call alone on the same rows
(dispatch + fetch, timed mid-generation on the live batch; it rewrites the same K/V, so the run is
unchanged). "Beyond the call" = step - call.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def run(eng, prompts, gc) -> dict:
    for p in prompts:
        eng.submit(p, gc)
    times, call = [], []
    while eng.has_work:
        t0 = time.perf_counter()
        eng.step()
        times.append(time.perf_counter() - t0)
        if len(times) == len(prompts[0]) + gc.max_new_tokens // 2 or len(times) == 200:
            rows = list(eng.scheduler.decoding)
            if eng._inflight is not None:  # let the step in flight land first
                eng.runner.fetch(eng._inflight.out)
            batch = eng.decoder.layout.decode(rows)
            for _ in range(30):
                t0 = time.perf_counter()
                eng.runner.fetch(eng.runner.decode_async(batch, False))
                call.append(time.perf_counter() - t0)
    q = max(len(times) // 4, 1)
    return {"early_ms": 1e3 * statistics.median(times[2:q]), "late_ms": 1e3 * statistics.median(times[-q:]),
            "call_ms": 1e3 * statistics.median(call), "steps": len(times)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args(argv)
    import jax
    import numpy as np
    from transformers import AutoTokenizer

    from drex_jax import Engine, GenerationConfig
    from drex_jax.default_model import default_model_path
    from drex_jax.model.config import config_from_hf
    from drex_jax.model.params import init_params

    tok = AutoTokenizer.from_pretrained(os.path.join(default_model_path(verbose=False), "tokenizer"))
    cfg = config_from_hf(dict(architectures=["LlamaForCausalLM"], vocab_size=49152, hidden_size=64,
                              intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              max_position_embeddings=2048, eos_token_id=None))
    params = init_params(cfg, jax.random.key(0), scale=0.25)
    rng = np.random.default_rng(0)
    prompts = [[int(t) for t in rng.integers(0, 49152, 16)] for _ in range(args.batch)]
    gc = GenerationConfig(max_new_tokens=args.new_tokens, ignore_eos=True)
    engines = {o: Engine.from_params(cfg, params, tok, max_slots=args.batch, max_seq_len=args.new_tokens + 32,
                                     overlap=o) for o in (False, True)}
    for eng in engines.values():
        eng.warmup(sampling=False)
        run(eng, prompts, GenerationConfig(max_new_tokens=8, ignore_eos=True))
    results = {False: [], True: []}
    for rnd in range(args.rounds):
        for o in (False, True):
            results[o].append(run(engines[o], prompts, gc))
            r = results[o][-1]
            print(f"round {rnd} overlap={o!s:5s}: step {r['early_ms']:.2f} ms early / {r['late_ms']:.2f} ms late, "
                  f"call alone {r['call_ms']:.2f} ms, beyond the call {r['early_ms'] - r['call_ms']:+.2f} / "
                  f"{r['late_ms'] - r['call_ms']:+.2f} ms", flush=True)
    for o in (False, True):
        med = {k: statistics.median(r[k] for r in results[o]) for k in ("early_ms", "late_ms", "call_ms")}
        print(f"overlap={o!s:5s} median: step {med['early_ms']:.2f} / {med['late_ms']:.2f} ms (early / late), call "
              f"{med['call_ms']:.2f} ms, beyond the call {med['early_ms'] - med['call_ms']:+.2f} / "
              f"{med['late_ms'] - med['call_ms']:+.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
