"""Distribution under jax: the original documentation's shard_map example, and jit on sharded inputs with no
shard_map written by the user (batch, heads, or both), each compared with the unsharded call.

On a machine with 2+ GPUs (the Pallas kernels compiled), from the repository root:
    eval "$(bash scripts/peers.sh env)" && python3 benchmarks/shard_jax.py
On CPU with virtual devices (the kernels in the Pallas interpreter; what the CI test runs, at SIZE=tiny):
    XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu RWKV6_PALLAS_INTERPRET=1 \
        python benchmarks/shard_jax.py
Env: SIZE (tiny | demo; default demo on GPU, tiny on CPU), OUT (where shard_jax.json goes; default /tmp),
PORTABLE=0 (on CPU, skip the same cases with the portable engine, which XLA partitions by itself).
Prints a table last; exit status 1 if a result differs from the unsharded call or a big input was gathered.

The checks per case: the engine that ran (read from the traced program: the Pallas kernels in it, or none), y, the
final state and (jit cases) the gradients of all six inputs against the same call on one device (relative L2
error; equal up to the order of the cross-device sum in du), and the collectives in the compiled program (an
all-gather would mean the kernels ran on gathered, not sharded, inputs).
"""
import json
import os
import re
import sys
import time
import warnings
from functools import partial

os.environ.setdefault("KERAS_BACKEND", "jax")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from rwkv6_keras_operator import RWKVKernelOperator  # noqa: E402
from rwkv6_keras_operator.engines import pallas  # noqa: E402
from rwkv6_keras_operator.reference import relative_error as rel  # noqa: E402

OUT = os.environ.get("OUT", "/tmp")
ON_GPU = jax.default_backend() == "gpu"
SIZE = os.environ.get("SIZE", "demo" if ON_GPU else "tiny")
RESULTS = {"date": time.strftime("%Y-%m-%d"), "jax": jax.__version__, "devices": [str(d) for d in jax.devices()],
           "size": SIZE, "cases": []}
T0 = time.time()


def log(msg):
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


def collectives(compiled_text):
    return {op: len(re.findall(rf"\b{op}(-start)?\(", compiled_text))
            for op in ("all-gather", "all-to-all", "collective-permute", "all-reduce", "reduce-scatter")}


def inputs(key, shape, scale=0.5, shift=0.0):
    return jax.random.normal(key, shape, jnp.float32) * scale + shift


# ---------------------------------------------------------------------------------------------------------------
def docs_example(n_dev):
    """The original package's README example, unchanged apart from device kind and size (jax.devices() instead of
    jax.devices('gpu'), which is the same list on a GPU machine). It keeps the original imports:
    jax.experimental.shard_map.shard_map (deprecated in jax 0.8, kept as a legacy API) with check_rep=False."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from jax.experimental.shard_map import shard_map

    batch_size, head_size, num_heads, seq_length = {"tiny": (2, 16, 2, 24), "demo": (24, 64, 32, 512)}[SIZE]
    hidden_size = head_size * num_heads
    mesh = Mesh(jax.devices(), axis_names=('device_axis',))
    num_devices = mesh.size
    device_p = P('device_axis')
    device_ns = NamedSharding(mesh, device_p)

    @partial(shard_map, mesh=mesh, in_specs=(device_p, device_p, device_p, device_p, device_p),
             out_specs=(device_p, device_p), check_rep=False)
    def call_kernel(r, k, v, w, u):
        if len(r.shape) == 4:
            r = jnp.squeeze(r, axis=0)
            k = jnp.squeeze(k, axis=0)
            v = jnp.squeeze(v, axis=0)
            w = jnp.squeeze(w, axis=0)
            u = jnp.squeeze(u, axis=0)
            y, ys = operator(r, k, v, w, u, with_state=True)
            y = jnp.expand_dims(y, axis=0)
            ys = jnp.expand_dims(ys, axis=0)
            return y, ys
        else:
            return operator(r, k, v, w, u, with_state=True)

    operator = RWKVKernelOperator(head_size=head_size, max_sequence_length=seq_length)
    shape = (num_devices, batch_size, seq_length, hidden_size)
    keys = jax.random.split(jax.random.PRNGKey(0), 5)
    inputs_r = jax.device_put(jax.random.normal(keys[0], shape), device_ns)
    inputs_k = jax.device_put(jax.random.normal(keys[1], shape), device_ns)
    inputs_v = jax.device_put(jax.random.normal(keys[2], shape), device_ns)
    inputs_w = jax.device_put(jax.random.normal(keys[3], shape), device_ns)
    inputs_u = jax.device_put(jax.random.normal(keys[4], (num_devices, hidden_size)), device_ns)

    results = {}
    for name, fn in (("eager", call_kernel),
                     ("jit", jax.jit(call_kernel, in_shardings=(device_ns,) * 5, out_shardings=(device_ns, device_ns)))):
        outputs_y, y_state = fn(inputs_r, inputs_k, inputs_v, inputs_w, inputs_u)
        results[name] = (outputs_y, y_state)
        log(f"docs example ({name}): {outputs_y.shape} {outputs_y.sharding.spec}, {y_state.shape} {y_state.sharding.spec}")
    # the unsharded reference: the operator on each device's slice, one after the other, on one device
    one = jax.devices()[0]
    ref_y, ref_s = [], []
    for i in range(num_devices):
        args = [jax.device_put(np.asarray(a[i]), one) for a in (inputs_r, inputs_k, inputs_v, inputs_w, inputs_u)]
        y, s = jax.jit(lambda *a: operator(*a, with_state=True))(*args)
        ref_y.append(np.asarray(y))
        ref_s.append(np.asarray(s))
    for name, (y, s) in results.items():
        RESULTS["cases"].append({
            "case": f"docs shard_map example ({name})",
            "engine": engine_ran(fn, inputs_r, inputs_k, inputs_v, inputs_w, inputs_u),
            "mesh": dict(mesh.shape), "y": rel(y, np.stack(ref_y)), "state": rel(s, np.stack(ref_s)),
            "y_spec": str(y.sharding.spec), "state_spec": str(s.sharding.spec)})


def engine_ran(fn, *args):
    """"pallas" if the program of fn(*args) runs the Pallas engine's kernels, else "portable"."""
    return "pallas" if re.search(r"\bname=wkv6_", str(jax.make_jaxpr(fn)(*args))) else "portable"


