"""Each GPU kernel of one engine launched once at the training shape (B=8, T=4096, H=32, N=64, bf16), for a
profiler to look at; nothing is timed here.

    ncu --clock-control none --set full -k regex:'forward_kernel|backward_kernel|scan' \
        -o $OUT/triton python3 benchmarks/profile_kernels.py torch
    ncu --clock-control none --set full -k regex:wkv6 -o $OUT/pallas python3 benchmarks/profile_kernels.py jax

SHAPE=long takes B=1, T=16384 instead.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
ENGINE = sys.argv[1] if len(sys.argv) > 1 else "torch"
os.environ["KERAS_BACKEND"] = ENGINE
B, T, H, N = (1, 16384, 32, 64) if os.environ.get("SHAPE") == "long" else (8, 4096, 32, 64)


def torch_kernels():
    import torch

    from rwkv6_keras_operator.engines.triton import wkv

    g = torch.Generator(device="cuda").manual_seed(0)
    x = [(torch.randn(B, T, H, N, device="cuda", generator=g) * 0.5).to(torch.bfloat16) for _ in range(5)]
    r, k, v, dy, w = x[0], x[1], x[2], x[3], (x[4] * 2 - 1).to(torch.bfloat16)
    u = torch.randn(H, N, device="cuda", generator=g) * 0.5
    ts = [a.clone().requires_grad_(True) for a in (r, k, v, w, u)]
    y, _ = wkv(*ts, None)
    y.backward(dy)
    torch.cuda.synchronize()


def jax_kernels():
    import jax
    import jax.numpy as jnp

    from rwkv6_keras_operator import RWKVKernelOperator

    keys = jax.random.split(jax.random.PRNGKey(0), 6)
    r, k, v, dy = (jax.random.normal(keys[i], (B, T, H * N)).astype(jnp.bfloat16) * 0.5 for i in range(4))
    w = (jax.random.normal(keys[4], (B, T, H * N)) - 1).astype(jnp.bfloat16)
    u = jax.random.normal(keys[5], (H, N)) * 0.5
    op = RWKVKernelOperator(N, T)

    def loss(r, k, v, w, u):
        return jnp.sum(op(r, k, v, w, u)[0].astype(jnp.float32) * dy.astype(jnp.float32))

    jax.block_until_ready(jax.jit(lambda r, k, v, w, u: op(r, k, v, w, u)[0])(r, k, v, w, u))   # the forward alone
    # a training step: value_and_grad (with jax.grad alone XLA would drop the forward's output kernel)
    jax.block_until_ready(jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))(r, k, v, w, u))


(torch_kernels if ENGINE == "torch" else jax_kernels)()
print("done", ENGINE, (B, T, H, N))
