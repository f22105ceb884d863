"""Train context-aware draft heads (`drex_jax.draft_attention`) by self-distillation on the frozen
trunk: per ramp, the attention block's query and output projections and a ramp head
(`drex-jax train-exits --adapter attention`).

The trunk runs once: the hidden states at the ramp layers and after the last layer, for every
position of every training sequence, are computed and kept (`draft_data_*.npz` in the output dir),
so each step costs the blocks and heads only. A step takes a batch of whole sequences; per ramp the
loss is KL(full model || draft) over the ramp's candidate tokens (the ramp vocabulary the engine
serves) at every real position, summed over ramps. Resumable like `train_exits` (orbax, every
`save_every` steps). Thresholds are calibrated by `train_exits`' rule on teacher-forced drafts that
see their context; held-out: the same teacher-forced figures (top-1 agreement, and per threshold
the share of positions that draft and the share of drafts the full model would accept) and
free-running generation against full depth.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from drex_jax.draft_attention import draft_context, init_draft_attention
from drex_jax.kv.pages import bucket
from drex_jax.model.config import ModelConfig
from drex_jax.model.decoder import vocab_rows
from drex_jax.model.modules import DraftAttention, ExitRamp
from drex_jax.model.ops import project_rows, rms_norm
from drex_jax.model.params import layer_params
from drex_jax.model.ramps import confidence, init_ramp_heads

MAX_LEN = 512  # a longer sequence keeps its last MAX_LEN tokens (a step's attention costs W^2)
SEQUENCES_PER_STEP = 8
THRESHOLDS = (0.3, 0.5, 0.7, 0.9)  # teacher-forced report points (top1 - top2, as served)


@dataclasses.dataclass
class SequenceData:
    """Whole sequences, right-padded to W: hidden states after each ramp layer `ramp_h`
    [R, S, W, H] and after the last layer `final_h` [S, W, H] (float32), `lengths` [S], and
    `predicts` [S, W]: positions whose next token was generated (what drafting is judged on)."""

    ramp_h: np.ndarray
    final_h: np.ndarray
    lengths: np.ndarray
    predicts: np.ndarray

    def save(self, path: str) -> None:
        np.savez(path, **dataclasses.asdict(self))

    @classmethod
    def load(cls, path: str) -> "SequenceData":
        d = np.load(path)
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})


def sequence_data(params, cfg: ModelConfig, prompts: list[list[int]], outs: list[list[int]], exit_layers,
                  progress: bool = True) -> SequenceData:
    """The trunk's hidden states over prompt + continuation, one dense forward per sequence."""
    from tqdm import tqdm

    from drex_jax.model.decoder import forward_hidden

    seqs, starts = [], []
    for p, o in zip(prompts, outs):
        s = (p + o)[-MAX_LEN:]
        seqs.append(s)
        starts.append(max(len(s) - len(o), 1))  # index of the first generated token in s
    W = bucket(max(len(s) for s in seqs), 16)
    fwd = jax.jit(lambda t, n: forward_hidden(params, cfg, t, n))
    idx = np.asarray(list(exit_layers) + [cfg.num_layers])
    hs = np.zeros((len(idx), len(seqs), W, cfg.hidden_size), np.float32)
    lengths = np.array([len(s) for s in seqs], np.int32)
    predicts = np.zeros((len(seqs), W), bool)
    for i, s in enumerate(tqdm(seqs, desc="hidden states", disable=not progress, file=sys.stderr)):
        toks = np.zeros((1, W), np.int32)
        toks[0, :len(s)] = s
        hs[:, i] = np.asarray(fwd(toks, lengths[i:i + 1])[idx, 0], np.float32)
        predicts[i, starts[i] - 1:len(s) - 1] = True
    return SequenceData(hs[:-1], hs[-1], lengths, predicts)


def frozen_layers(params, cfg: ModelConfig, exit_layers) -> list[dict]:
    """Each ramp layer's weights in the decode layout (the blocks' frozen norm and K/V)."""
    return [jax.tree.map(jnp.asarray, layer_params(params, e)) for e in exit_layers]


def draft_logits(cfg: ModelConfig, layer_w: dict, head: dict, x, lengths, cand_rows):
    """One ramp's draft logits [B, W, K] over the candidates' rows [K, H], for x [B, W, H] after the
    ramp layer. `head`: that ramp's {norm, down, up, draft_wq, draft_wo}."""
    block = DraftAttention(cfg, {**layer_w, "wq": head["draft_wq"], "wo": head["draft_wo"]})
    h = draft_context(cfg, block, x, lengths)
    return project_rows(cand_rows, ExitRamp(cfg, head["norm"], head["down"], head["up"])(h))


