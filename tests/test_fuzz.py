"""Property-based fuzzing (hypothesis): random requests, generation and early-exit configs, and
damaged checkpoints each get a clear error or a correct result, and the engine keeps serving."""
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st
from safetensors.numpy import load_file, save_file

from convert import load_hf_dir
from drex_jax import Engine, GenerationConfig
from drex_jax.early_exit import EEConfig
from drex_jax.rebatch.policies import POLICIES
from drex_jax.reference import reference_generate
from tests.hf_tiny import make_hf_model

FUZZ = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
EE = EEConfig((1, 2, 3), (0.08, 0.06, 0.05))
MAX_LEN = 96

junk = st.one_of(st.integers(-3, 60), st.floats(allow_nan=True, allow_infinity=True), st.none(), st.text(max_size=2))


@st.composite
def mostly(draw, valid, invalid):
    """A valid value 9 times in 10, so that whole requests are often valid."""
    return draw(valid if draw(st.integers(0, 9)) else invalid)


@st.composite
def requests(draw):
    """A prompt (token ids, some out of range or empty, or text the engine cannot encode) and
    GenerationConfig keyword arguments, some of them invalid."""
    prompt = draw(mostly(st.lists(st.integers(0, 60), min_size=1, max_size=24),
                         st.one_of(st.lists(st.integers(-2, 64), max_size=MAX_LEN + 4), st.text(max_size=5))))
    kwargs = draw(st.fixed_dictionaries({}, optional={
        "max_new_tokens": mostly(st.integers(1, 24), st.one_of(st.integers(-2, 0), junk)),
        "temperature": mostly(st.sampled_from([0.0, 0.0, 0.7, 1.0]), st.one_of(st.just(-1.0), junk)),
        "top_k": mostly(st.integers(0, 8), junk),
        "top_p": mostly(st.floats(0.05, 1.0), st.one_of(st.sampled_from([0.0, 1.5]), junk)),
        "seed": mostly(st.integers(0, 2**32 - 1), st.one_of(st.sampled_from([-1, 2**33]), junk)),
        "stop_token_ids": mostly(st.lists(st.integers(0, 60), max_size=3), st.one_of(st.just([-1]), junk)),
        "deadline_ms": mostly(st.sampled_from([None, 5.0, 50.0]), st.one_of(st.sampled_from([0.0, -1.0, math.nan]), junk)),
    }))
    return prompt, kwargs


@pytest.fixture(scope="module")
def serving(tiny4):
    cfg, params = tiny4
    eng = Engine.from_params(cfg, params, max_slots=8, page_size=4, max_seq_len=MAX_LEN, ee=EE,
                             policy="rebatching", art=False)
    return cfg, params, eng


@pytest.mark.slow  # run by .ci/run in its second (slow) pass
@FUZZ
@given(req=requests())
def test_fuzzed_requests(serving, req):
    cfg, params, eng = serving
    prompt, kwargs = req
    witness = [5, 17, 3, 40]
    wid = eng.submit(witness, GenerationConfig(max_new_tokens=8))
    eng.step()  # the witness is in flight while the fuzzed request comes in
    try:
        gc = GenerationConfig(**kwargs)
        rid = eng.submit(prompt, gc)
    except (ValueError, TypeError) as e:
        assert str(e), "errors must say what is wrong"
        event(f"request refused: {type(e).__name__}: {str(e)[:60]}")
        rid = None
    results = {}
    while eng.has_work:
        results.update({ev.request_id: ev.result for ev in eng.step() if ev.finished})
    assert results[wid].token_ids == reference_generate(params, cfg, witness, EE, 8).token_ids
    if rid is not None:
        event(f"request served ({'greedy' if gc.temperature == 0 else 'sampled'})")
        out = results[rid].token_ids
        assert 1 <= len(out) <= gc.max_new_tokens and all(0 <= t < cfg.vocab_size for t in out)
        if gc.temperature == 0:
            ref = reference_generate(params, cfg, prompt, EE, gc.max_new_tokens,
                                     stop_ids=set(gc.stop_token_ids) | set(cfg.eos_token_ids)).token_ids
            assert out == ref
    assert eng.num_free_pages == eng.allocator.capacity and eng.num_free_slots == 8