# ---------------------------------------------------------------------------------------------------------------
def sharded_jit(n_dev, case, mesh_shape, specs, engine_label):
    """jit on sharded inputs, no shard_map: y, state and gradients against the unsharded call."""
    B, T, H, N = {"tiny": (4, 24, 4, 16), "demo": (8, 1024, 32, 64)}[SIZE]
    C = H * N
    keys = jax.random.split(jax.random.PRNGKey(1), 8)
    host = {
        "r": inputs(keys[0], (B, T, C)), "k": inputs(keys[1], (B, T, C)), "v": inputs(keys[2], (B, T, C)),
        "w": inputs(keys[3], (B, T, C), 1.0, -1.0), "u": inputs(keys[4], (C,)),
        "init": inputs(keys[5], (B, H, N, N), 0.3),
    }
    dy = inputs(keys[6], (B, T, C), 1.0)
    op = RWKVKernelOperator(head_size=N, max_sequence_length=T)

    def forward(r, k, v, w, u, init):
        return op(r, k, v, w, u, with_state=True, init_state=init)

    def loss(r, k, v, w, u, init):
        y, s = forward(r, k, v, w, u, init)
        return jnp.sum(y * dy) + jnp.sum(s)

    grad = jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4, 5))   # (loss, grads): the loss keeps y's kernels timed
    one = jax.devices()[0]
    plain = {n: jax.device_put(a, one) for n, a in host.items()}
    order = ("r", "k", "v", "w", "u", "init")
    want_y, want_s = jax.jit(forward)(*(plain[n] for n in order))
    want_g = jax.jit(grad)(*(plain[n] for n in order))[1]

    devices = np.array(jax.devices()[: int(np.prod(mesh_shape))]).reshape(mesh_shape)
    mesh = Mesh(devices, ("data", "model")[: len(mesh_shape)])
    sharded = {n: jax.device_put(a, NamedSharding(mesh, specs[n])) for n, a in host.items()}
    args = [sharded[n] for n in order]
    fwd, bwd = jax.jit(forward), jax.jit(grad)
    y, s = fwd(*args)
    g = bwd(*args)[1]
    row = {"case": case, "variant": engine_label, "engine": engine_ran(fwd, *args),
           "grad_engine": engine_ran(bwd, *args), "mesh": dict(mesh.shape), "shape": [B, T, H, N],
           "y": rel(y, want_y), "state": rel(s, want_s),
           **{f"d{n}": rel(a, b) for n, a, b in zip(GRADS, g, want_g)},
           "y_spec": str(y.sharding.spec), "state_spec": str(s.sharding.spec),
           "forward_collectives": collectives(fwd.lower(*args).compile().as_text()),
           "grad_collectives": collectives(bwd.lower(*args).compile().as_text())}
    if ON_GPU:
        def timed(f, a):
            jax.block_until_ready(f(*a))
            t = time.perf_counter()
            for _ in range(10):
                out = f(*a)
            jax.block_until_ready(out)
            return (time.perf_counter() - t) / 10 * 1e3
        row["ms_fwd_sharded"] = timed(fwd, args)
        row["ms_fwd_one_device"] = timed(jax.jit(forward), [plain[n] for n in order])
        row["ms_grad_sharded"] = timed(bwd, args)
        row["ms_grad_one_device"] = timed(jax.jit(grad), [plain[n] for n in order])
    RESULTS["cases"].append(row)
    log(f"{case} [{engine_label}]: y {row['y']:.1e} state {row['state']:.1e} dr {row['dr']:.1e} "
        f"du {row['du']:.1e} gathers {row['forward_collectives']['all-gather']}/{row['grad_collectives']['all-gather']}")


