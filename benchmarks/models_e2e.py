"""End-to-end speed of the RWKV-6 model (rwkv6_keras_operator.models.RWKV6) on one GPU: training steps and
generation, under torch and jax, and the torch model with flash-linear-attention's chunk_rwkv6 in place of the
operator; random weights in realistic ranges.

On the GPU machine, from the repository root: `bash scripts/gpu.sh models` (it installs the peers and sets
$PEER_PYTHONPATH, where fla is found), or by hand after `eval "$(bash scripts/peers.sh env)"`:
    OUT=/tmp/e2e python3 benchmarks/models_e2e.py
    python3 benchmarks/models_e2e.py --backend torch --wkv fla --skip-generation   # one case, in this process
    python3 benchmarks/models_e2e.py --tiny                                          # a smoke run on CPU
Without --backend it runs every case, each in its own process (torch + operator, torch + fla, jax + operator),
and writes $OUT/models_e2e.json and $OUT/models_e2e.md (OUT defaults to /tmp).

Training: the "169M" configuration (12 layers, width 768, head 64, vocabulary 65536), B=8, T=4096, mixed_bfloat16,
AdamW, Keras' train_on_batch (jax: jit-compiled; torch: eager); tokens/s, peak GPU memory, and the share of a
step spent in the WKV (the WKV alone, forward + backward at the step's shape, times the layers, over the step).
The same data, weights and steps in every case: the losses after the steps agree (to bfloat16 noise) when the
WKVs do. Generation: prefill 1024 tokens, then 256 new ones (greedy, host-side sampling as model.generate does), batch 1
and 64; tokens/s of the decode, and its time per token split into the WKV (the WKV alone, T = 1 with the state
in and out, times the layers) and the rest.
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = (("torch", "operator"), ("torch", "fla"), ("jax", "operator"))
FULL = dict(vocab_size=65536, n_embd=768, n_layer=12, head_size=64, dim_ffn=2688, mix_lora=32, decay_lora=64)
TINY = dict(vocab_size=1000, n_embd=64, n_layer=2, head_size=16, dim_ffn=224, mix_lora=8, decay_lora=16)
SIZES = {"full": dict(train_batch=8, train_len=4096, train_steps=10, warmup=3, prefill=1024, new=256,
                      gen_batches=(1, 64)),
         "tiny": dict(train_batch=2, train_len=64, train_steps=2, warmup=1, prefill=16, new=8, gen_batches=(1, 4))}


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=("torch", "jax"), help="run one case in this process")
    parser.add_argument("--wkv", choices=("operator", "fla"), default="operator",
                        help="the WKV inside the model: this package's operator, or fla's chunk_rwkv6 (torch)")
    parser.add_argument("--tiny", action="store_true", help="a tiny configuration (CPU smoke run)")
    parser.add_argument("--skip-generation", action="store_true")
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--json", help="where one case writes its results (default: print them)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per case (driver)")
    return parser.parse_args(argv)


# ---------------------------------------------------------------- one case, in this process

class Clock:
    """Synchronised wall-clock timing on the active backend's device."""

    def __init__(self, backend):
        self.backend = backend

    def sync(self, value=None):
        if self.backend == "torch":
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()
        elif value is not None:
            import jax

            jax.block_until_ready(value)
        return value

    def mean_ms(self, fn, reps, warmup=2):
        for _ in range(warmup):
            self.sync(fn())
        start = time.perf_counter()
        for _ in range(reps):
            out = fn()
        self.sync(out)
        return (time.perf_counter() - start) / reps * 1e3


def device_info(backend):
    if backend == "torch":
        import torch

        return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    import jax

    return f"{jax.devices()[0].platform}: {jax.devices()[0].device_kind}"


def reset_peak(backend):
    if backend == "torch":
        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()


def peak_memory_gb(backend):
    if backend == "torch":
        import torch

        return torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats["peak_bytes_in_use"] / 1e9 if "peak_bytes_in_use" in stats else None


