"""Host side of the paged KV cache: the page allocator, block tables and the power-of-two
buckets that batch shapes are padded to. NumPy only: the scheduler builds every batch from
these without touching the device.
"""
from __future__ import annotations

import numpy as np

DUMMY_PAGE = 0


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


def batch_bucket(n: int) -> int:
    """Decode and segment row bucket: a power of two up to 16, then multiples of 8 up to 32, then
    of 16. Where projections cost in proportion to rows (the CPU projection kernel past ~16 rows),
    24 rows then cost less than 32; the extra buckets add few programs (7 -> 9 up to 64 rows)."""
    n = max(int(n), 1)
    if n <= 16:
        return bucket(n)
    step = 8 if n <= 32 else 16
    return -(-n // step) * step


def batch_buckets_upto(n: int) -> list[int]:
    """Every `batch_bucket` value up to batch_bucket(n): 1, 2, 4, 8, 16, 24, 32, 48, 64, ..."""
    out, k = [], 1
    while k <= n:
        out.append(batch_bucket(k))
        k = out[-1] + 1
    return out


def row_bucket(n: int) -> int:
    """Smallest of 1, 2, 3, 4, 6, 8, 12, 16, ... (powers of two and 1.5x) >= n: <= 33% padding."""
    b = bucket(n)
    return b * 3 // 4 if b >= 4 and n <= b * 3 // 4 else b


def causal_block(W: int) -> int:
    """Query block of `ops.causal_attention` over W-wide packed rows: 128, else 64 (widths like 192,
    320), else the whole row."""
    return next((b for b in (128, 64) if W > b and W % b == 0), W)


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


def pow2_upto(n: int) -> list[int]:
    """The powers of two <= n: 1, 2, 4, ..."""
    return [1 << i for i in range(n.bit_length()) if 1 << i <= n]
