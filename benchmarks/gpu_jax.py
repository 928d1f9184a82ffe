"""The Pallas engine on one GPU: correctness against the float64 oracle, then speed, with the peers measured in
the same run (rwkv-ops 0.11.3's JAX CUDA kernel, and fla 0.6.0 chunk_rwkv6 from torch), each in its own process.

On the GPU machine, from the repository root (the peers installed by scripts/peers.sh; `bash scripts/gpu.sh bench`
runs this with its environment):
    eval "$(bash scripts/peers.sh env)" && python3 benchmarks/gpu_jax.py
    PEERS= SHAPES=train VARIANTS= python3 benchmarks/gpu_jax.py        # ours only, one shape, default config
Env: SHAPES (train, long, decode; comma list), PEERS (triton = this project's torch engine via
     benchmarks/gpu_torch.py, rwkv_ops, fla; comma list, empty for none; default all three),
     VARIANTS (comma list of names in VARIANT_CONFIGS, timed at the training shape; default DEFAULT_VARIANTS,
     empty for none),
     KERNELS=0 (skip the per-kernel breakdown), TRITON_VARIANTS=1 (the Triton peer times its kernels' variants), SKIP_CHECK=1, PEER_TIMEOUT (s, default 420),
     BUDGET (s for the whole script: peers are cut to it, variants skipped past it; they run last),
     SMOKE=1 (tiny shapes: a dry run of the script on CPU with RWKV6_PALLAS_INTERPRET=1).
Writes $OUT/gpu_jax.json (OUT defaults to /tmp) and prints a table last. bf16 inputs, u float32, random data;
times are medians of individually synchronised calls (as benchmarks/peers/measure.py times rwkv-ops), and for
decode the mean over 200 back-to-back calls (a single call is shorter than a host round trip).
"""
import dataclasses
import functools
import json
import os
import subprocess
import sys
import time
import traceback

os.environ.setdefault("KERAS_BACKEND", "jax")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from rwkv6_keras_operator import RWKVKernelOperator, engines  # noqa: E402
from rwkv6_keras_operator.engines import pallas  # noqa: E402
from rwkv6_keras_operator.engines.pallas import backward, binding, forward, scan  # noqa: E402
from rwkv6_keras_operator.engines.pallas.settings import Settings  # noqa: E402
from rwkv6_keras_operator.reference import relative_error as rel  # noqa: E402
from rwkv6_keras_operator.reference import wkv_reference, wkv_reference_grads  # noqa: E402

OUT = os.environ.get("OUT", "/tmp")
SHAPES = {"train": (8, 4096, 32, 64), "long": (1, 16384, 32, 64), "decode": (64, 1, 32, 64)}
if os.environ.get("SMOKE") == "1":   # a dry run of this script on CPU (RWKV6_PALLAS_INTERPRET=1), tiny shapes
    SHAPES = {"train": (1, 64, 2, 32), "long": (1, 128, 1, 32), "decode": (4, 1, 2, 32)}
