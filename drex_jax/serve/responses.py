"""OpenAI response bodies from engine results: choices, log-probabilities (completions' and
chat's shapes), usage. Pure functions of the results and a `TokenText`; the app assembles them."""
from __future__ import annotations

import functools

from drex_jax.generation import GenerationResult, TokenLogprob


class TokenText:
    """Each token id's own text (`tokenizer.decode([id])`, special tokens shown), cached: the
    strings OpenAI's `tokens` / `top_logprobs` carry. Decoding does not change the tokenizer, so
    handlers may call it beside the engine thread."""

    def __init__(self, tokenizer):
        self._text = functools.lru_cache(maxsize=65536)(lambda t: tokenizer.decode([t]))

    def __call__(self, token: int) -> str:
        return self._text(int(token))


def completion_logprobs(token_ids: list[int], logprobs: list[TokenLogprob | None], k: int, text: TokenText,
                        offset: int = 0) -> dict:
    """The completions `logprobs` object for these tokens: tokens, token_logprobs, top_logprobs
    (the k most likely tokens' text -> logprob, plus the chosen token, as vLLM does; None where
    nothing predicts the token) and text_offset (from `offset`)."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token, lp in zip(token_ids, logprobs):
        s = text(token)
        out["tokens"].append(s)
        out["text_offset"].append(offset)
        offset += len(s)
        if lp is None or lp.logprob is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        out["token_logprobs"].append(lp.logprob)
        top: dict[str, float] = {}
        for t, v in lp.top[:k]:
            top.setdefault(text(t), v)  # two ids with one text: the likelier keeps it
        top.setdefault(s, lp.logprob)
        out["top_logprobs"].append(top)
    return out


def chat_logprobs(token_ids: list[int], logprobs: list[TokenLogprob | None], k: int, text: TokenText) -> dict:
    """The chat `logprobs` object: {"content": [{token, logprob, bytes, top_logprobs: [k of the same]}]}."""
    def entry(t: int, v: float) -> dict:
        s = text(t)
        return {"token": s, "logprob": v, "bytes": list(s.encode("utf-8"))}

    return {"content": [{**entry(t, lp.logprob), "top_logprobs": [entry(a, v) for a, v in lp.top[:k]]}
                        for t, lp in zip(token_ids, logprobs)]}


def usage(prompt_tokens: int, results: list[GenerationResult]) -> dict:
    n = sum(r.stats.generated_tokens for r in results)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}
