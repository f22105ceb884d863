"""The CLI main job: generation with early exit on the bundled model, and clear errors."""
from drex_jax.cli import main


def test_generate_with_early_exit(capsys, default_model):
    rc = main(["generate", "--early-exit", "--head", "shared", "--prompt", "What is 2 + 2?", "--max-new-tokens", "6",
               "--max-slots", "2", "--max-seq-len", "128"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "### What is 2 + 2?" in out
    assert "early exit (rebatching, shared heads, ramps [8, 15, 22])" in out


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