def distill_loss(cfg: ModelConfig, layers: list[dict], heads: dict, final_norm, ramp_h, final_h, lengths,
                 cand_rows):
    """Sum over ramps of the mean KL(full model || draft) over the candidates at real positions.
    ramp_h [R, B, W, H], final_h [B, W, H], lengths [B]."""
    teacher = jax.nn.log_softmax(project_rows(cand_rows, rms_norm(final_h, final_norm, cfg.rms_norm_eps)), -1)
    mask = (jnp.arange(final_h.shape[1])[None] < lengths[:, None]).astype(jnp.float32)
    total = 0.0
    for r, lw in enumerate(layers):
        student = jax.nn.log_softmax(draft_logits(cfg, lw, jax.tree.map(lambda a: a[r], heads), ramp_h[r], lengths,
                                                  cand_rows), -1)
        kl = jnp.sum(jnp.exp(teacher) * (teacher - student), -1)
        total = total + jnp.sum(kl * mask) / jnp.maximum(mask.sum(), 1.0)
    return total


def init_heads(params, cfg: ModelConfig, exit_layers, rank: int, seed: int) -> dict:
    """Fresh ramp heads (start as the shared head) and blocks (start as each ramp layer's attention)."""
    heads = init_ramp_heads(params, cfg, len(exit_layers), rank, jax.random.key(seed))
    return {**jax.tree.map(np.asarray, heads), **init_draft_attention(params, cfg, exit_layers)}


