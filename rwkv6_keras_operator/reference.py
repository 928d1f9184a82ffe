"""The float64 NumPy oracle: the WKV recurrence step by step, forward and backward.

Per batch row b and head h, with S the (N, N) state, i over keys and j over values:

    y_t[j]  = sum_i r_t[i] * (u[i] * k_t[i] * v_t[j] + S[i, j])      (reads S before step t)
    S[i, j] = exp(-exp(w_t[i])) * S[i, j] + k_t[i] * v_t[j]

Every engine is tested against these two functions. They take NumPy-convertible arrays of any float dtype
(values are used exactly as given, after conversion to float64) and are slow: tests use small shapes.
`relative_error` is the one measure of a result against them (used by the tests, `check`, the demo and the
benchmarks).
"""
import numpy as np


def _start_states(init_state, state_map, B, H, N):
    if init_state is None:
        return np.zeros((B, H, N, N))
    s = np.asarray(init_state, dtype=np.float64).reshape(-1, H, N, N)
    if state_map is None:
        state_map = np.zeros(B, np.int64) if s.shape[0] == 1 else np.arange(B)
    return s[np.asarray(state_map)].copy()


def _split(r, k, v, w, u, head_size):
    r, k, v, w = (np.asarray(a, dtype=np.float64) for a in (r, k, v, w))
    B, T, C = r.shape
    H = C // head_size
    heads = (a.reshape(B, T, H, head_size) for a in (r, k, v, w))
    return (B, T, H), *heads, np.asarray(u, dtype=np.float64).reshape(H, head_size)


def wkv_reference(r, k, v, w, u, head_size, init_state=None, state_map=None):
    """y (B, T, C) and the state after the last step (B, H, N, N), both float64."""
    (B, T, H), r, k, v, w, u = _split(r, k, v, w, u, head_size)
    S = _start_states(init_state, state_map, B, H, head_size)
    with np.errstate(over="ignore"):
        decay = np.exp(-np.exp(w))
    y = np.empty_like(r)
    for t in range(T):
        kv = k[:, t, :, :, None] * v[:, t, :, None, :]
        y[:, t] = np.einsum("bhi,bhij->bhj", r[:, t], u[None, :, :, None] * kv + S)
        S = decay[:, t, :, :, None] * S + kv
    return y.reshape(B, T, H * head_size), S


def wkv_reference_grads(r, k, v, w, u, head_size, dy, dstate=None, init_state=None, state_map=None):
    """Gradients of sum(y * dy) + sum(state * dstate), float64, by reverse-mode through the recurrence.

    Returns a dict with r, k, v, w (B, T, C), u (in the shape it was given) and init_state (in the shape it
    was given; rows that share an index through state_map add up), or init_state None when none was given.
    """
    u_shape = np.shape(u)
    (B, T, H), r, k, v, w, u = _split(r, k, v, w, u, head_size)
    N = head_size
    dy = np.asarray(dy, dtype=np.float64).reshape(B, T, H, N)
    with np.errstate(over="ignore"):
        g = -np.exp(w)                    # d decay / d w = decay * g; 0 where the decay is 0 (g may be -inf)
    decay = np.exp(g)
    decay_times_g = np.where(decay > 0, decay * g, 0.0)
    # forward, keeping the state before every step
    states = np.empty((T + 1, B, H, N, N))
    states[0] = _start_states(init_state, state_map, B, H, N)
    for t in range(T):
        states[t + 1] = decay[:, t, :, :, None] * states[t] + k[:, t, :, :, None] * v[:, t, :, None, :]
    dS = np.zeros((B, H, N, N)) if dstate is None else np.asarray(dstate, dtype=np.float64).copy()
    dr, dk, dv, dw = (np.empty_like(r) for _ in range(4))
    du = np.zeros((H, N))
    for t in reversed(range(T)):
        rt, kt, vt, dyt, S = r[:, t], k[:, t], v[:, t], dy[:, t], states[t]
        vdy = np.einsum("bhj,bhj->bh", vt, dyt)[..., None]                     # v_t . dy_t
        dr[:, t] = u * kt * vdy + np.einsum("bhij,bhj->bhi", S, dyt)
        du += np.sum(rt * kt * vdy, axis=0)
        # dS currently holds the gradient w.r.t. the state after step t
        dk[:, t] = rt * u * vdy + np.einsum("bhij,bhj->bhi", dS, vt)
        dv[:, t] = np.sum(rt * u * kt, axis=-1)[..., None] * dyt + np.einsum("bhij,bhi->bhj", dS, kt)
        d_decay = np.einsum("bhij,bhij->bhi", dS, S)
        dw[:, t] = d_decay * decay_times_g[:, t]
        dS = decay[:, t, :, :, None] * dS + rt[..., None] * dyt[..., None, :]
    d_init = None
    if init_state is not None:
        n = np.asarray(init_state).reshape(-1, H, N, N).shape[0]
        index = np.asarray(state_map) if state_map is not None else (np.zeros(B, np.int64) if n == 1 else np.arange(B))
        d_init = np.zeros((n, H, N, N))
        np.add.at(d_init, index, dS)
        d_init = d_init.reshape(np.shape(init_state))
    C = H * N
    return {"r": dr.reshape(B, T, C), "k": dk.reshape(B, T, C), "v": dv.reshape(B, T, C),
            "w": dw.reshape(B, T, C), "u": du.reshape(u_shape), "init_state": d_init}


