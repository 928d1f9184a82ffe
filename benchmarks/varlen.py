"""Packed sequences (cu_seqlens, issue 14): one row of random documents against the same engine's fixed-length batch,
and fla's chunk_rwkv6 given the same cu_seqlens, in one process.

    python3 benchmarks/varlen.py --backend torch     # the Triton engine (+ fla's chunk_rwkv6 with cu_seqlens)
    python3 benchmarks/varlen.py --backend jax       # the Pallas engine (its wkv_varlen where it has one)
    python3 benchmarks/varlen.py --backend torch --tiny   # CPU smoke run: tiny shapes (TRITON_INTERPRET=1)

Cases (H = 32, N = 64, bfloat16 inputs, fwd and fwd+bwd, ms):
  packed   B = 1, T = 32768: documents of random lengths (1 + an exponential of mean 511, so mean ~512 and min 1,
           the last one cut at T; one packing, drawn from --seed), no start states. Timed through the public
           operator (op(..., cu_seqlens=cu), which checks the offsets: cu a NumPy array, and a device tensor, which
           it reads back) and through the engine's wkv_varlen alone.
  fixed    B = 8, T = 4096 (the same tokens in rows of one length): the operator and the engine's wkv.
  fla      chunk_rwkv6(..., cu_seqlens=cu) on the packed row (torch; from $PEER_PYTHONPATH, as benchmarks/peers/):
           its w is the log decay -exp(w). It autotunes at first use of a shape: one packing, warmed up once.
The goals of issue 14: packed within 1.15x of fixed (fwd and fwd+bwd), at most 0.5x fla; Pallas within 1.3x of
Triton (two runs, one per backend). Timings: torch, triton.testing.do_bench (median, CUDA events); jax, the median
of calls each followed by block_until_ready, jitted (as benchmarks/peers/measure.py). Writes varlen_<backend>.json
to --out (default $OUT, else /tmp) and prints the table with the ratios.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
FULL = {"T": 32768, "H": 32, "N": 64, "B": 8, "mean": 512}
TINY = {"T": 160, "H": 2, "N": 16, "B": 2, "mean": 24}


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=["torch", "jax"], required=True)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny shapes, kernels interpreted")
    parser.add_argument("--seed", type=int, default=0, help="seed of the packing and the inputs")
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    parser.add_argument("--repeats", type=int, help="jax: synchronised calls a timing (default 30; --tiny 2)")
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (2 if args.tiny else 30)
    return args


def packing(T, mean, seed):
    """cu_seqlens (int32, n + 1) of documents of lengths 1 + Exp(mean - 1), rounded, the last cut at T."""
    rng = np.random.default_rng(seed)
    lengths = []
    while sum(lengths) < T:
        lengths.append(1 + int(round(rng.exponential(mean - 1))))
    lengths[-1] -= sum(lengths) - T
    lengths = [n for n in lengths if n > 0]
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)


def inputs(B, T, H, N, seed):
    """float32 NumPy r, k, v, w (B, T, H * N), u (H, N), dy (B, T, H * N), as benchmarks/peers/measure.py draws."""
    rng = np.random.default_rng(seed)
    C = H * N
    r, k, v = (rng.standard_normal((B, T, C), np.float32) * 0.5 for _ in range(3))
    w = rng.standard_normal((B, T, C), np.float32) - 1.0
    u = rng.standard_normal((H, N), np.float32) * 0.5
    return r, k, v, w, u, rng.standard_normal((B, T, C), np.float32)


class Report:
    def __init__(self, backend, shapes, cu):
        lengths = np.diff(cu)
        self.data = {"backend": backend, "date": time.strftime("%Y-%m-%d %H:%M"), "host": platform.node(),
                     "shapes": shapes, "documents": {"n": int(len(lengths)), "mean": float(lengths.mean()),
                                                     "min": int(lengths.min()), "max": int(lengths.max())},
                     "rows": []}

    def add(self, case, what, fwd=None, fwd_bwd=None, error=None):
        row = {"case": case, "what": what, "fwd_ms": fwd, "fwd_bwd_ms": fwd_bwd}
        if error:
            row["error"] = error
        self.data["rows"].append(row)
        text = error or f"fwd {fwd:9.4f} ms   fwd+bwd {fwd_bwd:9.4f} ms"
        print(f"  {case:<7} {what:<44} {text}", flush=True)

    def ms(self, case, what, key):
        return next((row.get(key) for row in self.data["rows"] if row["case"] == case and row["what"] == what), None)

    def ratios(self):
        """packed / fixed of the same path (goal <= 1.15) and packed / fla (goal <= 0.5), per pass."""
        out = {}
        for key in ("fwd_ms", "fwd_bwd_ms"):
            fla = self.ms("fla", "chunk_rwkv6 cu_seqlens", key)
            for row in self.data["rows"]:
                packed = row.get(key)
                if row["case"] != "packed" or not packed:
                    continue
                fixed = self.ms("fixed", row["what"].split(" (")[0], key)
                if fixed:
                    out[f"packed/fixed {row['what']} {key[:-3]}"] = packed / fixed
                if fla:
                    out[f"packed/fla {row['what']} {key[:-3]}"] = packed / fla
        self.data["ratios"] = out
        return out

    def write(self, out):
        os.makedirs(out, exist_ok=True)
        ratios = self.ratios()
        path = os.path.join(out, f"varlen_{self.data['backend']}.json")
        with open(path, "w") as f:
            json.dump(self.data, f, indent=1)
        print(f"\n{self.data.get('device', '?')}, {self.data['backend']}, bf16, shapes {self.data['shapes']}, "
              f"documents {self.data['documents']}")
        print("| case | what | fwd ms | fwd+bwd ms |\n|---|---|---:|---:|")
        for row in self.data["rows"]:
            cells = [f"{row[k]:.4f}" if row.get(k) is not None else "" for k in ("fwd_ms", "fwd_bwd_ms")]
            print(f"| {row['case']} | {row['what']} | {cells[0]} | {cells[1]} |" + (f" {row['error']}" if
                                                                                       "error" in row else ""))
        for name, value in ratios.items():
            print(f"  {name}: {value:.3f}")
        print(f"\nwrote {path}")


def peer_fla():
    """fla's chunk_rwkv6, or None (benchmarks/peers/fla.py)."""
    from benchmarks.peers.fla import fla_rwkv6

    return fla_rwkv6("chunk_rwkv6")


