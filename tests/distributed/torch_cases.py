"""What each gloo process of tests/distributed/test_torch.py runs (imported by torch.multiprocessing's spawn).

Every rank draws the same whole-sequence inputs, passes its own slice of T to distributed.sequence_parallel, and
writes its results and the float64 oracle's (reference.py) as relative errors to OUT/rank{i}.json, per case."""
import json
import os
import sys

import numpy as np

SPLITS = {"unequal": (5, 1, 11), "equal": (6, 6, 6)}   # tokens a rank, in rank order
CASES = (  # name, decay, shards, init_state rows, dtype
    ("masks, unequal shards, init_state per row", "masks", "unequal", 2, "float32"),
    ("strong decays, equal shards, shared init_state", "strong", "equal", 1, "float32"),
    ("no init_state, unequal shards", "normal", "unequal", None, "float32"),
    ("bfloat16, unequal shards", "strong", "unequal", 2, "bfloat16"),
)
B, H, N = 2, 2, 16


def _engine(name):
    """The Triton engine in its interpreter on CPU tensors (said to be on CUDA, as tests/conftest.py's gpu_engine)."""
    from rwkv6_keras_operator import engines

    if name == "triton":
        from rwkv6_keras_operator.engines import triton
        from tests.conftest import _AsIfOnCuda

        supports = triton.supports
        triton.is_available = lambda: True
        triton.supports = lambda r, head_size: supports(_AsIfOnCuda(r), head_size)
    engines._CHOSEN.clear()


def _case(rank, world, seed, decay, shards, n_state, dtype):
    import torch

    from rwkv6_keras_operator import RWKVKernelOperator, reference
    from rwkv6_keras_operator.distributed import sequence_parallel
    from tests.helpers import make_inputs, rounded

    split = SPLITS[shards][:world]
    T = sum(split)
    start, stop = sum(split[:rank]), sum(split[:rank + 1])
    x = make_inputs(B, T, H, N, seed, decay, n_state)
    x = {name: rounded(a, dtype) if name in "rkvw" else a for name, a in x.items()}
    rng = np.random.default_rng(seed + 1)
    dy = rounded(rng.standard_normal((B, T, H * N)), dtype)
    dstate = rng.standard_normal((B, H, N, N))
    share = (rank + 1) / (world * (world + 1) / 2)   # each rank's loss holds its share of the final state's term
    op = RWKVKernelOperator(N)
    tdtype = getattr(torch, dtype)
    args = {n: torch.tensor(x[n][:, start:stop], dtype=tdtype, requires_grad=True) for n in "rkvw"}
    u = torch.tensor(x["u"], requires_grad=True)
    s0 = None if n_state is None else torch.tensor(x["init_state"], requires_grad=True)
    y, state = sequence_parallel(op, *(args[n] for n in "rkvw"), u, init_state=s0, with_state=True)
    loss = (y.float() * torch.tensor(dy[:, start:stop], dtype=torch.float32)).sum() \
        + share * (state * torch.tensor(dstate, dtype=torch.float32)).sum()
    loss.backward()
    # the whole sequence on this one process, and the float64 oracle
    full = {n: torch.tensor(x[n], dtype=tdtype, requires_grad=True) for n in "rkvw"}
    u1 = torch.tensor(x["u"], requires_grad=True)
    s1 = None if n_state is None else torch.tensor(x["init_state"], requires_grad=True)
    y1, state1 = op(*(full[n] for n in "rkvw"), u1, with_state=True, init_state=s1)
    ((y1.float() * torch.tensor(dy, dtype=torch.float32)).sum() + (state1 * torch.tensor(dstate,
                                                                                            dtype=torch.float32)).sum()).backward()
    ref_y, ref_state = reference.wkv_reference(x["r"], x["k"], x["v"], x["w"], x["u"], N, x.get("init_state"))
    ref = reference.wkv_reference_grads(x["r"], x["k"], x["v"], x["w"], x["u"], N, dy, dstate, x.get("init_state"))
    got = {"y": y, "state": state, "u": u.grad, "init_state": None if s0 is None else s0.grad,
           **{n: args[n].grad for n in "rkvw"}}
    one = {"y": y1[:, start:stop], "state": state1, "u": u1.grad, "init_state": None if s1 is None else s1.grad,
           **{n: full[n].grad[:, start:stop] for n in "rkvw"}}
    oracle = {"y": ref_y[:, start:stop], "state": ref_state, "u": ref["u"], "init_state": ref["init_state"],
              **{n: ref[n][:, start:stop] for n in "rkvw"}}
    npy = lambda t: t.detach().float().numpy()  # noqa: E731
    out = {"vs_one_process": {}, "vs_oracle": {}}
    for name, value in got.items():
        if value is None:
            continue
        out["vs_one_process"][name] = reference.relative_error(npy(value), npy(one[name]))
        out["vs_oracle"][name] = reference.relative_error(npy(value), oracle[name])
    return out


def _mismatch(rank, world):
    """Rank 1 passes a different C: every rank must raise the shape error (not hang)."""
    import torch

    from rwkv6_keras_operator import RWKVKernelOperator
    from rwkv6_keras_operator.distributed import sequence_parallel

    C = 32 if rank != 1 else 48
    x = torch.zeros(1, 3, C)
    try:
        sequence_parallel(RWKVKernelOperator(16), x, x, x, x, torch.zeros(C))
    except ValueError as error:
        return str(error)
    return None


def run(rank, world, out, engine, seed):
    os.environ["KERAS_BACKEND"] = "torch"
    import torch.distributed as dist

    # a file in the test's own folder as the rendezvous: no port to race other processes for
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=world)
    try:
        _engine(engine)
        from rwkv6_keras_operator import engines

        results = {"cases": {}}
        cases = CASES if engine == "portable" else CASES[:1]
        for i, (name, decay, shards, n_state, dtype) in enumerate(cases):
            results["cases"][name] = {"dtype": dtype, **_case(rank, world, seed + i, decay, shards, n_state, dtype)}
        results["engines"] = sorted({e.NAME for e in engines._CHOSEN.values()})
        results["mismatch_error"] = _mismatch(rank, world)
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.barrier()   # no rank tears its connections down while another still talks to it
    finally:
        dist.destroy_process_group()
    # Leave without the interpreter's finalisation: gloo's worker threads can still hold tensors then, and freeing
    # them without the interpreter aborts the process (pytorch/pytorch#179291), after every result is written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