PEER_SHAPES = {"train": "train_8x4096_h32", "long": "long_1x16384_h32", "decode": "decode_64x1_h32"}
DEFAULTS = dataclasses.asdict(Settings())
# Configurations timed at the training shape (fwd and fwd+bwd); each changes the defaults above (fields of Settings;
# "shape": another shape to time at).
VARIANT_CONFIGS = {
    "default": {},
    "tf32-products": {"low_precision": "tf32"},           # 16-bit inputs' products before the H200 sweep
    "warps8": {"forward_warps": 8, "backward_warps": 8},
    "scan16": {"scan_terms_block": 16, "scan_terms_warps": 2},
    "chunk16": {"chunk": 16},
    "chunk64": {"chunk": 64},
    # the scan over chunks: state terms built in parallel then scanned, or built as the scan goes (scan.launch_scan)
    "terms-then-scan": {"state_scan_min_programs": 1 << 30},
    "terms-then-scan-long": {"state_scan_min_programs": 1 << 30, "shape": "long"},
    "fused-k32-v64": {"state_scan_keys": 32, "state_scan_block": 64},   # key blocks: each program its own decays
    "fused-k32-v32": {"state_scan_keys": 32, "state_scan_block": 32},
    "output-stages1": {"forward_stages": 1},
    "output-stages3": {"forward_stages": 3},
    "output-warps8": {"forward_warps": 8},
    "fused-long": {"state_scan_min_programs": 0, "shape": "long"},
    "fused-long-keys16": {"state_scan_min_programs": 0, "state_scan_keys": 16, "shape": "long"},
    "fused-long-k16-v32": {"state_scan_min_programs": 0, "state_scan_keys": 16, "state_scan_block": 32,
                           "shape": "long"},
    "fused-long-k16-v16": {"state_scan_min_programs": 0, "state_scan_keys": 16, "state_scan_block": 16,
                           "shape": "long"},
    "fused-long-k16-s3": {"state_scan_min_programs": 0, "state_scan_keys": 16, "state_scan_stages": 3,
                          "shape": "long"},
    "fused-long-k16-s1": {"state_scan_min_programs": 0, "state_scan_keys": 16, "state_scan_stages": 1,
                          "shape": "long"},
    "fused-s3": {"state_scan_stages": 3},
    "long-scan16": {"scan_terms_block": 16, "scan_terms_warps": 2, "shape": "long"},   # more programs, plain scan
    "long-scan8": {"scan_terms_block": 8, "scan_terms_warps": 1, "shape": "long"},
    # the chunk kernels' level masks loaded from the level table (masks.level_table) instead of built
    "mask-table": {"mask_table": True},
    "mask-table-long": {"mask_table": True, "shape": "long"},
    # the step kernel's launch geometry (decode): benchmarks/serving.py --variants (recurrent.STEP)
}
DEFAULT_VARIANTS = "mask-table,mask-table-long"
RESULTS = {"date": time.strftime("%Y-%m-%d"), "check": [], "ours": {}, "variants": {}, "kernels": {}, "peers": {},
           "errors": []}
T0 = time.time()


def left():
    """Seconds left of BUDGET (env, seconds for the whole script; unlimited by default)."""
    return T0 + float(os.environ.get("BUDGET", "1e9")) - time.time()


def log(msg):
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


def configure(cfg):
    """The settings of the engine's calls through the operator: Settings() with the fields in cfg ("shape" aside).
    Every timing jits afresh; the programs jax and the engine cached under the previous settings are dropped."""
    jax.clear_caches()
    for cached in (binding.forward_op, binding.backward_op, binding.decode_op):
        cached.cache_clear()
    pallas.SETTINGS = Settings(**{key: value for key, value in cfg.items() if key != "shape"})


def timeit(f, *args, n=20):
    """Median ms of n individually synchronised calls, after two warm-up calls (compilation)."""
    jax.block_until_ready(f(*args))
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(n):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1e3)


