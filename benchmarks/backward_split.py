"""The Triton backward fused (backward.py) against split in two kernels (Settings.backward_split, backward_split.py),
one GPU, one run: for each shape and variant the forward, forward + backward and the backward chunk kernel(s) alone
(and the default's forward first, as the reference).

    python3 benchmarks/backward_split.py                 # all shapes, all variants (a few minutes on an H200)
    SHAPES=train VARIANTS=fused,split python3 benchmarks/backward_split.py

Shapes: train (B=8, T=4096, H=32, N=64), long (B=1, T=16384, H=32, N=64), train128 (B=8, T=4096, H=16, N=128: the
same channels, head size 128). Variants (launch settings of the backward chunk kernel(s); settings.BackwardLaunch
(num_warps, num_stages, maxnreg)): fused (the default), fused168 (maxnreg 168), fused8w168 (8 warps capped at 168:
2 programs of 8 warps an SM, twice the default's warps), split (the split's default launches), split168 (both kernels
capped at 168 registers a thread: 3 programs of 4 warps an SM), split8w (8 warps); fused_table and split_table
(fused and split with Settings.mask_table: every chunk kernel, the forward's too, loads the levels' masks from the
level table instead of building them), split168_table (both).
The timings: triton.testing.do_bench medians, bf16 inputs, u float32, random data (as gpu_torch.py); "bwd kernel"
is backward.launch_backward alone (both kernels for a split), "rows" and "keys" each split kernel alone.
Before timing, each variant's gradients are compared with the fused default's on the same inputs (relative L2;
the oracle checks are tests/engines/triton/test_backward_split.py). Writes $OUT/backward_split.json (OUT defaults to
/tmp) and prints a table last.
"""
import json
import os
import sys
import time

import torch
import triton

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
os.environ.setdefault("KERAS_BACKEND", "torch")

from gpu_torch import bench, make  # noqa: E402  (the same timing and inputs as the main benchmark)

from rwkv6_keras_operator.engines.triton import backward_split, binding  # noqa: E402
from rwkv6_keras_operator.engines.triton.backward import launch_backward  # noqa: E402
from rwkv6_keras_operator.engines.triton.scan import launch_scan  # noqa: E402
from rwkv6_keras_operator.engines.triton.settings import BackwardLaunch, Settings  # noqa: E402

OUT = os.environ.get("OUT", "/tmp")
SHAPES = {"train": (8, 4096, 32, 64), "long": (1, 16384, 32, 64), "train128": (8, 4096, 16, 128)}


def variants(N):
    """name -> Settings; the fused kernel's default launch for this head size is the base of the capped ones."""
    warps = 4 if N <= 64 else 8
    return {"fused": Settings(), "fused168": Settings(backward=BackwardLaunch(warps, 1, 168)),
            "fused8w168": Settings(backward=BackwardLaunch(8, 1, 168)),
            "split": Settings(backward_split=True),
            "split168": Settings(backward_split=True, backward=BackwardLaunch(warps, 1, 168)),
            "split8w": Settings(backward_split=True, backward=BackwardLaunch(8, 1, None)),
            "fused_table": Settings(mask_table=True),
            "split_table": Settings(backward_split=True, mask_table=True),
            "split168_table": Settings(backward_split=True, mask_table=True, backward=BackwardLaunch(warps, 1, 168))}


def log(msg):
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


def grads(r, k, v, w, u, dy, settings):
    ts = [a.clone().requires_grad_(True) for a in (r, k, v, w, u)]
    y, _ = binding.wkv(*ts, None, settings)
    return torch.autograd.grad(y, ts, dy)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def time_shape(name, B, T, H, N, only):
    r, k, v, w, u, dy = make(B, T, H, N)
    out = {"fwd_ms": bench(lambda: binding.wkv(r, k, v, w, u, None, Settings()))}
    log(f"{name}: fwd {out['fwd_ms']:.3f}")
    reference = grads(r, k, v, w, u, dy, Settings())
    base = Settings()
    L, p = base.chunk_length(T), binding.precisions(r)
    NC = -(-T // L)
    _, _, states = binding.forward_impl(r, k, v, w, u, None, base)
    dstates = torch.empty((B, H, NC, N, N), dtype=binding.states_dtype(r), device="cuda")
    launch_scan(r, dy, w, None, None, dstates, True, p, base, L)
    dr, dk, dv, dw = (torch.empty_like(r) for _ in range(4))
    dg_rows = torch.empty(r.shape, dtype=torch.float32, device="cuda")
    du = torch.empty((B, H, NC * (L // base.sub_block), N), device="cuda")
    for vname, st in variants(N).items():
        if only and vname not in only:
            continue
        res = {}
        try:
            got = grads(r, k, v, w, u, dy, st)
            res["grads_vs_fused"] = {n: rel(a, b) for n, a, b in zip("rkvwu", got, reference)}
            res["fwd_ms"] = bench(lambda: binding.wkv(r, k, v, w, u, None, st))   # mask_table changes the forward
            ts = [a.clone().requires_grad_(True) for a in (r, k, v, w, u)]

            def fb():
                y, _ = binding.wkv(*ts, None, st)
                y.backward(dy)

            res["fwd_bwd_ms"] = bench(fb, grad_to_none=ts)
            res["bwd_kernel_ms"] = bench(lambda: launch_backward(r, k, v, w, u, None, states, dstates, dy, dr, dk, dv,
                                                                 dw, du, p, st, L))
            if st.backward_split:
                res["rows_ms"] = bench(lambda: backward_split.launch_rows(r, k, v, w, u, None, states, dstates, dy, dr,
                                                                          dg_rows, du, p, st, L))
                res["keys_ms"] = bench(lambda: backward_split.launch_keys(r, k, v, w, u, dstates, dy, dg_rows, dk, dv,
                                                                          dw, p, st, L))
        except Exception as e:  # noqa: BLE001 (a variant that fails is reported, not fatal)
            res["error"] = repr(e)[:300]
        out[vname] = res
        log(f"{name} {vname}: {res}")
        torch.cuda.empty_cache()
    return out


def main():
    results = {"date": time.strftime("%Y-%m-%d"), "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
               "triton": triton.__version__, "shapes": {}}
    log(f"{results['gpu']} torch {torch.__version__} triton {triton.__version__}")
    only = [v for v in os.environ.get("VARIANTS", "").split(",") if v]
    shapes = [s for s in os.environ.get("SHAPES", ",".join(SHAPES)).split(",") if s]
    for s in shapes:
        results["shapes"][s] = time_shape(s, *SHAPES[s], only)
        with open(os.path.join(OUT, "backward_split.json"), "w") as f:
            json.dump(results, f, indent=1)
    print(f"\n{results['gpu']}, triton {triton.__version__}, bf16, ms (median)")
    print(f"{'shape':<10}{'variant':<12}{'fwd':>8}{'fwd+bwd':>9}{'bwd kern':>9}{'rows':>8}{'keys':>8}  max grad diff")
    for s, res in results["shapes"].items():
        for vname, v in res.items():
            if vname == "fwd_ms":
                continue
            cells = [f"{v[key]:8.3f}" if key in v else f"{'-':>8}" for key in ("fwd_ms", "fwd_bwd_ms", "bwd_kernel_ms",
                                                                               "rows_ms", "keys_ms")]
            diff = max(v["grads_vs_fused"].values()) if "grads_vs_fused" in v else float("nan")
            print(f"{s:<10}{vname:<12}" + " ".join(cells) + f"  {diff:.1e} {v.get('error', '')}")


T0 = time.time()
if __name__ == "__main__":
    main()
