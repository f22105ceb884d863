"""Preallocated paged KV pool (a pytree of two arrays) and the host-side page allocator.

Layout: `k`, `v`: [layers, kv_heads, num_pages, page_size, head_dim]. Page 0 is never
handed out: padded batch rows point their block tables at it, so their writes land
somewhere harmless and real pages are never touched.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from drex_jax.model.config import ModelConfig

DUMMY_PAGE = 0


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


def init_pool(cfg: ModelConfig, num_pages: int, page_size: int, dtype) -> dict:
    shape = (cfg.num_layers, cfg.num_kv_heads, num_pages, page_size, cfg.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


class PageAllocator:
    """Free list of page ids (host side). Page 0 is reserved as the dummy page."""

    def __init__(self, num_pages: int):
        if num_pages < 2:
            raise ValueError(f"num_pages must be >= 2 (page 0 is reserved), got {num_pages}")
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, 0, -1))  # pop() hands out low ids first

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def capacity(self) -> int:
        return self.num_pages - 1

    def alloc(self, n: int) -> list[int] | None:
        """`n` pages, or None (and nothing taken) if fewer are free."""
        if n > len(self._free):
            return None
        return [self._free.pop() for _ in range(n)]

    def free(self, pages: list[int]) -> None:
        self._free.extend(reversed(pages))


def pages_needed(num_tokens: int, page_size: int) -> int:
    return -(-num_tokens // page_size)


def bucket(n: int, minimum: int = 1) -> int:
    """Smallest power of two >= max(n, minimum)."""
    n = max(int(n), minimum)
    return 1 << (n - 1).bit_length()


def row_bucket(n: int) -> int:
    """Smallest of 1, 2, 3, 4, 6, 8, 12, 16, ... (powers of two and 1.5x) >= n: <= 33% padding."""
    b = bucket(n)
    return b * 3 // 4 if b >= 4 and n <= b * 3 // 4 else b


def row_buckets_upto(n: int) -> list[int]:
    out, k = [], 1
    while True:
        b = row_bucket(k)
        if b > row_bucket(n):
            return out
        if not out or out[-1] != b:
            out.append(b)
        k = b + 1


def block_table_array(page_lists: list[list[int]], width: int) -> np.ndarray:
    """[rows, width] int32 block tables, unused entries pointing at the dummy page."""
    out = np.full((len(page_lists), width), DUMMY_PAGE, np.int32)
    for r, pages in enumerate(page_lists):
        out[r, : min(len(pages), width)] = pages[:width]
    return out