class FlaWKV:
    """fla's chunk_rwkv6 with RWKVKernelOperator's call signature (torch): fla takes the log-decay -exp(w),
    (B, T, H, N) tensors, u (H, N), and scale 1 (RWKV-6 does not scale r)."""

    def __init__(self, head_size):
        try:
            from fla.ops.rwkv6 import chunk_rwkv6
        except ImportError:
            for entry in os.environ.get("PEER_PYTHONPATH", "").split(os.pathsep):
                if entry and entry not in sys.path:
                    sys.path.append(entry)        # after this project, which must shadow the peers' 1.0.5
            from fla.ops.rwkv6 import chunk_rwkv6
        self.chunk_rwkv6, self.head_size = chunk_rwkv6, head_size

    def __call__(self, r, k, v, w, u, with_state=False, init_state=None, state_map=None):
        import torch
        from keras import ops

        B, T, C = r.shape
        N = self.head_size
        H = C // N
        s0 = None
        if init_state is not None:
            s0 = ops.convert_to_tensor(init_state).float()
            s0 = s0.expand(B, H, N, N).contiguous() if s0.dim() == 3 else s0
        o, state = self.chunk_rwkv6(r.view(B, T, H, N), k.view(B, T, H, N), v.view(B, T, H, N),
                                    -torch.exp(w.float()).view(B, T, H, N), ops.convert_to_tensor(u).view(H, N),
                                    scale=1.0, initial_state=s0, output_final_state=with_state)
        return o.reshape(B, T, C), state


def wkv_inputs(backend, B, T, C, H, N, state):
    import numpy as np
    from keras import ops

    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal((B, T, C)).astype(np.float32) * 0.5 for _ in range(3)]
    arrays.append(rng.uniform(-6.0, 1.5, (B, T, C)).astype(np.float32))
    r, k, v, w = (ops.cast(ops.convert_to_tensor(a), "bfloat16") for a in arrays)
    u = ops.convert_to_tensor((rng.standard_normal((H, N)) * 0.5).astype(np.float32))
    s0 = ops.convert_to_tensor(rng.standard_normal((B, H, N, N)).astype(np.float32)) if state else None
    return r, k, v, w, u, s0


def wkv_ms(backend, wkv, B, T, C, N, backward, clock, reps):
    """Mean ms of one WKV call at the model's shape: forward (+ backward)."""
    H = C // N
    r, k, v, w, u, s0 = wkv_inputs(backend, B, T, C, H, N, state=not backward)
    if backend == "torch":
        import torch

        if not backward:
            def run():
                with torch.no_grad():
                    return wkv(r, k, v, w, u, with_state=True, init_state=s0)[0]
            return clock.mean_ms(run, reps)
        leaves = [x.detach().requires_grad_(True) for x in (r, k, v, w)]
        dy = torch.randn_like(leaves[0])

        def run():
            y = wkv(*leaves, u)[0]
            y.backward(dy)
            return y
        return clock.mean_ms(run, reps)
    import jax
    import jax.numpy as jnp

    if not backward:
        fn = jax.jit(lambda r, k, v, w, s0: wkv(r, k, v, w, u, with_state=True, init_state=s0))
        return clock.mean_ms(lambda: fn(r, k, v, w, s0), reps)
    dy = jnp.ones(r.shape, jnp.float32)
    # value_and_grad: the loss needs y, so the forward's output kernel stays in the program (as in a training step)
    fn = jax.jit(jax.value_and_grad(lambda *x: jnp.sum(wkv(*x, u)[0].astype(jnp.float32) * dy), argnums=(0, 1, 2, 3)))
    return clock.mean_ms(lambda: fn(r, k, v, w), reps)


def build(config, wkv_kind, backend):
    from rwkv6_keras_operator.models import RWKV6, RWKV6Config
    from rwkv6_keras_operator.models.checkpoint import random_weights

    cfg = RWKV6Config(**config)
    model = RWKV6(cfg, dtype="mixed_bfloat16")
    model.load_checkpoint_weights(random_weights(cfg, seed=0))
    if wkv_kind == "fla":
        fla = FlaWKV(cfg.head_size)
        for block in model.blocks:
            block.att.operator = fla
    return model