def run_torch(args, shapes, cu, report):
    import torch

    from rwkv6_keras_operator import RWKVKernelOperator
    from rwkv6_keras_operator.engines import triton as engine

    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    report.data["device"] = torch.cuda.get_device_name() if cuda else "cpu (Triton interpreter)"
    if cuda:
        import triton

        def bench(fn):
            return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    else:
        def bench(fn):
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3

    T, H, N, B = shapes["T"], shapes["H"], shapes["N"], shapes["B"]
    op = RWKVKernelOperator(N)
    cu_t = torch.tensor(cu, device=dev)

    def tensors(batch, length):
        r, k, v, w, u, dy = inputs(batch, length, H, N, args.seed)
        as_t = lambda a: torch.tensor(a, device=dev).to(torch.bfloat16)  # noqa: E731
        return [as_t(a) for a in (r, k, v, w, u)], as_t(dy)

    def timed(case, what, call, leaves, dy):
        """call(*leaves) -> y; fwd alone, then fwd + backward of sum(y * dy)."""
        try:
            with torch.no_grad():
                fwd = bench(lambda: call(*leaves))
                dy_y = dy.reshape(call(*leaves).shape)
            grads = [a.clone().requires_grad_(True) for a in leaves]

            def fwd_bwd():
                for a in grads:
                    a.grad = None
                call(*grads).backward(dy_y)

            report.add(case, what, fwd, bench(fwd_bwd))
        except Exception as error:  # noqa: BLE001  (a failing case is reported, the others still run)
            report.add(case, what, error=f"{type(error).__name__}: {str(error)[:300]}")

    # packed: one row of documents, through the operator and through the engine alone
    leaves, dy = tensors(1, T)
    # the offsets as a data loader gives them (NumPy: checked on the host), and as a device tensor (checked by
    # reading it back: a host sync each call)
    timed("packed", "operator (cu_seqlens NumPy)", lambda r, k, v, w, u: op(r, k, v, w, u, cu_seqlens=cu)[0],
          leaves, dy)
    timed("packed", "operator (cu_seqlens tensor)", lambda r, k, v, w, u: op(r, k, v, w, u, cu_seqlens=cu_t)[0],
          leaves, dy)
    timed("packed", "engine", lambda r, k, v, w, u: engine.wkv_varlen(
        *(a.view(1, T, H, N) for a in (r, k, v, w)), u.float(), None, cu_t)[0], leaves, dy)
    fla = peer_fla() if cuda else None
    if fla is not None:
        cu_long = cu_t.long()
        timed("fla", "chunk_rwkv6 cu_seqlens", lambda r, k, v, w, u: fla(
            *(a.view(1, T, H, N) for a in (r, k, v)), -torch.exp(w.float()).view(1, T, H, N), u, scale=1.0,
            cu_seqlens=cu_long)[0], leaves, dy)
    del leaves, dy
    # fixed: B rows of T / B tokens
    leaves, dy = tensors(B, T // B)
    timed("fixed", "operator", lambda r, k, v, w, u: op(r, k, v, w, u)[0], leaves, dy)
    timed("fixed", "engine", lambda r, k, v, w, u: engine.wkv(
        *(a.view(B, T // B, H, N) for a in (r, k, v, w)), u.float(), None)[0], leaves, dy)


def run_jax(args, shapes, cu, report):
    import jax
    import jax.numpy as jnp

    from rwkv6_keras_operator import RWKVKernelOperator, engines

    report.data["device"] = str(jax.devices()[0])
    T, H, N, B = shapes["T"], shapes["H"], shapes["N"], shapes["B"]
    op = RWKVKernelOperator(N)
    engine = next(iter(engines.gpu_engines()), None)

    def bench(fn, *a):
        jax.block_until_ready(fn(*a))
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            jax.block_until_ready(fn(*a))
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e3

    def timed(case, what, call, batch, length, extra=()):
        """call(r, k, v, w, u, *extra) -> y, jitted; fwd, then fwd + bwd: y and jax.vjp of it with dy."""
        r, k, v, w, u, dy = inputs(batch, length, H, N, args.seed)
        leaves = [jnp.asarray(a, jnp.bfloat16) for a in (r, k, v, w, u)]
        dy = jnp.asarray(dy, jnp.bfloat16)
        try:
            fwd = jax.jit(call)

            @jax.jit
            def fwd_bwd(leaves, extra):
                # y is returned with the gradients, as a training step uses it: a program returning only the
                # gradients (which do not need y) would let XLA drop the forward's output kernel from the time
                y, pullback = jax.vjp(lambda *a: call(*a, *extra), *leaves)
                return y, pullback(dy.reshape(y.shape).astype(y.dtype))

            report.add(case, what, bench(fwd, *leaves, *extra), bench(fwd_bwd, leaves, tuple(extra)))
        except Exception as error:  # noqa: BLE001  (a failing case is reported, the others still run)
            report.add(case, what, error=f"{type(error).__name__}: {str(error)[:300]}")

    cu_j = jnp.asarray(cu)
    timed("packed", "operator", lambda r, k, v, w, u, cu: op(r, k, v, w, u, cu_seqlens=cu)[0], 1, T, (cu_j,))
    if engine is not None and hasattr(engine, "wkv_varlen"):
        timed("packed", "engine", lambda r, k, v, w, u, cu: engine.wkv_varlen(
            *(a.reshape(1, T, H, N) for a in (r, k, v, w)), u.astype(jnp.float32), None, cu)[0], 1, T, (cu_j,))
    timed("fixed", "operator", lambda r, k, v, w, u: op(r, k, v, w, u)[0], B, T // B)
    if engine is not None:
        timed("fixed", "engine", lambda r, k, v, w, u: engine.wkv(
            *(a.reshape(B, T // B, H, N) for a in (r, k, v, w)), u.astype(jnp.float32), None)[0], B, T // B)


def main(argv=None):
    args = parse(argv)
    os.environ["KERAS_BACKEND"] = args.backend
    shapes = TINY if args.tiny else FULL
    cu = packing(shapes["T"], shapes["mean"], args.seed)
    report = Report(args.backend, shapes, cu)
    (run_torch if args.backend == "torch" else run_jax)(args, shapes, cu, report)
    report.write(args.out)
    return report


if __name__ == "__main__":
    main()
