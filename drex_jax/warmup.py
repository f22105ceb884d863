"""Ahead-of-time compilation: every program shape an engine can run, run once on all-padding batches.

Padding rows write nothing (their KV writes are dropped, their hidden rows are out of range), so
the pool is untouched. The decode shapes come from the engine's decoder (full depth: the fused
step; early exit: every segment, K/V fill and the ART/gate fused step); the prefill shapes from
the scheduler's packing rule (row width W, rows R), the prefill chunks (chunk width C, block-table
width P) and the LM head over their last positions (Q sampled rows).
"""
from __future__ import annotations

import sys

import numpy as np

from drex_jax.generation import SamplingParams
from drex_jax.kv.pages import batch_bucket, block_table_array, bucket, pow2_upto, row_buckets_upto
from drex_jax.sched.batch import PrefillChunk
from drex_jax.sched.scheduler import prefill_widths


def prefill_shapes(max_slots: int, max_seq_len: int, prefill_budget: int, page_widths: list[int],
                   chunk_min: int = 64) -> list[tuple]:
    """("prefill", W, R) for every packing the scheduler can produce (first-fit rows are more than
    half full, except one; a context wider than the budget is a replay, alone in its row);
    ("chunk", C, P) for every prefill chunk (one context per step continues: C <= the budget);
    ("head", Q, rows) for the LM head on their last positions."""
    shapes = []
    for W in prefill_widths(max_seq_len):
        rows = 1 if W > prefill_budget else min(max_slots, 2 * -(-prefill_budget // W) + 1)
        shapes += [("prefill", W, R) for R in row_buckets_upto(rows)]
    shapes += [("chunk", C, P) for C in pow2_upto(bucket(min(prefill_budget, max_seq_len), chunk_min))
               if C >= chunk_min for P in page_widths]
    prefill_rows = bucket(max_slots)
    shapes += [("head", q, prefill_rows) for q in pow2_upto(prefill_rows)]
    return shapes + [("head", 1, 1)] if prefill_rows > 1 else shapes


def run_prefill_shape(runner, shape: tuple, num_pages: int, prefill_rows: int, do_sample: bool,
                      chunk_min: int = 64, page_width: int = 1, replay_layers: int | None = None,
                      missing_kv: str = "copy") -> None:
    """Run one prefill, chunk or head shape on all-padding input. A head shape runs behind the
    narrowest prefill (or chunk) program, so it sees the hidden states those programs return (their
    placement, which under a mesh is part of the compiled program's key). `replay_layers`: the
    engine's prefills carry kv_depth (early exit: `Scheduler.replay_depths`) for `missing_kv`."""
    kind, a, b = shape
    if kind == "chunk" or (kind == "head" and b == 1 and prefill_rows > 1):
        C, P = (a, b) if kind == "chunk" else (chunk_min, page_width)
        runner.prefill_chunk(PrefillChunk((None,), (False,), np.zeros((1, C), np.int32), np.full((1, C), -1, np.int32),
                                          block_table_array([[]], P), SamplingParams.build([], 1), False, False),
                             do_sample=do_sample and kind == "head")
        return
    W, R, q = (a, b, 1) if kind == "prefill" else (32, 1, a)
    pad, zero = np.full((R, W), -1, np.int32), np.zeros((R, W), np.int32)
    kv_depth = None if replay_layers is None else np.full((R, W), replay_layers, np.int32)
    runner.prefill(zero, pad, pad, np.full((R, W), num_pages, np.int32), zero, np.zeros(prefill_rows, np.int32),
                   SamplingParams.build([], q), kv_depth, do_sample=do_sample and kind == "head",
                   missing_kv=missing_kv if kv_depth is not None else "copy")


def warmup_jobs(decoder, *, max_slots: int, max_seq_len: int, prefill_budget: int, page_widths: list[int],
                sampling: bool = True, chunk_min: int = 64) -> list[tuple]:
    """[(shape, do_sample)]: every program `warmup` runs (nothing compiles here)."""
    variants = (False, True) if sampling else (False,)
    jobs = [(shape, v) for shape in decoder.warmup_shapes(batch_bucket(max_slots), page_widths) for v in variants]
    for shape in prefill_shapes(max_slots, max_seq_len, prefill_budget, page_widths, chunk_min):
        jobs += [(shape, v) for v in (variants if shape[0] == "head" else (False,))]
    return jobs


def warmup(runner, decoder, *, max_slots: int, max_seq_len: int, prefill_budget: int, page_widths: list[int],
           num_pages: int, progress: bool = False, sampling: bool = True, chunk_min: int = 64,
           replay_layers: int | None = None) -> int:
    """Compile every decode and prefill shape; returns the number of programs run."""
    from tqdm import tqdm

    jobs = warmup_jobs(decoder, max_slots=max_slots, max_seq_len=max_seq_len, prefill_budget=prefill_budget,
                       page_widths=page_widths, sampling=sampling, chunk_min=chunk_min)
    for shape, do_sample in tqdm(jobs, desc="compiling", disable=not progress, file=sys.stderr):
        if shape[0] in ("prefill", "chunk", "head"):
            run_prefill_shape(runner, shape, num_pages, bucket(max_slots), do_sample, chunk_min, page_widths[-1],
                              replay_layers, decoder.missing_kv)
        else:
            decoder.warmup_one(shape, do_sample)
    runner.sync()
    return len(jobs)
