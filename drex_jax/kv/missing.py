"""Missing K/V of skipped layers: how a token that exited at layer E gets K/V in layers >= E.

A small registry, importable without jax (the host scheduler reads it): each method says whether
it fills at exit time (and with which jitted fill), whether it defers to the row's next deep
pass, and how a preempted request's prefill replays it. A new method is one entry here plus, if
it fills, its jitted function in `rebatch/steps.py`, named by the entry (every fill takes the same
arguments, so the runner calls any of them the same way).
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class MissingKV:
    """name: `EEConfig(missing_kv=...)`.
    fill: the name of the jitted fill in `rebatch.steps`, `fill(state, pool, hidden, slot_ids,
      block_tables, positions, *, graph, exit_layer) -> pool`, which writes layers >= exit_layer at
      `positions` [B] (-1: row untouched); None: nothing to fill at exit.
    deferred: the skipped layers run later, with the row's next deep pass (exact K/V; needs a
      policy with a per-row deep pass).
    replay_copies: prefill rebuilds a preempted request's exit at E by copying layer E-1's K/V
      upward (else each skipped layer projects the frozen exit hidden state, as `propagate` did);
      a deferred method never replays: its positions end at full depth."""

    name: str
    fill: str | None = None
    deferred: bool = False
    replay_copies: bool = False


METHODS: dict[str, MissingKV] = {m.name: m for m in (
    MissingKV("copy", fill="fill_copy", replay_copies=True),  # DREX's default: the exit layer's K/V, copied
    MissingKV("propagate", fill="fill_propagate"),  # CALM: each skipped layer projects the exit hidden state
    MissingKV("recompute", deferred=True),  # EE-LLM: the next deep pass computes them exactly
)}
MISSING_KV_METHODS = tuple(METHODS)


def get_method(name: str) -> MissingKV:
    if name not in METHODS:
        raise ValueError(f"unknown missing-KV method {name!r}; choose one of {MISSING_KV_METHODS}")
    return METHODS[name]
