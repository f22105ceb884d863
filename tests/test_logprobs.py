"""Token log-probabilities against HF `transformers` fp32 (a converted tiny Llama): each generated
token's (greedy and sampled), a prompt's at full depth (`Engine.score`), at an exit ramp, and
`min_tokens`."""
import numpy as np
import pytest
import torch

from convert import load_hf_dir
from drex_jax import Engine, GenerationConfig
from drex_jax.early_exit import EEConfig
from tests.hf_tiny import make_hf_model
from tests.serving import serve_with_arrivals


@pytest.fixture(scope="module")
def hf_tiny(tmp_path_factory):
    model = make_hf_model("llama", 4, 2, False, False, seed=5)
    path = tmp_path_factory.mktemp("hf") / "llama"
    model.save_pretrained(path)
    cfg, params, _ = load_hf_dir(str(path))
    return model.eval(), cfg, params


def hf_logprobs(model, ids: list[int], temperature: float = 1.0) -> np.ndarray:
    """[len(ids), V] log-softmax of HF's fp32 logits / temperature at every position."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double() / temperature
    return torch.log_softmax(logits, -1).numpy()


PROMPTS = [[3, 17, 42, 5, 9], [60, 2, 33]]


def test_generated_logprobs_equal_hf(hf_tiny):
    model, cfg, params = hf_tiny
    eng = Engine.from_params(cfg, params, max_slots=2, max_seq_len=64)
    for temperature in (0.0, 0.7):
        config = GenerationConfig(max_new_tokens=6, temperature=temperature, seed=3, logprobs=5)
        for prompt, res in zip(PROMPTS, eng.generate(PROMPTS, config)):
            assert len(res.logprobs) == len(res.token_ids) == 6
            for j, (token, lp) in enumerate(zip(res.token_ids, res.logprobs)):
                want = hf_logprobs(model, prompt + res.token_ids[:j], temperature or 1.0)[-1]
                np.testing.assert_allclose(lp.logprob, want[token], atol=2e-4)
                ids, vals = zip(*lp.top)
                assert len(ids) == 20 and list(ids[:3]) == list(np.argsort(-want)[:3])
                np.testing.assert_allclose(vals, np.sort(want)[::-1][:20], atol=2e-4)
    # a request without logprobs in the same batch gets none and the same tokens
    out = serve_with_arrivals(eng, PROMPTS[:1] * 2, [GenerationConfig(max_new_tokens=6),
                                                     GenerationConfig(max_new_tokens=6, logprobs=0)])
    plain, asked = out[0], out[1]
    assert plain.logprobs is None and asked.token_ids == plain.token_ids and len(asked.logprobs) == 6


def test_prompt_scores_equal_hf(hf_tiny):
    model, cfg, params = hf_tiny
    eng = Engine.from_params(cfg, params, max_slots=2, max_seq_len=64)
    ids = [7, 3, 99, 12, 12, 40, 8, 1, 55]
    got = eng.score(ids)
    want = hf_logprobs(model, ids)
    assert got[0].logprob is None and got[0].top == () and len(got) == len(ids)
    np.testing.assert_allclose([g.logprob for g in got[1:]], [want[t - 1, ids[t]] for t in range(1, len(ids))],
                               atol=2e-4)
    for t in range(1, len(ids)):
        assert got[t].top[0][0] == int(np.argmax(want[t - 1]))
    with pytest.raises(ValueError, match="context limit"):
        eng.score(list(range(65)))


def test_exit_ramp_tokens_carry_the_ramps_distribution(tiny4):
    """Greedy tokens that exit at a ramp report that ramp's distribution (its argmax is the token);
    asking for logprobs does not change the tokens; verify mode refuses them."""
    cfg, params = tiny4
    ee = EEConfig((1, 2), (0.02, 0.02), missing_kv="copy")
    kw = dict(max_slots=2, max_seq_len=64, ee=ee, policy="rebatching", art=False)
    want = Engine.from_params(cfg, params, **kw).generate([[1, 2, 3]] * 2, GenerationConfig(max_new_tokens=10))
    got = Engine.from_params(cfg, params, **kw).generate([[1, 2, 3]] * 2, GenerationConfig(max_new_tokens=10,
                                                                                            logprobs=2))
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    layers = [d for g in got for d in g.exit_layers]
    assert min(layers) < cfg.num_layers, "no token exited early: the test checks nothing"
    for g in got:
        for token, lp in zip(g.token_ids, g.logprobs):
            assert lp.top[0][0] == token and lp.top[0][1] == pytest.approx(lp.logprob)
            assert sum(np.exp(v) for _, v in lp.top) <= 1 + 1e-5
    verify = Engine.from_params(cfg, params, max_slots=2, max_seq_len=64, policy="rebatching",
                                ee=EEConfig((1, 2), (0.02, 0.02), missing_kv="recompute", verify=True))
    with pytest.raises(ValueError, match="logprobs=0 but this engine runs EEConfig\\(verify=True\\)"):
        verify.submit([1, 2, 3], GenerationConfig(logprobs=0))


def test_min_tokens_keeps_stops_from_ending_early(tiny_llama):
    cfg, params = tiny_llama
    eng = Engine.from_params(cfg, params, max_slots=2, max_seq_len=64)
    free = eng.generate([[4, 5, 6]], GenerationConfig(max_new_tokens=8))[0].token_ids
    stop = free[1]
    cut = eng.generate([[4, 5, 6]], GenerationConfig(max_new_tokens=8, stop_token_ids=(stop,)))[0]
    assert cut.token_ids == free[:2] and cut.stats.finish_reason == "stop"
    held = eng.generate([[4, 5, 6]], GenerationConfig(max_new_tokens=8, stop_token_ids=(stop,), min_tokens=5))[0]
    assert held.token_ids[:5] == free[:5] and len(held.token_ids) >= 5
    assert stop not in held.token_ids[5:-1]  # after min_tokens the stop id ends it again
    with pytest.raises(ValueError, match=r"min_tokens must be an integer in \[0, max_new_tokens=8\], got 9"):
        GenerationConfig(max_new_tokens=8, min_tokens=9)
    with pytest.raises(ValueError, match=r"logprobs must be None or an integer in \[0, 20\], got 21"):
        GenerationConfig(logprobs=21)
