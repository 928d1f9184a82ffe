"""Sequence parallelism on several GPUs: one sequence of T tokens cut along T, forward + backward, against one GPU.

B=1, H=32, N=64, bfloat16, T from 2^17 up (doubling) until a step runs out of memory; per T and setup the median
time of a forward + backward step, the bytes each device sends and receives a step (the exchanged pairs: counted,
not measured), and the largest T each setup trains. torch: distributed.sequence_parallel over NCCL, one process a
GPU (torch.multiprocessing spawn); jax: the operator under jax.jit with the inputs sharded along T over a mesh of
every GPU. One GPU: the same step in a process that sees only GPU 0 (the operator as it is, no exchange).

On a machine with 2+ GPUs, from the repository root (keras on the path: `eval "$(bash scripts/peers.sh env)"`):
    python3 benchmarks/sequence_parallel.py                  # both backends, all GPUs and one GPU
    python3 benchmarks/sequence_parallel.py --backend torch  # or jax
Env: OUT (where sequence_parallel.json goes; default /tmp), MIN_LOG2_T / MAX_LOG2_T (default 17 / 22), REPS
(default 5), HEADS (default 32; smaller for a smoke run).
`scripts/gpu.sh seqpar` runs it. Internal: `--worker torch|jax --devices D` is one measurement process.
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
B, H, N = 1, int(os.environ.get("HEADS", "32")), 64
C = H * N
MIN_LOG2_T = int(os.environ.get("MIN_LOG2_T", "17"))
MAX_LOG2_T = int(os.environ.get("MAX_LOG2_T", "22"))
REPS = int(os.environ.get("REPS", "5"))


def pair_bytes(devices):
    """Bytes one device sends + receives a training step: forward, an all-gather of (log a, S_local) (B·H·(N + N²)
    float32 each); backward, an all-gather of the gradients of (start state, final state) (2·B·H·N² float32 each)
    and a sum of du (H·N float32, torch: an all-reduce; jax: in the reduce-scatter of the pairs' gradients)."""
    if devices == 1:
        return 0
    forward = B * H * (N + N * N) * 4
    backward = 2 * B * H * N * N * 4 + H * N * 4
    return 2 * (devices - 1) * (forward + backward)   # ring all-gather: each device sends and receives (D-1) parts


def out_of_memory(error):
    text = str(error).lower()
    return "out of memory" in text or "resource_exhausted" in text or "outofmemory" in type(error).__name__.lower()


# ------------------------------------------------------------------------------------------------------ torch
def torch_rank(rank, devices, port, out):
    os.environ["KERAS_BACKEND"] = "torch"
    import torch
    import torch.distributed as dist

    from rwkv6_keras_operator import RWKVKernelOperator
    from rwkv6_keras_operator.distributed import sequence_parallel

    torch.cuda.set_device(rank)
    if devices > 1:
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=devices)
    op = RWKVKernelOperator(N)
    rows = []
    for log2_t in range(MIN_LOG2_T, MAX_LOG2_T + 1):
        T = 2 ** log2_t
        row = {"T": T, "devices": devices}
        try:
            g = torch.Generator(device="cuda").manual_seed(rank)
            make = lambda scale, shift=0.0: (torch.randn(B, T // devices, C, device="cuda", generator=g) * scale  # noqa: E731
                                             + shift).bfloat16().requires_grad_()
            r, k, v, w = make(0.5), make(0.5), make(0.5), make(0.5, -1.0)
            u = (torch.randn(H, N, device="cuda") * 0.5).requires_grad_()
            dy = torch.randn(B, T // devices, C, device="cuda").bfloat16()

            def step():
                if devices > 1:
                    y, _ = sequence_parallel(op, r, k, v, w, u)
                else:
                    y, _ = op(r, k, v, w, u)
                y.backward(dy)

            times = []
            for i in range(REPS + 1):
                if devices > 1:
                    dist.barrier()
                torch.cuda.synchronize()
                start = time.perf_counter()
                step()
                torch.cuda.synchronize()
                if i:
                    times.append(time.perf_counter() - start)
            row.update(ms=1e3 * sorted(times)[len(times) // 2],
                       peak_gib=torch.cuda.max_memory_allocated() / 2**30, bytes_per_step=pair_bytes(devices))
            del r, k, v, w, u, dy
        except torch.OutOfMemoryError as error:
            row["oom"] = str(error).splitlines()[0][:200]
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        failed = torch.tensor([1.0 if "oom" in row else 0.0], device="cuda")
        if devices > 1:
            dist.all_reduce(failed)   # every rank stops at the first T that failed on any of them
        rows.append(row)
        if rank == 0:
            print(json.dumps(row), flush=True)
        if failed.item():
            break
    if devices > 1:
        dist.destroy_process_group()
    if rank == 0:
        with open(out, "w") as f:
            json.dump(rows, f)


def torch_worker(devices, out):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(torch_rank, args=(devices, port, out), nprocs=devices, join=True)


# -------------------------------------------------------------------------------------------------------- jax
def jax_worker(devices, out):
    os.environ["KERAS_BACKEND"] = "jax"
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from rwkv6_keras_operator import RWKVKernelOperator

    assert len(jax.devices()) == devices, (jax.devices(), devices)
    op = RWKVKernelOperator(N)
    mesh = Mesh(np.array(jax.devices()), ("seq",))
    along_t, replicated = NamedSharding(mesh, P(None, "seq", None)), NamedSharding(mesh, P())

    def loss(r, k, v, w, u, dy):
        y, _ = op(r, k, v, w, u)
        return jnp.sum(y.astype(jnp.float32) * dy)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))   # the loss needs y: the forward stays whole
    rows = []
    for log2_t in range(MIN_LOG2_T, MAX_LOG2_T + 1):
        T = 2 ** log2_t
        row = {"T": T, "devices": devices}
        try:
            keys = jax.random.split(jax.random.PRNGKey(0), 6)
            make = jax.jit(lambda key, shift: (jax.random.normal(key, (B, T, C)) * 0.5 + shift).astype(jnp.bfloat16),
                           out_shardings=along_t)
            r, k, v, dy = (make(keys[i], 0.0) for i in range(4))
            w = make(keys[4], -1.0)
            u = jax.device_put(jax.random.normal(keys[5], (H, N)) * 0.5, replicated)
            compiled = step.lower(r, k, v, w, u, dy).compile()
            times = []
            for i in range(REPS + 1):
                start = time.perf_counter()
                jax.block_until_ready(compiled(r, k, v, w, u, dy))
                if i:
                    times.append(time.perf_counter() - start)
            stats = jax.devices()[0].memory_stats() or {}
            row.update(ms=1e3 * sorted(times)[len(times) // 2], peak_gib=stats.get("peak_bytes_in_use", 0) / 2**30,
                       bytes_per_step=pair_bytes(devices))
            del r, k, v, w, u, dy, compiled
        except Exception as error:  # noqa: BLE001  (out of memory: the largest T is found)
            if not out_of_memory(error):
                raise
            row["oom"] = str(error).splitlines()[0][:200]
        rows.append(row)
        print(json.dumps(row), flush=True)
        if "oom" in row:
            break
    with open(out, "w") as f:
        json.dump(rows, f)


# --------------------------------------------------------------------------------------------------- driver
def gpu_count():
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout
    return len([line for line in out.splitlines() if line.startswith("GPU")])


def run_setup(backend, devices, folder):
    out = os.path.join(folder, f"{backend}_{devices}.json")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(map(str, range(devices))), "KERAS_BACKEND": backend,
           "RWKV6_TIME_SHARDING": "1",
           "XLA_PYTHON_CLIENT_MEM_FRACTION": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")}
    print(f"== {backend}, {devices} GPU(s)", flush=True)
    proc = subprocess.run([sys.executable, __file__, "--worker", backend, "--devices", str(devices), "--out", out],
                          env=env)
    if proc.returncode or not os.path.exists(out):
        return {"error": f"exit {proc.returncode}"}
    with open(out) as f:
        return json.load(f)


def table(results):
    lines = [f"{'backend':8} {'GPUs':>4} {'T':>9} {'fwd+bwd ms':>11} {'vs 1 GPU':>9} {'peak GiB':>9} {'bytes/step':>11}"]
    for backend, setups in results["setups"].items():
        one = {row["T"]: row.get("ms") for row in setups.get("1", []) if isinstance(row, dict)}
        for devices, rows in setups.items():
            if not isinstance(rows, list):
                lines.append(f"{backend:8} {devices:>4} {rows}")
                continue
            for row in rows:
                if "oom" in row:
                    lines.append(f"{backend:8} {devices:>4} {row['T']:>9} {'out of memory':>11}")
                    continue
                base = one.get(row["T"])
                speedup = f"{base / row['ms']:.2f}x" if base and devices != "1" else ""
                lines.append(f"{backend:8} {devices:>4} {row['T']:>9} {row['ms']:>11.2f} {speedup:>9} "
                             f"{row['peak_gib']:>9.1f} {row['bytes_per_step']:>11}")
            trained = [row["T"] for row in rows if "ms" in row]
            lines.append(f"{backend:8} {devices:>4} largest T trained: {max(trained) if trained else 'none'}")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=("torch", "jax", "both"), default="both")
    parser.add_argument("--worker", choices=("torch", "jax"))
    parser.add_argument("--devices", type=int)
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.worker:
        return (torch_worker if args.worker == "torch" else jax_worker)(args.devices, args.out)
    folder = os.environ.get("OUT", "/tmp")
    os.makedirs(folder, exist_ok=True)
    gpus = gpu_count()
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
    results = {"date": time.strftime("%Y-%m-%d"), "gpus": gpus, "card": smi.stdout.strip().splitlines()[:1],
               "shape": {"B": B, "H": H, "N": N, "dtype": "bfloat16"}, "setups": {}}
    for backend in (("torch", "jax") if args.backend == "both" else (args.backend,)):
        results["setups"][backend] = {str(d): run_setup(backend, d, folder) for d in sorted({1, gpus})}
    with open(os.path.join(folder, "sequence_parallel.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(table(results))


if __name__ == "__main__":
    main()
