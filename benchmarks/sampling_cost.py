"""Issue 30 item 6: what sampling adds to a decode step (bundled SmolLM2, fp32).

Per batch size: one full-depth decode step with greedy rows vs sampled rows (temperature 1.0 top_p
1.0; temperature 0.7 top_p 0.9; temperature 1.0 top_p 0.95: nuclei of hundreds of tokens; top_k
50), with the current `drex_jax.sampling.sample` and with the old full-sort one (`old_sample` below, kept for the comparison), A/B interleaved in the same run (the
machine is noisy: each sampled call follows a greedy one; medians after a warm-up call). The rows are
real next-token distributions: English text prompts, one per row at different offsets. Then the
isolated `sample()` cost on those rows' logits [B, V].

Usage: python -m benchmarks.sampling_cost [--batches 1 8 32] [--repeats 20] [--no-old]
"""
from __future__ import annotations

import argparse
import statistics
import time
from contextlib import contextmanager

import jax
import jax.numpy as jnp
import numpy as np

TEXT = (
    "The history of the city goes back more than two thousand years. It was founded on the banks of a wide "
    "river, where merchants from the north and the south met to trade salt, grain and cloth. Over the centuries "
    "it grew into a busy port with narrow streets, crowded markets and tall houses built of red brick. In the "
    "spring, when the snow in the mountains melted, the river often flooded the lower town, and the people "
    "learned to build their homes on wooden piles. Today the old harbour is a museum, and visitors walk along "
    "the quays to see the ships that once carried goods across the sea. My favourite recipe for a quick dinner "
    "is a simple pasta with garlic, olive oil and a little chili. First, boil a large pot of salted water. "
    "While the pasta cooks, slice four cloves of garlic very thinly and warm them gently in the oil until they "
    "turn golden. Drain the pasta, keeping a cup of the cooking water, and toss everything together in the pan. "
    "In physics, the conservation of energy states that the total energy of an isolated system remains "
    "constant. Energy can neither be created nor destroyed; rather, it can only be transformed or transferred "
    "from one form to another. For instance, chemical energy is converted to kinetic energy when a stick of "
    "dynamite explodes, and the electrical energy in a battery becomes light and heat in a lamp."
)
CONFIGS = {"t1.0 p1.0": (1.0, 0, 1.0), "t0.7 p0.9": (0.7, 0, 0.9), "t1.0 p0.95": (1.0, 0, 0.95),
           "top_k 50": (1.0, 50, 1.0)}


def old_sample(logits: jax.Array, sp, do_sample: bool) -> jax.Array:
    """The sampler before issue 30: a full argsort of every row. logits [B, V] f32 -> [B] int32."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if not do_sample:
        return greedy
    V = logits.shape[-1]
    scaled = logits / jnp.maximum(sp.temperature, 1e-6)[:, None]
    order = jnp.argsort(-scaled, axis=-1)
    vals = jnp.take_along_axis(scaled, order, axis=-1)
    rank = jnp.arange(V)[None]
    k = jnp.where(sp.top_k > 0, sp.top_k, V)[:, None]
    probs = jax.nn.softmax(vals, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above this token
    keep = (rank < k) & ((before < sp.top_p[:, None]) | (rank == 0))
    vals = jnp.where(keep, vals, -jnp.inf)
    keys = jax.vmap(lambda s, t: jax.random.fold_in(jax.random.key(s), t))(sp.seed, sp.step)
    choice = jax.vmap(jax.random.categorical)(keys, vals)
    sampled = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return jnp.where(sp.temperature > 0, sampled, greedy)


@contextmanager
def _old_head():
    """While tracing: the model's sampled head as it was (the [B, V] logits into `old_sample`)."""
    from drex_jax.model.modules import EETransformer

    new = EETransformer.next_tokens
    EETransformer.next_tokens = lambda self, x, sp, do_sample: (
        new(self, x, sp, False) if not do_sample else old_sample(self.lm_head_logits(x), sp, True))
    try:
        yield
    finally:
        EETransformer.next_tokens = new


