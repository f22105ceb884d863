"""Per-request generation settings and results."""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import numpy as np

TOP_LOGPROBS_MAX = 20  # alternatives per token a request may ask for (OpenAI's limit)


class TokenLogprob(NamedTuple):
    """One generated (or prompt) token's log-probability and its top alternatives (id, logprob),
    most likely first (`drex_jax.logprobs` says which distribution). `logprob` None: the first
    prompt token, which nothing predicts."""

    logprob: float | None
    top: tuple[tuple[int, float], ...]



@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] = ()  # in addition to the model's EOS ids
    stop: tuple[str, ...] = ()  # stop strings; the text is cut before the first match
    seed: int = 0
    ignore_eos: bool = False
    min_tokens: int = 0  # the first min_tokens tokens never end the request (stop ids and strings)
    logprobs: int | None = None  # None: off; k in [0, 20]: each token's logprob and its k top alternatives
    deadline_ms: float | None = None  # per-token deadline, used by the early-exit flush policy

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        if isinstance(self.stop_token_ids, int):
            object.__setattr__(self, "stop_token_ids", (self.stop_token_ids,))
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.stop, (tuple, list)) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a non-empty string or a list of non-empty strings, got {self.stop!r}")
        if not isinstance(self.stop_token_ids, (tuple, list)) or not all(
            isinstance(t, int) and t >= 0 for t in self.stop_token_ids
        ):
            raise ValueError(f"stop_token_ids must be a list of non-negative ints, got {self.stop_token_ids!r}")
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int) or not (
                0 <= self.min_tokens <= self.max_new_tokens):
            raise ValueError(f"min_tokens must be an integer in [0, max_new_tokens={self.max_new_tokens}], "
                             f"got {self.min_tokens!r}")
        if self.logprobs is not None and (isinstance(self.logprobs, bool) or not isinstance(self.logprobs, int)
                                          or not 0 <= self.logprobs <= TOP_LOGPROBS_MAX):
            raise ValueError(f"logprobs must be None or an integer in [0, {TOP_LOGPROBS_MAX}], got {self.logprobs!r}")
        if self.deadline_ms is not None and not (
            isinstance(self.deadline_ms, (int, float)) and math.isfinite(self.deadline_ms) and self.deadline_ms > 0
        ):
            raise ValueError(f"deadline_ms must be a positive number or None, got {self.deadline_ms!r}")
        if not isinstance(self.seed, int) or not (0 <= self.seed < 2**32):
            raise ValueError(f"seed must be an integer in [0, 2**32), got {self.seed!r}")


@dataclasses.dataclass
class RequestStats:
    prompt_tokens: int
    generated_tokens: int
    ttft_s: float  # submit -> first token on the host
    tpot_s: float  # mean time per output token after the first
    latency_s: float
    finish_reason: str  # "stop" | "length" | "cancelled"
    preemptions: int = 0  # times the request lost its pages to others and was recomputed


@dataclasses.dataclass
class GenerationResult:
    request_id: int
    text: str
    token_ids: list[int]
    stats: RequestStats
    exit_layers: list[int] = dataclasses.field(default_factory=list)  # depth each token ran to
    logprobs: list[TokenLogprob] | None = None  # per token, when the config asked (`drex_jax.logprobs`)


@dataclasses.dataclass
class StreamEvent:
    request_id: int
    token_id: int
    text: str  # newly final text since the previous event of this request
    finished: bool
    result: GenerationResult | None = None  # set on the last event
    logprob: TokenLogprob | None = None  # this token's, when the config asked
    exit_layer: int = -1  # the depth this token ran to


class SamplingParams(NamedTuple):
    """Each row's `GenerationConfig` sampling settings as arrays, so the jitted step takes new
    values without recompiling (`drex_jax.sampling.sample` reads them on the device)."""

    temperature: np.ndarray  # [B] f32, 0 = greedy
    top_k: np.ndarray  # [B] i32, 0 = off
    top_p: np.ndarray  # [B] f32 in (0, 1]
    seed: np.ndarray  # [B] u32
    step: np.ndarray  # [B] i32, token index within the request (fresh randomness per token)

    @staticmethod
    def build(rows: list[tuple[float, int, float, int, int]], batch: int) -> "SamplingParams":
        """From (temperature, top_k, top_p, seed, step) per row; padded to `batch` greedy rows."""
        pad = [(0.0, 0, 1.0, 0, 0)] * (batch - len(rows))
        cols = list(zip(*(list(rows) + pad)))
        return SamplingParams(
            np.asarray(cols[0], np.float32), np.asarray(cols[1], np.int32), np.asarray(cols[2], np.float32),
            np.asarray(cols[3], np.uint32), np.asarray(cols[4], np.int32),
        )


class LogprobRows(NamedTuple):
    """Per row: the chosen token's log-probability and the `TOP_LOGPROBS_MAX` most likely tokens
    (device arrays inside a jitted step, numpy on the host)."""

    chosen: np.ndarray  # [B] f32
    top_ids: np.ndarray  # [B, K] int32 token ids
    top: np.ndarray  # [B, K] f32, descending


class Sampled(NamedTuple):
    """A step's tokens on the host: tokens [B] (or [B, T]), `LogprobRows` of numpy arrays when
    the step was asked for them, and (a ramp in verify mode with sampling) each row's draft
    distribution over the ramp's candidates [B, K]."""

    tokens: np.ndarray
    logprobs: LogprobRows | None = None
    probs: np.ndarray | None = None

    @staticmethod
    def from_device(out) -> "Sampled":
        """A jitted step's token output (an array, or (tokens, LogprobRows)) fetched to the host."""
        if isinstance(out, tuple):
            return Sampled(np.asarray(out[0]), LogprobRows(*(np.asarray(a) for a in out[1])))
        return Sampled(np.asarray(out))

    def token(self, i: int) -> int:
        return int(self.tokens[i])

    def logprob(self, i: int) -> TokenLogprob | None:
        """Row i's `TokenLogprob` (None when the step computed none)."""
        if self.logprobs is None:
            return None
        lp = self.logprobs
        return TokenLogprob(float(lp.chosen[i]), tuple(zip(lp.top_ids[i].tolist(), lp.top[i].tolist())))
