"""Tensor parallelism over a `jax.sharding.Mesh` with axes ("dp", "tp").

`tp` splits attention heads (Q/K/V columns, O rows), the MLP width and the KV pool's kv-head
axis, as each parameter's `ParamSpec.tp_axis` says; everything else is replicated. The jitted
steps are unchanged: they run on arrays placed with these `NamedSharding`s and XLA (GSPMD)
partitions them, inserting the all-reduces after the O and down projections. `dp` holds
independent replicas: `replica_meshes` cuts a ("dp", "tp") mesh into one tp-only mesh per
replica, each served by its own `Engine`.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from drex_jax.model.config import ModelConfig
from drex_jax.model.params import MATRICES, flatten, is_decode_layout, param_specs, unflatten

AXES = ("dp", "tp")


def make_mesh(tp: int = 1, dp: int = 1, devices=None) -> Mesh:
    """A ("dp", "tp") mesh over `devices` (default: all of `jax.devices()`, which must number
    exactly dp * tp)."""
    for name, v in (("tp", tp), ("dp", dp)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) != dp * tp:
        raise ValueError(f"a mesh of dp={dp} x tp={tp} needs {dp * tp} devices, but {len(devices)} are given "
                         f"({jax.device_count()} visible: {jax.devices()[0].platform}); pick dp * tp = "
                         f"{len(devices)} or pass devices=")
    return Mesh(np.asarray(devices).reshape(dp, tp), AXES)


def replica_meshes(mesh: Mesh) -> list[Mesh]:
    """One ("dp"=1, "tp") mesh per data-parallel replica."""
    check_mesh(mesh)
    return [Mesh(mesh.devices[i:i + 1], AXES) for i in range(mesh.shape["dp"])]


def check_mesh(mesh: Mesh, cfg: ModelConfig | None = None) -> None:
    if not isinstance(mesh, Mesh) or tuple(mesh.axis_names) != AXES:
        names = getattr(mesh, "axis_names", None)
        raise ValueError(f"mesh must be a jax.sharding.Mesh with axes {AXES} (see make_mesh), got axes {names!r}")
    if cfg is None:
        return
    tp = mesh.shape["tp"]
    for what, n in (("KV heads", cfg.num_kv_heads), ("attention heads", cfg.num_heads),
                    ("MLP width (intermediate_size)", cfg.intermediate_size)):
        if n % tp:
            raise ValueError(f"tp={tp} does not divide the model's {n} {what}; choose tp among "
                             f"{[d for d in range(1, cfg.num_kv_heads + 1) if tp_divides(cfg, d)]}")


def tp_divides(cfg: ModelConfig, tp: int) -> bool:
    """Whether tp splits the KV heads, attention heads and MLP width evenly."""
    return not (cfg.num_kv_heads % tp or cfg.num_heads % tp or cfg.intermediate_size % tp)


def param_shardings(cfg: ModelConfig, mesh: Mesh) -> dict:
    """Params-shaped pytree of NamedShardings, from the parameter specs."""
    out = {}
    for path, spec in param_specs(cfg).items():
        axes = [None] * len(spec.shape)
        if spec.tp_axis is not None:
            axes[spec.tp_axis] = "tp"
        out[path] = NamedSharding(mesh, P(*axes))
    return unflatten(out)


def pool_sharding(mesh: Mesh) -> NamedSharding:
    """KV pool [layers, kv_heads, pages, page_size, head_dim]: kv heads over tp."""
    return NamedSharding(mesh, P(None, "tp"))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def decode_shardings(cfg: ModelConfig, mesh: Mesh) -> dict:
    """The same placement for the decode layout (per-layer dicts, matrices transposed)."""
    out, layer = {}, {}
    for path, spec in param_specs(cfg).items():
        axes = [None] * len(spec.shape)
        if spec.tp_axis is not None:
            axes[spec.tp_axis] = "tp"
        if spec.stacked:
            axes = axes[1:]
            name = path.split("/", 1)[1]
            layer[name] = NamedSharding(mesh, P(*(axes[::-1] if name in MATRICES else axes)))
        else:
            out[path] = NamedSharding(mesh, P(*axes))
    return {**unflatten(out), "layers": tuple(dict(layer) for _ in range(cfg.num_layers))}


def shard_params(cfg: ModelConfig, params: dict, mesh: Mesh) -> dict:
    """Place params (either layout) on the mesh as their specs say."""
    check_mesh(mesh, cfg)
    if is_decode_layout(params):
        return jax.tree.map(jax.device_put, params, decode_shardings(cfg, mesh))
    shardings = flatten(param_shardings(cfg, mesh))
    return unflatten({k: jax.device_put(v, shardings[k]) for k, v in flatten(params).items()})


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """Multi-host entry point: call on every host before building a mesh, then
    `make_mesh(tp=..., dp=...)` spans the devices of all hosts. Arguments default to what
    `jax.distributed.initialize` detects (Slurm, Cloud TPU, or its environment variables)."""
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