def timeit_stream(f, *args, n=200):
    """Mean ms over n back-to-back calls (one synchronisation): for calls shorter than a host round trip."""
    jax.block_until_ready(f(*args))
    t = time.perf_counter()
    for _ in range(n):
        out = f(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / n * 1e3


def guarded(what):
    def wrap(fn):
        def run(*a, **k):
            try:
                return fn(*a, **k)
            except Exception as e:  # noqa: BLE001  (one failing part must not lose the others' numbers)
                RESULTS["errors"].append({"what": what, "err": repr(e)[:600], "tb": traceback.format_exc()[-2500:]})
                log(f"FAILED {what}: {e!r}"[:800])
        return run
    return wrap


# ------------------------------------------------------------------------------------------------- correctness
@guarded("check")
def check(dtypes=("float32", "bfloat16", "float16"), tag="default"):
    """Fresh random inputs each run; masks (decay exactly 0 and 1) sprinkled in; fp32, bf16, fp16."""
    seed = int(time.time()) % 100000
    B, T, H, N = 2, 300, 2, 64
    C = H * N
    op = RWKVKernelOperator(N, T)
    for decay in ("normal", "strong"):
        rng = np.random.default_rng(seed)
        r, k, v = (rng.standard_normal((B, T, C)).astype(np.float32) * 0.5 for _ in range(3))
        w = (rng.standard_normal((B, T, C)) - 1 if decay == "normal" else rng.uniform(-3, 4.5, (B, T, C)))
        w[rng.random(w.shape) < 0.1] = -1e9
        w[rng.random(w.shape) < 0.03] = 100.0
        w = w.astype(np.float32)
        u = (rng.standard_normal((H, N)) * 0.5).astype(np.float32)
        s0 = (rng.standard_normal((B, H, N, N)) * 0.3).astype(np.float32)
        dy = rng.standard_normal((B, T, C)).astype(np.float32)
        ds = rng.standard_normal((B, H, N, N)).astype(np.float32)
        for dtype in dtypes:
            tol_out, tol_grad = (1e-5, 1e-4) if dtype == "float32" else (1e-2, 1e-2)
            xs = [jnp.asarray(a).astype(dtype) for a in (r, k, v, w)]
            seen = [np.asarray(a.astype(jnp.float32)) for a in xs]
            dy_t = jnp.asarray(dy).astype(dtype)
            assert engines.select(xs[0], N, False) is pallas

            def f(r, k, v, w, u, s0):
                return op(r, k, v, w, u, with_state=True, init_state=s0)

            (y, s), pullback = jax.vjp(jax.jit(f), *xs, jnp.asarray(u), jnp.asarray(s0))
            g = pullback((dy_t, jnp.asarray(ds)))
            y_ref, s_ref = wkv_reference(*seen, u, N, s0)
            g_ref = wkv_reference_grads(*seen, u, N, np.asarray(dy_t.astype(jnp.float32)), ds, s0)
            errs = {"y": rel(np.asarray(y, np.float32), y_ref), "state": rel(s, s_ref)}
            for name, gi in zip(["r", "k", "v", "w", "u", "init_state"], g):
                errs["d" + name] = rel(np.asarray(gi, np.float32), g_ref[name])
            ok = all(e <= (tol_out if n in ("y", "state") else tol_grad) for n, e in errs.items())
            RESULTS["check"].append({"config": tag, "decay": decay, "dtype": dtype, "seed": seed, "ok": ok, **errs})
            log(f"check {tag} {decay:6s} {dtype:8s} {'ok' if ok else 'FAIL'} " + " ".join(f"{n} {e:.1e}" for n, e in errs.items()))


# ------------------------------------------------------------------------------------------------------ speed
def make(B, T, H, N, seed=0):
    C = H * N
    keys = jax.random.split(jax.random.PRNGKey(seed), 7)
    r, k, v = (jax.random.normal(keys[i], (B, T, C)).astype(jnp.bfloat16) * 0.5 for i in range(3))
    w = (jax.random.normal(keys[3], (B, T, C)) - 1).astype(jnp.bfloat16)
    u = jax.random.normal(keys[4], (H, N)) * 0.5
    dy = jax.random.normal(keys[5], (B, T, C)).astype(jnp.bfloat16)
    s0 = jax.random.normal(keys[6], (B, H, N, N)) * 0.3
    return r, k, v, w, u, dy, s0


def speed(name, B, T, H, N, grad=True):
    r, k, v, w, u, dy, s0 = make(B, T, H, N)
    op = RWKVKernelOperator(N, T)
    if T == 1:   # decode: one token, state in and out
        f = jax.jit(lambda r, k, v, w, u, s0: op(r, k, v, w, u, with_state=True, init_state=s0))
        steps = 100

        @jax.jit
        def many(r, k, v, w, u, s0):   # the device's time a step: 100 steps, the state carried, one program
            # unrolled: a rolled loop on the GPU would add the loop's own control work to every step
            return jax.lax.fori_loop(0, steps, lambda i, s: op(r, k, v, w, u, with_state=True, init_state=s)[1], s0,
                                     unroll=True)

        return {"fwd_ms": timeit_stream(f, r, k, v, w, u, s0), "method": "mean of 200 streamed calls",
                "in_one_program_ms": timeit(many, r, k, v, w, u, s0) / steps}
    f = jax.jit(lambda r, k, v, w, u: op(r, k, v, w, u)[0])
    # *_stream_ms: mean of back-to-back calls, the host's dispatch hidden behind the device's work: the device
    # time a call, as triton.testing.do_bench measures the Triton engine (gpu_torch.py: also *_stream_ms)
    out = {"fwd_ms": timeit(f, r, k, v, w, u), "fwd_stream_ms": timeit_stream(f, r, k, v, w, u, n=50)}
    if grad:
        def loss(r, k, v, w, u):
            return jnp.sum(op(r, k, v, w, u)[0].astype(jnp.float32) * dy.astype(jnp.float32))

        # value_and_grad, as a training step: with jax.grad alone the program would not need y (dy is a constant),
        # and XLA would drop the forward's output kernel from the time
        g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))
        out["fwd_bwd_ms"] = timeit(g, r, k, v, w, u)
        out["fwd_bwd_stream_ms"] = timeit_stream(g, r, k, v, w, u, n=50)
    return out


