"""`bench`: time every engine available on this machine, on every installed backend.

Per backend (one process each) and engine: the forward pass and forward + backward over a sweep of sequence
lengths T, and the decode step (T = 1, state in and out). jax runs under jax.jit, tensorflow under
tf.function (XLA where it compiles), torch eagerly; each point is warmed up (compiled) first and the median of
repeated runs is reported. Prints a table; writes a log-log plot of time against T when matplotlib is there.
"""
import json
import sys
import time

DESCRIPTION = ("Time every engine available here (fwd and fwd+bwd over a sweep of T, and the decode step) on "
               "every installed backend; print a table and plot time vs T.")
# Defaults by the device the backend computes on (the worker decides; flags override each field).
PRESETS = {
    "cpu": {"batch": 2, "heads": 4, "head_size": 64, "lengths": [64, 256, 1024, 4096], "decode_batch": 16,
            "dtype": "float32"},
    "gpu": {"batch": 8, "heads": 32, "head_size": 64, "lengths": [512, 1024, 2048, 4096, 8192],
            "decode_batch": 64, "dtype": "bfloat16"},
}
PASSES = ("fwd", "fwd+bwd")


def add_arguments(parser):
    from .backends import installed_backends

    parser.add_argument("--backends", default=",".join(installed_backends()),
                        help="comma-separated Keras backends (default: all installed: %(default)s)")
    parser.add_argument("--batch", type=int, help="B (default: 2 on CPU, 8 on GPU)")
    parser.add_argument("--heads", type=int, help="H (default: 4 on CPU, 32 on GPU)")
    parser.add_argument("--head-size", type=int, help="N (default: 64)")
    parser.add_argument("--lengths", help="comma-separated T values (default: 64,256,1024,4096 on CPU; "
                                          "512,...,8192 on GPU)")
    parser.add_argument("--decode-batch", type=int, help="B of the decode step (default: 16 on CPU, 64 on GPU)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                        help="input dtype (default: float32 on CPU, bfloat16 on GPU)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per point, at most (default: %(default)s)")
    parser.add_argument("--budget", type=float, default=1.0,
                        help="seconds of timed runs per point, at most (at least 2 runs) (default: %(default)s)")
    parser.add_argument("--plot", default="bench.png", metavar="PATH",
                        help="PNG to write (default: %(default)s); needs matplotlib")
    parser.add_argument("--no-plot", action="store_true", help="do not write a plot")
    parser.add_argument("--json", metavar="PATH", help="also write every measurement as JSON")
    parser.add_argument("--from-json", metavar="PATH",
                        help="measure nothing: print the table and draw the plot of a file written by --json")


# ----------------------------------------------------------------------------------------------- parent


def _config(args):
    lengths = [int(t) for t in args.lengths.split(",")] if args.lengths else None
    return {"batch": args.batch, "heads": args.heads, "head_size": args.head_size, "lengths": lengths,
            "decode_batch": args.decode_batch, "dtype": args.dtype, "repeats": args.repeats, "budget": args.budget}


def _progress(backend):
    """on_record callback drawing a Keras progress bar once the worker has said how much it will do."""
    import keras

    state = {"bar": None, "done": 0}

    def on_record(record):
        if record["kind"] == "plan":
            print(f"{backend}: {record['engines']} engine(s) on {record['device']}, B={record['batch']} "
                  f"H={record['heads']} N={record['head_size']} {record['dtype']}")
            state["bar"] = keras.utils.Progbar(record["total"], unit_name="point", stateful_metrics=["T", "ms"])
        elif state["bar"] is not None:
            state["done"] += 1
            values = [("T", record["T"])] + ([("ms", record["ms"])] if record["kind"] == "time" else [])
            state["bar"].update(state["done"], values=values)
            if record["kind"] == "error":
                print(f"\n  {record['engine']} {record['pass']} T={record['T']}: {record['error']}")

    return on_record


def _table(records):
    times = [r for r in records if r["kind"] == "time"]
    lengths = sorted({r["T"] for r in times if r["pass"] != "decode"})
    head = f"{'backend':<11}{'engine':<10}{'device':<7}{'dtype':<9}{'pass':<9}"
    lines = [head + "".join(f"{'T=' + str(t):>10}" for t in lengths) + f"{'decode':>10}"]
    keys = list(dict.fromkeys((r["backend"], r["engine"], r["device"], r["dtype"]) for r in times))
    for key in keys:
        mine = [r for r in times if (r["backend"], r["engine"], r["device"], r["dtype"]) == key]
        decode = next((r["ms"] for r in mine if r["pass"] == "decode"), None)
        for i, name in enumerate(PASSES):
            cells = {r["T"]: r["ms"] for r in mine if r["pass"] == name}
            row = f"{key[0]:<11}{key[1]:<10}{key[2]:<7}{key[3]:<9}{name:<9}"
            row += "".join(f"{_ms(cells.get(t)):>10}" for t in lengths)
            lines.append(row + f"{_ms(decode) if i == 0 else '':>10}")
    return "\n".join(lines)


def _ms(value):
    if value is None:
        return "-"
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def _plot(records, path):
    """Log-log time vs T, one panel per pass, one line per (backend, engine). False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    times = [r for r in records if r["kind"] == "time" and r["pass"] in PASSES]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharey=True)
    for ax, name in zip(axes, PASSES):
        lines = dict.fromkeys((r["backend"], r["engine"], r["device"]) for r in times)
        for backend, engine, device in lines:
            points = sorted((r["T"], r["ms"]) for r in times
                            if (r["backend"], r["engine"], r["device"], r["pass"]) == (backend, engine, device, name))
            if points:
                ax.plot(*zip(*points), marker="o", label=f"{backend} · {engine} ({device})")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.set_title(name)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("milliseconds (median)")
    axes[0].legend(fontsize=8)
    first = times[0] if times else {}
    where = ", ".join(dict.fromkeys(r.get("device_name", r["device"]) for r in times))
    fig.suptitle(f"RWKV6 WKV operator on {where}: B={first.get('B')} H={first.get('H')} N={first.get('N')} "
                 f"{first.get('dtype', '')}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def _measure(args):
    """Records of every backend's worker, and the backends whose worker failed."""
    from .backends import run_worker

    config = json.dumps(_config(args))
    print("bench: every engine on every backend; milliseconds, median of up to "
          f"{args.repeats} runs after a warm-up (compile) run")
    records, failed = [], []
    for backend in filter(None, args.backends.split(",")):
        output = []
        found, code = run_worker(backend, __name__, ["--worker", config], echo=output.append,
                                 on_record=_progress(backend))
        records += found
        if code:
            failed.append(backend)
            print(f"{backend}: worker exited with {code}:\n" + "\n".join(output[-20:]))
    return records, failed


def run(args):
    if args.from_json:
        with open(args.from_json) as f:
            records, failed = json.load(f), []
        print(f"bench: the measurements in {args.from_json}; milliseconds (medians)")
    else:
        records, failed = _measure(args)
    if not any(r["kind"] == "time" for r in records):
        print("no measurements")
        return 1
    decode = next(r for r in records if r["kind"] == "time" and r["pass"] == "decode")
    print(f"\n{_table(records)}\n(decode: one step, T=1, B={decode['B']}, state in and out)")
    if args.json and not args.from_json:
        with open(args.json, "w") as f:
            json.dump([r for r in records if r["kind"] != "plan"], f, indent=1)
        print(f"wrote {args.json}")
    if not args.no_plot:
        if _plot(records, args.plot):
            print(f"wrote the plot to {args.plot}")
        else:
            print('no plot: matplotlib is not installed. Get it with  pip install "rwkv6-keras-operator[plot]"  '
                  "(or pip install matplotlib)")
    errors = [r for r in records if r["kind"] == "error"]
    return 1 if failed or errors else 0


# ----------------------------------------------------------------------------------------------- worker


def _median_ms(fn, repeats, budget):
    """Milliseconds: the first run (compile + run) and the median of the timed runs after it."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    runs, spent = [], 0.0
    while len(runs) < max(repeats, 2) and (len(runs) < 2 or spent < budget):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
        spent += runs[-1]
    runs.sort()
    return 1e3 * runs[len(runs) // 2], first


def _runner(backend, wkv, tensors, s0, dy, backward):
    """A no-argument function running one pass to completion (synchronised) under `backend` and returning what it
    computed: the forward's (y, state), or for fwd+bwd (loss, gradients of r, k, v, w, u) with loss = sum(y * dy).
    The loss is returned, as a training step returns it, so that y is computed: a compiled program that returned
    only the gradients would not need y (dy is a constant), and XLA or grappler would drop the forward's output
    kernel from the timed program."""
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        if backward:
            def loss(r, k, v, w, u):
                return jnp.sum(wkv(r, k, v, w, u, s0)[0].astype(jnp.float32) * dy)

            fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))
        else:
            fn = jax.jit(lambda r, k, v, w, u: wkv(r, k, v, w, u, s0))
        return lambda: jax.block_until_ready(fn(*tensors))
    if backend == "tensorflow":
        import tensorflow as tf

        def body(r, k, v, w, u):
            if not backward:
                return wkv(r, k, v, w, u, s0)
            with tf.GradientTape() as tape:
                tape.watch([r, k, v, w, u])
                loss = tf.reduce_sum(tf.cast(wkv(r, k, v, w, u, s0)[0], tf.float32) * dy)
            return loss, tape.gradient(loss, [r, k, v, w, u])

        fn = tf.function(body, jit_compile=True)
        try:
            fn(*tensors)
        except Exception:  # noqa: BLE001 - not XLA-compilable: a plain graph
            fn = tf.function(body)

        def run_tf():
            out = fn(*tensors)
            for x in tf.nest.flatten(out):   # one value of each result to the host: waits for all of them
                if x is not None:
                    float(tf.reshape(x, [-1])[0])
            return out
        return run_tf
    import torch

    sync = torch.cuda.synchronize if tensors[0].is_cuda else (lambda: None)
    if backward:
        leaves = [t.detach().requires_grad_(True) for t in tensors]

        def run_torch():
            loss = (wkv(*leaves, s0)[0].float() * dy).sum()
            grads = torch.autograd.grad(loss, leaves)
            sync()
            return loss.detach(), grads
    else:
        def run_torch():
            with torch.no_grad():
                out = wkv(*tensors, s0)
            sync()
            return out
    return run_torch


def _inputs(B, T, H, N, dtype, seed, with_state):
    import numpy as np
    from keras import ops

    rng = np.random.default_rng(seed)
    shape = (B, T, H, N)
    r, k, v = (rng.standard_normal(shape, np.float32) * 0.5 for _ in range(3))
    w = (rng.standard_normal(shape, np.float32) - 1.0)
    tensors = [ops.convert_to_tensor(x, dtype) for x in (r, k, v, w)]
    tensors.append(ops.convert_to_tensor(rng.standard_normal((H, N), np.float32) * 0.5))
    s0 = ops.convert_to_tensor(rng.standard_normal((B, H, N, N), np.float32) * 0.3) if with_state else None
    return tensors, s0, ops.convert_to_tensor(rng.standard_normal(shape, np.float32))


def _device_name(backend, device):
    """What the numbers ran on, for the plot's title: the GPU's name, or the CPU core count."""
    import os

    try:
        if device == "gpu" and backend == "torch":
            import torch

            return torch.cuda.get_device_name()
        if device == "gpu" and backend == "jax":
            import jax

            return jax.devices()[0].device_kind
    except Exception:  # noqa: BLE001 - a label only
        pass
    return f"{os.cpu_count()} CPU cores" if device == "cpu" else "GPU"


def worker(config):
    import keras
    from keras import ops

    from .. import engines
    from .backends import device_of, emit

    backend = keras.backend.backend()
    device = device_of(ops.zeros((1,)))
    config = {key: (PRESETS[device][key] if value is None and key in PRESETS[device] else value)
              for key, value in config.items()}
    B, H, N, dtype = config["batch"], config["heads"], config["head_size"], config["dtype"]
    available = engines.available()
    emit(kind="plan", total=len(available) * (2 * len(config["lengths"]) + 1), engines=len(available),
         device=device, batch=B, heads=H, head_size=N, dtype=dtype)
    points = [(T, name) for T in config["lengths"] for name in PASSES] + [(1, "decode")]
    name_of_device = _device_name(backend, device)
    for engine in available:
        for T, name in points:
            batch = config["decode_batch"] if name == "decode" else B
            tensors, s0, dy = _inputs(batch, T, H, N, dtype, seed=T, with_state=name == "decode")
            record = dict(backend=backend, engine=engine.NAME, device=device_of(tensors[0]), dtype=dtype,
                          B=batch, T=T, H=H, N=N, device_name=name_of_device)
            record["pass"] = name
            if not engine.supports(tensors[0], N):
                emit(kind="skip", **record)
                continue
            try:
                fn = _runner(backend, engine.wkv, tensors, s0, dy, backward=name == "fwd+bwd")
                ms, first = _median_ms(fn, config["repeats"], config["budget"])
                emit(kind="time", ms=ms, first_s=first, **record)
            except Exception as e:  # noqa: BLE001 - report and go on with the other points
                emit(kind="error", error=f"{type(e).__name__}: {str(e)[:300]}", **record)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker(json.loads(sys.argv[2]))
