"""The peers on one GPU: accuracy against the float64 oracle, then speed, through each peer's own API.

    python3 benchmarks/peers/measure.py torch     # fla, the rwkv6_keras_operator found first, rwkv-ops (torch)
    python3 benchmarks/peers/measure.py jax       # the rwkv6_keras_operator found first, rwkv-ops (jax)
Run it with the peers' directory first on the path (scripts/peers.sh), one peer whose import name is
rwkv6_keras_operator or rwkv_ops a process: PYTHONPATH=$PEER_PYTHONPATH PEERS=fla python3 benchmarks/peers/measure.py
torch. With the repository first on the path instead, its `rwkv6_keras_operator` entry times this project through
its public operator. benchmarks/gpu_jax.py and gpu_torch.py run it that way, one peer a process;
benchmarks/peers/compare.py runs every peer and this project through their public APIs.
Env: PEERS (comma list of adapters.LOADERS names; default all of the framework's), SHAPES (comma list of names in
SHAPES), SKIP_ACC=1 (skip the accuracy part). One JSON line per measurement on stdout, also appended to
$OUT/peer_results.jsonl (OUT defaults to /tmp), then a summary. fla autotunes on first use of a shape: the first
run on a fresh machine spends minutes compiling.
"""
import importlib.util
import json
import os
import sys
import time
import traceback

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import adapters  # noqa: E402


