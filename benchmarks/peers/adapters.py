"""The peers behind one call signature per framework, so that one harness (measure.py) times and checks them all.

    torch: fn(r, k, v, w, u, H, N, s0=None, want_state=False) -> (y, final state or None)
    jax:   fn(r, k, v, w, u) -> y
r, k, v, w: (B, T, C) with C = H * N, w the raw decay parameter (decay exp(-exp(w))); u: (H, N).

Peers (pinned versions: scripts/peers.sh):
    fla                   flash-linear-attention (fla-core 0.6.0): chunk_rwkv6 and fused_recurrent_rwkv6 (torch)
    rwkv6_keras_operator  whichever package of that name comes first on the path: 1.0.5 (its CUDA kernels, built
                          at first use) from the peers' directory, or this project when the repository comes first
    rwkv_ops              rwkv-ops 0.11.3: its CUDA kernel (torch and jax)
1.0.5 and rwkv-ops register the same torch library namespace: load at most one of them in a process.
"""
import os
import time
import traceback

MAX_T = 16384   # 1.0.5 and rwkv-ops compile the longest sequence into their kernels


def _origin(module_name):
    import importlib

    module = importlib.import_module(module_name)
    return {"module": getattr(module, "__file__", None), "version": getattr(module, "__version__", None)}


# -------------------------------------------------------------------------------------------------------- torch
def _fla_torch():
    import torch
    from fla.ops.rwkv6 import chunk_rwkv6, fused_recurrent_rwkv6

    def call(kernel):
        def fn(r, k, v, w, u, H, N, s0=None, want_state=False):
            B, T, C = r.shape
            y, state = kernel(r.view(B, T, H, N), k.view(B, T, H, N), v.view(B, T, H, N),
                              -torch.exp(w.float()).view(B, T, H, N), u.view(H, N), scale=1.0,
                              initial_state=s0, output_final_state=want_state)
            return y.reshape(B, T, C), state
        return fn

    return {"fla_chunk": call(chunk_rwkv6), "fla_fused_recurrent": call(fused_recurrent_rwkv6)}, _origin("fla")


def _operator_torch():
    os.environ["KERAS_BACKEND"] = "torch"
    from rwkv6_keras_operator import RWKVKernelOperator

    op = RWKVKernelOperator(head_size=64, max_sequence_length=MAX_T)

    def fn(r, k, v, w, u, H, N, s0=None, want_state=False):
        if s0 is not None or want_state:
            return op(r, k, v, w, u, with_state=True, init_state=s0)
        return op(r, k, v, w, u)[0], None

    return {"rwkv6_keras_operator": fn}, _origin("rwkv6_keras_operator")


def _rwkv_ops_torch():
    os.environ["KERNEL_TYPE"] = "native"
    from rwkv_ops.rwkv6_kernel import get_rwkv6_kernel

    kernel = get_rwkv6_kernel(HEAD_SIZE=64, KERNEL_TYPE="cuda", MAX_SEQUENCE_LENGTH=MAX_T)

    def fn(r, k, v, w, u, H, N, s0=None, want_state=False):
        out = kernel(r, k, v, w, u, initial_state=s0, output_final_state=want_state)
        if want_state:
            return out[0], out[1]
        return (out[0] if isinstance(out, tuple) else out), None

    return {"rwkv_ops": fn}, _origin("rwkv_ops")


# ---------------------------------------------------------------------------------------------------------- jax
def _operator_jax():
    os.environ["KERAS_BACKEND"] = "jax"
    from rwkv6_keras_operator import RWKVKernelOperator

    op = RWKVKernelOperator(head_size=64, max_sequence_length=MAX_T)
    return {"rwkv6_keras_operator": lambda r, k, v, w, u: op(r, k, v, w, u)[0]}, _origin("rwkv6_keras_operator")


def _rwkv_ops_jax():
    os.environ["KERAS_BACKEND"] = "jax"
    os.environ["KERNEL_TYPE"] = "native"
    from rwkv_ops.rwkv6_kernel import get_rwkv6_kernel

    kernel = get_rwkv6_kernel(HEAD_SIZE=64, KERNEL_TYPE="cuda", MAX_SEQUENCE_LENGTH=MAX_T)

    def fn(r, k, v, w, u):
        out = kernel(r, k, v, w, u)
        return out[0] if isinstance(out, tuple) else out

    return {"rwkv_ops": fn}, _origin("rwkv_ops")


LOADERS = {
    "torch": {"fla": _fla_torch, "rwkv6_keras_operator": _operator_torch, "rwkv_ops": _rwkv_ops_torch},
    "jax": {"rwkv6_keras_operator": _operator_jax, "rwkv_ops": _rwkv_ops_jax},
}


def load(framework, wanted, emit):
    """The wanted peers of `framework` that load here, as {name: fn}. Each load (a CUDA build for 1.0.5 and
    rwkv-ops) is reported as a "build" record with its time and the module it came from; a failure as an "error"
    record, and the other peers still load."""
    peers = {}
    for peer, loader in LOADERS[framework].items():
        if peer not in wanted:
            continue
        start = time.time()
        try:
            fns, origin = loader()
        except Exception as e:  # noqa: BLE001  (a peer that does not load is reported, not fatal)
            emit(kind="error", peer=peer, framework=framework, err=repr(e)[:400], tb=traceback.format_exc()[-800:])
            continue
        emit(kind="build", peer=f"{peer}_{framework}", seconds=time.time() - start, **origin)
        peers.update(fns)
    return peers
