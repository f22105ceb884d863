"""Engine greedy output on the bundled SmolLM2 vs HF `transformers` greedy `generate` (fp32)."""
import jax.numpy as jnp
import pytest
import torch

from drex_jax import Engine, GenerationConfig
from drex_jax.data.texts import PROMPTS
from tests.serving import serve_with_arrivals

NEW_TOKENS = 64
TIE_MARGIN = 1e-3  # a divergence is only excused where HF's own top-2 logits are this close


def hf_greedy(model, ids, eos):
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=eos,
                             pad_token_id=eos, output_scores=True, return_dict_in_generate=True)
    toks = out.sequences[0, len(ids):].tolist()
    margins = [float(torch.topk(s[0], 2).values.diff().abs()) for s in out.scores]
    return toks, margins


def test_greedy_token_identical_to_hf_with_arrivals(default_model, hf_gguf_model):
    cfg, params, tok = default_model
    engine = Engine.from_params(cfg, params, tok, max_slots=8, max_seq_len=256)
    prompts = PROMPTS[:8]
    gc = GenerationConfig(max_new_tokens=NEW_TOKENS)
    encoded = [engine.encode(p, chat=True) for p in prompts]
    # requests arrive while others decode: 4 now, then 2 more every 5 steps (8 prompts: the suite's time)
    results = serve_with_arrivals(engine, encoded, gc, first=4, every=5, per_arrival=2)
    got = {i: r.token_ids for i, r in results.items()}
    eos = tok.eos_token_id
    diverged = []
    for i, e in enumerate(encoded):
        want, margins = hf_greedy(hf_gguf_model, e, eos)
        if got[i] != want:
            k = next(j for j in range(min(len(got[i]), len(want))) if got[i][j] != want[j])
            diverged.append((i, k, margins[k]))
    print(f"\n{len(prompts)} prompts x {NEW_TOKENS} tokens: {len(diverged)} diverged {diverged}")
    assert all(m < TIE_MARGIN for _, _, m in diverged), diverged
    assert len(diverged) <= 1
    # lengths: each request is a real mix of short and long answers
    assert len({len(g) for g in got.values()}) > 1


@pytest.mark.slow  # run by .ci/run in its second (slow) pass
def test_bfloat16_engine_agrees_with_float32_reference(default_model):
    """A bf16 engine (the GPU default; XLA attention) on the bundled SmolLM2: each greedy token is
    judged on the prefix the engine actually produced, against a dense fp32 forward (no cache).
    bf16 rounding flips near-ties only: >= 90 % agree (measured on 8 prompts x 32 tokens)."""
    from drex_jax.bench.quality import prefix_agreement

    cfg, params, tok = default_model
    engine = Engine.from_params(cfg, params, tok, dtype="bfloat16", max_slots=8, max_seq_len=256)
    assert engine.attention == "xla" and engine.runner.pool["k"].dtype == jnp.bfloat16
    encoded = [engine.encode(p, chat=True) for p in PROMPTS[:8]]
    out = engine.generate(encoded, GenerationConfig(max_new_tokens=32))
    ids = [r.token_ids for r in out]
    share = prefix_agreement(params, cfg, encoded, ids)
    print(f"\nbf16 vs fp32 prefix agreement: {share:.3f} over {sum(map(len, ids))} tokens")
    assert share >= 0.9
