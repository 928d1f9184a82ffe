"""`check`: every engine available here, on every installed backend, against the float64 oracle.

Random inputs with strong decays and masks, a T that is not a multiple of any chunk, init_state with a
state_map; forward output, final state and the gradients of r, k, v, w, u and init_state (through y and the
final state), for float32 and bfloat16. Prints a table of relative L2 errors with PASS/FAIL.
"""
import sys

from .backends import device_of, emit, installed_backends, run_worker

DESCRIPTION = "Check every engine available on this machine against the float64 oracle."
FIELDS = ("y", "state", "r", "k", "v", "w", "u", "init_state")
TOLERANCE = {"float32": (1e-5, 1e-4), "bfloat16": (1e-2, 1e-2)}  # (outputs, gradients)


def add_arguments(parser):
    parser.add_argument("--backends", default=",".join(installed_backends()),
                        help="comma-separated Keras backends to check (default: all installed: %(default)s)")
    parser.add_argument("--shape", default="2,100,2,64", help="B,T,H,N (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: fresh)")


def run(args):
    import numpy as np

    seed = args.seed if args.seed is not None else int(np.random.SeedSequence().entropy % 2**31)
    print(f"check: shape B,T,H,N = {args.shape}, seed {seed}; relative L2 error against the float64 oracle")
    rows = []
    for backend in filter(None, args.backends.split(",")):
        records, code = run_worker(backend, __name__, ["--worker", args.shape, str(seed)], echo=print)
        rows += records
        if code:
            rows.append({"backend": backend, "engine": "-", "device": "-", "dtype": "-", "error": f"exit {code}"})
    print(f"\n{'backend':<11}{'engine':<10}{'device':<8}{'dtype':<10}{'outputs':>10}{'grads':>10}  result")
    ok = bool(rows)
    for row in rows:
        if "error" in row:
            print(f"{row['backend']:<11}{row['engine']:<10}{row['device']:<8}{row['dtype']:<10}{'':>20}  "
                  f"FAIL ({row['error']})")
            ok = False
            continue
        out = max(row["errors"][f] for f in ("y", "state"))
        grad = max(row["errors"][f] for f in FIELDS[2:])
        tol_out, tol_grad = TOLERANCE[row["dtype"]]
        passed = out <= tol_out and grad <= tol_grad
        ok &= passed
        print(f"{row['backend']:<11}{row['engine']:<10}{row['device']:<8}{row['dtype']:<10}{out:>10.2e}"
              f"{grad:>10.2e}  {'PASS' if passed else 'FAIL'}")
    print(f"\nTolerances: float32 {TOLERANCE['float32'][0]:.0e} outputs / {TOLERANCE['float32'][1]:.0e} grads; "
          f"bfloat16 {TOLERANCE['bfloat16'][0]:.0e} (oracle fed the bf16-rounded inputs).")
    print("ALL PASS" if ok else "SOME FAILED")
    return 0 if ok else 1


def worker(shape, seed):
    import keras
    import ml_dtypes
    import numpy as np
    from keras import ops

    from .. import engines
    from ..arguments import prepare
    from ..autodiff import vjp
    from ..reference import relative_error, wkv_reference, wkv_reference_grads

    B, T, H, N = (int(x) for x in shape.split(","))
    C = H * N
    rng = np.random.default_rng(seed)
    r, k, v = (rng.standard_normal((B, T, C)).astype(np.float32) * 0.5 for _ in range(3))
    w = rng.uniform(-3.0, 4.5, (B, T, C))
    w[rng.random(w.shape) < 0.1] = -1e9   # decay exactly 1 (a padding mask)
    w[rng.random(w.shape) < 0.03] = 100.0  # decay exactly 0
    w = w.astype(np.float32)
    u = (rng.standard_normal((H, N)) * 0.5).astype(np.float32)
    init_state = (rng.standard_normal((3, H, N, N)) * 0.3).astype(np.float32)
    state_map = rng.integers(0, 3, B)
    dy = rng.standard_normal((B, T, C)).astype(np.float32)
    dstate = rng.standard_normal((B, H, N, N)).astype(np.float32)
    for engine in engines.available():
        for dtype in ("float32", "bfloat16"):
            feed = [x if dtype == "float32" else x.astype(ml_dtypes.bfloat16).astype(np.float32)
                    for x in (r, k, v, w)]
            y_ref, s_ref = wkv_reference(*feed, u, N, init_state, state_map)
            g_ref = wkv_reference_grads(*feed, u, N, dy, dstate, init_state, state_map)

            def call(r_, k_, v_, w_, u_, s_):
                a = prepare(N, r_, k_, v_, w_, u_, s_, state_map)
                y_, s_last = engine.wkv(a.r, a.k, a.v, a.w, a.u, a.s0)
                return ops.reshape(y_, (B, T, C)), s_last

            tensors = [ops.convert_to_tensor(x, dtype) for x in feed]
            tensors += [ops.convert_to_tensor(u), ops.convert_to_tensor(init_state)]
            (y, s), grads = vjp(call, tensors, [dy, dstate])
            errors = {"y": relative_error(y, y_ref), "state": relative_error(s, s_ref)}
            errors.update({f: relative_error(g, g_ref[f]) for f, g in zip(FIELDS[2:], grads)})
            emit(backend=keras.backend.backend(), engine=engine.NAME, device=device_of(tensors[0]), dtype=dtype,
                 errors=errors)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        worker(sys.argv[2], int(sys.argv[3]))
