"""The decoder protocol: one decode iteration over the scheduler's running rows -> emissions.

A decoder is built over the device runner it calls (no jax here: every device call goes through
the runner) and returns what the device produced as `Emission`s; it never touches the
scheduler's queues, slots or pages. Two implementations: `FullDepthDecoder` (one fused step per
iteration) and `sched.ee_decoder.EarlyExitDecoder` (segments between exit ramps, policies,
rebatching, verify mode).
"""
from __future__ import annotations

from typing import Protocol

from drex_jax.generation import GenerationConfig
from drex_jax.kv.pages import batch_buckets_upto
from drex_jax.sched.batch import BatchLayout
from drex_jax.sched.request import Emission, Request


def wants_logprobs(rows: list[Request]) -> bool:
    """Whether a step over `rows` must return log-probabilities (a static flag of its program)."""
    return any(r.config.logprobs is not None for r in rows)


class Decoder(Protocol):
    missing_kv: str  # how prefill replays a preempted request's early exits ("copy": none to replay)
    overlappable: bool  # `sched.step.overlapped_step` may keep its step in flight (needs `layout`, `emissions`)

    def check_request(self, config: GenerationConfig) -> None:
        """Raise ValueError for a request this decoder cannot serve."""

    def step(self, rows: list[Request]) -> list[Emission]:
        """One iteration over the running rows (slot order); the tokens finalized, in order."""

    def warmup_shapes(self, max_batch: int, widths: list[int]) -> list[tuple]:
        """Every program shape this decoder can run."""

    def warmup_one(self, shape: tuple, do_sample: bool) -> None:
        """Run one shape on an all-padding batch (writes nothing)."""


class FullDepthDecoder:
    """Every row through every layer in one fused decode step (the runner's `decode`)."""

    missing_kv = "copy"
    overlappable = True  # `sched.step.overlapped_step` may keep a step in flight

    def __init__(self, runner, layout: BatchLayout, num_layers: int):
        self.runner, self.layout, self.num_layers = runner, layout, num_layers

    def check_request(self, config: GenerationConfig) -> None:
        return None

    def step(self, rows: list[Request]) -> list[Emission]:
        batch = self.layout.decode(rows)
        nxt = self.runner.decode(batch, any(r.config.temperature > 0 for r in rows), wants_logprobs(rows))
        return self.emissions(rows, nxt)

    def emissions(self, rows: list[Request], nxt) -> list[Emission]:
        """Row i of a decode step's `Sampled` output is rows[i]'s next token."""
        return [Emission(r, nxt.token(i), self.num_layers, self.num_layers, nxt.logprob(i))
                for i, r in enumerate(rows)]

    def warmup_shapes(self, max_batch: int, widths: list[int]) -> list[tuple]:
        return [("decode", b, w) for b in batch_buckets_upto(max_batch) for w in widths]

    def warmup_one(self, shape: tuple, do_sample: bool) -> None:
        _, b, w = shape
        self.runner.decode(self.layout.padding(b, w), do_sample)