def _load_oracle():
    """The repository's float64 oracle, loaded from its file: importing it through the package would import the
    rwkv6_keras_operator that comes first on the path, which here may be 1.0.5."""
    path = os.path.join(os.path.dirname(os.path.dirname(HERE)), "rwkv6_keras_operator", "reference.py")
    spec = importlib.util.spec_from_file_location("wkv_oracle", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


oracle = _load_oracle()
OUT = os.environ.get("OUT", "/tmp")
RESULTS = []
SHAPES = {   # name: (B, T, H, N)
    "train_8x4096_h32": (8, 4096, 32, 64),
    "fla_pr1045_8x1024_h8": (8, 1024, 8, 64),
    "long_1x16384_h32": (1, 16384, 32, 64),
}
DECODE = (64, 32, 64)   # B, H, N of the decode step "decode_64x1_h32" (T = 1, state in and out)
T_START = time.time()


def progress(msg):
    print(f"[{time.time() - T_START:7.1f}s] {msg}", file=sys.stderr, flush=True)


def emit(**record):
    RESULTS.append(record)
    print(json.dumps(record), flush=True)
    with open(os.path.join(OUT, "peer_results.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def wanted(framework):
    return os.environ.get("PEERS", ",".join(adapters.LOADERS[framework])).split(",")


def shapes():
    return [(name, SHAPES[name]) for name in os.environ.get("SHAPES", ",".join(SHAPES)).split(",") if name in SHAPES]


def small_inputs(seed=0, B=2, T=100, H=2, N=64, strong=False):
    """float32 inputs for the accuracy part; strong: decays down to exp(-50)."""
    rng = np.random.default_rng(seed)
    C = H * N
    r, k, v = (rng.standard_normal((B, T, C)).astype(np.float32) * 0.5 for _ in range(3))
    w = rng.standard_normal((B, T, C)).astype(np.float32) + (1.5 if strong else -1.0)
    u = (rng.standard_normal((C,)) * 0.5).astype(np.float32)
    s0 = (rng.standard_normal((B, H, N, N)) * 0.3).astype(np.float32)
    return r, k, v, w, u, s0


# -------------------------------------------------------------------------------------------------------- torch
def torch_accuracy(peers, dev):
    """Forward, gradients (no start state) and forward with a start state and the final state, per peer and
    dtype, as relative L2 errors against the oracle."""
    import torch

    for strong in (False, True):
        r, k, v, w, u, s0 = small_inputs(strong=strong)
        N = 64
        H = r.shape[2] // N
        y_ref, s_ref = oracle.wkv_reference(r, k, v, w, u, N, init_state=s0)
        y_ref0, _ = oracle.wkv_reference(r, k, v, w, u, N)
        dy = np.random.default_rng(5).standard_normal(r.shape).astype(np.float32)
        g_ref = oracle.wkv_reference_grads(r, k, v, w, u, N, dy)
        for name, fn in peers.items():
            for dt in (torch.float32, torch.bfloat16):
                try:
                    ts = [torch.tensor(a, device=dev, dtype=dt, requires_grad=True)
                          for a in (r, k, v, w, u.reshape(H, N))]
                    y, _ = fn(*ts, H, N)
                    y.backward(torch.tensor(dy, device=dev, dtype=y.dtype))
                    errs = {"y": rel(y.detach().float().cpu(), y_ref0)}
                    for gname, t in zip("rkvwu", ts):
                        want = g_ref[gname]
                        errs["d" + gname] = (rel(t.grad.float().cpu().reshape(want.shape), want)
                                             if t.grad is not None else None)
                    try:   # 1.0.5 takes the state in the inputs' dtype, the others in float32
                        state_dtype = dt if name == "rwkv6_keras_operator" else torch.float32
                        y2, s2 = fn(*[t.detach() for t in ts], H, N,
                                    s0=torch.tensor(s0, device=dev, dtype=state_dtype), want_state=True)
                        errs["y_with_s0"] = rel(y2.float().cpu(), y_ref)
                        errs["state"] = rel(s2.float().cpu(), s_ref)
                    except Exception as e:  # noqa: BLE001
                        errs["state_err"] = repr(e)[:200]
                    emit(kind="accuracy", peer=name, dtype=str(dt), strong_decay=strong, **errs)
                except Exception as e:  # noqa: BLE001
                    emit(kind="accuracy", peer=name, dtype=str(dt), strong_decay=strong, err=repr(e)[:300])


def torch_speed(peers, dev):
    import torch
    import triton

    for shape_name, (B, T, H, N) in shapes():
        C = H * N
        g = torch.Generator(device=dev).manual_seed(0)

        def mk(scale=0.5, shift=0.0):
            return (torch.randn(B, T, C, device=dev, generator=g) * scale + shift).to(torch.bfloat16)

        r, k, v = mk(), mk(), mk()
        w = mk(1.0, -1.0)
        # u as (H, N): 1.0.5 takes (C,) forward but its backward fails on it
        u = (torch.randn(C, device=dev, generator=g) * 0.5).to(torch.bfloat16).view(H, N)
        dy = torch.randn(B, T, C, device=dev, generator=g).to(torch.bfloat16)
        for name, fn in peers.items():
            try:
                progress(f"{name} {shape_name} fwd")
                ms_f = triton.testing.do_bench(lambda: fn(r, k, v, w, u, H, N), warmup=25, rep=100,
                                               return_mode="median")
                progress(f"{name} {shape_name} fwd+bwd")
                ts = [t.clone().requires_grad_(True) for t in (r, k, v, w, u)]

                def fwd_bwd():
                    y, _ = fn(*ts, H, N)
                    y.backward(dy)

                ms_fb = triton.testing.do_bench(fwd_bwd, warmup=10, rep=100, grad_to_none=ts, return_mode="median")
                emit(kind="speed", peer=name, shape=shape_name, B=B, T=T, H=H, N=N, dtype="bf16",
                     fwd_ms=ms_f, fwd_bwd_ms=ms_fb)
            except Exception as e:  # noqa: BLE001
                emit(kind="speed", peer=name, shape=shape_name, err=repr(e)[:300])
            torch.cuda.empty_cache()

    B, H, N = DECODE
    C = H * N
    r, k, v = (torch.randn(B, 1, C, device=dev).to(torch.bfloat16) for _ in range(3))
    w = torch.randn(B, 1, C, device=dev).to(torch.bfloat16) - 1
    u = torch.randn(C, device=dev).to(torch.bfloat16).view(H, N)
    for name, fn in peers.items():
        try:
            progress(f"{name} decode")
            s0 = torch.randn(B, H, N, N, device=dev,
                             dtype=torch.bfloat16 if name == "rwkv6_keras_operator" else torch.float32)
            ms = triton.testing.do_bench(lambda: fn(r, k, v, w, u, H, N, s0=s0, want_state=True),
                                         warmup=25, rep=100, return_mode="median")
            emit(kind="speed", peer=name, shape="decode_64x1_h32", fwd_ms=ms)
        except Exception as e:  # noqa: BLE001
            emit(kind="speed", peer=name, shape="decode_64x1_h32", err=repr(e)[:300])


def bench_torch():
    import torch
    import triton

    dev = "cuda"
    os.environ["KERAS_BACKEND"] = "torch"
    emit(kind="env", torch=torch.__version__, triton=triton.__version__,
         gpu=torch.cuda.get_device_name(), cap=list(torch.cuda.get_device_capability()))
    x = torch.empty(2 ** 30, dtype=torch.uint8, device=dev)   # the ceiling: a device-to-device copy
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=25, rep=200, return_mode="median")
    emit(kind="ceiling", what="d2d_copy_GBps", value=2 * x.numel() / ms / 1e6)
    del x, y
    peers = adapters.load("torch", wanted("torch"), emit)
    if not os.environ.get("SKIP_ACC"):
        torch_accuracy(peers, dev)
    torch_speed(peers, dev)


# ---------------------------------------------------------------------------------------------------------- jax
def bench_jax():
    import jax
    import jax.numpy as jnp

    emit(kind="env", jax=jax.__version__, devices=str(jax.devices()))

    def timeit(f, *a, n=30):
        """Median ms of n individually synchronised calls, after one warm-up call."""
        jax.block_until_ready(f(*a))
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            jax.block_until_ready(f(*a))
            times.append(time.perf_counter() - t0)
        return float(np.median(times) * 1e3)

    peers = adapters.load("jax", wanted("jax"), emit)
    if not os.environ.get("SKIP_ACC"):
        r, k, v, w, u, _ = small_inputs()
        N = 64
        y_ref, _ = oracle.wkv_reference(r, k, v, w, u, N)
        u = u.reshape(-1, N)
        for name, fn in peers.items():
            for dt in (jnp.float32, jnp.bfloat16):
                try:
                    progress(f"jax acc {name} {dt}")
                    y = fn(*(jnp.asarray(a, dtype=dt) for a in (r, k, v, w, u)))
                    emit(kind="accuracy", peer=name, backend="jax", dtype=str(dt),
                         y=rel(np.asarray(y, np.float32), y_ref))
                except Exception as e:  # noqa: BLE001
                    emit(kind="accuracy", peer=name, backend="jax", dtype=str(dt), err=repr(e)[:300])

    for shape_name, (B, T, H, N) in shapes():
        C = H * N
        ks = jax.random.split(jax.random.PRNGKey(0), 6)
        r, k, v = (jax.random.normal(ks[i], (B, T, C)).astype(jnp.bfloat16) * 0.5 for i in range(3))
        w = (jax.random.normal(ks[3], (B, T, C)) - 1).astype(jnp.bfloat16)
        u = (jax.random.normal(ks[4], (H, N)) * 0.5).astype(jnp.bfloat16)
        for name, fn in peers.items():
            try:
                progress(f"jax {name} {shape_name}")
                ms_f = timeit(jax.jit(fn), r, k, v, w, u)

                def loss(r, k, v, w, u, fn=fn):
                    return jnp.sum(fn(r, k, v, w, u).astype(jnp.float32))

                try:
                    # value_and_grad: the loss needs the forward's y, which jax.grad alone would let XLA drop
                    ms_fb = timeit(jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4))), r, k, v, w, u)
                except Exception as e:  # noqa: BLE001
                    ms_fb = None
                    emit(kind="error", peer=name, what="jax grad", err=repr(e)[:300])
                emit(kind="speed", peer=name, backend="jax", shape=shape_name, fwd_ms=ms_f, fwd_bwd_ms=ms_fb)
            except Exception as e:  # noqa: BLE001
                emit(kind="speed", peer=name, backend="jax", shape=shape_name, err=repr(e)[:300])


if __name__ == "__main__":
    for part in sys.argv[1:] or ["torch"]:
        try:
            {"torch": bench_torch, "jax": bench_jax}[part]()
        except Exception as e:  # noqa: BLE001
            emit(kind="fatal", part=part, err=repr(e)[:400], tb=traceback.format_exc()[-1500:])
    print("\n==== summary")
    for record in RESULTS:
        if record.get("kind") in ("speed", "accuracy", "ceiling", "build", "error", "fatal"):
            print({k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in record.items() if k != "tb"})
