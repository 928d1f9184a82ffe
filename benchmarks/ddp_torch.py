"""torch DDP with the operator: one DDP step on 2 GPUs gives the gradients of one single-GPU step on the whole batch.

On a 2-GPU machine, from the repository root (keras on the path: `eval "$(bash scripts/peers.sh env)"`):
    python3 benchmarks/ddp_torch.py                 # spawns 2 processes (NCCL), one per GPU
    torchrun --nproc_per_node=2 benchmarks/ddp_torch.py
Logic check without GPUs (gloo on CPU; the operator then runs its portable engine):
    python3 benchmarks/ddp_torch.py --cpu
Prints, per parameter, the relative difference between the DDP gradient and the single-process gradient, then
PASS/FAIL (exit status 0/1). Writes $OUT/ddp_torch.json when OUT is set.

The model: x -> Linear -> (r, k, v, w) -> RWKVKernelOperator (with a learned init_state picked per row through a
state_map, and the final state in the loss) -> Linear. The loss is a per-row mean, so DDP's average over the
ranks of per-rank means equals the mean over the whole batch.
"""
import argparse
import json
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "torch")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

B, T, H, N = 4, 200, 2, 64          # global batch 4: two rows per rank
C = H * N
N_STATES = 3
STATE_MAP = [2, 0, 2, 1]            # row b starts from init_state[STATE_MAP[b]] (rows 0 and 2 share one)


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        from rwkv6_keras_operator import RWKVKernelOperator

        self.inp = torch.nn.Linear(C, 4 * C)
        self.u = torch.nn.Parameter(torch.randn(H, N) * 0.5)
        self.init_state = torch.nn.Parameter(torch.randn(N_STATES, H, N, N) * 0.3)
        self.out = torch.nn.Linear(C, C)
        self.op = RWKVKernelOperator(N, T)

    def forward(self, x, state_map):
        r, k, v, w = (self.inp(x) * 0.5).chunk(4, dim=-1)
        y, state = self.op(r, k, v, w - 1.0, self.u, with_state=True, init_state=self.init_state,
                           state_map=state_map)
        per_row = self.out(y).square().mean(dim=(1, 2)) + state.square().mean(dim=(1, 2, 3))
        return per_row.mean()


def data(device):
    g = torch.Generator().manual_seed(1234)
    return torch.randn(B, T, C, generator=g).to(device), torch.tensor(STATE_MAP, dtype=torch.int32).to(device)


def make_model(device):
    torch.manual_seed(0)
    return Model().to(device)


def worker(rank, world, cpu, out):
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("gloo" if cpu else "nccl", rank=rank, world_size=world)
    device = torch.device("cpu") if cpu else torch.device("cuda", rank)
    if not cpu:
        torch.cuda.set_device(device)
    x, state_map = data(device)
    rows = slice(rank * B // world, (rank + 1) * B // world)
    model = torch.nn.parallel.DistributedDataParallel(make_model(device), device_ids=None if cpu else [rank])
    model(x[rows], state_map[rows]).backward()
    ddp = {n: p.grad.detach().clone() for n, p in model.module.named_parameters()}
    code = 0
    if rank == 0:
        from rwkv6_keras_operator import engines

        engine = engines.select(x.view(B, T, H, N), N, False).NAME
        ref_model = make_model(device)
        ref_model(x, state_map).backward()
        report = {"world": world, "device": "cpu" if cpu else torch.cuda.get_device_name(device), "engine": engine,
                  "rel_diff": {}}
        ok = True
        for name, p in ref_model.named_parameters():
            diff = float((ddp[name] - p.grad).norm() / p.grad.norm().clamp_min(1e-30))
            report["rel_diff"][name] = diff
            ok &= diff <= 1e-5
            print(f"{name:<16} |grad| {float(p.grad.norm()):.3e}  relative difference DDP vs single {diff:.2e}")
        report["pass"] = ok
        print(f"engine {engine}, {report['device']}, world {world}: {'PASS' if ok else 'FAIL'}", flush=True)
        if out:
            with open(os.path.join(out, "ddp_torch.json"), "w") as f:
                json.dump(report, f, indent=1)
        code = 0 if ok else 1
    dist.barrier()
    dist.destroy_process_group()
    return code


def _spawned(rank, world, cpu, out):
    code = worker(rank, world, cpu, out)
    if code:
        sys.exit(code)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="gloo on CPU (a logic check; portable engine)")
    parser.add_argument("--world", type=int, default=2)
    args = parser.parse_args()
    out = os.environ.get("OUT")
    if "RANK" in os.environ:  # torchrun
        sys.exit(worker(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args.cpu, out))
    if not args.cpu and torch.cuda.device_count() < args.world:
        print(f"needs {args.world} GPUs, found {torch.cuda.device_count()}")
        sys.exit(2)
    torch.multiprocessing.spawn(_spawned, args=(args.world, args.cpu, out), nprocs=args.world, join=True)


if __name__ == "__main__":
    main()
