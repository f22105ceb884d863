"""The host scheduler on its own: preemption, cancellation and verify rollback bookkeeping checked
against a plain chain, without jax (tests/sched_scenarios.py); incremental detokenization."""
import os
import subprocess
import sys
import time

import pytest

from tests import sched_scenarios as sc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("verify", [False, True])
def test_preemption_recomputes_to_the_same_tokens(verify):
    assert sc.preemption(verify) > 0


@pytest.mark.parametrize("verify", [False, True])
def test_cancellation_returns_slot_and_pages(verify):
    sc.cancellation(verify)


@pytest.mark.parametrize("verify", [False, True])
def test_chunked_prefill_interleaves_with_decode(verify):
    counts = sc.chunked_prefill(verify)
    assert counts["chunk_steps"] > 5 and counts["cut_steps"] > 0, counts
    assert counts["stalled_steps"] == 0, counts


@pytest.mark.parametrize("verify", [False, True])
def test_chunked_prefill_under_preemption(verify):
    """A pool too small for everyone while prompts arrive in chunks: requests mid-prefill can be
    preempted too; outputs still equal the chain and every page comes back."""
    counts = sc.chunked_prefill(verify, num_pages=16)
    assert counts["preemptions"] > 0 and counts["chunk_steps"] > 0, counts


def test_verify_rollback_returns_rejected_pages():
    got = sc.verify_rollback()
    assert got["accepted"] < got["drafts"]


def test_stop_strings_in_verify_mode_end_requests_mid_step():
    assert sc.stop_strings_in_verify_mode() >= 1


def test_fake_runner_catches_a_page_bug(monkeypatch):
    """The scenarios can fail: a scheduler that hands out a page still in use changes the tokens."""
    from drex_jax.kv.pages import PageAllocator

    real = PageAllocator.free

    def leaky_free(self, pages):  # also "frees" a page the caller keeps
        real(self, pages)
        if pages:
            self._free.append(pages[0] + 1 if pages[0] + 1 < self.num_pages else 1)

    monkeypatch.setattr(PageAllocator, "free", leaky_free)
    with pytest.raises(AssertionError):
        sc.preemption(False)


