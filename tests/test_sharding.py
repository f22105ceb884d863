"""Runs tests/sharding_cases.py in a fresh process with 4 forced host CPU devices.

`--xla_force_host_platform_device_count` only works before JAX initialises, and this test
process keeps one device, so the tensor-parallel cases get their own interpreter.
"""
import os
import subprocess
import sys

import pytest


@pytest.mark.slow  # 112 s on 2 cores: run by .ci/run in its second (slow) pass
def test_tensor_parallel_cases_on_4_host_devices():
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") +
                                      " --xla_force_host_platform_device_count=4").strip())
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                          os.path.join(here, "sharding_cases.py")], cwd=os.path.dirname(here), env=env,
                         capture_output=True, text=True, timeout=1200)
    print(out.stdout[-3000:])
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    assert " passed" in out.stdout and "failed" not in out.stdout
