"""Compile the engine's jitted steps for an NVIDIA GPU on a machine without one, and check what
the compiled programs do with the KV pool and the weights.

XLA's GPU compiler runs without a device when it is given the device's description
(`assets/gpu_targets/*.txtpb`, a `GpuTargetConfigProto`); jax exposes that as a compile-only
topology. Every argument is a `jax.ShapeDtypeStruct` (no weights are allocated), so a
Llama-3-8B-shaped model compiles on a laptop. The process needs jax's CUDA plugin and
`nvidia-cuda-nvcc` (ptxas), not a GPU or a driver: `scripts/gpu_compile_check.py` sets that up in
a side environment.

What each program is checked for (`check_program`):
- the pool is donated and aliased to the output (updated in place);
- no pool-sized or layer-sized copy (a `copy`, or a slice or fusion whose result is one layer of
  the pool or the whole pool other than the in-place update);
- no copy or fp32 upcast of a weight matrix;
- the Triton kernel is called once per layer where Pallas attention was asked for.
"""
from __future__ import annotations

import dataclasses
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

TARGETS_DIR = os.path.join(os.path.dirname(__file__), "assets", "gpu_targets")
MEASURE = "top1_minus_top2"


def target_config(name: str = "h100_sxm") -> str:
    path = os.path.join(TARGETS_DIR, f"{name}.txtpb")
    if not os.path.exists(path):
        have = sorted(f[:-6] for f in os.listdir(TARGETS_DIR) if f.endswith(".txtpb"))
        raise ValueError(f"no GPU target description {name!r}; shipped: {have}")
    with open(path) as f:
        return f.read()


def compile_only_device(target: str = "h100_sxm"):
    """A compile-only CUDA device described by `target` (needs the CUDA plugin, not a GPU)."""
    from jax.experimental import topologies

    try:
        topo = topologies.get_topology_desc(platform="cuda", target_config=target_config(target), topology="1x1x1")
    except (NotImplementedError, RuntimeError) as e:
        raise RuntimeError(f"jax cannot make a CUDA compile-only device here ({e}); install jax-cuda12-plugin "
                           "and nvidia-cuda-nvcc-cu12 matching this jax (scripts/gpu_compile_check.py --setup)") from e
    return topo.devices[0]


