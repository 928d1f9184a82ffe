"""The Triton engine on one GPU: correctness against the float64 oracle, then speed, with the peers measured in the
same run (flash-linear-attention 0.6.0 chunk_rwkv6 / fused_recurrent_rwkv6, and the seed's CUDA kernel on request).

On the GPU machine, from the repository root:
    . .gpukit/setup_env.sh && python3 benchmarks/gpu_torch.py                # ours + fla
    PEERS=fla,seed python3 benchmarks/gpu_torch.py                            # + the seed package (builds CUDA)
    PEERS= SHAPES=train python3 benchmarks/gpu_torch.py                       # ours only, one shape
Env: PEERS (fla, seed; comma list, empty for none), SHAPES (train, long, decode), SKIP_CHECK=1, KERNELS=1 (also
time each kernel alone), VARIANTS=1 (each kernel alone under a few launch settings), PEER_TIMEOUT (s, default 1500). Peers run in their own processes (.gpukit/peers/peer_bench.py):
the seed package and this one share an import name. Writes $OUT/gpu_torch.json (OUT defaults to /tmp) and prints
a table last. Timings: triton.testing.do_bench, median, bf16 inputs, u float32, random data.
"""
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch
import triton

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("KERAS_BACKEND", "torch")

from rwkv6_keras_operator import RWKVKernelOperator  # noqa: E402
from rwkv6_keras_operator.engines.triton import binding, wkv  # noqa: E402
from rwkv6_keras_operator.reference import wkv_reference, wkv_reference_grads  # noqa: E402

OUT = os.environ.get("OUT", "/tmp")
SHAPES = {"train": (8, 4096, 32, 64), "long": (1, 16384, 32, 64), "decode": (64, 1, 32, 64)}
PEER_SHAPES = {"train": "train_8x4096_h32", "long": "long_1x16384_h32", "decode": "decode_64x1_h32"}
RESULTS = {"date": time.strftime("%Y-%m-%d"), "check": [], "ours": {}, "peers": {}, "kernels": {}}
T0 = time.time()


def log(msg):
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


def bench(fn, grad_to_none=None):
    return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")


# ------------------------------------------------------------------------------------------------- correctness
def check():
    rng = np.random.default_rng(int(time.time()))
    B, T, H, N = 2, 300, 2, 64
    C = H * N
    for decay in ("normal", "strong"):
        for dtype in (torch.float32, torch.bfloat16):
            r, k, v = (rng.standard_normal((B, T, C)).astype(np.float32) * 0.5 for _ in range(3))
            w = rng.standard_normal((B, T, C)) - 1 if decay == "normal" else rng.uniform(-3, 4.5, (B, T, C))
            w[rng.random(w.shape) < 0.1] = -1e9
            w[rng.random(w.shape) < 0.03] = 100.0
            u = (rng.standard_normal((H, N)) * 0.5).astype(np.float32)
            s0 = (rng.standard_normal((B, H, N, N)) * 0.3).astype(np.float32)
            dy = rng.standard_normal((B, T, C)).astype(np.float32)
            ds = rng.standard_normal((B, H, N, N)).astype(np.float32)
            ts = [torch.tensor(a, device="cuda").to(dtype).requires_grad_(True) for a in (r, k, v, w.astype(np.float32))]
            ts += [torch.tensor(u, device="cuda").requires_grad_(True), torch.tensor(s0, device="cuda").requires_grad_(True)]
            feed = [t.detach().float().cpu().numpy() for t in ts[:4]]
            dy = torch.tensor(dy).to(dtype).float().numpy()   # the cotangent of y has y's dtype
            y, s = wkv(*(t.view(B, T, H, N) for t in ts[:4]), ts[4], ts[5])
            loss = (y.float().reshape(B, T, C) * torch.tensor(dy, device="cuda")).sum() + (s * torch.tensor(ds, device="cuda")).sum()
            grads = torch.autograd.grad(loss, ts)
            y_ref, s_ref = wkv_reference(*feed, u, N, s0)
            g_ref = wkv_reference_grads(*feed, u, N, dy, ds, s0)
            rel = lambda a, b: float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))  # noqa: E731
            errs = {"y": rel(y.detach().float().cpu().reshape(B, T, C), y_ref), "state": rel(s.detach().cpu(), s_ref)}
            for name, g in zip(["r", "k", "v", "w", "u", "init_state"], grads):
                errs[name] = rel(g.float().cpu().reshape(g_ref[name].shape), g_ref[name])
            tol = (1e-5, 1e-4) if dtype == torch.float32 else (1e-2, 1e-2)
            ok = max(errs["y"], errs["state"]) <= tol[0] and max(v for n, v in errs.items() if n not in ("y", "state")) <= tol[1]
            RESULTS["check"].append({"decay": decay, "dtype": str(dtype), "ok": ok, **errs})
            log(f"check {decay:6s} {str(dtype):15s} {'PASS' if ok else 'FAIL'} " +
                " ".join(f"{n}={e:.1e}" for n, e in errs.items()))