def _timed(fn) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return (time.perf_counter() - t0) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--no-old", action="store_true", help="skip the old sampler (slow at batch 32)")
    args = ap.parse_args()

    from drex_jax import Engine, GenerationConfig
    from drex_jax.bench.roofline import machine
    from drex_jax.generation import SamplingParams
    from drex_jax.model import paged
    from drex_jax.model.decoder import forward_hidden
    from drex_jax.sampling import sample
    from drex_jax.sched.batch import decode_batch

    # a separate jit of the same step, so the old head is traced into its own program
    old_step = jax.jit(lambda *a, **kw: paged.decode_step.__wrapped__(*a, **kw),
                       static_argnames=("graph", "do_sample", "attention"), donate_argnums=(1,))
    print(f"# sampling cost, {machine()}, {time.strftime('%Y-%m-%d')}, fp32, {args.context}-token contexts, "
          f"medians of {args.repeats} calls")
    isolated = []
    for B in args.batches:
        eng = Engine(None, max_slots=B, max_seq_len=args.context + 32, max_prefill_tokens_per_step=B * args.context)
        ids = eng.tokenizer(TEXT)["input_ids"]
        prompts = [ids[i * 3: i * 3 + args.context] for i in range(B)]
        assert all(len(p) == args.context for p in prompts), "TEXT too short for this batch and context"
        for p in prompts:
            eng.submit(p, GenerationConfig(max_new_tokens=8, ignore_eos=True))
        eng.step()  # prefill
        reqs = eng.scheduler.running
        assert len(reqs) == B, f"{len(reqs)} of {B} rows admitted"
        dec = decode_batch(reqs, eng.page_size, eng.max_slots, eng.table_width)
        dev = eng.runner

        def step(fn, sp, do_sample):
            def run():
                out, dev.pool = fn(dev.state, dev.pool, dec.tokens, dec.positions, dec.block_tables, sp,
                                   graph=dev.graph, do_sample=do_sample, attention=eng.attention)
                return out
            return run

        sps = {name: SamplingParams.build([(t, k, p, 1000 + i, 0) for i in range(B)], B)
               for name, (t, k, p) in CONFIGS.items()}
        variants = {("new", n): step(paged.decode_step, sp, True) for n, sp in sps.items()}
        if not args.no_old:
            variants.update({("old", n): step(old_step, sp, True) for n, sp in sps.items()})
        greedy = step(paged.decode_step, dec.sampling, False)
        greedy()  # compile
        for key, fn in variants.items():
            if key[0] == "old":
                with _old_head():
                    fn()
            else:
                fn()
        g_times, s_times = [], {key: [] for key in variants}
        for _ in range(args.repeats):
            for key, fn in variants.items():  # A/B: each sampled call right after a greedy one
                g_times.append(_timed(greedy))
                s_times[key].append(_timed(fn))
        g = statistics.median(g_times)
        print(f"\n## batch {B}\n\n| step | sampler | ms | sampled / greedy |\n|---|---|---:|---:|")
        print(f"| greedy | - | {g:.2f} | 1.00 |")
        for (impl, name), ts in s_times.items():
            print(f"| {name} | {impl} | {statistics.median(ts):.2f} | {statistics.median(ts) / g:.2f} |")

        # isolated sample() on these rows' real next-token logits [B, V]
        model = dev.graph.merge(dev.state)
        h = forward_hidden(model, eng.cfg, jnp.asarray(prompts, jnp.int32))[-1, :, -1]
        logits = jax.block_until_ready(model.lm_head_logits(h))
        fns = {"greedy": (jax.jit(lambda l, s: sample(l, s, False)), dec.sampling)}
        for name, sp in sps.items():
            fns[f"{name} new"] = (jax.jit(lambda l, s: sample(l, s, True)), sp)
            if not args.no_old:
                fns[f"{name} old"] = (jax.jit(lambda l, s: old_sample(l, s, True)), sp)
        row = {}
        for name, (fn, sp) in fns.items():
            fn(logits, sp)
            row[name] = statistics.median(_timed(lambda: fn(logits, sp)) for _ in range(max(5, args.repeats // 2)))
        isolated.append((B, row))
        del eng, dev, model
    names = list(isolated[0][1])
    print(f"\n## isolated sample() on [B, {logits.shape[-1]}] real logits, ms\n\n| B | " + " | ".join(names)
          + " |\n|---|" + "---:|" * len(names))
    for B, row in isolated:
        print(f"| {B} | " + " | ".join(f"{row[n]:.2f}" for n in names) + " |")


if __name__ == "__main__":
    main()