@dataclasses.dataclass(frozen=True)
class Shapes:
    """What the programs are compiled for: `batch` decode rows, contexts up to `max_seq_len`,
    pages of `page_size` (the pool holds 1 + batch * pages per sequence, as the engine's default),
    prefill of `prefill_rows` x `prefill_width`, chunks of `chunk` positions, verify of `draft`+1."""

    batch: int = 32
    max_seq_len: int = 2048
    page_size: int = 16
    prefill_rows: int = 8
    prefill_width: int = 384  # 8 x 384 tokens: no activation shares a weight matrix's shape
    chunk: int = 64
    draft: int = 3
    ramp_vocab: int = 1024

    @property
    def table_width(self) -> int:
        return -(-self.max_seq_len // self.page_size)

    @property
    def num_pages(self) -> int:
        return 1 + self.batch * self.table_width


def abstract_model(cfg, dtype, exit_layers: tuple[int, ...] = (), rank: int = 64):
    """(graph, state as ShapeDtypeStructs) of the model in the decode layout, with trained-ramp
    heads at `exit_layers` (shapes only: nothing is allocated)."""
    from drex_jax.model.modules import split_model
    from drex_jax.model.params import decode_layout, init_params

    box = {}

    def build():
        params = decode_layout(init_params(cfg, jax.random.key(0), dtype))
        heads = None
        if exit_layers:
            R, H = len(exit_layers), cfg.hidden_size
            heads = {"norm": jnp.ones((R, H), dtype), "down": jnp.zeros((R, H, rank), dtype),
                     "up": jnp.zeros((R, rank, H), dtype)}
        box["graph"], state = split_model(cfg, params, heads)
        return state

    state = jax.eval_shape(build)
    return box["graph"], state


def programs(cfg, dtype, shapes: Shapes, exit_layer: int):
    """[(name, jitted function, args, static kwargs, pallas layers expected)] for the engine's steps:
    packed prefill, its LM head, a prefill chunk, decode (pallas and xla), the shallow and deep
    early-exit segments, verify's deep pass over draft+1 positions, and both missing-KV fills."""
    from drex_jax.generation import SamplingParams
    from drex_jax.kv.pages import bucket
    from drex_jax.model.paged import decode_step, head_step, prefill_chunk_step, prefill_step
    from drex_jax.rebatch.steps import chunk_step, fill_copy, fill_propagate, segment_step

    L = cfg.num_layers
    graph, state = abstract_model(cfg, dtype)
    ee_graph, ee_state = abstract_model(cfg, dtype, (exit_layer,))
    B, P, N, ps = shapes.batch, shapes.table_width, shapes.num_pages, shapes.page_size
    pool = {n: jax.ShapeDtypeStruct((L, cfg.num_kv_heads, N, ps, cfg.head_dim), dtype) for n in ("k", "v")}
    i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)  # noqa: E731
    hid = lambda *s: jax.ShapeDtypeStruct(s + (cfg.hidden_size,), dtype)  # noqa: E731
    sampling = lambda n: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),  # noqa: E731
                                      SamplingParams.build([], n))
    R, W, C, T = shapes.prefill_rows, shapes.prefill_width, shapes.chunk, shapes.draft + 1
    Q = bucket(B)
    ring = jax.ShapeDtypeStruct((B, bucket(T), cfg.hidden_size), dtype)
    ramp_tokens = i32(shapes.ramp_vocab)
    seg = dict(graph=ee_graph, ramp=0, measure=MEASURE, do_sample=True)
    return [
        (f"prefill {R}x{W}", prefill_step, (state, pool, *[i32(R, W)] * 5, i32(Q)), dict(graph=graph), 0),
        (f"lm head {Q} rows", head_step, (state, hid(Q), sampling(Q)), dict(graph=graph, do_sample=True), 0),
        (f"prefill chunk {R}x{C}", prefill_chunk_step, (state, pool, i32(R, C), i32(R, C), i32(R, P)),
         dict(graph=graph, attention="xla"), 0),
        (f"decode {B} pallas", decode_step, (state, pool, i32(B), i32(B), i32(B, P), sampling(B)),
         dict(graph=graph, do_sample=True, attention="pallas"), L),
        (f"decode {B} xla", decode_step, (state, pool, i32(B), i32(B), i32(B, P), sampling(B)),
         dict(graph=graph, do_sample=True, attention="xla"), 0),
        (f"segment 0-{exit_layer} + ramp", segment_step,
         (ee_state, pool, hid(B), i32(B), i32(B), i32(B), i32(B, P), sampling(B), ramp_tokens),
         dict(seg, start=0, end=exit_layer, attention="pallas"), exit_layer),
        (f"segment {exit_layer}-{L} + head", segment_step,
         (ee_state, pool, hid(B), i32(B), i32(B), i32(B), i32(B, P), sampling(B), ramp_tokens),
         dict(seg, start=exit_layer, end=L, ramp=-1, attention="pallas"), L - exit_layer),
        (f"verify {exit_layer}-{L} x {T} positions", chunk_step,
         (ee_state, pool, ring, i32(B), i32(B, T), i32(B, T), i32(B, T), i32(B, P), sampling(B), ramp_tokens),
         dict(seg, start=exit_layer, end=L, ramp=-1, every_position=True, attention="xla"), 0),
        (f"fill copy from {exit_layer}", fill_copy, (state, pool, hid(B), i32(B), i32(B, P), i32(B)),
         dict(graph=graph, exit_layer=exit_layer), 0),
        (f"fill propagate from {exit_layer}", fill_propagate, (state, pool, hid(B), i32(B), i32(B, P), i32(B)),
         dict(graph=graph, exit_layer=exit_layer), 0),
    ]


