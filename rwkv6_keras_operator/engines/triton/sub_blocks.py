"""The sub-blocks of a chunk: a chunk of L tokens (one stored state) holds L / C sub-blocks of C rows, each one binary
tree of levels (levels.py; docs/math.md, "Sub-blocks"). The chunk kernels run one program per sub-block, which carries
the chunk's start state forward (and the gradient of its end state backward) over the sub-blocks before (after) its
own, by rule 2 of docs/math.md with the state as the carrier. With L == C (the default) there is nothing to carry.
"""
import triton
import triton.language as tl

from .common import chunk_start_state, exp, g_rows, load_rows, mm
from .levels import pre_factor, suf_factor


@triton.jit
def sub_block(pid, NC, L: tl.constexpr, C: tl.constexpr):
    """Program id -> (bh, chunk c, sub-block J): the sub-blocks of one chunk are neighbours."""
    J = pid % (L // C)
    c = (pid // (L // C)) % NC
    return pid // (NC * (L // C)), c, J


@triton.jit
def step_over(S, a_ptr, b_ptr, w_ptr, base, t0, T, stride_t, kcols, vcols, C: tl.constexpr, LOG_C: tl.constexpr,
              STATE_PREC: tl.constexpr, PIECES: tl.constexpr, MASK_PREC: tl.constexpr, BACKWARD: tl.constexpr):
    """S carried over the sub-block t0 .. t0+C-1, the same update both ways (as in scan.py):

        forward  (a, b = k, v):   the state after it from the state S before it:   diag(tot) S + (k * suf)^T v
        backward (a, b = r, dy):  the gradient before it from the gradient after:  diag(tot) S + (r * pre)^T dy
    """
    idx = tl.arange(0, C)
    rows = t0 + idx
    g = g_rows(w_ptr, base, rows, idx >= 0, T, kcols, stride_t)
    if BACKWARD:
        decay = pre_factor(g, LOG_C, C, PIECES, MASK_PREC)
    else:
        decay = suf_factor(g, LOG_C, C, PIECES, MASK_PREC)
    aq = load_rows(a_ptr, base, rows, T, kcols, stride_t) * decay
    bm = load_rows(b_ptr, base, rows, T, vcols, stride_t)
    return exp(tl.sum(g, 0))[:, None] * S + mm(tl.trans(aq), bm, STATE_PREC)


@triton.jit
def sub_block_start(s0_ptr, states_ptr, k_ptr, v_ptr, w_ptr, bh, c, J, NC, base, T, stride_t, kcols, vcols,
                    N: tl.constexpr, C: tl.constexpr, LOG_C: tl.constexpr, STATE_PREC: tl.constexpr,
                    PIECES: tl.constexpr, MASK_PREC: tl.constexpr, HAS_S0: tl.constexpr, HAS_STATES: tl.constexpr,
                    VARLEN: tl.constexpr):
    """S_J (N x len(vcols)): the state at the start of sub-block J of chunk c, carried from the chunk's start over the
    sub-blocks before it."""
    S = chunk_start_state(s0_ptr, states_ptr, bh, c, NC, kcols, vcols, N, HAS_S0, HAS_STATES, VARLEN)
    for jj in range(J):
        S = step_over(S, k_ptr, v_ptr, w_ptr, base, jj * C, T, stride_t, kcols, vcols, C, LOG_C, STATE_PREC, PIECES,
                      MASK_PREC, False)
    return S
