"""Cost model of decode steps and early-exit schedules: bytes and FLOPs per segment of layers,
a device's peak FLOP/s and memory bandwidth, and the fraction of that roofline the engine reaches
per regime (calibrated from `drex-jax bench --roofline` results).

Used to project decode step times and early-exit speed-ups onto a GPU (`drex-jax plan --project`),
and validated on the machine it was calibrated on (half of a roofline grid predicts the other).
Pure host-side arithmetic (numpy): no JAX.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from drex_jax.kv.pages import batch_bucket
from drex_jax.model.config import ModelConfig
from drex_jax.model.specs import param_specs


@dataclasses.dataclass(frozen=True)
class Card:
    name: str
    peak_flops: float  # dense bf16 FLOP/s
    bandwidth: float  # HBM bytes/s
    memory_bytes: float
    source: str


# published datasheet figures (dense, no sparsity)
CARDS = {
    "h100": Card("NVIDIA H100 SXM5 80GB", 989.4e12, 3.35e12, 80e9,
                 "NVIDIA H100 datasheet: 989 TFLOPS bf16 dense, 3.35 TB/s HBM3"),
    "h200": Card("NVIDIA H200 SXM 141GB", 989.4e12, 4.8e12, 141e9,
                 "NVIDIA H200 datasheet: 989 TFLOPS bf16 dense, 4.8 TB/s HBM3e"),
}


def segment_cost(cfg: ModelConfig, itemsize: int, batch: int, context: int, start: int = 0,
                 end: int | None = None, head_columns: int | None = None) -> tuple[float, float]:
    """Analytic (bytes read, FLOPs) of layers [start, end) for `batch` rows at `context` cached
    positions, plus the LM head (or a ramp scoring `head_columns` tokens) when given."""
    end = cfg.num_layers if end is None else end
    specs = param_specs(cfg)  # sizes from the specs: the same for either params layout
    per_layer = sum(math.prod(s.shape) for k, s in specs.items() if k.startswith("layers/")) / cfg.num_layers
    matmul_per_layer = sum(math.prod(s.shape) for k, s in specs.items() if k.startswith("layers/w")) / cfg.num_layers
    n = end - start
    kv = 2 * n * cfg.num_kv_heads * cfg.head_dim * context * batch
    head = 0 if head_columns is None else cfg.hidden_size * (head_columns + 1)  # + the final norm
    # the first segment reads `batch` embedding rows (part of the LM head's matrix when tied)
    embed_rows = cfg.hidden_size * batch if start == 0 and not (cfg.tie_word_embeddings and head) else 0
    bytes_read = itemsize * (n * per_layer + head + embed_rows + kv)
    flops = (2 * batch * (n * matmul_per_layer + (0 if head_columns is None else cfg.hidden_size * head_columns))
             + 4 * n * cfg.num_heads * cfg.head_dim * context * batch)
    return float(bytes_read), float(flops)


def roofline_s(nbytes: float, flops: float, peak_flops: float, bandwidth: float) -> tuple[float, str]:
    """(seconds, the bound: "bandwidth" or "compute")."""
    tb, tc = nbytes / bandwidth, flops / peak_flops
    return (tb, "bandwidth") if tb >= tc else (tc, "compute")


@dataclasses.dataclass(frozen=True)
class Calibration:
    """A call's time = bytes / (bandwidth_efficiency x bandwidth) + FLOPs / (compute_efficiency x
    peak) + call_overhead_s: the fractions of the roofline the engine reaches on each resource,
    and the fixed cost of one device call (dispatch, host round trip, small kernels)."""
    bandwidth_efficiency: float
    compute_efficiency: float
    call_overhead_s: float
    source: str = ""


def fit_calibration(points: list[dict], peak_flops: float, bandwidth: float, source: str = "") -> Calibration:
    """Least squares (relative error) of measured step times (`bytes`, `flops`, `ms_per_step` per
    point, as `drex-jax bench --roofline` writes them) on the additive model above; a term that
    fits negative is dropped and the rest refitted."""
    if len(points) < 3:
        raise ValueError(f"calibration needs at least 3 roofline points, got {len(points)}")
    A = np.array([[p["bytes"] / bandwidth, p["flops"] / peak_flops, 1.0] for p in points])
    y = np.array([p["ms_per_step"] * 1e-3 for p in points])
    keep = [0, 1, 2]
    while True:
        w, *_ = np.linalg.lstsq(A[:, keep] / y[:, None], np.ones(len(y)), rcond=None)
        if (w > 0).all() or len(keep) == 1:
            break
        keep = [k for k, v in zip(keep, w) if v > 0] or keep[:1]
    coef = dict(zip(keep, np.maximum(w, 0)))
    inv = lambda c: 1.0 / c if c > 0 else math.inf  # noqa: E731 - a dropped term costs nothing
    return Calibration(inv(coef.get(0, 0.0)), inv(coef.get(1, 0.0)), float(coef.get(2, 0.0)), source)


def call_time(cfg: ModelConfig, itemsize: int, batch: int, context: int, peak_flops: float, bandwidth: float,
              cal: Calibration, start: int = 0, end: int | None = None, head_columns: int | None = None) -> float:
    """Predicted seconds of one device call running layers [start, end) (+ head) for `batch` rows."""
    nbytes, flops = segment_cost(cfg, itemsize, batch, context, start, end, head_columns)
    return (nbytes / (cal.bandwidth_efficiency * bandwidth) + flops / (cal.compute_efficiency * peak_flops)
            + cal.call_overhead_s)


def early_exit_speedup(cfg: ModelConfig, itemsize: int, batch: int, context: int, ramps: tuple[int, ...],
                       fractions: tuple[float, ...], peak_flops: float, bandwidth: float, cal: Calibration,
                       ramp_vocab: int | None = None) -> dict:
    """The fused full-depth step vs the rebatching schedule for one round of `batch` tokens: segment
    s is one call for the rows that reached it (padded to the engine's row bucket,
    `kv.pages.batch_bucket`; no call if none did), ending in its ramp head. Tokens exit
    independently: `fractions` = share exiting at each ramp, then at full depth, so the rows
    reaching a segment are binomial and its cost is the expectation over them. Returns both times,
    the projected speed-up (the ramp gate keeps the fused step where early exit is slower:
    `gated`), and the ideal L / mean depth."""
    L = cfg.num_layers
    bounds = (0,) + tuple(ramps) + (L,)
    fused = call_time(cfg, itemsize, batch, context, peak_flops, bandwidth, cal, head_columns=cfg.vocab_size)
    reach, ee = 1.0, 0.0
    for s in range(len(bounds) - 1):
        last = s == len(bounds) - 2
        cols = cfg.vocab_size if last else (ramp_vocab or cfg.vocab_size)
        for k, p in _binomial(batch, min(max(reach, 0.0), 1.0)):
            if k:
                ee += p * call_time(cfg, itemsize, min(batch, batch_bucket(k)), context, peak_flops, bandwidth, cal,
                                    bounds[s], bounds[s + 1], cols)
        reach -= fractions[s] if not last else 0
    depth = sum(f * e for f, e in zip(fractions, tuple(ramps) + (L,)))
    speedup = fused / ee
    return {"fused_s": fused, "early_exit_s": ee, "speedup": speedup, "gated": max(speedup, 1.0),
            "ideal": L / depth}


def verify_speedup(cfg: ModelConfig, itemsize: int, batch: int, context: int, ramp: int, draft_share: float,
                   acceptance: float, peak_flops: float, bandwidth: float, cal: Calibration,
                   ramp_vocab: int | None = None) -> dict:
    """Verify mode with one ramp at layer `ramp`, rows in phase (every call serves all `batch` rows:
    the best case; rows on their own schedules add deep calls). `draft_share` = share of emitted
    tokens that are accepted drafts, `acceptance` = accepted / drafted. Per verifying deep pass a
    row emits n + 1 tokens (n = draft_share / (1 - draft_share) accepted drafts) and runs the draft
    segment (layers 0..ramp + its head) n / acceptance + 1 times, then one deep call of layers
    ramp..L + the LM head over its n / acceptance + 1 positions. Returns both times per emitted
    token and the speed-up over the fused step."""
    if not 0 <= draft_share < 1 or not 0 < acceptance <= 1:
        raise ValueError(f"draft_share must be in [0, 1) and acceptance in (0, 1], got {draft_share}, {acceptance}")
    L = cfg.num_layers
    fused = call_time(cfg, itemsize, batch, context, peak_flops, bandwidth, cal, head_columns=cfg.vocab_size)
    n = draft_share / (1 - draft_share)
    chunk = n / acceptance + 1  # positions per row in the deep call
    draft = call_time(cfg, itemsize, batch, context, peak_flops, bandwidth, cal, 0, ramp, ramp_vocab or cfg.vocab_size)
    nbytes, flops = segment_cost(cfg, itemsize, batch, context, ramp, L, cfg.vocab_size)
    # the deep call reads its weights once for every position of the chunk; its FLOPs scale with them
    deep = nbytes / (cal.bandwidth_efficiency * bandwidth) + chunk * flops / (cal.compute_efficiency * peak_flops) \
        + cal.call_overhead_s
    per_token = (chunk * draft + deep) / (n + 1)
    return {"fused_s": fused, "verify_s_per_token": per_token, "speedup": fused / per_token,
            "gated": max(fused / per_token, 1.0), "accepted_per_pass": n}


def _binomial(n: int, p: float) -> list[tuple[int, float]]:
    """(k, P[k]) for k ~ Binomial(n, p), terms above 1e-12."""
    if p <= 0 or p >= 1:
        return [(0 if p <= 0 else n, 1.0)]
    logs = [math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * math.log(p)
            + (n - k) * math.log1p(-p) for k in range(n + 1)]
    return [(k, math.exp(v)) for k, v in enumerate(logs) if v > -27.6]
