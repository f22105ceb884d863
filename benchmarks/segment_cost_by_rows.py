"""Issue 16/27 profile: segment_step time by row count (layers 0-8 + ramp, 22-30 + LM head) vs the fused step.
Usage: python -m benchmarks.segment_cost_by_rows [xla|kernel] (the layers' projections; default xla)"""
import sys, time, statistics, numpy as np, jax, jax.numpy as jnp
from convert.checkpoint import load_checkpoint
from drex_jax.default_model import default_model_path
from drex_jax.model.params import decode_layout
from drex_jax.bench.roofline import decode_fixture
from drex_jax.rebatch.steps import segment_step
from drex_jax.model.paged import decode_step
from drex_jax.model.modules import split_model
cfg, params, _ = load_checkpoint(default_model_path()); params = decode_layout(params)
if (sys.argv[1:] or ["xla"])[0] == "kernel":
    from drex_jax.model.params import packed_layout
    params = packed_layout(params)
graph, state = split_model(cfg, params)
def t(batch, start, end, ramp, ctx=128):
    fx = decode_fixture(cfg, batch, ctx, jnp.float32)
    hid = [jnp.zeros((batch, cfg.hidden_size), jnp.float32)]
    slots = jnp.arange(batch, dtype=jnp.int32); rt = jnp.arange(1024, dtype=jnp.int32)
    pool = [fx.pool]
    def run():
        tok, conf, pool[0], hid[0] = segment_step(state, pool[0], hid[0], slots, fx.tokens, fx.positions, fx.block_tables, fx.sampling, rt, graph=graph, start=start, end=end, ramp=ramp, measure="top1_minus_top2", do_sample=False, attention="ffi")
        jax.block_until_ready(tok)
    run(); run()
    ts = []
    for _ in range(7):
        t0 = time.perf_counter(); run(); ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3
def tf(batch, ctx=128):
    fx = decode_fixture(cfg, batch, ctx, jnp.float32); pool=[fx.pool]
    def run():
        out, pool[0] = decode_step(state, pool[0], fx.tokens, fx.positions, fx.block_tables, fx.sampling, graph=graph, do_sample=False, attention="ffi"); jax.block_until_ready(out)
    run(); run(); ts=[]
    for _ in range(7):
        t0=time.perf_counter(); run(); ts.append(time.perf_counter()-t0)
    return statistics.median(ts)*1e3
print("fused32", round(tf(32),1), "fused segment 0-30 ramp -1", round(t(32,0,30,-1),1))
for b in (32, 24, 16, 8):
    print(b, "seg 8 layers", round(t(b, 8, 15+1, 1),1) if False else round(t(b, 0, 8, 0),1), "deep 22-30", round(t(b, 22, 30, -1),1))