@st.composite
def ee_settings(draw):
    layers = draw(mostly(st.lists(st.integers(1, 3), min_size=1, max_size=3, unique=True).map(sorted),
                         st.lists(st.integers(-1, 5), max_size=4)))
    thresholds = draw(mostly(st.lists(st.floats(0.0, 0.2), min_size=len(layers), max_size=len(layers)),
                             st.lists(st.one_of(st.floats(-0.5, 1.5), st.just(math.nan)), max_size=4)))
    return dict(
        exit_layers=tuple(layers), thresholds=tuple(thresholds),
        confidence=draw(mostly(st.sampled_from(["top1_minus_top2", "max_prob", "neg_entropy"]), st.just("entropy"))),
        missing_kv=draw(mostly(st.sampled_from(["copy", "propagate"]), st.sampled_from(["recompute", "skip"]))),
    ), draw(mostly(st.sampled_from(POLICIES), st.just("greedy")))


@settings(FUZZ, max_examples=20)
@given(setting=ee_settings())
def test_fuzzed_early_exit_configs(tiny4, setting):
    """Invalid early-exit settings raise ValueError; valid ones under `rebatching` reproduce the
    unbatched reference, and every policy returns well-formed output."""
    cfg, params = tiny4
    ee_kwargs, policy = setting
    try:
        ee = EEConfig(**ee_kwargs)
        eng = Engine.from_params(cfg, params, max_slots=4, page_size=4, max_seq_len=MAX_LEN, ee=ee,
                                 policy=policy, art=False)
    except ValueError as e:
        assert str(e)
        event(f"early-exit setting refused: {str(e)[:70]}")
        return
    event(f"early-exit setting served ({policy})")
    prompts = [[3, 9, 27, 1], [50, 2], [7] * 9]
    out = eng.generate(prompts, GenerationConfig(max_new_tokens=10))
    for p, r in zip(prompts, out):
        assert len(r.token_ids) <= 10 and len(r.exit_layers) == len(r.token_ids)
        if policy == "rebatching":
            assert r.token_ids == reference_generate(params, cfg, p, ee, 10).token_ids
    assert eng.ee_stats.involuntary_exits == 0 or policy not in ("rebatching", "lazy", "off")
    assert eng.num_free_pages == eng.allocator.capacity


@pytest.fixture(scope="module")
def hf_files(tmp_path_factory):
    src = tmp_path_factory.mktemp("hf")
    make_hf_model("qwen2", 4, 2, False, False, layers=2, hidden=32, vocab=64).save_pretrained(src)
    return src, (src / "model.safetensors").read_bytes(), load_file(src / "model.safetensors")


@st.composite
def damage(draw):
    kind = draw(st.sampled_from(["truncate", "garble", "drop", "dtype", "shape", "transpose"]))
    return kind, draw(st.integers(0, 10**6)), draw(st.sampled_from([np.int32, np.int64, np.uint8, np.bool_]))


@settings(FUZZ, max_examples=40)
@given(d=damage())
def test_fuzzed_damaged_checkpoints(hf_files, tmp_path_factory, d):
    """Every damaged checkpoint is refused with a ValueError that says what is wrong."""
    src, raw, tensors = hf_files
    kind, n, int_dtype = d
    dst = tmp_path_factory.mktemp("bad")
    (dst / "config.json").write_bytes((src / "config.json").read_bytes())
    names = sorted(tensors)
    name = names[n % len(names)]
    bad = dict(tensors)
    if kind == "truncate":
        (dst / "model.safetensors").write_bytes(raw[: n % len(raw)])
    elif kind == "garble":  # overwrite bytes of the header (its length and JSON)
        buf = bytearray(raw)
        for i in range(8):
            buf[(n + 7 * i) % 64] ^= 0xA5
        (dst / "model.safetensors").write_bytes(bytes(buf))
    else:
        if kind == "drop":
            del bad[name]
        elif kind == "dtype":
            bad[name] = bad[name].astype(int_dtype)
        elif kind == "shape":
            axis = n % bad[name].ndim
            bad[name] = np.delete(bad[name], 0, axis=axis)
        elif kind == "transpose":
            t = bad[name]
            if t.ndim < 2 or t.shape[0] == t.shape[1]:
                t = t.reshape(-1)[:-1]  # no transposable shape: drop an element instead
            bad[name] = np.ascontiguousarray(t.T)
        save_file(bad, dst / "model.safetensors", metadata={"format": "pt"})
    event(kind)
    with pytest.raises(ValueError) as e:
        load_hf_dir(str(dst))
    msg = str(e.value)
    if kind in ("truncate", "garble"):
        assert "damaged" in msg or "truncated" in msg or "model.safetensors" in msg, msg
    else:
        assert name in msg, msg
