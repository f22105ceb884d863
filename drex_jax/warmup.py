"""Ahead-of-time compilation: every program shape an engine can run, run once on all-padding batches.

Padding rows write nothing (their KV writes are dropped, their hidden rows are out of range), so
the pool is untouched. The decode shapes come from the engine's decoder (full depth: the fused
step; early exit: every segment, K/V fill and the ART/gate fused step); the prefill shapes from
the scheduler's packing rule (row width W, rows R, prompts Q).
"""
from __future__ import annotations

import sys

import numpy as np

from drex_jax.generation import SamplingParams
from drex_jax.kv.pages import bucket, pow2_upto, row_buckets_upto


def prefill_shapes(max_slots: int, max_seq_len: int, prefill_budget: int) -> list[tuple]:
    """("prefill", Q, W, R) for every packing the scheduler can produce."""
    max_rows = bucket(max_slots)
    budget = max(prefill_budget, max_seq_len)
    shapes = []
    for W in pow2_upto(bucket(max_seq_len, 16)):
        if W < 16:
            continue
        # first-fit rows are more than half full, except the last
        for R in row_buckets_upto(min(max_slots, 2 * -(-budget // W))):
            shapes += [("prefill", q, W, R) for q in pow2_upto(max_rows) if q >= R]
    return shapes


def run_prefill_shape(runner, shape: tuple, num_pages: int, do_sample: bool) -> None:
    _, q, W, R = shape
    pad, zero = np.full((R, W), -1, np.int32), np.zeros((R, W), np.int32)
    runner.prefill(zero, pad, pad, np.full((R, W), num_pages, np.int32), zero, np.zeros(q, np.int32),
                   SamplingParams.build([], q), None, do_sample=do_sample)


def warmup(runner, decoder, *, max_slots: int, max_seq_len: int, prefill_budget: int, page_widths: list[int],
           num_pages: int, progress: bool = False, sampling: bool = True) -> int:
    """Compile every decode and prefill shape; returns the number of programs run."""
    from tqdm import tqdm

    shapes = (decoder.warmup_shapes(bucket(max_slots), page_widths)
              + prefill_shapes(max_slots, max_seq_len, prefill_budget))
    variants = (False, True) if sampling and not decoder.greedy_only else (False,)
    for shape in tqdm(shapes, desc="compiling", disable=not progress, file=sys.stderr):
        for do_sample in variants:
            if shape[0] == "prefill":
                run_prefill_shape(runner, shape, num_pages, do_sample)
            else:
                decoder.warmup_one(shape, do_sample)
    runner.sync()
    return len(variants) * len(shapes)