@guarded("speed")
def speed_shapes(shapes):
    configure({})
    for name in shapes:
        B, T, H, N = SHAPES[name]
        log(f"ours {name} {SHAPES[name]}")
        RESULTS["ours"][name] = {"shape": [B, T, H, N], **speed(name, B, T, H, N)}
        log(f"  {RESULTS['ours'][name]}")


@guarded("variants")
def variants(names):
    """Each configuration at the training shape (or the shape it names)."""
    for name in names:
        if left() < 60:
            RESULTS["errors"].append({"what": f"variant {name}", "err": "not run: BUDGET spent"})
            continue
        cfg = VARIANT_CONFIGS[name]
        configure(cfg)
        try:
            log(f"variant {name} {cfg}")
            shape = cfg.get("shape", "train")
            RESULTS["variants"][name] = {"config": cfg, "shape": shape, **speed(shape, *SHAPES[shape])}
            if shape == "train":   # the same configuration against the oracle (the check runs chunked)
                check(dtypes=("bfloat16", "float16"), tag=name)
            log(f"  {RESULTS['variants'][name]}")
        except Exception as e:  # noqa: BLE001
            RESULTS["variants"][name] = {"config": cfg, "err": repr(e)[:400]}
            log(f"  FAILED {e!r}"[:600])
    configure({})


@guarded("kernels")
def kernels():
    """Each kernel alone at the training shape (KERNELS_SHAPE: another), default configuration."""
    configure({})
    B, T, H, N = SHAPES[os.environ.get("KERNELS_SHAPE", "train")]
    r, k, v, w, u, dy, s0 = make(B, T, H, N)
    settings = pallas.SETTINGS
    L = settings.chunk_length(T)
    precisions = binding.precisions(r.dtype, settings.low_precision)
    x4 = [a.reshape(B, T, H, N) for a in (r, k, v, w, dy)]
    ub = jnp.broadcast_to(u[None], (B, H, N))
    terms = jax.jit(lambda k, v, w: scan.state_terms(k, v, w, L=L, precisions=precisions, settings=settings))
    X, a = terms(x4[1], x4[2], x4[3])
    sweep = jax.jit(lambda X, a, s0: scan.scan_terms(X, a, s0, precisions=precisions, settings=settings))
    starts, _ = sweep(X, a, s0)
    out = jax.jit(lambda r, k, v, w, u, S: forward.launch_forward(r, k, v, w, u, S, L=L, precisions=precisions,
                                                                  settings=settings))
    back = jax.jit(lambda r, k, v, w, u, dy, S, D: backward.launch_backward(r, k, v, w, u, dy, S, D, L=L,
                                                                            precisions=precisions, settings=settings))
    states = jax.jit(lambda k, v, w, s0: scan.launch_scan(k, v, w, s0, L=L, precisions=precisions,
                                                          settings=settings))
    stream = functools.partial(timeit_stream, n=50)   # device time a call (back to back)
    RESULTS["kernels"] = {
        "config": {**dataclasses.asdict(settings), "chunk": L, "prec": precisions.prec.value, "shape": [B, T, H, N]},
        "states_ms": stream(states, x4[1], x4[2], x4[3], s0),   # what the forward runs (scan.launch_scan)
        "state_terms_ms": stream(terms, x4[1], x4[2], x4[3]),
        "scan_ms": stream(sweep, X, a, s0),
        "output_ms": stream(out, *x4[:4], ub, starts),
        "grads_ms": stream(back, *x4[:4], ub, x4[4], starts, starts),
        "copy_1GiB_GBps": None,
    }
    x = jnp.ones((2 ** (16 if os.environ.get("SMOKE") == "1" else 28),), jnp.float32)
    ms = timeit(jax.jit(lambda x: x * 2.0), x)
    RESULTS["kernels"]["copy_1GiB_GBps"] = 2 * x.nbytes / ms / 1e6
    log(f"kernels {RESULTS['kernels']}")


