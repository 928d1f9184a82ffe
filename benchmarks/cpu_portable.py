"""CPU benchmark of the portable engine, side by side with rwkv6-keras-operator 1.0.5's own fallback.

    python benchmarks/cpu_portable.py [--rounds 2] [--skip-memory] [--json out.json]

For each backend (jax under jax.jit, torch eager, tensorflow under tf.function): fwd and fwd+bwd of this
package and of the old package (OPS_KERNEL=1: its Keras-ops while loop) at B=2, T=1024, H=4, N=64, float32.
Every measurement runs in its own process (both packages have the same import name); the two packages
alternate for --rounds rounds and the best median is kept, so load from other processes hurts both alike.
Then the long-sequence case: B=1, T=16384, H=32, N=64 float32 fwd+bwd, with the process's peak RSS.
The old package is fetched with `pip download rwkv6-keras-operator==1.0.5` into .bench-old/ on first use.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OLD_DIR = os.path.join(ROOT, ".bench-old")
BACKENDS = ("jax", "torch", "tensorflow")

WORKER = r'''
import json, os, resource, sys, time
import numpy as np
impl, B, T, H, N, reps, do_bwd = sys.argv[1], *map(int, sys.argv[2:8])
from rwkv6_keras_operator import RWKVKernelOperator
import keras
from keras import ops
backend = keras.backend.backend()
C = H * N
rng = np.random.default_rng(0)
r, k, v = (rng.standard_normal((B, T, C)).astype(np.float32) * 0.5 for _ in range(3))
w = (rng.standard_normal((B, T, C)) - 1).astype(np.float32)
u = (rng.standard_normal((H, N)) * 0.5).astype(np.float32)
dy = rng.standard_normal((B, T, C)).astype(np.float32)
op = RWKVKernelOperator(N, T)
args = [ops.convert_to_tensor(a) for a in (r, k, v, w, u)]
dy_t = ops.convert_to_tensor(dy)
fwd = lambda *a: op(*a)[0]
if backend == "jax":
    import jax
    f_fwd = jax.jit(fwd)
    # value_and_grad on every backend: the loss needs y, so the whole forward is timed, as in a training step
    f_bwd = jax.jit(jax.value_and_grad(lambda *a: (fwd(*a) * dy_t).sum(), argnums=(0, 1, 2, 3, 4)))
    sync = jax.block_until_ready
elif backend == "tensorflow":
    import tensorflow as tf
    f_fwd = tf.function(fwd)
    @tf.function
    def f_bwd(*a):
        with tf.GradientTape() as tape:
            tape.watch(a)
            loss = tf.reduce_sum(fwd(*a) * dy_t)
        return loss, tape.gradient(loss, a)
    sync = lambda x: [t.numpy() for t in tf.nest.flatten(x)]
else:
    import torch
    torch.set_grad_enabled(True)
    def f_fwd(*a):
        with torch.no_grad():
            return fwd(*a)
    def f_bwd(*a):
        a = [t.detach().requires_grad_(True) for t in a]
        loss = (fwd(*a) * dy_t).sum()
        return loss, torch.autograd.grad(loss, a)
    sync = lambda x: x
def timed(f):
    sync(f(*args))  # compile / warm up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter(); sync(f(*args)); times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)
out = {"impl": impl, "backend": backend, "B": B, "T": T, "H": H, "N": N}
out["fwd_ms"] = timed(f_fwd)
if do_bwd:
    try:
        out["fwd_bwd_ms"] = timed(f_bwd)
    except Exception as e:  # the old package cannot differentiate on some backends: record why
        out["fwd_bwd_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print("@@result " + json.dumps(out))
'''


def old_package():
    if not os.path.isdir(os.path.join(OLD_DIR, "rwkv6_keras_operator")):
        os.makedirs(OLD_DIR, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", OLD_DIR,
                        "rwkv6-keras-operator==1.0.5"], check=True)
        wheel = next(f for f in os.listdir(OLD_DIR) if f.endswith(".whl"))
        zipfile.ZipFile(os.path.join(OLD_DIR, wheel)).extractall(OLD_DIR)
    return OLD_DIR


def measure(impl, backend, shape, reps, bwd):
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
    if impl == "old":
        env.update(OPS_KERNEL="1", PYTHONPATH=old_package())
    else:
        env["PYTHONPATH"] = ROOT
    with tempfile.TemporaryDirectory() as cwd:  # neither package shadows the other through the cwd
        proc = subprocess.run([sys.executable, "-c", WORKER, impl, *map(str, shape), str(reps), str(int(bwd))],
                              env=env, cwd=cwd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("@@result "):
            return json.loads(line[len("@@result "):])
    return {"impl": impl, "backend": backend, "error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}


def best(a, b):
    if "error" in a:
        return b
    if "error" in b:
        return a
    merged = dict(a)
    for key in ("fwd_ms", "fwd_bwd_ms"):
        if key in a and key in b:
            merged[key] = min(a[key], b[key])
    return merged


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    shape = (2, 1024, 4, 64)
    results = []
    print(f"B,T,H,N = {shape}, float32; median of {args.reps} after warm-up, best of {args.rounds} rounds\n")
    print(f"{'backend':<11}{'old fwd':>10}{'ours fwd':>10}{'speed-up':>10}{'old f+b':>12}{'ours f+b':>10}")
    for backend in args.backends.split(","):
        got = {"old": {"error": "not run"}, "new": {"error": "not run"}}
        for _ in range(args.rounds):
            for impl in ("old", "new"):
                got[impl] = best(got[impl], measure(impl, backend, shape, args.reps, bwd=True))
        results += [got["old"], got["new"]]
        old, new = got["old"], got["new"]
        speed = old.get("fwd_ms", float("nan")) / new.get("fwd_ms", float("nan"))
        old_fb = f"{old['fwd_bwd_ms']:.1f}" if "fwd_bwd_ms" in old else "fails"
        print(f"{backend:<11}{old.get('fwd_ms', float('nan')):>10.1f}{new.get('fwd_ms', float('nan')):>10.2f}"
              f"{speed:>9.1f}x{old_fb:>12}{new.get('fwd_bwd_ms', float('nan')):>10.1f}")
        for impl in ("old", "new"):
            for key in ("error", "fwd_bwd_error"):
                if key in got[impl]:
                    print(f"    {impl} {key}: {got[impl][key]}")
    if not args.skip_memory:
        long_shape = (1, 16384, 32, 64)
        print(f"\nLong sequence, fwd+bwd, B,T,H,N = {long_shape}, float32 (this package):")
        for backend in args.backends.split(","):
            res = measure("new", backend, long_shape, 2, bwd=True)
            results.append(res)
            if "error" in res:
                print(f"  {backend:<11} error: {res['error']}")
            else:
                print(f"  {backend:<11} fwd {res['fwd_ms'] / 1e3:6.2f} s   fwd+bwd {res['fwd_bwd_ms'] / 1e3:6.2f} s"
                      f"   peak RSS {res['peak_rss_mb'] / 1024:5.1f} GB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
