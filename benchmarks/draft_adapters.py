"""Do context-aware draft adapters agree with the full model more often than position-local ramp heads?

Offline, on the frozen trunk (issue 28, item 1): the model's own greedy continuations of the
exit-head training prompts (`train_exits.training_prompts`) and of the held-out prompts
(`train_exits.held_out_prompts`); the hidden states after layer e at every position are computed
once (`train_drafts.sequence_data`). Per ramp layer e, four drafts over the ramp vocabulary (the shipped 1,024 candidates):

- shipped: the shipped rank-64 heads (position-local: they see one position's hidden state);
- local: a rank-64 head trained here, the same steps and data as the adapters (the fair baseline);
- context: one attention block over the layer-e hidden states of the position and every earlier
  one, with its own Q/K/V/O (initialised from the trunk's layer e), then a rank-64 head; all
  trained. Served, its K/V would be one more layer of the paged pool;
- context, K/V frozen: the same, with K/V (and the input norm) kept at layer e's own, so that the
  served adapter could read layer e's K/V from the pool and write them for drafted positions
  (exactly what layer e computes there): only Q, O and the head train.

Loss: KL(full model || draft) over the candidates, at every real position. Reported on the
held-out continuations (positions that predict a generated token): top-1 agreement with the full
model's greedy token, and at confidence thresholds (top1 - top2, as served) the share of
positions that would draft and the share of those drafts the full model accepts.

    .venv/bin/python -m benchmarks.draft_adapters --layers 8 15 22 --steps 400 --out /tmp/adapters
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from drex_jax.model.ops import apply_rope, rms_norm, rope_inv_freq

THRESHOLDS = (0.3, 0.5, 0.7, 0.9)


def adapter_forward(cfg, a, x, positions, lengths, frozen_kv):
    """x [B, W, H] -> x + attention over x's causal prefix (its own or frozen K/V)."""
    B, W, _ = x.shape
    nh, nkv, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    sg = jax.lax.stop_gradient if frozen_kv else (lambda t: t)
    h_q = rms_norm(x, a["attn_norm"], cfg.rms_norm_eps)
    h_kv = rms_norm(x, sg(a["attn_norm"]), cfg.rms_norm_eps)
    inv = rope_inv_freq(cfg)
    q = apply_rope((h_q @ a["wq"]).reshape(B, W, nh, D), positions, inv)
    k = apply_rope((h_kv @ sg(a["wk"])).reshape(B, W, nkv, D), positions, inv)
    v = (h_kv @ sg(a["wv"])).reshape(B, W, nkv, D)
    k, v = jnp.repeat(k, nh // nkv, 2), jnp.repeat(v, nh // nkv, 2)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(D)
    causal = jnp.tril(jnp.ones((W, W), bool))[None, None] & (jnp.arange(W)[None, :] < lengths[:, None])[:, None, None]
    p = jax.nn.softmax(jnp.where(causal, s, -1e30), -1)
    o = jnp.einsum("bhqk,bkhd->bqhd", p, v).reshape(B, W, nh * D)
    return x + o @ a["wo"]


def head_logits(cfg, hd, x, cand_rows):
    h = rms_norm(x + (x @ hd["down"]) @ hd["up"], hd["norm"], cfg.rms_norm_eps)
    return h @ cand_rows.T


def draft_logits(cfg, kind, p, x, positions, lengths, cand_rows):
    if kind.startswith("context"):
        x = adapter_forward(cfg, p["adapter"], x, positions, lengths, kind == "context_frozen_kv")
    return head_logits(cfg, p["head"], x, cand_rows)


def train(cfg, kind, init, x, teacher, mask, lengths, cand_rows, steps, batch, lr, seed):
    """Adam on KL(teacher || draft) over masked positions; returns the trained params."""
    tx = optax.adamw(optax.cosine_decay_schedule(lr, steps), weight_decay=0.0)
    opt = tx.init(init)
    W = x.shape[1]
    positions = jnp.broadcast_to(jnp.arange(W), (batch, W))

    def loss_fn(p, xb, tb, mb, lb):
        lp = jax.nn.log_softmax(draft_logits(cfg, kind, p, xb, positions, lb, cand_rows), -1)
        kl = jnp.sum(jnp.exp(tb) * (tb - lp), -1)
        return jnp.sum(kl * mb) / jnp.maximum(mb.sum(), 1)

    @jax.jit
    def step(p, opt, xb, tb, mb, lb):
        loss, g = jax.value_and_grad(loss_fn)(p, xb, tb, mb, lb)
        upd, opt = tx.update(g, opt, p)
        return optax.apply_updates(p, upd), opt, loss

    p, rng, losses = init, np.random.default_rng(seed), []
    for i in range(steps):
        b = rng.integers(0, len(x), batch)
        p, opt, loss = step(p, opt, jnp.asarray(x[b]), jnp.asarray(teacher[b]), jnp.asarray(mask[b], jnp.float32),
                            jnp.asarray(lengths[b]))
        losses.append(float(loss))
        if (i + 1) % 50 == 0:
            print(f"  [{kind}] step {i + 1}/{steps} KL {np.mean(losses[-50:]):.3f}", file=sys.stderr, flush=True)
    return p


def evaluate(cfg, kind, p, x, full_tokens, mask, lengths, cand_rows, cand_ids):
    W = x.shape[1]
    fn = jax.jit(lambda xb, lb: draft_logits(cfg, kind, p, xb, jnp.broadcast_to(jnp.arange(W), (len(xb), W)), lb,
                                             cand_rows))
    toks, confs = [], []
    for i in range(0, len(x), 8):
        lg = jax.nn.softmax(fn(jnp.asarray(x[i:i + 8]), jnp.asarray(lengths[i:i + 8])), -1)
        top2 = jax.lax.top_k(lg, 2)
        toks.append(np.asarray(cand_ids)[np.asarray(top2[1][..., 0])])
        confs.append(np.asarray(top2[0][..., 0] - top2[0][..., 1]))
    tok, conf = np.concatenate(toks)[mask], np.concatenate(confs)[mask]
    ok = tok == full_tokens[mask]
    res = {"agreement": float(ok.mean()), "positions": int(mask.sum())}
    for t in THRESHOLDS:
        m = conf > t
        res[f"drafts@{t}"] = float(m.mean())
        res[f"accepted@{t}"] = float(ok[m].mean()) if m.any() else None
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[8, 15, 22])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=8, help="sequences per step")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--kinds", nargs="+", default=["shipped", "local", "context", "context_frozen_kv"])
    ap.add_argument("--out", default="/tmp/draft_adapters")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from drex_jax.exit_heads import load_heads, load_token_ranking, shipped_heads_dir
    from drex_jax.loading import load_model
    from drex_jax.model.decoder import lm_head
    from drex_jax.model.ramps import init_ramp_heads
    from drex_jax.train_drafts import sequence_data
    from drex_jax.train_exits import generate_sequences, held_out_prompts, training_prompts

    t0 = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    _, cfg, params, tok = load_model(None)
    heads_dir = shipped_heads_dir()
    shipped, meta = load_heads(heads_dir, cfg, params)
    cand_ids = jnp.asarray(load_token_ranking(heads_dir)[:1024])
    cand_rows = params["embed"][cand_ids]
    data = {}
    for split, prompts, n in (("train", training_prompts(64), args.new_tokens), ("held_out", held_out_prompts(20), 48)):
        enc, outs = generate_sequences(params, cfg, tok, prompts, n, progress=True)
        d = sequence_data(params, cfg, enc, outs, args.layers, progress=False)
        hs, lengths, gen = np.concatenate([d.ramp_h, d.final_h[None]]), d.lengths, d.predicts
        final = jnp.asarray(hs[-1])
        full_tokens = np.stack([np.asarray(jnp.argmax(lm_head(params, cfg, final[i]), -1)) for i in range(len(final))])
        teacher = np.stack([np.asarray(jax.nn.log_softmax(rms_norm(final[i], params["final_norm"], cfg.rms_norm_eps)
                                                          @ cand_rows.T, -1)) for i in range(len(final))])
        valid = np.arange(hs.shape[2])[None] < lengths[:, None]
        data[split] = dict(hs=hs[:-1], lengths=lengths, gen=gen, valid=valid, full=full_tokens, teacher=teacher)
        print(f"[draft_adapters] {split}: {len(enc)} sequences, {int(valid.sum())} positions, "
              f"{int(gen.sum())} generated", file=sys.stderr, flush=True)
    results = []
    for r, e in enumerate(args.layers):
        tr, ho = data["train"], data["held_out"]
        lw = {k: params["layers"][k][e] for k in ("attn_norm", "wq", "wk", "wv", "wo")}
        fresh = jax.tree.map(lambda a: a[0], init_ramp_heads(params, cfg, 1, 64, jax.random.key(args.seed + r)))
        ship = {k: shipped[k][meta["exit_layers"].index(e)] for k in ("norm", "down", "up")} \
            if e in meta["exit_layers"] else None
        for kind in args.kinds:
            if kind == "shipped":
                if ship is None:
                    continue
                p = {"head": ship}
            else:
                init = {"head": fresh} if kind == "local" else {"head": fresh, "adapter": lw}
                t1 = time.perf_counter()
                p = train(cfg, kind, init, tr["hs"][r], tr["teacher"], tr["valid"], tr["lengths"], cand_rows,
                          args.steps, args.batch, args.lr, args.seed)
                print(f"[draft_adapters] layer {e} {kind}: trained in {time.perf_counter() - t1:.0f} s",
                      file=sys.stderr, flush=True)
            res = evaluate(cfg, kind, p, ho["hs"][r], ho["full"], ho["gen"], ho["lengths"], cand_rows, cand_ids)
            results.append({"layer": e, "kind": kind, **res})
            print(f"[draft_adapters] layer {e} {kind}: {json.dumps(res)}", file=sys.stderr, flush=True)
    out = {"date": time.strftime("%Y-%m-%d", time.gmtime()), "args": vars(args), "results": results,
           "seconds": round(time.perf_counter() - t0, 1)}
    with open(os.path.join(args.out, "draft_adapters.json"), "w") as f:
        json.dump(out, f, indent=2)
    lines = ["| layer | draft | top-1 agreement | " + " | ".join(f"drafts / accepted @{t}" for t in THRESHOLDS) + " |",
             "|---:|---|---:|" + "---:|" * len(THRESHOLDS)]
    for r in results:
        cells = [f"{r[f'drafts@{t}']:.0%} / " + ("-" if r[f"accepted@{t}"] is None else f"{r[f'accepted@{t}']:.0%}")
                 for t in THRESHOLDS]
        lines.append(f"| {r['layer']} | {r['kind']} | {r['agreement']:.1%} | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
