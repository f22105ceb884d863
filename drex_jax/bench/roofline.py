"""`drex-jax bench --roofline`: decode steps against this machine's roofline.

Roofline of one decode step = max(bytes read / read bandwidth, FLOPs / matmul peak), with
bytes = every weight once + every live K/V byte, FLOPs = 2 x matmul params x batch + attention
(4 x layers x heads x head_dim x context x batch). Peak and bandwidth are measured in the same
run (a jitted XLA matmul, a jitted XLA reduction), so "% of roofline" is comparable across runs
on a noisy machine. The analytic bytes and FLOPs are printed beside XLA's own `cost_analysis()`
of the compiled step. Decode points exclude prefill (the pool is filled with random K/V for every
row); a prefill section (`bench.prefill`) times the prefill calls the engine plans for a batch of
prompts x prompt length against the measured matmul peak.
"""
from __future__ import annotations

import dataclasses
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from drex_jax.kv.pages import bucket, pages_needed
from drex_jax.kv.pool import init_pool
from drex_jax.model.config import ModelConfig
from drex_jax.model.modules import split_model
from drex_jax.model.paged import decode_step
from drex_jax.model.kernels.matmul import resolve_matmul
from drex_jax.model.params import decode_layout, packed_layout
from drex_jax.rebatch.steps import segment_step
from drex_jax.generation import SamplingParams
from drex_jax.sched.cost_model import segment_cost

FULL_GRID = {"batches": (1, 8, 32, 64), "contexts": (128, 512, 2048), "hf_batches": (1, 8, 32)}
QUICK_GRID = {"batches": (1, 8, 32), "contexts": (128, 512), "hf_batches": (1, 8)}


def _best_seconds(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile + warm
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return min(times)


def engine_dtype(params: dict) -> dict:
    """The params in the dtype an engine built with dtype="auto" runs: bfloat16 on a GPU (the
    checkpoint's own dtype elsewhere), so a benchmark measures what serving would run."""
    if jax.default_backend() != "gpu" or params["final_norm"].dtype == jnp.bfloat16:
        return params
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), params)


def _iterations(iters: int | None) -> int:
    """Work items per timed call: a GPU finishes one 2048^3 matmul or a 512 MB read in microseconds,
    less than the call's own dispatch, so it runs many inside one jitted loop."""
    return iters or (1 if jax.default_backend() == "cpu" else 50)


def measure_matmul_peak(dtype=jnp.float32, n: int = 2048, repeats: int = 5, iters: int | None = None) -> float:
    """FLOP/s of [n, n] x [n, n] matmuls, `iters` chained inside one jitted call (each multiplies the
    previous product, so none can be hoisted or skipped); best of `repeats`."""
    iters = _iterations(iters)
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)) / np.sqrt(n), dtype)
    f = jax.jit(lambda x, w: jax.lax.fori_loop(0, iters, lambda _, y: y @ w, x))
    return iters * 2 * n**3 / _best_seconds(lambda: f(a, a), repeats)


