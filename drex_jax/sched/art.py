"""Adaptive Rebatching Threshold (ART): split a batch at a ramp only when it pays.

With t_f the time of a full fused iteration, t_s the shallow part (up to and including the
ramp) and t_d the deep part, for the batch's shape (batch bucket, page-width bucket), the overhead of splitting is
c = t_s + t_d - t_f, and splitting off a fraction b'/b of exiting rows saves (b'/b) t_d.
Rebatch iff b'/b > c / t_d. Times are exponential moving averages of measured calls per
(segment, shape), never counting a call that compiled; t_f is measured on a full-depth
program per shape and re-measured every
`refresh_every` decisions. Unknown times => split (and measure). The decision log keeps the
latest `log_size` decisions, so a long-running server does not grow without bound.
"""
from __future__ import annotations

import collections
import dataclasses


@dataclasses.dataclass
class ARTDecision:
    ramp: int
    bucket: tuple[int, int]  # (batch bucket, page-width bucket)
    exit_fraction: float
    split: bool
    predicted_profit_s: float | None  # (b'/b) t_d - c; None while times are unknown


class ARTProfiler:
    def __init__(self, num_segments: int, alpha: float = 0.3, refresh_every: int = 200, log_size: int = 10_000):
        if not 0 < alpha <= 1:
            raise ValueError(f"ART smoothing alpha must be in (0, 1], got {alpha}")
        self.num_segments, self.alpha, self.refresh_every = num_segments, alpha, refresh_every
        # a shape ("bucket" below) is (batch bucket, page-width bucket)
        self.segment_s: dict[tuple, float] = {}  # (segment, shape) -> seconds
        self.full_s: dict[tuple, float] = {}  # shape -> seconds of a fused full-depth step
        self.decisions: collections.deque[ARTDecision] = collections.deque(maxlen=log_size)
        self.num_decisions = 0

    def record_segment(self, segment: int, bucket: tuple, seconds: float) -> None:
        key = (segment, bucket)
        old = self.segment_s.get(key)
        self.segment_s[key] = seconds if old is None else (1 - self.alpha) * old + self.alpha * seconds

    def record_full(self, bucket: tuple, seconds: float) -> None:
        old = self.full_s.get(bucket)
        self.full_s[bucket] = seconds if old is None else (1 - self.alpha) * old + self.alpha * seconds

    def needs_full_profile(self, bucket: tuple) -> bool:
        """Unknown, or due for its periodic refresh."""
        return bucket not in self.full_s or (self.num_decisions + 1) % self.refresh_every == 0

    def profit(self, ramp: int, bucket: tuple, exit_fraction: float) -> float | None:
        """Predicted seconds saved by splitting after segment `ramp` (ramp index = segment index)."""
        seg = [self.segment_s.get((s, bucket)) for s in range(self.num_segments)]
        t_f = self.full_s.get(bucket)
        if t_f is None or any(t is None for t in seg):
            return None
        t_s, t_d = sum(seg[: ramp + 1]), sum(seg[ramp + 1:])
        c = t_s + t_d - t_f
        return exit_fraction * t_d - c

    def decide(self, ramp: int, bucket: tuple, n_exit: int, n: int) -> bool:
        frac = n_exit / max(n, 1)
        p = self.profit(ramp, bucket, frac)
        split = p is None or p > 0
        self.decisions.append(ARTDecision(ramp, bucket, frac, split, p))
        self.num_decisions += 1
        return split

    def hindsight_accuracy(self) -> tuple[float | None, int]:
        """Share of logged decisions (made with known times) that the final, better-measured times
        confirm, and how many such decisions there were."""
        judged = [(d, self.profit(d.ramp, d.bucket, d.exit_fraction)) for d in self.decisions
                  if d.predicted_profit_s is not None]
        judged = [(d, p) for d, p in judged if p is not None]
        if not judged:
            return None, 0
        return sum((p > 0) == d.split for d, p in judged) / len(judged), len(judged)
