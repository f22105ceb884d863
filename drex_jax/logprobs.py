"""Token log-probabilities: of each generated token (from the logits it was drawn from: the LM
head's or the exit ramp's, at the depth it exited), and of a prompt's tokens at full depth
(`score_prompt`, what OpenAI's `echo` + `logprobs` scoring asks for).

The distribution reported is the log-softmax of those logits divided by the request's
temperature when it samples (greedy rows: the logits as they are), before top-k/top-p
truncation. A ramp that scores only its candidate tokens (`ramp_tokens`) reports the softmax over
them: that is the distribution its token came from.

Device side a step that was asked for log-probabilities returns `LogprobRows` next to its tokens
(`logprobs` is a static flag: programs without it never form them); the host turns each row into
a `TokenLogprob`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from drex_jax.generation import TOP_LOGPROBS_MAX, LogprobRows, Sampled, TokenLogprob


def token_logprobs(logits: jax.Array, chosen: jax.Array, temperature: jax.Array,
                   columns: jax.Array | None = None) -> LogprobRows:
    """logits [B, V] f32 (or [B, K] over candidate ids `columns` [K]), chosen [B] column indices,
    temperature [B] (0 = greedy: unscaled) -> LogprobRows with token ids (not columns)."""
    scale = jnp.where(temperature > 0, temperature, 1.0)[:, None]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32) / scale, axis=-1)
    top, top_cols = jax.lax.top_k(logp, min(TOP_LOGPROBS_MAX, logp.shape[-1]))
    top_ids = top_cols if columns is None else columns[top_cols]
    picked = jnp.take_along_axis(logp, chosen[:, None].astype(jnp.int32), axis=-1)[:, 0]
    return LogprobRows(picked, top_ids.astype(jnp.int32), top)


def head_tokens(model, x: jax.Array, sp, do_sample: bool, logprobs: bool):
    """The LM head's next tokens for hidden states x [B, H]: tokens [B], or (tokens, LogprobRows)
    when `logprobs` (then the [B, V] logits are formed even for greedy rows)."""
    if not logprobs:
        return model.next_tokens(x, sp, do_sample)
    from drex_jax.sampling import sample

    logits = model.lm_head_logits(x)
    tokens = sample(logits, sp, do_sample)
    return tokens, token_logprobs(logits, tokens, sp.temperature)


@functools.partial(jax.jit, static_argnames=("graph",))
def _score(state, tokens, length, *, graph):
    """Full-depth log-probabilities of tokens [T] (right-padded; `length` valid): row t scores
    token t+1 given tokens <= t."""
    from drex_jax.model.decoder import forward_hidden

    model = graph.merge(state)
    h = forward_hidden(model, model.cfg, tokens[None], length[None])[-1, 0]  # [T, H]
    logits = model.lm_head_logits(h)
    nxt = jnp.concatenate([tokens[1:], tokens[:1]])
    return token_logprobs(logits, nxt, jnp.zeros(tokens.shape[:1], jnp.float32))


def score_prompt(graph, state, token_ids: list[int], bucket_len: int) -> list[TokenLogprob]:
    """`TokenLogprob` of every prompt token at full depth: the first is (None, ()), token t's comes
    from the model's distribution after tokens < t. `bucket_len` >= len(token_ids): the padded
    length compiled (so a few program shapes serve every prompt)."""
    n = len(token_ids)
    if not 1 <= n <= bucket_len:
        raise ValueError(f"a prompt of {n} tokens does not fit the scoring length {bucket_len}")
    tokens = np.zeros(bucket_len, np.int32)
    tokens[:n] = token_ids
    out = Sampled(np.asarray(tokens), LogprobRows(*(np.asarray(a) for a in _score(
        state, tokens, np.int32(n), graph=graph))))
    return [TokenLogprob(None, ())] + [out.logprob(t) for t in range(n - 1)]
