"""Preallocated paged KV pool on the device (a pytree of two arrays); the host-side page
allocator and block tables are in `kv.pages`.

Layout: `k`, `v`: [layers, kv_heads, num_pages, page_size, head_dim]. Page 0 is never
handed out: padded batch rows point their block tables at it, so their writes land
somewhere harmless and real pages are never touched.
"""
from __future__ import annotations

import jax.numpy as jnp

from drex_jax.model.config import ModelConfig


def page_bytes(cfg: ModelConfig, page_size: int, dtype) -> int:
    """Bytes of one page across all layers, K and V."""
    return 2 * cfg.num_layers * cfg.num_kv_heads * page_size * cfg.head_dim * jnp.dtype(dtype).itemsize


def pages_for_budget(cfg: ModelConfig, budget_bytes: int, page_size: int, dtype) -> int:
    n = int(budget_bytes) // page_bytes(cfg, page_size, dtype)
    if n < 2:
        raise ValueError(
            f"KV memory budget {budget_bytes} bytes holds {n} pages of {page_bytes(cfg, page_size, dtype)} "
            "bytes; need at least 2 (one is the reserved dummy page)"
        )
    return n


KV_MEMORY_FRACTION = 0.9  # of the device memory left free after the weights: what the pool may take


def free_device_bytes(devices=None) -> int | None:
    """Bytes the allocator can still hand out on each of `devices` (this process's own; default:
    its first), the least of them, or None where a device reports no allocator statistics (a
    CPU). On a GPU jax preallocates `XLA_PYTHON_CLIENT_MEM_FRACTION` (default 75 %) of the card:
    `bytes_limit` is that share."""
    import jax

    free = []
    for device in devices or jax.local_devices()[:1]:
        stats = device.memory_stats()
        if not stats or "bytes_limit" not in stats:
            return None
        free.append(int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)))
    return min(free)


def init_pool(cfg: ModelConfig, num_pages: int, page_size: int, dtype) -> dict:
    shape = (cfg.num_layers, cfg.num_kv_heads, num_pages, page_size, cfg.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
