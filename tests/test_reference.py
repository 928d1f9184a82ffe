"""The oracle itself: its gradients against central finite differences, and its edge values."""
import numpy as np
import pytest

from rwkv6_keras_operator.reference import wkv_reference, wkv_reference_grads


@pytest.mark.parametrize("state_map", [None, [1, 0, 1]])
def test_oracle_gradients_match_finite_differences(state_map):
    rng = np.random.default_rng()
    B, T, H, N = 3, 5, 2, 3
    C = H * N
    args = {name: rng.standard_normal((B, T, C)) for name in "rkvw"}
    args["u"] = rng.standard_normal(C)
    args["init_state"] = rng.standard_normal((2 if state_map else B, H, N, N))
    dy, dstate = rng.standard_normal((B, T, C)), rng.standard_normal((B, H, N, N))

    def loss(a):
        y, s = wkv_reference(a["r"], a["k"], a["v"], a["w"], a["u"], N, a["init_state"], state_map)
        return np.sum(y * dy) + np.sum(s * dstate)

    grads = wkv_reference_grads(*(args[n] for n in "rkvwu"), N, dy, dstate, args["init_state"], state_map)
    eps = 1e-6
    for name, x in args.items():
        numeric = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            x[idx] += eps
            up = loss(args)
            x[idx] -= 2 * eps
            down = loss(args)
            x[idx] += eps
            numeric[idx] = (up - down) / (2 * eps)
        assert grads[name].shape == x.shape
        np.testing.assert_allclose(grads[name], numeric, rtol=1e-6, atol=1e-7, err_msg=name)


def test_oracle_one_step_by_hand():
    rng = np.random.default_rng()
    N = 4
    r, k, v, w = (rng.standard_normal((1, 1, N)) for _ in range(4))
    u = rng.standard_normal(N)
    s0 = rng.standard_normal((1, 1, N, N))
    y, s1 = wkv_reference(r, k, v, w, u, N, s0)
    kv = np.outer(k[0, 0], v[0, 0])
    np.testing.assert_allclose(y[0, 0], r[0, 0] @ (u[:, None] * kv + s0[0, 0]), rtol=1e-12)
    np.testing.assert_allclose(s1[0, 0], np.exp(-np.exp(w[0, 0]))[:, None] * s0[0, 0] + kv, rtol=1e-12)


def test_oracle_decay_extremes_are_finite():
    rng = np.random.default_rng()
    B, T, N = 1, 6, 2
    r, k, v = (rng.standard_normal((B, T, N)) for _ in range(3))
    w = np.array([[[-1e9, 100.0]] * T])  # decay exactly 1 and exactly 0
    y, s = wkv_reference(r, k, v, w, np.zeros(N), N)
    # channel 0 keeps everything, channel 1 keeps only the last step's k v^T
    np.testing.assert_allclose(s[0, 0, 0], (k[0, :, 0:1] * v[0]).sum(0), rtol=1e-12)
    np.testing.assert_allclose(s[0, 0, 1], k[0, -1, 1] * v[0, -1], rtol=1e-12)
    grads = wkv_reference_grads(r, k, v, w, np.zeros(N), N, rng.standard_normal((B, T, N)))
    assert all(np.all(np.isfinite(g)) for g in grads.values() if g is not None)
