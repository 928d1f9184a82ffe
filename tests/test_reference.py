"""The oracle itself: its gradients against central finite differences (also at the extreme decays every engine's
gradients are measured against), and its edge values worked by hand."""
import numpy as np
import pytest

from rwkv6_keras_operator.reference import wkv_reference, wkv_reference_grads


def finite_differences(args, state_map, dy, dstate, N, eps=1e-6):
    """Central differences of sum(y * dy) + sum(state * dstate) with respect to every entry of every argument."""
    def loss(a):
        y, s = wkv_reference(a["r"], a["k"], a["v"], a["w"], a["u"], N, a["init_state"], state_map)
        return np.sum(y * dy) + np.sum(s * dstate)

    numeric = {}
    for name, x in args.items():
        numeric[name] = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            x[idx] += eps
            up = loss(args)
            x[idx] -= 2 * eps
            down = loss(args)
            x[idx] += eps
            numeric[name][idx] = (up - down) / (2 * eps)
    return numeric


def random_case(rng, B, T, H, N, n_state):
    C = H * N
    args = {name: rng.standard_normal((B, T, C)) for name in "rkvw"}
    args["u"] = rng.standard_normal(C)
    args["init_state"] = rng.standard_normal((n_state, H, N, N))
    return args, rng.standard_normal((B, T, C)), rng.standard_normal((B, H, N, N))


@pytest.mark.parametrize("state_map", [None, [1, 0, 1]])
def test_oracle_gradients_match_finite_differences(state_map, rng):
    B, T, H, N = 3, 5, 2, 3
    args, dy, dstate = random_case(rng, B, T, H, N, 2 if state_map else B)
    grads = wkv_reference_grads(*(args[n] for n in "rkvwu"), N, dy, dstate, args["init_state"], state_map)
    numeric = finite_differences(args, state_map, dy, dstate, N)
    for name in args:
        assert grads[name].shape == args[name].shape
        np.testing.assert_allclose(grads[name], numeric[name], rtol=1e-6, atol=1e-7, err_msg=name)


def test_oracle_gradients_at_extreme_decays_match_finite_differences(rng):
    """w = +100 (decay exactly 0: exp(w) overflows nothing in float64 but exp(-exp(w)) is 0) and w = -1e9 (decay
    exactly 1) among ordinary decays: every gradient against finite differences; dw there is exactly 0 (the
    derivative of the decay, -exp(w) exp(-exp(w)), is below float64's smallest number at both)."""
    B, T, H, N = 2, 6, 1, 3
    args, dy, dstate = random_case(rng, B, T, H, N, B)
    extreme = rng.random(args["w"].shape)
    args["w"][extreme < 0.25] = 100.0
    args["w"][extreme > 0.75] = -1e9
    grads = wkv_reference_grads(*(args[n] for n in "rkvwu"), N, dy, dstate, args["init_state"])
    numeric = finite_differences(args, None, dy, dstate, N)
    for name in args:
        assert np.all(np.isfinite(grads[name])), name
        np.testing.assert_allclose(grads[name], numeric[name], rtol=1e-6, atol=1e-7, err_msg=name)
    assert np.all(grads["w"][(extreme < 0.25) | (extreme > 0.75)] == 0.0)


def test_oracle_gradients_at_extreme_decays_by_hand(rng):
    """One row, one head, N = 2: key channel 0 keeps its state forever (w = -1e9 at every step), key channel 1 is
    wiped at the first step (w = +100 there). Then the gradient of the start state is, for channel 0, every step's
    r_t[0] dy_t plus the final state's cotangent (S0 flows unchanged into every read and into the end), and for
    channel 1 only r_0[1] dy_0 (the first step reads S0 before wiping it)."""
    T, N = 5, 2
    r, k, v, dy = (rng.standard_normal((1, T, N)) for _ in range(4))
    w = rng.standard_normal((1, T, N))
    w[0, :, 0] = -1e9
    w[0, 0, 1] = 100.0
    u = rng.standard_normal(N)
    s0 = rng.standard_normal((1, 1, N, N))
    dstate = rng.standard_normal((1, 1, N, N))
    grads = wkv_reference_grads(r, k, v, w, u, N, dy, dstate, s0)
    d_s0 = grads["init_state"][0, 0]
    np.testing.assert_allclose(d_s0[0], (r[0, :, 0:1] * dy[0]).sum(0) + dstate[0, 0, 0], rtol=1e-12)
    np.testing.assert_allclose(d_s0[1], r[0, 0, 1] * dy[0, 0], rtol=1e-12)
    assert grads["w"][0, 0, 1] == 0.0 and np.all(grads["w"][0, :, 0] == 0.0)


def test_oracle_one_step_by_hand(rng):
    N = 4
    r, k, v, w = (rng.standard_normal((1, 1, N)) for _ in range(4))
    u = rng.standard_normal(N)
    s0 = rng.standard_normal((1, 1, N, N))
    y, s1 = wkv_reference(r, k, v, w, u, N, s0)
    kv = np.outer(k[0, 0], v[0, 0])
    np.testing.assert_allclose(y[0, 0], r[0, 0] @ (u[:, None] * kv + s0[0, 0]), rtol=1e-12)
    np.testing.assert_allclose(s1[0, 0], np.exp(-np.exp(w[0, 0]))[:, None] * s0[0, 0] + kv, rtol=1e-12)


def test_oracle_decay_extremes_are_finite(rng):
    B, T, N = 1, 6, 2
    r, k, v = (rng.standard_normal((B, T, N)) for _ in range(3))
    w = np.array([[[-1e9, 100.0]] * T])  # decay exactly 1 and exactly 0
    y, s = wkv_reference(r, k, v, w, np.zeros(N), N)
    # channel 0 keeps everything, channel 1 keeps only the last step's k v^T
    np.testing.assert_allclose(s[0, 0, 0], (k[0, :, 0:1] * v[0]).sum(0), rtol=1e-12)
    np.testing.assert_allclose(s[0, 0, 1], k[0, -1, 1] * v[0, -1], rtol=1e-12)
    grads = wkv_reference_grads(r, k, v, w, np.zeros(N), N, rng.standard_normal((B, T, N)))
    assert all(np.all(np.isfinite(g)) for g in grads.values() if g is not None)
