"""One engine iteration over a scheduler, a device runner and a decoder (no jax here).

schedule -> packed prefill -> prefill chunk -> decode -> commit: the plan is data, the runner
runs it, and every result returns to the scheduler through `commit`. The engine and the
jax-free scheduler tests run this same function.

`overlapped_step` hides the host behind the device in steady plain decoding: it dispatches step
k+1 with step k's tokens still on the device (device-side token feeding), and only then fetches
and commits step k, so detokenization, stop checks and the next batch's arrays are built while the
device runs. It falls back to `engine_step` whenever the next step needs a host decision first.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from drex_jax.generation import StreamEvent
from drex_jax.sched.decoding import wants_logprobs


def engine_step(scheduler, runner, decoder) -> list[StreamEvent]:
    """Run one step's plan; each finalized token is a `StreamEvent`."""
    return run_plan(scheduler.schedule(), scheduler, runner, decoder)


def run_plan(plan, scheduler, runner, decoder) -> list[StreamEvent]:
    events = []
    if plan.prefill is not None:
        b = plan.prefill
        first = runner.prefill(b.tokens, b.positions, b.segment_ids, b.write_page, b.write_off, b.last_index,
                               b.sampling, b.kv_depth, do_sample=b.do_sample,
                               missing_kv=decoder.missing_kv if b.kv_depth is not None else "copy",
                               logprobs=b.logprobs)
        events += scheduler.commit(scheduler.prefill_emissions(b, first))
    if plan.chunk is not None:
        c = plan.chunk
        first = runner.prefill_chunk(c, do_sample=c.do_sample, logprobs=c.logprobs)
        events += scheduler.commit(scheduler.prefill_emissions(c, first))
    rows = [r for r in plan.running if not r.finished]
    if rows:
        events += scheduler.commit(decoder.step(rows))
    return events


@dataclasses.dataclass
class InFlight:
    """A plain decode step dispatched and not yet committed: its rows (in batch order), the host
    arrays it ran on (`DecodeBatch`; its tokens may be the previous step's device output) and its
    device output (next tokens [B])."""

    rows: list
    batch: object
    out: object
    do_sample: bool


def overlapped_step(scheduler, runner, decoder, inflight: InFlight | None
                    ) -> tuple[list[StreamEvent], InFlight | None]:
    """One engine iteration that keeps a plain decode step in flight when it can.

    With a step in flight: dispatch the next one over the same rows first (when `_follow` allows),
    then fetch and commit the one in flight. Without: plan; a plan that is decode only (no prefill,
    nothing to admit, no log-probabilities, a decoder that supports it) is dispatched and left in
    flight (its tokens come with the next call); any other plan runs synchronously (`run_plan`).
    Tokens equal `engine_step`'s: the same programs on the same inputs; a row that finishes while
    its next step is already in flight has that token dropped at commit (its K/V write lands in
    pages it no longer reads; device programs run in order, so a later owner of those pages writes
    after it). Commit keeps the pages of one position past each request's newest token, which is
    exactly the step in flight."""
    if inflight is not None:
        nxt = _follow(scheduler, runner, inflight)
        return scheduler.commit(decoder.emissions(inflight.rows, runner.fetch(inflight.out))), nxt
    plan = scheduler.schedule()
    rows = [r for r in plan.running if not r.finished]
    if plan.prefill is None and plan.chunk is None and rows and decoder.overlappable and _steady(scheduler, rows):
        batch = decoder.layout.decode(rows)
        do_sample = any(r.config.temperature > 0 for r in rows)
        return [], InFlight(rows, batch, runner.decode_async(batch, do_sample), do_sample)
    return run_plan(plan, scheduler, runner, decoder), None


def _steady(scheduler, rows) -> bool:
    """Nothing but these rows' next tokens needs the host before the next step: no request can be
    admitted, none asks for log-probabilities, all still run."""
    return (not scheduler.can_admit() and not wants_logprobs(rows)
            and all(r.slot >= 0 and not r.finished for r in rows))


def _follow(scheduler, runner, prev: InFlight) -> InFlight | None:
    """Dispatch the step after `prev` over the same rows, fed `prev`'s device tokens: positions and
    sampling steps advance by one; a row entering a new page gets one now (None: a page or a wider
    block table is needed, or the rows changed: the host decides first)."""
    rows, b = prev.rows, prev.batch
    if not _steady(scheduler, rows):
        return None
    page_size, width = scheduler.page_size, b.block_tables.shape[1]
    positions = b.positions.copy()
    live = positions >= 0
    positions[live] += 1
    tables = b.block_tables
    for i in np.flatnonzero(live & (positions % page_size == 0)):  # rows entering a new page
        r, page = rows[i], int(positions[i]) // page_size
        if page >= width:
            return None
        if page >= len(r.pages):
            got = scheduler.allocator.alloc(1)
            if got is None:
                return None
            r.pages += got
            scheduler.note_pages()
            if tables is b.block_tables:
                tables = tables.copy()
            tables[i, page] = got[0]
    sampling = b.sampling._replace(step=np.where(live, b.sampling.step + 1, b.sampling.step).astype(np.int32))
    batch = b._replace(tokens=prev.out, positions=positions, block_tables=tables, sampling=sampling)
    return InFlight(rows, batch, runner.decode_async(batch, prev.do_sample), prev.do_sample)
