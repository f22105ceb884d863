"""Exit decisions at a ramp for a batch, per policy (host side, numpy).

`wants[i]` = row i's confidence passed its threshold. A policy returns which rows exit now.
Involuntary exit = a row exits though it did not want to; involuntary stay = a row wanted to
exit but runs on.
"""
from __future__ import annotations

import numpy as np

POLICIES = ("off", "eager", "lazy", "average", "median", "latency-only", "rebatching")
GROUPED = ("eager", "lazy", "average", "median")


def group_exit(policy: str, conf: np.ndarray, threshold: float) -> bool:
    """Whether a grouped policy sends the whole batch out at this ramp."""
    wants = conf > threshold
    if policy == "eager":
        return bool(wants.any())
    if policy == "lazy":
        return bool(wants.all())
    if policy == "average":
        return bool(conf.mean() > threshold)
    if policy == "median":
        return bool(np.median(conf) > threshold)
    raise ValueError(f"{policy!r} is not a grouped policy; grouped: {GROUPED}")


def involuntary(wants: np.ndarray, exits: np.ndarray) -> tuple[int, int]:
    """(involuntary exits, involuntary stays)."""
    return int(np.sum(exits & ~wants)), int(np.sum(wants & ~exits))
