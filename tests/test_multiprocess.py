"""Two processes, one mesh: tp=4 generation over 2 processes x 2 host CPU devices.

Starts two interpreters on 127.0.0.1 (tests/multiprocess_worker.py), each forced to 2 host CPU
devices; `jax.distributed.initialize` joins them into one 4-device runtime with gloo CPU
collectives, and each runs the same tp=4 greedy generation (multi-controller SPMD). Both processes'
tokens must equal this process's single-device result for the same model and prompts. Bounded in
time; the workers are killed in `finally`, also when the test fails.
"""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from drex_jax import Engine
from tests.multiprocess_worker import ENGINE_KW, GEN, PROMPTS, tiny_model

NUM_PROCESSES = 2
TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: str, n: int = 3000) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-n:]
    except OSError:
        return "(no log)"


@pytest.mark.slow  # 10-20 s of process start-up; `.ci/run` runs it in its slow pass
def test_two_processes_tp4_equal_single_process(tmp_path):
    here = os.path.dirname(os.path.abspath(__file__))
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                     if not f.startswith("--xla_force_host_platform_device_count"))
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=(flags + " --xla_force_host_platform_device_count=2").strip())
    coordinator = f"127.0.0.1:{_free_port()}"
    outs = [str(tmp_path / f"tokens{i}.json") for i in range(NUM_PROCESSES)]
    logs = [str(tmp_path / f"worker{i}.log") for i in range(NUM_PROCESSES)]
    procs = []
    deadline = time.monotonic() + TIMEOUT_S
    try:
        for i in range(NUM_PROCESSES):
            with open(logs[i], "w") as log:
                procs.append(subprocess.Popen(
                    [sys.executable, os.path.join(here, "multiprocess_worker.py"), coordinator,
                     str(NUM_PROCESSES), str(i), outs[i]],
                    cwd=os.path.dirname(here), env=env, stdout=log, stderr=subprocess.STDOUT))

        # the independent reference, computed while the workers start: one process, one device
        cfg, params = tiny_model()
        want = [r.token_ids for r in Engine.from_params(cfg, params, **ENGINE_KW).generate(PROMPTS, GEN)]
        assert all(len(t) == GEN.max_new_tokens for t in want)
        assert len({tuple(t) for t in want}) == len(PROMPTS), want  # distinct outputs: a real comparison

        for i, p in enumerate(procs):
            try:
                rc = p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise AssertionError(f"worker {i} still running after {TIMEOUT_S} s:\n" + _tail(logs[i])) from None
            assert rc == 0, f"worker {i} exited with {rc}:\n" + _tail(logs[i])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()

    for i, path in enumerate(outs):
        with open(path) as f:
            got = json.load(f)
        # the run spanned both processes: 4 global devices, 2 local, KV pool and weights split across them
        assert got["process_index"] == i and got["process_count"] == NUM_PROCESSES, got
        assert got["device_count"] == 4 and got["local_device_count"] == 2, got
        assert got["mesh_shape"] == {"dp": 1, "tp": 4} and got["mesh_processes"] == [0, 1], got
        assert not got["pool_fully_addressable"] and got["pool_local_shards"] == 2, got
        assert got["weights_split"] > 0 and got["attention"] == "xla", got
        assert got["tokens"] == want, f"process {i}: tp=4 over 2 processes {got['tokens']} != one device {want}"