def test_scenarios_run_without_jax():
    code = ("import sys\nimport tests.sched_scenarios as sc\n"
            "sc.preemption(False); sc.preemption(True); sc.cancellation(True); sc.verify_rollback()\n"
            "sc.stop_strings_in_verify_mode()\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'flax'))\n"
            "print(bad[:5]); sys.exit(1 if bad else 0)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{r.stdout.strip()} {r.stderr[-800:]}"


# ---------------------------------------------------------------------------- detokenization
@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from drex_jax.default_model import default_model_path

    return AutoTokenizer.from_pretrained(os.path.join(default_model_path(), "tokenizer"))


class _CountingTokenizer:
    """Counts the token ids each decode call is given (the work incremental detokenization does)."""

    def __init__(self, tok):
        self.tok, self.decoded = tok, []

    def decode(self, ids, **kw):
        self.decoded.append(len(ids))
        return self.tok.decode(ids, **kw)


def _long_ids(tokenizer, n=4000):
    text = ("Incremental detokenization: caf\u00e9, na\u00efve, \u6f22\u5b57, emoji \U0001F680\U0001F600 and "
            "code `x = [i ** 2 for i in range(10)]`.\n")
    ids = []
    while len(ids) < n:
        ids += tokenizer(text).input_ids
    return ids[:n]


def test_incremental_text_equals_full_decode_and_cost_stays_flat(tokenizer):
    from drex_jax.sched.detokenize import IncrementalDetokenizer

    ids = _long_ids(tokenizer)
    counting = _CountingTokenizer(tokenizer)
    detok = IncrementalDetokenizer(counting)
    pieces, per_token, seconds = [], [], []
    for i, t in enumerate(ids):
        before, t0 = len(counting.decoded), time.perf_counter()
        delta, stopped = detok.add(t, final=i == len(ids) - 1)
        seconds.append(time.perf_counter() - t0)
        per_token.append(sum(counting.decoded[before:]))
        pieces.append(delta)
        assert not stopped
    assert "".join(pieces) == detok.text == tokenizer.decode(ids, skip_special_tokens=True)
    # cost per token does not grow with length: ids decoded per token stay a small window
    assert max(per_token) <= 16, max(per_token)
    assert sum(per_token[-500:]) <= 1.5 * sum(per_token[:500]) + 50
    # and in time (median, robust to a noisy machine): the last 500 tokens cost about the first 500
    first, last = sorted(seconds[:500])[250], sorted(seconds[-500:])[250]
    assert last < 3 * first + 1e-4, (first, last)
    # the old way decoded the whole output every token: ~n^2 / 2 ids
    assert sum(per_token) < len(ids) * 8 < len(ids) ** 2 / 2
    # the real (fast) tokenizer takes the direct Rust decode: the same text
    fast = IncrementalDetokenizer(tokenizer)
    assert fast._fast is not None
    assert "".join(fast.add(t, final=i == len(ids) - 1)[0] for i, t in enumerate(ids)) == detok.text


def test_stop_strings_and_split_characters(tokenizer):
    from drex_jax.sched.detokenize import IncrementalDetokenizer

    ids = tokenizer("Hello \U0001F680 world. STOP here").input_ids
    full = tokenizer.decode(ids, skip_special_tokens=True)
    detok = IncrementalDetokenizer(tokenizer, stop=("STOP",))
    out, stopped = [], False
    for t in ids:
        delta, stopped = detok.add(t)
        assert "\ufffd" not in delta  # a character split over tokens is held until complete
        out.append(delta)
        if stopped:
            break
    assert stopped and "".join(out) == detok.text == full[:full.index("STOP")]
    with pytest.raises(ValueError, match="stop string"):
        detok.add(ids[-1])
    # a stop string straddling two tokens' text, and a partial stop prefix held back until decided
    detok = IncrementalDetokenizer(tokenizer, stop=("d. ST",))
    emitted = "".join(detok.add(t)[0] for t in ids[:-2])
    assert detok.stopped and emitted == full[:full.index("d. ST")]


class _ByteTokenizer:
    """Token t < 256 is the byte t; 256 a special token that decodes to nothing; 1000 is b"b\\xf0"
    ("b" + the first byte of U+1F680) and 1001 the rest of that character, as byte-level BPE splits it."""

    MULTI = {1000: b"b\xf0", 1001: b"\x9f\x9a\x80"}

    def __init__(self):
        self.decoded = []

    def decode(self, ids, skip_special_tokens=True):
        self.decoded.append(len(ids))
        raw = b"".join(self.MULTI.get(t, bytes([t]) if t < 256 else b"") for t in ids)
        return raw.decode("utf-8", errors="replace")


def test_stop_string_found_while_a_character_is_incomplete():
    """The token that completes a stop string also starts a 4-byte character: the stop is found at
    once, as in a full decode (which reads "xab\\ufffd" and cuts before "ab"), not tokens later."""
    from drex_jax.sched.detokenize import IncrementalDetokenizer

    tok = _ByteTokenizer()
    d = IncrementalDetokenizer(tok, stop=("ab",))
    assert d.add(ord("x")) == ("x", False)
    assert d.add(ord("a")) == ("", False) and d.text == "xa"  # "a" may start the stop string: held back
    assert d.would_stop([1000]) and not d.would_stop([ord("c")])
    assert d.text == "xa" and d.ids == [ord("x"), ord("a")]  # a peek changes nothing
    assert d.add(1000) == ("", True) and d.text == "x"
    # without a stop string the character is held until complete, then emitted whole
    d = IncrementalDetokenizer(tok)
    assert [d.add(t) for t in (ord("x"), 1000, 1001)] == [("x", False), ("", False), ("b\U0001F680", False)]
    assert d.text == tok.decode([ord("x"), 1000, 1001])


def test_special_tokens_move_the_window_on():
    """A run of tokens that decode to nothing (special tokens under ignore_eos) keeps the work per
    token flat, and the text is unchanged by them."""
    from drex_jax.sched.detokenize import IncrementalDetokenizer

    tok = _ByteTokenizer()
    d = IncrementalDetokenizer(tok)
    d.add(ord("h"))
    before = len(tok.decoded)
    for _ in range(300):
        assert d.add(256) == ("", False)
    assert max(tok.decoded[before:]) <= 2 and d.text == "h"
    assert d.add(ord("i")) == ("i", False) and d.text == "hi"


def test_packing_follows_prompt_lengths():
    """Prefill rows take the cheapest width: a 150-token prompt goes in a 192-wide row, not 256; six
    of them pad 22 % (the power-of-two rule put each in a 256-wide row: 41 %); eight HumanEval-like
    prompts are all placed, each row holding what fits."""
    from drex_jax.kv.pages import row_bucket
    from drex_jax.sched.scheduler import packing

    assert packing([150], 512)[0] == 192
    W, rows = packing([150] * 6, 512)
    assert 1 - 900 / (row_bucket(len(rows)) * W) < 0.25, (W, rows)
    lengths = [98, 151, 194, 120, 133, 176, 162, 142]
    W, rows = packing(lengths, 512)
    assert sorted(j for r in rows for j in r) == list(range(8))
    assert all(sum(lengths[j] for j in r) <= W for r in rows) and W >= 194


def test_batch_buckets_follow_the_projection_cost():
    from drex_jax.kv.pages import batch_bucket, batch_buckets_upto

    assert [batch_bucket(n) for n in (1, 2, 3, 5, 9, 16, 17, 24, 25, 32, 33, 48, 49, 64)] == \
        [1, 2, 4, 8, 16, 16, 24, 24, 32, 32, 48, 48, 64, 64]
    assert batch_buckets_upto(32) == [1, 2, 4, 8, 16, 24, 32]
    assert batch_buckets_upto(64) == [1, 2, 4, 8, 16, 24, 32, 48, 64]
    assert batch_buckets_upto(20) == [1, 2, 4, 8, 16, 24]  # the bucket that holds 20 rows
