"""Sequence parallelism under jax on virtual CPU devices: run by tests/distributed/test_jax.py in a subprocess (jax
fixes its device count at start), XLA_FLAGS=--xla_force_host_platform_device_count=4.

    python tests/distributed/jax_cases.py OUT.json SEED [ENGINE...]
    # ENGINE: portable, pallas (interpreter, T = 24: segments within a chunk), pallas-chunks (T = 192, chunks of
    # 16 tokens: every segment a whole number of chunks)

For each engine and mesh: the operator under jax.jit on inputs sharded along T (alone, with rows, with heads) against
the same call on unsharded inputs and the float64 oracle (y, final state, gradients of r, k, v, w, u, init_state),
the outputs' shardings, and every collective of the compiled forward and gradient programs with its shape. pallas:
also the gradient program under vmap, on unsharded inputs, against the plain call. 
pallas-chunks: the Pallas kernels (by name) that the compiled gradient program launches, sharded along T and along
the rows only, and those of the unwrapped engine's gradient program on one device (kernel_loops)."""
import json
import os
import re
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from rwkv6_keras_operator import RWKVKernelOperator, engines, reference  # noqa: E402
from tests.helpers import make_inputs  # noqa: E402

B, H, N = 2, 2, 16
T = 24          # T (and T_CHUNKS): a factor 3 that no exchanged pair's size has (the collectives check reads it)
T_CHUNKS, CHUNK = 192, 16   # pallas-chunks: segments of 48 and 96 tokens, whole numbers of 16-token chunks
MESHES = {  # name: (mesh shape, mesh axis names, spec of (B, T, C) inputs)
    "T over 4 devices": ((4,), ("seq",), P(None, "seq", None)),
    "rows over 2 x T over 2": ((2, 2), ("data", "seq"), P("data", "seq", None)),
    "heads over 2 x T over 2": ((2, 2), ("model", "seq"), P(None, "seq", "model")),
}
COLLECTIVE = re.compile(r"= (\w+)\[([\d,]*)\][^=]*? (all-gather|all-to-all|collective-permute|all-reduce|"
                        r"reduce-scatter)(?:-start)?\(")


def collectives(text):
    """[(op, shape)] of every collective in a compiled HLO text."""
    return [(op, [int(d) for d in dims.split(",") if d]) for _, dims, op in COLLECTIVE.findall(text)]


KERNEL_OP = re.compile(r'op_name="[^"]*?(wkv6_\w+)/while/body/[^/"]+"')


