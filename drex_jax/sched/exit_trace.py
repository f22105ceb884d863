"""Exit decisions replayed from a recorded exit distribution instead of ramp confidences.

Scale benchmarks run random weights at a large model's shape, whose ramps are meaningless;
an `ExitTrace` makes tokens exit at each ramp with the frequencies recorded from a real model
(`fractions[s]` = share of tokens that exited at ramp s, the last entry = full depth), so the
scheduler sees a realistic exit pattern. Decisions are seeded and independent per token.
"""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class ExitTrace:
    fractions: tuple[float, ...]  # per ramp, then full depth; sums to 1
    seed: int = 0

    def __post_init__(self):
        f = np.asarray(self.fractions, float)
        if f.ndim != 1 or len(f) < 2 or (f < 0).any() or not np.isclose(f.sum(), 1.0, atol=1e-3):
            raise ValueError(f"exit trace fractions must be >= 0, one per ramp plus full depth, summing to 1; "
                             f"got {self.fractions}")
        self._rng = np.random.default_rng(self.seed)
        reach = 1.0 - np.concatenate([[0.0], np.cumsum(f)[:-1]])  # share of tokens reaching ramp s
        self._p_exit = np.divide(f, reach, out=np.ones_like(f), where=reach > 1e-12)[:-1]

    def wants_exit(self, ramp: int, n: int) -> np.ndarray:
        """[n] bool: which of n tokens at ramp `ramp` exit (probability of exiting given reached)."""
        return self._rng.random(n) < self._p_exit[ramp]

    @classmethod
    def for_ramps(cls, fractions, num_ramps: int, seed: int = 0) -> "ExitTrace":
        if len(fractions) != num_ramps + 1:
            raise ValueError(f"exit trace has {len(fractions) - 1} ramps but the model has {num_ramps}")
        return cls(tuple(float(x) for x in fractions), seed)
