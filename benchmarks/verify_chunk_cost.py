"""Issue 17 profile: what verify mode's pieces cost on this machine (bundled SmolLM2, fp32).

Per batch size: the fused full-depth decode step (`off`), the shallow draft segment (layers 0..E +
trained ramp head) and the deep verifying pass (layers E..L + LM head at every position) over chunks
of T = 1, 2, 4, 8 positions per row, each the median of repeated calls on real rows (128-token
contexts), with XLA's cost analysis (bytes accessed, FLOPs) of each program. From these, the ideal
verify speed-up for a draft share f and acceptance a is printed (plan model): per emitted token,
tokens drafted cost the draft segment, every deep pass costs the shallow segment of the token that
did not exit plus the deep pass over the row's chunk.

Usage: python -m benchmarks.verify_chunk_cost [--exit-layer 22] [--batches 1 8 32] [--repeats 9] [--matmul xla|kernel]
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np


def _median_ms(fn, repeats: int) -> float:
    fn()  # compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _cost(lowered) -> tuple[float, float]:
    c = lowered.compile().cost_analysis()
    c = c[0] if isinstance(c, list) else c
    return c.get("bytes accessed", float("nan")), c.get("flops", float("nan"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--exit-layer", type=int, default=22)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--chunks", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--attention", default="auto", choices=["auto", "xla", "ffi"])
    ap.add_argument("--matmul", default="auto", choices=["auto", "xla", "kernel"], help="the layers' projections")
    args = ap.parse_args()

    from drex_jax import Engine, GenerationConfig
    from drex_jax.bench.roofline import machine
    from drex_jax.early_exit import EEConfig
    from drex_jax.model.paged import decode_step
    from drex_jax.rebatch.steps import chunk_step
    from drex_jax.sched.batch import ChunkBatch, decode_batch

    E = args.exit_layer
    print(f"# verify cost profile, {machine()}, {time.strftime('%Y-%m-%d')}, exit layer {E}, attention {args.attention}, projections {args.matmul}")
    for B in args.batches:
        ee = EEConfig((E,), 0.5, missing_kv="recompute", verify=True, max_draft=15, head="trained", ramp_vocab=1024)
        eng = Engine(None, max_slots=B, max_seq_len=args.context + 32, ee=ee, policy="rebatching", art=False,
                     max_prefill_tokens_per_step=B * args.context,
                     attention=args.attention, matmul=args.matmul)
        L = eng.cfg.num_layers
        rng = np.random.default_rng(0)
        for _ in range(B):
            eng.submit([int(t) for t in rng.integers(0, eng.cfg.vocab_size, args.context)],
                       GenerationConfig(max_new_tokens=24, ignore_eos=True))
        eng.step()  # prefill (+ the first early-exit iteration)
        reqs = eng.scheduler.running
        assert len(reqs) == B, f"{len(reqs)} of {B} rows admitted"
        dec = decode_batch(reqs, eng.page_size, eng.max_slots, eng.table_width)
        dev = eng.runner  # the device state: params, pool, hidden ring, heads

        def off():
            out, dev.pool = decode_step(dev.state, dev.pool, dec.tokens, dec.positions, dec.block_tables, dec.sampling,
                                        graph=dev.graph, do_sample=False, attention=eng.attention)
            return out

        def chunk(T, start, end, ramp, every):
            # the last T positions of each row's context (all written: a re-run rewrites the same K/V)
            pos = np.stack([np.arange(r.cache_len - T + 1, r.cache_len + 1) for r in reqs]).astype(np.int32)
            pos = np.concatenate([pos, np.full((len(dec.slot_ids) - len(reqs), T), -1, np.int32)])
            arrays = ChunkBatch(dec.slot_ids, np.zeros_like(pos), pos, dec.block_tables, dec.sampling,
                                np.full_like(pos, start))
            kw = dict(graph=dev.ee_graph, start=start, end=end, ramp=ramp, measure="top1_minus_top2", do_sample=False,
                      attention=eng.attention, every_position=every)
            ops = (dev.ee_state, dev.pool, dev.hidden, arrays.slot_ids, arrays.tokens, arrays.positions,
                   arrays.depths, arrays.block_tables, arrays.sampling, dev.ramp_tokens)

            def run():
                tok, _, dev.pool, dev.hidden = chunk_step(dev.ee_state, dev.pool, dev.hidden, *ops[3:], **kw)
                return tok
            return run, chunk_step.lower(*ops, **kw)

        t_off = _median_ms(off, args.repeats)
        by_off = _cost(decode_step.lower(dev.state, dev.pool, dec.tokens, dec.positions, dec.block_tables,
                                         dec.sampling, graph=dev.graph, do_sample=False, attention=eng.attention))
        run, low = chunk(1, 0, E, 0, False)
        t_draft, by_draft = _median_ms(run, args.repeats), _cost(low)
        print(f"\n## batch {B}\n\n| program | ms | vs off | XLA bytes (MB) | XLA GFLOP |\n|---|---:|---:|---:|---:|")
        print(f"| off: fused decode step, layers 0-{L} | {t_off:.2f} | 1.00 | {by_off[0] / 1e6:.0f} | {by_off[1] / 1e9:.2f} |")
        print(f"| draft: layers 0-{E} + ramp head, T=1 | {t_draft:.2f} | {t_draft / t_off:.2f} | "
              f"{by_draft[0] / 1e6:.0f} | {by_draft[1] / 1e9:.2f} |")
        deep = {}
        for T in args.chunks:
            run, low = chunk(T, E, L, -1, True)
            deep[T] = _median_ms(run, args.repeats)
            by = _cost(low)
            print(f"| deep: layers {E}-{L} + LM head at every position, T={T} | {deep[T]:.2f} | "
                  f"{deep[T] / t_off:.2f} | {by[0] / 1e6:.0f} | {by[1] / 1e9:.2f} |")
        # plan model: per emitted token at draft share f (of emitted tokens) and acceptance a, the
        # mean chunk holds n = f / (1 - f) drafts; rejected drafts cost their draft segment too
        print("\nideal verify speed-up over off (plan model; f = emitted tokens that were accepted drafts, "
              "a = acceptance):\n\n| f \\ a | 0.6 | 0.8 | 0.9 | 1.0 |\n|---|---:|---:|---:|---:|")
        for f in (0.2, 0.4, 0.6, 0.8):
            cells = []
            for a in (0.6, 0.8, 0.9, 1.0):
                n = f / (1 - f)  # accepted drafts per deep pass
                T = min((t for t in args.chunks if t >= n + 1), default=max(args.chunks))
                per_pass = (n / a) * t_draft + t_draft + deep[T]
                cells.append(f"{t_off * (n + 1) / per_pass:.2f}")
            print(f"| {f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
