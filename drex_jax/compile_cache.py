"""XLA's persistent compilation cache, on by default for engines: a restarted server or a second
benchmark run loads its programs from disk instead of compiling them again (warm-up compiles
tens to hundreds of programs; on a GPU each takes seconds).

`DREX_JAX_COMPILE_CACHE` names the directory (default: `<DREX_JAX_CACHE>/xla-cache`, next to the
converted models); `0` or `off` turns it off. A directory the process already configured through
`jax.config` (or `JAX_COMPILATION_CACHE_DIR`) is left as it is.
"""
from __future__ import annotations

import os

import jax

MIN_COMPILE_SECONDS = 0.5  # programs that compile faster than this are not worth a disk entry


def enable() -> str | None:
    """Turn the cache on unless it is configured or switched off; returns the directory in use."""
    current = jax.config.jax_compilation_cache_dir
    if current:
        return current
    choice = os.environ.get("DREX_JAX_COMPILE_CACHE", "")
    if choice.lower() in ("0", "off", "false", "no"):
        return None
    if not choice:
        from drex_jax.default_model import cache_dir

        choice = os.path.join(cache_dir(), "xla-cache")
    os.makedirs(choice, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", choice)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    return choice