def run_training(model, sizes, backend, clock, wkv):
    import keras
    import numpy as np

    cfg = model.config
    B, T = sizes["train_batch"], sizes["train_len"]
    model.compile(optimizer=keras.optimizers.AdamW(1e-4),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    data = rng.integers(0, cfg.vocab_size, (B, T + 1)).astype(np.int32)
    x, y = data[:, :-1], data[:, 1:]
    for _ in range(sizes["warmup"]):
        model.train_on_batch(x, y)
    clock.sync()
    reset_peak(backend)
    start = time.perf_counter()
    for _ in range(sizes["train_steps"]):
        loss = model.train_on_batch(x, y)
    clock.sync()
    step_ms = (time.perf_counter() - start) / sizes["train_steps"] * 1e3
    one = wkv_ms(backend, wkv, B, T, cfg.n_embd, cfg.head_size, True, clock, reps=sizes["train_steps"])
    return {"batch": B, "seq_len": T, "step_ms": step_ms, "tokens_per_s": B * T / step_ms * 1e3,
            "peak_memory_gb": peak_memory_gb(backend), "wkv_fwd_bwd_ms_per_layer": one,
            "wkv_share_of_step": one * cfg.n_layer / step_ms, "loss": float(np.asarray(loss).reshape(-1)[0])}


def run_generation(model, sizes, backend, clock, wkv, batch):
    import numpy as np

    cfg = model.config
    rng = np.random.default_rng(1)
    prompts = rng.integers(0, cfg.vocab_size, (batch, sizes["prefill"])).astype(np.int32)
    model.generate(prompts, 3, temperature=0)                   # compiles the prefill and the step (jax)
    times = []
    clock.sync()
    start = time.perf_counter()
    model.generate(prompts, sizes["new"], temperature=0, on_tokens=lambda _: times.append(time.perf_counter()))
    prefill_ms = (times[0] - start) * 1e3
    decode_ms = (times[-1] - times[0]) / (len(times) - 1) * 1e3
    wkv_step = wkv_ms(backend, wkv, batch, 1, cfg.n_embd, cfg.head_size, False, clock, reps=50)
    wkv_prefill = wkv_ms(backend, wkv, batch, sizes["prefill"], cfg.n_embd, cfg.head_size, False, clock, reps=5)
    return {"batch": batch, "prefill_tokens": sizes["prefill"], "new_tokens": sizes["new"],
            "prefill_ms": prefill_ms, "prefill_tokens_per_s": batch * sizes["prefill"] / prefill_ms * 1e3,
            "prefill_wkv_ms": wkv_prefill * cfg.n_layer, "decode_ms_per_token": decode_ms,
            "decode_tokens_per_s": batch / decode_ms * 1e3, "decode_wkv_ms_per_token": wkv_step * cfg.n_layer,
            "decode_rest_ms_per_token": decode_ms - wkv_step * cfg.n_layer}


def run_case(args):
    os.environ["KERAS_BACKEND"] = args.backend
    sys.path.insert(0, ROOT)
    import keras

    from rwkv6_keras_operator import RWKVKernelOperator

    if args.wkv == "fla" and args.backend != "torch":
        raise SystemExit("--wkv fla runs under --backend torch")
    sizes = SIZES["tiny" if args.tiny else "full"]
    config = TINY if args.tiny else FULL
    clock = Clock(args.backend)
    result = {"backend": args.backend, "wkv": args.wkv, "device": device_info(args.backend),
              "keras": keras.__version__, "config": config, "date": time.strftime("%Y-%m-%d"), "dtype":
              "mixed_bfloat16"}
    wkv = FlaWKV(config["head_size"]) if args.wkv == "fla" else RWKVKernelOperator(config["head_size"])
    if not args.skip_training:
        model = build(config, args.wkv, args.backend)
        result["training"] = run_training(model, sizes, args.backend, clock, wkv)
        print(json.dumps(result["training"]), flush=True)
        del model
    if not args.skip_generation and args.wkv == "operator":
        model = build(config, args.wkv, args.backend)
        result["generation"] = []
        for batch in sizes["gen_batches"]:
            result["generation"].append(run_generation(model, sizes, args.backend, clock, wkv, batch))
            print(json.dumps(result["generation"][-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    else:
        print(json.dumps(result, indent=1))
    return 0


# ---------------------------------------------------------------- the driver: every case, one process each

def markdown(results):
    lines = ["| backend | WKV | tokens/s | step (ms) | peak memory (GB) | WKV share of the step | loss after the steps |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in results:
        t = r.get("training")
        if t:
            memory = "" if t["peak_memory_gb"] is None else f"{t['peak_memory_gb']:.1f}"
            lines.append(f"| {r['backend']} | {r['wkv']} | {t['tokens_per_s']:,.0f} | {t['step_ms']:.1f} | {memory} | "
                         f"{t['wkv_share_of_step']:.1%} | {t['loss']:.4f} |")
    lines += ["", "| backend | batch | prefill (ms) | prefill tokens/s | decode tokens/s | ms/token | "
              "WKV ms/token | rest ms/token |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        for g in r.get("generation", ()):
            lines.append(f"| {r['backend']} | {g['batch']} | {g['prefill_ms']:.1f} | {g['prefill_tokens_per_s']:,.0f} | "
                         f"{g['decode_tokens_per_s']:,.0f} | {g['decode_ms_per_token']:.2f} | "
                         f"{g['decode_wkv_ms_per_token']:.3f} | {g['decode_rest_ms_per_token']:.2f} |")
    return "\n".join(lines)


def drive(args):
    out = os.environ.get("OUT", "/tmp")
    os.makedirs(out, exist_ok=True)
    results, failures = [], []
    for backend, wkv in CASES:
        if args.tiny and wkv == "fla":
            continue                                          # fla needs a GPU
        path = os.path.join(out, f"models_e2e_{backend}_{wkv}.json")
        command = [sys.executable, os.path.abspath(__file__), "--backend", backend, "--wkv", wkv, "--json", path]
        command += [flag for flag, on in (("--tiny", args.tiny), ("--skip-generation", args.skip_generation),
                                          ("--skip-training", args.skip_training)) if on]
        print(f"== {backend} + {wkv}", flush=True)
        try:
            done = subprocess.run(command, timeout=args.timeout, capture_output=True, text=True)
            with open(os.path.join(out, f"models_e2e_{backend}_{wkv}.log"), "w") as f:
                f.write(done.stdout + done.stderr)
            print(done.stdout[-2000:], flush=True)
            if done.returncode:
                failures.append(f"{backend}+{wkv}: exit {done.returncode}: {done.stderr[-1500:]}")
                continue
        except subprocess.TimeoutExpired:
            failures.append(f"{backend}+{wkv}: timed out after {args.timeout}s")
            continue
        with open(path) as f:
            results.append(json.load(f))
    summary = {"results": results, "failures": failures}
    with open(os.path.join(out, "models_e2e.json"), "w") as f:
        json.dump(summary, f, indent=1)
    table = markdown(results)
    device = results[0]["device"] if results else "?"
    with open(os.path.join(out, "models_e2e.md"), "w") as f:
        f.write(f"RWKV-6 end to end ({'tiny' if args.tiny else '169M'} configuration, {device}, "
                f"{time.strftime('%Y-%m-%d')})\n\n{table}\n")
    print(table)
    for failure in failures:
        print("FAILED", failure)
    return 1 if failures else 0


def main(argv=None):
    args = parse(argv)
    return run_case(args) if args.backend else drive(args)


if __name__ == "__main__":
    sys.exit(main())