def kernel_loops(text):
    """{kernel name: launches} in a compiled HLO text of the Pallas engine in the interpreter, where each kernel is
    one while loop over its grid: the loops whose body's own instructions come from a kernel's grid loop (op_name
    ".../<kernel name>/while/body/<op>"), counted by kernel. XLA unrolls a grid of one or two programs, so this
    reads programs whose kernels have larger grids (pallas-chunks)."""
    bodies, current = {}, None
    for line in text.splitlines():
        head = re.match(r"(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if head and not line.startswith(" "):
            current = bodies[head.group(1)] = []
        elif current is not None:
            current.append(line)
    counts = {}
    for lines in bodies.values():
        for line in lines:
            loop = re.search(r" while\(.*body=%?([\w.\-]+)", line)
            if loop:
                for name in {m.group(1) for body in bodies.get(loop.group(1), []) for m in KERNEL_OP.finditer(body)}:
                    counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


def unwrapped_kernels(grads, args):
    """The kernels of the gradient program of the engine without the time-sharding wrapper, on one device."""
    from rwkv6_keras_operator.distributed import jax as distributed_jax

    jax.clear_caches()   # no trace of the wrapped engine reused
    distributed_jax.ENABLED = False
    try:
        return kernel_loops(jax.jit(grads).lower(*args).compile().as_text())
    finally:
        distributed_jax.ENABLED = True
        jax.clear_caches()


def run_engine(engine, seed):
    T_run, count_kernels = T, engine == "pallas-chunks"
    if engine.startswith("pallas"):
        from rwkv6_keras_operator.engines import pallas
        from rwkv6_keras_operator.engines.pallas import common
        from rwkv6_keras_operator.engines.pallas.settings import Settings

        common.FORCE_INTERPRET = True
        if engine == "pallas-chunks":
            T_run, pallas.SETTINGS = T_CHUNKS, Settings(chunk=CHUNK)
    else:
        engines.FORCE_PORTABLE = True
    chosen, select = set(), engines.select

    def recording(*args, **kwargs):   # the engine the operator picks while tracing
        engine = select(*args, **kwargs)
        chosen.add(engine.NAME)
        return engine

    engines.select = recording
    op = RWKVKernelOperator(N)
    x = make_inputs(B, T_run, H, N, seed, "masks", n_state=B)
    rng = np.random.default_rng(seed + 1)
    dy, dstate = rng.standard_normal((B, T_run, H * N)), rng.standard_normal((B, H, N, N))
    ref_y, ref_state = reference.wkv_reference(x["r"], x["k"], x["v"], x["w"], x["u"], N, x["init_state"])
    ref = reference.wkv_reference_grads(x["r"], x["k"], x["v"], x["w"], x["u"], N, dy, dstate, x["init_state"])
    ref = {"y": ref_y, "state": ref_state, **ref}

    def forward(r, k, v, w, u, s0):
        return op(r, k, v, w, u, with_state=True, init_state=s0)

    def grads(r, k, v, w, u, s0):
        (y, state), pullback = jax.vjp(forward, r, k, v, w, u, s0)
        return (y, state, *pullback((dy.astype(np.float32), dstate.astype(np.float32))))

    names = ("y", "state", "r", "k", "v", "w", "u", "init_state")
    args = [x[n] for n in ("r", "k", "v", "w", "u", "init_state")]
    one = [np.asarray(a) for a in jax.jit(grads)(*args)]
    rows = []
    if engine == "pallas":   # the wrapped engine under vmap (the vmapped axis folded into the rows)
        stacked = jax.jit(jax.vmap(grads))(*(np.stack([a, a]) for a in args))
        rows.append({"engine": engine, "mesh": "vmap of 2, unsharded",
                     "vs_unsharded": {n: max(reference.relative_error(np.asarray(g[i]), o) for i in (0, 1))
                                      for n, g, o in zip(names, stacked, one)}})
    meshes = dict(MESHES)
    if count_kernels:
        one_device = unwrapped_kernels(grads, args)
        meshes["rows over 2"] = ((2,), ("data",), P("data", None, None))
    for mesh_name, (shape, axis_names, spec) in meshes.items():
        mesh = Mesh(np.array(jax.devices()[:int(np.prod(shape))]).reshape(shape), axis_names)
        sharded = [jax.device_put(a, NamedSharding(mesh, spec)) for a in args[:4]]
        sharded += [jax.device_put(a, NamedSharding(mesh, P())) for a in args[4:]]
        fwd, grad = jax.jit(forward), jax.jit(grads)
        chosen.clear()
        got = grad(*sharded)
        y_fwd, _ = fwd(*sharded)
        row = {"engine": engine, "mesh": mesh_name, "T": T_run,
               "engines": sorted(chosen),
               "y_spec": str(got[0].sharding.spec), "y_forward_spec": str(y_fwd.sharding.spec),
               "forward_collectives": collectives(fwd.lower(*sharded).compile().as_text()),
               "grad_collectives": collectives(grad.lower(*sharded).compile().as_text()),
               "vs_unsharded": {n: reference.relative_error(g, o) for n, g, o in zip(names, got, one)},
               "vs_oracle": {n: reference.relative_error(g, ref[n]) for n, g in zip(names, got)}}
        if count_kernels:
            row["kernels"] = kernel_loops(grad.lower(*sharded).compile().as_text())
            row["kernels_one_device"] = one_device
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


if __name__ == "__main__":
    out, seed, which = sys.argv[1], int(sys.argv[2]), sys.argv[3:] or ["portable"]
    results = {"devices": len(jax.devices()), "rows": []}
    for name in which:
        results["rows"] += run_engine(name, seed)
    with open(out, "w") as f:
        json.dump(results, f)
