"""Issue 16 profile: steady-state decode of 32 requests x 24 tokens on a replayed exit trace; rounds until none
compiles, per-round time and the time in segment calls / K/V fills.
Usage: python -m benchmarks.ee_steady_state SHARE POLICY [MIN_FILL]   (e.g. 0.7 rebatching 0.5, or 0.7 off)"""
import time, collections, sys
import numpy as np, jax
from convert.checkpoint import load_checkpoint
from drex_jax.default_model import default_model_path
from drex_jax.exit_heads import find_heads
from drex_jax import Engine, GenerationConfig
from drex_jax.early_exit import EEConfig
from drex_jax.sched.exit_trace import ExitTrace
from drex_jax.bench.ee_efficiency import trace_fractions
import drex_jax.sched.batch as batch_mod
import drex_jax.runner as dev
from drex_jax.sched.flush import FlushConfig
share = float(sys.argv[1]); policy = sys.argv[2]
path = default_model_path(); cfg, params, _ = load_checkpoint(path); heads = find_heads(path, cfg, params)
ramps = (8, 15, 22); fr = trace_fractions(share, 3)
kw = {}
if policy != "off":
    kw = dict(ee=EEConfig(ramps, 0.5, missing_kv="propagate", head="trained", ramp_vocab=1024), policy=policy, art=False,
              exit_heads=heads, exit_trace=ExitTrace.for_ramps(fr, 3, 0), flush=FlushConfig(min_fill=float(sys.argv[3]) if len(sys.argv) > 3 else 0.5))
eng = Engine.from_params(cfg, params, max_slots=32, max_seq_len=160, max_prefill_tokens_per_step=32*128, **kw)
T = collections.defaultdict(float); N = collections.Counter()
def wrap(mod, name):
    f = getattr(mod, name)
    def g(*a, **k):
        t0 = time.perf_counter(); out = f(*a, **k); 
        if name in ("fill_propagate", "fill_copy"): jax.block_until_ready(out)
        T[name] += time.perf_counter() - t0; N[name] += 1; return out
    setattr(mod, name, g)
for n in ("segment_step", "fill_propagate"): wrap(dev, n)
wrap(batch_mod, "decode_batch")
rng = np.random.default_rng(0)
prompts = [[int(t) for t in rng.integers(0, cfg.vocab_size, 128)] for _ in range(32)]
gc = GenerationConfig(max_new_tokens=24, ignore_eos=True)
for rnd in range(4):
    for p in prompts: eng.submit(p, gc)
    eng.step(); T.clear(); N.clear()
    from drex_jax import compile_counter as cc; c0 = cc.count()
    t0 = time.perf_counter(); it = 0
    while eng.has_work: eng.step(); it += 1
    dt = time.perf_counter() - t0
    print('round', rnd, round(dt,2), 'compiles', cc.count() - c0, 'compile s', round(cc.seconds_between(t0, t0+dt),2), {k: (round(v, 3), N[k]) for k, v in T.items()}, flush=True)
from drex_jax import compile_counter
print(policy, share, f"total {dt:.2f}s iters {it}", {k: (round(v, 3), N[k]) for k, v in T.items()})