# ------------------------------------------------------------------------------------------------------ peers
def run_peer(name, argv, env):
    """One peer in its own process, with PEER_TIMEOUT cut to what is left of BUDGET; its output goes to
    peer_NAME.log. Returns its output folder, where what it measured stays also after a timeout."""
    out = os.path.join(OUT, f"peer_{name}")
    os.makedirs(out, exist_ok=True)
    limit = max(10, min(int(os.environ.get("PEER_TIMEOUT", "420")), left() - 20))
    log(f"peer {name} in a subprocess, timeout {limit:.0f}s")
    try:
        proc = subprocess.run(argv, env={**env, "OUT": out}, capture_output=True, text=True, timeout=limit)
        with open(os.path.join(OUT, f"peer_{name}.log"), "w") as f:
            f.write(proc.stdout[-20000:] + "\n---- stderr\n" + proc.stderr[-20000:])
    except subprocess.TimeoutExpired:
        RESULTS["errors"].append({"what": f"peer {name}", "err": f"timeout after {limit:.0f}s"})
    return out


@guarded("peers")
def peers(which, shapes):
    if "triton" in which:   # this project's torch engine, same run: the 1.3x goal is relative to it
        out = run_peer("triton", [sys.executable, os.path.join(ROOT, "benchmarks", "gpu_torch.py")],
                       {**os.environ, "PEERS": "", "SKIP_CHECK": "1", "KERNELS": "1", "KERAS_BACKEND": "torch",
                        "VARIANTS": os.environ.get("TRITON_VARIANTS", ""), "SHAPES": ",".join(shapes)})
        try:
            with open(os.path.join(out, "gpu_torch.json")) as f:
                RESULTS["peers"]["triton"] = json.load(f)["ours"]
            log(f"  {RESULTS['peers']['triton']}")
        except (OSError, KeyError, ValueError) as e:   # reported in the table; the other peers still run
            RESULTS["errors"].append({"what": "peer triton", "err": repr(e)[:600]})
    env = {**os.environ, "PYTHONPATH": os.environ.get("PEER_PYTHONPATH", os.environ.get("PYTHONPATH", "")),
           "SKIP_ACC": "1", "SHAPES": ",".join(PEER_SHAPES[s] for s in shapes if s != "decode"),
           # XLA's pool would leave the peer's own CUDA allocations no room (rwkv-ops at the long shape: OOM)
           "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    script = os.path.join(ROOT, "benchmarks", "peers", "measure.py")
    for peer, part in (("rwkv_ops", "jax"), ("fla", "torch")):
        if peer not in which:
            continue
        path = os.path.join(run_peer(peer, [sys.executable, script, part], {**env, "PEERS": peer}),
                            "peer_results.jsonl")
        lines = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
        RESULTS["peers"][peer] = [x for x in lines if x.get("kind") in ("speed", "ceiling", "env", "error", "fatal")]
        for x in RESULTS["peers"][peer]:
            if x.get("kind") == "speed":
                log(f"  {x}")


def peer_ms(peer, shape, key):
    if peer == "triton":
        return RESULTS["peers"].get("triton", {}).get(shape, {}).get(key)
    name = {"rwkv_ops": "rwkv_ops", "fla": "fla_chunk"}[peer]
    if shape == "decode" and peer == "fla":
        name = "fla_fused_recurrent"
    for x in RESULTS["peers"].get(peer, []):
        if x.get("kind") == "speed" and x.get("peer") == name and x.get("shape") == PEER_SHAPES[shape]:
            return x.get(key)
    return None


def table():
    dev = jax.devices()[0]
    print(f"\n==== Pallas engine, {RESULTS['date']}, {getattr(dev, 'device_kind', dev)}, jax {jax.__version__}")
    def worst(checks):
        return max((max(v for k, v in c.items() if k in ("y", "state", "dr", "dk", "dv", "dw", "du", "dinit_state"))
                    for c in checks), default=float("nan"))

    for tag in dict.fromkeys(c["config"] for c in RESULTS["check"]):
        checks = [c for c in RESULTS["check"] if c["config"] == tag]
        bad = [c for c in checks if not c["ok"]]
        print(f"check vs float64 oracle, {tag}: {len(checks) - len(bad)}/{len(checks)} ok; worst error "
              + ", ".join(f"{d} {worst([c for c in checks if c['dtype'] == d]):.1e}"
                          for d in dict.fromkeys(c["dtype"] for c in checks)))
    print(f"{'shape':8s} {'ours fwd':>9s} {'ours f+b':>9s} {'triton fwd':>11s} {'f+b':>7s} {'rwkv-ops fwd':>13s} "
          f"{'f+b':>7s} {'fla fwd':>8s} {'f+b':>7s}   ours/triton fwd, f+b (goal <= 1.3); f+b speed-up vs rwkv-ops"
          f" (goal >= 5) / fla")

    def fmt(x, w=7):
        return f"{x:{w}.3f}" if isinstance(x, (int, float)) else f"{'-':>{w}s}"

    def ratio(a, b):
        return f"{a / b:.2f}" if (a and b) else "-"

    for name, row in RESULTS["ours"].items():
        tr_f, tr_b = peer_ms("triton", name, "fwd_ms"), peer_ms("triton", name, "fwd_bwd_ms")
        ro_f, ro_b = peer_ms("rwkv_ops", name, "fwd_ms"), peer_ms("rwkv_ops", name, "fwd_bwd_ms")
        fl_f, fl_b = peer_ms("fla", name, "fwd_ms"), peer_ms("fla", name, "fwd_bwd_ms")
        ours_f, ours_b = row.get("fwd_ms"), row.get("fwd_bwd_ms")
        vs_triton = [f"{a / b:.2f}" if (a and b) else "-" for a, b in ((ours_f, tr_f), (ours_b, tr_b))]
        speedups = [f"{b / ours_b:.2f}x" if (ours_b and b) else "-" for b in (ro_b, fl_b)]
        print(f"{name:8s} {fmt(ours_f, 9)} {fmt(ours_b, 9)} {fmt(tr_f, 11)} {fmt(tr_b)} {fmt(ro_f, 13)} {fmt(ro_b)} "
              f"{fmt(fl_f, 8)} {fmt(fl_b)}   {vs_triton[0]}, {vs_triton[1]}; {speedups[0]} / {speedups[1]}")
    print("device time a call (mean of 50 back-to-back calls, both engines; ms): " + "; ".join(
        f"{name} fwd {fmt(row.get('fwd_stream_ms'), 5)} / triton {fmt(peer_ms('triton', name, 'fwd_stream_ms'), 5)}"
        f" = {ratio(row.get('fwd_stream_ms'), peer_ms('triton', name, 'fwd_stream_ms'))}, f+b "
        f"{fmt(row.get('fwd_bwd_stream_ms'), 5)} / {fmt(peer_ms('triton', name, 'fwd_bwd_stream_ms'), 5)} = "
        f"{ratio(row.get('fwd_bwd_stream_ms'), peer_ms('triton', name, 'fwd_bwd_stream_ms'))}"
        for name, row in RESULTS["ours"].items() if name != "decode"))
    if RESULTS["variants"]:
        print("variants (ms, fwd/fwd+bwd at the training shape; decode: a call / a step in one program): " + "; ".join(
            f"{n} {v.get('fwd_ms', float('nan')):.3f}/"
            f"{v.get('fwd_bwd_ms', v.get('in_one_program_ms', float('nan'))):.3f}" if "err" not in v
            else f"{n} FAILED" for n, v in RESULTS["variants"].items()))
    if RESULTS["kernels"]:
        print("kernels alone (ms): " + ", ".join(f"{k} {v:.3f}" for k, v in RESULTS["kernels"].items()
                                                 if k.endswith("_ms")) +
              f"; copy {RESULTS['kernels'].get('copy_1GiB_GBps') or 0:.0f} GB/s")
    for e in RESULTS["errors"]:
        print("ERROR", e["what"], e["err"][:300])


def main():
    RESULTS["env"] = {"jax": jax.__version__, "device": str(jax.devices()[0]),
                      "device_kind": getattr(jax.devices()[0], "device_kind", None), "defaults": DEFAULTS}
    log(f"jax {jax.__version__} on {RESULTS['env']['device_kind']}; pallas available: {pallas.is_available()}")
    shapes = [s for s in os.environ.get("SHAPES", "train,long,decode").split(",") if s]
    if not os.environ.get("SKIP_CHECK"):
        check()
    speed_shapes(shapes)
    if os.environ.get("KERNELS", "1") == "1":
        kernels()
    peers([p for p in os.environ.get("PEERS", "triton,rwkv_ops,fla").split(",") if p], shapes)
    variants([v for v in os.environ.get("VARIANTS", DEFAULT_VARIANTS).split(",")
              if v and v != "default"])
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "gpu_jax.json"), "w") as f:
        json.dump(RESULTS, f, indent=1, default=str)
    table()


if __name__ == "__main__":
    main()
