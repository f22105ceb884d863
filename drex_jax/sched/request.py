"""The request record the scheduler and the decoders share, and what a decoder hands back.

Host only (no jax). A `Request` is plain data: its prompt, what it has generated, the slot and
pages it holds while running, and the early-exit state of the token it is computing (a
sub-record that resets itself when a preemption throws that token away).
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

from drex_jax.generation import GenerationConfig, TokenLogprob
from drex_jax.sched.detokenize import IncrementalDetokenizer


@dataclasses.dataclass
class EarlyExitState:
    """Where a running request's current token is in an early-exit decode.

    stage: the segment the token waits to run (0 = layer 0; s > 0 = in ramp s-1's buffer, its
      hidden state in the runner's buffer row `slot`).
    buffered_iter: the decoder iteration the token entered its buffer (-1: not buffered).
    token_start: when the current token started (the flush policy's deadline clock).
    first_want: the first ramp whose threshold the token passed (-1: none yet).
    pending: `missing_kv="recompute"`: decode positions whose deep K/V is still missing -> layers
      run so far (their hidden states wait in the runner's ring); verify mode: the drafted
      positions not yet verified.
    drafts, draft_depths: verify mode: drafted tokens (never emitted before verification) and the
      ramp depth each exited at. draft_probs: each draft's distribution over the ramp candidates
      [K] when its batch sampled (speculative sampling's q), else None.
    chain_conf: verify mode: the product of the unverified drafts' confidences (`draft_stop`).
    ramp_accepted, ramp_checked: verify mode, per ramp: this request's decayed counts of accepted
      and verified drafts (`adaptive_ramps`); ramp_drafted_at: its token count at its last draft
      there. Request history: kept through a preemption.
    """

    stage: int = 0
    buffered_iter: int = -1
    token_start: float = 0.0
    first_want: int = -1
    pending: dict[int, int] = dataclasses.field(default_factory=dict)
    drafts: list[int] = dataclasses.field(default_factory=list)
    draft_depths: list[int] = dataclasses.field(default_factory=list)
    draft_probs: list = dataclasses.field(default_factory=list)
    chain_conf: float = 1.0
    ramp_accepted: dict[int, float] = dataclasses.field(default_factory=dict)
    ramp_checked: dict[int, float] = dataclasses.field(default_factory=dict)
    ramp_drafted_at: dict[int, int] = dataclasses.field(default_factory=dict)

    def reset(self) -> None:
        """Forget the token in flight (preemption: prefill recomputes the context at full depth, so
        nothing stays pending and unverified drafts are dropped)."""
        self.stage, self.buffered_iter, self.first_want = 0, -1, -1
        self.pending, self.drafts, self.draft_depths, self.draft_probs = {}, [], [], []
        self.chain_conf = 1.0

    def token_done(self) -> None:
        """The current token was finalized: the next one starts at layer 0."""
        self.stage, self.buffered_iter, self.first_want = 0, -1, -1


@dataclasses.dataclass
class Request:
    id: int
    prompt_ids: list[int]
    config: GenerationConfig
    stop_ids: frozenset[int]
    submit_time: float
    slot: int = -1
    pages: list[int] = dataclasses.field(default_factory=list)
    generated: list[int] = dataclasses.field(default_factory=list)
    first_token_time: float = 0.0
    last_token_time: float = 0.0
    finish_reason: str | None = None
    text: str = ""  # the final text so far (stop strings cut)
    exit_layers: list[int] = dataclasses.field(default_factory=list)  # depth each generated token ran to
    # depth of the K/V written at each decode position (prompt positions are full depth): what a
    # recompute after preemption must replay
    kv_depths: list[int] = dataclasses.field(default_factory=list)
    admit_seq: int = -1  # order of first admission: preemption takes the highest first
    # chunked prefill: context tokens whose K/V prefill has written (or planned this step), and
    # whether more remain (then the request holds a slot but does not decode yet)
    prefilled: int = 0
    prefilling: bool = False
    preemptions: int = 0
    ee: EarlyExitState = dataclasses.field(default_factory=EarlyExitState)
    detok: IncrementalDetokenizer | None = None  # its text so far (None: no tokenizer)
    logprobs: list | None = None  # TokenLogprob per generated token, when the config asks

    @property
    def context_ids(self) -> list[int]:
        """Tokens whose K/V the request needs in the pool before its next decode step."""
        return self.prompt_ids + self.generated[:-1]

    @property
    def cache_len(self) -> int:
        """Positions with K/V in the pool (the newest token is not yet written): the position of
        the next decode step's input, `last_token`."""
        return len(self.prompt_ids) + len(self.generated) + len(self.ee.drafts) - 1

    @property
    def last_token(self) -> int:
        """The next decode step's input: the newest draft (verify mode) or generated token."""
        return self.ee.drafts[-1] if self.ee.drafts else self.generated[-1]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def sampling_row(self) -> tuple:
        """(temperature, top_k, top_p, seed, step): step is the index of the token the next step
        produces (verify mode: counting the drafts), the key of its randomness."""
        c = self.config
        return (float(c.temperature), c.top_k, float(c.top_p), c.seed, len(self.generated) + len(self.ee.drafts))

    def may_stop(self, n: int) -> bool:
        """Whether the request's n-th generated token may end it on a stop id or string: not
        within the first `min_tokens`."""
        return n > self.config.min_tokens

    def ends_with(self, tokens: list[int]) -> bool:
        """Whether emitting `tokens` (this step's, in order) ends the request at the last one: by
        stop id, length or stop string (the detokenizer peeks; nothing is recorded)."""
        n = len(self.generated) + len(tokens)
        if n >= self.config.max_new_tokens:
            return True
        if not self.may_stop(n):
            return False
        return tokens[-1] in self.stop_ids or (self.detok is not None and self.detok.would_stop(tokens))


class Emission(NamedTuple):
    """One token a decoder (or prefill) finalized for a request.

    exit_layer: the depth the token's computation ran to (what `GenerationResult.exit_layers`
      reports). kv_depth: the depth of the K/V the step wrote at the token's input position (None
      for prefill's first token: prefill wrote the prompt's K/V). logprob: its `TokenLogprob`
      when the request asked for log-probabilities."""

    request: Request
    token: int
    exit_layer: int
    kv_depth: int | None
    logprob: TokenLogprob | None = None
