"""When to flush a ramp buffer (run its rows through the deeper layers).

A buffer is flushed when (checked deepest first):
  fill      it holds >= `min_fill` of the running requests (it can fill a batch);
  idle      no request is ready at layer 0, so nothing else would run;
  deadline  its oldest row has used >= `sla_margin` of its per-token deadline
            (`GenerationConfig.deadline_ms`, else `tpot_sla_ms`);
  age       its oldest row has waited `max_wait_iters` engine iterations.
"""
from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class FlushConfig:
    min_fill: float = 0.5
    max_wait_iters: int = 4
    tpot_sla_ms: float | None = None
    sla_margin: float = 0.8

    def __post_init__(self):
        if not (isinstance(self.min_fill, (int, float)) and 0 < self.min_fill <= 1):
            raise ValueError(f"min_fill must be in (0, 1], got {self.min_fill!r}")
        if not isinstance(self.max_wait_iters, int) or self.max_wait_iters < 1:
            raise ValueError(f"max_wait_iters must be an integer >= 1, got {self.max_wait_iters!r}")
        if self.tpot_sla_ms is not None and not (math.isfinite(self.tpot_sla_ms) and self.tpot_sla_ms > 0):
            raise ValueError(f"tpot_sla_ms must be a positive number or None, got {self.tpot_sla_ms!r}")
        if not (isinstance(self.sla_margin, (int, float)) and 0 < self.sla_margin <= 1):
            raise ValueError(f"sla_margin must be in (0, 1], got {self.sla_margin!r}")


def flush_reason(fc: FlushConfig, n_buffered: int, n_running: int, layer0_ready: int,
                 oldest_wait_iters: int, oldest_deadline_used: float) -> str | None:
    """Why this buffer should be flushed now, or None. `oldest_deadline_used` is the fraction of
    its per-token deadline the oldest row has spent (0 when it has none)."""
    if n_buffered == 0:
        return None
    if n_buffered >= fc.min_fill * n_running:
        return "fill"
    if layer0_ready == 0:
        return "idle"
    if oldest_deadline_used >= fc.sla_margin:
        return "deadline"
    if oldest_wait_iters >= fc.max_wait_iters:
        return "age"
    return None
