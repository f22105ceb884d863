"""Early-exit configuration: where the ramps are, when a token may leave, how skipped KV is filled."""
from __future__ import annotations

import dataclasses
import math

from drex_jax.kv.missing import METHODS as _MISSING_KV, MISSING_KV_METHODS

CONFIDENCE_MEASURES = ("top1_minus_top2", "max_prob", "neg_entropy")
RAMP_HEADS = ("shared", "trained")
MAX_DRAFT = 63  # positions a row may hold pending (+ its current token: a 64-slot hidden ring)
PROBE_TOKENS = 16  # adaptive_ramps: a request retries a ramp it left after this many of its tokens
ACCEPTANCE_DECAY = 0.8  # adaptive_ramps: weight of a request's older drafts in its acceptance estimate


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
    full-depth decoding (self-speculative decoding, batched); with temperature > 0 it samples from
    the full model's distribution (speculative sampling, `drex_jax.speculative`).

    Adaptive drafting (verify mode):
    `draft_stop` > 0: a second exit. A row stops drafting once the product of its unverified
      drafts' confidences (and the next one's) falls below it: its next token runs full depth and
      verifies the chain, rather than extending a chain that is likely already wrong.
    `adaptive_ramps`: each request drafts at a ramp only while its own recent acceptance there
      (decayed counts, optimistic at the start) is at least that ramp's break-even, its depth / L
      (a rejected draft wastes the layers it ran; an accepted one saves the rest). A ramp a request
      left is tried again after `PROBE_TOKENS` of its tokens. Decisions use the request's own
      tokens only, never timing.
    """

    exit_layers: tuple[int, ...]
    thresholds: tuple[float, ...] | float = 0.9
    confidence: str = "top1_minus_top2"
    missing_kv: str = "copy"
    head: str = "shared"
    ramp_vocab: int | None = None
    verify: bool = False
    max_draft: int = 7  # + the current token: chunks of up to 8 positions, a power-of-two bucket
    draft_stop: float = 0.0
    adaptive_ramps: bool = False

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
        ds = self.draft_stop
        if isinstance(ds, bool) or not isinstance(ds, (int, float)) or not 0 <= ds < 1:
            raise ValueError(f"draft_stop must be a number in [0, 1), got {ds!r}")
        if ds > 0 and self.confidence == "neg_entropy":
            raise ValueError("draft_stop multiplies confidences in [0, 1]: use confidence 'top1_minus_top2' or "
                             "'max_prob', not 'neg_entropy'")
        if not isinstance(self.adaptive_ramps, bool):
            raise ValueError(f"adaptive_ramps must be True or False, got {self.adaptive_ramps!r}")
        if (ds > 0 or self.adaptive_ramps) and not self.verify:
            raise ValueError(f"draft_stop={ds} / adaptive_ramps={self.adaptive_ramps} shape verify mode's drafts: "
                             "they need verify=True")
        rv = self.ramp_vocab
        if rv is not None:
            top = vocab_size if vocab_size is not None else "vocab_size"
            if isinstance(rv, bool) or not isinstance(rv, int) or rv < 2 or (vocab_size is not None and rv > vocab_size):
                raise ValueError(f"ramp_vocab must be None or an integer in [2, {top}], got {rv!r}")
        return self
