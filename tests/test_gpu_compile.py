"""The GPU compile check (scripts/gpu_compile_check.py) on this CPU machine: the decode step with
Pallas attention and a K/V fill, compiled by XLA's GPU compiler for an H100 description. Needs jax's
CUDA plugin and ptxas wheels beside the project's venv (`--setup` installs them, ~200 MB download);
skipped with the reason where they cannot be had."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_compile_check.py")


@pytest.mark.slow  # run by .ci/run in its second (slow) pass
def test_steps_compile_for_an_h100_without_pool_or_weight_copies(tmp_path):
    plugin = os.path.join(ROOT, ".gpu-compile-plugin", "jax_plugins")
    if not os.path.isdir(plugin):
        setup = subprocess.run([sys.executable, SCRIPT, "--setup", "--only", "none"], capture_output=True, text=True)
        if not os.path.isdir(plugin):
            pytest.skip(f"jax's CUDA plugin could not be installed beside the venv: {setup.stderr[-500:]}")
    out = tmp_path / "programs.json"
    res = subprocess.run([sys.executable, SCRIPT, "--models", "smollm2-135m", "--only", "decode 32 pallas",
                          "fill copy", "--json", str(out)], capture_output=True, text=True, timeout=900)
    print(res.stdout[-3000:])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    import json

    programs = {p["program"]: p for p in json.loads(out.read_text())}
    assert set(programs) == {"decode 32 pallas", "fill copy from 15"}
    decode = programs["decode 32 pallas"]
    assert decode["custom_calls"].get("__gpu$xla.gpu.triton") == 30  # the kernel, once per layer
    layer_bytes = 3 * (1 + 32 * 128) * 16 * 64 * 2  # one layer of the K pool in bf16
    assert decode["alias_bytes"] >= 2 * 30 * layer_bytes and decode["temp_bytes"] < layer_bytes
    assert not decode["problems"] and not programs["fill copy from 15"]["problems"]
