"""Host time per `Engine.step` beyond the compiled decode call, with the overlapped loop (a step in
flight while the host commits the previous one) and without, in one run.

    python -m benchmarks.host_overlap [--new-tokens 1000] [--rounds 3] [--smollm2-batches 1 8 32]

A tiny random Llama (2 layers, hidden 64) with SmolLM2's 49,152-token vocabulary and tokenizer (so
detokenization is real work) at batch 32, EOS ignored, full depth, FFI attention: the device work
is small, so the host's share shows. Per mode, rounds alternate: median ms per step over the
first and the last quarter of the generation, and the compiled decode call alone on the same rows
(dispatch + fetch, timed in the middle of each quarter on the live batch; it rewrites the same
K/V, so the run is unchanged). "Beyond the call" = step - call. `--smollm2-batches`: then the bundled SmolLM2 (fp32),
64-token random prompts, 48 new tokens, ms per token with overlap off and on (alternating rounds).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def _time_call(eng, reps: int = 20) -> float:
    """Median seconds of the compiled decode call alone (dispatch + fetch) on the live rows."""
    if eng._inflight is not None:  # let the step in flight land first
        eng.runner.fetch(eng._inflight.out)
    batch = eng.decoder.layout.decode(list(eng.scheduler.decoding))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        eng.runner.fetch(eng.runner.decode_async(batch, False))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(eng, prompts, gc, measure: bool = True) -> dict | None:
    """Median step time over the first and last quarter of the steps, and the call alone timed at
    the middle of each quarter."""
    for p in prompts:
        eng.submit(p, gc)
    times, call = [], {}
    n = gc.max_new_tokens
    while eng.has_work:
        t0 = time.perf_counter()
        eng.step()
        times.append(time.perf_counter() - t0)
        if measure and len(times) in (n // 8, n - n // 8):
            call[len(times)] = _time_call(eng)
    if not measure:
        return None
    q = max(len(times) // 4, 1)
    early, late = sorted(call)
    return {"early_ms": 1e3 * statistics.median(times[2:q]), "late_ms": 1e3 * statistics.median(times[-q:]),
            "call_early_ms": 1e3 * call[early], "call_late_ms": 1e3 * call[late], "steps": len(times)}


def smollm2_ab(batches, rounds: int) -> None:
    import numpy as np

    from convert.checkpoint import load_checkpoint
    from drex_jax import Engine, GenerationConfig
    from drex_jax.default_model import default_model_path

    cfg, params, tok = load_checkpoint(default_model_path(verbose=False))
    rng = np.random.default_rng(0)
    gc = GenerationConfig(max_new_tokens=48, ignore_eos=True)
    for B in batches:
        prompts = [[int(t) for t in rng.integers(0, cfg.vocab_size, 64)] for _ in range(B)]
        engines = {o: Engine.from_params(cfg, params, tok, max_slots=B, max_seq_len=256, overlap=o) for o in (False, True)}
        for eng in engines.values():
            eng.generate(prompts, gc)  # compiles
        ms = {False: [], True: []}
        for _ in range(rounds):
            for o, eng in engines.items():
                for p in prompts:
                    eng.submit(p, gc)
                eng.step()  # prefill
                t0 = time.perf_counter()
                while eng.has_work:
                    eng.step()
                ms[o].append(1e3 * (time.perf_counter() - t0) / (gc.max_new_tokens - 1))
        print(f"SmolLM2 batch {B}: ms per token, overlap off {statistics.median(ms[False]):.2f} "
              f"({', '.join(f'{x:.1f}' for x in ms[False])}), on {statistics.median(ms[True]):.2f} "
              f"({', '.join(f'{x:.1f}' for x in ms[True])}): on/off {statistics.median(ms[True]) / statistics.median(ms[False]):.2f}x",
              flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--smollm2-batches", type=int, nargs="*", default=None)
    args = ap.parse_args(argv)
    if args.smollm2_batches:
        smollm2_ab(args.smollm2_batches, args.rounds)
        return 0
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
        run(eng, prompts, GenerationConfig(max_new_tokens=8, ignore_eos=True), measure=False)
    results = {False: [], True: []}
    keys = ("early_ms", "call_early_ms", "late_ms", "call_late_ms")
    for rnd in range(args.rounds):
        for o in (False, True):
            results[o].append(run(engines[o], prompts, gc))
            r = results[o][-1]
            print(f"round {rnd} overlap={o!s:5s}: early step {r['early_ms']:.2f} ms, call {r['call_early_ms']:.2f} ms; "
                  f"late step {r['late_ms']:.2f} ms, call {r['call_late_ms']:.2f} ms", flush=True)
    for o in (False, True):
        m = {k: statistics.median(r[k] for r in results[o]) for k in keys}
        print(f"overlap={o!s:5s} median: early step {m['early_ms']:.2f} ms - call {m['call_early_ms']:.2f} ms = "
              f"{m['early_ms'] - m['call_early_ms']:+.2f} ms; late step {m['late_ms']:.2f} ms - call "
              f"{m['call_late_ms']:.2f} ms = {m['late_ms'] - m['call_late_ms']:+.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