def on_device(tree, device):
    """The same ShapeDtypeStructs, placed on `device` (what `jit` compiles for)."""
    from jax.sharding import SingleDeviceSharding

    sharding = SingleDeviceSharding(device)
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\w+)\[([\d,]*)\][^ ]* ([\w\-]+)\(")
_TUPLE = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = \((.*?)\) ([\w\-]+)\(")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")


def _computations(hlo: str) -> tuple[dict[str, list[str]], str | None]:
    """(computation name -> its instruction lines, the ENTRY computation's name)."""
    comps, name, entry = {}, None, None
    for line in hlo.splitlines():
        m = re.match(r"^(ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if m and not line.startswith(" "):
            name = m.group(2)
            comps[name] = []
            entry = name if m.group(1) else entry
        elif name is not None and line.startswith(" "):
            comps[name].append(line)
    return comps, entry


def _root_opcode(lines: list[str]) -> str:
    for line in lines:
        if line.lstrip().startswith("ROOT"):
            m = _INSTR.match(line) or _TUPLE.match(line)
            return m.groups()[-1] if m else ""
    return ""


def _squeezed(shape: str) -> str:
    """A shape's dims without leading 1s ("1,3,8" -> "3,8"): a layer sliced with or without its axis."""
    dims = shape.split(",")
    while len(dims) > 1 and dims[0] == "1":
        dims = dims[1:]
    return ",".join(dims)


IN_PLACE = ("scatter", "dynamic-update-slice", "custom-call")  # roots that update the pool where it lies
PASS_THROUGH = ("parameter", "get-tuple-element", "tuple", "bitcast", "custom-call", "scatter",
                "dynamic-update-slice")


def check_program(hlo: str, memory, pool_shape: tuple | None, dtype, weight_shapes: set, triton_calls: int) -> list[str]:
    """Problems found in one compiled program's HLO text and memory stats (empty: clean). Every
    computation that is not a fusion body is scanned (the entry, loop bodies, async and command-
    buffer computations), single results and tuple results."""
    problems = []
    pool_like = set()
    if pool_shape is not None:
        pool_bytes = 2 * int(np.prod(pool_shape)) * jnp.dtype(dtype).itemsize
        if memory.alias_size_in_bytes < pool_bytes:
            problems.append(f"the pool is not aliased in place ({memory.alias_size_in_bytes} of {pool_bytes} bytes)")
        pool_like = {_squeezed(",".join(map(str, pool_shape[1:]))), _squeezed(",".join(map(str, pool_shape)))}
    comps, _ = _computations(hlo)
    fused = {c for lines in comps.values() for line in lines if " fusion(" in line for c in _CALLS.findall(line)}
    dt = {"bfloat16": "bf16", "float32": "f32", "float16": "f16"}[jnp.dtype(dtype).name]
    weights = {",".join(map(str, s)) for s in weight_shapes} | {",".join(map(str, s[::-1])) for s in weight_shapes}
    for comp, lines in comps.items():
        if comp in fused:
            continue
        for line in lines:
            t = _TUPLE.match(line)
            if t:  # a tuple result: copy-start of a pool-sized buffer, a multi-output fusion
                name, types, op = t.groups()
                shapes = re.findall(r"\w+\[([\d,]*)\]", types)
                if op in ("copy-start", "copy") and any(_squeezed(x) in pool_like for x in shapes):
                    problems.append(f"{op} {name} ({types}): a copy of the pool or one of its layers")
                continue
            m = _INSTR.match(line)
            if not m:
                continue
            name, ty, shape, op = m.groups()
            if _squeezed(shape) in pool_like:
                if op in ("copy", "copy-start", "slice", "dynamic-slice"):
                    problems.append(f"{op} {name} {ty}[{shape}]: a copy of the pool or one of its layers")
                elif op == "fusion":
                    called = _CALLS.search(line)
                    root = _root_opcode(comps.get(called.group(1), [])) if called else ""
                    if root not in IN_PLACE:
                        problems.append(f"fusion {name} {ty}[{shape}] (root {root}): a copy of the pool or a layer")
            if shape in weights and op not in PASS_THROUGH:
                if ty == "f32" and dt != "f32":
                    problems.append(f"{op} {name} f32[{shape}]: a weight matrix upcast to fp32")
                elif ty == dt:
                    problems.append(f"{op} {name} {ty}[{shape}]: a copy of a weight matrix")
    found = len(re.findall(r'custom_call_target="__gpu\$xla\.gpu\.triton"', hlo))
    if triton_calls and found != triton_calls:
        problems.append(f"{found} Triton kernel calls, expected {triton_calls} (one per layer)")
    return problems


def weight_shapes(cfg, state) -> set:
    """The 2-D weight matrices' shapes in `state` (projections, LM head, embedding)."""
    shapes = set()
    for leaf in jax.tree.leaves(state):
        if len(leaf.shape) == 2 and min(leaf.shape) > 1 and max(leaf.shape) >= cfg.hidden_size:
            shapes.add(tuple(leaf.shape))
    return shapes


@dataclasses.dataclass
class Result:
    model: str
    program: str
    seconds: float
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    custom_calls: dict
    problems: list


def compile_all(model: str, cfg, dtype, shapes: Shapes, device, exit_layer: int | None = None, only=None,
                progress=print) -> list[Result]:
    """Compile every program of `programs` for `device` and check it."""
    exit_layer = exit_layer or cfg.num_layers // 2
    results = []
    for name, fn, args, static, triton in programs(cfg, dtype, shapes, exit_layer):
        if only and not any(o in name for o in only):
            continue
        t0 = time.perf_counter()
        compiled = fn.trace(*on_device(args, device), **static).lower().compile()
        seconds = time.perf_counter() - t0
        hlo = compiled.as_text()
        mem = compiled.memory_analysis()
        pool_shape = args[1]["k"].shape if isinstance(args[1], dict) else None  # the LM head takes no pool
        calls = {}
        for target in re.findall(r'custom_call_target="([^"]+)"', hlo):
            calls[target] = calls.get(target, 0) + 1
        problems = check_program(hlo, mem, pool_shape, dtype, weight_shapes(cfg, args[0]), triton)
        results.append(Result(model, name, seconds, mem.argument_size_in_bytes, mem.output_size_in_bytes,
                              mem.alias_size_in_bytes, mem.temp_size_in_bytes, calls, problems))
        if progress:
            r = results[-1]
            progress(f"  {model:10s} {name:32s} {seconds:6.1f} s  args {r.argument_bytes / 2**20:9.1f} MiB  "
                     f"out {r.output_bytes / 2**20:9.1f} MiB  aliased {r.alias_bytes / 2**20:9.1f} MiB  "
                     f"temp {r.temp_bytes / 2**20:7.1f} MiB  {'ok' if not problems else 'PROBLEMS'}")
            for p in problems:
                progress(f"      - {p}")
    return results
