"""Early-exit configuration: where the ramps are, when a token may leave, how skipped KV is filled."""
from __future__ import annotations

import dataclasses
import math

CONFIDENCE_MEASURES = ("top1_minus_top2", "max_prob", "neg_entropy")
MISSING_KV_METHODS = ("copy", "propagate", "recompute")
RAMP_HEADS = ("shared", "trained")


@dataclasses.dataclass(frozen=True)
class EEConfig:
    """Exit ramps after layers `exit_layers` (a ramp at E sees the hidden state after E layers).

    A token exits at the first ramp where `confidence > threshold` of that ramp.
    `thresholds` is one float per ramp (or a single float for all).
    `ramp_vocab`: score only this many candidate tokens at the ramps (the most frequent
    outputs, ranked when the exit heads were trained); None = the whole vocabulary.
    """

    exit_layers: tuple[int, ...]
    thresholds: tuple[float, ...] | float = 0.9
    confidence: str = "top1_minus_top2"
    missing_kv: str = "copy"
    head: str = "shared"
    ramp_vocab: int | None = None

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
        rv = self.ramp_vocab
        if rv is not None:
            top = vocab_size if vocab_size is not None else "vocab_size"
            if isinstance(rv, bool) or not isinstance(rv, int) or rv < 2 or (vocab_size is not None and rv > vocab_size):
                raise ValueError(f"ramp_vocab must be None or an integer in [2, {top}], got {rv!r}")
        return self