def measure_read_bandwidth(dtype=jnp.float32, nbytes: int = 512 * 2**20, repeats: int = 5,
                           iters: int | None = None) -> float:
    """Bytes/s read by jitted sums over an array of `nbytes`, `iters` inside one call (each scaled by
    the previous sum, so each reads the whole array again); best of `repeats`."""
    iters = _iterations(iters)
    x = jnp.ones((nbytes // jnp.dtype(dtype).itemsize,), dtype)

    def read(v):
        step = lambda _, acc: jnp.sum(v * (acc * 1e-30 + 1).astype(v.dtype), dtype=jnp.float32)  # noqa: E731
        return jax.lax.fori_loop(0, iters, step, jnp.float32(0))
    f = jax.jit(read)
    return iters * nbytes / _best_seconds(lambda: f(x), repeats)


def decode_cost(cfg: ModelConfig, params: dict, batch: int, context: int, start: int = 0,
                end: int | None = None, head_columns: int | None = None) -> tuple[float, float]:
    """Analytic (bytes read, FLOPs) of layers [start, end) at the params' dtype (see
    `sched.cost_model.segment_cost`)."""
    itemsize = jnp.dtype(params["final_norm"].dtype).itemsize
    return segment_cost(cfg, itemsize, batch, context, start, end, head_columns)


@dataclasses.dataclass
class DecodeFixture:
    """A pool whose `batch` rows each hold `context` cached positions (random K/V), and the
    arrays of one decode step for them."""
    pool: dict
    tokens: jax.Array  # [B]
    positions: jax.Array  # [B]
    block_tables: jax.Array  # [B, P]
    sampling: SamplingParams


def decode_fixture(cfg: ModelConfig, batch: int, context: int, dtype, page_size: int = 16) -> DecodeFixture:
    per_row = pages_needed(context + 1, page_size)
    pool = init_pool(cfg, 1 + batch * per_row, page_size, dtype)
    key = jax.random.key(0)
    pool = {k: jax.random.normal(jax.random.fold_in(key, i), v.shape, v.dtype) * 0.5
            for i, (k, v) in enumerate(pool.items())}
    width = bucket(per_row, 1)
    bt = np.zeros((batch, width), np.int32)
    bt[:, :per_row] = 1 + np.arange(batch * per_row).reshape(batch, per_row)
    rng = np.random.default_rng(0)
    return DecodeFixture(pool, jnp.asarray(rng.integers(0, cfg.vocab_size, batch), jnp.int32),
                         jnp.full((batch,), context, jnp.int32), jnp.asarray(bt),
                         SamplingParams.build([], batch))


def _time_steps(step, fx: DecodeFixture, steps: int) -> tuple[float, object]:
    """Median seconds of `steps` calls of `step(pool) -> (out, pool)` after one compiling call."""
    out, fx.pool = step(fx.pool)
    jax.block_until_ready(out)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        out, fx.pool = step(fx.pool)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def xla_cost(jitted, *args, **kwargs) -> dict:
    """XLA's cost analysis of the compiled call: {'flops', 'bytes accessed'}."""
    cost = jitted.lower(*args, **kwargs).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {"flops": float(cost.get("flops", 0.0)), "bytes": float(cost.get("bytes accessed", 0.0))}


def roofline_point(cfg, params, batch: int, context: int, peak: float, bandwidth: float, steps: int,
                   attention: str = "ffi", compare: tuple[str, ...] = ("xla",)) -> dict:
    """Time `decode_step` with `attention` (and each path in `compare`, same fixture) at one point.
    `params` in the decode layout."""
    fx = decode_fixture(cfg, batch, context, params["final_norm"].dtype)
    nbytes, flops = decode_cost(cfg, params, batch, context, head_columns=cfg.vocab_size)
    kv_bytes = decode_cost(cfg, params, batch, context)[0] - decode_cost(cfg, params, batch, 0)[0]
    roof = max(nbytes / bandwidth, flops / peak)
    row = {"batch": batch, "context": context, "attention": attention, "bytes": nbytes, "flops": flops,
           "kv_bytes": kv_bytes, "roofline_ms": roof * 1e3,
           "bound": "bandwidth" if nbytes / bandwidth >= flops / peak else "compute"}
    graph, state = split_model(cfg, params)
    for path in (attention,) + tuple(compare):
        kw = dict(graph=graph, do_sample=False, attention=path)
        sec, _ = _time_steps(lambda pool: decode_step(state, pool, fx.tokens, fx.positions, fx.block_tables,
                                                       fx.sampling, **kw), fx, steps)
        if path == attention:
            # the layer loop is unrolled, so XLA's count covers every layer; it does not see inside
            # the FFI kernel's custom call (there it omits the K/V reads)
            xla = xla_cost(decode_step, state, fx.pool, fx.tokens, fx.positions, fx.block_tables, fx.sampling, **kw)
            row.update(ms_per_step=sec * 1e3, tok_s=batch / sec, pct_roofline=100 * roof / sec,
                       xla_bytes=xla["bytes"], xla_flops=xla["flops"])
        else:
            row[f"ms_per_step_{path}"] = sec * 1e3
    if attention == "ffi":  # the kernel alone, every layer: its own K/V streaming rate
        row["kernel_ms"] = 1e3 * attention_kernel_seconds(cfg, fx, steps)
        row["kernel_kv_gbs"] = kv_bytes / (row["kernel_ms"] / 1e3) / 1e9
        row["kernel_pct_bandwidth"] = 100 * row["kernel_kv_gbs"] * 1e9 / bandwidth
    return row


def attention_kernel_seconds(cfg, fx: DecodeFixture, steps: int) -> float:
    """Median seconds of the FFI paged-attention kernel over every layer of the fixture's pool
    (one query per row, nothing else in the program)."""
    from drex_jax.model.kernels.ffi import paged_attention

    B = fx.tokens.shape[0]
    q = jax.random.normal(jax.random.key(2), (B, 1, cfg.num_heads, cfg.head_dim), jnp.float32)
    new = jnp.zeros((B, 1, cfg.num_kv_heads, cfg.head_dim), jnp.float32)  # the step's own token

    def all_layers(q, k_pool, v_pool, bt, pos):
        out = jnp.zeros_like(q)
        for layer in range(cfg.num_layers):  # each call depends on the last: none is skipped
            out, k_pool, v_pool = paged_attention(q + out * 1e-6, k_pool, v_pool, new, new, bt, pos, layer)
        return out, k_pool, v_pool

    run_layers = jax.jit(all_layers, donate_argnums=(1, 2))  # donated: the kernel updates the pool in place
    pos = fx.positions[:, None]
    state = [fx.pool["k"], fx.pool["v"]]

    def run():
        out, state[0], state[1] = run_layers(q, state[0], state[1], fx.block_tables, pos)
        return out

    sec = _best_seconds(run, steps)
    fx.pool = {"k": state[0], "v": state[1]}  # (it wrote zeros at each row's next position only)
    return sec


def engine_step_ms(cfg, params, batch: int, context: int, steps: int, matmul: str = "auto") -> float:
    """Median ms of `Engine.step` (planning, the compiled step, sampling, token fetch and
    bookkeeping) with `batch` requests of `context` prompt tokens, all prefilled first."""
    from drex_jax import Engine, GenerationConfig

    eng = Engine.from_params(cfg, params, max_slots=batch, max_seq_len=context + steps + 8,
                             max_prefill_tokens_per_step=batch * context, matmul=matmul)
    rng = np.random.default_rng(1)
    gc = GenerationConfig(max_new_tokens=steps + 4, ignore_eos=True)
    for _ in range(batch):
        eng.submit([int(t) for t in rng.integers(0, cfg.vocab_size, context)], gc)
    eng.step()  # prefill all, first decode step (compiles)
    eng.step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        eng.step()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def segment_pair(cfg, params, batch: int, context: int, exit_layer: int, ramp_vocab: int | None, peak: float,
                 bandwidth: float, steps: int, attention: str = "ffi") -> dict:
    """One early-exit segment pair (layers 0..E + ramp, then E..L + LM head, shared head) vs the
    fused full-depth step, all at the same batch and context: the segments' overhead."""
    dtype = params["final_norm"].dtype
    fx = decode_fixture(cfg, batch, context, dtype)
    slots = jnp.arange(batch, dtype=jnp.int32)
    ramp_tokens = None if ramp_vocab is None else jnp.arange(ramp_vocab, dtype=jnp.int32)
    out = {}
    graph, model_state = split_model(cfg, params)
    for name, start, end, ramp in (("shallow", 0, exit_layer, 0), ("deep", exit_layer, cfg.num_layers, -1)):
        state = {"hidden": jnp.zeros((batch, cfg.hidden_size), dtype)}  # donated by each call

        def step(pool, start=start, end=end, ramp=ramp, state=state):
            tok, conf, pool, state["hidden"] = segment_step(
                model_state, pool, state["hidden"], slots, fx.tokens, fx.positions, fx.block_tables, fx.sampling,
                ramp_tokens, graph=graph, start=start, end=end, ramp=ramp, measure="top1_minus_top2", do_sample=False,
                attention=attention)
            return tok, pool

        sec, _ = _time_steps(step, fx, steps)
        cols = cfg.vocab_size if ramp == -1 or ramp_vocab is None else ramp_vocab
        nbytes, flops = decode_cost(cfg, params, batch, context, start, end, head_columns=cols)
        out[name] = {"ms": sec * 1e3, "roofline_ms": 1e3 * max(nbytes / bandwidth, flops / peak), "bytes": nbytes,
                     "flops": flops, "start": start, "end": end}
    return out


def hf_tok_s(batches, new_tokens: int = 32) -> dict[int, float]:
    """HF `transformers` fp32 greedy generate tokens/s on the bundled model (prompt batch of the
    held-out chat prompts, exactly `new_tokens` each; only `generate` is timed)."""
    from drex_jax.bench.runner import hf_generator
    from drex_jax.data.texts import PROMPTS

    _, _, gen = hf_generator()
    gen(PROMPTS[:1], True, 2)
    res = {}
    for b in batches:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(b)]
        _, sec = gen(prompts, True, new_tokens)
        res[b] = b * new_tokens / sec
    return res


CALIBRATION_EXIT_LAYER = 8


def run_roofline(model: str | None = None, quick: bool = False, steps: int = 5, exit_layer: int = 15,
                 ramp_vocab: int | None = 1024, hf: bool = True, progress: bool = True,
                 attention: str = "auto", matmul: str = "auto") -> dict:
    from tqdm import tqdm

    from convert.checkpoint import load_checkpoint
    from drex_jax.default_model import default_model_path
    from drex_jax.model.attention_backends import resolve_attention

    grid = QUICK_GRID if quick else FULL_GRID
    cfg, params_ckpt, _ = load_checkpoint(model or default_model_path())
    params = engine_dtype(decode_layout(params_ckpt))
    dtype = params["final_norm"].dtype
    attention = resolve_attention(attention, dtype, cfg=cfg, page_size=16)
    # the projections the engine would run: the CPU kernel's packed weights where it takes them
    matmul = resolve_matmul(matmul, dtype, None, cfg)
    if matmul == "kernel":
        params = packed_layout(params)
    compare = ("xla",) if attention != "xla" else ()
    if progress:
        print(f"[roofline] attention={attention}; measuring matmul peak and read bandwidth", file=sys.stderr, flush=True)
    peak, bandwidth = measure_matmul_peak(dtype), measure_read_bandwidth(dtype)
    points = [(b, c) for b in grid["batches"] for c in grid["contexts"]]
    rows = []
    for b, c in tqdm(points, desc="roofline", disable=not progress, file=sys.stderr):
        row = roofline_point(cfg, params, b, c, peak, bandwidth, steps, attention, compare)
        # an unequal segment pair at every point: calls of 8 and 22 layers beside the full step let
        # the cost model (`drex-jax plan --project`) tell a call's fixed cost from its weight reads
        row["segment_calls"] = segment_pair(cfg, params, b, c, min(CALIBRATION_EXIT_LAYER, cfg.num_layers // 2),
                                            ramp_vocab, peak, bandwidth, steps, attention)
        if c == grid["contexts"][0]:  # the engine around the step, where prefilling every row is cheap
            row["engine_ms_per_step"] = engine_step_ms(cfg, params, b, c, steps, matmul=matmul)
        rows.append(row)
    # the shared VM's bandwidth drifts (29-47 GB/s seen in one day): measure again after the grid
    # and keep the higher figures, so "% of roofline" is never flattered by a slow first reading
    peak2, bandwidth2 = measure_matmul_peak(dtype), measure_read_bandwidth(dtype)
    if peak2 > peak or bandwidth2 > bandwidth:
        peak, bandwidth = max(peak, peak2), max(bandwidth, bandwidth2)
        for r in rows:
            r["roofline_ms"] = 1e3 * max(r["bytes"] / bandwidth, r["flops"] / peak)
            r["pct_roofline"] = 100 * r["roofline_ms"] / r["ms_per_step"]
            r["bound"] = "bandwidth" if r["bytes"] / bandwidth >= r["flops"] / peak else "compute"
            if "kernel_kv_gbs" in r:
                r["kernel_pct_bandwidth"] = 100 * r["kernel_kv_gbs"] * 1e9 / bandwidth
    seg_b, seg_c = grid["batches"][-1], grid["contexts"][0]
    full = next(r for r in rows if r["batch"] == seg_b and r["context"] == seg_c)
    seg = segment_pair(cfg, params, seg_b, seg_c, exit_layer, ramp_vocab, peak, bandwidth, steps, attention)
    seg.update(batch=seg_b, context=seg_c, exit_layer=exit_layer, ramp_vocab=ramp_vocab, full_ms=full["ms_per_step"],
               overhead_ms=seg["shallow"]["ms"] + seg["deep"]["ms"] - full["ms_per_step"])
    prefill_rows = prefill_section(cfg, params_ckpt, peak, attention, progress)
    hf_res = hf_tok_s(grid["hf_batches"]) if hf else {}
    for r in rows:
        if r["batch"] in hf_res and r["context"] == grid["contexts"][0]:
            r["hf_tok_s"] = hf_res[r["batch"]]
    return {"machine": machine(), "dtype": str(jnp.dtype(dtype)), "attention": attention, "matmul": matmul,
            "peak_flops": peak,
            "bandwidth": bandwidth, "steps_per_point": steps, "points": rows, "segments": seg, "hf_tok_s": hf_res,
            "prefill": prefill_rows,
            "date": time.strftime("%Y-%m-%d", time.gmtime())}


def prefill_section(cfg, params, peak: float, attention: str, progress: bool) -> list[dict]:
    """Prefill calls the engine's scheduler plans for prompts x length (`bench.prefill`), vs the peak."""
    from drex_jax.bench.prefill import POINTS, run_prefill
    from drex_jax.engine import Engine

    if progress:
        print("[roofline] prefill section", file=sys.stderr, flush=True)
    longest = max(n for _, n in POINTS)
    eng = Engine.from_params(cfg, params, max_slots=max(b for b, _ in POINTS), max_seq_len=longest + 16,
                             max_prefill_tokens_per_step=max(b * n for b, n in POINTS), attention=attention)
    return run_prefill(eng, peak)


def machine() -> str:
    import os
    import platform

    dev = jax.devices()[0]
    return f"{platform.machine()} {os.cpu_count()} cpus, {dev.platform} ({dev.device_kind}), jax {jax.__version__}"


def markdown(res: dict) -> str:
    att = res.get("attention", "xla")
    lines = [f"Roofline benchmark, {res['machine']}, {res['dtype']}, attention `{att}`, projections "
             f"`{res.get('matmul', 'xla')}`, {res['date']}: matmul peak "
             f"{res['peak_flops'] / 1e9:.0f} GFLOP/s, read bandwidth {res['bandwidth'] / 1e9:.1f} GB/s (measured in this "
             f"run, before and after the grid, the higher kept); median of {res['steps_per_point']} decode steps per point, prefill excluded.", "",
             "MB and GFLOP are analytic per step; the check columns give XLA's `cost_analysis()` of the compiled "
             "step (it does not see inside the FFI kernel, so there it omits the K/V reads). `xla attn ms`: the "
             "same step with the dense-gather XLA attention, same fixture. `Engine.step ms`: the whole engine "
             "step (plan, compiled step, token fetch, bookkeeping) with every request prefilled.",
             "",
             "`kernel K/V GB/s`: the FFI kernel alone over every layer (K/V bytes / its time) and that rate as "
             "% of the measured read bandwidth.",
             "",
             "| batch | context | ms/step | tok/s | MB read | GFLOP | XLA MB | XLA GFLOP | K/V MB | roofline ms | "
             "bound | % of roofline | kernel K/V GB/s (% of bw) | xla attn ms | Engine.step ms | HF tok/s |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in res["points"]:
        hf = f"{r['hf_tok_s']:.1f}" if "hf_tok_s" in r else ""
        xla_ms = f"{r['ms_per_step_xla']:.1f}" if "ms_per_step_xla" in r else ""
        eng = f"{r['engine_ms_per_step']:.1f}" if "engine_ms_per_step" in r else ""
        kv_rate = (f"{r['kernel_kv_gbs']:.1f} ({r['kernel_pct_bandwidth']:.0f}%)" if "kernel_kv_gbs" in r else "")
        lines.append(f"| {r['batch']} | {r['context']} | {r['ms_per_step']:.1f} | {r['tok_s']:.1f} | "
                     f"{r['bytes'] / 1e6:.0f} | {r['flops'] / 1e9:.2f} | {r['xla_bytes'] / 1e6:.0f} | "
                     f"{r['xla_flops'] / 1e9:.2f} | {r['kv_bytes'] / 1e6:.0f} | {r['roofline_ms']:.1f} | {r['bound']} | "
                     f"**{r['pct_roofline']:.0f}%** | {kv_rate} | {xla_ms} | {eng} | {hf} |")
    if res.get("prefill"):
        from drex_jax.bench.prefill import markdown as prefill_markdown

        lines += ["", prefill_markdown(res["prefill"], res["peak_flops"]).rstrip()]
    s = res["segments"]
    lines += ["", f"Early-exit segment pair at batch {s['batch']}, context {s['context']}, exit after layer "
              f"{s['exit_layer']} (ramp vocabulary {s['ramp_vocab'] or 'full'}): shallow {s['shallow']['ms']:.1f} ms "
              f"(roofline {s['shallow']['roofline_ms']:.1f}) + deep {s['deep']['ms']:.1f} ms (roofline "
              f"{s['deep']['roofline_ms']:.1f}) vs fused {s['full_ms']:.1f} ms: overhead {s['overhead_ms']:+.1f} ms."]
    return "\n".join(lines) + "\n"


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for b in sorted({r["batch"] for r in res["points"]}):
        pts = [r for r in res["points"] if r["batch"] == b]
        ax.plot([r["context"] for r in pts], [r["pct_roofline"] for r in pts], "o-", label=f"batch {b}")
    ax.set(xscale="log", xlabel="context (tokens per row)", ylabel="% of roofline",
           title=f"Decode step vs roofline ({res['dtype']})")
    ax.set_xticks(sorted({r["context"] for r in res["points"]}), [str(c) for c in sorted({r["context"] for r in res["points"]})])
    ax.set_ylim(0, 100)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
