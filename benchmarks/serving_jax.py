"""The jax half of benchmarks/serving.py (run that script): the Pallas engine, one process."""
import os
import statistics
import time

import numpy as np


def _setup(tiny):
    if tiny:
        os.environ.setdefault("RWKV6_PALLAS_INTERPRET", "1")   # read at import: the kernels run interpreted
    import jax

    from rwkv6_keras_operator.engines.pallas import common

    if not (common.on_gpu() or common.FORCE_INTERPRET):
        raise SystemExit("no CUDA GPU for the Pallas engine: run with --tiny for the CPU smoke run")
    return jax


def _block(out):
    import jax

    jax.block_until_ready(out)
    return out


class Timer:
    def __init__(self, calls, repeats):
        self.calls, self.repeats = calls, repeats

    def ms(self, fn, state=None):
        """Mean ms of back-to-back calls (no synchronisation between them), median of the repeats. With `state`,
        fn(state) returns the next state, as a decode loop feeds it (so a donated state is never reused)."""
        def call():
            nonlocal state
            if state is None:
                return fn()
            state = fn(state)
            return state

        def once():
            t = time.perf_counter()
            for _ in range(self.calls):
                out = call()
            _block(out)
            return (time.perf_counter() - t) / self.calls * 1e3

        _block(call())
        return statistics.median(once() for _ in range(self.repeats))


def _inputs(jnp, B, H, N, seed, n_state=None, T=None):
    rng = np.random.default_rng(seed)
    C = H * N
    lead = (B, 1) if T is None else (T, B, 1)
    r, k, v = (rng.standard_normal((*lead, C)) * 0.5 for _ in range(3))
    w = rng.standard_normal((*lead, C)) - 1.0
    x = [jnp.asarray(a, jnp.bfloat16) for a in (r, k, v, w)]
    u = jnp.asarray(rng.standard_normal((H, N)) * 0.5, jnp.float32)
    s = jnp.asarray(rng.standard_normal((n_state or B, H, N, N)) * 0.3, jnp.float32)
    return x, u, s


