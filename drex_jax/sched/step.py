"""One engine iteration over a scheduler, a device runner and a decoder (no jax here).

schedule -> packed prefill -> prefill chunk -> decode -> commit: the plan is data, the runner
runs it, and every result returns to the scheduler through `commit`. The engine and the
jax-free scheduler tests run this same function.
"""
from __future__ import annotations

from drex_jax.generation import StreamEvent


def engine_step(scheduler, runner, decoder) -> list[StreamEvent]:
    """Run one step's plan; each finalized token is a `StreamEvent`."""
    plan = scheduler.schedule()
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
