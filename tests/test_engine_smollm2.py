"""Engine greedy output on the bundled SmolLM2 vs HF `transformers` greedy `generate` (fp32)."""
import numpy as np
import torch

from drex_jax import Engine, GenerationConfig
from drex_jax.data.texts import PROMPTS

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
    prompts = PROMPTS[:16]
    gc = GenerationConfig(max_new_tokens=NEW_TOKENS)
    encoded = [engine.encode(p, chat=True) for p in prompts]
    # requests arrive while others decode: 4 now, then 2 more every 5 steps
    ids, got, queue, steps = {}, {}, list(enumerate(encoded)), 0
    for _ in range(4):
        i, e = queue.pop(0)
        ids[engine.submit(e, gc)] = i
    while engine.has_work or queue:
        if queue and steps % 5 == 0:
            for _ in range(2):
                if queue:
                    i, e = queue.pop(0)
                    ids[engine.submit(e, gc)] = i
        for ev in engine.step():
            if ev.finished:
                got[ids[ev.request_id]] = ev.result.token_ids
        steps += 1
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