def run(args, shapes, report):
    jax = _setup(args.tiny)
    import jax.numpy as jnp

    from benchmarks.serving import VARIANTS, state_bytes
    from rwkv6_keras_operator import RWKVKernelOperator
    from rwkv6_keras_operator.engines import pallas
    from rwkv6_keras_operator.engines.pallas import recurrent
    from rwkv6_keras_operator.engines.step_settings import StepSettings
    from rwkv6_keras_operator.reference import relative_error, wkv_reference

    report.data["device"] = str(jax.devices()[0].device_kind) + (" (Pallas interpreter)" if args.tiny else "")
    report.data["versions"] = {"jax": jax.__version__}
    print(f"serving benchmark, jax on {report.data['device']}", flush=True)
    timer = Timer(args.calls, args.repeats)
    H, N, S = shapes["H"], shapes["N"], shapes["scan"]
    op = RWKVKernelOperator(N)

    def decode_call(s, r, k, v, w, u):
        y, s = op(r, k, v, w, u, with_state=True, init_state=s)
        return s, y

    def scan_of(step):
        """A jitted decode loop of len(tokens) steps, the state carried (and donated: updated in place); extra
        arguments (the slots of a pool) are passed to every step."""
        def loop(state, r, k, v, w, u, *extra):
            return jax.lax.scan(lambda s, t: step(s, *t, u, *extra), state, (r, k, v, w))
        return jax.jit(loop, donate_argnums=0)

    # ------------------------------------------------------------------ decode
    B = shapes["decode"]
    x, u, s = _inputs(jnp, B, H, N, 0)
    y, state = op(*x, u, with_state=True, init_state=s)
    feed = [np.asarray(a[:2], np.float32) for a in x]
    y_ref, s_ref = wkv_reference(*feed, np.asarray(u), N, np.asarray(s[:2]))
    err = max(relative_error(np.asarray(y[:2], np.float32), y_ref), relative_error(np.asarray(state[:2]), s_ref))
    report.add("decode", f"op(...) eager (jitted engine call), B={B}",
               timer.ms(lambda: op(*x, u, with_state=True, init_state=s)), note=f"oracle err {err:.1e}")
    report.add("decode", "engine alone eager (pallas.decode)", timer.ms(lambda: pallas.decode(*x, u, s)))
    xs, _, _ = _inputs(jnp, B, H, N, 1, T=S)

    def scan_step_ms(step, carried, *extra):
        """ms a step of scan_of(step) over the S tokens xs, the state `carried` (a fresh copy each run)."""
        loop = scan_of(step)
        _block(loop(jnp.array(carried), *xs, u, *extra))
        times = []
        for _ in range(args.repeats):
            start = _block(jnp.array(carried))
            t = time.perf_counter()
            _block(loop(start, *xs, u, *extra))
            times.append((time.perf_counter() - t) * 1e3 / S)
        return statistics.median(times)

    for name, step in (("op(...)", decode_call), ("engine alone", lambda s, *a: pallas.decode(*a, s)[::-1])):
        ms = report.add("decode", f"{name} in a jitted lax.scan of {S} steps (a step)", scan_step_ms(step, s))
        if name == "op(...)":
            report.goal(f"1, jax: decode B={B} through op(...), a step of a jitted decode loop", ms, 0.035)

    # ------------------------------------------------------------------ big batch
    B = shapes["big"]
    x, u, s = _inputs(jnp, B, H, N, 2)
    nbytes = state_bytes(B, H, N, 2)
    negate = jax.jit(lambda a: -a, donate_argnums=0)
    copy_ms = timer.ms(negate, jnp.array(s))
    copy_gbps = 2 * s.size * 4 / copy_ms / 1e6
    report.add("big", f"copy of the state's bytes (jitted -x, donated), B={B}", copy_ms, 2 * s.size * 4)
    report.add("big", "op(...) eager (a new state buffer)", timer.ms(lambda: op(*x, u, with_state=True, init_state=s)),
               nbytes, copy_gbps)
    step = jax.jit(lambda s, r, k, v, w, u: op(r, k, v, w, u, with_state=True, init_state=s)[::-1],
                   donate_argnums=0)
    report.add("big", "op(...) in a jitted step, state donated (in place)",
               timer.ms(lambda st: step(st, *x, u)[0], jnp.array(s)), nbytes, copy_gbps)

    # ------------------------------------------------------------------ pool
    n, rows = shapes["pool"], shapes["rows"]
    x, u, pool = _inputs(jnp, rows, H, N, 3, n_state=n)
    slots = jnp.asarray(np.random.default_rng(3).permutation(n)[:rows], jnp.int32)
    s = pool[slots]
    pool_step = jax.jit(lambda p, r, k, v, w, u, sl: op.step(r, k, v, w, u, p, sl)[::-1], donate_argnums=0)
    stepped = report.add("pool", f"op.step, {rows} of {n} slots, jitted, pool donated",
                         timer.ms(lambda p: pool_step(p, *x, u, slots)[0], jnp.array(pool)))
    plain = report.add("pool", f"op(...) plain decode of {rows} rows, jitted, state donated",
                       timer.ms(lambda st: step(st, *x, u)[0], jnp.array(s)))
    report.goal(f"3, jax: op.step of {rows} of {n} slots, against a plain decode of {rows} rows (jitted calls, "
                "donated)", stepped, plain)
    # Device-bound: S tokens a loop, the pool (or the rows' state) carried; slots the same every step.
    xs, _, _ = _inputs(jnp, rows, H, N, 4, T=S)
    stepped = report.add("pool", f"op.step in a jitted lax.scan of {S} steps, pool carried (a step)", scan_step_ms(
        lambda p, r, k, v, w, u, sl: op.step(r, k, v, w, u, p, sl)[::-1], pool, slots))
    plain = report.add("pool", f"op(...) plain decode of {rows} rows in the same scan (a step)",
                       scan_step_ms(decode_call, s))
    report.goal("3, jax: the same, a step of a jitted decode loop", stepped, plain)

    # ------------------------------------------------------------------ launch geometries
    if args.variants:
        saved = recurrent.STEP
        for tile, per_thread in VARIANTS:
            recurrent.STEP = StepSettings(tile=tile, per_thread=per_thread)
            jax.clear_caches()
            geometry = f"BV={recurrent.STEP.columns(N)}, warps={recurrent.STEP.warps(N)}"
            for case in ("decode", "big"):
                B = shapes[case]
                x, u, s = _inputs(jnp, B, H, N, 4)
                fn = jax.jit(lambda st, r, k, v, w, u: pallas.decode(r, k, v, w, u, st)[::-1], donate_argnums=0)
                ms = timer.ms(lambda st: fn(st, *x, u)[0], jnp.array(s))
                report.add(case, f"variant tile={tile} per_thread={per_thread} ({geometry}), jitted, donated", ms,
                           state_bytes(B, H, N, 2) if case == "big" else None, copy_gbps if case == "big" else None)
        recurrent.STEP = saved
        jax.clear_caches()
