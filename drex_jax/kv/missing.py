"""Missing K/V of skipped layers: how a token that exited at layer E gets K/V in layers >= E.

A small registry, importable without jax (the host scheduler reads it): each method says whether
it fills at exit time (and with which jitted fill), whether it defers to the row's next deep
pass, and how a preempted request's prefill replays it. A new method is one entry here plus, if
it fills, its jitted function (`rebatch/steps.py` holds the existing ones).
"""
from __future__ import annotations

import dataclasses
from typing import Callable


@dataclasses.dataclass(frozen=True)
class MissingKV:
    """name: `EEConfig(missing_kv=...)`.
    fill(runner, exit_layer, batch, positions) -> new pool: writes layers >= exit_layer at
      `positions` [B] (-1: row untouched) of the batch's rows; None: nothing to fill at exit.
    deferred: the skipped layers run later, with the row's next deep pass (exact K/V; needs a
      policy with a per-row deep pass).
    replay_copies: prefill rebuilds a preempted request's exit at E by copying layer E-1's K/V
      upward (else each skipped layer projects the frozen exit hidden state, as `propagate` did);
      a deferred method never replays: its positions end at full depth."""

    name: str
    fill: Callable | None = None
    deferred: bool = False
    replay_copies: bool = False


def _fill_copy(runner, exit_layer, batch, positions):
    from drex_jax.rebatch.steps import fill_copy

    return fill_copy(runner.pool, batch.block_tables, positions, exit_layer=exit_layer)


def _fill_propagate(runner, exit_layer, batch, positions):
    from drex_jax.rebatch.steps import fill_propagate

    return fill_propagate(runner.state, runner.pool, runner.hidden, batch.slot_ids, batch.block_tables, positions,
                          graph=runner.graph, exit_layer=exit_layer)


METHODS: dict[str, MissingKV] = {m.name: m for m in (
    MissingKV("copy", fill=_fill_copy, replay_copies=True),  # DREX's default: the exit layer's K/V, copied
    MissingKV("propagate", fill=_fill_propagate),  # CALM: each skipped layer projects the exit hidden state
    MissingKV("recompute", deferred=True),  # EE-LLM: the next deep pass computes them exactly
)}
MISSING_KV_METHODS = tuple(METHODS)


def get_method(name: str) -> MissingKV:
    if name not in METHODS:
        raise ValueError(f"unknown missing-KV method {name!r}; choose one of {MISSING_KV_METHODS}")
    return METHODS[name]