# ----------------------------------------------------------------------------------------------------- ours
def make(B, T, H, N, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    mk = lambda scale, shift: (torch.randn(B, T, H, N, device="cuda", generator=g) * scale + shift).to(torch.bfloat16)  # noqa: E731
    r, k, v, w = mk(0.5, 0), mk(0.5, 0), mk(0.5, 0), mk(1.0, -1.0)
    u = torch.randn(H, N, device="cuda", generator=g) * 0.5
    dy = torch.randn(B, T, H, N, device="cuda", generator=g).to(torch.bfloat16)
    return r, k, v, w, u, dy


def time_ours(name, B, T, H, N, kernels, variants):
    r, k, v, w, u, dy = make(B, T, H, N)
    res = {}
    if T == 1:
        s0 = torch.randn(B, H, N, N, device="cuda")
        res["fwd_ms"] = bench(lambda: wkv(r, k, v, w, u, s0))
        op = RWKVKernelOperator(N)
        rc, kc, vc, wc = (a.view(B, T, H * N) for a in (r, k, v, w))
        res["operator_fwd_ms"] = bench(lambda: op(rc, kc, vc, wc, u, with_state=True, init_state=s0))
        g = torch.cuda.CUDAGraph()
        wkv(r, k, v, w, u, s0)
        with torch.cuda.graph(g):
            wkv(r, k, v, w, u, s0)
        res["graph_fwd_ms"] = bench(g.replay)
        return res
    res["fwd_ms"] = bench(lambda: wkv(r, k, v, w, u, None))
    ts = [a.clone().requires_grad_(True) for a in (r, k, v, w, u)]

    def fb():
        y, _ = wkv(*ts, None)
        y.backward(dy)

    res["fwd_bwd_ms"] = bench(fb, grad_to_none=ts)
    if name == "train":
        op = RWKVKernelOperator(N)
        tc = [a.detach().view(B, T, H * N).clone().requires_grad_(True) for a in ts[:4]] + [ts[4]]

        def ofb():
            y, _ = op(*tc)
            y.backward(dy.view(B, T, H * N))

        res["operator_fwd_bwd_ms"] = bench(ofb, grad_to_none=tc)
    if kernels or variants:
        RESULTS["kernels"][name] = time_kernels(r, k, v, w, u, dy, variants)
    return res


VARIANT_CONFIGS = {  # module: configs to try (the first is the default); see each module's *_config/scan_tiles
    "scan": [None, (32, 64, 4, 1), (32, 64, 4, 2), (32, 64, 8, 3), (32, 32, 4, 3)],
    # forward (BV, warps, maxnreg), backward (warps, stages, maxnreg): maxnreg trades spills for programs an SM
    "forward": [None, (64, 8), (64, 8, 80), (64, 4, 128), (64, 4, 96)],
    "backward": [None, (8, 1, 128), (8, 1, 96), (4, 1, 168)],
}
CHUNK_VARIANTS = [  # (binding.CHUNK, binding.SUB, forward warps, backward warps) besides the defaults
    (64, 32, 4, 4), (128, 32, 4, 4), (32, 16, 4, 4)]


def time_kernels(r, k, v, w, u, dy, variants):
    """Each launch alone (same inputs), to see where the time goes; with variants also other launch settings,
    and the whole fwd / fwd+bwd with other chunk and sub-block lengths."""
    from rwkv6_keras_operator.engines.triton import backward, forward, scan
    from rwkv6_keras_operator.engines.triton.backward import launch_backward
    from rwkv6_keras_operator.engines.triton.common import precisions
    from rwkv6_keras_operator.engines.triton.forward import launch_forward
    from rwkv6_keras_operator.engines.triton.scan import launch_scan

    B, T, H, N = r.shape
    L, C, p = binding.CHUNK, binding.SUB, precisions("bfloat16")
    NC = -(-T // L)
    y, state, states = binding.forward_impl(r, k, v, w, u, None)
    dstates = torch.empty((B, H, NC, N, N), device="cuda")
    grads = [torch.empty_like(r) for _ in range(4)]
    du = torch.empty((B, H, NC * (L // C), N), device="cuda")
    runs = {
        "scan": lambda: (launch_scan(k, v, w, None, state, states, False, p.SPREC, L),
                         launch_scan(r, dy, w, None, None, dstates, True, p.SPREC, L)),
        "forward": lambda: launch_forward(r, k, v, w, u, None, states, y, p, L, C),
        "backward": lambda: launch_backward(r, k, v, w, u, None, states, dstates, dy, *grads, du, p, L, C),
    }
    out = {}
    for name, module in (("scan", scan), ("forward", forward), ("backward", backward)):
        for cfg in VARIANT_CONFIGS[name] if variants else [None]:
            key = scan.regime(N, B * H) if name == "scan" else N
            module.TUNE.clear()
            if cfg is not None:
                module.TUNE[key] = cfg
            try:
                out[f"{name}{'' if cfg is None else cfg}_ms"] = bench(runs[name])
            except Exception as e:  # noqa: BLE001 (a setting that does not fit is reported, not fatal)
                out[f"{name}{cfg}_error"] = repr(e)[:120]
            module.TUNE.clear()
    for G in (1, 2, 4, 8, 16) if variants else []:   # the scan cut into G segments
        scan.TUNE["segments"] = G
        out[f"scan_segments{G}_ms"] = bench(runs["scan"])
        scan.TUNE.clear()
    ts = [a.clone().requires_grad_(True) for a in (r, k, v, w, u)]

    def fb():
        y, _ = wkv(*ts, None)
        y.backward(dy)

    for L2, C2, fw, bw in CHUNK_VARIANTS if os.environ.get("CHUNK_VARIANTS") == "1" else []:
        binding.CHUNK, binding.SUB = L2, C2
        forward.TUNE[N], backward.TUNE[N] = (N, fw), (bw, 1)
        tag = f"chunk{L2}/{C2}/w{fw},{bw}"
        try:
            out[f"{tag}_fwd_ms"] = bench(lambda: wkv(r, k, v, w, u, None))
            out[f"{tag}_fwd_bwd_ms"] = bench(fb, grad_to_none=ts)
        except Exception as e:  # noqa: BLE001
            out[f"{tag}_error"] = repr(e)[:120]
        binding.CHUNK, binding.SUB = L, C
        forward.TUNE.clear()
        backward.TUNE.clear()
    log("kernels " + " ".join(f"{n}={t:.3f}" if isinstance(t, float) else f"{n}={t}" for n, t in out.items()))
    return out


# ---------------------------------------------------------------------------------------------------- peers
def run_peers(peers, shapes):
    """Each peer in its own process; its results are read from the JSON lines it appends as it goes, so a peer
    stopped at PEER_TIMEOUT (s) still gives what it measured (fla autotunes on first use: minutes)."""
    env = dict(os.environ, SKIP_ACC="1", SHAPES=",".join(PEER_SHAPES[s] for s in shapes if s != "decode"))
    if os.environ.get("PEER_PYTHONPATH"):
        env["PYTHONPATH"] = os.environ["PEER_PYTHONPATH"]
    timeout = int(os.environ.get("PEER_TIMEOUT", "1500"))
    for peer in peers:
        name = {"fla": "fla", "seed": "rwkv6_keras_operator"}[peer]
        out = os.path.join(OUT, f"peer_{peer}")
        os.makedirs(out, exist_ok=True)
        log(f"peer {peer}: .gpukit/peers/peer_bench.py (separate process, timeout {timeout}s)")
        try:
            proc = subprocess.run([sys.executable, os.path.join(ROOT, ".gpukit/peers/peer_bench.py"), "torch"],
                                  env=dict(env, PEERS=name, OUT=out), capture_output=True, text=True, timeout=timeout)
            with open(os.path.join(OUT, f"peer_{peer}.log"), "w") as f:
                f.write(proc.stdout[-20000:] + "\n--- stderr\n" + proc.stderr[-20000:])
        except subprocess.TimeoutExpired:
            log(f"peer {peer}: stopped after {timeout}s; keeping what it measured")
        path = os.path.join(out, "peer_results.jsonl")
        for line in open(path) if os.path.exists(path) else []:
            rec = json.loads(line)
            if rec.get("kind") == "speed" and "err" not in rec:
                RESULTS["peers"].setdefault(rec["peer"], {})[rec["shape"]] = rec
                log(f"peer {peer}: {rec}")
            elif rec.get("kind") in ("error", "fatal") or "err" in rec:
                log(f"peer {peer}: {str(rec)[:300]}")


def main():
    RESULTS["gpu"] = torch.cuda.get_device_name()
    RESULTS["torch"], RESULTS["triton"] = torch.__version__, triton.__version__
    log(f"{RESULTS['gpu']} torch {torch.__version__} triton {triton.__version__}")
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    RESULTS["copy_GBps"] = 2 * x.numel() / bench(lambda: x.clone()) / 1e6
    del x
    log(f"device copy {RESULTS['copy_GBps']:.0f} GB/s")
    if not os.environ.get("SKIP_CHECK"):
        check()
    shapes = [s for s in os.environ.get("SHAPES", "train,long,decode").split(",") if s]
    variants = bool(os.environ.get("VARIANTS"))
    kernels = os.environ.get("KERNELS") == "1"
    for s in shapes:
        log(f"ours {s} {SHAPES[s]}")
        RESULTS["ours"][s] = time_ours(s, *SHAPES[s], kernels, variants)
        log(f"ours {s}: {RESULTS['ours'][s]}")
        torch.cuda.empty_cache()
    with open(os.path.join(OUT, "gpu_torch.json"), "w") as f:
        json.dump(RESULTS, f, indent=1)
    peers = [p for p in os.environ.get("PEERS", "fla").split(",") if p]
    if peers:
        run_peers(peers, shapes)
    with open(os.path.join(OUT, "gpu_torch.json"), "w") as f:
        json.dump(RESULTS, f, indent=1)
    table(shapes)


def table(shapes):
    fla = RESULTS["peers"].get("fla_chunk", {})
    rec = RESULTS["peers"].get("fla_fused_recurrent", {})
    seed = RESULTS["peers"].get("rwkv6_keras_operator", {})
    print(f"\n{RESULTS['gpu']}, {RESULTS['date']}, bf16, ms (median); ratio = ours / fla (goal <= 0.5)")
    print(f"{'shape':<8}{'pass':<9}{'ours':>8}{'fla':>8}{'ratio':>7}{'seed':>8}")
    for s in shapes:
        ours = RESULTS["ours"][s]
        for key, label in (("fwd_ms", "fwd"), ("fwd_bwd_ms", "fwd+bwd")):
            if key not in ours:
                continue
            peer = (rec if s == "decode" else fla).get(PEER_SHAPES[s], {}).get(key)
            sd = seed.get(PEER_SHAPES[s], {}).get(key)
            ratio = f"{ours[key] / peer:7.2f}" if peer else f"{'-':>7}"
            print(f"{s:<8}{label:<9}{ours[key]:8.3f}{peer or float('nan'):8.3f}{ratio}{sd or float('nan'):8.3f}")
    for s, k in RESULTS["kernels"].items():
        print(f"kernels {s}: " + ", ".join(f"{n} {t:.3f}" if isinstance(t, float) else f"{n} {t}" for n, t in k.items()))
    bad = [c for c in RESULTS["check"] if not c["ok"]]
    print("check:", "ALL PASS" if not bad else f"FAILED {bad}")


if __name__ == "__main__":
    main()
