"""Ramp gate: stop evaluating the exit ramps of a batch shape while early exit does not pay there.

Early exit costs segment calls, ramp heads, host round trips and K/V fills; it saves the layers
that exiting tokens skip. When few tokens exit, the fused full-depth step is faster. Per shape
(batch bucket, page width) the gate measures both modes' cost per finalized token over windows
of `probe_iters` iterations, runs the cheaper one for `probe_every` iterations (measuring it all
along), then probes the other again, so a change in the exit rate is noticed; each probe that
confirms the choice doubles the next run (up to `max_backoff` x `probe_every`), so a shape that has
settled spends little time in its slower mode. In fused mode no
ramp is evaluated and every token runs full depth (a stay, never an exit below a threshold).
Early exit must beat the fused step by `margin` to be chosen.
"""
from __future__ import annotations

import dataclasses

EE, FUSED = "early_exit", "fused"


@dataclasses.dataclass(frozen=True)
class GateConfig:
    enabled: bool = True
    probe_every: int = 48  # iterations the cheaper mode runs between two probes of the other
    probe_iters: int = 6  # iterations per measuring window
    margin: float = 0.03  # early exit must be this much cheaper per token to be chosen
    # each probe that confirms the choice doubles the next run of the chosen mode, up to this many
    # times probe_every: probing the slower mode costs its slowness, so a settled shape probes rarely
    max_backoff: int = 8

    def __post_init__(self):
        for name in ("probe_every", "probe_iters"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 2:
                raise ValueError(f"{name} must be an integer >= 2, got {v!r}")
        if not isinstance(self.max_backoff, int) or self.max_backoff < 1:
            raise ValueError(f"max_backoff must be an integer >= 1, got {self.max_backoff!r}")
        if not 0 <= self.margin < 1:
            raise ValueError(f"margin must be in [0, 1), got {self.margin!r}")


@dataclasses.dataclass
class _Shape:
    mode: str = EE
    left: int = 0  # iterations left in the current window
    seconds: float = 0.0  # the current window's measured time and tokens
    tokens: int = 0
    exploiting: bool = False  # the window runs the chosen mode (not a probe)
    cost: dict = dataclasses.field(default_factory=dict)  # mode -> seconds per token (last window)
    chosen: str | None = None  # the mode the last exploiting run used
    backoff: int = 1  # that run's length, in probe_every


class RampGate:
    def __init__(self, config: GateConfig = GateConfig()):
        if not isinstance(config, GateConfig):
            raise ValueError(f"gate must be a GateConfig, got {type(config).__name__}")
        self.config = config
        self.shapes: dict[tuple, _Shape] = {}
        self.fused_iterations = 0  # iterations run fused because early exit did not pay
        self.probes = 0  # windows that re-measured the mode not in use

    def mode(self, shape) -> str:
        """The mode this iteration of `shape` runs in."""
        if not self.config.enabled:
            return EE
        st = self.shapes.setdefault(shape, _Shape())
        if st.left <= 0:
            self._next_window(st)
        return st.mode

    def _next_window(self, st: _Shape) -> None:
        c = self.config
        missing = [m for m in (EE, FUSED) if m not in st.cost]
        if missing:  # measure each mode once
            st.mode, st.left, st.exploiting = missing[0], c.probe_iters, False
        elif st.exploiting:  # probe the other mode
            st.mode, st.left, st.exploiting = (FUSED if st.mode == EE else EE), c.probe_iters, False
            self.probes += 1
        else:  # run the cheaper mode
            ee_pays = st.cost[EE] < st.cost[FUSED] * (1 - c.margin)
            mode = EE if ee_pays else FUSED
            st.backoff = min(2 * st.backoff, c.max_backoff) if mode == st.chosen else 1
            st.mode, st.chosen, st.left, st.exploiting = mode, mode, c.probe_every * st.backoff, True
        st.seconds, st.tokens = 0.0, 0

    def record(self, shape, mode: str, seconds: float, tokens: int, count: bool = True) -> None:
        """An iteration of `shape` ran `mode` in `seconds` and finalized `tokens` tokens.
        `count=False`: a transition iteration (draining buffers, compiling) that says nothing
        about either mode's cost."""
        if mode == FUSED:
            self.fused_iterations += 1
        st = self.shapes.get(shape)
        if st is None or not self.config.enabled or mode != st.mode:
            return
        st.left -= 1
        if count:
            st.seconds += seconds
            st.tokens += tokens
        if st.left <= 0 and st.tokens:
            st.cost[mode] = st.seconds / st.tokens
