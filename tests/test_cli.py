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


def test_generate_tensor_parallel_matches_one_device(capsys, default_model):
    """SmolLM2 has 3 KV heads: --tp 3 splits it over 3 of the 4 forced host devices."""
    import json

    args = ["generate", "--prompt", "Name a fruit.", "--max-new-tokens", "6", "--max-slots", "1",
            "--max-seq-len", "64", "--json"]
    assert main(args) == 0
    one = json.loads(capsys.readouterr().out)[0]["token_ids"]
    assert main(args + ["--tp", "3"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["token_ids"] == one
    assert main(args + ["--tp", "2"]) == 2
    assert "tp=2 does not divide the model's 3 KV heads" in capsys.readouterr().err


def test_plan(capsys):
    import json

    assert main(["plan", "--model", "llama2-7b", "--tp", "2", "--max-batch", "8", "--max-len", "4096",
                 "--memory-gib", "80", "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert p["kv_bytes_per_token_per_device"] == 256 * 2**10 and p["fits"] is True
    assert main(["plan", "--model", "llama3-8b", "--tp", "3"]) == 2
    assert "tp=3 must divide" in capsys.readouterr().err
