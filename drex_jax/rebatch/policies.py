"""Exit policies as objects: how a batch meets an exit ramp (host side, numpy).

`wants[i]` = row i's confidence passed its threshold. A grouped policy's `rule` decides whether the
whole batch exits; rebatching splits the batch by `wants`. Involuntary exit = a row exits though it
did not want to; involuntary stay = a row wanted to exit but runs on. A new policy is one entry in
`EXIT_POLICIES`; the early-exit decoder reads only the fields below, never the name.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class ExitPolicy:
    """name: what users pass (`Engine(policy=...)`, `--policy`).
    rule(conf [n], threshold) -> bool: grouped policies only, whether the whole batch exits.
    evaluates_ramps: whether ramps run at all (`off`: one fused pass, no ramp).
    rebatches: rows split at every ramp into per-ramp buffers (DREX).
    releases_early: rows that want out are emitted early but keep computing full depth
      (latency-only: no compute saved, no missing K/V).
    gated: ART and the ramp gate may fall back to the fused full-depth step.
    exact_kv: compatible with `missing_kv="recompute"` (a per-row deep pass to recompute in)."""

    name: str
    rule: Callable[[np.ndarray, float], bool] | None = None
    evaluates_ramps: bool = True
    rebatches: bool = False
    releases_early: bool = False
    gated: bool = False
    exact_kv: bool = False

    @property
    def fills(self) -> bool:
        """Whether exited rows leave K/V of the skipped layers to fill."""
        return self.evaluates_ramps and not self.releases_early

    @property
    def runs_fused(self) -> bool:
        """Whether the fused full-depth step runs (no ramps, or the gate's fallback)."""
        return not self.evaluates_ramps or self.gated


EXIT_POLICIES: dict[str, ExitPolicy] = {p.name: p for p in (
    ExitPolicy("off", evaluates_ramps=False, exact_kv=True),
    ExitPolicy("eager", rule=lambda conf, thr: bool((conf > thr).any())),
    ExitPolicy("lazy", rule=lambda conf, thr: bool((conf > thr).all())),
    ExitPolicy("average", rule=lambda conf, thr: bool(conf.mean() > thr)),
    ExitPolicy("median", rule=lambda conf, thr: bool(np.median(conf) > thr)),
    ExitPolicy("latency-only", releases_early=True),
    ExitPolicy("rebatching", rebatches=True, gated=True, exact_kv=True),
)}
POLICIES = tuple(EXIT_POLICIES)
GROUPED = tuple(name for name, p in EXIT_POLICIES.items() if p.rule is not None)


def get_policy(name: str) -> ExitPolicy:
    if name not in EXIT_POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose one of {POLICIES}")
    return EXIT_POLICIES[name]


def group_exit(policy: str, conf: np.ndarray, threshold: float) -> bool:
    """Whether a grouped policy sends the whole batch out at this ramp."""
    rule = get_policy(policy).rule
    if rule is None:
        raise ValueError(f"{policy!r} is not a grouped policy; grouped: {GROUPED}")
    return rule(conf, threshold)


def involuntary(wants: np.ndarray, exits: np.ndarray) -> tuple[int, int]:
    """(involuntary exits, involuntary stays)."""
    return int(np.sum(exits & ~wants)), int(np.sum(wants & ~exits))
