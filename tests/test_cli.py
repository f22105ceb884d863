"""The CLI main job: generation with early exit on the bundled model, and clear errors."""
import pytest

from drex_jax.cli import main


def repeated_ngram_share(ids: list[int], n: int = 3) -> float:
    """Share of n-grams that repeat an earlier n-gram: ~1 for "and and and ...", low for prose."""
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    return 1 - len(set(grams)) / max(len(grams), 1)


@pytest.mark.slow  # three engines on the four default prompts (~55 s): run by .ci/run's second pass
def test_main_command_default_answers_are_not_degenerate(capsys, default_model):
    """The README's main job on a fresh install: bundled trained heads, early exit next to full depth."""
    import json

    from drex_jax.bench.quality import rouge_l
    from drex_jax.cli import DEFAULT_PROMPTS

    assert main(["generate", "--early-exit", "--json", "--max-new-tokens", "48"]) == 0
    captured = capsys.readouterr()
    assert "no trained exit heads" not in captured.err
    rows = json.loads(captured.out)
    assert [r["prompt"] for r in rows] == DEFAULT_PROMPTS
    depths = []
    for r in rows:
        ee, full, verify = r["rebatching (lossy)"], r["full depth"], r["verify (lossless)"]
        print(f"\n{r['prompt']}\n  EE:   {ee['text']!r}\n  full: {full['text']!r}")
        assert verify["token_ids"] == full["token_ids"]  # lossless early exit beside the lossy one
        assert repeated_ngram_share(ee["token_ids"]) <= max(0.25, repeated_ngram_share(full["token_ids"]) + 0.1)
        assert rouge_l([ee["text"]], [full["text"]]) >= 0.3  # same answer, possibly worded differently
        depths += ee["exit_layers"][1:]
    assert min(depths) < 30  # some tokens did leave early


def test_main_command_prints_the_comparison(capsys, default_model):
    assert main(["generate", "--early-exit", "--prompt", "What is 2 + 2?", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "### What is 2 + 2?" in out and "[rebatching (lossy)]" in out and "[        full depth]" in out
    assert "[ verify (lossless)]" in out and "identical to full depth: yes" in out
    assert "1 of 1 answers identical to full depth; decode speed" in out
    assert "vs full depth: prefix agreement" in out and "ROUGE-L" in out
    assert "| decode tok/s (compile excluded) |" in out and "| compile s (programs) |" in out
    assert "| vs full depth |" in out and "1.00x |" in out
    assert "rebatching (lossy): policy rebatching, trained heads, ramps [8, 15, 22]" in out
    assert "verify (lossless): policy rebatching, trained heads, ramps [22], thresholds [0.9]" in out


def test_generate_with_shared_head(capsys, default_model):
    rc = main(["generate", "--early-exit", "--head", "shared", "--prompt", "What is 2 + 2?", "--max-new-tokens", "6",
               "--max-slots", "2", "--max-seq-len", "128", "--no-compare"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "### What is 2 + 2?" in out and "[full depth]" not in out
    assert "rebatching (lossy): policy rebatching, shared heads, ramps [8, 15, 22], thresholds [0.9, 0.9, 0.9]" in out


def test_cli_reports_bad_input(capsys, default_model):
    rc = main(["generate", "--prompt", "hi", "--top-p", "1.5", "--max-slots", "1", "--max-seq-len", "64"])
    assert rc == 2
    assert "top_p must be in (0, 1], got 1.5" in capsys.readouterr().err


def test_plan(capsys):
    import json

    assert main(["plan", "--model", "llama2-7b", "--tp", "2", "--max-batch", "8", "--max-len", "4096",
                 "--memory-gib", "80", "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert p["kv_bytes_per_token_per_device"] == 256 * 2**10 and p["fits"] is True
    assert main(["plan", "--model", "llama3-8b", "--tp", "3"]) == 2
    assert "tp=3 must divide" in capsys.readouterr().err


def test_generate_verify_equals_full_depth(capsys, default_model):
    """`generate --early-exit --verify`: lossless early exit, so the JSON's early-exit tokens equal the
    full-depth ones; its default is the deepest trained ramp at 0.9 (the sweep's best)."""
    import json

    rc = main(["generate", "--early-exit", "--verify", "--json", "--prompt", "Name three colors.",
               "--prompt", "What is 2 + 2?", "--max-new-tokens", "16", "--max-slots", "2", "--max-seq-len", "128"])
    assert rc == 0
    rows = json.loads(capsys.readouterr().out)
    for r in rows:
        assert r["verify (lossless)"]["token_ids"] == r["full depth"]["token_ids"]
        assert "rebatching (lossy)" not in r  # --verify: the lossless run and full depth only
    assert main(["generate", "--early-exit", "--verify", "--missing-kv", "copy", "--prompt", "hi"]) == 2
    assert "--verify recomputes the skipped layers' K/V" in capsys.readouterr().err
