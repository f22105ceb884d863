"""Counts XLA backend compilations (JAX's own monitoring event), to prove steady state compiles nothing."""
from __future__ import annotations

import jax

_EVENT = "/jax/core/compile/backend_compile_duration"
_count = 0
_installed = False


def _listener(event: str, duration: float, **kwargs) -> None:
    global _count
    if event == _EVENT:
        _count += 1


def install() -> None:
    global _installed
    if not _installed:
        jax.monitoring.register_event_duration_secs_listener(_listener)
        _installed = True


def count() -> int:
    """Backend compilations seen since `install()`."""
    return _count
