"""One process of the two-process tensor-parallel run in tests/test_multiprocess.py.

    python tests/multiprocess_worker.py COORDINATOR NUM_PROCESSES PROCESS_ID OUT_JSON

Each process sees 2 host CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=2, set by
the test); `jax.distributed.initialize` (through drex_jax.sharding.initialize_distributed) joins
them into one 4-device runtime whose CPU collectives run over gloo, and the tp=4 mesh spans both
processes. Every process runs the same program (multi-controller SPMD) and writes the token ids it
generated plus what it saw of the runtime to OUT_JSON.
"""
import json
import os
import sys

import jax

from drex_jax import Engine, GenerationConfig
from drex_jax.model.config import config_from_hf
from drex_jax.model.params import init_params

# shared with the test, which generates the single-process reference from the same definitions
PROMPTS = [[5, 17, 33, 2, 41, 8, 60], [71, 3, 3, 19], [88, 12, 45, 9, 27, 30, 66, 1, 14, 50, 7], [23]]
GEN = GenerationConfig(max_new_tokens=8, ignore_eos=True)  # greedy
ENGINE_KW = dict(max_slots=4, page_size=4, max_seq_len=64, attention="xla")


def tiny_model():
    """(cfg, params): a small random Llama (GQA 8:4, so tp=4 splits every head axis), the same
    deterministic params in every process."""
    cfg = config_from_hf(dict(
        architectures=["LlamaForCausalLM"], vocab_size=97, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=128,
        eos_token_id=None))
    return cfg, init_params(cfg, jax.random.key(0), scale=0.25)


def main(coordinator: str, num_processes: int, process_id: int, out: str) -> None:
    from drex_jax.sharding import initialize_distributed, make_mesh

    jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # before the backend starts
    initialize_distributed(coordinator, num_processes, process_id)
    mesh = make_mesh(tp=jax.device_count())
    cfg, params = tiny_model()
    eng = Engine.from_params(cfg, params, mesh=mesh, **ENGINE_KW)
    tokens = [r.token_ids for r in eng.generate(PROMPTS, GEN)]
    pool = eng.pool[0] if isinstance(eng.pool, (tuple, list)) else eng.pool
    pool = jax.tree.leaves(pool)[0]
    report = dict(
        tokens=tokens,
        process_index=jax.process_index(), process_count=jax.process_count(),
        device_count=jax.device_count(), local_device_count=jax.local_device_count(),
        mesh_shape=dict(mesh.shape), mesh_processes=sorted({d.process_index for d in mesh.devices.flat}),
        pool_fully_addressable=bool(pool.is_fully_addressable),
        pool_local_shards=len(pool.addressable_shards), attention=eng.attention,
        weights_split=sum(not (a.is_fully_replicated or a.is_fully_addressable) for a in jax.tree.leaves(eng.params)),
    )
    with open(out + ".tmp", "w") as f:
        json.dump(report, f)
    os.replace(out + ".tmp", out)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