GRADS = ("r", "k", "v", "w", "u", "init_state")
JIT_CASES = {
    # case: (mesh shape from device count, specs of r/k/v/w, u, init)
    "jit, batch sharded": (lambda n: (n,), P("data"), P(), P("data")),
    "jit, heads sharded": (lambda n: (1, n), P(None, None, "model"), P("model"), P(None, "model")),
    "jit, batch and heads sharded": (lambda n: (2, n // 2), P("data", None, "model"), P("model"), P("data", "model")),
}


def main():
    n_dev = jax.device_count()
    log(f"jax {jax.__version__}, {n_dev} devices ({jax.default_backend()}), size {SIZE}, "
        f"pallas available: {pallas.is_available()}")
    if n_dev < 2:
        sys.exit("needs 2+ devices (on CPU: XLA_FLAGS=--xla_force_host_platform_device_count=4)")
    docs_example(n_dev)
    variants = [("pallas", None)]
    if not ON_GPU and os.environ.get("PORTABLE", "1") == "1":
        # On CPU also the portable engine (keras ops, partitioned by XLA itself), for comparison.
        variants.append(("portable", lambda: False))
    for label, availability in variants:
        saved = pallas.is_available
        if availability is not None:
            pallas.is_available = availability
        try:
            for case, (mesh_of, x_spec, u_spec, s_spec) in JIT_CASES.items():
                mesh_shape = mesh_of(n_dev)
                if int(np.prod(mesh_shape)) > n_dev or min(mesh_shape) < 1 or (len(mesh_shape) == 2 and n_dev < 4
                                                                              and "batch and" in case):
                    continue
                sharded_jit(n_dev, case, mesh_shape,
                            {"r": x_spec, "k": x_spec, "v": x_spec, "w": x_spec, "u": u_spec, "init": s_spec}, label)
        finally:
            pallas.is_available = saved

    ok = True
    print("\n==== shard_jax", RESULTS["date"], "|", n_dev, "devices:", RESULTS["devices"][0], "...")
    print(f"{'case':38s} {'engine':9s} {'mesh':22s} {'y':>8s} {'state':>8s} {'grads':>8s} gathers")
    for row in RESULTS["cases"]:
        grads = max((row["d" + n] for n in GRADS if "d" + n in row), default=0.0)
        gathers = (row["forward_collectives"]["all-gather"] + row["grad_collectives"]["all-gather"]
                   if "forward_collectives" in row else 0)
        # Equal results everywhere; no gathered input for the Pallas engine (the portable engine is partitioned by
        # XLA itself, which gathers when heads are sharded: reported, not required).
        good = row["y"] <= 1e-6 and row["state"] <= 1e-6 and grads <= 1e-6 and (gathers == 0 or row["engine"] != "pallas")
        ok &= good
        print(f"{row['case']:38s} {row['engine']:9s} {str(row['mesh']):22s} {row['y']:8.1e} {row['state']:8.1e} "
              f"{grads:8.1e} {gathers:4d}  {'ok' if good else 'FAIL'}"
              + (f"  fwd {row['ms_fwd_sharded']:.2f} ms vs {row['ms_fwd_one_device']:.2f} ms on one device"
                 if "ms_fwd_sharded" in row else ""))
    RESULTS["ok"] = ok
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "shard_jax.json"), "w") as f:
        json.dump(RESULTS, f, indent=1)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