def draft_predictions(params, cfg: ModelConfig, heads: dict, exit_layers, cand_ids: np.ndarray,
                      data: SequenceData) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Teacher-forced drafts at the positions that predict a generated token: (tokens [R, N],
    top1 - top2 confidences [R, N], the full model's greedy tokens [N]). Heads without blocks
    (`draft_wq`) draft from each position alone, as the engine serves them."""
    from drex_jax.model.decoder import lm_head

    cand_rows = vocab_rows(params, cfg, jnp.asarray(cand_ids))
    with_blocks = "draft_wq" in heads
    layers = frozen_layers(params, cfg, exit_layers) if with_blocks else None
    toks, confs = [], []
    for r in range(len(exit_layers)):
        hd = {k: jnp.asarray(v[r]) for k, v in heads.items()}

        @jax.jit
        def predict(x, n, hd=hd, r=r):
            if with_blocks:
                lg = draft_logits(cfg, layers[r], hd, x, n, cand_rows)
            else:
                lg = project_rows(cand_rows, ExitRamp(cfg, hd["norm"], hd["down"], hd["up"])(x))
            return jnp.argmax(lg, -1), confidence(lg, "top1_minus_top2")

        t, c = [], []
        for i in range(0, len(data.lengths), SEQUENCES_PER_STEP):
            sl = slice(i, i + SEQUENCES_PER_STEP)
            a, b = predict(jnp.asarray(data.ramp_h[r, sl]), jnp.asarray(data.lengths[sl]))
            t.append(np.asarray(a))
            c.append(np.asarray(b))
        toks.append(np.asarray(cand_ids)[np.concatenate(t)[data.predicts]])
        confs.append(np.concatenate(c)[data.predicts])
    full = np.asarray(jnp.argmax(lm_head(params, cfg, jnp.asarray(data.final_h[data.predicts])), -1))
    return np.stack(toks), np.stack(confs), full


def teacher_forced_report(toks: np.ndarray, confs: np.ndarray, full: np.ndarray, exit_layers) -> list[dict]:
    """Per ramp: top-1 agreement with the full model, and per threshold the share of positions that
    would draft and the share of those drafts the full model accepts (greedy)."""
    out = []
    for r, e in enumerate(exit_layers):
        ok = toks[r] == full
        row = {"layer": int(e), "positions": int(len(ok)), "agreement": float(ok.mean())}
        for t in THRESHOLDS:
            m = confs[r] > t
            row[f"drafts@{t}"] = float(m.mean())
            row[f"accepted@{t}"] = float(ok[m].mean()) if m.any() else None
        out.append(row)
    return out


def train_draft_heads(params, cfg: ModelConfig, tokenizer, out_dir: str, tc, progress: bool = True,
                      max_steps_this_run: int | None = None) -> tuple[dict, dict]:
    """Train (or resume) context-aware draft heads into `out_dir` (`tc`: a `TrainExitsConfig` with
    adapter="attention"; its batch is SEQUENCES_PER_STEP whole sequences). Returns (heads, meta)."""
    import optax
    import orbax.checkpoint as ocp
    from tqdm import tqdm

    from drex_jax.exit_heads import model_fingerprint, save_heads
    from drex_jax.train_exits import (calibrated, calibration_prompts, evaluate_held_out, generate_sequences,
                                      held_out_prompts, provenance, token_ranking, training_prompts)

    tc.validate(cfg)
    os.makedirs(out_dir, exist_ok=True)
    out_dir = os.path.abspath(out_dir)
    t0 = time.perf_counter()
    layers = tuple(tc.exit_layers)

    def data_for(name, prompts, new_tokens) -> SequenceData:
        path = os.path.join(out_dir, f"draft_data_{name}.npz")
        if os.path.exists(path):  # resume: the data is deterministic but costly, reuse it
            return SequenceData.load(path)
        enc, outs = generate_sequences(params, cfg, tokenizer, prompts, new_tokens, progress)
        d = sequence_data(params, cfg, enc, outs, layers, progress)
        d.save(path)
        return d

    train = data_for("train", training_prompts(tc.num_humaneval), tc.new_tokens)
    real = np.arange(train.final_h.shape[1])[None] < train.lengths[:, None]
    ranking = token_ranking(params, cfg, train.final_h[real])
    cand_ids = ranking[: tc.ramp_vocab] if tc.ramp_vocab is not None else ranking
    cand_rows = vocab_rows(params, cfg, jnp.asarray(cand_ids))
    frozen = frozen_layers(params, cfg, layers)
    final_norm = jnp.asarray(params["final_norm"])
    S = len(train.lengths)
    if progress:
        print(f"[train-exits] {S} sequences, {int(real.sum())} positions, ramps after layers {list(layers)}, "
              f"attention blocks", file=sys.stderr)

    tx = optax.adamw(optax.cosine_decay_schedule(tc.learning_rate, tc.steps), weight_decay=0.0)
    heads = jax.tree.map(jnp.asarray, init_heads(params, cfg, layers, tc.rank, tc.seed))
    opt = tx.init(heads)
    ckpt_dir = os.path.join(out_dir, "train_state")
    if os.path.isdir(ckpt_dir):
        with ocp.StandardCheckpointer() as ck:
            saved = ck.restore(ckpt_dir, jax.tree.map(ocp.utils.to_shape_dtype_struct,
                                                      {"heads": heads, "opt": opt, "step": jnp.zeros((), jnp.int32)}))
        heads, opt, start = saved["heads"], saved["opt"], int(saved["step"])
    else:
        start = 0

    @jax.jit
    def step(heads, opt, ramp_h, final_h, lengths):
        loss, g = jax.value_and_grad(lambda h: distill_loss(cfg, frozen, h, final_norm, ramp_h, final_h, lengths,
                                                             cand_rows))(heads)
        upd, opt = tx.update(g, opt, heads)
        return optax.apply_updates(heads, upd), opt, loss

    losses = []
    stop = tc.steps if max_steps_this_run is None else min(tc.steps, start + max_steps_this_run)
    bar = tqdm(total=tc.steps, initial=start, desc="train-exits (attention)", disable=not progress, file=sys.stderr)
    for i in range(start, stop):
        b = np.sort(np.random.default_rng([tc.seed, i]).integers(0, S, SEQUENCES_PER_STEP))  # by (seed, step)
        heads, opt, loss = step(heads, opt, jnp.asarray(train.ramp_h[:, b]), jnp.asarray(train.final_h[b]),
                                jnp.asarray(train.lengths[b]))
        losses.append(float(loss))
        bar.set_postfix(kl=f"{losses[-1]:.3f}")
        bar.update(1)
        if (i + 1) % tc.save_every == 0 or i + 1 == stop:
            with ocp.StandardCheckpointer() as ck:
                ck.save(ckpt_dir, {"heads": heads, "opt": opt, "step": jnp.asarray(i + 1, jnp.int32)}, force=True)
    bar.close()
    heads = jax.tree.map(np.asarray, heads)
    kl = float(np.mean(losses[-50:])) if losses else None

    calib = data_for("calibration", calibration_prompts(tc.num_calibration_humaneval), tc.new_tokens)
    toks, confs, full = draft_predictions(params, cfg, heads, layers, cand_ids, calib)
    calibration = [calibrated(e, toks[r] == full, confs[r], tc.target_precision) for r, e in enumerate(layers)]
    thresholds = [c["threshold"] for c in calibration]
    if progress:
        print(f"[train-exits] thresholds {thresholds}; evaluating on held-out prompts", file=sys.stderr)
    held = data_for("held_out", held_out_prompts(tc.num_eval_humaneval), tc.eval_new_tokens)
    held_out = evaluate_held_out(params, cfg, tokenizer, heads, cand_ids if tc.ramp_vocab else None, thresholds, tc,
                                 progress)
    held_out["teacher_forced"] = teacher_forced_report(*draft_predictions(params, cfg, heads, layers, cand_ids, held),
                                                       layers)
    meta = {"exit_layers": list(layers), "rank": tc.rank, "adapter": "attention", "thresholds": thresholds,
            "confidence": "top1_minus_top2", "ramp_vocab": tc.ramp_vocab, "missing_kv": "propagate",
            "model": model_fingerprint(cfg, params),
            "provenance": {**provenance(tc, int(real.sum()), kl, time.perf_counter() - t0),
                           "sequences_per_step": SEQUENCES_PER_STEP, "max_len": MAX_LEN},
            "calibration": calibration, "held_out": held_out}
    save_heads(out_dir, heads, meta, ranking)
    return heads, meta
