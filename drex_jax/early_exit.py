"""Early-exit configuration: where the ramps are, when a token may leave, how skipped KV is filled."""
from __future__ import annotations

import dataclasses
import math

from drex_jax.kv.missing import METHODS as _MISSING_KV, MISSING_KV_METHODS

CONFIDENCE_MEASURES = ("top1_minus_top2", "max_prob", "neg_entropy")
RAMP_HEADS = ("shared", "trained")
MAX_DRAFT = 63  # positions a row may hold pending (+ its current token: a 64-slot hidden ring)


@dataclasses.dataclass(frozen=True)
class EEConfig:
    """Exit ramps after layers `exit_layers` (a ramp at E sees the hidden state after E layers).

    A token exits at the first ramp where `confidence > threshold` of that ramp.
    `thresholds` is one float per ramp (or a single float for all).
    `ramp_vocab`: score only this many candidate tokens at the ramps (the most frequent
    outputs, ranked when the exit heads were trained); None = the whole vocabulary.

    `missing_kv="recompute"`: an exited token keeps its exit hidden state, and the next deep
    pass of its row runs it through the layers it skipped together with the row's current token,
    so every layer's K/V ends up exactly the full model's. At most `max_draft` positions of a row
    wait for that pass: a token that would exit beyond the cap runs deeper instead (a stay).
    `verify=True` (needs recompute): exited tokens are drafts, not output. The deep pass that
    recomputes their K/V also gives the full model's token at each drafted position; the row keeps
    the agreeing prefix plus the full model's token and drops the rest, so greedy output equals
    full-depth decoding (self-speculative decoding, batched).
    """

    exit_layers: tuple[int, ...]
    thresholds: tuple[float, ...] | float = 0.9
    confidence: str = "top1_minus_top2"
    missing_kv: str = "copy"
    head: str = "shared"
    ramp_vocab: int | None = None
    verify: bool = False
    max_draft: int = 7  # + the current token: chunks of up to 8 positions, a power-of-two bucket

    def __post_init__(self):
        layers = self.exit_layers
        if isinstance(layers, int):
            layers = (layers,)
        object.__setattr__(self, "exit_layers", tuple(layers))
        thr = self.thresholds
        if isinstance(thr, (int, float)):
            thr = (float(thr),) * len(self.exit_layers)
        object.__setattr__(self, "thresholds", tuple(thr))

    def validate(self, num_layers: int, vocab_size: int | None = None) -> "EEConfig":
        layers = self.exit_layers
        if not layers:
            raise ValueError("exit_layers is empty; give at least one ramp layer in [1, num_layers]")
        if not all(isinstance(e, int) and 1 <= e <= num_layers for e in layers):
            raise ValueError(f"exit_layers {list(layers)} must be integers in [1, {num_layers}]")
        if list(layers) != sorted(set(layers)):
            raise ValueError(f"exit_layers {list(layers)} must be strictly increasing")
        if len(self.thresholds) != len(layers):
            raise ValueError(f"got {len(self.thresholds)} thresholds for {len(layers)} exit layers")
        for t in self.thresholds:
            if not isinstance(t, (int, float)) or not math.isfinite(t):
                raise ValueError(f"threshold {t!r} is not a finite number")
        if self.confidence not in CONFIDENCE_MEASURES:
            raise ValueError(f"unknown confidence measure {self.confidence!r}; choose one of {CONFIDENCE_MEASURES}")
        if self.missing_kv not in MISSING_KV_METHODS:
            raise ValueError(f"unknown missing-KV method {self.missing_kv!r}; choose one of {MISSING_KV_METHODS}")
        if self.head not in RAMP_HEADS:
            raise ValueError(f"unknown ramp head {self.head!r}; choose one of {RAMP_HEADS}")
        if not isinstance(self.verify, bool):
            raise ValueError(f"verify must be True or False, got {self.verify!r}")
        if self.verify and not _MISSING_KV[self.missing_kv].deferred:
            raise ValueError(f"verify=True needs missing_kv='recompute' (the deep pass that verifies drafts "
                             f"recomputes their K/V), got missing_kv={self.missing_kv!r}")
        md = self.max_draft
        if isinstance(md, bool) or not isinstance(md, int) or not 1 <= md <= MAX_DRAFT:
            raise ValueError(f"max_draft must be an integer in [1, {MAX_DRAFT}], got {md!r}")
        rv = self.ramp_vocab
        if rv is not None:
            top = vocab_size if vocab_size is not None else "vocab_size"
            if isinstance(rv, bool) or not isinstance(rv, int) or rv < 2 or (vocab_size is not None and rv > vocab_size):
                raise ValueError(f"ramp_vocab must be None or an integer in [2, {top}], got {rv!r}")
        return self