def _sequence_starts(init_state, state_map, n, H, N):
    """The start state of each of n packed sequences (n, H, N, N) and the index into init_state of each."""
    if init_state is None:
        return np.zeros((n, H, N, N)), None
    count = np.asarray(init_state).reshape(-1, H, N, N).shape[0]
    index = np.asarray(state_map) if state_map is not None else np.zeros(n, np.int64) if count == 1 else np.arange(n)
    return _start_states(init_state, index, n, H, N), index


def wkv_reference_varlen(r, k, v, w, u, head_size, cu_seqlens, init_state=None, state_map=None):
    """Packed sequences: r, k, v, w (1, T, C) hold n sequences, cu_seqlens[i]:cu_seqlens[i + 1] (n + 1 offsets).

    The oracle applied to each sequence alone, from its start state (init_state with n states, 1 shared, or any
    number with a state_map of n indices). Returns y (1, T, C) and the n final states (n, H, N, N), float64; an
    empty sequence's final state is its start state."""
    cu = [int(c) for c in np.asarray(cu_seqlens)]
    H = np.shape(r)[-1] // head_size
    starts, _ = _sequence_starts(init_state, state_map, len(cu) - 1, H, head_size)
    y = np.zeros(np.shape(r))
    states = np.empty_like(starts)
    for i, (a, b) in enumerate(zip(cu[:-1], cu[1:])):
        y[:, a:b], states[i] = wkv_reference(*(np.asarray(x)[:, a:b] for x in (r, k, v, w)), u, head_size,
                                             starts[i:i + 1])
    return y, states


def wkv_reference_varlen_grads(r, k, v, w, u, head_size, cu_seqlens, dy, dstate=None, init_state=None,
                               state_map=None):
    """Gradients of sum(y * dy) + sum(states * dstate) for packed sequences (see wkv_reference_varlen), float64.

    Returns the dict of wkv_reference_grads: r, k, v, w (1, T, C), u, and init_state (in the shape it was given;
    sequences that share a start state add up) or None."""
    cu = [int(c) for c in np.asarray(cu_seqlens)]
    n, H, N = len(cu) - 1, np.shape(r)[-1] // head_size, head_size
    starts, index = _sequence_starts(init_state, state_map, n, H, N)
    grads = {name: np.zeros(np.shape(r)) for name in "rkvw"}
    grads["u"] = np.zeros(np.shape(u))
    d_starts = np.empty_like(starts)
    for i, (a, b) in enumerate(zip(cu[:-1], cu[1:])):
        part = wkv_reference_grads(*(np.asarray(x)[:, a:b] for x in (r, k, v, w)), u, N, np.asarray(dy)[:, a:b],
                                   None if dstate is None else np.asarray(dstate)[i:i + 1], starts[i:i + 1])
        for name in "rkvw":
            grads[name][:, a:b] = part[name]
        grads["u"] += part["u"]
        d_starts[i] = part["init_state"][0]
    grads["init_state"] = None
    if init_state is not None:
        d_init = np.zeros((np.asarray(init_state).reshape(-1, H, N, N).shape[0], H, N, N))
        np.add.at(d_init, index, d_starts)
        grads["init_state"] = d_init.reshape(np.shape(init_state))
    return grads
def relative_error(got, want):
    """||got - want|| / ||want||, the relative L2 error of `got` against `want` (the oracle's value), in float64.

    inf where there is no result (got None) or it holds a non-finite value, so that it passes no tolerance."""
    if got is None:
        return float("inf")
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        raise ValueError(f"relative_error: got shape {got.shape}, want shape {want.shape}")
    if not np.all(np.isfinite(got)):
        return float("inf")
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))
