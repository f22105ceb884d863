"""Counts XLA compilations and the time they take (JAX's own monitoring events), to prove steady
state compiles nothing and to report compile time apart from run time."""
from __future__ import annotations

import time

import jax

_BACKEND = "/jax/core/compile/backend_compile_duration"
# tracing and lowering happen once per compiled program too
_COMPILE_EVENTS = (_BACKEND, "/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration")
_count = 0
_log: list[tuple[float, float]] = []  # (end time on perf_counter, seconds) per compile-phase event
_installed = False


def _listener(event: str, duration: float, **kwargs) -> None:
    global _count
    if event == _BACKEND:
        _count += 1
    if event in _COMPILE_EVENTS:
        _log.append((time.perf_counter(), float(duration)))


def install() -> None:
    global _installed
    if not _installed:
        jax.monitoring.register_event_duration_secs_listener(_listener)
        _installed = True


def count() -> int:
    """Backend compilations seen since `install()`."""
    return _count


def seconds_between(start: float, end: float) -> float:
    """Seconds spent tracing, lowering and compiling in events that ended in [start, end]
    (`time.perf_counter()` times)."""
    return sum(d for t, d in _log if start <= t <= end)
